"""Code rewards: program extraction, judging outside the sandbox, test formats end to end."""
from __future__ import annotations

import json
import textwrap

import pytest

from srpo_ray.config.schema import RewardConfig
from srpo_ray.records import CodeCase, CodeSpec, Prompt
from srpo_ray.rewards.code_reward import extract_code, returned_matches, stdout_matches
from srpo_ray.rewards.code_tests import parse_code_tests
from srpo_ray.rewards.scorer import RewardScorer


def respond(code: str) -> str:
    return f"```python\n{textwrap.dedent(code).strip()}\n```"


def code_prompt(spec) -> Prompt:
    return Prompt("c", "code", [{"role": "user", "content": "solve"}], spec)


@pytest.fixture(scope="module")
def scorer():
    s = RewardScorer(RewardConfig(code_case_timeout_s=1.0, code_total_timeout_s=2.0, math_processes=1))
    yield s
    s.close()


@pytest.fixture(scope="module")
def partial_scorer():
    s = RewardScorer(RewardConfig(code_case_timeout_s=1.0, code_total_timeout_s=2.0, math_processes=1,
                                  code_partial_credit=True, code_parallel=2))
    yield s
    s.close()


# -- extraction -------------------------------------------------------------------------------

def test_last_python_block_wins_over_other_blocks():
    text = "```python\nfirst()\n```\n```bash\nls\n```\n```python\nsecond()\n```\n```\nplain()\n```"
    assert extract_code(text) == "second()\n"


def test_last_plain_block_when_no_python_block():
    assert extract_code("```\na()\n```\ntext\n```text\nb()\n```") == "b()\n"


def test_no_or_unclosed_block_is_no_code():
    assert extract_code("print(1)") is None
    assert extract_code("```python\nprint(1)\n") is None


def test_response_without_code_scores_zero_with_error(scorer):
    spec = CodeSpec(cases=(CodeCase("", "1\n", "stdin"),))
    result = scorer.score(code_prompt(spec), ["I would print 1."])[0]
    assert (result.reward, result.correct, result.info) == (0.0, False, {"error": "no code block"})


# -- judging -----------------------------------------------------------------------------------

def test_stdout_lines_are_stripped_and_numbers_compared_with_tolerance():
    assert stdout_matches("1 2  \r\n3\n\n", "1 2\n3")
    assert stdout_matches("0.3333333", "0.33333333333")
    assert not stdout_matches("0.334", "0.333")
    assert not stdout_matches("12345678901234567890", "12345678901234567891")
    assert stdout_matches("007", "7") and stdout_matches("-0", "0")
    assert not stdout_matches("1\n2", "1 2")
    assert not stdout_matches("nan", "1.0") and not stdout_matches("1_000", "1000")


def test_returned_values_compare_as_json():
    assert returned_matches("[1, 2]", "[1,2]")
    assert returned_matches("0.30000000000000004", "0.3")
    assert not returned_matches("1", "true") and not returned_matches("true", "1")
    assert not returned_matches("[1, 2]", "[2, 1]")
    assert not returned_matches(None, "1")
    assert not returned_matches("[" * 5000 + "]" * 5000, "[]")


def test_stdin_program_passes_and_wrong_program_fails(scorer):
    spec = CodeSpec(cases=(CodeCase("3\n1 2 3\n", "6\n", "stdin"), CodeCase("1\n-5\n", "-5\n", "stdin")))
    right = respond("""
        import sys
        data = sys.stdin.read().split()
        print(sum(map(int, data[1:])))
    """)
    wrong = respond("print(6)")
    first, second = scorer.score(code_prompt(spec), [right, wrong])
    assert first.reward == 1.0 and first.correct and first.info["passed"] == 2
    assert second.reward == 0.0 and second.info["failure"] == "case 1: wrong answer"


def test_exit_status_decides_too(scorer):
    spec = CodeSpec(cases=(CodeCase("", "ok\n", "stdin"),))
    ok_exit = respond("import sys\nprint('ok')\nsys.exit(0)")
    bad_exit = respond("import sys\nprint('ok')\nsys.exit(3)")
    crash = respond("print('ok')\nraise ValueError('boom')")
    results = scorer.score(code_prompt(spec), [ok_exit, bad_exit, crash])
    assert [r.reward for r in results] == [1.0, 0.0, 0.0]
    assert "ValueError: boom" in results[2].info["failure"]


def test_main_in_a_big_stack_thread_is_waited_for(scorer):
    spec = CodeSpec(cases=(CodeCase("5\n", "120\n", "stdin"),))
    program = respond("""
        import sys, threading
        sys.setrecursionlimit(100000)
        threading.stack_size(1 << 26)
        def fact(n):
            return 1 if n == 0 else n * fact(n - 1)
        def main():
            print(fact(int(input())))
        threading.Thread(target=main).start()
    """)
    assert scorer.score(code_prompt(spec), [program])[0].reward == 1.0


def test_leetcode_solution_class_with_preloaded_typing_names(scorer):
    spec = parse_code_tests(json.dumps([
        {"input": "[2, 7, 11, 15]\n9", "output": "[0, 1]", "testtype": "functional"},
        {"input": "[3, 3]\n6", "output": "[0, 1]", "testtype": "functional"},
    ]), {"metadata": json.dumps({"func_name": "twoSum"})})
    right = respond("""
        class Solution:
            def twoSum(self, nums: List[int], target: int) -> List[int]:
                seen = {}
                for i, x in enumerate(nums):
                    if target - x in seen:
                        return [seen[target - x], i]
                    seen[x] = i
    """)
    wrong = respond("""
        class Solution:
            def twoSum(self, nums, target):
                return [1, 0]
    """)
    assert [r.reward for r in scorer.score(code_prompt(spec), [right, wrong])] == [1.0, 0.0]


def test_a_returned_object_cannot_decide_its_own_equality(scorer):
    spec = CodeSpec(cases=(CodeCase("3", "9", "functional"),), fn_name="square")
    liar = respond("""
        class Anything(int):
            def __eq__(self, other):
                return True
            __hash__ = int.__hash__
        def square(x):
            return Anything(0)
    """)
    unserialisable = respond("""
        class Always:
            def __eq__(self, other):
                return True
        def square(x):
            return Always()
    """)
    results = scorer.score(code_prompt(spec), [liar, unserialisable])
    assert [r.reward for r in results] == [0.0, 0.0]
    assert "TypeError" in results[1].info["failure"]


def test_taco_call_based_outputs_accept_the_wrapped_value(scorer):
    truth = {"fn_name": "pair", "inputs": [[1], [2]], "outputs": [[[1, 1]], [[2, 2]]]}
    spec = parse_code_tests(json.dumps(truth), None)
    returns_list = respond("def pair(x):\n    return [x, x]")
    returns_tuple = respond("def pair(x):\n    return (x, x)")
    wrong = respond("def pair(x):\n    return [x]")
    results = scorer.score(code_prompt(spec), [returns_list, returns_tuple, wrong])
    assert [r.reward for r in results] == [1.0, 1.0, 0.0]


def test_partial_credit_counts_passed_cases(partial_scorer):
    spec = CodeSpec(cases=tuple(CodeCase(f"{n}\n", f"{n * n}\n", "stdin") for n in (1, 2, 3)))
    program = respond("n = int(input())\nprint(n * n if n < 3 else 0)")
    result = partial_scorer.score(code_prompt(spec), [program])[0]
    assert result.reward == pytest.approx(2 / 3) and not result.correct
    assert (result.info["passed"], result.info["total"]) == (2, 3)


def test_parallel_sandboxes_keep_results_in_order(partial_scorer):
    spec = CodeSpec(cases=(CodeCase("2\n", "4\n", "stdin"),))
    programs = [respond(f"print(int(input()) * {k})") for k in (2, 3, 2, 1, 2)]
    assert [r.reward for r in partial_scorer.score(code_prompt(spec), programs)] == [1.0, 0.0, 1.0, 0.0, 1.0]


def test_total_time_limit_cuts_later_cases(partial_scorer):
    spec = CodeSpec(cases=tuple(CodeCase(f"{n}\n", f"{n}\n", "stdin") for n in range(6)))
    slow = respond("import time\ntime.sleep(0.7)\nprint(input())")
    result = partial_scorer.score(code_prompt(spec), [slow])[0]
    assert result.info.get("timeout") is True
    assert 1 <= result.info["passed"] < 6  # cases within the 2 s total pass, later ones time out


def test_one_batch_isolates_programs_from_each_other(scorer):
    spec = CodeSpec(cases=(CodeCase("", "clean\n", "stdin"),))
    litter = respond("""
        import os, sys
        open("/tmp/left-over", "w").write("x")
        os.makedirs("/tmp/locked/deep", exist_ok=True)
        os.chmod("/tmp/locked", 0)
        import ctypes
        libc = ctypes.CDLL(None)
        libc.shmget(0x5352504F, 4096, 0o1666)
        print("dirty")
    """)
    check = respond("""
        import os
        shm = open("/proc/sysvipc/shm").read().splitlines()[1:]
        print("clean" if not os.listdir("/tmp") and not shm else "dirty")
    """)
    results = scorer.score(code_prompt(spec), [litter, check, litter, check])
    assert [r.reward for r in results] == [0.0, 1.0, 0.0, 1.0]


# -- test formats --------------------------------------------------------------------------------

def test_livecodebench_row_with_compressed_private_tests(scorer):
    import base64
    import pickle
    import zlib

    private = [{"input": "4\n", "output": "16\n", "testtype": "stdin"}]
    encoded = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(private)))).decode()
    row = {"public_test_cases": json.dumps([{"input": "3\n", "output": "9\n", "testtype": "stdin"}]),
           "private_test_cases": encoded, "metadata": "{}"}
    spec = parse_code_tests(row, None)
    assert [c.input for c in spec.cases] == ["3\n", "4\n"]
    assert scorer.score(code_prompt(spec), [respond("print(int(input()) ** 2)")])[0].reward == 1.0
    assert parse_code_tests(encoded, None).cases == (CodeCase("4\n", "16\n", "stdin"),)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    import base64
    import pickle
    import zlib

    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    encoded = base64.b64encode(zlib.compress(pickle.dumps(Exploit()))).decode()
    with pytest.raises(ValueError, match="unpickle"):
        parse_code_tests(encoded, None)
    assert not marker.exists()


def test_verl_prime_inputs_outputs_json(scorer):
    spec = parse_code_tests(json.dumps({"inputs": ["1 2\n", ["3 4"]], "outputs": ["3\n", ["7"]]}), {})
    assert spec.fn_name is None and [c.testtype for c in spec.cases] == ["stdin", "stdin"]
    program = respond("print(sum(map(int, input().split())))")
    assert scorer.score(code_prompt(spec), [program])[0].reward == 1.0


def test_plain_list_and_numpy_like_values():
    np = pytest.importorskip("numpy")
    spec = parse_code_tests(np.array([{"input": "1\n", "output": "2\n"}], dtype=object), None)
    assert spec == CodeSpec(cases=(CodeCase("1\n", "2\n", "stdin"),))
    functional = parse_code_tests({"inputs": np.array([[1, 2]]), "outputs": np.array([3])},
                                  {"fn_name": "add"})
    assert functional.cases[0].testtype == "functional" and functional.fn_name == "add"


@pytest.mark.parametrize("bad, message", [
    ("not tests at all", "neither JSON nor base64"),
    ("[]", "no test cases"),
    (json.dumps({"inputs": ["1"], "outputs": []}), "pair up"),
    (json.dumps([{"input": "[1]", "output": "1", "testtype": "functional"}]), "function name"),
    (json.dumps({"cases": []}), "dict with keys"),
    (json.dumps([{"input": "1"}]), "must be a dict with `input` and `output`"),
    (json.dumps([{"input": "not json", "output": "1", "testtype": "functional",
                  "metadata": {"func_name": "f"}}]),
     "is not JSON"),
    (12, "int"),
])
def test_bad_ground_truth_raises_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_code_tests(bad, None)


def test_a_folder_too_deep_to_clean_forces_a_fresh_sandbox(scorer):
    spec = CodeSpec(cases=(CodeCase("", "clean\n", "stdin"),))
    deep = respond("""
        import os
        os.chdir("/tmp")
        for _ in range(3000):
            os.mkdir("d")
            os.chdir("d")
        print("dirty")
    """)
    check = respond("import os\nprint('clean' if not os.listdir('/tmp') else 'dirty')")
    assert [r.reward for r in scorer.score(code_prompt(spec), [deep, check, check])] == [0.0, 1.0, 1.0]
