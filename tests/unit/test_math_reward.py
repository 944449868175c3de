"""Math rewards: the final-answer rule, real math-verify equivalence, bounded checks."""
from __future__ import annotations

import time

import pytest

from srpo_ray.config.schema import RewardConfig
from srpo_ray.records import Prompt, RolloutGroup, Sample, ScoreRequest
from srpo_ray.rewards.math_check import extract_final_answer
from srpo_ray.rewards.math_pool import MathCheckPool
from srpo_ray.rewards.scorer import RewardScorer

# Liveness bound for pathological inputs (a hang, not a speed check): the pool kills a
# check at math_timeout_s + 2 s, so anything near this bound means it never returned.
HANG_BOUND_S = 60.0


def math_prompt(gold: str) -> Prompt:
    return Prompt("m", "math", [{"role": "user", "content": "q"}], gold)


@pytest.fixture(scope="module")
def scorer():
    s = RewardScorer(RewardConfig(math_timeout_s=1, math_processes=2))
    yield s
    s.close()


def rewards(scorer: RewardScorer, gold: str, *texts: str) -> list[float]:
    return [r.reward for r in scorer.score(math_prompt(gold), list(texts))]


# -- the final-answer rule ---------------------------------------------------------------------

@pytest.mark.parametrize("text, answer", [
    ("so x = \\boxed{3}.", "3"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed {\\{1, 2\\}}", "\\{1, 2\\}"),
    ("first \\boxed{2}. Let me recheck the whole computation carefully from the start: 3 + 4 = 7, "
     "so the answer is \\boxed{7}", "7"),
    ("\\boxed{3} and again \\boxed{ 3 }", "3"),
    ("\\boxed{\\boxed{5}}", "\\boxed{5}"),
    ("\\boxed{1, 2}", "1, 2"),
    ("\\boxed{\\operatorname{floor}(x)}", "\\operatorname{floor}(x)"),
])
def test_final_answer_is_the_last_box(text, answer):
    assert extract_final_answer(text, allow_answer_line=False) == answer


@pytest.mark.parametrize("text", [
    "no box here",
    "\\boxed{3} or \\boxed{4}",
    "$\\boxed{3}$, $\\boxed{4}$",
    "\\boxed{3}\n\nor maybe\n\n\\boxed{4}",
    "It is \\boxed{3} (if we count zero) or else it might be \\boxed{4}",
    "\\boxed{3 \\text{ or } 4}",
    "\\boxed{3 \\lor 4}",
    "\\boxed{\\text{either } 3}",
    "\\boxed{3} then \\boxed{4",
    "\\boxed{}",
])
def test_several_candidates_or_no_complete_box_is_no_answer(text):
    assert extract_final_answer(text, allow_answer_line=False) is None


def test_answer_line_only_when_allowed_and_last():
    text = "We compute carefully.\n**Answer:** $\\frac{1}{2}$\n"
    assert extract_final_answer(text, allow_answer_line=False) is None
    assert extract_final_answer(text, allow_answer_line=True) == "\\frac{1}{2}"
    assert extract_final_answer("Answer: 3 or 4", allow_answer_line=True) is None
    assert extract_final_answer("Answer: 5\nbut wait", allow_answer_line=True) is None
    assert extract_final_answer("Answer: 5\n\\boxed{6}", allow_answer_line=True) == "6"


def test_extraction_is_linear_on_pathological_text():
    nested = "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}"
    assert extract_final_answer(nested, False) == "{" * 5000 + "1" + "}" * 5000
    assert extract_final_answer("\\boxed{" * 20000, False) is None
    assert extract_final_answer("x" * 10_000_000, False) is None


# -- equivalence with real math-verify -----------------------------------------------------------

@pytest.mark.parametrize("gold, right, wrong", [
    ("\\frac{1}{2}", "0.5", "0.6"),
    ("0.5", "\\frac12", "\\frac13"),
    ("1/2", "\\dfrac{1}{2}", "2"),
    ("(1, 2]", "(1,2]", "(1,2)"),
    ("\\{1, 2\\}", "\\{2, 1\\}", "\\{1, 3\\}"),
    ("1, 2", "2, 1", "1"),
    ("x^2 + 2x + 1", "(x+1)^2", "(x-1)^2"),
    ("$\\sqrt{8}$", "2\\sqrt{2}", "\\sqrt{2}"),
    ("\\boxed{30\\%}", "0.3", "3"),
])
def test_equivalent_answers_score_one_and_others_zero(scorer, gold, right, wrong):
    assert rewards(scorer, gold, f"so \\boxed{{{right}}}", f"so \\boxed{{{wrong}}}") == [1.0, 0.0]


def test_several_candidates_earn_nothing_even_if_one_is_right(scorer):
    assert rewards(scorer, "4", "\\boxed{3} or \\boxed{4}", "\\boxed{3 \\text{ or } 4}", "\\boxed{3, 4}",
                   "\\boxed{3 \\lor 4}", "\\boxed{4}") == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_answer_line_through_the_scorer():
    s = RewardScorer(RewardConfig(allow_answer_line=True, math_processes=1))
    try:
        assert rewards(s, "12", "Adding up.\nAnswer: 12", "Answer: 13") == [1.0, 0.0]
    finally:
        s.close()


def test_format_reward_pays_one_final_answer_not_every_box():
    s = RewardScorer(RewardConfig(format_reward=0.5, math_processes=1))
    try:
        results = s.score(math_prompt("2"), ["1+1 makes \\boxed{2}.", "\\boxed{2} \\boxed{2}",
                                             "\\boxed{3}", "\\boxed{2}" + " and then some more words" * 5,
                                             "\\boxed{}"])
        assert [(r.reward, r.correct) for r in results] == [
            (1.5, True), (1.0, True), (0.5, False), (1.0, True), (0.0, False)]
    finally:
        s.close()


def test_format_pattern_replaces_the_rule():
    s = RewardScorer(RewardConfig(format_reward=0.5, math_processes=1, format_pattern=r"(?s)^<think>.*</think>"))
    try:
        results = s.score(math_prompt("2"), ["<think>1+1</think> so \\boxed{2}", "\\boxed{2}",
                                             "<think>hmm</think> \\boxed{3}"])
        assert [(r.reward, r.correct) for r in results] == [(1.5, True), (1.0, True), (0.5, False)]
    finally:
        s.close()


# -- the strict number rule --------------------------------------------------------------------

@pytest.fixture(scope="module")
def strict():
    s = RewardScorer(RewardConfig(math_processes=1, math_answer_mode="number"))
    yield s
    s.close()


@pytest.mark.parametrize("text", [
    "29 * 5 = \\boxed{29\\cdot 5}",          # the restated question (math-verify pays it)
    "\\boxed{29 \\times 5}", "\\boxed{150 - 5}", "\\boxed{145/1}", "\\boxed{290/2}",
    "\\boxed{145} \\boxed{146}", "\\boxed{145} so \\boxed{145}",  # several boxes
    "\\boxed{x = 145}", "\\boxed{145 \\text{ apples}}", "\\boxed{145\\%}",
    "\\boxed{+}", "\\boxed{}", "it is 145", "\\boxed{145", "\\boxed{\\frac{290}{2}}",
])
def test_strict_number_rule_refuses_anything_but_one_number(strict, text):
    result = strict.score(math_prompt("145"), [text])[0]
    assert (result.reward, result.correct) == (0.0, False)


@pytest.mark.parametrize("gold, text", [
    ("145", "29 * 5 = 145, so \\boxed{145}."), ("145", "$\\boxed{145}$"), ("145", "\\boxed{ 145. }"),
    ("-22", "\\boxed{-22}"), ("-22", "\\boxed{\u221222}"), ("1000", "\\boxed{1,000}"),
    ("1000", "\\boxed{1{,}000}"), ("1000", "\\boxed{1\\,000}"), ("3.5", "\\boxed{7/2}"),
    ("7/2", "\\boxed{\\frac{7}{2}}"), ("-7/2", "\\boxed{-\\dfrac{7}{2}}"), ("0.5", "\\boxed{.5}"),
    ("12", "\\boxed{12.0}"),
])
def test_strict_number_rule_pays_a_plain_number_equal_to_the_truth(strict, gold, text):
    result = strict.score(math_prompt(gold), [text])[0]
    assert (result.reward, result.correct) == (1.0, True)


def test_restatement_is_paid_by_math_verify_but_not_by_the_number_rule(scorer, strict):
    text = "\\boxed{29\\cdot 5}"
    assert scorer.score(math_prompt("145"), [text])[0].correct  # why the strict rule exists
    assert not strict.score(math_prompt("145"), [text])[0].correct


def test_answer_mode_is_chosen_per_data_source():
    cfg = RewardConfig(math_processes=1, math_answer_modes={"arith": "number"})
    s = RewardScorer(cfg)
    try:
        texts = ["\\boxed{29\\cdot 5}", "\\boxed{145}"]
        arith = Prompt("a", "math", [{"role": "user", "content": "q"}], "145", data_source="arith")
        other = Prompt("b", "math", [{"role": "user", "content": "q"}], "145", data_source="other")
        assert [r.correct for r in s.score(arith, texts)] == [False, True]
        assert [r.correct for r in s.score(other, texts)] == [True, True]
        assert s.score(other, texts)[0].info["answer"] == "29\\cdot 5"
    finally:
        s.close()


def test_a_non_numeric_truth_under_the_number_rule_is_refused_before_the_run():
    from srpo_ray.rewards.scorer import check_answer_modes
    cfg = RewardConfig(math_answer_modes={"arith": "number"})
    ok = Prompt("a", "math", [{"role": "user", "content": "q"}], "-12", data_source="arith")
    bad = Prompt("b", "math", [{"role": "user", "content": "q"}], "\\sqrt{2}", data_source="arith")
    check_answer_modes(cfg, [ok])
    with pytest.raises(ValueError, match="math_answer_modes.arith=verify"):
        check_answer_modes(cfg, [ok, bad])


def test_not_number_metric_counts_rewarded_expressions():
    from srpo_ray.records import RewardResult, RolloutGroup, Sample, ScoredGroup
    from srpo_ray.telemetry.metrics import summarize_rollouts
    group = RolloutGroup.of(math_prompt("145"), [1], [Sample([1], [0.0], "t", "stop")] * 3, 0)
    results = [RewardResult(1.0, True, {"answer": "29\\cdot 5"}), RewardResult(1.0, True, {"answer": "145"}),
               RewardResult(0.0, False, {"answer": "3 + 4"})]
    assert summarize_rollouts([ScoredGroup(group, results)])["correct/math/not_number_frac"] == 0.5


def test_a_score_request_scores_as_its_prompt_does(scorer):
    """Reward workers get ScoreRequests (answer key + texts), not prompts and token ids:
    the verdicts are the same."""
    prompt = Prompt("m", "math", [{"role": "user", "content": "q"}], "2", data_source="s")
    texts = ["so \\boxed{2}", "\\boxed{3}", "no answer", "<think>x</think> \\boxed{2}"]
    group = RolloutGroup.of(prompt, [1], [Sample([5], [-0.1], t, "length") for t in texts], 0)
    assert scorer.score_requests([ScoreRequest.of(group)]) == [scorer.score(prompt, texts)]


def test_no_answer_is_flagged(scorer):
    result = scorer.score(math_prompt("2"), ["I think it is two"])[0]
    assert (result.reward, result.correct, result.info) == (0.0, False, {"error": "no final answer"})


# -- bounded -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "\\boxed{9^{9^{9^9}}}",
    "x" * 10_000_000 + "\\boxed{2}",
    "\\boxed{" + "{" * 3000 + "2" + "}" * 3000 + "}",
    "\\boxed{" + "(" * 2000 + "2" + ")" * 2000 + "}",
])
def test_pathological_answers_are_bounded(scorer, text):
    start = time.monotonic()
    result = scorer.score(math_prompt("2"), [text])[0]
    assert time.monotonic() - start < HANG_BOUND_S
    assert result.reward in (0.0, 1.0)
    assert rewards(scorer, "2", "\\boxed{2}") == [1.0]  # and the checker still works


def test_slow_check_times_out_and_is_flagged(scorer):
    result = scorer.score(math_prompt("1"), ["\\boxed{9^{9^{9^9}}}"])[0]
    assert (result.reward, result.correct, result.info.get("timeout")) == (0.0, False, True)


def test_stuck_checker_is_killed_and_replaced(tmp_path):
    # A checker stuck where its alarm cannot reach it (e.g. in C code) stands in for
    # the real one here; the real one's own timeout is tested above.
    stuck = tmp_path / "stuck_child.py"
    stuck.write_text("import sys, time\nprint('{\"ready\": true}', flush=True)\n"
                     "for line in sys.stdin:\n    time.sleep(3600)\n")
    pool = MathCheckPool(processes=1, timeout_s=1, memory_mb=512, child_script=stuck, hard_slack_s=0.2)
    try:
        old_pid = pool._children[0].proc.pid
        verdicts = pool.check([("1", "1"), ("2", "2")])
        assert all(v.timeout and not v.correct for v in verdicts)
        assert pool.restarts == 2 and pool._children[0].proc.pid != old_pid
    finally:
        pool.close()


def test_bad_timeout_config_is_rejected():
    with pytest.raises(ValueError, match="math_timeout_s"):
        RewardScorer(RewardConfig(math_timeout_s=0))
