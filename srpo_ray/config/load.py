"""Loading and checking the configuration. YAML files in configs/ and `a.b=c`
command-line overrides merge onto the schema's dataclasses (srpo_ray/config/schema.py,
re-exported here) with OmegaConf; an unknown key or a value of the wrong type stops the
run with a message naming the key, and `validate` (srpo_ray/config/validate.py, re-exported
here) checks values that need each other.
On mappings an override replaces, empties or removes an entry (load_config); relative
input paths in a file are taken from its folder (resolve_file_paths).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from srpo_ray.config.schema import (
    BUILTIN_PREFIX,
    AlgoConfig,
    ClusterConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    LearnerConfig,
    MetricsConfig,
    ModelConfig,
    OptimConfig,
    ResampleConfig,
    RewardConfig,
    RolloutConfig,
    SRPOConfig,
    StageConfig,
    TrainerConfig,
    resolve_dtype,
)
from srpo_ray.config.validate import validate

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
