"""Evaluation throughput: `python -m srpo_ray.eval` against a bare vLLM generate of the
same prompts, in one invocation on this machine.

    .venv/bin/python bench/bench_eval.py                    # 100 problems x 4 samples, twice each
    .venv/bin/python bench/bench_eval.py --problems 32 --repeats 1

Both sides run in fresh processes, one after the other, with every core:

- srpo-ray: `python -m srpo_ray.eval` on `builtin:arithmetic_heldout` (Ray, one generation
  worker, reward workers scoring each batch while the next generates). Timed: the
  evaluation itself (results.json's `seconds`: generate + score + results), not the start-up.
- bare: one process, `vllm.LLM` started with srpo-ray's CPU engine settings
  (srpo_ray/generation/engines.py), the same chat-templated prompts (data.system_prompt and the worked
  example included), one `generate` call with the same n, temperature, top_p, max_tokens
  and per-prompt seeds (so both sides draw the same samples), no log-probs (evaluation
  asks for none either). Timed: `generate` alone. It scores nothing.

Other differences: srpo-ray generates in calls of eval.batch_prompts problems (bare: one
call for all) and decodes the tokens once at the end (vLLM's default, which bare keeps,
detokenizes as it samples). The srpo-ray rows also say where its time went: generating
(Ray calls included) and waiting for scores that generation did not hide.

Prints samples/s of each side and srpo-ray's share of bare (goal: >= 0.9x); writes
bench/results/eval_throughput/<date>.{json,txt}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from bench_vs_bare import cores  # noqa: E402

DATA = "builtin:arithmetic_heldout"
MODEL = "builtin:smollm2-135m-instruct"


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(cores()), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "PYTHONPATH": str(REPO)}


def overrides(args: argparse.Namespace) -> list[str]:
    return [f"eval.k={args.k}", f"eval.max_problems_per_source={args.problems}", "eval.greedy=false",
            f"eval.temperature={args.temperature}", "eval.top_p=1.0", f"eval.max_new_tokens={args.max_new_tokens}",
            f"rollout.cpus_per_worker={cores()}"]


def run_srpo(args: argparse.Namespace) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "srpo_ray.eval", "--model", MODEL, "--data", DATA,
                             "--out", str(out), *overrides(args)], cwd=REPO, env=child_env(),
                            capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"srpo_ray.eval failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    report = json.loads((out / "results.json").read_text())
    scores = report["scores"]["arithmetic_heldout"]
    return {"samples": report["samples"], "seconds": report["seconds"], "process_seconds": wall,
            "generate_seconds": report.get("generate_seconds"), "score_wait_seconds": report.get("score_wait_seconds"),
            "response_len": scores["response_len"], "tokens": round(scores["response_len"] * report["samples"]),
            f"avg@{args.k}": scores[f"avg@{args.k}"]}


def run_bare(args: argparse.Namespace) -> dict:
    """In this (child) process: vLLM started as srpo-ray's CPU engine starts it."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from srpo_ray.config.load import load_config
    from srpo_ray.data.parquet import load_prompts
    from srpo_ray.generation.engine_setup import engine_kwargs
    from srpo_ray.models import chat_prompt_ids, resolve_model_path

    cfg = load_config(None, [f"model.path={MODEL}", *overrides(args)])
    path = resolve_model_path(cfg.model)
    prompts = load_prompts([DATA], system_prompt=cfg.data.system_prompt)[:args.problems]
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt_ids = [chat_prompt_ids(tokenizer, p.messages) for p in prompts]
    max_model_len = cfg.data.max_prompt_tokens + args.max_new_tokens
    llm = LLM(**engine_kwargs(path, cfg.rollout, cfg.model.dtype, max_model_len))
    params = [SamplingParams(n=args.k, temperature=args.temperature, top_p=1.0, max_tokens=args.max_new_tokens,
                             seed=eval_seed(cfg, i, args.k)) for i in range(len(prompt_ids))]
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    lengths = [len(c.token_ids) for o in outputs for c in o.outputs]
    return {"samples": len(lengths), "seconds": seconds, "response_len": statistics.mean(lengths),
            "tokens": sum(lengths)}


def eval_seed(cfg, index: int, k: int) -> int:
    """The seed srpo-ray's evaluation gives problem `index`: batch b of eval.batch_prompts
    is a call seeded rollout_seed(eval.seed, b) (Evaluator.run), and prompt i of a call
    samples from that + i*k (Sampling.for_prompt)."""
    from srpo_ray.records import rollout_seed

    batch, position = divmod(index, cfg.eval.batch_prompts)
    return rollout_seed(cfg.eval.seed, batch) + position * k


def launch_bare(args: argparse.Namespace) -> dict:
    result = subprocess.run([sys.executable, __file__, "--side", "bare", *passthrough(args)], cwd=REPO,
                            env=child_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"bare side failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def passthrough(args: argparse.Namespace) -> list[str]:
    return ["--problems", str(args.problems), "--k", str(args.k), "--temperature", str(args.temperature),
            "--max-new-tokens", str(args.max_new_tokens)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "eval_throughput"))
    ap.add_argument("--side", choices=["bare"], help=argparse.SUPPRESS)  # internal: the bare child
    args = ap.parse_args()
    if args.side == "bare":
        print(json.dumps(run_bare(args)))
        return 0
    from srpo_ray.config.load import load_config
    from srpo_ray.models import resolve_model_path
    resolve_model_path(load_config(None, [f"model.path={MODEL}"]).model)  # convert the bundled model once

    runs: dict[str, list[dict]] = {"srpo-ray": [], "bare vLLM": []}
    for repeat in range(args.repeats):
        for side, run in (("srpo-ray", run_srpo), ("bare vLLM", launch_bare)):
            row = run(args)
            row["samples_per_s"] = row["samples"] / row["seconds"]
            row["tokens_per_s"] = row["tokens"] / row["seconds"]
            runs[side].append(row)
            print(f"[{time.strftime('%H:%M:%S')}] {side} #{repeat + 1}: {row['samples']} samples in "
                  f"{row['seconds']:.1f} s = {row['samples_per_s']:.2f} samples/s, "
                  f"{row['tokens_per_s']:.0f} tokens/s, mean response {row['response_len']:.1f} tokens", flush=True)
    median = {side: statistics.median(r["samples_per_s"] for r in rows) for side, rows in runs.items()}
    ratio = median["srpo-ray"] / median["bare vLLM"]
    lines = [f"# Eval throughput, {time.strftime('%Y-%m-%d')}, {cores()} cores: {args.problems} problems of "
             f"{DATA} x {args.k} samples, T={args.temperature}, max {args.max_new_tokens} new tokens",
             "", "| side | samples/s (median) | runs (samples/s) | mean response (tokens) |", "|---|---|---|---|"]
    lines += [f"| {side} | {median[side]:.2f} | {', '.join('%.2f' % r['samples_per_s'] for r in rows)} | "
              f"{statistics.mean(r['response_len'] for r in rows):.1f} |" for side, rows in runs.items()]
    lines += ["", f"srpo-ray / bare: {ratio:.2f}x (goal >= 0.9x)"]
    srpo_runs = runs["srpo-ray"]
    if all(r.get("generate_seconds") is not None for r in srpo_runs):  # where srpo-ray's time went
        lines += [f"srpo-ray's seconds per run: generating {', '.join('%.1f' % r['generate_seconds'] for r in srpo_runs)}"
                  f"; waiting for scores {', '.join('%.1f' % r['score_wait_seconds'] for r in srpo_runs)}"
                  f" (bare, generating: {', '.join('%.1f' % r['seconds'] for r in runs['bare vLLM'])})"]
    text = "\n".join(lines)
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("%Y-%m-%d")
    (out / f"{stem}.txt").write_text(text + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"runs": runs, "median_samples_per_s": median, "ratio": ratio,
                                                  "settings": vars(args), "cores": cores()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
