"""Checks of a merged configuration that types alone cannot express: values that need
each other, ranges, files that must exist. Each error is a ConfigError naming the key
and the fix. Called by srpo_ray/config/load.py (which re-exports `validate`) on every
load.
"""
from __future__ import annotations

from typing import Callable

from srpo_ray.config.schema import (
    OFFPOLICY_SEQ_IS_MODES,
    TRACKERS,
    ConfigError,
    EvalConfig,
    OffPolicyConfig,
    SRPOConfig,
)
from srpo_ray.host_heap import HEAP_POLICIES
from srpo_ray.records import domain_problem
from srpo_ray.rewards.plugins import check_plugins
from srpo_ray.weights.transport import resolve_for

DTYPES = ("auto", "float32", "bfloat16")



def validate(cfg: SRPOConfig) -> None:
    """Checks that types alone cannot express; each error names the key."""
    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {why}")

    need(cfg.rollout.n >= 2, "rollout.n", "group-relative advantages need at least 2 samples per prompt")
    need(cfg.rollout.num_workers >= 1, "rollout.num_workers", "need at least one generation worker")
    need(cfg.reward.num_workers >= 1, "reward.num_workers", "need at least one reward worker")
    need(cfg.learner.num_ranks >= 1, "learner.num_ranks", "need at least one learner rank")
    need(cfg.rollout.temperature > 0, "rollout.temperature", "must be > 0 (sampling, not greedy)")
    need(cfg.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    try:
        resolve_for(cfg)  # names the key and the fix (srpo_ray/weights/transport.py)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    need(cfg.rollout.weight_bucket_mb > 0, "rollout.weight_bucket_mb", "must be > 0 (MiB per weight bucket)")
    need(cfg.rollout.max_staleness >= 0, "rollout.max_staleness", "must be >= 0 (0 = on-policy)")
    for key, seconds in (("rollout.hung_after_s", cfg.rollout.hung_after_s),
                         ("rollout.hung_after_s_per_token", cfg.rollout.hung_after_s_per_token),
                         ("reward.hung_after_s", cfg.reward.hung_after_s),
                         ("reward.hung_after_s_per_response", cfg.reward.hung_after_s_per_response or 0.0)):
        need(seconds >= 0, key, "must be >= 0 seconds (rollout/reward.hung_after_s 0: no deadline)")
    need(cfg.trainer.preempt_grace_s > 0, "trainer.preempt_grace_s", "must be > 0 seconds")
    need(not cfg.rollout.one_step_off or cfg.rollout.max_staleness >= 1, "rollout.one_step_off",
         "trains on rollouts one weight version old: set rollout.max_staleness >= 1 too")
    need(not cfg.rollout.one_step_off or cfg.rollout.steps_ahead in (0, 1), "rollout.one_step_off",
         f"is rollout.steps_ahead=1, but rollout.steps_ahead={cfg.rollout.steps_ahead} is set too: keep one")
    need(cfg.rollout.steps_ahead >= 0, "rollout.steps_ahead", "must be >= 0 (0 = synchronous)")
    band = cfg.data.pass_rate_band
    need(not band or (len(band) == 2 and 0 <= band[0] <= band[1] <= 1), "data.pass_rate_band",
         f"is {list(band)}: give [low, high] with 0 <= low <= high <= 1, e.g. [0.01, 0.99], or [] for no filter")
    need(not band or bool(cfg.data.pass_rates), "data.pass_rate_band",
         "filters by the pass rates of data.pass_rates, which is not set: write one with "
         "`python -m srpo_ray.difficulty` and set data.pass_rates=FILE")
    need(not cfg.rollout.partial_rollouts or cfg.rollout.steps_ahead >= 1, "rollout.partial_rollouts",
         "pauses a collection that runs while the learner trains, and synchronous training (steps_ahead=0) "
         "runs none: set rollout.steps_ahead >= 1 too, or drop partial_rollouts")
    need(cfg.rollout.steps_ahead <= cfg.rollout.max_staleness, "rollout.steps_ahead",
         f"trains on rollouts up to {cfg.rollout.steps_ahead} weight versions old: set "
         f"rollout.max_staleness >= {cfg.rollout.steps_ahead} too")
    need(0 <= cfg.algo.eps_low < 1, "algo.eps_low", "must be in [0, 1)")
    need(cfg.algo.eps_high >= 0, "algo.eps_high", "must be >= 0")
    need(cfg.algo.loss_agg in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"),
         "algo.loss_agg", "must be token-mean, seq-mean-token-sum or seq-mean-token-mean")
    need(cfg.algo.overlong in ("truncate", "filter", "penalty"), "algo.overlong",
         "must be truncate, filter or penalty")
    need(cfg.algo.minibatches >= 1, "algo.minibatches", "must be >= 1")
    need(cfg.algo.dynamic_sampling_max_rounds >= 1, "algo.dynamic_sampling_max_rounds", "must be >= 1")
    need(cfg.algo.kl_coef >= 0, "algo.kl_coef", "must be >= 0 (0 = no KL term, as in SRPO)")
    need(cfg.algo.tis_cap >= 0, "algo.tis_cap", "must be >= 0 (0 = no token-level importance sampling)")
    _validate_offpolicy(cfg.algo.offpolicy, need)
    need(len(cfg.optim.betas) == 2, "optim.betas", "must be two numbers, e.g. [0.9, 0.95]")
    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(cfg.optim.eps > 0, "optim.eps", "must be > 0 (AdamW divides by sqrt(v) + eps)")
    need(cfg.learner.micro_batch_size >= 1, "learner.micro_batch_size", "must be >= 1")
    need(cfg.learner.max_tokens_per_micro_batch >= 0, "learner.max_tokens_per_micro_batch",
         "must be >= 0 (0 = no token cap)")
    need(cfg.learner.backend in ("auto", "nccl", "gloo"), "learner.backend", "must be auto, nccl or gloo")
    for role in ("learner", "rollout"):
        heap = getattr(cfg, role).host_heap
        need(heap in HEAP_POLICIES, f"{role}.host_heap", f"must be {', '.join(HEAP_POLICIES)}, not {heap!r}")
    need(cfg.model.dtype != "float16", "model.dtype", "float16 is refused: the learner has no loss scaling, so "
         "small gradients would underflow to zero without a warning; use bfloat16 (or auto)")
    need(cfg.model.dtype in DTYPES, "model.dtype", f"{cfg.model.dtype!r}: must be one of {', '.join(DTYPES)}")
    need(cfg.learner.backend != "nccl" or cfg.learner.gpus_per_rank > 0, "learner.backend",
         "nccl needs GPUs: set learner.gpus_per_rank > 0, or learner.backend=gloo (or auto) on CPU")
    need(cfg.learner.backend != "gloo" or cfg.learner.gpus_per_rank == 0, "learner.backend",
         "gloo with learner.gpus_per_rank > 0 would train on the CPU; use learner.backend=auto (nccl)")
    need(cfg.rollout.gpu_kv_cache_memory_bytes >= 0, "rollout.gpu_kv_cache_memory_bytes",
         "must be >= 0 (0 = from gpu_memory_utilization)")
    modes = ("verify", "number")
    need(cfg.reward.math_answer_mode in modes, "reward.math_answer_mode", f"must be one of {modes}")
    for source, mode in cfg.reward.math_answer_modes.items():
        need(mode in modes, f"reward.math_answer_modes.{source}", f"{mode!r}: must be one of {modes}")
    need(cfg.reward.sandbox in ("bubblewrap", "nsjail", "UNSAFE_no_sandbox"), "reward.sandbox",
         "must be bubblewrap, nsjail or UNSAFE_no_sandbox")
    try:
        check_plugins(cfg.reward)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    validate_eval(cfg.eval)
    bad = [t for t in cfg.metrics.trackers if t not in TRACKERS]
    need(not bad, "metrics.trackers", f"unknown tracker(s) {bad}; choose from {list(TRACKERS)}")
    need("jsonl" in cfg.metrics.trackers, "metrics.trackers",
         "must include jsonl (metrics.jsonl feeds the plot and the run summary), e.g. [jsonl, wandb]")
    need(len(set(cfg.metrics.trackers)) == len(cfg.metrics.trackers), "metrics.trackers", "lists a tracker twice")
    need(cfg.metrics.wandb_mode in ("", "online", "offline"), "metrics.wandb_mode",
         "must be online, offline or empty (W&B decides: WANDB_MODE, else online)")
    need(cfg.metrics.rollouts_per_step >= 0, "metrics.rollouts_per_step", "must be >= 0 (0 = none)")
    need(cfg.trainer.total_steps >= 1, "trainer.total_steps", "must be >= 1")
    need(cfg.trainer.prompts_per_step >= 1, "trainer.prompts_per_step", "must be >= 1")
    need(len(cfg.stages) >= 1, "stages", "need at least one stage")
    from srpo_ray.algo.source_mix import check_weight_values  # it imports this module
    check_weight_values("data.source_weights", cfg.data.source_weights)
    for i, st in enumerate(cfg.stages):
        if st.source_weights is not None:
            check_weight_values(f"stages.{i}.source_weights", st.source_weights)
    for i, st in enumerate(cfg.stages):
        key = f"stages.{i}"
        bad = {d: domain_problem(d) for d in st.domains if domain_problem(d)}
        need(not bad, f"{key}.domains", f"bad domain name(s) {bad}; a domain is math, code, or the `ability` "
             f"of rows a reward plug-in scores")
        need(bool(st.domains), f"{key}.domains", "must name at least one domain")
        need((st.until_metric is None) == (st.until_threshold is None), f"{key}.until_metric",
             "until_metric and until_threshold go together")
        last = i == len(cfg.stages) - 1
        has_rule = st.until_steps or st.until_epochs or st.until_metric
        need(last or has_rule, key, "every stage but the last needs a switch rule "
             "(until_steps, until_epochs or until_metric + until_threshold)")
        if st.temperature is not None:
            need(st.temperature > 0, f"{key}.temperature", "must be > 0")


def _validate_offpolicy(off: OffPolicyConfig, need: Callable[[bool, str, str], None]) -> None:
    """algo.offpolicy: a known seq_is mode, positive caps, 0 < low < high for each mask
    (ratios are compared on the log scale)."""
    key = "algo.offpolicy"
    need(off.seq_is in OFFPOLICY_SEQ_IS_MODES, f"{key}.seq_is",
         f"{off.seq_is!r} is unknown; use one of {', '.join(OFFPOLICY_SEQ_IS_MODES)}")
    need(off.seq_is_cap > 0, f"{key}.seq_is_cap", f"{off.seq_is_cap}: must be > 0 (the cap on w_seq)")
    for name in ("seq_is", "token_mask", "geo_mask"):
        low, high = getattr(off, f"{name}_low"), getattr(off, f"{name}_high")
        need(0 < low < high, f"{key}.{name}_low",
             f"[{name}_low, {name}_high] = [{low}, {high}]: need 0 < low < high, e.g. "
             f"{key}.{name}_low=0.5 {key}.{name}_high=2.0")


def validate_eval(ev: EvalConfig) -> None:
    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"eval.{key}: {why}")

    need(ev.k >= 1, "k", f"{ev.k}: need at least 1 sample per problem")
    bad = [K for K in ev.pass_at if not 1 <= K <= ev.k]
    need(not bad, "pass_at", f"{bad}: every K of pass@K must be between 1 and eval.k={ev.k}")
    need(ev.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)")
    need(0 < ev.top_p <= 1, "top_p", "must be in (0, 1]")
    need(ev.max_new_tokens >= 0, "max_new_tokens", "must be >= 0 (0 = the training stages' largest)")
    need(ev.every_steps >= 0, "every_steps", "must be >= 0 (0 = only at_start / at_end)")
    need(ev.max_problems_per_source >= 0, "max_problems_per_source", "must be >= 0 (0 = all)")
    need(ev.batch_prompts >= 1, "batch_prompts", "must be >= 1")
