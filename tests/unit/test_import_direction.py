"""Imports run one way (ARCHITECTURE.md, "Where things live"): records and the config
schema at the bottom; the components above them; evaluation and config loading above
those; the loop; actors and runtime; commands on top. Read from the source with `ast`,
lazy imports inside functions included (a lazy import hides a cycle, it does not remove
it), so nothing here imports the modules it checks."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("srpo_ray", "actors", "cluster")

# Lowest layer first. A module belongs to the longest prefix listed; it may import its
# own layer (without a cycle) and every layer below.
LAYERS: list[tuple[str, ...]] = [
    ("srpo_ray", "srpo_ray.records", "srpo_ray.config", "srpo_ray.config.schema", "srpo_ray.host_heap",
     "srpo_ray.fileio"),
    ("srpo_ray.algo", "srpo_ray.data", "srpo_ray.rewards", "srpo_ray.weights", "srpo_ray.learner",
     "srpo_ray.generation", "srpo_ray.models"),
    ("srpo_ray.config.load", "srpo_ray.config.validate", "srpo_ray.eval", "srpo_ray.telemetry"),
    ("srpo_ray.loop",),
    ("actors", "cluster"),
    ("srpo_ray.runtime",),
    ("srpo_ray.driver", "srpo_ray.eval.__main__", "srpo_ray.ledger", "srpo_ray.plot", "srpo_ray.scale",
     "srpo_ray.difficulty"),
]
COMMANDS = set(LAYERS[-1])


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every project module `name` imports, at top level or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in MODULES:  # `from a.b import name` -> a.b
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def unit_of(module: str) -> str:
    """The folder a module counts in for the folder-level cycle check: its package, except
    commands and the two halves of config, which sit on layers of their own."""
    if module in COMMANDS or module.startswith("srpo_ray.config"):
        return module
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "srpo_ray" and len(parts) > 2 else module


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer_of(module)


def test_imports_never_point_up_a_layer():
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a, targets in GRAPH.items() for b in sorted(targets) if layer_of(b) > layer_of(a)]
    assert not upward, "imports must run downward:\n" + "\n".join(upward)


def test_no_cycle_between_files():
    assert _cycle(GRAPH) is None, f"import cycle: {' -> '.join(_cycle(GRAPH))}"


def test_no_cycle_between_folders():
    folders: dict[str, set[str]] = {}
    for a, targets in GRAPH.items():
        for b in targets:
            if unit_of(a) != unit_of(b):
                folders.setdefault(unit_of(a), set()).add(unit_of(b))
    assert _cycle(folders) is None, f"folder cycle: {' -> '.join(_cycle(folders))}"


def test_pure_code_never_imports_ray_or_vllm_at_top_level():
    """Only the Ray glue (runtime/, actors/, cluster/ray_placement.py, the driver) imports
    Ray at module level; vLLM is imported lazily inside the engine adapter and the GPU
    transports only."""
    allowed_ray = ("srpo_ray.runtime", "actors", "cluster.ray_placement", "srpo_ray.driver")
    offenders = []
    for name, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for imported in names:
                root = imported.split(".")[0]
                if root == "vllm" or (root == "ray" and not name.startswith(allowed_ray)):
                    offenders.append(f"{name} imports {imported} at module level")
    assert not offenders, "\n".join(offenders)


def test_the_checker_sees_lazy_imports_and_cycles():
    """The checker itself: a lazy import counts, and a two-node loop is a cycle."""
    assert "srpo_ray.config.schema" in GRAPH["srpo_ray.config.load"]
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
