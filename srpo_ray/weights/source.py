"""What a transport publishes from: the learner's weights as the generators need them
(HF names, the engine's dtype, tied tensors named twice), declared before any tensor is
gathered (pure torch, no Ray).

`StateDictSource` holds a full state dict already in hand (a one-rank CPU learner's own
parameters, a WeightSource actor's dict, a test's). `ModelSource` streams a (possibly
FSDP2-sharded) model one parameter at a time: cast the local shard to the engine's dtype,
gather it (a collective: every rank iterates the same specs in the same order), hand it
out, drop it.
A transport that streams never holds more than its buckets plus the one parameter in
flight; `state_dict()` materialises everything on the CPU for transports that keep the
whole version (shared memory's background copy, the gloo broadcast's packed buffers).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Protocol

from srpo_ray.weights.layout import TensorSpec, dtype_name, specs_of

if TYPE_CHECKING:
    import torch
    from torch import nn


class WeightSource(Protocol):
    specs: list[TensorSpec]
    """Every tensor the generators get, in sending order; tied ones as aliases."""
    in_hand: bool
    """The tensors exist already (on the CPU): reading them gathers nothing."""

    def tensors(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        """(name, full tensor) of each spec that is not an alias, in order. On a sharded
        learner every rank must iterate it (each step may gather); only rank 0's values
        are meaningful."""

    def state_dict(self) -> dict[str, "torch.Tensor"] | None:
        """The whole state on the CPU, aliases included (rank 0; None elsewhere)."""

    def unchanged(self) -> bool:
        """The tensors still hold what they held when this source was made (no optimizer
        step, no checkpoint load since): a copy read now is the published version."""


def _versions(tensors: Iterable["torch.Tensor"]) -> list[int]:
    """Autograd's in-place counters: every in-place write (an optimizer step on a
    parameter or on FSDP2's sharded DTensor, a load_state_dict copy) bumps them."""
    return [t._version for t in tensors]


class StateDictSource:
    """A full state dict in hand. Floating tensors are cast to `dtype` (None: as they are)."""

    in_hand = True

    def __init__(self, state: Mapping[str, "torch.Tensor"], dtype: "torch.dtype | None" = None):
        if dtype is not None:
            cast: dict = {}
            first: dict[int, "torch.Tensor"] = {}
            for name, t in state.items():  # keep tied tensors one tensor after the cast
                key = id(t)
                if key not in first:
                    first[key] = t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
                cast[name] = first[key]
            state = cast
        self._state = dict(state)
        self.specs = specs_of(self._state)
        self._held = _versions(self._state.values())

    def unchanged(self) -> bool:
        return _versions(self._state.values()) == self._held

    def tensors(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        for spec in self.specs:
            if spec.alias_of is None:
                yield spec.name, self._state[spec.name]

    def state_dict(self) -> dict[str, "torch.Tensor"]:
        return self._state


class ModelSource:
    """A live model's weights, streamed one parameter at a time.

    model: the learner's module (plain or FSDP2: its state dict holds DTensors whose
    `full_tensor()` all-gathers). dtype: the engine's dtype (floating shards are cast
    on the device before the gather, so the gather and the wire carry engine bytes). tied: (input
    embedding name, output embedding name) when they are one tensor: the output name is
    an alias, or left out (`send_tied=False`: vLLM's GPU loaders re-tie it from the
    embedding, as they do for a checkpoint saved by save_pretrained)."""

    in_hand = False

    def __init__(self, model: "nn.Module", dtype: "torch.dtype", rank: int,
                 tied: tuple[str, str] | None = None, send_tied: bool = True):
        import torch

        self.model, self.dtype, self.rank, self.tied = model, dtype, rank, tied
        state = model.state_dict()
        if tied and tied[1] not in state and send_tied:  # FSDP2 may report the shared tensor once
            state[tied[1]] = state[tied[0]]
        self._names = [n for n in state if not (tied and n == tied[1])]
        self.specs = []
        for name in self._names:
            t = state[name]
            wire = dtype if t.is_floating_point() else t.dtype
            self.specs.append(TensorSpec(name, dtype_name(wire), tuple(t.shape)))
        if tied and send_tied:
            emb = next(s for s in self.specs if s.name == tied[0])
            self.specs.append(TensorSpec(tied[1], emb.dtype, emb.shape, alias_of=tied[0]))
        self._torch = torch
        self._params = [state[n] for n in self._names]  # the sharded tensors themselves (DTensors)
        self._held = _versions(self._params)

    def unchanged(self) -> bool:
        return _versions(self._params) == self._held

    def tensors(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        state = self.model.state_dict()
        for name in self._names:
            t = state[name].detach()
            if t.is_floating_point() and t.dtype != self.dtype:
                t = t.to(self.dtype)  # this rank's shard: the gather then moves wire bytes (half of fp32)
            full = t.full_tensor() if hasattr(t, "full_tensor") else t  # collective on DTensors
            del t
            yield name, full
            del full

    def state_dict(self) -> dict[str, "torch.Tensor"] | None:
        """Gathered to the CPU (every rank iterates; rank 0 keeps)."""
        out: dict[str, "torch.Tensor"] = {}
        for name, t in self.tensors():
            if self.rank == 0:
                out[name] = t.cpu()  # a no-op on CPU tensors
        if self.rank != 0:
            return None
        for spec in self.specs:
            if spec.alias_of is not None:
                out[spec.name] = out[spec.alias_of]
        return {s.name: out[s.name] for s in self.specs}
