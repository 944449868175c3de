"""The bare side of bench/bench_vs_bare.py: SRPO's default update as one plain
Python process, no Ray. In-process vLLM samples, the project's reward scorer, advantages,
batch and loss score and train an HF model with AdamW, and the full state dict goes
back into vLLM after every update. The same config as srpo-ray's side: the same prompts
per step (the same HistoryLedger and seed), the same sampling seeds, reward, loss and
optimizer; bench_vs_bare.py lists every way the two sides differ.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

from srpo_ray.config.load import SRPOConfig
from srpo_ray.telemetry.metrics import timed


def cores() -> int:
    return len(os.sched_getaffinity(0))


def check_bare_supports(cfg: SRPOConfig) -> None:
    """The bare loop is SRPO's default update only; refuse what it does not implement."""
    unsupported = {"one stage (stages=[...])": len(cfg.stages) == 1, "algo.dynamic_sampling=false":
                   not cfg.algo.dynamic_sampling, "algo.kl_coef=0": cfg.algo.kl_coef == 0,
                   "algo.minibatches=1": cfg.algo.minibatches == 1, "model.dtype=float32": cfg.model.dtype == "float32"}
    missing = [k for k, ok in unsupported.items() if not ok]
    if missing:
        sys.exit(f"bench_vs_bare: the bare loop needs {', '.join(missing)}; change the --set values")


def run_bare(cfg: SRPOConfig) -> list[dict]:
    """The plain GRPO loop of FACTS.md, one process; one metrics dict per step, with the
    keys srpo-ray's metrics.jsonl uses. The parent sets OMP_NUM_THREADS to every core
    and VLLM_ENABLE_V1_MULTIPROCESSING=0 before this process imports torch."""
    import torch
    torch.set_num_threads(cores())  # now: vLLM's CPU worker turns set_num_threads into a no-op
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from srpo_ray.algo.advantages import group_advantages
    from srpo_ray.algo.ledger import HistoryLedger
    from srpo_ray.algo.overlong import apply_overlong_policy
    from srpo_ray.algo.stages import effective_sampling, prompts_per_step
    from srpo_ray.data.parquet import load_prompts
    from srpo_ray.learner.plan import build_train_batch
    from srpo_ray.models import chat_prompt_ids, resolve_model_path
    from srpo_ray.records import RolloutGroup, Sample, ScoredGroup, rollout_seed
    from srpo_ray.rewards.scorer import RewardScorer
    from srpo_ray.telemetry.metrics import summarize_rollouts

    path = resolve_model_path(cfg.model)
    stage = cfg.stages[0]
    sampling = effective_sampling(cfg.rollout, stage)
    n, temperature = int(sampling.n), float(sampling.temperature)
    prompts = load_prompts(cfg.data.train_files, system_prompt=cfg.data.system_prompt)
    by_id = {p.prompt_id: p for p in prompts}
    ledger = HistoryLedger(cfg.resample, seed=cfg.trainer.seed)  # picks the prompts srpo-ray picks
    ledger.set_pool([pid for pid, p in by_id.items() if p.domain in stage.domains])
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # vLLM as srpo-ray's VLLMEngine starts it on CPU (srpo_ray/generation/engines.py)
    max_model_len = cfg.rollout.max_model_len or cfg.data.max_prompt_tokens + max(
        sampling.max_new_tokens, cfg.eval.max_new_tokens)
    llm = LLM(model=path, tokenizer=path, dtype=cfg.model.dtype, seed=cfg.rollout.seed, max_model_len=max_model_len,
              enable_prefix_caching=True, logprobs_mode="processed_logprobs",
              kv_cache_memory_bytes=cfg.rollout.kv_cache_memory_bytes, enforce_eager=True,
              enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 4096))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    scorer = RewardScorer(cfg.reward)
    print(f"bare: torch threads {torch.get_num_threads()}", flush=True)

    rows = []
    try:
        for step in range(1, cfg.trainer.total_steps + 1):
            started = time.perf_counter()
            timings: dict[str, float] = {}
            ids, _ = ledger.next_batch(prompts_per_step(cfg.trainer, stage))
            step_prompts = [by_id[i] for i in ids]
            with timed(timings, "generate"):
                prompt_ids = [chat_prompt_ids(tokenizer, p.messages) for p in step_prompts]
                # the seeds srpo-ray gives the step's prompts (one round: records.rollout_seed)
                seeded = sampling.with_seed(rollout_seed(cfg.rollout.seed, step))
                params = [SamplingParams(n=n, temperature=temperature, top_p=sampling.top_p,
                                         max_tokens=sampling.max_new_tokens, logprobs=0,
                                         seed=seeded.for_prompt(k).seed,
                                         detokenize=False) for k in range(len(prompt_ids))]
                outputs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
                texts = iter(tokenizer.batch_decode([list(c.token_ids) for o in outputs for c in o.outputs],
                                                    skip_special_tokens=True))
                groups = [RolloutGroup.of(p, ids_, [Sample(list(c.token_ids),
                                                        [row[t].logprob for row, t in zip(c.logprobs, c.token_ids)],
                                                        next(texts), c.finish_reason) for c in o.outputs], step - 1)
                          for p, ids_, o in zip(step_prompts, prompt_ids, outputs)]
            with timed(timings, "score"):
                results = scorer.score_batch([(g.prompt, list(g.texts)) for g in groups])
                scored = [ScoredGroup(g, r) for g, r in zip(groups, results)]
            for sg in scored:
                ledger.observe(sg.group.prompt.prompt_id, sg.num_correct, len(sg.results))
            shaped, _ = apply_overlong_policy(scored, cfg.algo.overlong, sampling.max_new_tokens)
            rewards = torch.tensor(shaped, dtype=torch.float32).reshape(len(shaped), n)
            advantages, _ = group_advantages(rewards, cfg.algo.normalize_adv_by_std)
            batch = build_train_batch(scored, advantages.tolist(), pad)  # zero-variance groups dropped
            train_metrics: dict[str, float] = {}
            if batch.num_sequences:
                with timed(timings, "train"):
                    train_metrics = bare_train_step(model, optimizer, batch, cfg, temperature)
                with timed(timings, "weight_sync"):
                    with timed(timings, "weight_publish"):
                        state = model.state_dict()  # the full one: the tied lm_head too (FACTS.md)
                    with timed(timings, "weight_load"):
                        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state.items()),
                                                                     "is_checkpoint_format": True})
                        llm.reset_prefix_cache()  # cached KV blocks came from the old weights
            timings["step"] = time.perf_counter() - started
            rows.append({"step": step, **{f"time/{k}": v for k, v in timings.items()}, **train_metrics,
                         "batch/sequences": batch.num_sequences, **summarize_rollouts(scored)})
            print(f"bare: step {step}: " + ", ".join(f"{k} {v:.3f}s" for k, v in timings.items())
                  + f", {batch.num_sequences} sequences", flush=True)
    finally:
        scorer.close()
    return rows


def bare_train_step(model: Any, optimizer: Any, batch: Any, cfg: SRPOConfig, temperature: float) -> dict:
    """One optimizer step on the whole batch, micro-batch by micro-batch: the token-mean
    clipped loss over the batch's response tokens, grad clip, AdamW (algo.minibatches=1:
    old log-probs are the current ones detached, as in FSDPLearner)."""
    import torch

    from srpo_ray.algo.loss import count_denominator, policy_loss
    from srpo_ray.learner.batch import micro_batches
    from srpo_ray.learner.core import token_logprobs

    denominator = count_denominator(batch.response_mask, cfg.algo.loss_agg)
    optimizer.zero_grad(set_to_none=True)
    mismatch = tokens = 0.0
    for mb in micro_batches(batch, cfg.learner.micro_batch_size):
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits
        lp, entropy = token_logprobs(logits, mb.input_ids, mb.response_mask, temperature,
                                     with_entropy=cfg.algo.entropy_coef > 0, entropy_grad=True)
        loss, metrics = policy_loss(lp, lp.detach(), mb.advantages, mb.response_mask, cfg.algo,
                                    loss_denominator=denominator, rollout_logprobs=mb.rollout_logprobs,
                                    entropy=entropy)
        loss.backward()
        mismatch += metrics["logprob_mismatch"] * metrics["num_tokens"]
        tokens += metrics["num_tokens"]
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if torch.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"learner/response_tokens": tokens, "learner/logprob_mismatch": mismatch / max(tokens, 1.0),
            "learner/grad_norm": float(norm)}
