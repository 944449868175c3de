"""`python -m srpo_ray.eval --model PATH --data FILE_OR_BUILTIN [--data ...] [key=value ...]`

Evaluates a model on held-out problems with the roles training uses: vLLM generation
workers (`rollout.num_workers` of them: more are faster) and reward workers (math
checker, code sandbox). PATH is a Hugging Face folder, a run's checkpoint
(`runs/x/checkpoints/step_N`, its `hf/` is used), a run folder (its latest checkpoint),
or `builtin:smollm2-135m-instruct`. Data: verl-layout parquet files (each row's
data_source is its benchmark) or bundled sets (`builtin:arithmetic_heldout`,
`builtin:humaneval`, `builtin:aime`, `builtin:champ`; the `builtin:` may be left out).
Sampling and scoring settings are the `eval.*` and `reward.*` config keys (eval.k,
eval.temperature, eval.pass_at, ...), over the checkpoint's own config when --model is a
checkpoint or run (its config.yaml: system prompt, answer modes, plug-ins, eval
settings as the run trained with them), else configs/default.yaml; --config replaces
it, overrides change it, and the config used is printed. Writes
OUT/results.json (scores, settings, every problem's samples) and OUT/results.md, and
prints the table. A bad input is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Optional

from srpo_ray.config.load import ConfigError, load_config
from srpo_ray.config.schema import BUILTIN_PREFIX
from srpo_ray.data.verl_rows import DataError
from srpo_ray.models import ModelPathError


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m srpo_ray.eval", description=__doc__.split("\n\n")[1])
    ap.add_argument("--model", required=True, help="HF folder, checkpoint folder, run folder or builtin:NAME")
    ap.add_argument("--data", action="append", required=True, help="parquet file or builtin set (repeatable)")
    ap.add_argument("--config", default=None, help="YAML config for rollout/reward/eval settings (default: "
                    "the checkpoint's own config.yaml, else configs/default.yaml)")
    ap.add_argument("--out", default="eval", help="folder for results.json and results.md (default: eval)")
    ap.add_argument("--verbose", action="store_true", help="library and worker output on the console "
                    "(else in OUT/logs/)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. eval.k=8 rollout.num_workers=2")
    args = ap.parse_args(argv)
    try:
        model = model_folder(args.model)
        config_file, stored = eval_config_file(args.config, model)
        cfg = load_config(config_file, args.overrides, stored=stored)
        cfg.model.path = model
        cfg.eval.files = [data_spec(d) for d in args.data]
        from srpo_ray.config.load import validate
        validate(cfg)
    except (ConfigError, DataError, ModelPathError) as e:
        print(f"srpo_ray.eval: error: {e}", file=sys.stderr)
        return 2
    used = f"{config_file} (the checkpoint's own; --config replaces it)" if stored else str(config_file)
    print(f"srpo_ray.eval: config {used}", flush=True)
    from srpo_ray.telemetry.console import console_logging

    with console_logging(args.out, verbose=args.verbose) as logs:
        try:
            report = run_eval(cfg, Path(args.out), logs, config_file=str(config_file))
        except (ConfigError, DataError, ModelPathError) as e:
            print(f"srpo_ray.eval: error: {e}", file=sys.stderr)
            return 2
    from srpo_ray.eval.report import markdown_table
    print(markdown_table(report))
    print(f"\n{report.samples} samples in {report.seconds:.1f} s; results in {Path(args.out) / 'results.json'}")
    return 0


def run_eval(cfg, out: Path, logs: Optional[Path] = None, config_file: Optional[str] = None):
    """Load model and data, start the workers, evaluate, write OUT/results.{json,md}
    (`config_file`, the config used, goes into their header)."""
    from tqdm import tqdm

    from srpo_ray.eval.report import write_report
    from srpo_ray.eval.runner import Evaluator
    from srpo_ray.runtime.build import build_eval_roles, longest_response, preflight

    checked = preflight(cfg, train=False)
    model_path, prompts = checked.model_path, checked.eval_prompts
    with build_eval_roles(cfg, model_path, str(logs) if logs else None) as (rollout, rewards):
        evaluator = Evaluator(cfg.eval, prompts, rollout, rewards, max_new_tokens=longest_response(cfg),
                              fetch_texts=partial(rollout.fetch, tokens=False))
        with tqdm(total=len(evaluator.prompts), desc="eval", unit="problem", file=sys.stderr) as bar:
            report = evaluator.run(progress=lambda done, total: bar.update(done - bar.n))
    header = {"model": cfg.model.path, "data": list(cfg.eval.files)}
    write_report(report, out, header={**header, "config": config_file} if config_file else header)
    return report


def eval_config_file(config: Optional[str], model: str) -> tuple[Path, bool]:
    """(the config file to evaluate with, whether it is a checkpoint's stored one): --config
    when given; else the config.yaml next to `model` when it is a checkpoint's hf/ folder
    (what model_folder returns for a checkpoint or run); else configs/default.yaml."""
    if config:
        return Path(config), False
    from srpo_ray.config.load import DEFAULT_CONFIG
    if not model.startswith(BUILTIN_PREFIX):
        hf = Path(model).expanduser()
        if hf.name == "hf" and (hf.parent / "config.yaml").is_file():
            return hf.parent / "config.yaml", True
    return DEFAULT_CONFIG, False


def model_folder(spec: str) -> str:
    """A checkpoint folder -> its hf/; a run folder -> its latest checkpoint's hf/;
    anything else as given (checked when the model is resolved)."""
    if spec.startswith(BUILTIN_PREFIX):
        return spec
    path = Path(spec).expanduser()
    if (path / "hf").is_dir():
        return str(path / "hf")
    if (path / "checkpoints").is_dir():
        from srpo_ray.loop.checkpoint import CheckpointManager
        latest = CheckpointManager(path).latest()
        if latest is None:
            raise ModelPathError(f"--model {spec}: a run folder without a finished checkpoint; "
                                 f"give a checkpoint or a Hugging Face model folder")
        return str(latest / "hf")
    return spec


def data_spec(spec: str) -> str:
    """A file path as given; a bare builtin set name gets its `builtin:` prefix."""
    from srpo_ray.data.registry import builtin_names
    if not spec.startswith(BUILTIN_PREFIX) and not Path(spec).exists() and spec in builtin_names():
        return BUILTIN_PREFIX + spec
    return spec


if __name__ == "__main__":
    sys.exit(main())
