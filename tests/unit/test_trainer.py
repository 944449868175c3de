"""The training loop with fake roles: stage switches, History Resampling, weight
versions, checkpoints and exact resume. The real roles are tested in
test_integration.py."""
import json

import pytest

from srpo_ray.config.load import load_config
from srpo_ray.loop.checkpoint import CheckpointManager
from srpo_ray.loop.trainer import Roles, SRPOTrainer
from srpo_ray.records import Prompt, RewardResult, RolloutGroup, Sample, ScoredGroup
from srpo_ray.telemetry.metrics import MetricsLogger


class FakeRollout:
    """Prompts whose id ends in 'easy' are always solved, 'hard' never, others half."""

    def __init__(self):
        self.version, self.pushes = 0, []

    def generate(self, prompts, sampling):
        groups = []
        for p in prompts:
            texts = ["right" if (p.prompt_id.endswith("easy") or (not p.prompt_id.endswith("hard") and i % 2))
                     else "wrong" for i in range(sampling.n)]
            samples = [Sample(token_ids=[5, 6], logprobs=[-0.1, -0.2], text=t, finish_reason="stop") for t in texts]
            groups.append(RolloutGroup.of(prompt=p, prompt_token_ids=[1, 2, 3], samples=samples,
                                       policy_version=self.version))
        return groups

    def push_weights(self, ref, version):
        self.pushes.append((ref, version))
        self.version = version

    def pop_metrics(self):
        return {"rollout/workers": 1}


class FakeRewards:
    def score(self, groups):
        return [ScoredGroup(g, [RewardResult(float(t == "right"), t == "right") for t in g.texts])
                for g in groups]


class FakeLearner:
    def __init__(self):
        self.batches, self.saved = [], 0

    def train(self, batch, temperature):
        self.batches.append(batch)
        return {"train/loss": 0.5}

    def publish_weights(self):
        return f"weights-{len(self.batches)}"

    def save(self, directory):
        (__import__("pathlib").Path(directory) / "learner.txt").write_text(str(len(self.batches)))

    def load(self, directory):
        pass


def prompts():
    out = []
    for i in range(4):
        for kind in ("easy", "hard", "mixed"):
            out.append(Prompt(f"m{i}-{kind}", "math", [{"role": "user", "content": "q"}], "1"))
    out += [Prompt(f"c{i}-mixed", "code", [{"role": "user", "content": "code"}], "x") for i in range(3)]
    return out


def make_trainer(tmp_path, *overrides):
    cfg = load_config(None, ["trainer.prompts_per_step=4", "rollout.n=4", "trainer.total_steps=8",
                             f"trainer.run_dir={tmp_path}", "stages.0.until_epochs=1", *overrides])
    roles = Roles(FakeRollout(), FakeRewards(), FakeLearner())
    metrics = MetricsLogger(tmp_path, cfg.trainer.total_steps, progress_bar=False)
    return SRPOTrainer(cfg, prompts(), roles, 0, metrics, CheckpointManager(tmp_path)), roles


def read_metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_stage_one_is_math_only_then_history_resampling_then_stage_two(tmp_path):
    trainer, roles = make_trainer(tmp_path)
    trainer.fit()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 9))
    stage_one = [r for r in rows if r["stage"] == 0]
    assert len(stage_one) == 3  # 12 math prompts / 4 per step = one epoch
    assert all("reward/code/mean" not in r for r in stage_one)
    switch = rows[3]
    assert switch["stage"] == 1 and switch["epoch/dropped"] == 4 and switch["pool/removed"] == 4
    assert any("reward/code/mean" in r for r in rows[3:])
    removed = trainer.ledger.state_dict()
    assert trainer.ledger.num_removed == 4 and trainer.ledger.pool_size == 8 + 3
    del removed


def test_versions_advance_only_when_something_was_learned(tmp_path):
    trainer, roles = make_trainer(tmp_path, "trainer.total_steps=3")
    trainer.fit()
    rows = read_metrics(tmp_path)
    trained = [r for r in rows if "train/loss" in r]
    assert [r["policy/version"] for r in trained] == list(range(1, len(trained) + 1))
    assert [v for _, v in roles.rollout.pushes] == list(range(1, len(trained) + 1))
    # a sync's time is split: the learner's publish is part of the whole
    assert all(0 <= r["time/weight_publish"] <= r["time/weight_sync"] for r in trained)
    # zero-variance groups never reach the learner
    for rows in roles.learner.batches:
        assert sum(abs(a) for a in rows.advantages) > 0


def test_resume_continues_at_the_next_step_with_the_same_ledger(tmp_path):
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    full, _ = make_trainer(full_dir, "trainer.save_every=1")
    full.fit()
    part, _ = make_trainer(part_dir, "trainer.total_steps=4")
    part.fit()
    resumed, _ = make_trainer(part_dir)
    assert resumed.resume() is not None and resumed.step == 4
    assert resumed.ledger.state_dict().keys() == part.ledger.state_dict().keys()
    resumed.fit()
    full_rows, part_rows = read_metrics(full_dir), read_metrics(part_dir)
    assert [r["step"] for r in part_rows] == list(range(1, 9))
    for a, b in zip(full_rows, part_rows):
        for key in ("stage", "epoch", "pool/size", "policy/version", "reward/mean"):
            assert a.get(key) == b.get(key), (a["step"], key)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    trainer, _ = make_trainer(tmp_path, "trainer.total_steps=1")
    assert trainer.resume() is None
    trainer.fit()
    assert read_metrics(tmp_path)[0]["step"] == 1


def test_stale_rollouts_are_an_error(tmp_path):
    trainer, roles = make_trainer(tmp_path)
    roles.rollout.version = 7
    with pytest.raises(RuntimeError, match="missed a weight update"):
        trainer.fit()


def test_a_stage_trains_on_a_plugin_domain(tmp_path):
    cfg = load_config(None, ["trainer.prompts_per_step=4", "rollout.n=4", "trainer.total_steps=3",
                             f"trainer.run_dir={tmp_path}", "stages=[{name: words, domains: [wordplay]}]"])
    words = [Prompt(f"w{i}-mixed", "wordplay", [{"role": "user", "content": "w"}], {"any": "truth"},
                    data_source="wordplay") for i in range(6)]
    metrics = MetricsLogger(tmp_path, cfg.trainer.total_steps, progress_bar=False)
    trainer = SRPOTrainer(cfg, prompts() + words, Roles(FakeRollout(), FakeRewards(), FakeLearner()), 0, metrics,
                          CheckpointManager(tmp_path))
    trainer.fit()
    rows = read_metrics(tmp_path)
    assert all(r["reward/wordplay/mean"] == 0.5 and "reward/math/mean" not in r for r in rows)


def weighted_trainer(run_dir, *overrides):
    """One math stage over a 3-prompt source and a 30-prompt one, drawn half and half."""
    cfg = load_config(None, ["trainer.prompts_per_step=4", "rollout.n=4", "trainer.total_steps=40",
                             f"trainer.run_dir={run_dir}", "stages=[{name: math, domains: [math]}]",
                             "data.source_weights={small: 1, big: 1}", *overrides])
    data = [Prompt(f"{source}{i}-mixed", "math", [{"role": "user", "content": "q"}], "1", data_source=source)
            for source, n in (("small", 3), ("big", 30)) for i in range(n)]
    metrics = MetricsLogger(run_dir, cfg.trainer.total_steps, progress_bar=False)
    return SRPOTrainer(cfg, data, Roles(FakeRollout(), FakeRewards(), FakeLearner()), 0, metrics,
                       CheckpointManager(run_dir))


def test_the_realised_source_mix_is_a_metric_that_follows_the_weights(tmp_path):
    weighted_trainer(tmp_path).fit()
    rows = read_metrics(tmp_path)
    draws = 40 * 4
    small = sum(r["data/source_frac/small"] * 4 for r in rows)
    assert all(r["data/source_frac/small"] + r["data/source_frac/big"] == 1 for r in rows)
    assert abs(small - draws / 2) <= 4 * (draws * 0.25) ** 0.5  # 4 binomial std (fixed seed)
    assert small > 3 * 10  # the 3-prompt source repeats: about 80 of 160 draws


def test_unweighted_runs_have_no_source_mix_metrics(tmp_path):
    trainer, _ = make_trainer(tmp_path, "trainer.total_steps=2")
    trainer.fit()
    assert not any(k.startswith("data/source_frac") for r in read_metrics(tmp_path) for k in r)


def test_resume_with_source_weights_repeats_the_uninterrupted_run(tmp_path):
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    weighted_trainer(full_dir, "trainer.total_steps=12").fit()
    weighted_trainer(part_dir, "trainer.total_steps=5").fit()
    resumed = weighted_trainer(part_dir, "trainer.total_steps=12")
    assert resumed.resume() is not None and resumed.step == 5
    resumed.fit()
    keys = ("data/source_frac/small", "pool/size", "epoch", "reward/mean")
    assert [[r[k] for k in keys] for r in read_metrics(full_dir)] == \
        [[r[k] for k in keys] for r in read_metrics(part_dir)]
    assert [r["step"] for r in read_metrics(part_dir)] == list(range(1, 13))


def test_a_weight_for_a_source_not_in_the_data_stops_the_trainer(tmp_path):
    with pytest.raises(Exception, match=r"data.source_weights: no rows with data_source \['smal'\]"):
        weighted_trainer(tmp_path, "data.source_weights={smal: 1, small: 1, big: 1}")


def test_a_ledger_seeded_from_the_pre_pass_starts_without_the_solved_prompts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from srpo_ray.data.verl_rows import DataError

    seed = tmp_path / "rates.parquet"
    pq.write_table(pa.table({"prompt_id": ["m0-easy", "m1-hard", "c0-mixed", "elsewhere"], "k": [4, 4, 4, 4],
                             "correct": [4, 0, 4, 4], "pass_rate": [1.0, 0.0, 1.0, 1.0]}), seed)
    trainer, _ = make_trainer(tmp_path / "run", "trainer.total_steps=1", f"resample.seed_from={seed}")
    trainer.fit()
    assert trainer.ledger.num_removed == 2 and trainer.ledger.pool_size == 11  # 12 math prompts, m0-easy out
    assert read_metrics(tmp_path / "run")[0]["epoch"] == 1  # training's first epoch is epoch 1
    pq.write_table(pa.table({"prompt_id": ["other"], "k": [4], "correct": [1], "pass_rate": [0.25]}), seed)
    trainer, _ = make_trainer(tmp_path / "run2", "trainer.total_steps=1", f"resample.seed_from={seed}")
    with pytest.raises(DataError, match="none of its 1 prompt ids is a training prompt's"):
        trainer.fit()
