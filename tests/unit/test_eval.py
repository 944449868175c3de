"""Evaluation without Ray: the score estimators against closed forms, majority-vote
ties, the evaluator on fake roles, and evaluation leaving training untouched. The
real roles (vLLM, sandbox) are exercised in test_eval_run.py."""
from __future__ import annotations

import json
from fractions import Fraction
from itertools import combinations
from math import comb

import pytest
from test_trainer import FakeRewards, FakeRollout, make_trainer, read_metrics

from srpo_ray.config.load import ConfigError, EvalConfig, load_config
from srpo_ray.eval.report import before_after_table, markdown_table, run_summary
from srpo_ray.eval.runner import Evaluator, first_per_source
from srpo_ray.eval.scores import CORRECT_CLASS, ProblemResult, aggregate, answer_class, majority_correct, pass_at_k
from srpo_ray.records import Prompt, RolloutGroup, Sample

# -- estimators ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n, c", [(1, 0), (1, 1), (4, 0), (4, 1), (4, 3), (8, 2), (12, 5), (12, 11)])
def test_pass_at_k_is_the_chance_that_some_k_subset_holds_a_correct_sample(n, c):
    samples = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        subsets = list(combinations(samples, k))
        exact = Fraction(sum(any(s) for s in subsets), len(subsets))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_with_many_samples_matches_the_closed_form():
    assert pass_at_k(64, 1, 1) == pytest.approx(1 / 64)
    assert pass_at_k(64, 1, 64) == 1.0 and pass_at_k(64, 0, 32) == 0.0
    assert pass_at_k(64, 3, 8) == pytest.approx(1 - comb(61, 8) / comb(64, 8))


def test_pass_at_k_refuses_impossible_counts():
    for n, c, k in [(4, 5, 1), (4, 1, 0), (4, 1, 5)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_majority_vote_counts_correct_answers_as_one_class():
    votes = [answer_class(a, c) for a, c in [("12", True), ("12.0", True), ("13", False), ("x", False)]]
    assert majority_correct(votes) == 1.0
    wrong_wins = [answer_class(a, c) for a, c in [("12", True), ("13", False), ("13.0", False), ("26/2", False)]]
    assert answer_class("13.0", False) == answer_class("13", False)  # the same number, one class
    assert majority_correct(wrong_wins) == 0.0


def test_majority_vote_ties_score_the_chance_of_breaking_them_right():
    assert majority_correct([CORRECT_CLASS, ("text", "a")]) == 0.5
    assert majority_correct([CORRECT_CLASS, ("text", "a"), ("text", "b")]) == pytest.approx(1 / 3)
    assert majority_correct([CORRECT_CLASS, CORRECT_CLASS, ("text", "a"), ("text", "a"), None, None]) == 0.5
    assert majority_correct([("text", "a"), ("text", "a"), CORRECT_CLASS]) == 0.0
    assert majority_correct([None, None]) == 0.0  # nobody answered


def test_answers_vote_by_value_or_by_text_without_spaces():
    assert answer_class(" x + 1", False) == answer_class("x+1", False)
    assert answer_class("1,000", False) == answer_class("1000", False)
    assert answer_class(None, False) is None and answer_class("  ", False) is None


def problem(source, correct, answers=None, domain="math", greedy=None):
    return ProblemResult("p", source, domain, correct, answers or [str(int(c)) for c in correct],
                         [10] * len(correct), [False] * len(correct), greedy)


def test_aggregate_averages_over_problems():
    problems = [problem("s", [True, True, False, False], greedy=True), problem("s", [False] * 4, greedy=False)]
    scores = aggregate(problems, 4, [1, 2, 4])
    assert scores["avg@4"] == 0.25 and scores["pass@1"] == 0.25
    assert scores["pass@2"] == pytest.approx((1 - comb(2, 2) / comb(4, 2)) / 2)
    assert scores["pass@4"] == 0.5 and scores["greedy"] == 0.5 and scores["problems"] == 2
    assert scores["maj@4"] == pytest.approx(0.5 / 2)  # problem 1: two right vs two "0": a tie
    assert "maj@4" not in aggregate([problem("s", [True], domain="code")], 1, [1])


# -- the evaluator on fake roles -----------------------------------------------------------------

def eval_prompts():
    return ([Prompt(f"e{i}-easy", "math", [{"role": "user", "content": "q"}], "1", data_source="a") for i in range(3)]
            + [Prompt(f"e{i}-hard", "math", [{"role": "user", "content": "q"}], "1", data_source="b")
               for i in range(5)])


class RecordingRollout(FakeRollout):
    def __init__(self):
        super().__init__()
        self.calls = []

    def generate(self, prompts, sampling):
        self.calls.append((len(prompts), sampling))
        return super().generate(prompts, sampling)


def test_evaluator_scores_each_source_and_pools_them():
    rollout = RecordingRollout()
    ev = Evaluator(EvalConfig(k=4, batch_prompts=3), eval_prompts(), rollout, FakeRewards(), max_new_tokens=32)
    report = ev.run()
    assert report.scores["a"]["avg@4"] == 1.0 and report.scores["b"]["avg@4"] == 0.0
    assert report.scores["all"]["avg@4"] == pytest.approx(3 / 8) and report.scores["a"]["greedy"] == 1.0
    assert report.policy_version == 0 and len(report.problems) == 8 and report.samples == 8 * 5
    sampled = [c for c in rollout.calls if c[1].n == 4]
    greedy = [c for c in rollout.calls if c[1].n == 1]
    assert [c[0] for c in sampled] == [3, 3, 2] and all(c[1].temperature == 0.0 for c in greedy)
    assert all(c[1].max_new_tokens == 32 and not c[1].logprobs for c in rollout.calls)
    # eval's own seeds, the same every time: (eval.seed + batch) * 1_000_000 (records.rollout_seed)
    assert [c[1].seed for c in sampled] == [77_000_000, 78_000_000, 79_000_000]
    metrics = report.metrics()
    assert metrics["eval/a/avg@4"] == 1.0 and metrics["eval/all/pass@4"] == pytest.approx(3 / 8)
    assert "| a |" in markdown_table(report)
    # where the time went: generation, and scores it did not hide (both within the whole)
    assert 0 <= metrics["time/eval_generate"] <= report.seconds and 0 <= metrics["time/eval_score_wait"]
    assert report.to_json()["generate_seconds"] == report.extra["generate_seconds"]


def test_greedy_only_evaluation_decodes_once():
    rollout = RecordingRollout()
    report = Evaluator(EvalConfig(k=8, temperature=0.0), eval_prompts(), rollout, FakeRewards(), 16).run()
    assert report.k == 1 and {c[1].n for c in rollout.calls} == {1} and "avg@1" in report.scores["a"]


def test_first_per_source_keeps_file_order():
    kept = first_per_source(eval_prompts(), 2)
    assert [p.prompt_id for p in kept] == ["e0-easy", "e1-easy", "e0-hard", "e1-hard"]


@pytest.mark.parametrize("override, key", [("eval.k=0", "eval.k"), ("eval.pass_at=[1,8]", "eval.pass_at"),
                                           ("eval.temperature=-1", "eval.temperature")])
def test_bad_eval_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


# -- evaluation inside the training loop -------------------------------------------------------

def with_evaluator(tmp_path, *overrides):
    trainer, roles = make_trainer(tmp_path, *overrides)
    trainer.evaluator = Evaluator(trainer.cfg.eval, eval_prompts(), roles.rollout, roles.rewards, 16)
    return trainer, roles


def test_evaluation_at_start_every_k_steps_and_at_end(tmp_path):
    trainer, _ = with_evaluator(tmp_path, "eval.every_steps=3", "trainer.total_steps=7")
    trainer.fit()
    evals = [r for r in read_metrics(tmp_path) if "eval/a/avg@4" in r]
    assert [r["step"] for r in evals] == [0, 3, 6, 7]
    assert sorted(p.name for p in (tmp_path / "eval").glob("step_*.json")) == [
        f"step_00000{i}.json" for i in (0, 3, 6, 7)]
    saved = json.loads((tmp_path / "checkpoints" / "step_000007" / "eval.json").read_text())
    assert saved["step"] == 7 and saved["scores"]["a"]["avg@4"] == 1.0
    assert "| a | avg@4 | 1.000 | 1.000 | +0.000 |" in run_summary(tmp_path / "eval")


def test_evaluation_leaves_training_unchanged(tmp_path):
    plain, plain_roles = make_trainer(tmp_path / "plain", "trainer.save_every=2")
    plain.fit()
    evaluated, eval_roles = with_evaluator(tmp_path / "eval", "trainer.save_every=2", "eval.every_steps=1")
    evaluated.fit()
    assert str(plain.ledger.state_dict()) == str(evaluated.ledger.state_dict())
    assert plain.stages.state_dict() == evaluated.stages.state_dict()
    assert str(plain.state_dict()["rng"]) == str(evaluated.state_dict()["rng"])
    assert [b.build().input_ids.tolist() for b in plain_roles.learner.batches] == \
        [b.build().input_ids.tolist() for b in eval_roles.learner.batches]
    assert plain_roles.rollout.pushes == eval_roles.rollout.pushes
    train_rows = lambda d: [{k: v for k, v in r.items() if not k.startswith(("time/", "eval/"))}
                            for r in read_metrics(d) if "eval/a/avg@4" not in r]
    assert train_rows(tmp_path / "plain") == train_rows(tmp_path / "eval")


def test_resumed_run_does_not_evaluate_its_start_again(tmp_path):
    trainer, _ = with_evaluator(tmp_path, "trainer.total_steps=2")
    trainer.fit()
    resumed, _ = with_evaluator(tmp_path, "trainer.total_steps=3")
    resumed.resume()
    resumed.fit()
    assert [r["step"] for r in read_metrics(tmp_path) if "eval/a/avg@4" in r] == [0, 2, 3]


def test_before_after_table_shows_the_change():
    before = {"step": 0, "k": 4, "scores": {"s": {"avg@4": 0.1, "pass@4": 0.3, "greedy": 0.0}}}
    after = {"step": 9, "k": 4, "scores": {"s": {"avg@4": 0.35, "pass@4": 0.6, "greedy": 0.2}}}
    table = before_after_table(before, after)
    assert "| s | avg@4 | 0.100 | 0.350 | +0.250 |" in table and "| s | greedy | 0.000 | 0.200 | +0.200 |" in table


def test_scored_groups_out_of_order_are_an_error():
    class Shuffled(FakeRewards):
        def score(self, groups):
            return list(reversed(super().score(groups)))
    with pytest.raises(RuntimeError, match="out of order"):
        Evaluator(EvalConfig(k=2, greedy=False), eval_prompts(), FakeRollout(), Shuffled(), 8).run()


def test_sampled_and_greedy_groups_are_told_apart():
    # a fake whose greedy decode is always right while samples are always wrong
    class Split(FakeRollout):
        def generate(self, prompts, sampling):
            text = "right" if sampling.temperature == 0 else "wrong"
            return [RolloutGroup.of(p, [1], [Sample([5], [-0.1], text, "stop")] * sampling.n, self.version)
                    for p in prompts]
    report = Evaluator(EvalConfig(k=2), eval_prompts(), Split(), FakeRewards(), 8).run()
    assert report.scores["all"]["avg@2"] == 0.0 and report.scores["all"]["greedy"] == 1.0
