"""The nccl weight transport: vLLM's own NCCL weight transfer, for learner and
generators on whole GPUs of their own (never run on a GPU here: written against vLLM
0.33's source, see cluster/GPU.md).

What vLLM provides and we use (vllm/distributed/weight_transfer/, vLLM 0.33):
- generation side: the engine is created with weight_transfer_config={"backend": "nccl"}
  (srpo_ray/generation/engines.py); `LLM.init_weight_transfer_engine({"init_info": ...})` makes every
  tensor-parallel worker join a NCCL group with the learner (nccl_common.py
  worker_init_process_group: rank = rank_offset + TP rank); `start_weight_update`,
  `update_weights({"update_info": {names, dtype_names, shapes}})`, `finish_weight_update`
  receive packed buckets (packed_tensor.py packed_nccl_broadcast_consumer) and load each
  through the model's own `load_weights` inside vLLM's layerwise reload, so each TP worker
  keeps just its shard of every tensor it receives (nccl_engine.py NCCLWeightTransferEngine).
- learner side: the group's rank 0 is vllm nccl_common.trainer_init (a StatelessProcessGroup
  TCPStore rendezvous plus a PyNcclCommunicator on this GPU). The bytes are ours: we
  stream (gather one parameter, cast it to the engine dtype, copy it into one of two
  reused GPU buckets, broadcast a full bucket while the next fills), with the buckets cut
  exactly as vLLM's consumer cuts them (layout.plan_stream rule "vllm_packed"). vLLM's own
  trainer engine (NCCLTrainerWeightTransferEngine) would drive the generators itself and
  torch.cat a fresh buffer per chunk; here the fleet drives them and two buffers are reused.

Every learner rank takes part in a send: the gathers are FSDP collectives, so the fleet
calls `send` on all ranks and rank 0 alone broadcasts.

A dead receiver (defect of plain NCCL: `wait()` only orders the stream, so rank 0 would
hang until a watchdog kills it): rank 0 polls each bucket's completion with a deadline,
and the fleet can abort it through a key in rank 0's control TCPStore as soon as Ray
reports a receiver dead. Rank 0 then aborts the communicator (ncclCommAbort), keeps
iterating the gathers so the other learner ranks are not left in a collective, and
raises. The receivers still alive are stuck inside NCCL for good: the fleet replaces
them (WeightDeliveryError) and sends again to a new group. A late joiner or a
replacement loads an object-store copy of the last version, gathered from the live model
when one asks (common.LiveCopy): no copy is kept per send.
"""
from __future__ import annotations

import itertools
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from srpo_ray.weights.common import (
    GatheredCatchUp,
    LiveCopy,
    ServedStore,
    StoreConnection,
    check_slot,
    free_port,
    to_every_rank,
)
from srpo_ray.weights.layout import BucketMeta, as_bytes, distinct_slots, plan_stream, streaming_peak_bytes
from srpo_ray.weights.transport import PublishedWeights, WeightDeliveryError, WeightTransport, outcomes

if TYPE_CHECKING:
    import torch

    from srpo_ray.weights.source import WeightSource
    from srpo_ray.weights.transport import Receiver

BUFFERS = 2  # one bucket being sent while the next fills
POLL_S = 0.001
# Rank 0 waits on one bucket at most this share of learner.collective_timeout_s: meanwhile
# the other ranks sit in the next FSDP all-gather under NCCL's watchdog (the same timeout),
# and after giving up rank 0 must still join that gather before the watchdog fires.
STALL_FRACTION = 0.25
# Forming a group (every engine's TP workers and rank 0 meet) gets the same share: a
# worker that never joins must not leave the others (and rank 0) waiting for good.
JOIN_FRACTION = 0.25


def stall_limit_s(collective_timeout_s: float) -> float:
    """How long rank 0 waits on one bucket's broadcast before it gives up the send."""
    return collective_timeout_s * STALL_FRACTION


def join_limit_s(collective_timeout_s: float) -> float:
    """How long forming a weight group may take before the half-formed group is dropped."""
    return collective_timeout_s * JOIN_FRACTION


class TransferAborted(RuntimeError):
    """The learner's send stopped: a receiver died (the fleet said so) or its deadline passed."""


def wait_until(done: Callable[[], bool], deadline: float, aborted: Callable[[], bool], what: str,
               poll_s: float = POLL_S, clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> None:
    """Poll `done()` until it is true; raise TransferAborted when `aborted()` turns true
    or `deadline` (on `clock`) passes first. A CUDA event's query() is the `done` of a
    broadcast: unlike `wait()`, it never blocks the host on a peer that is gone."""
    while not done():
        if aborted():
            raise TransferAborted(f"{what}: aborted (a receiver is gone)")
        if clock() > deadline:
            raise TransferAborted(f"{what}: not complete by its deadline ({STALL_FRACTION:g} of "
                                  "learner.collective_timeout_s)")
        sleep(poll_s)


def open_with_deadline(open_group: Callable[[], Any], limit_s: float, what: str) -> Any:
    """`open_group()` (rank 0's side of a rendezvous: it waits in NCCL's init until every
    rank has joined) in a thread, given up after `limit_s`: the actor answers instead of
    hanging. A group that forms after all is aborted at once (the fleet has moved on)."""
    box: dict[str, Any] = {}
    lock = threading.Lock()

    def run() -> None:
        try:
            comm = open_group()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            comm, box["error"] = None, e
        with lock:
            if box.get("abandoned") and comm is not None:
                comm.destroy()  # the half-formed group, completed too late: nobody uses it
            box["comm"] = comm

    thread = threading.Thread(target=run, name="nccl-weight-group-open", daemon=True)
    thread.start()
    thread.join(limit_s)
    with lock:
        if "comm" not in box:
            box["abandoned"] = True
            raise TimeoutError(f"{what}: not every rank joined within {limit_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["comm"]


@dataclass(frozen=True)
class NcclDetail:
    """What the fleet needs besides the layout: rank 0's control store (host, port),
    the tensor-parallel size of each engine (its workers are that many group ranks),
    and the bucket size both sides cut the stream with."""

    control: tuple[str, int]
    tensor_parallel_size: int
    bucket_bytes: int


def worker_init_info(endpoint: tuple[str, int], rank_offset: int, world_size: int, bucket_bytes: int) -> dict:
    """The init_info of vLLM 0.33's NCCLWeightTransferInitInfo (nccl_common.py): rendezvous
    at rank 0's endpoint, this engine's first group rank, and the packed wire params,
    which must equal the sender's (the receiver cuts chunks with them)."""
    return {"master_address": endpoint[0], "master_port": int(endpoint[1]), "rank_offset": int(rank_offset),
            "world_size": int(world_size), "packed": True, "packed_buffer_size_bytes": int(bucket_bytes),
            "packed_num_buffers": BUFFERS}


def update_info(buckets: list[BucketMeta]) -> dict:
    """NCCLWeightTransferUpdateInfo as a dict: every sent tensor, in sending order."""
    slots = [s for b in buckets for s in distinct_slots(b)]
    return {"names": [s.name for s in slots], "dtype_names": [s.dtype for s in slots],
            "shapes": [list(s.shape) for s in slots]}


class NcclTransport(WeightTransport):
    name = "nccl"
    sends_tied_weights = False  # vLLM re-ties lm_head itself
    every_rank_sends = True  # a send streams the gathers, a collective of every rank
    vllm_weight_transfer_backend = "nccl"

    def __init__(self, ops, settings=None):
        super().__init__(ops, settings)
        # learner side
        self._source: "WeightSource | None" = None
        self._buckets: list[BucketMeta] = []
        self._comm: Any = None  # vLLM PyNcclCommunicator, rank 0 only
        self._buffers: list["torch.Tensor"] = []
        self._streams: list[Any] = []
        self._live = LiveCopy()  # a late joiner's copy, gathered when one asks (never kept per send)
        self._control = ServedStore(ops, self.settings.timeout_s)  # rank 0's TCPStore for abort keys
        self._publishes = itertools.count(1)
        self._publish_id = 0
        # generation side
        self._joined = False
        # fleet side
        self._prefix = uuid.uuid4().hex[:8]
        self._group_key: tuple = ()
        self._fleet_control = StoreConnection()
        self._fleet_copy = GatheredCatchUp(ops, self.name)

    # ------------------------------------------------------------------ learner side
    def publish(self, source: "WeightSource") -> PublishedWeights | None:
        """Declare the next version (nothing moves until the fleet's `send`)."""
        self._source = source
        self._buckets = plan_stream(source.specs, self.settings.bucket_bytes, rule="vllm_packed")
        self._publish_id = next(self._publishes)
        self._live.drop()
        if self.settings.rank != 0:
            return None
        detail = NcclDetail(self._control.serve(), self.settings.tensor_parallel_size, self.settings.bucket_bytes)
        return PublishedWeights(self.name, self._buckets, source=self.ops.current_actor(),
                                timeout_s=self.settings.timeout_s, detail=detail, publish_id=self._publish_id)

    def serve_endpoint(self) -> tuple[str, int]:
        """A fresh rendezvous endpoint (this node, a free port) for the next group."""
        return self.ops.node_ip(), free_port()

    def serve_open(self, endpoint: tuple[str, int], world_size: int) -> None:
        """Be rank 0 of a new group (world_size = 1 + every receiving TP worker); the
        engines join at the same time (`receive_join`), else this waits for them."""
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        self._close_comm()
        import torch

        info = {"master_address": endpoint[0], "master_port": int(endpoint[1]), "world_size": int(world_size)}
        device = torch.cuda.current_device()  # per thread: trainer_init reads it in the opening thread

        def open_group() -> Any:
            torch.cuda.set_device(device)
            return trainer_init(info)

        self._comm = open_with_deadline(open_group, join_limit_s(self.settings.timeout_s),
                                        f"NCCL weight group at {endpoint[0]}:{endpoint[1]} ({world_size} ranks)")

    def serve_send(self, publish_id: int, key: str) -> int:
        """Stream the published version: every rank iterates (gathers); rank 0 fills the
        buckets and broadcasts them. `key`: the abort key the fleet may set. Returns bytes sent."""
        if publish_id != self._publish_id or self._source is None:
            raise RuntimeError(f"weight send {publish_id} asked, publish {self._publish_id} is the last one here")
        if self.settings.rank != 0:
            for _ in self._source.tensors():
                pass  # join the gathers
            return 0
        if self._comm is None:
            for _ in self._source.tensors():
                pass  # the other ranks are gathering: keep them company, then fail
            raise RuntimeError("no NCCL weight group open here: the fleet opens one before sending")
        try:
            return self._stream(publish_id, key)
        finally:
            self._buffers = []  # back to the allocator: 2 buckets (GBs at 32B) are not kept between updates

    def _stream(self, publish_id: int, key: str) -> int:
        import torch

        stall_s = stall_limit_s(self.settings.timeout_s)
        aborted = (lambda: self._control.store.check([key])) if key else (lambda: False)
        peak = streaming_peak_bytes(self._buckets, BUFFERS) // BUFFERS
        if not self._buffers or self._buffers[0].numel() < peak:
            self._buffers = [torch.empty(peak, dtype=torch.uint8, device="cuda") for _ in range(BUFFERS)]
        if not self._streams:  # cached: the allocator keys blocks by stream (vLLM gh-52950)
            self._streams = [torch.cuda.Stream() for _ in range(BUFFERS)]
        streams = self._streams
        events: list[Any] = [None] * BUFFERS
        owners = [(i, s, j == 0, j == len(d) - 1) for i, m in enumerate(self._buckets)
                  for d in [distinct_slots(m)] for j, s in enumerate(d)]
        failure: TransferAborted | None = None
        for (index, slot, first, last), (name, tensor) in zip(owners, self._source.tensors()):
            if failure is not None:
                continue  # keep joining the gathers: the other ranks must not hang in one
            check_slot(name, tensor, slot)
            k = index % BUFFERS
            try:
                if first and events[k] is not None:  # the buffer's previous bucket must be out
                    wait_until(events[k].query, time.monotonic() + stall_s, aborted,
                               f"weight bucket {index - BUFFERS}")
                self._buffers[k][slot.offset:slot.offset + slot.nbytes].copy_(as_bytes(tensor))
                if last:
                    events[k] = self._send_bucket(index, streams[k])
            except TransferAborted as e:
                failure = e
                self._close_comm()  # ncclCommAbort: the group is broken for everyone
        if failure is None:
            try:
                for event in events:
                    if event is not None:
                        wait_until(event.query, time.monotonic() + stall_s, aborted, "the last weight buckets")
            except TransferAborted as e:
                failure = e
                self._close_comm()
        if failure is not None:
            raise failure
        return sum(b.nbytes for b in self._buckets)

    def _send_bucket(self, index: int, stream: "torch.cuda.Stream") -> Any:
        import torch

        meta = self._buckets[index]
        flat = self._buffers[index % BUFFERS][:meta.nbytes]
        stream.wait_stream(torch.cuda.current_stream())  # the bucket was filled there
        flat.record_stream(stream)  # freed after the send: not reused while the broadcast may still read it
        with torch.cuda.stream(stream):
            self._comm.broadcast(flat, src=0, stream=stream)
            event = torch.cuda.Event()
            event.record(stream)
        return event

    def serve_catch_up(self, publish_id: int) -> PublishedWeights | None:
        """Every rank: the published version gathered from the live model into the object
        store (rank 0's record; None elsewhere), kept until the next publish. Built when
        a late joiner or replacement asks, not on every send: most updates have none, and
        a pinned host copy was the model's size (65 GB at 32B) on rank 0's node."""
        if publish_id != self._publish_id:
            from srpo_ray.weights.transport import WeightsSupersededError

            raise WeightsSupersededError(f"catch-up of publish {publish_id} asked, {self._publish_id} is the last one")
        record = PublishedWeights(self.name, self._buckets, source=self.ops.current_actor(),
                                  timeout_s=self.settings.timeout_s, publish_id=self._publish_id)
        return self._live.get(self.ops, self.settings.rank, self._source, record)

    def _close_comm(self) -> None:
        if self._comm is not None:
            self._comm.destroy()  # vLLM PyNcclCommunicator.destroy: ncclCommAbort, in a thread
            self._comm = None

    def close(self) -> None:
        self._close_comm()
        self._buffers = []

    # ------------------------------------------------------------------ generation side
    def receive_join(self, receiver: "Receiver", init_info: dict) -> None:
        """Every TP worker of this engine joins the group (blocks until rank 0 opens it)."""
        if self._joined:
            receiver.engine_call("shutdown_weight_transfer")  # leave the previous group
        self._joined = False
        receiver.engine_call("init_weight_transfer", init_info)
        self._joined = True

    def load(self, published: PublishedWeights, version: int, receiver: "Receiver", *extra: Any) -> int:
        info = update_info(published.buckets)
        receiver.engine_call("start_weight_update", info["names"])  # refuses a mismatch before any byte
        receiver.set_version(-1)  # from here a failure leaves no valid version
        receiver.engine_call("update_weights", info)
        receiver.engine_call("finish_weight_update")
        return receiver.set_version(version)

    # ------------------------------------------------------------------ fleet side
    def deliver(self, published: PublishedWeights, members: list[Any], version: int) -> list[Any]:
        if not members:
            return []
        detail: NcclDetail = published.detail
        key = (published.source, tuple(members))  # Members compare by identity
        if key != self._group_key:
            joined = self._form_group(published, members)
            if joined is not None:
                return joined
            self._group_key = key
        abort_key = f"abort/{uuid.uuid4().hex}"
        sends = to_every_rank(lambda h: h.weights_call.remote(self.name, "send", published.publish_id, abort_key),
                              published.sources or [published.source])
        loads = [m.handle.weights_call.remote(self.name, "load", published, version) for m in members]
        results = self._collect(loads, sends, detail, abort_key, published.timeout_s)
        if any(isinstance(r, BaseException) for r in results):
            self._group_key = ()  # the group is broken for everyone: form a new one next time
        if self.prepare_catch_up:  # queued on every rank ahead of the learner's next step
            self._fleet_copy.prepare(published)
        return results

    def _form_group(self, published: PublishedWeights, members: list[Any]) -> list[Any] | None:
        """Open a group of rank 0 + every member's TP workers; None once formed, else
        each member's outcome (a failed join)."""
        detail: NcclDetail = published.detail
        endpoint = self.ops.get(published.source.weights_call.remote(self.name, "endpoint"))
        tp = detail.tensor_parallel_size
        world = 1 + tp * len(members)
        joins = [m.handle.weights_call.remote(self.name, "join",
                                              worker_init_info(endpoint, 1 + tp * i, world, detail.bucket_bytes))
                 for i, m in enumerate(members)]
        opened = published.source.weights_call.remote(self.name, "open", endpoint, world)
        limit_s = join_limit_s(published.timeout_s)
        # rank 0 gives up on its own after limit_s; the fleet waits a little longer for its answer
        ready, _ = self.ops.wait(joins + [opened], num_returns=len(joins) + 1, timeout=limit_s + 30)
        joined = [outcomes(self.ops, [ref])[0] if ref in ready else None for ref in joins]
        failed = [i for i, out in enumerate(joined) if isinstance(out, BaseException)]
        open_error = outcomes(self.ops, [opened])[0] if opened in ready else TimeoutError("no answer")
        if not failed and not isinstance(open_error, BaseException) and all(ref in ready for ref in joins):
            return None
        self._group_key = ()
        stuck = WeightDeliveryError(f"its NCCL weight group did not form within {limit_s:g} s: "
                                    f"{_culprits(members, joins, joined, ready, open_error)}")
        # the members that joined (or are still joining) sit in a half-formed group: replaced
        return [joined[i] if i in failed else stuck for i in range(len(members))]

    def _collect(self, loads: list[Any], sends: list[Any], detail: NcclDetail, abort_key: str,
                 timeout_s: float) -> list[Any]:
        """Each member's outcome. A member that dies makes the fleet abort rank 0's send
        at once; members still waiting after the send stopped are stuck in NCCL."""
        results: dict[int, Any] = {}
        pending = {ref: i for i, ref in enumerate(loads)}
        deadline = time.monotonic() + timeout_s
        aborted = False
        while pending and time.monotonic() < deadline:
            ready, _ = self.ops.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                i = pending.pop(ref)
                results[i] = outcomes(self.ops, [ref])[0]
                if isinstance(results[i], BaseException) and not aborted:
                    self._fleet_control.to(detail.control, timeout_s).set(abort_key, "1")
                    aborted = True
            if aborted and all(self.ops.wait([s], num_returns=1, timeout=0)[0] for s in sends):
                break  # the learner stopped sending: the others will not finish
        if pending:  # loads that finished while we were looking elsewhere
            done, _ = self.ops.wait(list(pending), num_returns=len(pending), timeout=0)
            for ref in done:
                results[pending.pop(ref)] = outcomes(self.ops, [ref])[0]
        send_errors = [e for e in outcomes(self.ops, sends) if isinstance(e, BaseException)]
        for ref, i in pending.items():
            cause = send_errors[0] if send_errors else "the transfer did not complete in time"
            results[i] = WeightDeliveryError(f"stuck in an aborted NCCL weight transfer ({cause})")
        if send_errors and all(not isinstance(r, BaseException) for r in results.values()):
            raise send_errors[0]  # the learner failed on its own
        return [results[i] for i in range(len(loads))]

    def catch_up(self, published: PublishedWeights, handle: Any, version: int) -> Any:
        """A late joiner or replacement: an object-store copy gathered on demand."""
        return self._fleet_copy.load(published, handle, version)


def _culprits(members: list[Any], joins: list[Any], joined: list[Any], ready: list[Any], open_error: Any) -> str:
    """Who kept a weight group from forming: the workers whose join failed, else those
    that never answered, else rank 0's open."""
    def name(i: int) -> str:
        return f"generation worker {getattr(members[i], 'index', i)}"

    failed = [f"{name(i)} failed ({type(out).__name__}: {(str(out).strip().splitlines() or [''])[-1][:200]})"
              for i, out in enumerate(joined) if isinstance(out, BaseException)]
    silent = [f"{name(i)} did not join" for i, ref in enumerate(joins) if ref not in ready]
    return "; ".join(failed or silent) or f"rank 0 could not open it ({open_error})"
