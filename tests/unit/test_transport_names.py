"""The weights seam stays closed: transport knowledge lives in srpo_ray/weights/ only.

Outside that package no code names a weight transport (a string constant equal to a
registered name: in a comparison, a tuple of choices, a dict key). What callers need to
know of a transport they ask of its class (transport.py: traits and the functions that
read them), so a new transport is one file plus one `register` line; the last test
checks that with a transport defined here.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

import pytest

from srpo_ray.weights import transport as transport_module
from srpo_ray.weights.transport import (
    PublishedWeights,
    WeightTransport,
    config_names,
    register,
    registered_names,
    resolve_transport,
    transport_class,
    vllm_weight_transfer,
    with_every_rank,
)

REPO = Path(__file__).resolve().parents[2]
CHECKED = ("srpo_ray", "actors", "cluster")
SEAM = REPO / "srpo_ray" / "weights"


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _is_process_group_backend(node: ast.Constant, parents: dict[ast.AST, ast.AST]) -> bool:
    """"nccl" is also torch.distributed's backend name: allowed where the comparison or
    assignment it sits in is about a variable or attribute called `backend`
    (learner.backend, the learner's process group)."""
    up = parents.get(node)
    while up is not None and not isinstance(up, (ast.Compare, ast.stmt)):
        up = parents.get(up)
    if isinstance(up, ast.Compare):
        others = [up.left, *up.comparators]
    elif isinstance(up, (ast.Assign, ast.AnnAssign)):
        others = up.targets if isinstance(up, ast.Assign) else [up.target]
    else:
        return False
    return any((isinstance(o, ast.Name) and o.id == "backend") or (isinstance(o, ast.Attribute) and o.attr == "backend")
               for o in others)


def transport_names_in(source: str, names: set[str]) -> Iterator[tuple[int, str]]:
    """(line, name) of each string constant in `source` that is a transport's name.
    Comments are not in the tree, and docstrings or messages that mention a name are
    never equal to it, so only code that tests or picks a transport by name is found."""
    tree = ast.parse(source)
    parents = _parents(tree)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
                and not _is_process_group_backend(node, parents)):
            yield node.lineno, node.value


def checked_files() -> list[Path]:
    files = [f for root in CHECKED for f in sorted((REPO / root).rglob("*.py"))]
    return [f for f in files if SEAM not in f.parents]


def test_no_code_outside_the_weights_package_names_a_transport():
    names = set(registered_names())
    assert {"shared_memory", "object_store"} <= names  # the registry is what is checked against
    files = checked_files()
    assert len(files) > 20 and not any(SEAM in f.parents for f in files)
    found = [f"{f.relative_to(REPO)}:{line}: {name!r}" for f in files
             for line, name in transport_names_in(f.read_text(), names)]
    assert not found, ("transport names outside srpo_ray/weights/ (ask the transport's class instead: "
                       "srpo_ray/weights/transport.py):\n" + "\n".join(found))


def test_the_check_finds_comparisons_choices_and_keys_but_not_text_or_backends():
    names = {"nccl", "shared_memory"}
    flagged = '''
if name in ("shared_memory", "x"):
    pass
ok = transport != "nccl"
m = {"nccl": "nccl"}
'''
    assert sorted(line for line, _ in transport_names_in(flagged, names)) == [2, 4, 5, 5]
    allowed = '''
"""Docstring naming shared_memory and nccl."""
# a comment: if name == "nccl"
x = f"rollout.weight_transport=shared_memory {y}"
if backend == "nccl":
    pass
backend = "nccl" if gpus else "gloo"
need(cfg.learner.backend in ("auto", "nccl", "gloo"))
'''
    assert list(transport_names_in(allowed, names)) == []


# ----------------------------------------------------------------------------- one file, one line

class CarrierPigeon(WeightTransport):
    """A transport as a new file would define it: traits on the class, nothing elsewhere."""

    name = "carrier_pigeon"
    takes_full_state_on_cpu = True
    every_rank_sends = True
    vllm_weight_transfer_backend = "pigeon"

    def publish(self, source):
        state = source.state_dict()
        return None if state is None else PublishedWeights(self.name, [], detail=sorted(state))


@pytest.fixture
def pigeon():
    register("carrier_pigeon", __name__, "CarrierPigeon")  # the one registry line
    try:
        yield
    finally:
        transport_module._REGISTRY.pop("carrier_pigeon")


def test_a_new_transport_is_one_class_and_one_registry_line(pigeon):
    import torch

    from srpo_ray.weights.endpoints import WeightSender
    from srpo_ray.weights.transport import SenderSettings

    assert "carrier_pigeon" in config_names() and transport_class("carrier_pigeon") is CarrierPigeon
    assert resolve_transport("carrier_pigeon", 0, 0, False) == "carrier_pigeon"  # rollout.weight_transport
    assert vllm_weight_transfer("carrier_pigeon") == "pigeon"  # the generators' engine option
    assert with_every_rank(PublishedWeights("carrier_pigeon", []), ["r0", "r1"]).sources == ["r0", "r1"]

    class CpuModel:  # what a CPU learner rank offers (srpo_ray/learner/core.py)
        device = torch.device("cpu")

        def full_state_dict(self):
            return {"w": torch.zeros(2)}

        def weight_source(self, dtype, send_tied=True):
            raise AssertionError("a transport that takes the full state on the CPU gets it")
    sender = WeightSender("carrier_pigeon", SenderSettings(ops=None))
    assert sender.publish_model(CpuModel(), torch.float32).detail == ["w"]
