"""The learner without Ray: token log-probs (pure), LearnerGroup coordination (fakes), and
real FSDP2 over gloo with one rank in this process. (FSDP2 in real Ray actors:
tests/ray/test_learner_ray.py.)"""
from __future__ import annotations

import pytest
import torch
from learner_cases import TEMPERATURE, assert_same_weights, free_port, learner_cfg, scored_batch

from srpo_ray.learner.core import FSDPLearner, token_logprobs
from srpo_ray.learner.plan import TrainRows, select_train_rows
from srpo_ray.records import Prompt, RewardResult, RolloutGroup, Sample, ScoredGroup
from srpo_ray.runtime.learner_group import LearnerGroup, LearnerRankDiedError
from srpo_ray.weights.transport import PublishedWeights

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
        self.publish_weights = _Call(log, rank, "publish_weights",
                                     lambda r, transport: PublishedWeights(transport, []) if r == 0 else None)
        self.setup = _Call(log, rank, "setup", None)


def _rows(lengths: list[int], prompt_len: int = 2) -> TrainRows:
    samples = [Sample(token_ids=[5] * n, logprobs=[-1.0] * n, text="", finish_reason="stop") for n in lengths]
    group = RolloutGroup.of(Prompt("p", "math", [{"role": "user", "content": "q"}], "1"),
                         list(range(1, prompt_len + 1)), samples, 0)
    scored = ScoredGroup(group, [RewardResult(float(i % 2), bool(i % 2)) for i in range(len(lengths))])
    return select_train_rows([scored], [[1.0 if i % 2 else -1.0 for i in range(len(lengths))]], pad_token_id=0)


def test_group_sends_global_denominator_and_one_shard_per_rank():
    log: list = []
    group = LearnerGroup([FakeRank(r, log) for r in range(3)], "token-mean", get=lambda refs: refs)
    rows = _rows([3, 5, 1, 4])
    metrics = group.train(rows, temperature=0.9)
    calls = [c for c in log if c[1] == "train_step"]
    assert [c[0] for c in calls] == [0, 1, 2]
    assert {c[2][1] for c in calls} == {13.0}  # response tokens of the WHOLE batch
    assert sorted(len(c[2][0].rows) for c in calls) == [1, 1, 2]
    # real tokens per rank (prompt 2 + response): 7 | 6 | 5 + 3 = 8; mean 7
    assert metrics == {"rank": 0, "d": 13.0, "learner/rank_token_imbalance": pytest.approx(8 / 7)}
    seq = LearnerGroup([FakeRank(0, log)], "seq-mean-token-mean", get=lambda refs: refs)
    assert seq.train(rows, 1.0)["d"] == 4.0


def test_group_skips_empty_batch_and_publishes_rank0s_record():
    log: list = []
    ranks = [FakeRank(r, log) for r in range(2)]
    group = LearnerGroup(ranks, "token-mean", get=lambda refs: refs)
    assert group.train(TrainRows([], {}, 0), 1.0)["learner/skipped_empty_batch"] == 1.0
    assert not log
    published = group.publish_weights("object_store")
    assert published.transport == "object_store" and published.sources == []  # rank 0 sends alone
    assert sorted(c[0] for c in log if c[1] == "publish_weights") == [0, 1]  # every rank joins the gather
    assert group.publish_weights("nccl").sources == ranks  # each send gathers on every rank
    with pytest.raises(ValueError, match="num_ranks"):
        LearnerGroup([], "token-mean")


def test_a_dead_learner_rank_names_its_log_file():
    class Rank:
        class setup:
            @staticmethod
            def remote():
                return "ref"

    def get(refs):
        raise RuntimeError("connection closed")
    group = LearnerGroup([Rank(), Rank()], "token-mean", get=get, last_checkpoint=lambda: "runs/x/step_000004",
                         dead_rank=lambda e, refs, ranks: (1, RuntimeError("the actor died: SIGKILL")))
    group.log_dir = "/runs/x/logs"
    with pytest.raises(LearnerRankDiedError, match=r"resume to continue from runs/x/step_000004\. Its output: "
                                                   r"/runs/x/logs/learner-1\.log\. Ray's report: the actor died"):
        group.setup()


# ----------------------------------------------------------------------------- real FSDP2 (in process)


def test_minibatches_recompute_old_logprobs_in_process(tiny_tied_model_dir, monkeypatch):
    """algo.minibatches=2, one rank in this process: two optimizer steps, and the second
    chunk's ratio moves away from 1 because the first step changed the policy."""
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    cfg = learner_cfg()
    cfg.algo.minibatches = 2
    learner = FSDPLearner(tiny_tied_model_dir, cfg, rank=0, world_size=1)
    try:
        learner.setup()
        batch = scored_batch(tiny_tied_model_dir, [4, 3, 5, 2], [1.0, -1.0, 1.0, -1.0], seed=3)
        metrics = learner.train_step(batch, float(batch.num_response_tokens), TEMPERATURE)
        assert metrics["learner/optimizer_steps"] == 2
        assert metrics["learner/ratio_max"] > 1.0 + 1e-4
        assert metrics["learner/logprob_mismatch"] < 1e-4  # old log-probs = the sampler's here
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- real FSDP2 in Ray actors


def test_token_budget_micro_batches_give_the_same_update(tiny_tied_model_dir, monkeypatch):
    """Mixed lengths trained in one pass, or in passes capped at 12 padded tokens (a
    long sequence alone, short ones together): the same loss, gradient norm and new
    weights, since the loss's denominator is the batch's, whatever the passes."""
    import torch.distributed as dist

    batch = scored_batch(tiny_tied_model_dir, [9, 2, 7, 3, 1, 6, 2], [1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.25], seed=11)
    results = []
    for overrides in ({"micro_batch_size": 16}, {"micro_batch_size": 16, "max_tokens_per_micro_batch": 12}):
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        learner = FSDPLearner(tiny_tied_model_dir, learner_cfg(**overrides), rank=0, world_size=1)
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
    assert_same_weights(w_whole, w_capped, atol=1e-6)


def test_config_rejects_negative_kl_coef():
    from srpo_ray.config.load import ConfigError, load_config

    with pytest.raises(ConfigError, match="algo.kl_coef"):
        load_config(None, ["algo.kl_coef=-0.1"])
