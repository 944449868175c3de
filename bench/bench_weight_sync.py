"""Weight-sync time and bandwidth, learner -> generators, for each transport.

    .venv/bin/python bench/bench_weight_sync.py [--hidden 768 --layers 6 --vocab 32000]
        [--bucket-mb 64] [--receivers 1,2,4] [--engines 1,2] [--repeats 3]

A random Qwen2 of about 330 MB (float32, untied) is built in a temporary folder. A
WeightSource actor (the same WeightSender a learner's rank 0 uses, without the FSDP
gather) publishes its state dict; the rollout fleet delivers it (RayRolloutFleet.push_weights),
scaled up with `scale_to` between sizes. Two kinds of receiver:

- receivers: GenerationWorkers whose engine only copies each received tensor into
  place (preallocated buffers): transport + one copy, the part this project controls.
  1, 2 and 4 of them.
- engines: real vLLM GenerationWorkers (reload_weights, incl. vLLM's CPU repacking):
  1 and 2 of them. 4 vLLM engines of this model (about 1.5 GB each) plus the others
  did not fit next to other jobs on the 24 GB, 2-core development machine.

Against: a plain memory copy of the same bytes in this process (preallocated
destination, torch's default threads). Goal: publish + deliver to ONE receiver within
2x of that copy ("x copy"). For N receivers on the node the same bytes land N times, so
the figure against N copies ("x N copies") is printed too; the goal uses the first.

publish: the publish call as the publisher timed it (shared_memory returns while its
copy goes on in the background). deliver: RayRolloutFleet.push_weights. total: wall
time from the driver's publish call to push_weights' return (what a training step
waits; includes both Ray round trips), the figure the ratios use. Times are medians
of --repeats pushes after two warm-up pushes (they form the broadcast group and
touch both shared-memory slots). Prints figures only; asserts nothing about time.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import ray  # noqa: E402
import torch  # noqa: E402

from actors.generation import GenerationWorker, GenerationWorkerImpl  # noqa: E402
from actors.learner import MB, WeightSource  # noqa: E402
from srpo_ray.config.load import RolloutConfig  # noqa: E402
from srpo_ray.models import build_tiny_model  # noqa: E402
from srpo_ray.runtime.fleets import RayRolloutFleet, WorkerPool  # noqa: E402

TRANSPORTS = ("shared_memory", "object_store", "broadcast")
ENV = {"OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}


class CopyIntoPlace:
    """Stand-in engine: copies every received tensor into a buffer of its own (what a
    load costs at least), allocated on the first load and reused after."""

    max_model_len = 64

    def __init__(self):
        self.params: dict[str, torch.Tensor] = {}

    def load_weight_stream(self, names, weights) -> None:
        for name, tensor in weights:
            dst = self.params.get(name)
            if dst is None or dst.shape != tensor.shape or dst.dtype != tensor.dtype:
                dst = self.params[name] = torch.empty_like(tensor)
            dst.copy_(tensor)


@ray.remote
class Receiver(GenerationWorkerImpl):
    def __init__(self, model_dir: str, index: int):
        super().__init__(model_dir, RolloutConfig(), "float32", 32, index, engine=CopyIntoPlace())


@ray.remote
class Source(WeightSource):
    """Holds the model's state dict and publishes it on request, timing the publish."""

    def __init__(self, model_dir: str, bucket_bytes: int):
        from transformers import AutoModelForCausalLM

        super().__init__("shared_memory", bucket_bytes)
        self.state = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()

    def publish_held(self, transport: str):
        start = time.perf_counter()
        published = self.publish(self.state, transport)
        return published, time.perf_counter() - start

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())


def copy_seconds(nbytes: int, repeats: int) -> float:
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(fleet: RayRolloutFleet, source, transport: str, repeats: int) -> tuple[float, float, float]:
    """Median (publish, deliver, total) seconds over `repeats` pushes after 2 warm-ups."""
    publish, deliver, total = [], [], []
    for i in range(repeats + 2):
        start = time.perf_counter()
        published, publish_s = ray.get(source.publish_held.remote(transport))
        pushed = time.perf_counter()
        fleet.push_weights(published, fleet.version + 1)
        end = time.perf_counter()
        if i >= 2:
            publish.append(publish_s)
            deliver.append(end - pushed)
            total.append(end - start)
    return statistics.median(publish), statistics.median(deliver), statistics.median(total)


def run(kind: str, sizes: list[int], factory, source, nbytes: int, baseline: float, repeats: int) -> None:
    if not sizes:
        return
    fleet = RayRolloutFleet(WorkerPool(kind, factory, sizes[0]))
    try:
        for n in sizes:
            started = time.perf_counter()
            fleet.scale_to(n, wait=True)
            print(f"\n[{kind}] {n} receiver(s) ready ({time.perf_counter() - started:.1f} s)", flush=True)
            for transport in TRANSPORTS:
                publish, deliver, total = measure(fleet, source, transport, repeats)
                print(f"  {transport:<13} publish {publish:6.3f} s  deliver {deliver:6.3f} s  total {total:6.3f} s "
                      f"({n * nbytes / total / 1e9:5.2f} GB/s in all)  = {total / baseline:5.1f}x copy, "
                      f"{total / (n * baseline):4.1f}x {n} copies", flush=True)
    finally:
        for handle in fleet.pool.workers:
            ray.kill(handle)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--receivers", default="1,2,4", help="copy-into-place receiver counts ('' = none)")
    ap.add_argument("--engines", default="1,2", help="vLLM engine counts ('' = none)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    counts = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(tmp, vocab_size=args.vocab, hidden=args.hidden, layers=args.layers,
                                     heads=args.hidden // 64)
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {**ENV, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}})
        source = Source.options(num_cpus=1).remote(model_dir, int(args.bucket_mb * MB))
        nbytes = ray.get(source.nbytes.remote())
        baseline = copy_seconds(nbytes, args.repeats)
        print(f"model: {nbytes / 1e6:.0f} MB float32, buckets of {args.bucket_mb:g} MiB; "
              f"memory copy of the same bytes: {baseline:.3f} s ({nbytes / baseline / 1e9:.2f} GB/s)")
        run("receivers", counts(args.receivers),
            lambda i: Receiver.options(num_cpus=0.5).remote(model_dir, i), source, nbytes, baseline, args.repeats)
        cfg = RolloutConfig(kv_cache_memory_bytes=64 << 20, cpus_per_worker=1.0)
        run("vllm engines", counts(args.engines),
            lambda i: GenerationWorker.options(num_cpus=1, runtime_env={"env_vars": ENV}).remote(
                model_dir, cfg, "float32", 32, i), source, nbytes, baseline, args.repeats)
        ray.get(source.close_weights.remote())
        ray.shutdown()


if __name__ == "__main__":
    main()
