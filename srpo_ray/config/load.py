"""Loading and checking the configuration. YAML files in configs/ and `a.b=c`
command-line overrides merge onto the schema's dataclasses (srpo_ray/config/schema.py,
re-exported here) with OmegaConf; an unknown key or a value of the wrong type stops the
run with a message naming the key, and `validate` checks values that need each other.
On mappings an override replaces, empties or removes an entry (load_config); relative
input paths in a file are taken from its folder (resolve_file_paths).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from srpo_ray.config.schema import (
    BUILTIN_PREFIX,
    OFFPOLICY_SEQ_IS_MODES,
    TRACKERS,
    AlgoConfig,
    ClusterConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    LearnerConfig,
    MetricsConfig,
    ModelConfig,
    OffPolicyConfig,
    OptimConfig,
    ResampleConfig,
    RewardConfig,
    RolloutConfig,
    SRPOConfig,
    StageConfig,
    TrainerConfig,
    resolve_dtype,
)
from srpo_ray.host_heap import HEAP_POLICIES
from srpo_ray.records import domain_problem
from srpo_ray.rewards.plugins import check_plugins
from srpo_ray.weights.transport import resolve_for

__all__ = ["AlgoConfig", "ClusterConfig", "ConfigError", "DataConfig", "EvalConfig", "LearnerConfig", "MetricsConfig",
           "ModelConfig", "OptimConfig", "ResampleConfig", "RewardConfig", "RolloutConfig", "SRPOConfig",
           "StageConfig", "TrainerConfig", "load_config", "parse_cli", "resolve_dtype", "to_yaml", "validate"]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


def load_config(config_file: str | Path | None = None, overrides: list[str] = (), *,
                stored: bool = False) -> SRPOConfig:
    """Merge `config_file` (default: configs/default.yaml) and `a.b=c` overrides onto
    the schema and validate. Raises ConfigError naming the bad key.

    Relative input paths in the file (PATH_KEYS) are taken from the file's folder;
    those on the command line from the working folder. `stored`: the file is a config a
    run saved (a checkpoint's config.yaml): its paths were resolved when the run loaded
    them, so they are taken from the working folder, and keys this schema no longer
    has are dropped with a note instead of stopping the load.

    Overrides: `key=value` sets a key; on a mapping (e.g. reward.custom_functions)
    `key={...}` replaces it, `key={}` or `key=null` empties it, `key.entry=null` removes
    one entry; `~key.entry` removes an entry and `~key` empties a mapping (Hydra's form).
    An override that would change nothing is an error."""
    path = Path(config_file) if config_file else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config with a YAML "
                          f"file such as {CONFIG_DIR / 'tiny_test.yaml'}")
    schema = OmegaConf.structured(SRPOConfig)
    try:
        loaded = OmegaConf.load(path)
        if stored:
            _drop_unknown(loaded, schema, "", path)
        else:
            resolve_file_paths(loaded, path)
        merged = OmegaConf.merge(schema, loaded)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {_describe(e)}") from None
    for item in overrides:
        if item.startswith("~"):
            try:
                _delete(merged, item[1:].strip())
            except (OmegaConfBaseException, ValueError) as e:
                raise ConfigError(f"override {item!r}: {e}") from None
            continue
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value "
                              f"(e.g. trainer.total_steps=10), or ~key to remove a mapping's entry")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw  # not YAML (e.g. a regex): keep the text as given
        try:
            _update(merged, key.strip(), value, raw)
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item!r}: {_describe(e)}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"override {item!r}: {e}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"{path}: required key(s) {missing} not set; add them to the YAML or pass "
                          f"them on the command line, e.g. {missing[0]}=...")
    try:
        cfg: SRPOConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {_describe(e)}") from None
    validate(cfg)
    cfg.rollout.steps_ahead = max(cfg.rollout.steps_ahead, int(cfg.rollout.one_step_off))  # its old spelling
    return cfg


def _update(merged: Any, key: str, value: Any, raw: str) -> None:
    """Set one override. A text that YAML reads as a mapping or list ("Answer: 17", a
    regex with brackets) is kept as typed when the key holds a string. Mappings: see
    load_config (replace, empty, remove an entry); `{}` on a group of settings, which
    would change nothing, is an error."""
    parent_key, _, entry = key.rpartition(".")
    parent = OmegaConf.select(merged, parent_key, default=None) if parent_key else None
    if value is None and _is_map(parent):  # key.entry=null: remove the entry
        _delete(merged, key)
        return
    node = OmegaConf.select(merged, key, default=None)
    if _is_map(node) and (value is None or isinstance(value, dict)):
        try:
            OmegaConf.update(merged, key, value, merge=False)  # replace; null where it may be null
        except OmegaConfBaseException:
            if value is not None:
                raise
            OmegaConf.update(merged, key, {}, merge=False)  # null on a map that cannot be null: empty it
        return
    if value == {} and OmegaConf.is_dict(node):
        raise ValueError(f"{key} is a group of settings, and {{}} would change nothing; set its keys "
                         f"({key}.NAME=value)")
    try:
        OmegaConf.update(merged, key, value, merge=True)
    except OmegaConfBaseException:
        if isinstance(value, str) or not isinstance(value, (dict, list)):
            raise
        OmegaConf.update(merged, key, raw, merge=True)


def _is_map(node: Any) -> bool:
    """A mapping of free keys (reward.custom_functions, data.source_weights, ...), not a
    group of schema settings."""
    return isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict


def _delete(merged: Any, key: str) -> None:
    """`~key.entry` (or key.entry=null): remove a mapping's entry; `~key`: empty a mapping.
    ValueError when there is nothing to remove or `key` is a schema setting."""
    if not key or "=" in key:
        raise ValueError("write ~key or ~key.entry, without a value (e.g. ~reward.custom_functions.gsm8k)")
    node = OmegaConf.select(merged, key, default=None)
    if _is_map(node):
        OmegaConf.update(merged, key, {}, merge=False)
        return
    parent_key, _, entry = key.rpartition(".")
    parent = OmegaConf.select(merged, parent_key, default=None) if parent_key else None
    if not _is_map(parent):
        raise ValueError(f"{key} is a setting of the schema, not an entry of a mapping; it cannot be "
                         f"removed, set it instead ({key}=value)")
    if entry not in parent:
        raise ValueError(f"{parent_key} has no entry {entry!r} to remove (it has {sorted(parent.keys())})")
    del parent[entry]


# Input paths a config file may give relative to its own folder. Outputs (trainer.run_dir)
# stay relative to the working folder; `builtin:` names are not paths.
PATH_KEYS = ("model.path", "data.train_files", "data.pass_rates", "eval.files", "resample.seed_from",
             "reward.custom_function", "reward.custom_functions")


def resolve_file_paths(loaded: Any, config_file: Path) -> None:
    """Rewrite the relative input paths (PATH_KEYS) of a loaded config file against the
    file's folder, in place: the result is relative to the working folder when it lies
    inside it (so a run started from a checkout names the same files as before, and a
    `ray job submit --working-dir` run finds them on every node), else absolute. A
    plug-in file that is not there is an error naming the folder it was looked up in."""
    base = Path(os.path.abspath(config_file)).parent

    def fix(text: Any) -> Any:
        if not isinstance(text, str) or not text or text.startswith(BUILTIN_PREFIX):
            return text
        p = Path(text).expanduser()
        if p.is_absolute():
            return str(p)
        full = Path(os.path.normpath(base / p))
        try:
            return str(full.relative_to(Path.cwd()))
        except ValueError:
            return str(full)

    def fix_spec(key: str, text: Any) -> Any:
        if not isinstance(text, str) or not text:
            return text
        file, sep, name = text.rpartition(":")
        if not sep or not file:
            return text  # malformed: check_plugins names the key
        resolved = fix(file)
        if not Path(resolved).is_file():
            raise ConfigError(f"{config_file}: {key}={text}: {os.path.normpath(base / Path(file).expanduser())} "
                              f"does not exist (a relative path in a config file is taken from that file's "
                              f"folder, {base}; on the command line, from the working folder)")
        return f"{resolved}:{name}"

    for key in PATH_KEYS:
        value = OmegaConf.select(loaded, key, default=None)
        if value is None:
            continue
        if key == "reward.custom_function":
            OmegaConf.update(loaded, key, fix_spec(key, value), merge=False)
        elif key == "reward.custom_functions" and isinstance(value, DictConfig):
            for source in list(value.keys()):
                value[source] = fix_spec(f"{key}.{source}", value[source])
        elif isinstance(value, ListConfig):
            for i in range(len(value)):
                value[i] = fix(value[i])
        else:
            OmegaConf.update(loaded, key, fix(value), merge=False)


def _drop_unknown(loaded: Any, schema: Any, prefix: str, path: Path) -> None:
    """Remove from a stored config the keys this schema does not have (a run saved by an
    older version), printing a note naming them."""
    dropped = []

    def walk(node: Any, spec: Any, where: str) -> None:
        if not isinstance(node, DictConfig) or not isinstance(spec, DictConfig) or _is_map(spec):
            return
        known = set(spec.keys())  # (`in` is False for a key whose value is still missing)
        for key in list(node.keys()):
            if key not in known:
                dropped.append(f"{where}{key}")
                del node[key]
            elif isinstance(node[key], ListConfig) and key == "stages":
                for i, item in enumerate(node[key]):
                    walk(item, OmegaConf.structured(StageConfig), f"{where}{key}.{i}.")
            elif isinstance(node[key], DictConfig):
                walk(node[key], spec[key], f"{where}{key}.")

    walk(loaded, schema, prefix)
    if dropped:
        print(f"note: {path}: ignoring key(s) this version does not have: {', '.join(dropped)}", file=sys.stderr)


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    if "not in struct" in msg or ("Key '" in msg and "not in" in msg):
        return (f"unknown key {key!r}; check its spelling against srpo_ray/config/schema.py "
                "(rollout, reward: schema_rollout.py; algo: schema_algo.py)")
    if key:
        return f"key {key!r}: {msg}"
    return msg


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


def parse_cli(argv: list[str] | None = None) -> tuple[SRPOConfig, bool]:
    """`[--config FILE] [--resume] [--verbose] [key=value ...]` -> (config, resume);
    --verbose is metrics.verbose=true."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m srpo_ray.driver",
                                 description="Train a policy with SRPO on Ray.")
    ap.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in trainer.run_dir")
    ap.add_argument("--verbose", action="store_true",
                    help="every library's and actor's output on the console (default: in RUN_DIR/logs/)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.total_steps=10")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    overrides = args.overrides + (["metrics.verbose=true"] if args.verbose else [])
    return load_config(args.config, overrides), args.resume


def to_yaml(cfg: SRPOConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def as_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]
