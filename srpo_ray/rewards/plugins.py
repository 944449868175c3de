"""Reward plug-ins: a user's Python function scores rows in place of the built-in math
and code rewards, the way verl users already write them:

    def compute_score(data_source, solution_str, ground_truth, extra_info) -> float | dict

`reward.custom_function: path/to/file.py:name` scores every row; `reward.custom_functions:
{data_source: path:name}` scores one source's rows (it wins over custom_function). Rows
a plug-in scores may have any `ability` (srpo_ray/data/parquet.py). The function runs in a pool
of capped child processes (child_pool.py, _check_child.py), each importing every
configured file once at start: custom_timeout_s per call, RLIMIT_AS custom_memory_mb. A
call that times out, runs out of memory, raises, kills its process or returns anything
but a finite number or a dict with a numeric `score` scores 0 and is flagged (metrics
reward/custom_errors, reward/custom_timeouts); the next call runs in a fresh process if
needed. Processes a call starts end with it, whatever they do (_process_tree.py): a
process pool meant to outlive one call has to be started when the file is imported. Verdict for the ledger: correct = score >= custom_correct_threshold. Reward:
the score as it is, or 1/0 at custom_binarize when set. Answered (eval's answered_frac):
the dict's `answered` when it has one, else the response has a final answer by the
format rule (reward.format_pattern if set, else answer_forms.well_formed: one non-empty
\\boxed{} at the end, a code ability's one fenced block); a failed call is not answered.

A relative path written in a config file is resolved against that file's folder when
the config is loaded (srpo_ray/config/load.py resolve_file_paths); one given on the
command line, and what the loader hands on, is relative to the working directory of
the driver and of the reward workers (the same for a local run and for `ray job submit
--working-dir`); an absolute path must exist on every reward node.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from srpo_ray.config.schema import RewardConfig
from srpo_ray.records import Prompt, RewardResult
from srpo_ray.rewards.answer_forms import well_formed
from srpo_ray.rewards.child_pool import ChildPool, child_argv

CHILD_SCRIPT = Path(__file__).with_name("_check_child.py")
HARD_SLACK_S = 2.0


@dataclass(frozen=True)
class PluginSpec:
    key: str  # the config key that names it, e.g. reward.custom_functions.gsm8k
    path: str
    name: str


def configured_plugins(cfg: RewardConfig) -> list[PluginSpec]:
    """Every configured plug-in, custom_function first (if set), then per source."""
    specs = [parse_spec("reward.custom_function", cfg.custom_function)] if cfg.custom_function else []
    specs += [parse_spec(f"reward.custom_functions.{source}", text)
              for source, text in sorted(cfg.custom_functions.items())]
    return specs


def plugin_key(cfg: RewardConfig, data_source: str) -> str | None:
    """The config key of the plug-in that scores `data_source`'s rows, or None (built-in)."""
    if data_source in cfg.custom_functions:
        return f"reward.custom_functions.{data_source}"
    return "reward.custom_function" if cfg.custom_function else None


def parse_spec(key: str, text: str) -> PluginSpec:
    """`path/to/file.py:name` -> PluginSpec; ValueError naming `key` if malformed."""
    path, sep, name = str(text).rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise ValueError(f"{key}={text!r}: expected path/to/file.py:function_name")
    return PluginSpec(key, path, name)


def check_plugins(cfg: RewardConfig) -> None:
    """Start-up checks without running user code: each file exists, is Python, and binds
    the name at its top level. Raises ValueError naming the key and the fix."""
    for spec in configured_plugins(cfg):
        path = Path(spec.path).expanduser()
        where = f"{spec.key}={spec.path}:{spec.name}"
        if not path.is_file():
            how = "" if path.is_absolute() else (f" (a relative path on the command line is taken from the "
                                                 f"working folder, {Path.cwd()}; in a config file, from "
                                                 f"that file's folder)")
            raise ValueError(f"{where}: {path} does not exist{how}; give path/to/file.py:function_name")
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError) as e:
            raise ValueError(f"{where}: {path} is not valid Python ({e})") from None
        if not _binds_name(tree.body, spec.name):
            raise ValueError(f"{where}: {path} defines no top-level `{spec.name}`; name a function defined "
                             f"(or imported) in that file")
    _check_numbers(cfg)


def _binds_name(body: list[ast.stmt], name: str) -> bool:
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(a.name == "*" or (a.asname or a.name.split(".")[0]) == name for a in node.names):
                return True
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(n, ast.Name) and n.id == name for t in targets for n in ast.walk(t)):
                return True
        blocks = [getattr(node, f, []) for f in ("body", "orelse", "finalbody")] if isinstance(
            node, (ast.If, ast.Try, ast.With)) else []
        blocks += [h.body for h in getattr(node, "handlers", [])] if isinstance(node, ast.Try) else []
        if any(_binds_name(b, name) for b in blocks):
            return True
    return False


def _check_numbers(cfg: RewardConfig) -> None:
    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ValueError(f"reward.{key}={getattr(cfg, key)!r}: {why}")

    need(cfg.custom_timeout_s > 0, "custom_timeout_s", "must be > 0 seconds")
    need(cfg.custom_memory_mb >= 64, "custom_memory_mb", "must be >= 64 (Python itself needs ~30 MiB)")
    need(cfg.custom_processes >= 1, "custom_processes", "need at least 1")
    need(math.isfinite(cfg.custom_correct_threshold), "custom_correct_threshold", "must be a finite number")
    need(cfg.custom_binarize is None or math.isfinite(cfg.custom_binarize), "custom_binarize",
         "must be null (the score is the reward) or a finite threshold")


def check_plugins_load(cfg: RewardConfig) -> None:
    """Import every configured plug-in once in a capped child process, as a reward worker
    will (so a missing module is a start-up error naming the key, not a worker crash).
    Raises ValueError."""
    if not configured_plugins(cfg):
        return
    try:
        CustomRewardPool(dataclasses.replace(cfg, custom_processes=1)).close()
    except RuntimeError as e:
        raise ValueError(str(e)) from None


class CustomRewardPool:
    """Scores (prompt, response) pairs with the configured plug-ins. Construction starts
    custom_processes children, each importing every configured file (RuntimeError naming
    the key when one cannot be loaded). Call close() when done."""

    def __init__(self, cfg: RewardConfig) -> None:
        check_plugins(cfg)
        self.cfg = cfg
        self.specs = configured_plugins(cfg)
        self._index = {spec.key: i for i, spec in enumerate(self.specs)}
        specs_json = json.dumps([{"key": s.key, "path": s.path, "name": s.name} for s in self.specs])
        self._pool = ChildPool(
            child_argv(str(CHILD_SCRIPT), cfg.custom_memory_mb << 20, cfg.custom_timeout_s, "plugins", specs_json),
            cfg.custom_processes, deadline_s=cfg.custom_timeout_s + HARD_SLACK_S, label="reward plug-in",
            start_hint="fix the plug-in file, or raise reward.custom_memory_mb if importing it needs more memory")

    @property
    def restarts(self) -> int:
        return self._pool.restarts

    def score(self, calls: list[tuple[Prompt, str]]) -> list[RewardResult]:
        """One RewardResult per (prompt, response text); every prompt's source must have a
        plug-in. info: {"custom": True} plus "metrics" (the dict's other numbers),
        "error" or "timeout"."""
        requests = []
        for prompt, text in calls:
            key = plugin_key(self.cfg, prompt.data_source)
            if key is None:
                raise ValueError(f"prompt {prompt.prompt_id}: no reward plug-in for data_source "
                                 f"{prompt.data_source!r}")
            args = {"data_source": prompt.data_source, "solution_str": text,
                    "ground_truth": prompt.ground_truth, "extra_info": prompt.extra_info}
            requests.append({"fn": self._index[key], "args": args})  # sent as JSON (child_pool.py)
        results = [self._result(reply) for reply in self._pool.run(requests)]
        for (prompt, text), result in zip(calls, results):
            if "answered" not in result.info:
                result.info["answered"] = self._has_final_answer(prompt.domain, text)
        return results

    def _has_final_answer(self, domain: str, text: str) -> bool:
        """The format rule: reward.format_pattern when set, else answer_forms.well_formed."""
        if self.cfg.format_pattern:
            return re.search(self.cfg.format_pattern, text) is not None
        return well_formed(domain, text)

    def _result(self, reply: dict) -> RewardResult:
        score = reply.get("score")
        if reply.get("timeout"):
            return RewardResult(0.0, False, {"custom": True, "timeout": True, "answered": False})
        if "error" in reply or not isinstance(score, (int, float)) or not math.isfinite(score):
            return RewardResult(0.0, False, {"custom": True, "error": str(reply.get("error", "no score")),
                                             "answered": False})
        info: dict[str, Any] = {"custom": True}
        metrics = reply.get("metrics")
        if isinstance(metrics, dict):
            info["metrics"] = {str(k): float(v) for k, v in metrics.items()
                               if isinstance(v, (int, float)) and math.isfinite(v)}
            if isinstance(metrics.get("answered"), (bool, int, float)):
                info["answered"] = bool(metrics["answered"])  # the plug-in's own word
        score = float(score)
        threshold = self.cfg.custom_binarize
        reward = score if threshold is None else float(score >= threshold)
        if reward != score:
            info["score"] = score
        return RewardResult(reward, score >= self.cfg.custom_correct_threshold, info)

    def close(self) -> None:
        self._pool.close()
