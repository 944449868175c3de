"""Batch collectors (srpo_ray/loop/collect.py) with fakes: one round (SRPO) and DAPO-style
dynamic sampling, alone and inside the trainer loop (fake roles from test_trainer)."""
import json

import pytest
from test_trainer import make_trainer, read_metrics

from srpo_ray.config.load import AlgoConfig, ConfigError, load_config
from srpo_ray.loop.collect import DynamicSampling, SingleRound, has_reward_variance, make_collector
from srpo_ray.records import Prompt, RewardResult, RolloutGroup, Sample, ScoredGroup


def group(prompt_id: str, rewards: list[float]) -> ScoredGroup:
    samples = [Sample([1], [-0.1], "", "stop") for _ in rewards]
    rollout = RolloutGroup.of(Prompt(prompt_id, "math", [], "1"), [1], samples, 0)
    return ScoredGroup(rollout, [RewardResult(r, r > 0) for r in rewards])


class ScriptedPool:
    """Prompt ids "p0", "p1", ...; a prompt has reward variance iff its index is in
    `varied`. Records every draw and round."""

    def __init__(self, varied: set[int], size: int = 100):
        self.varied, self.size, self.next = varied, size, 0
        self.draws: list[int] = []
        self.rounds: list[tuple[list[str], int]] = []

    def draw(self, k: int) -> list[str]:
        self.draws.append(k)
        ids = [f"p{i}" for i in range(self.next, min(self.size, self.next + k))]
        self.next += len(ids)
        return ids

    def run_round(self, ids: list[str], round_index: int) -> list[ScoredGroup]:
        self.rounds.append((list(ids), round_index))
        return [group(i, [0.0, 1.0] if int(i[1:]) in self.varied else [1.0, 1.0]) for i in ids]


def test_has_reward_variance():
    assert has_reward_variance(group("a", [0.0, 1.0]))
    assert not has_reward_variance(group("a", [1.0, 1.0]))
    assert not has_reward_variance(group("a", [0.0, 0.0]))


def test_single_round_keeps_every_group_and_draws_nothing_more():
    pool = ScriptedPool(varied={1})
    out = SingleRound().collect(pool.draw(4), 4, pool.draw, pool.run_round)
    assert [g.group.prompt.prompt_id for g in out.train] == ["p0", "p1", "p2", "p3"]
    assert out.generated == out.train and pool.draws == [4] and len(pool.rounds) == 1
    assert out.metrics == {"collect/rounds": 1.0, "collect/prompts_drawn": 4.0, "collect/groups_kept": 4.0}


def test_dynamic_sampling_draws_until_the_batch_is_full_of_varied_groups():
    pool = ScriptedPool(varied={0, 2, 5, 6, 7, 9})
    out = DynamicSampling(max_rounds=5).collect(pool.draw(4), 4, pool.draw, pool.run_round)
    # round 0: p0-p3 keeps p0, p2 (yield 1/2) -> round 1 draws 2 / (1/2) = 4: p4-p7 keeps p5, p6, p7
    assert pool.draws == [4, 4]
    assert [r for _, r in pool.rounds] == [0, 1]
    kept = [g.group.prompt.prompt_id for g in out.train]
    assert kept == ["p0", "p2", "p5", "p6"]  # p7 had variance too: trimmed to the target, in draw order
    assert all(has_reward_variance(g) for g in out.train)
    assert len(out.generated) == 8  # dropped groups still come back (the trainer records them)
    assert out.metrics == {"collect/rounds": 2.0, "collect/prompts_drawn": 8.0,
                           "collect/groups_kept": 4.0, "collect/filled": 1.0}


def test_dynamic_sampling_stops_at_the_round_cap_and_trains_on_what_it_has():
    pool = ScriptedPool(varied={3})
    out = DynamicSampling(max_rounds=3).collect(pool.draw(4), 4, pool.draw, pool.run_round)
    assert len(pool.rounds) == 3
    assert pool.draws == [4, 4, 4]  # yield 1/4 -> shortfall 3 / (1/4) = 12, capped at the target
    assert [g.group.prompt.prompt_id for g in out.train] == ["p3"]
    assert out.metrics["collect/filled"] == 0.0 and out.metrics["collect/prompts_drawn"] == 12.0


def test_dynamic_sampling_with_no_varied_group_yet_draws_a_full_batch():
    pool = ScriptedPool(varied=set())
    out = DynamicSampling(max_rounds=2).collect(pool.draw(3), 3, pool.draw, pool.run_round)
    assert pool.draws == [3, 3] and out.train == [] and len(out.generated) == 6


def test_dynamic_sampling_stops_when_the_ledger_has_no_more_prompts():
    pool = ScriptedPool(varied={0}, size=6)
    out = DynamicSampling(max_rounds=10).collect(pool.draw(4), 4, pool.draw, pool.run_round)
    assert len(pool.rounds) == 2 and pool.draws[-1] > 0 and len(out.generated) == 6
    assert out.metrics["collect/rounds"] == 2.0 and len(out.train) == 1


def test_make_collector_and_bad_round_cap():
    assert isinstance(make_collector(AlgoConfig()), SingleRound)
    chosen = make_collector(AlgoConfig(dynamic_sampling=True, dynamic_sampling_max_rounds=7))
    assert isinstance(chosen, DynamicSampling) and chosen.max_rounds == 7
    with pytest.raises(ValueError, match="dynamic_sampling_max_rounds"):
        DynamicSampling(0)
    with pytest.raises(ConfigError, match="algo.dynamic_sampling_max_rounds"):
        load_config(None, ["algo.dynamic_sampling_max_rounds=0"])


# ----------------------------------------------------------------------------- in the loop

def test_trainer_with_dynamic_sampling_trains_only_varied_groups_and_records_all(tmp_path):
    """Fake prompts: 'easy' always right, 'hard' always wrong, 'mixed' half right. Every
    trained group has reward variance, every generated group (dropped ones too) reaches
    the ledger, so History Resampling still removes the easy prompts."""
    trainer, roles = make_trainer(tmp_path, "algo.dynamic_sampling=true", "algo.dynamic_sampling_max_rounds=3",
                                  "metrics.rollouts_per_step=100")
    trainer.fit()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r in rows:
        assert r["collect/groups_kept"] <= 4 and 1 <= r["collect/rounds"] <= 3
        assert r["collect/prompts_drawn"] == r["groups/count"]
    assert any(r["collect/rounds"] > 1 for r in rows)
    for batch in (rows.build() for rows in roles.learner.batches):  # n=4 samples per kept group, all varied
        assert batch.input_ids.shape[0] % 4 == 0
        assert (batch.advantages.view(-1, 4).abs().sum(dim=1) > 0).all()
    # the easy prompts were only ever dropped from batches, yet the ledger saw them
    assert trainer.ledger.num_removed == 4
    # a step never spans two stages: its rollouts are all math while stage 0 is current
    dumped = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    stage_of = {r["step"]: r["stage"] for r in rows}
    assert all(g["domain"] == "math" for g in dumped if stage_of[g["step"]] == 0)
    assert sum(len([g for g in dumped if g["step"] == r["step"]]) for r in rows) == sum(
        r["collect/prompts_drawn"] for r in rows)


def test_each_round_samples_with_the_seeds_it_always_had(tmp_path):
    """Step s's round r is one generate call seeded (rollout.seed + s + r * 1_000_003) *
    1_000_000 (records.rollout_seed), as before the one seed rule: same seeds, same samples."""
    trainer, roles = make_trainer(tmp_path, "algo.dynamic_sampling=true", "algo.dynamic_sampling_max_rounds=3",
                                  "rollout.seed=5")
    seeds, generate = [], roles.rollout.generate
    roles.rollout.generate = lambda prompts, sampling: seeds.append(sampling.seed) or generate(prompts, sampling)
    trainer.fit()
    rounds = [int(r["collect/rounds"]) for r in read_metrics(tmp_path)]
    assert any(n > 1 for n in rounds)
    assert seeds == [(5 + step + r * 1_000_003) * 1_000_000
                     for step, n in enumerate(rounds, start=1) for r in range(n)]


def test_dynamic_sampling_resumes_exactly(tmp_path):
    overrides = ("algo.dynamic_sampling=true", "algo.dynamic_sampling_max_rounds=3")
    full, _ = make_trainer(tmp_path / "full", *overrides)
    full.fit()
    part, _ = make_trainer(tmp_path / "part", *overrides, "trainer.total_steps=4")
    part.fit()
    resumed, _ = make_trainer(tmp_path / "part", *overrides)
    resumed.resume()
    resumed.fit()
    keys = ("stage", "epoch", "pool/size", "collect/rounds", "collect/prompts_drawn", "reward/mean")
    for a, b in zip(read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")):
        assert [a.get(k) for k in keys] == [b.get(k) for k in keys], a["step"]
