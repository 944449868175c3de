"""Helpers shared by the end-to-end driver tests (test_integration, test_eval_run, test_faults,
test_multinode, test_ray_job): a small mixed math/code data set, the driver's argv for
the scripted tiny model, readers for a run's metrics and rollouts, the check that
rollouts were sampled with a given checkpoint's weights, and `ActorClassHook`, which
stands in for an actor class to record where its actors ran or to inject a fault."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import ray
import torch
from fixtures_models import hf_logprobs

SYNC_ATOL = 2e-3  # vLLM vs. HF log-probs of the same float32 weights
MISSED_UPDATE_GAP = 0.1  # a sampled token whose log-prob moved this much shows an update


# ----------------------------------------------------------------------------- runs

def write_data(path: Path) -> Path:
    """4 math prompts answered 7 and 4 answered 3 (the scripted model always says 7 at a
    low temperature), plus 2 stdin code prompts; written as verl parquet at `path`."""
    from srpo_ray.data.parquet import write_verl_parquet

    rows = []
    for i in range(4):
        for truth in ("7", "3"):
            rows.append({"data_source": "test/arith", "ability": "math",
                         "prompt": [{"role": "user", "content": f"Question {i} with answer {truth}?"}],
                         "reward_model": {"ground_truth": truth}, "extra_info": {"id": f"q{i}-{truth}"}})
    for i in range(2):
        tests = json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}])
        rows.append({"data_source": "test/code", "ability": "code",
                     "prompt": [{"role": "user", "content": f"Add two numbers ({i})."}],
                     "reward_model": {"ground_truth": tests}, "extra_info": {"id": f"code{i}"}})
    write_verl_parquet(rows, path)
    return path


def write_eval_data(path: Path) -> Path:
    """Two sources: `sevens` (answer 7: always right at a low temperature) and `mixed`
    (one problem answered 7, one answered 3)."""
    rows = [{"data_source": source, "ability": "math",
             "prompt": [{"role": "user", "content": f"Held-out question {i} ({source})?"}],
             "reward_model": {"ground_truth": truth}, "extra_info": {"id": f"{source}-{i}"}}
            for source, truths in (("sevens", ["7", "7"]), ("mixed", ["7", "3"])) for i, truth in enumerate(truths)]
    from srpo_ray.data.parquet import write_verl_parquet

    write_verl_parquet(rows, path)
    return path


def run_args(model_dir: str, data: Path, run_dir: Path, *extra: str) -> list[str]:
    """Driver argv: tiny_test config, 4 prompts a step, a checkpoint every step, stage 1
    nearly greedy (temperature 0.02) for one epoch; `extra` overrides come last."""
    return ["--config", "configs/tiny_test.yaml", f"model.path={model_dir}", f"data.train_files=[{data}]",
            f"trainer.run_dir={run_dir}", "trainer.prompts_per_step=4", "trainer.save_every=1",
            "trainer.keep_checkpoints=10", "metrics.rollouts_per_step=100",
            "stages.0.temperature=0.02", "stages.0.until_epochs=1", "optim.lr=0.01", *extra]



def driver_run(model_dir: str, root: Path, name: str, *extra: str) -> tuple[Path, Path]:
    """Write the data set under `root` and run the driver (run_args + `extra`) on the shared
    local Ray into root/name; it must succeed and leave no shared-memory weight file
    behind. Returns (data file, run dir)."""
    from local_ray import ensure_local_ray

    from srpo_ray.driver import main

    ensure_local_ray()
    data = write_data(root / "data.parquet")
    run_dir = root / name
    weight_files = set(Path("/dev/shm").glob("srpo_weights_*"))
    assert main(run_args(model_dir, data, run_dir, *extra)) == 0
    left = set(Path("/dev/shm").glob("srpo_weights_*")) - weight_files
    assert not left, f"the run left its shared-memory weight file behind: {left}"
    return data, run_dir

def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rollouts(run_dir: Path, step: int) -> list[dict]:
    """The logged rollout groups of `step` (one dict per group)."""
    rows = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    return [r for r in rows if r["step"] == step]


def _hf_model(model_dir: Path | str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def assert_sampled_with(groups: list[dict], weights_dir: Path | str, not_with: Path | str | None = None) -> None:
    """Every sample's vLLM log-probs equal an HF forward of the checkpoint at
    `weights_dir` (so those weights reached the generator) and, if `not_with` is given,
    differ from that model's by more than MISSED_UPDATE_GAP somewhere (so the check
    could tell a missed update apart)."""
    assert groups, "no rollouts to check"
    synced_model = _hf_model(weights_dir)
    other_model = _hf_model(not_with) if not_with is not None else None
    for group in groups:
        for sample in group["samples"]:
            vllm = torch.tensor(sample["logprobs"])
            synced = hf_logprobs(synced_model, group["prompt_token_ids"], sample["token_ids"])
            assert torch.allclose(vllm, synced, atol=SYNC_ATOL), (vllm, synced)
            if other_model is not None:
                other = hf_logprobs(other_model, group["prompt_token_ids"], sample["token_ids"])
                assert (vllm - other).abs().max() > MISSED_UPDATE_GAP


# ----------------------------------------------------------------------------- actor hooks

# The hooks send functions of this module to actors (`__ray_call__`); the workers cannot
# import tests/ modules, so ship them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _hold(actor_self: Any, seconds: float) -> None:
    time.sleep(seconds)


class KillDuringCall:
    """An actor handle whose `method`, called with arguments accepted by `when`, is
    submitted and then the actor is killed (no restart) while the call is pending: a
    sleep queued on the actor first keeps the call from finishing before the kill lands.
    Every other attribute is the real handle's."""

    def __init__(self, handle: Any, method: str, when: Callable[..., bool] = lambda *a, **k: True):
        self._handle, self._method, self._when = handle, method, when
        self.killed = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._handle, name)
        if name != self._method:
            return attr
        proxy = self

        class _Method:
            def __init__(self, options: dict | None = None):
                self._options = options or {}

            def options(self, **options: Any) -> "_Method":  # e.g. num_returns, as the fleet calls it
                return _Method(options)

            def remote(self, *args: Any, **kwargs: Any) -> Any:
                call = attr.options(**self._options) if self._options else attr
                if proxy.killed or not proxy._when(*args, **kwargs):
                    return call.remote(*args, **kwargs)
                proxy._handle.__ray_call__.remote(_hold, 60.0)
                ref = call.remote(*args, **kwargs)
                ray.kill(proxy._handle, no_restart=True)
                proxy.killed = True
                return ref

        return _Method()


def _node_id(actor_self: Any) -> str:
    return ray.get_runtime_context().get_node_id()


class ActorClassHook:
    """Stands in for a Ray actor class (`ActorClass.options(...).remote(...)`): creates the
    real actors, records their handles in creation order plus an early query of the node
    each one runs on (answered while it lives, readable after the run), and wraps the
    `fault_index`-th actor created with `fault(handle)`."""

    def __init__(self, real: Any, fault: Callable[[Any], Any] | None = None, fault_index: int = 0):
        self.real, self.fault, self.fault_index = real, fault, fault_index
        self.handles: list[Any] = []
        self.node_refs: list[Any] = []
        self.wrapped: Any = None

    def options(self, **kwargs: Any) -> "_Creator":
        return _Creator(self, self.real.options(**kwargs))

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return _Creator(self, self.real).remote(*args, **kwargs)

    def node_ids(self) -> list[str]:
        return ray.get(self.node_refs, timeout=60)


class _Creator:
    def __init__(self, hook: ActorClassHook, creator: Any):
        self.hook, self.creator = hook, creator

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        handle = self.creator.remote(*args, **kwargs)
        hook = self.hook
        hook.handles.append(handle)
        hook.node_refs.append(handle.__ray_call__.remote(_node_id))
        if hook.fault is not None and len(hook.handles) == hook.fault_index + 1:
            hook.wrapped = hook.fault(handle)
            return hook.wrapped
        return handle


def hook_actor_class(monkeypatch, module_name: str, class_name: str, **hook_args: Any) -> ActorClassHook:
    """Stand an ActorClassHook in for `module_name.class_name` where the runtime creates those
    actors, through its fault-test seam (srpo_ray/runtime/fault_hooks.py); undone with
    `monkeypatch`."""
    from srpo_ray.runtime import fault_hooks

    module = __import__(module_name, fromlist=[class_name])
    hook = ActorClassHook(getattr(module, class_name), **hook_args)
    monkeypatch.setitem(fault_hooks.ACTOR_CLASS_WRAPPERS, class_name, lambda real: hook)
    return hook
