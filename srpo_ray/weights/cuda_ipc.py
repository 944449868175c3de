"""The cuda_ipc weight transport: vLLM's own CUDA IPC weight transfer, for generators
colocated with the learner (cluster.colocate: generator j shares learner rank
j % num_ranks's GPU), tensor_parallel_size 1. Never run on a GPU here: written against
vLLM 0.33's source (cluster/GPU.md).

What vLLM provides and we use (vllm/distributed/weight_transfer/ipc_engine.py and
packed_tensor.py, vLLM 0.33): the engine is created with weight_transfer_config=
{"backend": "ipc"} (srpo_ray/generation/engines.py); `init_weight_transfer_engine({"init_info":
{"packed": True}})`; then per update `start_weight_update`, one `update_weights` per
chunk with {names, dtype_names, shapes, tensor_sizes, ipc_handles}, `finish_weight_update`.
In packed mode the receiver (packed_ipc_consumer) rebuilds the producer's buffer from
`ipc_handles[<its GPU's UUID>]` (rebuild_cuda_tensor, device index replaced by its own),
splits it by `tensor_sizes` (back to back, no padding), clones every tensor and loads it
(layerwise reload). Its importer keeps one mapping per export and releases it at
finish, so, as vLLM's own producer (packed_ipc_producer) does, each learner rank exports
ONE buffer once per update (reduce_tensor) and fills it chunk after chunk, each chunk
once the generators have copied the last one out. Peak extra GPU memory per learner
rank: that one buffer (the largest chunk) plus the parameter being gathered.

Every learner rank serves the generators on its own GPU, and all ranks gather together
(FSDP collectives): the fleet calls `fill` on every rank for each chunk, merges the
handles of all ranks ({GPU UUID: handle}) and sends the merged dict to every generator,
which picks its GPU's. A generator that dies costs nothing to the others (no group).
A generator on no learner rank's GPU (added later, or a replacement placed elsewhere)
loads an object-store copy gathered on demand from the live model instead, as late
joiners do (common.LiveCopy).
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Iterator

from srpo_ray.weights.common import GatheredCatchUp, LiveCopy, check_slot, to_every_rank
from srpo_ray.weights.layout import BucketMeta, as_bytes, distinct_slots, plan_stream
from srpo_ray.weights.transport import PublishedWeights, WeightTransport, outcomes

if TYPE_CHECKING:
    import torch

    from srpo_ray.weights.source import WeightSource
    from srpo_ray.weights.transport import Receiver


def chunk_update_info(meta: BucketMeta, handles: dict[str, tuple]) -> dict:
    """IPCWeightTransferUpdateInfo (packed) as a dict, for one chunk."""
    slots = distinct_slots(meta)
    return {"names": [s.name for s in slots], "dtype_names": [s.dtype for s in slots],
            "shapes": [list(s.shape) for s in slots], "tensor_sizes": [s.nbytes for s in slots],
            "ipc_handles": handles}


def gpu_uuid() -> str:
    """The UUID of this process's GPU, as vLLM's IPC consumer looks it up (str of
    torch.cuda.get_device_properties(i).uuid)."""
    import torch

    return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)


def check_back_to_back(buckets: list[BucketMeta]) -> None:
    """vLLM's consumer splits a chunk by tensor sizes alone: no padding may lie between."""
    for meta in buckets:
        end = 0
        for slot in distinct_slots(meta):
            if slot.offset != end:
                raise ValueError(f"{slot.name} at byte {slot.offset} of its chunk, expected {end}: plan "
                                 "cuda_ipc chunks with rule vllm_packed")
            end += slot.nbytes


class CudaIpcTransport(WeightTransport):
    name = "cuda_ipc"
    sends_tied_weights = False  # vLLM re-ties lm_head itself
    every_rank_sends = True  # each rank fills the chunks of the generators on its GPU
    vllm_weight_transfer_backend = "ipc"

    def __init__(self, ops, settings=None):
        super().__init__(ops, settings)
        self._source: "WeightSource | None" = None
        self._buckets: list[BucketMeta] = []
        self._tensors: Iterator[tuple[str, "torch.Tensor"]] | None = None
        self._buffer: "torch.Tensor | None" = None
        self._handle: dict[str, tuple] | None = None
        self._live = LiveCopy()  # a late joiner's copy, gathered when one asks
        self._publishes = itertools.count(1)
        self._publish_id = 0
        self._next_chunk = 0
        self._fleet_copy = GatheredCatchUp(ops, self.name)
        self._joined = False

    # ------------------------------------------------------------------ learner side (every rank)
    def publish(self, source: "WeightSource") -> PublishedWeights | None:
        self._source, self._tensors = source, None
        self._buckets = plan_stream(source.specs, self.settings.bucket_bytes, rule="vllm_packed")
        check_back_to_back(self._buckets)
        self._publish_id, self._next_chunk, self._handle = next(self._publishes), 0, None
        self._live.drop()
        if self.settings.rank != 0:
            return None
        return PublishedWeights(self.name, self._buckets, source=self.ops.current_actor(),
                                timeout_s=self.settings.timeout_s, publish_id=self._publish_id)

    def serve_fill(self, publish_id: int, index: int) -> dict[str, tuple]:
        """Gather chunk `index`'s tensors (every rank, in order), copy them into this
        rank's IPC buffer; {this GPU's UUID: rebuild args}. Chunks come in order, each
        after the generators have loaded the one before."""
        import torch
        from torch.multiprocessing.reductions import reduce_tensor

        if publish_id != self._publish_id or index != self._next_chunk:
            raise RuntimeError(f"cuda_ipc fill {publish_id}/{index} asked, expected {self._publish_id}/"
                               f"{self._next_chunk}")
        if self._tensors is None:
            self._tensors = iter(self._source.tensors())
        size = max(b.nbytes for b in self._buckets)
        if self._buffer is None or self._buffer.numel() < size:
            self._buffer, self._handle = torch.empty(size, dtype=torch.uint8, device="cuda"), None
        if self._handle is None:  # one export per update: vLLM's importer releases it once, at finish
            _, args = reduce_tensor(self._buffer)
            self._handle = {gpu_uuid(): args}
        meta = self._buckets[index]
        for slot in distinct_slots(meta):
            name, tensor = next(self._tensors)
            check_slot(name, tensor, slot)
            self._buffer[slot.offset:slot.offset + slot.nbytes].copy_(as_bytes(tensor))
        torch.cuda.current_stream().synchronize()  # the generators read it from another process
        self._next_chunk += 1
        if self._next_chunk == len(self._buckets):
            self._tensors = None
        return self._handle

    def serve_gpu(self) -> str:
        """This rank's GPU UUID (what its IPC handles are keyed by)."""
        return gpu_uuid()

    def serve_done(self) -> None:
        """After the update: the generators released their mappings (finish). The buffer
        goes back to the driver, not just to PyTorch's cache: the engine on this GPU wakes
        its KV cache next, and a cached block here is memory it cannot have."""
        import torch

        self._buffer, self._handle, self._tensors = None, None, None
        torch.cuda.ipc_collect()  # drops the exported block once no importer holds it
        torch.cuda.empty_cache()

    def serve_catch_up(self, publish_id: int) -> PublishedWeights | None:
        """Every rank: the published version gathered from the live model into the object
        store (rank 0's record), for a generator on no learner rank's GPU or a late joiner."""
        if publish_id != self._publish_id:
            from srpo_ray.weights.transport import WeightsSupersededError

            raise WeightsSupersededError(f"catch-up of publish {publish_id} asked, {self._publish_id} is the last one")
        record = PublishedWeights(self.name, self._buckets, source=self.ops.current_actor(),
                                  timeout_s=self.settings.timeout_s, publish_id=self._publish_id)
        return self._live.get(self.ops, self.settings.rank, self._source, record)

    def close(self) -> None:
        self._buffer, self._handle, self._tensors = None, None, None

    # ------------------------------------------------------------------ generation side
    def receive_gpu(self, receiver: "Receiver") -> str:
        return gpu_uuid()

    def receive_start(self, receiver: "Receiver", names: list[str]) -> None:
        if not self._joined:
            receiver.engine_call("init_weight_transfer", {"packed": True})
            self._joined = True
        receiver.engine_call("start_weight_update", names)  # refuses a mismatch before any byte
        receiver.set_version(-1)

    def receive_chunk(self, receiver: "Receiver", update: dict) -> None:
        receiver.engine_call("update_weights", update)

    def receive_finish(self, receiver: "Receiver", version: int) -> int:
        receiver.engine_call("finish_weight_update")
        return receiver.set_version(version)

    # ------------------------------------------------------------------ fleet side
    def deliver(self, published: PublishedWeights, members: list[Any], version: int) -> list[Any]:
        """Members on a learner rank's GPU read the chunks in place; any other (added
        later, or a replacement placed elsewhere) loads an on-demand copy afterwards."""
        if not members:
            return []
        ranks = published.sources or [published.source]
        names = [s.name for b in published.buckets for s in distinct_slots(b)]
        learner_gpus = set(self.ops.get([r.weights_call.remote(self.name, "gpu") for r in ranks]))
        gpus = outcomes(self.ops, [m.handle.weights_call.remote(self.name, "gpu") for m in members])
        away = [i for i, g in enumerate(gpus) if not isinstance(g, BaseException) and g not in learner_gpus]
        results: list[Any] = outcomes(self.ops, [
            m.handle.weights_call.remote(self.name, "start", names) if i not in away else self.ops.put(None)
            for i, m in enumerate(members)])
        for i, g in enumerate(gpus):
            if isinstance(g, BaseException):
                results[i] = g
        for index, meta in enumerate(published.buckets):
            handles: dict[str, tuple] = {}
            for h in self.ops.get(to_every_rank(
                    lambda r: r.weights_call.remote(self.name, "fill", published.publish_id, index), ranks)):
                handles.update(h)
            live = [i for i, r in enumerate(results) if not isinstance(r, BaseException) and i not in away]
            update = chunk_update_info(meta, handles)
            loaded = outcomes(self.ops, [members[i].handle.weights_call.remote(self.name, "chunk", update)
                                         for i in live])
            for i, out in zip(live, loaded):
                if isinstance(out, BaseException):
                    results[i] = out
        live = [i for i, r in enumerate(results) if not isinstance(r, BaseException) and i not in away]
        finished = outcomes(self.ops, [members[i].handle.weights_call.remote(self.name, "finish", version)
                                       for i in live])
        for i, out in zip(live, finished):
            results[i] = out
        self.ops.get([r.weights_call.remote(self.name, "done") for r in ranks])
        caught_up = outcomes(self.ops, [self.catch_up(published, members[i].handle, version) for i in away])
        for i, out in zip(away, caught_up):
            results[i] = out
        if self.prepare_catch_up:  # queued on every rank ahead of the learner's next step
            self._fleet_copy.prepare(published)
        return results

    def catch_up(self, published: PublishedWeights, handle: Any, version: int) -> Any:
        """A generator on no learner rank's GPU, a late joiner: a copy gathered on demand."""
        return self._fleet_copy.load(published, handle, version)
