"""Generation worker: a thin Ray actor around one engine.

It turns prompts into chat-templated token ids, asks the engine for n samples each,
and tags every group with the policy version of the weights it holds. Resources are
set by the caller: `GenerationWorker.options(num_cpus=..., num_gpus=...).remote(...)`.

Weights arrive four ways (srpo_ray/weight_sync.py), each ending with the version now
held: a whole state dict (`update_weights`), the publisher's shared-memory file on this
node (`load_shared_weights`), buckets in the object store (`load_weight_buckets`), or
buckets broadcast by the learner's rank 0 over a group the worker joined
(`join_weight_group`, then `receive_weights`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import ray

from actors.engines import GenerationEngine, create_engine, set_engine_env
from srpo_ray.console import redirect_actor_output
from srpo_ray.models import chat_prompt_ids
from srpo_ray.records import Prompt, RolloutGroup
from srpo_ray.weight_shm import SharedWeightReader
from srpo_ray.weight_sync import (BroadcastGroup, BucketMeta, PublishedWeights, StalePolicyError,
                                  bucket_tensor_names, open_store, tensor_from_buffer, unpack_bucket,
                                  unpack_parts)

if TYPE_CHECKING:
    import torch

    from srpo_ray.config import RolloutConfig

SAMPLING_KEYS = {"n", "temperature", "top_p", "max_new_tokens", "seed"}
REQUIRED_SAMPLING_KEYS = SAMPLING_KEYS - {"seed"}


class GenerationWorkerImpl:
    def __init__(self, model_path: str, rollout_cfg: "RolloutConfig", dtype: str,
                 max_prompt_tokens: int, worker_index: int, engine: GenerationEngine | None = None) -> None:
        """engine: serve with this engine instead of starting vLLM (another backend, or
        a benchmark's stand-in)."""
        redirect_actor_output()  # before vLLM starts talking (srpo_ray/console.py)
        set_engine_env(rollout_cfg)  # before anything imports torch
        from transformers import AutoTokenizer

        self.worker_index = worker_index
        self.max_prompt_tokens = max_prompt_tokens
        # The same HF tokenizer and chat template the learner uses (srpo_ray.models).
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        max_model_len = rollout_cfg.max_model_len or max_prompt_tokens + rollout_cfg.max_new_tokens
        self.engine: GenerationEngine = engine or create_engine(model_path, rollout_cfg, dtype, max_model_len)
        self._version = 0  # the weights loaded from model_path are version 0
        self._store: Any = None  # connection to the weight sender's TCPStore (broadcast)
        self._store_endpoint: tuple[str, int] | None = None
        self._group: BroadcastGroup | None = None
        self._shared: SharedWeightReader | None = None  # the mapping, kept across versions

    def generate(self, prompts: list[Prompt], sampling: dict[str, Any],
                 policy_version_expected: int | None = None) -> list[RolloutGroup]:
        """One RolloutGroup of sampling["n"] samples per prompt, tagged with the
        version this worker holds. `sampling`: n, temperature, top_p, max_new_tokens
        and optionally seed. If `policy_version_expected` is given and differs from the
        held version, raise StalePolicyError instead of producing stale rollouts."""
        unknown = sampling.keys() - SAMPLING_KEYS
        missing = REQUIRED_SAMPLING_KEYS - sampling.keys()
        if unknown or missing:
            raise ValueError(f"sampling settings {sampling}: unknown keys {sorted(unknown)}, missing "
                             f"{sorted(missing)}; expected {sorted(SAMPLING_KEYS)} (seed optional)")
        if policy_version_expected is not None and policy_version_expected != self._version:
            raise StalePolicyError(self.worker_index, self._version, int(policy_version_expected))
        prompt_ids = [self.chat_prompt_ids(p.messages) for p in prompts]
        for prompt, ids in zip(prompts, prompt_ids):
            if len(ids) > self.max_prompt_tokens:
                raise ValueError(f"prompt {prompt.prompt_id!r} is {len(ids)} tokens after the chat "
                                 f"template, over data.max_prompt_tokens={self.max_prompt_tokens}; "
                                 "raise it or drop the prompt from the data")
        samples = self.engine.generate(prompt_ids, n=int(sampling["n"]),
                                       temperature=float(sampling["temperature"]),
                                       top_p=float(sampling["top_p"]),
                                       max_new_tokens=int(sampling["max_new_tokens"]),
                                       seed=sampling.get("seed"))
        return [RolloutGroup(prompt=p, prompt_token_ids=ids, samples=s, policy_version=self._version)
                for p, ids, s in zip(prompts, prompt_ids, samples)]

    def update_weights(self, state_dict: "dict[str, torch.Tensor] | PublishedWeights", version: int) -> int:
        """Load a full HF-named state dict in place (or object-store buckets, when an
        object ref to published weights reached the fleet unresolved); return the
        version now held."""
        if isinstance(state_dict, PublishedWeights):
            if state_dict.transport == "shared_memory":
                return self.load_shared_weights(state_dict, version)
            if state_dict.transport != "object_store":
                raise ValueError(f"{state_dict.transport} weights cannot be loaded alone: pass the "
                                 "PublishedWeights record itself (ray.get it), not its object ref, to "
                                 "RayRolloutFleet.push_weights, so the fleet runs the broadcast")
            return self.load_weight_buckets(state_dict, version)
        return self._load(list(state_dict), iter(state_dict.items()), version)

    def load_weight_buckets(self, published: PublishedWeights, version: int) -> int:
        """Fetch the object-store buckets of `published` one at a time and load them;
        return the version now held. Fetching all of them starts at once (a no-op on
        the sender's node, a pull from it otherwise) while the first ones load."""
        if published.refs is None or len(published.refs) != len(published.buckets):
            raise ValueError("load_weight_buckets needs published weights with one object-store ref per bucket")
        ray.wait(list(published.refs), num_returns=len(published.refs), timeout=0, fetch_local=True)

        def stream():
            for meta, ref in zip(published.buckets, published.refs):
                yield from unpack_parts([tensor_from_buffer(part) for part in ray.get(ref)], meta)
        return self._load(published.names, stream(), version)

    def load_shared_weights(self, published: PublishedWeights, version: int) -> int:
        """Load the weights of `published` from its publisher's shared-memory file,
        each tensor as soon as its bytes are written; return the version now held. On
        another node than the file, load an object-store copy the publisher makes."""
        ref = published.shared
        if ref is None:
            raise ValueError("load_shared_weights needs published weights of the shared_memory transport")
        if ref.node_id != ray.get_runtime_context().get_node_id():
            return self.load_weight_buckets(ray.get(published.source.weight_catch_up.remote()), version)
        if self._shared is None:
            self._shared = SharedWeightReader()
        with self._shared.reading(ref, published.buckets) as stream:  # checks the version first
            return self._load(published.names, stream, version)

    def join_weight_group(self, endpoint: tuple[str, int], name: str, rank: int, world_size: int,
                          backend: str, timeout_s: float) -> None:
        """Become `rank` (>= 1) of the broadcast group `name` whose rank 0 (the sender)
        serves a TCPStore at `endpoint`; replaces any group joined before. Every member
        must call this at the same time (the group forms when all have arrived)."""
        if self._store is None or self._store_endpoint != tuple(endpoint):
            self._store = open_store(endpoint[0], int(endpoint[1]), is_master=False, timeout_s=timeout_s)
            self._store_endpoint = tuple(endpoint)
        if self._group is not None:
            self._group.close()
        self._group = None
        self._group = BroadcastGroup(self._store, name, rank, world_size, backend, timeout_s,
                                     host=ray.util.get_node_ip_address())

    def receive_weights(self, buckets: list[BucketMeta], version: int, group_name: str) -> int:
        """Receive the buckets rank 0 of group `group_name` broadcasts now, in order,
        loading each as it arrives; return the version now held."""
        group = self._group
        if group is None or group.name != group_name:
            raise RuntimeError(f"generation worker {self.worker_index} is not in weight group {group_name!r} "
                               f"(it is in {group.name if group else None!r}); join_weight_group first")

        def stream():
            for meta in buckets:
                yield from unpack_bucket(group.receive(meta.nbytes), meta)
        return self._load(bucket_tensor_names(buckets), stream(), version)

    def _load(self, names: list[str], weights: Iterator[tuple[str, "torch.Tensor"]], version: int) -> int:
        started = False

        def tracked():
            nonlocal started
            started = True
            yield from weights
        held, self._version = self._version, -1  # a load that fails half-way leaves no valid version
        try:
            self.engine.load_weight_stream(names, tracked())
        except BaseException:
            if not started:  # refused before anything was loaded: the old weights stand
                self._version = held
            raise
        self._version = int(version)
        return self._version

    def version(self) -> int:
        return self._version

    def ping(self) -> bool:
        return True

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def prompt_lengths(self, prompts: list[Prompt]) -> list[int]:
        """Chat-templated token count of each prompt (to check data against max_prompt_tokens)."""
        return [len(self.chat_prompt_ids(p.messages)) for p in prompts]

    def token_logprobs(self, prompt_token_ids: list[int], response_token_ids: list[int],
                       temperature: float = 1.0) -> list[float]:
        return self.engine.token_logprobs(prompt_token_ids, response_token_ids, temperature)


GenerationWorker = ray.remote(GenerationWorkerImpl)
