"""The training loop with fake roles: stage switches, History Resampling, weight
versions, checkpoints and exact resume. The real roles are tested in
test_integration.py."""
import json

import pytest

from srpo_ray.checkpoint import CheckpointManager
from srpo_ray.config import load_config
from srpo_ray.metrics import MetricsLogger
from srpo_ray.records import Prompt, RewardResult, RolloutGroup, Sample, ScoredGroup
from srpo_ray.trainer import Roles, SRPOTrainer


class FakeRollout:
    """Prompts whose id ends in 'easy' are always solved, 'hard' never, others half."""

    def __init__(self):
        self.version, self.pushes = 0, []

    def generate(self, prompts, sampling, seed):
        groups = []
        for p in prompts:
            texts = ["right" if (p.prompt_id.endswith("easy") or (not p.prompt_id.endswith("hard") and i % 2))
                     else "wrong" for i in range(sampling["n"])]
            samples = [Sample(token_ids=[5, 6], logprobs=[-0.1, -0.2], text=t, finish_reason="stop") for t in texts]
            groups.append(RolloutGroup(prompt=p, prompt_token_ids=[1, 2, 3], samples=samples,
                                       policy_version=self.version))
        return groups

    def push_weights(self, ref, version):
        self.pushes.append((ref, version))
        self.version = version

    def pop_metrics(self):
        return {"rollout/workers": 1}


class FakeRewards:
    def score(self, groups):
        return [ScoredGroup(g, [RewardResult(float(s.text == "right"), s.text == "right") for s in g.samples])
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
    # zero-variance groups never reach the learner
    for batch in roles.learner.batches:
        assert batch.advantages.abs().sum() > 0


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
