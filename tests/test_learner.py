"""The learner: token log-probs (pure), LearnerGroup coordination (fakes), and real
FSDP2 over gloo in real Ray actors (one Ray, one 2-rank and one 1-rank group shared by
the tests; each test starts from a saved checkpoint, so the order does not matter)."""
from __future__ import annotations

import functools
import os
import socket

import pytest
import torch

from srpo_ray.learner.batch import TrainBatch, build_train_batch, empty_batch
from srpo_ray.config.schema import SRPOConfig
from srpo_ray.learner.core import FSDPLearner, token_logprobs
from srpo_ray.runtime.learner_group import LearnerGroup
from srpo_ray.records import Prompt, RewardResult, RolloutGroup, Sample, ScoredGroup

TEMPERATURE = 0.7


# ----------------------------------------------------------------------------- pure

def test_token_logprobs_match_full_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    ids = torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.float32)
    lp, ent = token_logprobs(logits, ids, mask, temperature=0.5, with_entropy=True)
    full = torch.log_softmax(logits / 0.5, dim=-1)
    for b in range(2):
        for t in range(6):
            want = full[b, t - 1, ids[b, t]].item() if mask[b, t] else 0.0
            assert lp[b, t].item() == pytest.approx(want, abs=1e-5)
            want_h = -(full[b, t - 1].exp() * full[b, t - 1]).sum().item() if mask[b, t] else 0.0
            assert ent[b, t].item() == pytest.approx(want_h, abs=1e-5)
    with pytest.raises(ValueError, match="position 0"):
        token_logprobs(logits, ids, torch.ones(2, 6), 1.0)


# ----------------------------------------------------------------------------- group (fakes)

class _Call:
    def __init__(self, log: list, rank: int, name: str, result):
        self.log, self.rank, self.name, self.result = log, rank, name, result

    def remote(self, *args):
        self.log.append((self.rank, self.name, args))
        return self.result(self.rank, *args) if callable(self.result) else self.result


class FakeRank:
    def __init__(self, rank: int, log: list):
        self.train_step = _Call(log, rank, "train_step", lambda r, shard, d, t: {"rank": r, "d": d})
        self.full_state_dict = _Call(log, rank, "full_state_dict", lambda r: f"ref{r}")
        self.setup = _Call(log, rank, "setup", None)


def _batch(lengths: list[int], prompt_len: int = 2) -> TrainBatch:
    samples = [Sample(token_ids=[5] * n, logprobs=[-1.0] * n, text="", finish_reason="stop") for n in lengths]
    group = RolloutGroup(Prompt("p", "math", [{"role": "user", "content": "q"}], "1"),
                         list(range(1, prompt_len + 1)), samples, 0)
    scored = ScoredGroup(group, [RewardResult(float(i % 2), bool(i % 2)) for i in range(len(lengths))])
    return build_train_batch([scored], [[1.0 if i % 2 else -1.0 for i in range(len(lengths))]], pad_token_id=0)


def test_group_sends_global_denominator_and_one_shard_per_rank():
    log: list = []
    group = LearnerGroup([FakeRank(r, log) for r in range(3)], "token-mean", get=lambda refs: refs)
    batch = _batch([3, 5, 1, 4])
    metrics = group.train(batch, temperature=0.9)
    calls = [c for c in log if c[1] == "train_step"]
    assert [c[0] for c in calls] == [0, 1, 2]
    assert {c[2][1] for c in calls} == {13.0}  # response tokens of the WHOLE batch
    assert sum(c[2][0].num_sequences for c in calls) == 4
    assert metrics == {"rank": 0, "d": 13.0}
    seq = LearnerGroup([FakeRank(0, log)], "seq-mean-token-mean", get=lambda refs: refs)
    assert seq.train(batch, 1.0)["d"] == 4.0


def test_group_skips_empty_batch_and_returns_rank0_state_ref():
    log: list = []
    group = LearnerGroup([FakeRank(r, log) for r in range(2)], "token-mean", get=lambda refs: refs)
    assert group.train(empty_batch(), 1.0)["learner/skipped_empty_batch"] == 1.0
    assert not log
    assert group.state_dict_ref() == "ref0"
    assert sorted(c[0] for c in log if c[1] == "full_state_dict") == [0, 1]
    with pytest.raises(ValueError, match="num_ranks"):
        LearnerGroup([], "token-mean")


# ----------------------------------------------------------------------------- real FSDP2 (in process)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from srpo_ray.models import build_tiny_model

    # tied embeddings, as SmolLM2: exercises the tied lm_head in state dicts and saves
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")), tie_word_embeddings=True)


def _cfg(**learner) -> SRPOConfig:
    cfg = SRPOConfig()
    cfg.optim.lr = 1e-2
    cfg.optim.grad_clip = 1.0
    cfg.optim.eps = 1e-3  # see CROSS_WORLD_ATOL
    cfg.learner.micro_batch_size = 2
    cfg.learner.collective_timeout_s = 60  # a rank left waiting fails instead of hanging
    cfg.learner.cpus_per_rank = 1
    for k, v in learner.items():
        setattr(cfg.learner, k, v)
    return cfg


def _scored_batch(model_path: str, lengths: list[int], advantages: list[float], seed: int) -> TrainBatch:
    """A batch of random token sequences whose 'rollout' log-probs are the initial
    model's own (at TEMPERATURE), computed here with plain HF."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    groups, advs = [], []
    for i, (n, a) in enumerate(zip(lengths, advantages)):
        prompt = torch.randint(3, 500, (2 + i % 3,), generator=g).tolist()
        resp = torch.randint(3, 500, (n,), generator=g).tolist()
        with torch.no_grad():
            logits = model(torch.tensor([prompt + resp])).logits
        lp = torch.log_softmax(logits[0, :-1] / TEMPERATURE, -1).gather(-1, torch.tensor(prompt + resp)[1:, None])
        sample = Sample(token_ids=resp, logprobs=lp[len(prompt) - 1:, 0].tolist(), text="", finish_reason="stop")
        groups.append(ScoredGroup(RolloutGroup(Prompt(f"p{i}", "math", [], "1"), prompt, [sample], 0),
                                  [RewardResult(a, a > 0)]))
        advs.append([a])
    return build_train_batch(groups, advs, pad_token_id=0)


def test_minibatches_recompute_old_logprobs_in_process(tiny_model, monkeypatch):
    """algo.minibatches=2, one rank in this process: two optimizer steps, and the second
    chunk's ratio moves away from 1 because the first step changed the policy."""
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    cfg = _cfg()
    cfg.algo.minibatches = 2
    learner = FSDPLearner(tiny_model, cfg, rank=0, world_size=1)
    try:
        learner.setup()
        batch = _scored_batch(tiny_model, [4, 3, 5, 2], [1.0, -1.0, 1.0, -1.0], seed=3)
        metrics = learner.train_step(batch, float(batch.num_response_tokens), TEMPERATURE)
        assert metrics["learner/optimizer_steps"] == 2
        assert metrics["learner/ratio_max"] > 1.0 + 1e-4
        assert metrics["learner/logprob_mismatch"] < 1e-4  # old log-probs = the sampler's here
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- real FSDP2 in Ray actors

@pytest.fixture(scope="module")
def ray_groups(tiny_model, tmp_path_factory):
    """(2-rank group, 1-rank group, checkpoint of the initial state)."""
    ray = pytest.importorskip("ray")
    from srpo_ray.runtime.learner_group import create_learner_group

    from conftest import ensure_local_ray
    ensure_local_ray()  # the session's Ray; shut down after this module to free its actors
    try:
        cfg = _cfg()
        options = lambda rank: {"num_cpus": 0.5}  # noqa: E731
        two = create_learner_group(cfg, tiny_model, num_ranks=2, actor_options=options, setup=False)
        one = create_learner_group(cfg, tiny_model, num_ranks=1, actor_options=options, setup=False)
        for g in (two, one):  # a rank that hangs fails the test instead of blocking it
            g.get = functools.partial(ray.get, timeout=120)
        ray.get([h.setup.remote() for h in two.handles + one.handles], timeout=120)
        initial = str(tmp_path_factory.mktemp("ckpt0"))
        two.save(initial)
        yield two, one, initial
    finally:
        ray.shutdown()


def _weights(group: LearnerGroup) -> dict[str, torch.Tensor]:
    import ray

    return ray.get(group.state_dict_ref())


# Different rank counts sum gradients in a different order (rounding ~1e-7). 1e-5 is
# a thousandth of the lr (1e-2), the size of a real update: a wrong gradient differs by
# ~lr. (optim.eps=1e-3 in these tests keeps Adam from blowing the rounding of ~zero
# gradients, e.g. the key bias's, which is exactly 0, up to lr-sized steps.)
CROSS_WORLD_ATOL = 1e-5


def _assert_same_weights(a: dict, b: dict, atol: float = CROSS_WORLD_ATOL):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=lambda m: f"{k}: {m}")


def test_learner_ranks_run_at_the_drivers_priority(ray_groups):
    """Ray starts its workers at niceness 15, where every wake-up of a Ray service or the
    driver preempts them; learner ranks ask for none (RAY_worker_niceness=0)."""
    import ray

    two, one, _ = ray_groups
    niceness = ray.get([h.__ray_call__.remote(lambda self: os.nice(0)) for h in two.handles + one.handles])
    assert niceness == [os.nice(0)] * 3


def test_two_ranks_update_equals_one_rank_update(ray_groups, tiny_model):
    """Same batch, same start: the 2-rank step (gradients summed over ranks, uneven
    micro-batch counts: one rank runs a dummy pass) equals the 1-rank step. The loss
    and the pre-clip gradient norm also match, which Adam alone would hide (it is
    invariant to a gradient scale such as an accidental average over ranks)."""
    two, one, initial = ray_groups
    batch = _scored_batch(tiny_model, [6, 2, 5, 3, 4], [1.0, -1.0, 0.5, -0.5, 1.0], seed=1)
    two.load(initial)
    one.load(initial)
    for _ in range(2):
        m2 = two.train(batch, TEMPERATURE)
        m1 = one.train(batch, TEMPERATURE)
        assert m2["learner/loss"] == pytest.approx(m1["learner/loss"], rel=1e-5, abs=1e-6)
        assert m2["learner/grad_norm"] == pytest.approx(m1["learner/grad_norm"], rel=1e-4)
        assert m2["learner/response_tokens"] == m1["learner/response_tokens"] == batch.num_response_tokens
    assert m1["learner/grad_norm"] > 1.0  # clipping was active (grad_clip=1)
    _assert_same_weights(_weights(two), _weights(one))


def test_training_raises_logprobs_of_rewarded_tokens(ray_groups, tiny_model):
    two, _, initial = ray_groups
    two.load(initial)
    batch = _scored_batch(tiny_model, [5, 4, 6, 3], [1.0, 1.0, 1.0, 1.0], seed=2)
    before = two.logprobs_of(batch.input_ids, batch.attention_mask, TEMPERATURE)
    w0 = _weights(two)
    first = two.train(batch, TEMPERATURE)
    # the rollout log-probs came from these very weights, so learner and "sampler" agree
    assert first["learner/logprob_mismatch"] < 1e-4
    for _ in range(2):
        two.train(batch, TEMPERATURE)
    after = two.logprobs_of(batch.input_ids, batch.attention_mask, TEMPERATURE)
    mask = batch.response_mask.bool()
    assert after[mask].mean() > before[mask].mean() + 0.1
    assert any(not torch.equal(w0[k], v) for k, v in _weights(two).items())


def test_full_state_dict_matches_saved_hf_model(ray_groups, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    two, _, initial = ray_groups
    two.load(initial)
    two.train(_scored_batch(tiny_model, [3, 4], [1.0, -1.0], seed=4), TEMPERATURE)
    two.save(str(tmp_path))
    state = _weights(two)
    assert "lm_head.weight" in state  # tied: generators need the name anyway
    torch.testing.assert_close(state["lm_head.weight"], state["model.embed_tokens.weight"])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    _assert_same_weights(state, {k: v for k, v in hf.state_dict().items()}, atol=0)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "hf" / name).is_file()
    ids = torch.randint(3, 500, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = torch.log_softmax(hf(ids).logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(two.logprobs_of(ids)[:, 1:], want, atol=1e-5, rtol=1e-5)


def test_checkpoint_round_trip_restores_optimizer(ray_groups, tiny_model, tmp_path):
    """Save after one step, take a second: a resumed learner (same or different world
    size) takes exactly the same second step, which needs Adam's moments back."""
    two, one, initial = ray_groups
    first = _scored_batch(tiny_model, [4, 5, 3], [1.0, -1.0, 1.0], seed=6)
    second = _scored_batch(tiny_model, [3, 6, 2], [-1.0, 1.0, 1.0], seed=7)
    two.load(initial)
    two.train(first, TEMPERATURE)
    two.save(str(tmp_path))
    two.train(second, TEMPERATURE)
    uninterrupted = _weights(two)
    two.load(str(tmp_path))
    two.train(second, TEMPERATURE)
    _assert_same_weights(_weights(two), uninterrupted, atol=0)
    one.load(str(tmp_path))  # written by 2 ranks, read by 1: DCP reshards
    one.train(second, TEMPERATURE)
    _assert_same_weights(_weights(one), uninterrupted)


def test_rank_with_empty_shard_does_not_hang(ray_groups, tiny_model):
    two, one, initial = ray_groups
    batch = _scored_batch(tiny_model, [5], [1.0], seed=8)  # one sequence for two ranks
    two.load(initial)
    one.load(initial)
    m2 = two.train(batch, TEMPERATURE)  # fails after collective_timeout_s if a rank hangs
    m1 = one.train(batch, TEMPERATURE)
    assert m2["learner/sequences"] == 1 and m2["learner/optimizer_steps"] >= 1
    assert m2["learner/grad_norm"] == pytest.approx(m1["learner/grad_norm"], rel=1e-4)
    _assert_same_weights(_weights(two), _weights(one))


def test_token_budget_micro_batches_give_the_same_update(tiny_model, monkeypatch):
    """Mixed lengths trained in one pass, or in passes capped at 12 padded tokens (a
    long sequence alone, short ones together): the same loss, gradient norm and new
    weights, since the loss's denominator is the batch's, whatever the passes."""
    import torch.distributed as dist

    batch = _scored_batch(tiny_model, [9, 2, 7, 3, 1, 6, 2], [1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.25], seed=11)
    results = []
    for learner_cfg in ({"micro_batch_size": 16}, {"micro_batch_size": 16, "max_tokens_per_micro_batch": 12}):
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(_free_port()))
        learner = FSDPLearner(tiny_model, _cfg(**learner_cfg), rank=0, world_size=1)
        try:
            learner.setup()
            metrics = learner.train_step(batch, float(batch.num_response_tokens), TEMPERATURE)
            results.append((metrics, learner.full_state_dict()))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    (whole, w_whole), (capped, w_capped) = results
    assert whole["learner/loss"] == pytest.approx(capped["learner/loss"], rel=1e-5, abs=1e-7)
    assert whole["learner/grad_norm"] == pytest.approx(capped["learner/grad_norm"], rel=1e-5)
    assert capped["learner/padding_frac"] < whole["learner/padding_frac"]
    _assert_same_weights(w_whole, w_capped, atol=1e-6)
