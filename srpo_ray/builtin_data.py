"""The small math + code set bundled with the package, for the default run and demos.

It is generated deterministically (no files to download) and written once, in verl
layout, to the cache folder. Math: two-operand arithmetic that a 135M model gets right
sometimes (room for RL to show gains). Code: short programs, half stdin/stdout tests
(LiveCodeBench encoding), half function-call tests (TACO/PRIME encoding), so both test
formats run in every default job.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from srpo_ray.data import DataError, write_verl_parquet

BOXED_HINT = "Put the final answer in \\boxed{}."
CODE_HINT = "Answer with a Python program in a ```python code block."


def builtin_dataset_path(name: str, cache_dir: str | None = None) -> Path:
    if name not in _BUILDERS:
        raise DataError(f"unknown builtin dataset {name!r}; available: {sorted(_BUILDERS)}")
    root = Path(cache_dir or "~/.cache/srpo_ray/data").expanduser()
    path = root / f"{name}-v1.parquet"
    if not path.exists():
        write_verl_parquet(_BUILDERS[name](), path)
    return path


def tiny_math_code_rows(num_math: int = 16, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(num_math):
        a, b = rng.randint(10, 60), rng.randint(2, 30)
        op = rng.choice(["+", "-", "*"]) if i % 3 else "+"
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        rows.append(_row("builtin/arithmetic", "math", f"What is {a} {op} {b}? {BOXED_HINT}",
                         str(answer), f"arith-{i}"))
    for i, (task, tests) in enumerate(_STDIN_TASKS):
        cases = [{"input": inp, "output": out, "testtype": "stdin"} for inp, out in tests]
        rows.append(_row("builtin/stdin-code", "code", f"{task} {CODE_HINT}", json.dumps(cases), f"stdin-{i}"))
    for i, (task, fn_name, inputs, outputs) in enumerate(_FUNCTION_TASKS):
        truth = {"fn_name": fn_name, "inputs": inputs, "outputs": outputs}
        rows.append(_row("builtin/function-code", "code", f"{task} {CODE_HINT}", json.dumps(truth), f"func-{i}"))
    return rows


def _row(source: str, ability: str, question: str, truth: str, row_id: str) -> dict:
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": question}],
        "ability": ability,
        "reward_model": {"style": "rule", "ground_truth": truth},
        "extra_info": {"id": row_id, "split": "train"},
    }


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

_BUILDERS = {"tiny_math_code": tiny_math_code_rows}
