"""What every weight transport is, which exist, and which one `auto` stands for (pure
rules: no Ray, no vLLM).

A transport moves one weight version from the learner to the generators. Each is one
file of this package and one class with the same three roles, each used in one process:

- `publish(source)`       learner rank 0 (every rank takes part in the gather): makes the
                          version available and returns a `PublishedWeights` record;
- `load(published, version, receiver)`   a generation worker: brings it into its engine;
- `deliver(published, members, version)` the rollout fleet (driver): gets it to every
                          worker, reporting each worker's held version or its error.

What callers outside this package need to know of a transport they ask of its class,
through the functions below (`vllm_weight_transfer`, `with_every_rank`, and
`WeightSender.publish_model` in endpoints.py), never by comparing its name: a new
transport is one file and one `register` line.

Besides those, a transport may answer a few named calls on either side (`serve_<op>` on
the learner, `receive_<op>` on a generator: join a group, send, abort), which reach it
through each actor's one weight endpoint (`weights_call`), so a new transport touches
this package and nothing else. A transport never imports Ray: Ray's put/get/wait come
in through `ClusterOps` (actors/ray_ops.py), so fakes can drive them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Protocol

from srpo_ray.weights.layout import BucketMeta, bucket_tensor_names

if TYPE_CHECKING:
    import torch

    from srpo_ray.weights.source import WeightSource

MB = 1 << 20


class StalePolicyError(RuntimeError):
    """A generation worker was asked for rollouts of a policy version it does not hold."""

    def __init__(self, worker_index: int, held: int, expected: int):
        self.worker_index, self.held, self.expected = worker_index, held, expected
        super().__init__(f"generation worker {worker_index} holds policy version {held}, caller "
                         f"expected {expected}: a weight update was missed")

    def __reduce__(self):  # Ray pickles it back to the caller: rebuild from the fields
        return type(self), (self.worker_index, self.held, self.expected)


class WeightDeliveryError(RuntimeError):
    """A delivery broke for a worker that is alive (e.g. stuck in an aborted NCCL
    transfer): the fleet replaces that worker and delivers again."""


class WeightsSupersededError(RuntimeError):
    """A load asked for a version that a newer publish has already replaced (a late
    joiner's catch-up queued before the next push, shared_memory's slot taken over);
    nothing was loaded: the worker keeps its weights and version, and the fleet syncs
    it again before its next chunk."""


@dataclass
class PublishedWeights:
    """What the learner's rank 0 hands the rollout fleet for one weight update.

    transport: the transport's name. buckets: the layout, in sending order. source:
    the publishing actor's handle (it serves the transport's calls: sends, catch-up
    copies). sources: every learner rank, filled in by `with_every_rank` when the
    transport's class says `every_rank_sends` (a send gathers, a collective of all ranks).
    detail: the transport's own record (a shared-memory file reference, object-store
    refs, a rendezvous endpoint). timeout_s: how long any wait for a peer may take.
    publish_id: distinct per publish of one publisher."""

    transport: str
    buckets: list[BucketMeta]
    source: Any = None
    timeout_s: float = 600.0
    detail: Any = None
    sources: list[Any] = field(default_factory=list)
    publish_id: int = 0

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    @property
    def names(self) -> list[str]:
        return bucket_tensor_names(self.buckets)


class ClusterOps(Protocol):
    """The few Ray operations transports use (actors/ray_ops.py)."""

    def put(self, value: Any) -> Any: ...

    def get(self, refs: Any, timeout: float | None = None) -> Any: ...

    def wait(self, refs: list[Any], num_returns: int, timeout: float | None, fetch_local: bool = True) -> tuple: ...

    def node_id(self) -> str: ...

    def node_ip(self) -> str: ...

    def current_actor(self) -> Any: ...

    def kill(self, handle: Any) -> None: ...


class Receiver(Protocol):
    """The generation side a transport loads into (GenerationWorkerImpl)."""

    worker_index: int

    def load_stream(self, names: list[str], weights: Iterator[tuple[str, "torch.Tensor"]], version: int) -> int:
        """Feed the engine (name, tensor) pairs; the version held afterwards."""

    def engine_call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call the engine's own weight-transfer API (vLLM's NCCL / IPC engines)."""

    def set_version(self, version: int) -> int:
        """After loading straight into the engine: the version now held (-1: none)."""


@dataclass
class SenderSettings:
    """What a publishing transport needs to know about its process."""

    ops: Any  # ClusterOps
    bucket_bytes: int = 256 * MB
    timeout_s: float = 600.0
    rank: int = 0
    world_size: int = 1
    tensor_parallel_size: int = 1
    """Of each generation engine (nccl: each engine is that many group ranks)."""


class WeightTransport:
    """Base of every transport; one instance per process and transport name, kept for
    the process's life (it owns files, buffers, groups). Subclasses set `name` and
    implement the roles they are used in. The class attributes below are the traits
    callers outside this package act on (through the functions at the end of this file
    and WeightSender.publish_model): set them here, never test a transport's name."""

    name: ClassVar[str] = ""
    takes_full_state_on_cpu: ClassVar[bool] = False
    """A CPU learner hands it its full state dict (the plain module's own tensors on one
    rank) instead of a parameter stream: it keeps or copies the whole version anyway."""
    sends_tied_weights: ClassVar[bool] = True
    """A tied lm_head is sent under its own name too; False where the receiving engine
    re-ties it (vLLM's own weight transfers)."""
    every_rank_sends: ClassVar[bool] = False
    """Every learner rank serves the fleet's send calls (each send gathers: a collective
    of all ranks), so the record carries every rank (`with_every_rank`)."""
    vllm_weight_transfer_backend: ClassVar[str | None] = None
    """The weight-transfer engine a vLLM generator must be created with ("nccl", "ipc"),
    or None: weights arrive through load_weight_stream."""
    prepare_catch_up: bool = False
    """Fleet side, set by the fleet: build each version's catch-up copy right after
    delivering it, while the learner still holds that version (rollouts may be generated
    while the learner trains, rollout.max_staleness > 0). Transports whose copy is made
    on demand from the live model (nccl, cuda_ipc) act on it."""

    def __init__(self, ops: Any, settings: SenderSettings | None = None):
        self.ops = ops
        self.settings = settings or SenderSettings(ops)

    # learner side
    def publish(self, source: "WeightSource") -> PublishedWeights | None:
        raise NotImplementedError(f"{self.name}: no learner side")

    def wait(self) -> None:
        """Until the last publish no longer reads the learner's weights (they may change)."""

    def close(self) -> None:
        """Release files, buffers and groups."""

    # generation side
    def load(self, published: PublishedWeights, version: int, receiver: Receiver, *extra: Any) -> int:
        raise NotImplementedError(f"{self.name}: no generation side")

    # fleet side
    def deliver(self, published: PublishedWeights, members: list[Any], version: int) -> list[Any]:
        """Each member's outcome: the version it now holds, or the exception it raised."""
        return outcomes(self.ops, [self.catch_up(published, m.handle, version) for m in members])

    def catch_up(self, published: PublishedWeights, handle: Any, version: int) -> Any:
        """A ref to one late joiner's load (it returns the version held)."""
        return handle.weights_call.remote(self.name, "load", published, version)

    # named calls (each actor's one weight endpoint, `weights_call`)
    def serve(self, op: str, *args: Any) -> Any:
        """Learner side: `serve_<op>(*args)`."""
        return self._named("serve", op)(*args)

    def receive(self, op: str, receiver: Receiver, *args: Any) -> Any:
        """Generation side: `load(*args)` for op "load", else `receive_<op>(receiver, *args)`."""
        if op == "load":  # (published, version, *transport-specific)
            return self.load(args[0], args[1], receiver, *args[2:])
        return self._named("receive", op)(receiver, *args)

    def _named(self, side: str, op: str) -> Callable[..., Any]:
        method = getattr(self, f"{side}_{op}", None)
        if method is None:
            raise ValueError(f"weight transport {self.name!r} has no {side} call {op!r}")
        return method


_REGISTRY: dict[str, Callable[[], type[WeightTransport]]] = {}


def register(name: str, module: str, class_name: str) -> None:
    """Add a transport, imported on first use (so CPU machines never import vLLM's GPU code)."""
    import importlib

    _REGISTRY[name] = lambda: getattr(importlib.import_module(module), class_name)


register("shared_memory", "srpo_ray.weights.shared_memory", "SharedMemoryTransport")
register("object_store", "srpo_ray.weights.object_store", "ObjectStoreTransport")
register("broadcast", "srpo_ray.weights.broadcast", "BroadcastTransport")
register("nccl", "srpo_ray.weights.nccl", "NcclTransport")
register("cuda_ipc", "srpo_ray.weights.cuda_ipc", "CudaIpcTransport")


def registered_names() -> tuple[str, ...]:
    """Every transport's name, in registration order."""
    return tuple(_REGISTRY)


def config_names() -> tuple[str, ...]:
    """Values of rollout.weight_transport: `auto` and every registered transport.
    `broadcast` is the torch.distributed group: gloo between CPU roles; between GPU roles
    it means `nccl` (vLLM's own NCCL weight transfer)."""
    return ("auto", *registered_names())


def transport_class(name: str) -> type[WeightTransport]:
    if name not in _REGISTRY:
        raise ValueError(f"weight transport {name!r}: must be one of {', '.join(sorted(_REGISTRY))} "
                         "(rollout.weight_transport)")
    return _REGISTRY[name]()


def vllm_weight_transfer(transport: str) -> str | None:
    """The weight-transfer backend a vLLM generator fed by `transport` is created with
    (srpo_ray/generation/engine_setup.py engine_kwargs), or None."""
    return transport_class(transport).vllm_weight_transfer_backend


def with_every_rank(published: PublishedWeights | None, ranks: list[Any]) -> PublishedWeights | None:
    """Rank 0's record, carrying every learner rank (`ranks`, in rank order) when its
    transport's sends gather on all of them."""
    if published is not None and transport_class(published.transport).every_rank_sends:
        published.sources = list(ranks)
    return published


def outcomes(ops: Any, refs: list[Any]) -> list[Any]:
    """Each ref's value, or the exception it raised (a dead actor: RayActorError)."""
    out: list[Any] = []
    for ref in refs:
        try:
            out.append(ops.get(ref))
        except Exception as e:  # noqa: BLE001 - reported per worker, judged by the caller
            out.append(e)
    return out


# ----------------------------------------------------------------------------- auto

def whole_gpus(gpus: float) -> bool:
    """A role that owns whole GPUs (1, 2, 4 ...): no other actor shares them."""
    return gpus >= 1 and float(gpus).is_integer()


def shares_one_gpu(learner_gpus: float, rollout_gpus: float, colocated: bool, generators_per_rank: int = 1) -> bool:
    """Each learner rank and its colocated generators on ONE GPU: their bundle (placement's
    `_colocated_group`: the rank plus generators j % num_ranks == i) adds up to at most one
    GPU. A bigger bundle (e.g. 1 + 1, or 0.5 + 3 x 0.5) puts them on different GPUs,
    where a CUDA IPC handle of the learner's GPU is nothing to the generator."""
    return (colocated and 0 < learner_gpus < 1 and 0 < rollout_gpus < 1
            and learner_gpus + generators_per_rank * rollout_gpus <= 1 + 1e-9)


def resolve_transport(transport: str, learner_gpus: float, rollout_gpus: float, colocated: bool,
                      tensor_parallel_size: int = 1, generators_per_rank: int = 1) -> str:
    """The transport `transport` stands for (`auto` resolved, `broadcast` between GPUs
    made `nccl`), or a ValueError naming rollout.weight_transport and the fix.

    learner_gpus / rollout_gpus: learner.gpus_per_rank / rollout.gpus_per_worker;
    generators_per_rank: the most generators colocated with one learner rank.
    auto ->
      shared_memory  all on CPU (bench/bench_weight_sync.py, 338 MB, one receiver: about
                     2x a plain memory copy; object_store 4-5x, gloo broadcast 15x)
      nccl           learner and generators on whole GPUs of their own (vLLM's NCCL
                     weight transfer: each tensor-parallel worker receives its shard of
                     every bucket straight into its GPU)
      cuda_ipc       colocated on ONE shared GPU (`shares_one_gpu`) with
                     tensor_parallel_size 1 (a generator reads its
                     learner rank's bucket in place on the shared GPU, as verl and
                     OpenRLHF colocate)
      object_store   everything else (a GPU role with a CPU one; fractional GPUs not
                     colocated: two NCCL ranks might land on one GPU, which NCCL refuses
                     with "Duplicate GPU detected")."""
    names = config_names()
    if transport not in names:
        raise ValueError(f"rollout.weight_transport={transport!r}: must be one of {', '.join(names)}")
    learner_gpu, rollout_gpu = learner_gpus > 0, rollout_gpus > 0
    separate_whole = not colocated and whole_gpus(learner_gpus) and whole_gpus(rollout_gpus)
    shared = shares_one_gpu(learner_gpus, rollout_gpus, colocated, generators_per_rank)
    if transport == "auto":
        if not learner_gpu and not rollout_gpu:
            return "shared_memory"
        if learner_gpu and rollout_gpu and separate_whole:
            return "nccl"
        if shared and tensor_parallel_size == 1:
            return "cuda_ipc"
        return "object_store"
    if transport == "broadcast" and learner_gpu and rollout_gpu:
        transport = "nccl"
    if transport == "nccl" and not separate_whole:
        raise ValueError(
            f"rollout.weight_transport={transport}: NCCL needs the learner and the generators on whole GPUs of "
            f"their own (learner.gpus_per_rank={learner_gpus:g}, rollout.gpus_per_worker={rollout_gpus:g}, "
            f"cluster.colocate={colocated}); two ranks of one NCCL group on one GPU fail (\"Duplicate GPU "
            "detected\"). Use rollout.weight_transport=auto (cuda_ipc when colocated, else object_store)")
    if transport == "cuda_ipc" and not (shared and tensor_parallel_size == 1):
        raise ValueError(
            "rollout.weight_transport=cuda_ipc: needs cluster.colocate=true with each learner rank and its "
            "generators sharing ONE GPU (learner.gpus_per_rank + generators per rank x rollout.gpus_per_worker "
            f"<= 1) and rollout.tensor_parallel_size=1 (got colocate={colocated}, learner.gpus_per_rank="
            f"{learner_gpus:g}, rollout.gpus_per_worker={rollout_gpus:g}, {generators_per_rank} generator(s) per "
            f"rank, tensor_parallel_size={tensor_parallel_size}); use rollout.weight_transport=auto")
    return transport


def resolve_for(cfg: Any) -> str:
    """resolve_transport for an SRPOConfig."""
    per_rank = -(-cfg.rollout.num_workers // max(1, cfg.learner.num_ranks))  # placement: j % num_ranks
    return resolve_transport(cfg.rollout.weight_transport, cfg.learner.gpus_per_rank, cfg.rollout.gpus_per_worker,
                             cfg.cluster.colocate, cfg.rollout.tensor_parallel_size, per_rank)
