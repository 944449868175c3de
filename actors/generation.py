"""Generation worker: a thin Ray actor around one engine.

It turns prompts into chat-templated token ids, asks the engine for n samples each,
and tags every group with the policy version of the weights it holds. Resources are
set by the caller: `GenerationWorker.options(num_cpus=..., num_gpus=...).remote(...)`.

Weights arrive through one endpoint, `weights_call(transport, op, ...)`, which runs the
generation side of that transport (srpo_ray/weights/): "load" ends with the version now
held; some transports have set-up calls first (join a group).
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Iterator

import ray
from ray.exceptions import ObjectLostError, OwnerDiedError

from actors.ray_ops import RayOps
from srpo_ray.generation.engine_setup import set_engine_env
from srpo_ray.generation.engines import GenerationEngine, create_engine
from srpo_ray.host_heap import resolve_heap_policy, set_heap_policy
from srpo_ray.models import chat_prompt_ids
from srpo_ray.records import ABORTED, GroupTokens, Prompt, RolloutGroup, Sample, Sampling, VersionRuns
from srpo_ray.telemetry.console import redirect_actor_output
from srpo_ray.weights.endpoints import WeightReceiver
from srpo_ray.weights.transport import StalePolicyError

if TYPE_CHECKING:
    import torch

    from srpo_ray.config.schema import RolloutConfig

class GenerationWorkerImpl:
    def __init__(self, model_path: str, rollout_cfg: "RolloutConfig", dtype: str,
                 max_prompt_tokens: int, worker_index: int, engine: GenerationEngine | None = None,
                 weight_transfer: str | None = None, sleep_mode: bool = False) -> None:
        """engine: serve with this engine instead of starting vLLM (another backend, or
        a benchmark's stand-in). weight_transfer ("nccl", "ipc") and sleep_mode: see
        srpo_ray/generation/engine_setup.py engine_kwargs."""
        redirect_actor_output()  # before vLLM starts talking (srpo_ray/telemetry/console.py)
        set_engine_env(rollout_cfg)  # before anything imports torch
        # before the engine's first allocation: a CPU engine's KV cache and logits then
        # come from a heap that is reused, not faulted in again every call (rollout.host_heap)
        set_heap_policy(resolve_heap_policy(rollout_cfg.host_heap, rollout_cfg.gpus_per_worker > 0,
                                            "rollout.host_heap"))
        from transformers import AutoTokenizer

        self.worker_index = worker_index
        self.max_prompt_tokens = max_prompt_tokens
        # The same HF tokenizer and chat template the learner uses (srpo_ray.models).
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        max_model_len = rollout_cfg.max_model_len or max_prompt_tokens + rollout_cfg.max_new_tokens
        self.engine: GenerationEngine = engine or create_engine(model_path, rollout_cfg, dtype, max_model_len,
                                                                weight_transfer, sleep_mode)
        self._version = 0  # the weights loaded from model_path are version 0
        self._weights = WeightReceiver(RayOps())
        self._load_seconds: list[float] = []  # per load since the fleet last asked
        self._stop_below = 0  # interrupt(): stoppable calls pause while the held version is older

    def generate(self, prompts: list[Prompt], sampling: Sampling,
                 policy_version_expected: int | None = None, stoppable: bool = False) -> list[RolloutGroup]:
        """One RolloutGroup of sampling.n samples per prompt, tagged with the version
        this worker holds; prompt i samples from sampling.for_prompt(i)'s seed. If
        `policy_version_expected` is given and differs from the held version, raise
        StalePolicyError instead of producing stale rollouts. stoppable (partial
        rollouts): an `interrupt` pauses the call at its next decoding step; paused
        samples come back with finish_reason ABORTED, for `resume` after new weights."""
        self._check_call(sampling, policy_version_expected)
        prompt_ids = [self.chat_prompt_ids(p.messages) for p in prompts]
        for prompt, ids in zip(prompts, prompt_ids):
            if len(ids) > self.max_prompt_tokens:
                raise ValueError(f"prompt {prompt.prompt_id!r} is {len(ids)} tokens after the chat "
                                 f"template, over data.max_prompt_tokens={self.max_prompt_tokens}; "
                                 "raise it or drop the prompt from the data")
        stop = {"should_stop": self._should_stop} if stoppable else {}
        samples = self.engine.generate(prompt_ids, sampling, **stop)
        return [RolloutGroup.of(p, ids, s, self._version) for p, ids, s in zip(prompts, prompt_ids, samples)]

    def resume(self, groups: list[RolloutGroup], sampling: Sampling, seeds: list[int | None],
               policy_version_expected: int | None = None) -> list[RolloutGroup]:
        """Continue the paused samples of `groups` (paused by `interrupt`; tokens and texts
        here or by reference) with the weights held now, stoppable again. seeds: each
        group's sample-0 seed in the call that started it. Each resumed sample records
        from which token on this version sampled it (Sample.version_runs); the group
        keeps the policy_version that started it."""
        self._check_call(sampling, policy_version_expected)
        partial = [self._kept_samples(g) for g in groups]
        prompt_ids = [self.chat_prompt_ids(g.prompt.messages) for g in groups]
        resumed = self.engine.resume(prompt_ids, partial, sampling, seeds, should_stop=self._should_stop)
        out = []
        for g, ids, before, after in zip(groups, prompt_ids, partial, resumed):
            samples = [replace(new, version_runs=_runs_after(old, g.policy_version, self._version, len(new.token_ids)))
                       for old, new in zip(before, after)]
            out.append(RolloutGroup.of(g.prompt, ids, samples, g.policy_version))
        return out

    def _kept_samples(self, group: RolloutGroup) -> list[Sample]:
        """A paused group's samples as they were (tokens and texts fetched from the object
        store). If those objects are lost (their node died), every sample starts again from
        nothing: regenerated on the weights held now, never a failed step."""
        try:
            tokens, texts = (x if isinstance(x, (GroupTokens, tuple)) else ray.get(x)
                             for x in (group.tokens, group.texts))
        except (ObjectLostError, OwnerDiedError):
            return [Sample([], [], "", ABORTED) for _ in group.samples]
        return [Sample(*tokens.response(j), text=texts[j], finish_reason=s.finish_reason, version_runs=s.version_runs)
                for j, s in enumerate(group.samples)]

    def generate_apart(self, prompts: list[Prompt], sampling: Sampling,
                       policy_version_expected: int | None = None, stoppable: bool = False) -> list[Any]:
        """`generate`, for a caller that leaves tokens and texts in the object store: call
        it with num_returns = 1 + 2 * len(prompts). The first value is the groups without
        tokens and texts (what the driver reads); then, per group, its GroupTokens and its
        texts, one object each, so a learner rank fetches only the tokens of its groups and
        a reward worker only texts."""
        return _apart(self.generate(prompts, sampling, policy_version_expected, stoppable))

    def resume_apart(self, groups: list[RolloutGroup], sampling: Sampling, seeds: list[int | None],
                     policy_version_expected: int | None = None) -> list[Any]:
        """`resume`, returned as `generate_apart` returns (num_returns = 1 + 2 * len(groups))."""
        return _apart(self.resume(groups, sampling, seeds, policy_version_expected))

    def interrupt(self, version: int) -> int:
        """Pause what this worker generates from weights older than `version` at the next
        decoding step (stoppable calls only; partial rollouts). Call it with
        `send_interrupt`, which runs it beside a generate call (its own concurrency group).
        Loading `version` lifts it. The version held."""
        self._stop_below = max(self._stop_below, int(version))
        return self._version

    def _should_stop(self) -> bool:
        return self._version < self._stop_below

    def _check_call(self, sampling: Sampling, policy_version_expected: int | None) -> None:
        if not isinstance(sampling, Sampling):
            raise TypeError(f"sampling settings must be a records.Sampling, got {type(sampling).__name__}")
        if policy_version_expected is not None and policy_version_expected != self._version:
            raise StalePolicyError(self.worker_index, self._version, int(policy_version_expected))

    def weights_call(self, transport: str, op: str, *args: Any) -> Any:
        """The one weight endpoint: `op` ("load", or a set-up call such as "join") of
        `transport`'s generation side."""
        return self._weights.call(self, transport, op, *args)

    def load_stream(self, names: list[str], weights: Iterator[tuple[str, "torch.Tensor"]], version: int) -> int:
        """Feed the engine; the version held afterwards. A load refused before anything
        arrived keeps the old weights and version; one that fails half-way holds none (-1)."""
        started = False

        def tracked():
            nonlocal started
            started = True
            yield from weights
        held, self._version = self._version, -1
        began = time.perf_counter()
        try:
            self.engine.load_weight_stream(names, tracked())
        except BaseException:
            if not started:  # refused before anything was loaded: the old weights stand
                self._version = held
            raise
        self._load_seconds.append(time.perf_counter() - began)
        self._version = int(version)
        return self._version

    def pop_load_seconds(self) -> list[float]:
        """Seconds of each load since the last call: reading the transport's tensors and
        the engine's own reload (vLLM's reload_weights), without the RPC around them."""
        out, self._load_seconds = self._load_seconds, []
        return out

    def engine_call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """The engine's own weight-transfer calls (vLLM's NCCL / IPC engines)."""
        return getattr(self.engine, method)(*args, **kwargs)

    def set_version(self, version: int) -> int:
        """After a transport loaded straight into the engine (vLLM's weight transfer)."""
        self._version = int(version)
        return self._version

    def sleep(self) -> None:
        """Release the GPU memory for the learner (colocated; see VLLMEngine.sleep)."""
        self.engine.sleep()

    def wake_up(self, tags: list[str] | None = None) -> bool:
        return self.engine.wake_up(tags)

    def version(self) -> int:
        return self._version

    def ping(self) -> bool:
        return True

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def token_logprobs(self, prompt_token_ids: list[int], response_token_ids: list[int],
                       temperature: float = 1.0) -> list[float]:
        return self.engine.token_logprobs(prompt_token_ids, response_token_ids, temperature)


def _apart(groups: list[RolloutGroup]) -> list[Any]:
    return [[g.by_reference(None, None) for g in groups], *(x for g in groups for x in (g.tokens, g.texts))]


def _runs_after(before: Sample, group_version: int, version: int, num_tokens: int) -> VersionRuns:
    """A sample's version runs once `version` has sampled its tokens from len(before) on."""
    if before.finish_reason != ABORTED or num_tokens == len(before.token_ids):
        return before.version_runs
    last = before.version_runs[-1][1] if before.version_runs else group_version
    return before.version_runs if last == version else (*before.version_runs, (len(before.token_ids), version))


# "control": interrupt() runs while a generate call holds the default group (one thread,
# calls in the order sent, which catch-up loads queued ahead of a chunk rely on). The
# group is chosen per call (send_interrupt), not on the method, so classes derived from
# GenerationWorkerImpl can be made actors without declaring it.
GenerationWorker = ray.remote(concurrency_groups={"control": 1})(GenerationWorkerImpl)


def send_interrupt(handle: Any, version: int) -> Any:
    """A GenerationWorker's `interrupt(version)` in the control group (a ref to the
    version it holds): it runs even while the worker is inside a generate call."""
    return handle.interrupt.options(concurrency_group="control").remote(version)
