"""`python -m srpo_ray.difficulty --model PATH [--data FILE ...] [--k 16] [--out FILE] [key=value ...]`

A difficulty pre-pass: samples every training prompt k times with the training
sampling settings (rollout.temperature, top_p, max_new_tokens) on the roles evaluation
uses (vLLM generation workers, the math checker and code sandbox), and writes each
prompt's pass rate to a parquet file (prompt_id, data_source, k, correct, pass_rate;
written whole or not at all). Data: verl-layout parquet files or bundled sets (default:
the config's data.train_files); prompt ids are those training uses. Then
`data.pass_rates=FILE data.pass_rate_band=[low,high]` trains on the prompts whose pass
rate lies in the band (e.g. [0.01, 0.99] drops the always- and never-solved). Model and
config are read as `python -m srpo_ray.eval` reads them. Prints a histogram of the
pass rates. A bad input is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from srpo_ray.config.load import ConfigError, load_config
from srpo_ray.data.verl_rows import DataError
from srpo_ray.models import ModelPathError

if TYPE_CHECKING:
    import pyarrow as pa

    from srpo_ray.config.schema import SRPOConfig
    from srpo_ray.eval.runner import EvalReport

COLUMNS = ("prompt_id", "data_source", "k", "correct", "pass_rate")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m srpo_ray.difficulty", description=__doc__.split("\n\n")[1])
    ap.add_argument("--model", default=None, help="HF folder, checkpoint, run folder or builtin:NAME "
                    "(default: the config's model.path)")
    ap.add_argument("--data", action="append", default=None,
                    help="parquet file or builtin set (repeatable; default: the config's data.train_files)")
    ap.add_argument("--k", type=int, default=16, help="samples per prompt (default 16)")
    ap.add_argument("--config", default=None, help="YAML config (default: the checkpoint's own, else "
                    "configs/default.yaml)")
    ap.add_argument("--out", default="pass_rates.parquet", help="the pass-rate file to write")
    ap.add_argument("--verbose", action="store_true", help="library and worker output on the console")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rollout.num_workers=2")
    args = ap.parse_args(argv)
    from srpo_ray.eval.__main__ import data_spec, eval_config_file, model_folder
    try:
        if args.k < 1:
            raise ConfigError(f"--k {args.k}: sample each prompt at least once (16 is a good default)")
        model = model_folder(args.model) if args.model else None
        config_file, stored = eval_config_file(args.config, model or "")
        cfg = load_config(config_file, args.overrides, stored=stored)
        if model:
            cfg.model.path = model
        files = [data_spec(d) for d in args.data] if args.data else list(cfg.data.train_files)
        prepass_settings(cfg, files, args.k)
    except (ConfigError, DataError, ModelPathError) as e:
        print(f"srpo_ray.difficulty: error: {e}", file=sys.stderr)
        return 2
    from srpo_ray.eval.__main__ import run_eval
    from srpo_ray.telemetry.console import console_logging

    out = Path(args.out)
    with console_logging(out.parent / f"{out.stem}_logs", verbose=args.verbose) as logs:
        try:
            report = run_eval(cfg, out.parent / f"{out.stem}_samples", logs, config_file=str(config_file))
        except (ConfigError, DataError, ModelPathError) as e:
            print(f"srpo_ray.difficulty: error: {e}", file=sys.stderr)
            return 2
    table = pass_rate_table(report)
    write_pass_rates(table, out)
    print(histogram(table.column("pass_rate").to_pylist(), args.k))
    print(f"\n{table.num_rows} prompts x {args.k} samples in {report.seconds:.1f} s; pass rates in {out} "
          f"(every sample in {out.parent / (out.stem + '_samples') / 'results.json'})")
    return 0


def prepass_settings(cfg: "SRPOConfig", files: list[str], k: int) -> None:
    """Turn `cfg` into an evaluation of `files` at training's sampling settings, k samples
    a prompt, nothing else (no greedy decode, no per-source cap)."""
    from srpo_ray.config.load import validate

    if cfg.rollout.temperature <= 0:
        raise ConfigError(f"rollout.temperature={cfg.rollout.temperature}: a pass rate needs sampling; "
                          "set a temperature > 0 (training's)")
    cfg.eval.files = list(files)
    cfg.eval.k, cfg.eval.pass_at, cfg.eval.greedy = k, [1], False
    cfg.eval.temperature, cfg.eval.top_p = cfg.rollout.temperature, cfg.rollout.top_p
    cfg.eval.max_new_tokens, cfg.eval.max_problems_per_source = cfg.rollout.max_new_tokens, 0
    validate(cfg)


def pass_rate_table(report: "EvalReport") -> "pa.Table":
    import pyarrow as pa

    problems = report.problems
    correct = [sum(p.correct) for p in problems]
    return pa.table({
        "prompt_id": pa.array([p.prompt_id for p in problems], pa.string()),
        "data_source": pa.array([p.source for p in problems], pa.string()),
        "k": pa.array([len(p.correct) for p in problems], pa.int32()),
        "correct": pa.array(correct, pa.int32()),
        "pass_rate": pa.array([c / max(1, len(p.correct)) for c, p in zip(correct, problems)], pa.float64()),
    })


def write_pass_rates(table: "pa.Table", path: Path) -> None:
    """Written to a temporary file and renamed: the file is whole or absent."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def histogram(rates: list[float], k: int, width: int = 40) -> str:
    """Prompts per pass rate: never solved, the quarters in between, always solved."""
    bins = [("0 (never solved)", lambda r: r == 0), ("(0, 0.25]", lambda r: 0 < r <= 0.25),
            ("(0.25, 0.5]", lambda r: 0.25 < r <= 0.5), ("(0.5, 0.75]", lambda r: 0.5 < r <= 0.75),
            ("(0.75, 1)", lambda r: 0.75 < r < 1), ("1 (always solved)", lambda r: r == 1)]
    counts = [sum(1 for r in rates if test(r)) for _, test in bins]
    most = max(counts + [1])
    lines = [f"pass rate at k={k} | prompts"]
    lines += [f"{name:>17} | {count:6d} {'#' * round(width * count / most)}" for (name, _), count in zip(bins, counts)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
