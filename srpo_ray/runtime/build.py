"""Join or start Ray, create the role actors where the placement plan puts them, and
assemble the trainer (`build_trainer`, what the driver runs)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator

import ray
from transformers import AutoTokenizer

from actors.ray_ops import HOT_PATH_NICENESS
from srpo_ray.algo.source_mix import check_source_weights
from srpo_ray.algo.stages import effective_sampling
from srpo_ray.config.schema import ConfigError, SRPOConfig
from srpo_ray.data.parquet import DataError, check_prompt_lengths, load_prompts
from srpo_ray.data.pass_rates import keep_in_band, outcomes_for, read_outcomes, read_pass_rates
from srpo_ray.eval.runner import Evaluator
from srpo_ray.loop.checkpoint import CheckpointManager
from srpo_ray.loop.trainer import Roles, SRPOTrainer
from srpo_ray.models import resolve_model_path
from srpo_ray.rewards.plugins import check_plugins_load, plugin_key
from srpo_ray.rewards.scorer import check_answer_modes
from srpo_ray.runtime.deadlines import generation_chunk_seconds, reward_chunk_seconds
from srpo_ray.runtime.fleets import RayRewardFleet, RayRolloutFleet, WorkerPool
from srpo_ray.telemetry.console import log_dir, with_actor_log
from srpo_ray.telemetry.metrics import MetricsLogger
from srpo_ray.telemetry.trackers import check_clients, make_trackers

log = logging.getLogger(__name__)


def init_ray(cfg: SRPOConfig, roles: tuple[str, ...] | None = None, quiet: bool = False) -> bool:
    """Join the configured cluster (or the one a `ray job submit` runs us in); else start
    a local one bound to 127.0.0.1. Returns True if this process started Ray.
    quiet: the actors write their output to the run dir (srpo_ray/telemetry/console.py), so none is
    forwarded to this process, and Ray's log lines go through our handlers."""
    if ray.is_initialized():
        return False
    output = {"log_to_driver": not quiet, "configure_logging": not quiet}
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **output)
        return False
    from cluster.placement import ROLES, local_custom_resources, local_num_cpus_needed
    roles = roles or ROLES
    warn_if_async_shares_cores(cfg)
    # address="local": a new Ray even when another `ray start` cluster runs on this machine
    # (ray.init would join that one, and refuse num_cpus)
    ray.init(address="local", num_cpus=cfg.cluster.local_num_cpus or local_num_cpus_needed(cfg, roles),
             resources=local_custom_resources(cfg, roles), include_dashboard=False,
             _node_ip_address="127.0.0.1", **output)
    return True


def warn_if_async_shares_cores(cfg: SRPOConfig) -> None:
    """rollout.steps_ahead > 0 runs generation while the learner trains; on one machine's
    CPUs, asked for more cores than it has, the two slow each other down (the default run
    at steps_ahead=2 on 2 cores: training 2-4x slower, README's Speed section)."""
    if cfg.rollout.steps_ahead <= 0 or cfg.rollout.gpus_per_worker > 0 or cfg.learner.gpus_per_rank > 0:
        return
    asked = (cfg.rollout.num_workers * cfg.rollout.cpus_per_worker
             + cfg.learner.num_ranks * cfg.learner.cpus_per_rank)
    cores = os.cpu_count() or 1
    if asked > cores:
        log.warning("rollout.steps_ahead=%d generates while the learner trains, but generation (%g CPUs) and "
                    "the learner (%g CPUs) share this machine's %d cores: each slows the other. Give each its "
                    "own cores (rollout.cpus_per_worker, learner.cpus_per_rank) or set rollout.steps_ahead=0.",
                    cfg.rollout.steps_ahead, cfg.rollout.num_workers * cfg.rollout.cpus_per_worker,
                    cfg.learner.num_ranks * cfg.learner.cpus_per_rank, cores)


def check_stage_data(cfg: SRPOConfig, prompts: list) -> None:
    check_source_weights(cfg, prompts)  # also in the trainer; here it fails before Ray starts
    have = {p.domain for p in prompts}
    for i, stage in enumerate(cfg.stages):
        missing = [d for d in stage.domains if d not in have]
        if missing:
            raise DataError(f"stages.{i} ({stage.name}) trains on {missing} but data.train_files "
                            f"{list(cfg.data.train_files)} has no such rows (its domains: {sorted(have)}); "
                            f"add data or change the stage's domains")


def check_reward_plugins(cfg: SRPOConfig) -> None:
    """Reward plug-ins import (once, in a capped child) before anything starts."""
    try:
        check_plugins_load(cfg.reward)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def scored_by_plugin(cfg: SRPOConfig):
    """data_source -> True when a reward plug-in scores its rows (what load_prompts needs)."""
    return lambda source: plugin_key(cfg.reward, source) is not None


def load_eval_prompts(cfg: SRPOConfig, train_prompts: list) -> list:
    """eval.files as prompts (system prompt applied as in training), checked against the
    answer modes; a warning when some also appear in the training data."""
    prompts = load_prompts(cfg.eval.files, system_prompt=cfg.data.system_prompt,
                           scored_by_plugin=scored_by_plugin(cfg)) if cfg.eval.files else []
    try:
        check_answer_modes(cfg.reward, train_prompts + prompts)
    except ValueError as e:
        raise DataError(str(e)) from None
    seen = {json.dumps(p.messages) for p in train_prompts}
    overlap = sum(json.dumps(p.messages) in seen for p in prompts)
    if overlap:
        log.warning("%d of %d evaluation problems also appear in data.train_files: their scores are not "
                    "held-out", overlap, len(prompts))
    return prompts


def longest_response(cfg: SRPOConfig) -> int:
    """The largest max_new_tokens of any training stage (evaluation's default cap)."""
    return max(effective_sampling(cfg.rollout, st).max_new_tokens for st in cfg.stages)


@dataclasses.dataclass
class Preflight:
    """What the start-up checks loaded: the resolved model folder, its tokenizer, the
    training prompts (none for an evaluation alone) and the evaluation prompts."""
    model_path: str
    tokenizer: Any
    prompts: list
    eval_prompts: list


def preflight(cfg: SRPOConfig, train: bool = True) -> Preflight:
    """The checks a run (`build_trainer`) and `python -m srpo_ray.eval` make before
    anything slow starts: reward plug-ins import, the model resolves, every data file
    loads (data.train_files unless `train` is False, and eval.files), the stages find
    their domains, every answer has a checker, every prompt fits data.max_prompt_tokens.
    Raises ConfigError, DataError or ModelPathError naming what to fix."""
    check_reward_plugins(cfg)
    model_path = resolve_model_path(cfg.model)
    prompts = []
    if train:
        prompts = load_prompts(cfg.data.train_files, system_prompt=cfg.data.system_prompt,
                               scored_by_plugin=scored_by_plugin(cfg))
        if cfg.data.pass_rate_band:  # the difficulty pre-pass's filter
            kept = keep_in_band(prompts, read_pass_rates(cfg.data.pass_rates), cfg.data.pass_rate_band)
            log.info("data.pass_rate_band=%s keeps %d of %d training prompts", list(cfg.data.pass_rate_band),
                     len(kept), len(prompts))
            prompts = kept
        check_stage_data(cfg, prompts)
        if cfg.resample.seed_from:  # the trainer reads it again at its start: a bad file stops us here
            outcomes_for(prompts, read_outcomes(cfg.resample.seed_from))
    eval_prompts = load_eval_prompts(cfg, prompts)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    check_prompt_lengths(tokenizer, prompts + eval_prompts, cfg.data.max_prompt_tokens)
    return Preflight(model_path, tokenizer, prompts, eval_prompts)


@contextmanager
def build_trainer(cfg: SRPOConfig, resume: bool = False) -> Iterator[SRPOTrainer]:
    """Everything a run needs, torn down (actors, placement groups, a local Ray) after.
    resume: the trackers continue the run dir's W&B / MLflow runs (the caller resumes
    the trainer itself)."""
    check_clients(cfg)  # a missing tracker client stops the run before anything slow
    checked = preflight(cfg)
    model_path, prompts, eval_prompts, tokenizer = (checked.model_path, checked.prompts, checked.eval_prompts,
                                                    checked.tokenizer)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trackers = make_trackers(cfg, resume=resume)  # a tracker that cannot start stops the run before Ray
    started_ray = False
    placement = None
    metrics = None
    roles = None
    failed = False
    try:
        started_ray = init_ray(cfg, quiet=not cfg.metrics.verbose)
        from cluster.placement import plan_placement
        from cluster.ray_placement import create_placement_groups
        placement = create_placement_groups(plan_placement(cfg), timeout_s=cfg.cluster.placement_timeout_s)
        roles = _create_roles(cfg, model_path, placement)
        metrics = MetricsLogger(cfg.trainer.run_dir, cfg.trainer.total_steps, progress_bar=cfg.metrics.progress_bar,
                                trackers=trackers)
        checkpoints = CheckpointManager(cfg.trainer.run_dir, keep=cfg.trainer.keep_checkpoints)
        roles.learner.last_checkpoint = checkpoints.latest  # named when a learner rank dies
        evaluator = Evaluator(cfg.eval, eval_prompts, roles.rollout, roles.rewards,
                              max_new_tokens=longest_response(cfg),
                              fetch_texts=partial(roles.rollout.fetch, tokens=False)) if eval_prompts else None
        yield SRPOTrainer(cfg, prompts, roles, int(pad_token_id), metrics, checkpoints, evaluator)
    except BaseException:
        failed = True
        raise
    finally:
        if metrics is not None:
            metrics.close(failed=failed)
        else:
            for tracker in trackers:
                tracker.close(failed=True)
        if roles is not None:
            roles.learner.close_weights()
        if placement is not None:
            placement.remove()
        if started_ray:
            ray.shutdown()


def _create_roles(cfg: SRPOConfig, model_path: str, placement) -> Roles:
    from srpo_ray.runtime.learner_group import create_learner_group

    logs = actor_logs(cfg)
    learner = create_learner_group(cfg, model_path, setup=False, actor_options=lambda r: with_actor_log(
        placement.actor_options("learner", r), logs, "learner", r))
    learner.log_dir = logs  # named when a rank dies
    shares_gpus = cfg.cluster.colocate and cfg.rollout.gpus_per_worker > 0
    if shares_gpus:  # vLLM sizes its KV cache from the GPU memory it measures at start:
        learner.setup()  # the learner's weights must be there by then, not arrive during it
    rollout, rewards = _create_fleets(cfg, model_path, placement, logs=logs)
    if not shares_gpus:
        learner.setup()  # meanwhile the generators start
    return Roles(rollout=rollout, rewards=rewards, learner=learner, fetch=rollout.fetch)


@contextmanager
def build_eval_roles(cfg: SRPOConfig, model_path: str,
                     logs: str | None = None) -> Iterator[tuple[RayRolloutFleet, RayRewardFleet]]:
    """Generation and reward workers only (what evaluation needs), torn down after.
    logs: the actors' log dir (None: their output goes where Ray sends it)."""
    from cluster.placement import REWARD, ROLLOUT, plan_placement
    from cluster.ray_placement import create_placement_groups

    started_ray = init_ray(cfg, roles=(ROLLOUT, REWARD), quiet=logs is not None)
    placement = None
    try:
        placement = create_placement_groups(plan_placement(cfg, roles=(ROLLOUT, REWARD)),
                                            timeout_s=cfg.cluster.placement_timeout_s)
        rollout, rewards = _create_fleets(cfg, model_path, placement, control_dir=None, logs=logs)
        # Every worker up (vLLM loaded and warmed) before evaluation starts, so its clock
        # and progress bar measure evaluation, not start-up.
        for pool in (rollout.pool, rewards.pool):
            pool.wait_ready()
        yield rollout, rewards
    finally:
        if placement is not None:
            placement.remove()
        if started_ray:
            ray.shutdown()


def actor_logs(cfg: SRPOConfig) -> str | None:
    """Where the actors' output goes: <run_dir>/logs/, or None (metrics.verbose: where
    Ray sends it, forwarded to the console)."""
    return None if cfg.metrics.verbose else str(log_dir(cfg.trainer.run_dir))


def generator_options(cfg: SRPOConfig) -> dict:
    """What a generation worker's engine needs besides the rollout config: vLLM's own
    weight-transfer engine where the resolved transport asks for one, and sleep mode when
    it shares GPUs with the learner (srpo_ray/weights/transport.py, cluster/GPU.md)."""
    from srpo_ray.weights.transport import resolve_for, vllm_weight_transfer

    on_gpu = cfg.rollout.gpus_per_worker > 0
    return {"weight_transfer": vllm_weight_transfer(resolve_for(cfg)),
            "sleep_mode": bool(on_gpu and cfg.cluster.colocate and cfg.rollout.sleep_while_training
                               and not (cfg.rollout.one_step_off or cfg.rollout.steps_ahead > 0))}


def _create_fleets(cfg: SRPOConfig, model_path: str, placement, control_dir: str | None = "",
                   logs: str | None = None) -> tuple[RayRolloutFleet, RayRewardFleet]:
    """The generation and reward fleets. control_dir: where scale requests are read
    ("" = the run dir, None = nowhere); logs: the actors' log dir (None: Ray's)."""
    from actors.generation import GenerationWorker
    from actors.reward import RewardWorker
    from srpo_ray.generation.engine_setup import engine_env
    from srpo_ray.runtime.fault_hooks import actor_class

    GenerationWorker = actor_class("GenerationWorker", GenerationWorker)  # the seam fault tests use
    RewardWorker = actor_class("RewardWorker", RewardWorker)

    gen_env = {**engine_env(cfg.rollout), **HOT_PATH_NICENESS}
    gen_kwargs = generator_options(cfg)

    rollout_cfg = dataclasses.replace(cfg.rollout, max_model_len=cfg.rollout.max_model_len or (
        cfg.data.max_prompt_tokens + max(longest_response(cfg), cfg.eval.max_new_tokens)))

    def rollout_options(i: int) -> dict:
        if i < placement.num_actors("rollout"):
            return placement.actor_options("rollout", i)
        # Workers added while the run goes (srpo_ray.scale) live outside the placement
        # group: plain resources, plus the rollout pool's label if there is one.
        label = cfg.cluster.rollout_node_label
        return {"num_cpus": cfg.rollout.cpus_per_worker, "num_gpus": cfg.rollout.gpus_per_worker,
                "resources": {label: 0.001} if label else {}}

    def new_generator(i: int):
        options = with_actor_log({**rollout_options(i), "runtime_env": {"env_vars": gen_env}}, logs, "generation", i)
        return GenerationWorker.options(**options).remote(
            model_path, rollout_cfg, cfg.model.dtype, cfg.data.max_prompt_tokens, i, **gen_kwargs)

    def new_scorer(i: int):
        options = {**placement.actor_options("reward", i), "runtime_env": {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}}
        return RewardWorker.options(**with_actor_log(options, logs, "reward", i)).remote(cfg.reward)

    # a worker that stops answering (not only one that dies) is replaced: deadlines.py
    rollout = RayRolloutFleet(WorkerPool("generation", new_generator, cfg.rollout.num_workers, log_dir=logs,
                                         chunk_seconds=generation_chunk_seconds(cfg)),
                              max_staleness=cfg.rollout.max_staleness, sleep=gen_kwargs["sleep_mode"],
                              partial=cfg.rollout.partial_rollouts,
                              control_dir=cfg.trainer.run_dir if control_dir == "" else control_dir)
    rewards = RayRewardFleet(WorkerPool("reward", new_scorer, cfg.reward.num_workers, log_dir=logs,
                                        chunk_seconds=reward_chunk_seconds(cfg)))
    return rollout, rewards
