"""Coordinates the learner ranks (actor handles offering `.method.remote(...)`): splits
each batch over the ranks, computes the global loss denominator, calls every rank and
collects the results. Plain Python: tests drive it with fakes, and Ray is only needed
for the default `get` (imported lazily so this module stays importable without Ray).

Every learner method is collective, so each call here goes to ALL ranks at once and
waits for all of them: a rank that fails surfaces its exception instead of leaving its
peers blocked in a collective. A rank whose actor dies (node lost, OOM kill) stops the
run with LearnerRankDiedError naming the rank and the checkpoint to resume from: the
surviving ranks hold a partial update and wait in a collective, so the group cannot go
on, and FSDP shards cannot be rebuilt from the survivors alone.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from srpo_ray.config.schema import SRPOConfig
from srpo_ray.learner.plan import TrainRows, token_imbalance
from srpo_ray.telemetry.console import actor_log_file
from srpo_ray.weights.common import to_every_rank
from srpo_ray.weights.transport import with_every_rank

log = logging.getLogger(__name__)


def _ray_get(refs: Any) -> Any:
    import ray

    return ray.get(refs)


DEATH_NOTICE_S = 10.0
"""How long a failed group call waits for the other ranks' results, to tell a dead rank
from its peers' errors: when a rank is killed its peers' collectives usually fail first
(connection closed), and Ray reports the death itself a moment later."""


def _dead_rank(error: BaseException, refs: Sequence[Any], ranks: Sequence[int]) -> tuple[int, BaseException] | None:
    """(rank, its RayActorError) if one of `refs` (results of `ranks`) failed because its
    actor died; None for errors that are not Ray's (fakes) or when no actor died."""
    try:
        import ray
        from ray.exceptions import RayActorError, RayError
    except ImportError:
        return None
    if not isinstance(error, RayError):
        return None
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=DEATH_NOTICE_S, fetch_local=False)
    done = {r.hex() for r in ready}
    for ref, rank in zip(refs, ranks):
        if ref.hex() in done:
            try:
                ray.get(ref)
            except RayActorError as died:
                if died.actor_init_failed:  # its constructor raised: that error says more
                    return None
                return rank, died
            except Exception:  # a peer's error, e.g. its collective lost the dead rank
                pass
    return None


class LearnerRankDiedError(RuntimeError):
    """A learner rank's actor died during a group call; the run cannot continue."""

    def __init__(self, rank: int, method: str, cause: BaseException, checkpoint: Any = None,
                 log_file: str | None = None):
        self.rank, self.method = rank, method
        where = checkpoint if checkpoint else "the last checkpoint in trainer.run_dir (if any)"
        output = f" Its output: {log_file}." if log_file else ""
        super().__init__(f"learner rank {rank} died during {method}; the other ranks cannot go on "
                         f"without it, so the run stops. Restart with --resume to continue from "
                         f"{where}.{output} Ray's report: {cause}")


class LearnerGroup:
    def __init__(self, handles: Sequence[Any], loss_agg: str, get: Callable[[Any], Any] = _ray_get,
                 last_checkpoint: Callable[[], Any] | None = None,
                 dead_rank: Callable[[BaseException, Sequence[Any], Sequence[int]],
                                     tuple[int, BaseException] | None] = _dead_rank):
        """handles: one per rank, in rank order. loss_agg: algo.loss_agg, which decides
        the global denominator (response tokens or sequences of the whole batch).
        last_checkpoint: returns the checkpoint a restart would resume from (e.g.
        CheckpointManager.latest), named in the error when a rank dies; settable later.
        get, dead_rank: how results are fetched and a failed call's dead rank is found
        (Ray's by default); the seam fault tests use to fake a dead rank without Ray."""
        if not handles:
            raise ValueError("LearnerGroup needs at least one rank handle (learner.num_ranks >= 1)")
        self.handles = list(handles)
        self.loss_agg = loss_agg
        self.get = get
        self.dead_rank = dead_rank
        self.last_checkpoint = last_checkpoint
        self.log_dir: str | None = None  # the ranks' log files (srpo_ray/telemetry/console.py), named when one dies

    @property
    def world_size(self) -> int:
        return len(self.handles)

    def _all(self, method: str, *args: Any) -> list[Any]:
        # under the lock every collective call of the driver takes (weights/common.py LEARNER_CALLS)
        return self._get(method, to_every_rank(lambda h: getattr(h, method).remote(*args), self.handles))

    def _get(self, method: str, refs: list[Any], ranks: Sequence[int] | None = None) -> list[Any]:
        """Wait for the results of `ranks` (default: all, in order); if a rank's actor
        died, raise LearnerRankDiedError naming it rather than its peers' errors."""
        ranks = list(range(len(refs))) if ranks is None else list(ranks)
        try:
            return self.get(refs)
        except Exception as e:
            dead = self.dead_rank(e, refs, ranks)
            if dead is None:
                raise
            checkpoint = self.last_checkpoint() if self.last_checkpoint is not None else None
            log_file = actor_log_file(self.log_dir, "learner", dead[0]) if self.log_dir else None
            raise LearnerRankDiedError(dead[0], method, dead[1], checkpoint, log_file) from e

    def setup(self) -> None:
        self._all("setup")

    def train(self, rows: TrainRows, temperature: float) -> dict:
        """One update on the step's `rows`. Each rank gets its shard (rows balanced by
        real tokens; their tokens by reference, fetched by the rank) and the denominator
        of the whole batch (response tokens, or sequences for the seq-mean modes), so the
        ranks' summed gradients are the gradient of the batch loss. Rows with nothing to
        train on (no response tokens) change nothing and report
        `learner/skipped_empty_batch`. Returns rank 0's metrics (all ranks return the
        same, all-reduced dict) and `learner/rank_token_imbalance` (most-loaded rank's
        tokens over the mean)."""
        if rows.num_response_tokens == 0:
            return {"learner/skipped_empty_batch": 1.0, "learner/response_tokens": 0.0}
        denominator = rows.denominator(self.loss_agg)
        shards = rows.shards(self.world_size)
        by_rank = dict(zip(map(id, self.handles), shards))
        refs = to_every_rank(lambda h: h.train_step.remote(by_rank[id(h)], denominator, temperature), self.handles)
        return {**self._get("train", refs)[0], "learner/rank_token_imbalance": token_imbalance(shards)}

    def publish_weights(self, transport: str | None = None) -> Any:
        """The new weights in the transport the ranks were set up with (or `transport`):
        every rank joins the gather; rank 0's record, carrying every rank where the
        transport's sends need them all, goes to the rollout fleet's push_weights."""
        refs = to_every_rank(lambda h: h.publish_weights.remote(transport), self.handles)
        return with_every_rank(self._get("publish_weights", refs)[0], self.handles)

    def save(self, directory: str) -> None:
        """Checkpoint into `directory` (hf/ and learner/); see FSDPLearner.save_checkpoint."""
        self._all("save_checkpoint", str(directory))

    def load(self, directory: str) -> None:
        self._all("load_checkpoint", str(directory))

    def logprobs_of(self, input_ids: Any, attention_mask: Any = None, temperature: float = 1.0) -> Any:
        """[B, T] log-probs of each token given its prefix (for verification)."""
        return self._all("logprobs_of", input_ids, attention_mask, temperature)[0]

    def ping(self) -> list[Any]:
        return self._all("ping")

    def close_weights(self, timeout_s: float = 10.0) -> None:
        """Let the ranks release their weight transports before the actors are killed: rank
        0's shared-memory file (a killed process cannot remove it, and it holds twice the
        model's bytes of RAM), NCCL groups, IPC buffers. Best effort: a dead or stuck rank 0
        leaves its file to the next run's publisher to remove."""
        import time

        import ray

        refs = [h.close_weights.remote() for h in self.handles]
        deadline = time.monotonic() + timeout_s
        for rank, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except Exception as e:  # noqa: BLE001 - tearing down; the run's own error matters more
                log.warning("learner rank %d did not release its weight files and buffers: %s", rank, e)


def create_learner_group(cfg: SRPOConfig, model_path: str, num_ranks: int | None = None,
                         actor_options: Callable[[int], dict[str, Any]] | None = None,
                         setup: bool = True) -> LearnerGroup:
    """Create `num_ranks` (default learner.num_ranks) LearnerRank actors, rank 0 first
    (it picks the rendezvous endpoint), and set up the FSDP2 process group.

    actor_options(rank) -> `.options(...)` kwargs for that rank, e.g.
    `lambda r: placement.actor_options("learner", r)` from cluster.ray_placement;
    default: num_cpus=learner.cpus_per_rank, num_gpus=learner.gpus_per_rank."""
    import ray

    from actors.learner import LearnerRank
    from actors.ray_ops import HOT_PATH_NICENESS
    from srpo_ray.runtime.fault_hooks import actor_class

    LearnerRank = actor_class("LearnerRank", LearnerRank)  # noqa: N806 - the seam fault tests use

    world_size = cfg.learner.num_ranks if num_ranks is None else num_ranks
    if world_size < 1:
        raise ValueError(f"learner.num_ranks must be >= 1, got {world_size}")
    if actor_options is None:
        def actor_options(rank: int) -> dict[str, Any]:
            return {"num_cpus": cfg.learner.cpus_per_rank, "num_gpus": cfg.learner.gpus_per_rank}

    def options(rank: int) -> dict[str, Any]:
        opts = dict(actor_options(rank))
        env = dict(HOT_PATH_NICENESS)
        if cfg.learner.gpus_per_rank <= 0:  # Ray shows a GPU node's GPUs to actors that asked for none
            env["CUDA_VISIBLE_DEVICES"] = ""
        runtime_env = dict(opts.get("runtime_env") or {})
        opts["runtime_env"] = {**runtime_env, "env_vars": {**env, **runtime_env.get("env_vars", {})}}
        return opts

    rank0 = LearnerRank.options(**options(0)).remote(model_path, cfg, 0, world_size)
    addr, port = ray.get(rank0.get_master_endpoint.remote())
    handles = [rank0] + [LearnerRank.options(**options(r)).remote(model_path, cfg, r, world_size, addr, port)
                         for r in range(1, world_size)]
    group = LearnerGroup(handles, cfg.algo.loss_agg)
    if setup:
        group.setup()
    return group
