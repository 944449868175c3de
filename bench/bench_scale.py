"""The driver at the paper's shape: 256 prompts x 32 samples, responses U(500, 8000) tokens.

Runs the real training loop (SRPOTrainer: ledger with History Resampling, stage schedule,
advantages, metrics) over real Ray actors: generation workers (GenerationWorker, tokens
left in the object store), reward workers (RewardWorker with the real math checker) and a
real LearnerGroup whose ranks fetch their shards by reference, unpack and pad them and cut
micro-batches. Stand-ins, only for what needs a GPU, each named in the output:

- generation: a synthetic engine in each generation worker emits rollouts of the paper's
  shape (response lengths uniform in [--min-len, --max-len], token ids uniform over a
  151,936-token vocabulary, sampler log-probs, texts of ~4 characters a token ending in a
  boxed answer that is right with a per-prompt solve rate: 25% of prompts always right,
  25% never, the rest in between) instead of vLLM;
- learner ranks: after the real fetch, unpack and micro-batching, no forward/backward
  (the head's memory is bench/bench_learner_head.py's business);
- weight sync: the generators' policy version is advanced, no weights move.

Per step it prints the driver's peak RSS above its start, its CPU seconds, the bytes that
crossed it (the serialized arguments of every Ray call it makes and every result it
fetches, tokens fetched for rollouts.jsonl included, plus its file I/O other than its own
logs), seconds outside generate/score/train, reward throughput and the learner ranks'
token imbalance.

    .venv/bin/python bench/bench_scale.py [--steps 4] [--prompts 256] [--n 32]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from actors.generation import GenerationWorker
from actors.ray_ops import RayOps
from actors.reward import RewardWorker
from srpo_ray.config.load import load_config
from srpo_ray.learner.batch import micro_batches
from srpo_ray.learner.plan import TrainShard, fetch_and_build
from srpo_ray.loop.checkpoint import CheckpointManager
from srpo_ray.loop.trainer import Roles, SRPOTrainer
from srpo_ray.models import chat_prompt_ids, resolve_model_path
from srpo_ray.records import Prompt, Sample, Sampling
from srpo_ray.runtime.fleets import RayRewardFleet, RayRolloutFleet
from srpo_ray.runtime.learner_group import LearnerGroup
from srpo_ray.runtime.worker_pool import WorkerPool
from srpo_ray.telemetry.metrics import MetricsLogger

REPO = Path(__file__).resolve().parents[1]
VOCAB = 151_936  # Qwen2.5's


def _key(ids) -> str:
    return hashlib.blake2b(np.asarray(ids, dtype=np.int32).tobytes(), digest_size=8).hexdigest()


class SyntheticEngine:
    """STAND-IN for vLLM: rollouts of the paper's shape (module docstring)."""

    def __init__(self, answers: dict[str, tuple[str, float]], min_len: int, max_len: int):
        self.answers, self.min_len, self.max_len = answers, min_len, max_len

    def generate(self, prompt_token_ids: list[list[int]], sampling: Sampling) -> list[list[Sample]]:
        out = []
        for k, ids in enumerate(prompt_token_ids):
            rng = np.random.default_rng(sampling.for_prompt(k).seed)
            answer, solve_rate = self.answers[_key(ids)]
            cap = min(self.max_len, sampling.max_new_tokens)
            group = []
            for length in rng.integers(self.min_len, cap + 1, size=sampling.n):
                said = answer if rng.random() < solve_rate else str(int(answer) + 1)
                text = "step " * int(length * 4 // 5) + f"The answer is \\boxed{{{said}}}."
                group.append(Sample(rng.integers(0, VOCAB, size=length, dtype=np.int32),
                                    -rng.exponential(0.7, size=length).astype(np.float32),
                                    text, "length" if length == cap else "stop"))
            out.append(group)
        return out

    def load_weight_stream(self, names, weights) -> None:  # weights never move here (stand-in)
        for _ in weights:
            pass

    def token_logprobs(self, *args, **kwargs):
        raise NotImplementedError("the synthetic engine scores nothing")


@ray.remote
class StandInRank:
    """STAND-IN for an FSDP learner rank: the real fetch by reference, unpacking and
    padding (plan.fetch_and_build) and micro-batching, then no forward/backward."""

    def __init__(self, micro_batch_size: int, max_tokens: int):
        self.micro_batch_size, self.max_tokens = micro_batch_size, max_tokens

    def train_step(self, shard: TrainShard, denominator: float, temperature: float) -> dict:
        started = time.perf_counter()
        batch = fetch_and_build(shard, ray.get)
        mbs = micro_batches(batch, self.micro_batch_size, self.max_tokens)
        return {"learner/standin_unpack_s": time.perf_counter() - started,
                "learner/standin_micro_batches": float(len(mbs)),
                "learner/response_tokens": float(batch.num_response_tokens)}

    def publish_weights(self, transport=None):
        return None


class StandInLearnerGroup(LearnerGroup):
    """The real LearnerGroup (planning, shards by reference); saving and publishing are
    stand-ins (nothing to save or send without a model)."""

    def save(self, directory: str) -> None:
        pass

    def publish_weights(self, transport=None):
        return None


INLINE_LIMIT = 100 * 1024  # Ray's max_direct_call_object_size: smaller returns go to the caller itself


class StandInSyncFleet(RayRolloutFleet):
    """The real rollout fleet; its weight push is a stand-in that only advances the
    generators' policy version (no weights move without a GPU learner). It also counts
    the token and text objects small enough for Ray to return them inline to the driver
    (sizes from the summaries: 4 + 4 bytes a response token, 4 a prompt token, ~4
    characters of text a token), which the driver then holds although it never asks."""

    traffic: "Traffic"

    def generate(self, prompts, sampling):
        groups = super().generate(prompts, sampling)
        for g in groups:
            tokens = sum(s.num_tokens for s in g.samples)
            for size in (8 * tokens + 4 * g.prompt_len, 4 * tokens):
                self.traffic.bytes += size if size < INLINE_LIMIT else 0
        return groups

    def push_weights(self, weights, version: int) -> None:
        self.version = version
        members = self.pool.ready()
        self.ops.get([m.handle.set_version.remote(version) for m in members])
        for m in members:
            m.version = version


class Traffic:
    """What crosses the driver over Ray: the serialized size (ray.cloudpickle, as Ray
    sends them; object refs as refs) of every call's arguments it sends and every result
    it fetches, through the counting handles and ops below. The pickling is the bench's
    own cost: its CPU time is kept apart and taken out of the driver's."""

    def __init__(self):
        self.bytes, self.cpu_s = 0, 0.0

    def count(self, value) -> None:
        started = time.process_time()
        self.bytes += len(ray.cloudpickle.dumps(value))
        self.cpu_s += time.process_time() - started


class CountedHandle:
    """An actor handle whose `.method[.options(...)].remote(...)` arguments are counted."""

    def __init__(self, handle, traffic: Traffic):
        self._handle, self._traffic = handle, traffic

    def __getattr__(self, name: str):
        attr = getattr(self._handle, name)
        return attr if name.startswith("_") else _CountedMethod(attr, self._traffic)


class _CountedMethod:
    def __init__(self, method, traffic: Traffic):
        self._method, self._traffic = method, traffic

    def options(self, **options):
        return _CountedMethod(self._method.options(**options), self._traffic)

    def remote(self, *args, **kwargs):
        self._traffic.count((args, kwargs))
        return self._method.remote(*args, **kwargs)


class CountedOps(RayOps):
    """Ray's calls, with every result the driver fetches counted."""

    def __init__(self, traffic: Traffic):
        self.traffic = traffic

    def get(self, refs, timeout=None):
        value = super().get(refs, timeout)
        self.traffic.count(value)
        return value


class DriverProbe(MetricsLogger):
    """Samples the driver process at each step's end (MetricsLogger.log is called once a
    step): peak RSS since the last step (/proc/self/clear_refs resets the peak), CPU
    seconds, bytes read and written (sockets and files: /proc/self/io) and, of those, what
    it wrote to the run dir's logs (metrics.jsonl, rollouts.jsonl)."""

    def __init__(self, run_dir: str, *args, fetched: list[int], traffic: Traffic, **kwargs):
        super().__init__(run_dir, *args, **kwargs)
        self.run_dir, self.fetched, self.traffic, self.rows = Path(run_dir), fetched, traffic, []
        self.start_rss = _status("VmRSS")
        self._mark()

    def _logs(self) -> int:
        return sum(f.stat().st_size for f in self.run_dir.glob("*.jsonl"))

    def _mark(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        self._cpu, self._io, self._fetched = time.process_time(), _io_bytes(), sum(self.fetched)
        self._written, self._sent, self._counting = self._logs(), self.traffic.bytes, self.traffic.cpu_s

    def log(self, step: int, metrics: dict) -> None:
        super().log(step, metrics)
        self.rows.append({"step": step, "peak_rss_above_start": _status("VmHWM") - self.start_rss,
                          "cpu_s": time.process_time() - self._cpu - (self.traffic.cpu_s - self._counting),
                          "ray_bytes": self.traffic.bytes - self._sent, "io_bytes": _io_bytes() - self._io,
                          "log_bytes": self._logs() - self._written,
                          "fetched_bytes": sum(self.fetched) - self._fetched, **metrics})
        self._mark()


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _io_bytes() -> int:
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(io["rchar"]) + int(io["wchar"])


def make_prompts(count: int, prompt_tokens: int, seed: int) -> tuple[list[Prompt], dict[str, float]]:
    """Math prompts of about `prompt_tokens` tokens; each gets a solve rate."""
    rng = np.random.default_rng(seed)
    prompts, rates = [], {}
    filler = " ".join(["Consider the numbers carefully and reason step by step."] * max(1, prompt_tokens // 11))
    for i in range(count):
        a, b = int(rng.integers(100, 999)), int(rng.integers(100, 999))
        pid = f"scale-{i}"
        prompts.append(Prompt(pid, "math", [{"role": "user", "content": f"{filler} What is {a} + {b}?"}],
                              str(a + b), data_source="synthetic_arith"))
        kind = rng.random()
        rates[pid] = 1.0 if kind < 0.25 else 0.0 if kind < 0.5 else float(rng.uniform(0.1, 0.9))
    return prompts, rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=500)
    ap.add_argument("--max-len", type=int, default=8000)
    ap.add_argument("--prompt-tokens", type=int, default=300)
    ap.add_argument("--generation-workers", type=int, default=4)
    ap.add_argument("--reward-workers", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    args = ap.parse_args()

    run_dir = tempfile.mkdtemp(prefix="bench_scale_")
    cfg = load_config(REPO / "configs" / "srpo_qwen32b.yaml", [
        "model.path=builtin:smollm2-135m-instruct", "model.dtype=float32",
        f"trainer.run_dir={run_dir}", f"trainer.total_steps={args.steps}", "trainer.save_every=0",
        f"trainer.prompts_per_step={args.prompts}", f"rollout.n={args.n}", f"rollout.max_new_tokens={args.max_len}",
        f"rollout.num_workers={args.generation_workers}", "rollout.gpus_per_worker=0", "rollout.tensor_parallel_size=1",
        f"reward.num_workers={args.reward_workers}", f"learner.num_ranks={args.ranks}", "learner.gpus_per_rank=0",
        "learner.backend=gloo", "learner.max_tokens_per_micro_batch=16384", "eval.at_start=false",
        "eval.at_end=false", "eval.files=[]", "data.train_files=[]", "metrics.progress_bar=false",
    ])
    model_path = resolve_model_path(cfg.model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # several epochs' worth of prompts, so History Resampling acts within the run
    prompts, rates = make_prompts(args.prompts * 2, args.prompt_tokens, seed=0)
    answers = {_key(chat_prompt_ids(tokenizer, p.messages)): (p.ground_truth, rates[p.prompt_id]) for p in prompts}

    ray.init(num_cpus=max(8, args.generation_workers + args.reward_workers + args.ranks), include_dashboard=False,
             log_to_driver=False)
    engine = SyntheticEngine(answers, args.min_len, args.max_len)
    traffic = Traffic()
    ops = CountedOps(traffic)
    gen = lambda i: CountedHandle(GenerationWorker.options(num_cpus=1).remote(  # noqa: E731
        model_path, cfg.rollout, "float32", cfg.data.max_prompt_tokens, i, engine=engine), traffic)
    score = lambda i: CountedHandle(RewardWorker.options(num_cpus=1).remote(cfg.reward), traffic)  # noqa: E731
    rollout = StandInSyncFleet(WorkerPool("generation", gen, args.generation_workers, ops=ops), ops=ops)
    rollout.traffic = traffic
    rewards = RayRewardFleet(WorkerPool("reward", score, args.reward_workers, ops=ops))
    ranks = [CountedHandle(StandInRank.options(num_cpus=1).remote(cfg.learner.micro_batch_size,
                                                                   cfg.learner.max_tokens_per_micro_batch), traffic)
             for _ in range(args.ranks)]
    learner = StandInLearnerGroup(ranks, cfg.algo.loss_agg, get=ops.get)
    fetched: list[int] = []

    def fetch(groups):
        out = rollout.fetch(groups)
        fetched.extend(g.tokens.nbytes + sum(len(t.encode()) for t in g.texts) for g in out)  # came to the driver
        return out

    metrics = DriverProbe(run_dir, cfg.trainer.total_steps, progress_bar=False, fetched=fetched, traffic=traffic)
    trainer = SRPOTrainer(cfg, prompts, Roles(rollout, rewards, learner, fetch=fetch),
                          int(tokenizer.pad_token_id or 0), metrics, CheckpointManager(run_dir))
    started = time.perf_counter()
    trainer.fit()
    print(f"# bench_scale {time.strftime('%Y-%m-%d %H:%M')}: {args.steps} steps of {args.prompts} prompts x "
          f"{args.n} samples, responses U({args.min_len}, {args.max_len}) tokens, ~{args.prompt_tokens}-token "
          f"prompts; {args.generation_workers} generation, {args.reward_workers} reward workers, {args.ranks} "
          f"learner ranks; {os.cpu_count()} CPUs; {time.perf_counter() - started:.0f} s")
    print("# stand-ins: generation (synthetic engine, no vLLM), learner forward/backward (ranks fetch, unpack, "
          "pad and micro-batch only), weight sync (version only). Real: trainer loop, ledger + History "
          "Resampling, stages, Ray fleets and object store, reward workers + math checker, plan and shards.")
    header = ("step", "resp_tokens_M", "token_MB", "via_driver_MB", "driver_%", "logs_MB", "peak_rss_MB",
              "driver_cpu_s", "outside_s", "step_s", "rewards/s", "imbalance", "pool")
    print(" ".join(f"{h:>13}" for h in header))
    rows = []
    for r in metrics.rows:
        samples = r["groups/count"] * args.n
        tokens = r["response_len/mean"] * samples
        token_bytes = tokens * 8 + r["groups/count"] * args.prompt_tokens * 4  # int32 ids + float32 log-probs
        # through the driver: every call's arguments and fetched result (Traffic; the tokens
        # and texts fetched for rollouts.jsonl among them), and its file I/O less its own logs
        crossed = r["ray_bytes"] + max(0, r["io_bytes"] - r["log_bytes"])
        outside = r["time/step"] - r.get("time/generate", 0) - r.get("time/score", 0) - r.get("time/train", 0)
        row = {"step": r["step"], "response_tokens": tokens, "token_bytes": token_bytes, "driver_bytes": crossed,
               "fetched_bytes": r["fetched_bytes"], "log_bytes": r["log_bytes"],
               "driver_bytes_pct": 100 * crossed / token_bytes, "peak_rss_above_start": r["peak_rss_above_start"],
               "driver_cpu_s": r["cpu_s"], "outside_s": outside, "step_s": r["time/step"],
               "rewards_per_s": samples / max(r.get("time/score", 0), 1e-9),
               "rank_token_imbalance": r.get("learner/rank_token_imbalance", float("nan")),
               "pool_size": r["pool/size"]}
        rows.append(row)
        print(" ".join(f"{v:>13}" for v in (
            r["step"], f"{tokens / 1e6:.1f}", f"{token_bytes / 1e6:.0f}", f"{crossed / 1e6:.2f}",
            f"{row['driver_bytes_pct']:.2f}", f"{r['log_bytes'] / 1e6:.1f}", f"{row['peak_rss_above_start'] / 1e6:.0f}",
            f"{r['cpu_s']:.2f}",
            f"{outside:.2f}", f"{r['time/step']:.1f}", f"{row['rewards_per_s']:.0f}",
            f"{row['rank_token_imbalance']:.3f}", int(r["pool/size"]))))
    Path(args.out).write_text(json.dumps({"args": vars(args), "date": time.strftime("%Y-%m-%d"), "steps": rows},
                                         indent=1))
    print(f"# written {args.out}; driver max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB")
    ray.shutdown()


if __name__ == "__main__":
    main()
