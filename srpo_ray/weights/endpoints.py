"""Each actor's one weight endpoint, each way (pure: Ray comes in as `ops`).

`WeightSender` lives in the actor that owns the weights (learner ranks, a WeightSource):
it keeps one instance of each transport it used (files, buffers, groups live there) and
answers `publish` and the fleet's named calls. `WeightReceiver` lives in a generation
worker: it keeps one instance of each transport and runs their generation side.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from srpo_ray.weights.transport import (PublishedWeights, Receiver, SenderSettings, WeightTransport,
                                        transport_class)

if TYPE_CHECKING:
    from srpo_ray.weights.source import WeightSource


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
