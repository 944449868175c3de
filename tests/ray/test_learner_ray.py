"""The learner in real Ray actors: FSDP2 over gloo, one 2-rank and one 1-rank group
shared by the tests (each starts from a saved checkpoint, so the order does not matter).
(Token log-probs, LearnerGroup with fakes and in-process FSDP2: tests/unit/test_learner.py.)"""
from __future__ import annotations

import functools
import os

import pytest
import torch
from learner_cases import TEMPERATURE, assert_same_weights, learner_cfg, scored_batch

from srpo_ray.learner.plan import TrainRows
from srpo_ray.runtime.learner_group import LearnerGroup


@pytest.fixture(scope="module")
def ray_groups(tiny_tied_model_dir, tmp_path_factory):
    """(2-rank group, 1-rank group, checkpoint of the initial state)."""
    ray = pytest.importorskip("ray")
    from local_ray import ensure_local_ray

    from srpo_ray.runtime.learner_group import create_learner_group
    ensure_local_ray()  # the session's Ray; shut down after this module to free its actors
    try:
        cfg = learner_cfg()
        options = lambda rank: {"num_cpus": 0.5}  # noqa: E731
        two = create_learner_group(cfg, tiny_tied_model_dir, num_ranks=2, actor_options=options, setup=False)
        one = create_learner_group(cfg, tiny_tied_model_dir, num_ranks=1, actor_options=options, setup=False)
        for g in (two, one):  # a rank that hangs fails the test instead of blocking it
            g.get = functools.partial(ray.get, timeout=120)
        ray.get([h.setup.remote() for h in two.handles + one.handles], timeout=120)
        initial = str(tmp_path_factory.mktemp("ckpt0"))
        two.save(initial)
        yield two, one, initial
    finally:
        ray.shutdown()


def _weights(group: LearnerGroup) -> dict[str, torch.Tensor]:
    from published_weights import learner_weights

    return learner_weights(group)


def test_learner_ranks_run_at_the_drivers_priority(ray_groups):
    """Ray starts its workers at niceness 15, where every wake-up of a Ray service or the
    driver preempts them; learner ranks ask for none (RAY_worker_niceness=0)."""
    import ray

    two, one, _ = ray_groups
    niceness = ray.get([h.__ray_call__.remote(lambda self: os.nice(0)) for h in two.handles + one.handles])
    assert niceness == [os.nice(0)] * 3


def test_two_ranks_update_equals_one_rank_update(ray_groups, tiny_tied_model_dir):
    """Same batch, same start: the 2-rank step (gradients summed over ranks, uneven
    micro-batch counts: one rank runs a dummy pass) equals the 1-rank step. The loss
    and the pre-clip gradient norm also match, which Adam alone would hide (it is
    invariant to a gradient scale such as an accidental average over ranks)."""
    two, one, initial = ray_groups
    batch = scored_batch(tiny_tied_model_dir, [6, 2, 5, 3, 4], [1.0, -1.0, 0.5, -0.5, 1.0], seed=1)
    two.load(initial)
    one.load(initial)
    for _ in range(2):
        m2 = two.train(TrainRows.of_batch(batch), TEMPERATURE)
        m1 = one.train(TrainRows.of_batch(batch), TEMPERATURE)
        assert m2["learner/loss"] == pytest.approx(m1["learner/loss"], rel=1e-5, abs=1e-6)
        assert m2["learner/grad_norm"] == pytest.approx(m1["learner/grad_norm"], rel=1e-4)
        assert m2["learner/response_tokens"] == m1["learner/response_tokens"] == batch.num_response_tokens
    assert m1["learner/grad_norm"] > 1.0  # clipping was active (grad_clip=1)
    assert_same_weights(_weights(two), _weights(one))


def test_training_raises_logprobs_of_rewarded_tokens(ray_groups, tiny_tied_model_dir):
    two, _, initial = ray_groups
    two.load(initial)
    batch = scored_batch(tiny_tied_model_dir, [5, 4, 6, 3], [1.0, 1.0, 1.0, 1.0], seed=2)
    before = two.logprobs_of(batch.input_ids, batch.attention_mask, TEMPERATURE)
    w0 = _weights(two)
    first = two.train(TrainRows.of_batch(batch), TEMPERATURE)
    # the rollout log-probs came from these very weights, so learner and "sampler" agree
    assert first["learner/logprob_mismatch"] < 1e-4
    for _ in range(2):
        two.train(TrainRows.of_batch(batch), TEMPERATURE)
    after = two.logprobs_of(batch.input_ids, batch.attention_mask, TEMPERATURE)
    mask = batch.response_mask.bool()
    assert after[mask].mean() > before[mask].mean() + 0.1
    assert any(not torch.equal(w0[k], v) for k, v in _weights(two).items())


def test_full_state_dict_matches_saved_hf_model(ray_groups, tiny_tied_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    two, _, initial = ray_groups
    two.load(initial)
    two.train(TrainRows.of_batch(scored_batch(tiny_tied_model_dir, [3, 4], [1.0, -1.0], seed=4)), TEMPERATURE)
    two.save(str(tmp_path))
    state = _weights(two)
    assert "lm_head.weight" in state  # tied: generators need the name anyway
    torch.testing.assert_close(state["lm_head.weight"], state["model.embed_tokens.weight"])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert_same_weights(state, {k: v for k, v in hf.state_dict().items()}, atol=0)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "hf" / name).is_file()
    ids = torch.randint(3, 500, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = torch.log_softmax(hf(ids).logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(two.logprobs_of(ids)[:, 1:], want, atol=1e-5, rtol=1e-5)


def test_checkpoint_round_trip_restores_optimizer(ray_groups, tiny_tied_model_dir, tmp_path):
    """Save after one step, take a second: a resumed learner (same or different world
    size) takes exactly the same second step, which needs Adam's moments back."""
    two, one, initial = ray_groups
    first = scored_batch(tiny_tied_model_dir, [4, 5, 3], [1.0, -1.0, 1.0], seed=6)
    second = scored_batch(tiny_tied_model_dir, [3, 6, 2], [-1.0, 1.0, 1.0], seed=7)
    two.load(initial)
    two.train(TrainRows.of_batch(first), TEMPERATURE)
    two.save(str(tmp_path))
    two.train(TrainRows.of_batch(second), TEMPERATURE)
    uninterrupted = _weights(two)
    two.load(str(tmp_path))
    two.train(TrainRows.of_batch(second), TEMPERATURE)
    assert_same_weights(_weights(two), uninterrupted, atol=0)
    one.load(str(tmp_path))  # written by 2 ranks, read by 1: DCP reshards
    one.train(TrainRows.of_batch(second), TEMPERATURE)
    assert_same_weights(_weights(one), uninterrupted)


def test_rank_with_empty_shard_does_not_hang(ray_groups, tiny_tied_model_dir):
    two, one, initial = ray_groups
    batch = scored_batch(tiny_tied_model_dir, [5], [1.0], seed=8)  # one sequence for two ranks
    two.load(initial)
    one.load(initial)
    m2 = two.train(TrainRows.of_batch(batch), TEMPERATURE)  # fails after collective_timeout_s if a rank hangs
    m1 = one.train(TrainRows.of_batch(batch), TEMPERATURE)
    assert m2["learner/sequences"] == 1 and m2["learner/optimizer_steps"] >= 1
    assert m2["learner/grad_norm"] == pytest.approx(m1["learner/grad_norm"], rel=1e-4)
    assert_same_weights(_weights(two), _weights(one))
