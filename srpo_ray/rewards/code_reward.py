"""Score responses to code prompts: take each one's program, run it on the prompt's tests
in the sandbox, and judge every case OUTSIDE the sandbox (the program never sees expected
outputs, and what it prints or returns is only data to compare).

Judging: stdin cases pass when the program exits 0, within its limits, and its stdout
matches: the same number of lines after stripping the whole text, each line equal after
stripping, or equal token by token where numeric tokens may differ by 1e-6 (absolute or
relative; integers compare exactly). Functional cases pass when the returned value,
serialised to JSON inside the sandbox and parsed here, equals the expected JSON value
(lists, dicts, strings and booleans exactly, numbers with the same tolerance).
Assert cases (HumanEval / MBPP style, tests as code) run the program setup_code +
"\n" + the response's code + "\n\n" + test_code (see CodeSpec; the response's
`from __future__` imports go first, where Python requires them) and pass when it exits 0
within its limits: every assert held, nothing raised (HumanEval's own rule). stdout is
not compared, except that the program ends by writing a random token, fresh per run, to
fd 1: a response that exits early (`sys.exit(0)`, `os._exit(0)`) before the tests run
never prints it and fails. (The tests themselves run in the program's process, so a
deliberately hostile program can still defeat them, e.g. with a return value whose
`__eq__` is always true; input/output tests judged out here do not have that weakness.)
"""
from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass, field

from srpo_ray.records import CodeSpec
from srpo_ray.rewards.code_tests import expected_alternatives
from srpo_ray.rewards.sandbox import CaseInput, CaseOutcome, ProgramJob, Sandbox

NUMBER_TOLERANCE = 1e-6
MAX_CODE_CHARS = 1 << 20
# Output beyond this many bytes over twice the expected size cannot be right; stop
# reading there (also bounds what a program can make us hold).
OUTPUT_SLACK_BYTES = 64 << 10

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.#-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3", "py3"}
_FUTURE_IMPORT = re.compile(r"^from __future__ import [^\n]*\n?", re.MULTILINE)
_INT = re.compile(r"[+-]?\d+")
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def extract_code(text: str) -> str | None:
    """The last complete ```python fenced block, else the last complete ``` block of any
    language, else None. An unclosed fence (a truncated response) is not a block."""
    last_any = last_python = None
    for match in _FENCE.finditer(text):
        body = match.group(2)
        last_any = body
        if match.group(1).lower() in _PYTHON_TAGS:
            last_python = body
    return last_python if last_python is not None else last_any


@dataclass
class CodeScore:
    passed: int
    total: int
    info: dict = field(default_factory=dict)

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total


def score_programs(sandbox: Sandbox, programs: list[tuple[CodeSpec, str]], *, partial_credit: bool,
                   max_output_bytes: int, slot: int = 0) -> list[CodeScore]:
    """Run each (spec, code) on every case of its spec, all in one sandbox run (one
    process per program, reset in between). Without partial credit a program stops at
    its first failing case (its score is 0 anyway)."""
    scores = [CodeScore(0, len(spec.cases)) for spec, _ in programs]
    inputs_of: dict[int, tuple[CaseInput, ...]] = {}
    jobs, positions = [], []
    tokens: dict[int, str] = {}  # program -> the token its assert tests print when done
    for k, (spec, code) in enumerate(programs):
        if len(code) > MAX_CODE_CHARS:
            scores[k].info.update(passed=0, total=len(spec.cases),
                                  error=f"program longer than {MAX_CODE_CHARS} characters")
            continue
        if id(spec) not in inputs_of:  # one tuple per spec: the job sends shared tests once
            inputs_of[id(spec)] = tuple(
                CaseInput(c.input, c.testtype == "functional",
                          min(max_output_bytes, 2 * len(c.output.encode("utf-8")) + OUTPUT_SLACK_BYTES))
                for c in spec.cases)
        tokens[k] = secrets.token_hex(16) if any(c.testtype == "assert" for c in spec.cases) else ""
        jobs.append(ProgramJob(full_program(spec, code, tokens[k]), inputs_of[id(spec)], spec.fn_name))
        positions.append(k)
    failures: dict[int, str] = {}

    def on_case(j: int, i: int, outcome: CaseOutcome) -> bool:
        k = positions[j]
        case = programs[k][0].cases[i]
        expected = tokens[k] if case.testtype == "assert" else case.output
        ok, why = judge_case(expected, case.testtype, outcome)
        scores[k].passed += ok
        if not ok:
            failures.setdefault(k, f"case {i}: {why}")
        return ok or partial_credit

    runs = sandbox.run_batch(jobs, on_case, slot=slot) if jobs else []
    for k, run in zip(positions, runs):
        info = scores[k].info
        info.update(passed=scores[k].passed, total=scores[k].total)
        if any(c.status == "timeout" for c in run.cases):
            info["timeout"] = True
        if run.error:
            info["error"] = f"sandbox: {run.error}"
            if "wall-clock" in run.error:
                info["timeout"] = True
        if k in failures:
            info["failure"] = failures[k]
    return scores


def full_program(spec: CodeSpec, code: str, done_token: str = "") -> str:
    """The response's code with the spec's setup code before and test code after, if any,
    then (with a done_token) a line that writes the token to fd 1 once the tests ran. The
    response's `from __future__` imports move to the top, the only place Python allows them."""
    if not (spec.setup_code or spec.test_code):
        return code
    futures = "".join(m.group(0).rstrip("\n") + "\n" for m in _FUTURE_IMPORT.finditer(code))
    program = f"{futures}{spec.setup_code}\n{_FUTURE_IMPORT.sub('', code)}\n\n{spec.test_code}"
    if done_token:  # os.write: not held back by, or lost in, a replaced sys.stdout
        program += f"\n\nimport os as _srpo_os\n_srpo_os.write(1, b'\\n{done_token}\\n')\n"
    return program


def judge_case(expected: str, testtype: str, outcome: CaseOutcome) -> tuple[bool, str]:
    """-> (passed, why not). testtype: stdin, functional or assert (see CodeCase); for an
    assert case `expected` is the done token (or "" to only require exit status 0)."""
    if outcome.status == "timeout":
        return False, "time limit"
    if outcome.truncated:
        return False, "output limit"
    if outcome.signal is not None:
        return False, f"killed by signal {outcome.signal}"
    if outcome.exit_code != 0:
        last = (outcome.stderr.strip().splitlines() or [""])[-1][:200]
        return False, f"exit status {outcome.exit_code}{': ' + last if last else ''}"
    if testtype == "assert":
        if not expected or expected in outcome.stdout.splitlines():
            return True, ""
        return False, "the tests did not run to the end (the program exited early)"
    if testtype == "functional":
        return (True, "") if returned_matches(outcome.returned, expected) else (False, "wrong answer")
    return (True, "") if stdout_matches(outcome.stdout, expected) else (False, "wrong answer")


def stdout_matches(actual: str, expected: str) -> bool:
    got, want = _lines(actual), _lines(expected)
    if len(got) != len(want):
        return False
    return all(g == w or _tokens_match(g, w) for g, w in zip(got, want))


def returned_matches(returned: str | None, expected: str) -> bool:
    if returned is None:
        return False
    try:
        got = json.loads(returned)
        return any(_json_equal(got, want) for want in expected_alternatives(expected))
    except (ValueError, RecursionError):
        return False


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines()]


def _tokens_match(got: str, want: str) -> bool:
    a, b = got.split(), want.split()
    return len(a) == len(b) and all(x == y or _numbers_equal(x, y) for x, y in zip(a, b))


def _numbers_equal(x: str, y: str) -> bool:
    if _INT.fullmatch(x) and _INT.fullmatch(y):
        return _int_text(x) == _int_text(y)
    if _DECIMAL.fullmatch(x) and _DECIMAL.fullmatch(y):
        return _close(float(x), float(y))
    return False


def _int_text(s: str) -> str:
    sign = "-" if s.startswith("-") else ""
    digits = s.lstrip("+-").lstrip("0") or "0"
    return "0" if digits == "0" else sign + digits


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=NUMBER_TOLERANCE, abs_tol=NUMBER_TOLERANCE)


def _json_equal(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        try:
            return _close(float(a), float(b))
        except OverflowError:  # an int too large for a float cannot be within 1e-6 of one
            return False
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return a is None and b is None
