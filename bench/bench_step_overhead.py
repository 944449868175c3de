"""Where a training step's time goes, from a real short run.

    .venv/bin/python bench/bench_step_overhead.py [--steps 10] [--model PATH] [--transport auto]
        [--one-step-off | --compare-one-step-off] [--set key=value ...]

Runs the real loop (local Ray, vLLM generation, sandboxed rewards, 2-rank FSDP2
learner) on the scripted tiny model of tests/scripted_model.py (or --model, any HF
folder, e.g. ~/.cache/srpo_ray/models/smollm2-135m-instruct) at temperature 1, so
every step trains and syncs weights. From metrics.jsonl and the wall clock of
`trainer.fit()`:

    work       = generate + score + train + weight_sync     (the trainer's time/... figures;
                 with --one-step-off: wait_rollouts + wait_collect_ahead + train + weight_sync)
    in-step    = time/step - work    (batch building, advantages, ledger, rollout dumps, ...)
    between    = fit wall - sum(time/step) - checkpoint saves   (prompt choice, metrics, stage logic)
    overhead   = (in-step + between) / (fit wall - checkpoint saves)

The first step is reported apart (first calls into each actor). Goal: overhead <= 3%.
With --one-step-off generation overlaps training (rollout.one_step_off), so work can
exceed a step's time; --compare-one-step-off runs the same job both ways, one after the
other, and prints the one-step-off / on-policy ratio of the mean step time (steps 2..).
Prints figures only; asserts nothing about time.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from srpo_ray.config.load import SRPOConfig, load_config  # noqa: E402
from srpo_ray.data.parquet import write_verl_parquet  # noqa: E402

WORK = ("generate", "score", "train", "weight_sync")
# one-step-off: a step's own rollouts were collected while the previous step trained, so
# its work is the waits on them (the generation training did not hide), not their time
WORK_OVERLAPPED = ("wait_rollouts", "wait_collect_ahead", "train", "weight_sync")


def write_data(path: Path, n: int = 16) -> Path:
    rows = [{"data_source": "bench/arith", "ability": "math",
             "prompt": [{"role": "user", "content": f"Question {i} with answer {truth}?"}],
             "reward_model": {"ground_truth": truth}, "extra_info": {"id": f"q{i}-{truth}"}}
            for i in range(n // 2) for truth in ("7", "3")]
    tests = json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}])
    rows += [{"data_source": "bench/code", "ability": "code",  # for stage 2, which this run never reaches
              "prompt": [{"role": "user", "content": f"Add two numbers ({i})."}],
              "reward_model": {"ground_truth": tests}, "extra_info": {"id": f"code{i}"}} for i in range(2)]
    write_verl_parquet(rows, path)
    return path


def _scripted_model_module():
    """tests/scripted_model.py, loaded from its file (tests/ is no package and not on sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("scripted_model", REPO / "tests" / "scripted_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace, one_step_off: bool) -> tuple[list[dict], float, list[float]]:
    """One short training job: (metrics rows, fit wall seconds, checkpoint save seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.model is None:
            model = _scripted_model_module().build_scripted_model(str(root / "model"))
        else:
            model = args.model
        data = write_data(root / "data.parquet")
        cfg = load_config(REPO / "configs" / "tiny_test.yaml", [
            f"model.path={model}", f"data.train_files=[{data}]", f"trainer.run_dir={root / 'run'}",
            f"trainer.total_steps={args.steps}", "trainer.save_every=0", "stages.0.temperature=1.0",
            "stages.0.until_epochs=1000", "trainer.prompts_per_step=8", "rollout.n=8",
            # a small step keeps the scripted policy's groups mixed, so every step trains
            "optim.lr=1e-4", f"rollout.weight_transport={args.transport}",
            f"rollout.one_step_off={one_step_off}", f"rollout.max_staleness={int(one_step_off)}", *args.set])
        return run_job(cfg)


def run_job(cfg: SRPOConfig) -> tuple[list[dict], float, list[float]]:
    """Run the training job `cfg` describes (a local Ray, torn down after): (the rows of
    its metrics.jsonl, fit wall seconds, checkpoint save seconds)."""
    from srpo_ray.runtime.build import build_trainer

    with build_trainer(cfg) as trainer:
        saves: list[float] = []
        real_save = trainer.save

        def timed_save():
            start = time.perf_counter()
            try:
                return real_save()
            finally:
                saves.append(time.perf_counter() - start)
        trainer.save = timed_save
        start = time.perf_counter()
        trainer.fit()
        wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (Path(cfg.trainer.run_dir) / "metrics.jsonl").read_text().splitlines()]
    return rows, wall, saves


def report(rows: list[dict], wall: float, saves: list[float], work_keys: tuple[str, ...]) -> float:
    """Print the step table and overhead; return the mean step time of steps 2.."""
    print(f"{len(rows)} steps in {wall:.1f} s (checkpoint saves {sum(saves):.1f} s, not counted)")
    print(f"{'step':>4} {'step s':>7} " + " ".join(f"{k[:11]:>11}" for k in work_keys)
          + f" {'in-step':>8} {'share':>6}")
    for r in rows:
        work = [r.get(f"time/{k}", 0.0) for k in work_keys]
        rest = r["time/step"] - sum(work)
        print(f"{r['step']:>4} {r['time/step']:7.3f} " + " ".join(f"{w:11.3f}" for w in work)
              + f" {rest:8.3f} {rest / r['time/step']:6.1%}")
    steps_total = sum(r["time/step"] for r in rows)
    between = wall - sum(saves) - steps_total
    for label, picked in (("all steps", rows), ("steps 2..", rows[1:])):
        if not picked:
            continue
        step_time = sum(r["time/step"] for r in picked)
        in_step = step_time - sum(r.get(f"time/{k}", 0.0) for r in picked for k in work_keys)
        # time between steps is spread evenly over the steps for the per-range figure
        gap = between * len(picked) / len(rows)
        print(f"{label}: {step_time / len(picked):.3f} s a step; orchestration overhead "
              f"{in_step + gap:.3f} s = {(in_step + gap) / (step_time + gap):.2%} of the time "
              f"(in-step {in_step / (step_time + gap):.2%}, between steps {gap / (step_time + gap):.2%})")
    later = rows[1:] or rows
    return sum(r["time/step"] for r in later) / len(later)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model", default=None, help="HF model folder (default: the scripted tiny model)")
    ap.add_argument("--transport", default="auto", help="rollout.weight_transport")
    ap.add_argument("--one-step-off", action="store_true", help="run with rollout.one_step_off=true")
    ap.add_argument("--compare-one-step-off", action="store_true",
                    help="run on-policy, then one-step-off, and print the step-time ratio")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more config overrides, e.g. learner.num_ranks=1 rollout.max_new_tokens=128")
    args = ap.parse_args()
    modes = [False, True] if args.compare_one_step_off else [args.one_step_off]
    step_times = {}
    for one_step_off in modes:
        print(f"\n== {'one-step-off' if one_step_off else 'on-policy'} ==", flush=True)
        step_times[one_step_off] = report(*run(args, one_step_off), WORK_OVERLAPPED if one_step_off else WORK)
    if len(step_times) == 2:
        print(f"\none-step-off / on-policy mean step time (steps 2..): {step_times[True]:.3f} / "
              f"{step_times[False]:.3f} s = {step_times[True] / step_times[False]:.2f}x")


if __name__ == "__main__":
    main()
