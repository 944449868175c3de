"""KL to a frozen reference policy (algo.kl_coef > 0) in a real 2-rank FSDP2 learner in
Ray actors: the reference equals the policy before the first update, moves apart
after it, enters the loss as kl_coef * k3, and survives a checkpoint round trip
unchanged (it is rebuilt from model.path, never loaded from a checkpoint)."""
from __future__ import annotations

import functools

import pytest
from learner_cases import TEMPERATURE, learner_cfg, scored_batch

from srpo_ray.learner.plan import TrainRows

KL_COEF = 0.5


@pytest.fixture(scope="module")
def kl_group(tiny_tied_model_dir):
    from local_ray import ensure_local_ray

    ray = ensure_local_ray()
    from srpo_ray.runtime.learner_group import create_learner_group

    cfg = learner_cfg()
    cfg.algo.kl_coef = KL_COEF
    group = create_learner_group(cfg, tiny_tied_model_dir, num_ranks=2, actor_options=lambda r: {"num_cpus": 0.5},
                                 setup=False)
    group.get = functools.partial(ray.get, timeout=120)  # a hung rank fails the test
    group.setup()
    yield group
    for handle in group.handles:
        ray.kill(handle)


def test_kl_is_zero_before_the_first_update_and_positive_after(kl_group, tiny_tied_model_dir, tmp_path):
    # 5 sequences, micro-batches of 2: rank 0 runs 2 passes, rank 1 one real pass and one
    # dummy pass, which must run the reference forward too or the ranks deadlock
    batch = scored_batch(tiny_tied_model_dir, [6, 2, 5, 3, 4], [1.0, -1.0, 0.5, -0.5, 1.0], seed=1)
    first = kl_group.train(TrainRows.of_batch(batch), TEMPERATURE)
    assert first["learner/kl_ref"] == pytest.approx(0.0, abs=1e-7)
    kl_group.save(str(tmp_path))
    second = kl_group.train(TrainRows.of_batch(batch), TEMPERATURE)
    assert second["learner/kl_ref"] > 1e-5
    # token-mean: loss = pg_loss + kl_coef * (mean k3 over the batch's response tokens)
    assert second["learner/loss"] == pytest.approx(
        second["learner/pg_loss"] + KL_COEF * second["learner/kl_ref"], rel=1e-4, abs=1e-7)
    # loading the policy back leaves the reference alone: the same second step again
    kl_group.load(str(tmp_path))
    again = kl_group.train(TrainRows.of_batch(batch), TEMPERATURE)
    assert again["learner/kl_ref"] == pytest.approx(second["learner/kl_ref"], rel=1e-5)


