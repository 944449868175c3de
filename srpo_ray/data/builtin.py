"""Data sets bundled with the package, named `builtin:<name>` in data.train_files and
eval.files, and written once, in verl layout, to a cache parquet (`<name>-v<N>.parquet`;
N goes up whenever a set's rows change, so a stale cache is never read).

Training sets, generated deterministically here (nothing to download):

- `arithmetic`: 1024 distinct two-operand problems "What is {a} {op} {b}?" (a in
  [10, 60], b in [2, 30], every third an addition, the others +, - or * at random):
  sums a 135M model gets right sometimes, so RL has room to show gains. ids arith-<i>.
- `math_code`: the first 128 problems of `arithmetic` plus 8 short programs, half
  stdin/stdout tests (LiveCodeBench encoding), half function-call tests (TACO/PRIME
  encoding), so both test formats run in every default job. 128 prompts at 8 a step
  make an epoch of 16 steps: History Resampling acts within the default run.
- `tiny_math_code`: the first 16 problems of `arithmetic` (same rows, same ids) plus the
  same 8 programs: the small set of tests and demos.
- `arithmetic_wide`: 512 distinct problems whose operands have 1, 2 or 3 digits (the
  count drawn uniformly for each operand, then the value) and +, - or * at random: from
  "3 + 5" to "482 * 917", so the bundled model's pass rate spreads from always to never
  (the History Resampling experiment's pool). ids wide-<i>; its held-out twin is
  `arithmetic_wide_heldout`.

Held-out evaluation sets (`arithmetic_heldout`, `code_heldout`, `humaneval`, `aime`,
`champ`) are built
from bundled wheels in srpo_ray/data/eval_sets.py.
"""
from __future__ import annotations

import json
import random
from typing import Collection

from srpo_ray.data.verl_rows import verl_row

BOXED_HINT = "Put the final answer in \\boxed{}."
CODE_HINT = "Answer with a Python program in a ```python code block."
ARITHMETIC_DEMO = [{"role": "user", "content": f"What is 14 - 6? {BOXED_HINT}"},
                   {"role": "assistant", "content": "14 - 6 = 8, so the answer is \\boxed{8}."}]
ARITHMETIC_SOURCE = "builtin/arithmetic"
ARITHMETIC_SIZE = 1024
ARITHMETIC_SEED = 0
ARITHMETIC_OPS = ("+", "-", "*")
TINY_MATH_SIZE = 16
WIDE_SOURCE = "builtin/arithmetic_wide"
WIDE_SIZE = 512
WIDE_SEED = 10
MATH_CODE_ARITHMETIC = 128  # the default run's pool: 16 steps of 8 prompts make an epoch

Problem = tuple[int, str, int]  # (a, op, b)

# Every arithmetic prompt opens with one worked example, an earlier chat turn (1-shot):
# it shows the answer format the strict number rule checks. SmolLM2-135M then boxes 93%
# of its answers (10% without) and solves 16% of held-out problems (0.3%), so RL starts
# from a policy that answers and has something to reinforce (measured 2026-12-01, 100
# held-out problems x 4 samples at T=0.8, + 100 greedy).
DEMO_PROBLEM: Problem = (14, "-", 6)



def arithmetic_problems(count: int, seed: int, exclude: Collection[Problem] = (), wide: bool = False
                        ) -> list[Problem]:
    """`count` distinct problems drawn from the arithmetic distribution (wide: the
    `arithmetic_wide` one; see the module docstring); a repeat, or a problem in
    `exclude`, is drawn again."""
    rng = random.Random(seed)
    taken = set(exclude) | {DEMO_PROBLEM}  # the worked example is never a problem to solve
    problems: list[Problem] = []
    for _ in range(100 * count + 1000):  # far more draws than needed; bounds a too-large count
        if len(problems) == count:
            return problems
        if wide:
            a, b, op = _wide_operand(rng), _wide_operand(rng), rng.choice(ARITHMETIC_OPS)
        else:
            a, b = rng.randint(10, 60), rng.randint(2, 30)
            op = rng.choice(ARITHMETIC_OPS) if len(problems) % 3 else "+"
        if (a, op, b) not in taken:
            taken.add((a, op, b))
            problems.append((a, op, b))
    raise ValueError(f"cannot draw {count} distinct arithmetic problems outside the {len(exclude)} excluded")


def _wide_operand(rng: random.Random) -> int:
    digits = rng.randint(1, 3)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def arithmetic_wide_rows() -> list[dict]:
    return [arithmetic_row(p, WIDE_SOURCE, f"wide-{i}", "train")
            for i, p in enumerate(arithmetic_problems(WIDE_SIZE, WIDE_SEED, wide=True))]


def arithmetic_row(problem: Problem, source: str, row_id: str, split: str) -> dict:
    row = verl_row(source, "math", arithmetic_question(problem), str(_solve(problem)), row_id, split)
    row["prompt"] = [*ARITHMETIC_DEMO, *row["prompt"]]
    return row


def arithmetic_question(problem: Problem) -> str:
    a, op, b = problem
    return f"What is {a} {op} {b}? {BOXED_HINT}"


def _solve(problem: Problem) -> int:
    a, op, b = problem
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def arithmetic_rows() -> list[dict]:
    return [arithmetic_row(p, ARITHMETIC_SOURCE, f"arith-{i}", "train")
            for i, p in enumerate(arithmetic_problems(ARITHMETIC_SIZE, ARITHMETIC_SEED))]


def math_code_rows() -> list[dict]:
    return arithmetic_rows()[:MATH_CODE_ARITHMETIC] + code_rows()


def tiny_math_code_rows(num_math: int = TINY_MATH_SIZE, seed: int = ARITHMETIC_SEED) -> list[dict]:
    problems = arithmetic_problems(num_math, seed)
    return [arithmetic_row(p, ARITHMETIC_SOURCE, f"arith-{i}", "train") for i, p in enumerate(problems)] + code_rows()


def code_rows(stdin_tasks: list = None, function_tasks: list = None, sources: tuple[str, str] = (
        "builtin/stdin-code", "builtin/function-code"), id_prefix: str = "", split: str = "train") -> list[dict]:
    """Short programs (the training set's by default): stdin/stdout tests in
    LiveCodeBench's encoding, function-call tests in TACO/PRIME's."""
    rows = []
    for i, (task, tests) in enumerate(_STDIN_TASKS if stdin_tasks is None else stdin_tasks):
        cases = [{"input": inp, "output": out, "testtype": "stdin"} for inp, out in tests]
        rows.append(verl_row(sources[0], "code", f"{task} {CODE_HINT}", json.dumps(cases),
                             f"{id_prefix}stdin-{i}", split))
    for i, (task, fn_name, inputs, outputs) in enumerate(_FUNCTION_TASKS if function_tasks is None else function_tasks):
        truth = {"fn_name": fn_name, "inputs": inputs, "outputs": outputs}
        rows.append(verl_row(sources[1], "code", f"{task} {CODE_HINT}", json.dumps(truth),
                             f"{id_prefix}func-{i}", split))
    return rows



_STDIN_TASKS = [
    ("Read two integers a and b from one line of standard input and print a + b.",
     [("1 2\n", "3\n"), ("10 -4\n", "6\n"), ("0 0\n", "0\n")]),
    ("Read an integer n from standard input and print n * 2.",
     [("4\n", "8\n"), ("-3\n", "-6\n"), ("0\n", "0\n")]),
    ("Read a line of text from standard input and print it reversed.",
     [("abc\n", "cba\n"), ("racecar\n", "racecar\n"), ("hello world\n", "dlrow olleh\n")]),
    ("Read an integer n from standard input and print the numbers 1 to n, one per line.",
     [("3\n", "1\n2\n3\n"), ("1\n", "1\n")]),
]

_FUNCTION_TASKS = [
    ("Write a Python function add(a, b) that returns the sum of a and b.", "add",
     [[1, 2], [5, -7], [0, 0]], [3, -2, 0]),
    ("Write a Python function square(x) that returns x squared.", "square",
     [[3], [-4], [0]], [9, 16, 0]),
    ("Write a Python function is_even(n) that returns True if n is even, else False.", "is_even",
     [[2], [7], [0]], [True, False, True]),
    ("Write a Python function max_of(xs) that returns the largest number in the list xs.", "max_of",
     [[[1, 5, 3]], [[-2, -9]], [[7]]], [5, -2, 7]),
]

