"""Generation worker: a thin Ray actor around one engine.

It turns prompts into chat-templated token ids, asks the engine for n samples each,
and tags every group with the policy version of the weights it holds. Resources are
set by the caller: `GenerationWorker.options(num_cpus=..., num_gpus=...).remote(...)`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import ray

from actors.engines import GenerationEngine, create_engine, set_engine_env
from srpo_ray.models import chat_prompt_ids
from srpo_ray.records import Prompt, RolloutGroup

if TYPE_CHECKING:
    import torch

    from srpo_ray.config import RolloutConfig

SAMPLING_KEYS = {"n", "temperature", "top_p", "max_new_tokens", "seed"}
REQUIRED_SAMPLING_KEYS = SAMPLING_KEYS - {"seed"}


class GenerationWorkerImpl:
    def __init__(self, model_path: str, rollout_cfg: "RolloutConfig", dtype: str,
                 max_prompt_tokens: int, worker_index: int) -> None:
        set_engine_env(rollout_cfg)  # before anything imports torch
        from transformers import AutoTokenizer

        self.worker_index = worker_index
        self.max_prompt_tokens = max_prompt_tokens
        # The same HF tokenizer and chat template the learner uses (srpo_ray.models).
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        max_model_len = rollout_cfg.max_model_len or max_prompt_tokens + rollout_cfg.max_new_tokens
        self.engine: GenerationEngine = create_engine(model_path, rollout_cfg, dtype, max_model_len)
        self._version = 0  # the weights loaded from model_path are version 0

    def generate(self, prompts: list[Prompt], sampling: dict[str, Any],
                 policy_version_expected: int | None = None) -> list[RolloutGroup]:
        """One RolloutGroup of sampling["n"] samples per prompt, tagged with the
        version this worker holds. `sampling`: n, temperature, top_p, max_new_tokens
        and optionally seed. If `policy_version_expected` is given and differs from the
        held version, raise instead of producing stale rollouts."""
        unknown = sampling.keys() - SAMPLING_KEYS
        missing = REQUIRED_SAMPLING_KEYS - sampling.keys()
        if unknown or missing:
            raise ValueError(f"sampling settings {sampling}: unknown keys {sorted(unknown)}, missing "
                             f"{sorted(missing)}; expected {sorted(SAMPLING_KEYS)} (seed optional)")
        if policy_version_expected is not None and policy_version_expected != self._version:
            raise RuntimeError(f"generation worker {self.worker_index} holds policy version "
                               f"{self._version}, caller expected {policy_version_expected}: "
                               "a weight update was missed")
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

    def update_weights(self, state_dict: dict[str, "torch.Tensor"], version: int) -> int:
        """Load a full HF-named state dict in place; return the version now held."""
        self.engine.load_weights(state_dict)
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
