"""Entry point: `python -m srpo_ray.driver [--config FILE] [--resume] [key=value ...]`.

Runs alone (starts a local Ray on 127.0.0.1) or under
`ray job submit -- python -m srpo_ray.driver ...` (joins that cluster). The loop itself
is `SRPOTrainer.fit` (srpo_ray/trainer.py)."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from srpo_ray.config import ConfigError, parse_cli
from srpo_ray.data import DataError
from srpo_ray.runtime.learner_group import LearnerRankDiedError
from srpo_ray.models import ModelPathError


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input: shown as one message, without a traceback."""
    from cluster.placement import PlacementError
    from cluster.ray_placement import PlacementTimeoutError
    return ConfigError, DataError, ModelPathError, PlacementError, PlacementTimeoutError


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    try:
        cfg, resume = parse_cli(argv)
        from srpo_ray.runtime.build import build_trainer
        with build_trainer(cfg, resume=resume) as trainer:
            if resume:
                trainer.resume()
            trainer.fit()
        report_run(cfg.trainer.run_dir, trainer.step, time.monotonic() - started,
                   trainer.checkpoints.latest())
    except user_errors() as e:
        print(f"srpo_ray: error: {e}", file=sys.stderr)
        return 2
    except LearnerRankDiedError as e:
        print(f"srpo_ray: error: {e}", file=sys.stderr)
        return 1
    return 0


def report_run(run_dir: str, steps: int, seconds: float, checkpoint: Path | None) -> None:
    """The end of a run on the console: the held-out before/after table (also
    eval/summary.md), the plot (plot.png) and where things are."""
    from srpo_ray.eval.report import run_summary
    from srpo_ray.plot import try_plot_run

    table = run_summary(Path(run_dir) / "eval")
    if table:
        print(f"\nHeld-out evaluation, first vs last:\n{table}", file=sys.stderr)
    plot = try_plot_run(run_dir)
    print(f"\nsrpo_ray: {steps} steps in {seconds / 60:.1f} min; checkpoint {checkpoint}; "
          f"metrics {Path(run_dir) / 'metrics.jsonl'}" + (f"; plot {plot}" if plot else ""), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
