"""Entry point: `python -m srpo_ray.driver [--config FILE] [--resume] [--verbose] [key=value ...]`.

Runs alone (starts a local Ray on 127.0.0.1) or under
`ray job submit -- python -m srpo_ray.driver ...` (joins that cluster). The loop itself
is `SRPOTrainer.fit` (srpo_ray/loop/trainer.py); what the console shows is
srpo_ray/telemetry/console.py's business. SIGTERM (preemption) stops the run at the next
step end with a checkpoint and exit status 0 (srpo_ray/loop/stop.py)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from srpo_ray.config.load import ConfigError, parse_cli
from srpo_ray.data.parquet import DataError
from srpo_ray.loop.stop import PreemptionAbort, preemption_signals
from srpo_ray.models import ModelPathError
from srpo_ray.runtime.learner_group import LearnerRankDiedError
from srpo_ray.telemetry.console import console_logging


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input: shown as one message, without a traceback."""
    from cluster.placement import PlacementError
    from cluster.ray_placement import PlacementTimeoutError
    return ConfigError, DataError, ModelPathError, PlacementError, PlacementTimeoutError


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    try:
        cfg, resume = parse_cli(argv)
    except ConfigError as e:
        print(f"srpo_ray: error: {e}", file=sys.stderr)
        return 2
    from srpo_ray.runtime.build import build_trainer  # imports Ray: its logger exists before we route it

    # the console keeps progress, events and errors; library output goes to RUN_DIR/logs/
    with console_logging(cfg.trainer.run_dir, verbose=cfg.metrics.verbose) as logs:
        trainer = None
        try:
            with build_trainer(cfg, resume=resume) as trainer:
                # after Ray started: ray.init installs a SIGTERM handler of its own
                with preemption_signals(trainer.stop_request, cfg.trainer.preempt_grace_s):
                    if resume:
                        trainer.resume()
                    trainer.fit()
            if trainer.stopped:
                print(f"srpo_ray: stopped on {trainer.stop_request.reason} after step {trainer.step}; checkpoint "
                      f"{trainer.checkpoints.latest()} committed; continue with the same command and --resume",
                      file=sys.stderr)
                return 0
            report_run(cfg.trainer.run_dir, trainer.step, time.monotonic() - started,
                       trainer.checkpoints.latest(), logs)
        except user_errors() as e:
            print(f"srpo_ray: error: {e}", file=sys.stderr)
            return 2
        except PreemptionAbort as e:
            latest = trainer.checkpoints.latest() if trainer is not None else None
            print(f"srpo_ray: error: {e}: what was trained after {latest or 'the start'} is lost "
                  f"(the run was at step {trainer.step if trainer is not None else 0}); "
                  f"--resume continues from {latest or 'the start'}", file=sys.stderr)
            return 1
        except LearnerRankDiedError as e:
            print(f"srpo_ray: error: {e}", file=sys.stderr)
            return 1
        except BaseException:
            if logs is not None:  # the traceback follows; the actors' own output is in the files
                print(f"srpo_ray: the run failed; every actor's and library's output is in {logs}/ "
                      f"(--verbose shows it on the console)", file=sys.stderr)
            raise
    return 0


def report_run(run_dir: str, steps: int, seconds: float, checkpoint: Path | None,
               logs: Path | None = None) -> None:
    """The end of a run on the console: the held-out before/after table (also
    eval/summary.md), the plot (plot.png) and where things are (logs: the log dir)."""
    from srpo_ray.eval.report import run_summary
    from srpo_ray.plot import try_plot_run

    table = run_summary(Path(run_dir) / "eval")
    if table:
        print(f"\nHeld-out evaluation, first vs last:\n{table}", file=sys.stderr)
    plot = try_plot_run(run_dir)
    print(f"\nsrpo_ray: {steps} steps in {seconds / 60:.1f} min; checkpoint {checkpoint}; "
          f"metrics {Path(run_dir) / 'metrics.jsonl'}" + (f"; plot {plot}" if plot else "")
          + (f"; logs {logs}/" if logs else ""), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
