"""Published weights read back in the test process through the transport's own
generation side (what a generation worker runs), for tests that check what a learner
publishes: the real publish path, not a side door into the learner's state."""
from __future__ import annotations

from typing import Any, Iterator

import torch


class CapturingReceiver:
    """A generation worker stand-in that keeps a copy of every tensor it is fed."""

    worker_index = -1

    def __init__(self):
        self.state: dict[str, torch.Tensor] = {}

    def load_stream(self, names: list[str], weights: Iterator[tuple[str, torch.Tensor]], version: int) -> int:
        for name, tensor in weights:  # views of transport buffers: copy them out
            self.state[name] = tensor.clone()
        return version

    def engine_call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the capturing receiver has no vLLM weight-transfer engine")

    def set_version(self, version: int) -> int:
        return version


def read_published(published: Any) -> dict[str, torch.Tensor]:
    """Every tensor of `published` (a PublishedWeights record), HF names, on the CPU."""
    from actors.ray_ops import RayOps
    from srpo_ray.weights.transport import transport_class

    receiver = CapturingReceiver()
    transport = transport_class(published.transport)(RayOps())
    try:
        transport.receive("load", receiver, published, 0)
    finally:
        transport.close()
    return receiver.state


def learner_weights(group: Any) -> dict[str, torch.Tensor]:
    """A LearnerGroup's weights, published through the object store (every rank joins
    the gather) and read back."""
    return read_published(group.publish_weights("object_store"))


def load_into(worker: Any, state: dict[str, torch.Tensor], version: int, transport: str = "object_store",
              bucket_bytes: int = 1 << 20) -> int:
    """Publish `state` from a WeightSource actor over `transport` and have generation
    worker `worker` load it as `version` through the transport's fleet side (`catch_up`,
    what a late joiner gets); the version the worker then holds."""
    import ray

    from actors.learner import WeightSourceActor
    from actors.ray_ops import RayOps
    from srpo_ray.weights.transport import transport_class

    source = WeightSourceActor.options(num_cpus=0.1).remote(transport, bucket_bytes)
    try:
        published = ray.get(source.publish.remote(state))
        return ray.get(transport_class(published.transport)(RayOps()).catch_up(published, worker, version))
    finally:
        ray.kill(source)
