"""`python -m srpo_ray.ledger RUN_DIR [--checkpoint DIR] [--out FILE] [--top N] [--sort ORDER]`:
how hard each training prompt was, from the History Resampling ledger saved in a
checkpoint (the newest in RUN_DIR/checkpoints by default): per prompt, its pass rate in
every epoch it was drawn and the epochs whose close removed it. Prints a summary and the
hardest (or easiest) prompts; --out writes every prompt's row as parquet
(HistoryLedger.history_table's columns) to curate data with. The prompt ids are the
ones the data loader gave (the `id` / `prompt_id` column, else a content hash:
srpo_ray.data.parquet.load_prompts), so the table joins back onto the training files.
No Ray here: it runs wherever a run directory was copied to.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from srpo_ray.algo.ledger import HistoryLedger
from srpo_ray.config.schema import ResampleConfig
from srpo_ray.loop.checkpoint import latest_checkpoint

STATE_FILE = "trainer_state.pt"  # srpo_ray.loop.trainer.STATE_FILE (not imported: it pulls in the loop)
ORDERS = ("hardest", "easiest", "id")


class LedgerCliError(Exception):
    """Bad input (no run dir, no checkpoint, no ledger in it): shown as one line, exit 2."""


def find_state(run_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """The trainer_state.pt to read: of `checkpoint` (a step_N folder or the file itself),
    else of the newest checkpoint in RUN_DIR/checkpoints."""
    if checkpoint is not None:
        path = Path(checkpoint)
        path = path / STATE_FILE if path.is_dir() else path
        if not path.is_file():
            raise LedgerCliError(f"--checkpoint {checkpoint}: no {STATE_FILE} there; pass a checkpoint folder "
                                 f"(RUN_DIR/checkpoints/step_NNNNNN) or its {STATE_FILE}")
        return path
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LedgerCliError(f"run directory {run_dir} not found: pass a run's trainer.run_dir")
    latest = latest_checkpoint(run_dir / "checkpoints")
    if latest is None:
        raise LedgerCliError(f"no checkpoint in {run_dir / 'checkpoints'}: the ledger is saved with each "
                             f"checkpoint (trainer.save_every, and at the end of a run)")
    if not (latest / STATE_FILE).is_file():
        raise LedgerCliError(f"{latest} has no {STATE_FILE}; pass another one with --checkpoint")
    return latest / STATE_FILE


def load_ledger(state_file: Path) -> tuple[HistoryLedger, int]:
    """The ledger saved in a trainer_state.pt and the step it was saved at."""
    import torch

    try:
        state = torch.load(state_file, map_location="cpu", weights_only=False)  # our own file: RNG states too
        ledger_state = state["ledger"]
    except Exception as e:  # not a trainer state, truncated, ...
        raise LedgerCliError(f"{state_file} is not a readable trainer state ({type(e).__name__}: {e})") from None
    ledger = HistoryLedger(ResampleConfig(), seed=int(ledger_state["seed"]))
    try:
        ledger.load_state_dict(ledger_state)
    except ValueError as e:
        raise LedgerCliError(f"{state_file}: {e}") from None
    return ledger, int(state.get("step", 0))


def sort_rows(table: pa.Table, order: str) -> pa.Table:
    """hardest: lowest pass rate first (then most samples); easiest: the reverse; id.
    Prompts never drawn come last."""
    if order == "id":
        return table.sort_by("prompt_id")
    rate = pc.fill_null(table["pass_rate"], 2.0 if order == "hardest" else -1.0)  # unobserved last
    keyed = table.append_column("_rate", rate)
    direction = "ascending" if order == "hardest" else "descending"
    return keyed.sort_by([("_rate", direction), ("total_samples", "descending"),
                          ("prompt_id", "ascending")]).drop_columns(["_rate"])


def summary_lines(ledger: HistoryLedger, table: pa.Table, step: int, source: Path) -> list[str]:
    rates = table["pass_rate"].to_numpy(zero_copy_only=False)
    observed = ~table["pass_rate"].is_null().to_numpy(zero_copy_only=False)
    r = rates[observed].astype(float)
    bins = [("never drawn", int((~observed).sum())), ("all wrong", int((r == 0).sum())),
            ("below 1/2", int(((r > 0) & (r < 0.5)).sum())), ("1/2 or more", int(((r >= 0.5) & (r < 1)).sum())),
            ("all right", int((r == 1).sum()))]
    return [f"ledger of {source.parent} (step {step}): {ledger.num_known} prompts; epochs closed: {ledger.epoch}; "
            f"removed by History Resampling now: {ledger.num_removed}; in the pool: {ledger.pool_size}",
            "pass rate over every epoch: " + ", ".join(f"{name} {count}" for name, count in bins)]


def format_rows(rows: list[dict[str, Any]]) -> list[str]:
    """One line per prompt: id, overall pass rate, correct/samples per epoch, removals."""
    width = max([len("prompt_id")] + [len(r["prompt_id"]) for r in rows])
    lines = [f"{'prompt_id':<{width}}  pass   removed at  per epoch (epoch:correct/samples)"]
    for r in rows:
        rate = "  -  " if r["pass_rate"] is None else f"{r['pass_rate']:.3f}"
        removed = ",".join(str(e) for e in r["removed_epochs"]) or "-"
        epochs = " ".join(f"{e}:{c}/{n}" for e, c, n in zip(r["epochs"], r["correct"], r["samples"]))
        lines.append(f"{r['prompt_id']:<{width}}  {rate}  {removed:<10}  {epochs}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m srpo_ray.ledger",
                                     description="Per-prompt difficulty history from a run's ledger.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run's trainer.run_dir")
    parser.add_argument("--checkpoint", metavar="DIR", help="a checkpoint folder or its trainer_state.pt "
                        "(default: the newest in RUN_DIR/checkpoints)")
    parser.add_argument("--out", metavar="FILE", help="write every prompt's history here (parquet)")
    parser.add_argument("--top", type=int, default=20, metavar="N", help="prompts to print (0: all; default 20)")
    parser.add_argument("--sort", choices=ORDERS, default="hardest", help="order of the printed prompts")
    args = parser.parse_args(argv)
    try:
        if args.top < 0:
            raise LedgerCliError(f"--top {args.top}: must be >= 0 (0 prints every prompt)")
        out = Path(args.out) if args.out else None
        if out is not None and not out.parent.is_dir():
            raise LedgerCliError(f"--out {out}: directory {out.parent} does not exist; create it first")
        state_file = find_state(args.run_dir, args.checkpoint)
        ledger, step = load_ledger(state_file)
    except LedgerCliError as e:
        print(f"srpo_ray.ledger: error: {e}", file=sys.stderr)
        return 2
    table = sort_rows(ledger.history_table(), args.sort)
    shown = table if args.top == 0 else table.slice(0, args.top)
    lines = summary_lines(ledger, table, step, state_file) + [""] + format_rows(shown.to_pylist())
    if len(shown) < len(table):
        lines.append(f"({len(shown)} of {len(table)} prompts, {args.sort} first; --top 0 prints all)")
    if out is not None:
        pq.write_table(table, out)
        lines.append(f"wrote {len(table)} prompts to {out}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
