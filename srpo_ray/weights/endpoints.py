"""Each actor's one weight endpoint, each way (pure: Ray comes in as `ops`).

`WeightSender` lives in the actor that owns the weights (learner ranks, a WeightSource):
it keeps one instance of each transport it used (files, buffers, groups live there) and
answers `publish` (`publish_model` for a learner: what to publish from, a full state dict
or a parameter stream, follows the transport's traits) and the fleet's named calls.
`WeightReceiver` lives in a generation worker: it keeps one instance of each transport
and runs their generation side.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from srpo_ray.weights.source import StateDictSource
from srpo_ray.weights.transport import PublishedWeights, Receiver, SenderSettings, WeightTransport, transport_class

if TYPE_CHECKING:
    import torch

    from srpo_ray.weights.source import WeightSource


class ModelWeights(Protocol):
    """What a learner rank offers to publish from (srpo_ray/learner/core.py FSDPLearner)."""

    device: "torch.device"

    def full_state_dict(self) -> "dict[str, torch.Tensor] | None":
        """The whole state on the CPU on rank 0 (None elsewhere); every rank joins the gather."""

    def weight_source(self, dtype: "torch.dtype", send_tied: bool = True) -> "WeightSource":
        """The parameters streamed one at a time, cast to `dtype`."""


class WeightSender:
    """transport: the resolved name publish uses unless told otherwise."""

    def __init__(self, transport: str, settings: SenderSettings):
        transport_class(transport)  # refuses an unknown name now, not at the first publish
        self.transport, self.settings = transport, settings
        self._transports: dict[str, WeightTransport] = {}

    def get(self, name: str) -> WeightTransport:
        if name not in self._transports:
            self._transports[name] = transport_class(name)(self.settings.ops, self.settings)
        return self._transports[name]

    def publish(self, source: "WeightSource", transport: str | None = None) -> PublishedWeights | None:
        """Every rank calls it (sources may gather); rank 0's record goes to the fleet."""
        return self.get(transport or self.transport).publish(source)

    def publish_model(self, model: ModelWeights, dtype: "torch.dtype",
                      transport: str | None = None) -> PublishedWeights | None:
        """A learner's weights, every rank calling (the gathers are collective). A CPU
        learner hands a transport that keeps or copies the whole version its full state
        dict (on one rank the plain module's own tensors, as they are); otherwise the
        parameters are streamed, cast to `dtype`, a tied lm_head included only where the
        transport sends it."""
        name = transport or self.transport
        kind = transport_class(name)
        if model.device.type == "cpu" and kind.takes_full_state_on_cpu:
            state = model.full_state_dict()
            return None if state is None else self.publish(StateDictSource(state), name)
        return self.publish(model.weight_source(dtype, send_tied=kind.sends_tied_weights), name)

    def call(self, transport: str, op: str, *args: Any) -> Any:
        return self.get(transport).serve(op, *args)

    def wait(self) -> None:
        """Until no publish still reads the weights (before they change in place)."""
        for t in self._transports.values():
            t.wait()

    def close(self) -> None:
        for t in self._transports.values():
            t.close()


class WeightReceiver:
    def __init__(self, ops: Any):
        self.ops = ops
        self._transports: dict[str, WeightTransport] = {}

    def call(self, receiver: Receiver, transport: str, op: str, *args: Any) -> Any:
        if transport not in self._transports:
            self._transports[transport] = transport_class(transport)(self.ops)
        return self._transports[transport].receive(op, receiver, *args)

    def close(self) -> None:
        for t in self._transports.values():
            t.close()
