"""Test cases of code problems, from the encodings real data files use, into a CodeSpec.

Accepted `ground_truth` encodings (a JSON string or the decoded object):

- LiveCodeBench: a list of {"input", "output", "testtype": "stdin"|"functional"}; the
  function name in `extra_info["metadata"]["func_name"]` (metadata may be a JSON
  string), `extra_info["func_name"|"fn_name"]` or a case's own "metadata". A raw
  LiveCodeBench row's dict {"public_test_cases", "private_test_cases", "metadata"} also
  works; private tests may be the base64 + zlib + pickle string LiveCodeBench ships
  (unpickled with a loader that refuses every object but plain strings/lists/dicts).
- verl / PRIME / TACO / APPS: {"inputs": [...], "outputs": [...], "fn_name": ...}; with
  fn_name the cases are function calls (each input is the argument list), without it
  stdin/stdout (each input/output a string or a list of lines). {"input_output": "..."}
  (APPS's column) is unwrapped first.
- A plain list of {"input", "output"} dicts (stdin/stdout unless a function name is known).
- HumanEval / MBPP style, tests as code: {"test": code defining `check(candidate)` or
  bare asserts, "entry_point": the function `check` is called with, "prompt": optional
  code run before the response's (HumanEval's prompt: imports and helper functions)}.
  One "assert" case; CodeSpec.setup_code is the prompt, CodeSpec.test_code the test
  followed by `check(<entry_point>)` when the test defines `check`.

Functional cases are stored as CodeCase(input=one JSON value per line, output=JSON).
APPS/TACO graders accept a call's result if it equals the expected output or, when that
output is a non-empty list, its first element (their outputs are usually wrapped in a
list). That rule is kept exactly: such an output is stored as {ANY_OF_KEY: [whole,
first]}, and `expected_alternatives` unfolds it.
"""
from __future__ import annotations

import base64
import io
import json
import pickle
import re
import zlib
from typing import Any

from srpo_ray.records import CodeCase, CodeSpec

ANY_OF_KEY = "__srpo_any_of__"
MAX_DECODED_BYTES = 1 << 30
_FN_KEYS = ("fn_name", "func_name", "function_name")
_FORMATS = ("a LiveCodeBench list of {input, output, testtype} (JSON or base64+zlib+pickle), "
            "a {inputs, outputs[, fn_name]} dict (verl/PRIME/TACO/APPS), a list of {input, output} dicts, "
            "or HumanEval-style {test, entry_point[, prompt]} (tests as code)")
_DEFINES_CHECK = re.compile(r"^def\s+check\s*\(", re.MULTILINE)


def parse_code_tests(ground_truth: object, extra_info: dict | None) -> CodeSpec:
    """Any accepted encoding (see the module docstring) -> CodeSpec.
    Raises ValueError saying what is wrong and which formats are accepted."""
    if isinstance(ground_truth, CodeSpec):
        return ground_truth
    extra = extra_info or {}
    value = _plain(_decode_text(ground_truth) if isinstance(ground_truth, (str, bytes)) else ground_truth)
    if isinstance(value, str):  # JSON encoded twice, as some converters write it
        value = _plain(_decode_text(value))
    fn_name = _fn_name_from(extra) or _fn_name_from(_json_dict(extra.get("metadata")))
    spec = _from_value(value, fn_name)
    if not spec.cases:
        raise ValueError("code ground_truth holds no test cases; a code problem needs at least one")
    return spec


def expected_alternatives(output: str) -> list[Any]:
    """A functional case's expected output (JSON text) -> the values that count as correct."""
    value = json.loads(output)
    if isinstance(value, dict) and set(value) == {ANY_OF_KEY}:
        return list(value[ANY_OF_KEY])
    return [value]


# -- formats -------------------------------------------------------------------------------

def _from_value(value: Any, fn_name: str | None) -> CodeSpec:
    if isinstance(value, dict):
        if "input_output" in value:
            return _from_value(_plain(_decode_text(value["input_output"])), _fn_name_from(value) or fn_name)
        if isinstance(value.get("test"), str):
            return _from_assert_tests(value, fn_name)
        if "public_test_cases" in value or "private_test_cases" in value:
            return _from_livecodebench_row(value, fn_name)
        for key in ("test_cases", "tests"):
            if key in value:
                inner = value[key]
                inner = _plain(_decode_text(inner)) if isinstance(inner, (str, bytes)) else inner
                return _from_value(inner, _fn_name_from(value) or fn_name)
        if ("inputs" in value and "outputs" in value) or ("input" in value and "output" in value
                                                          and isinstance(value["input"], list)):
            return _from_inputs_outputs(value, _fn_name_from(value) or fn_name)
        raise ValueError(f"code ground_truth is a dict with keys {sorted(map(str, value))[:10]}; "
                         f"expected {_FORMATS}")
    if isinstance(value, list):
        return _from_case_list(value, fn_name)
    raise ValueError(f"code ground_truth is a {type(value).__name__}; expected {_FORMATS}")


def _from_case_list(items: list, fn_name: str | None) -> CodeSpec:
    cases = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "input" not in item or "output" not in item:
            raise ValueError(f"test case {i} is {_short(item)}; each case must be a dict with "
                             f"`input` and `output` (expected {_FORMATS})")
        fn_name = fn_name or _fn_name_from(_json_dict(item.get("metadata")))
        testtype = item.get("testtype") or ("functional" if fn_name else "stdin")
        if testtype not in ("stdin", "functional"):
            raise ValueError(f"test case {i} has testtype {testtype!r}; use stdin or functional")
        if testtype == "functional":
            cases.append(_functional_case(i, _lines_as_arguments(i, item["input"]), item["output"]))
        else:
            cases.append(CodeCase(_text(i, "input", item["input"]), _text(i, "output", item["output"]),
                                  "stdin"))
    return _spec(cases, fn_name)


def _from_inputs_outputs(value: dict, fn_name: str | None) -> CodeSpec:
    inputs = _plain(value["inputs"] if "inputs" in value else value["input"])
    outputs = _plain(value["outputs"] if "outputs" in value else value["output"])
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise ValueError("`inputs` and `outputs` must be lists (one entry per test case)")
    if len(inputs) != len(outputs):
        raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs; they must pair up one to one")
    cases = []
    for i, (inp, out) in enumerate(zip(inputs, outputs)):
        if fn_name:
            if not isinstance(inp, list):
                raise ValueError(f"test case {i}: with fn_name {fn_name!r} each input must be the list "
                                 f"of call arguments, got {_short(inp)}")
            expected = json.dumps({ANY_OF_KEY: [out, out[0]]} if isinstance(out, list) and out else out)
            cases.append(CodeCase("\n".join(json.dumps(a) for a in inp), expected, "functional"))
        else:
            cases.append(CodeCase(_text(i, "input", inp), _text(i, "output", out), "stdin"))
    return _spec(cases, fn_name)


def _from_assert_tests(value: dict, fn_name: str | None) -> CodeSpec:
    test = value["test"]
    if not test.strip():
        raise ValueError("code ground_truth `test` is empty; it must hold the test code (asserts)")
    setup = value.get("prompt") or ""
    if not isinstance(setup, str):
        raise ValueError(f"code ground_truth `prompt` must be code (a string), got {_short(setup)}")
    entry_point = value.get("entry_point") or fn_name
    if entry_point is not None and (not isinstance(entry_point, str) or not entry_point.isidentifier()):
        raise ValueError(f"code ground_truth `entry_point` must be a function name, got {_short(entry_point)}")
    test_code = test
    if _DEFINES_CHECK.search(test):
        if not entry_point:
            raise ValueError("the `test` code defines check(candidate) but no `entry_point` names the "
                             "function to check; add entry_point to the ground truth")
        test_code = f"{test}\n\ncheck({entry_point})\n"
    return CodeSpec(cases=(CodeCase("", "", "assert"),), fn_name=entry_point, setup_code=setup,
                    test_code=test_code)


def _from_livecodebench_row(value: dict, fn_name: str | None) -> CodeSpec:
    fn_name = _fn_name_from(value) or _fn_name_from(_json_dict(value.get("metadata"))) or fn_name
    items: list = []
    for key in ("public_test_cases", "private_test_cases"):
        part = value.get(key)
        if part is None or (isinstance(part, str) and not part.strip()):
            continue
        part = _plain(_decode_text(part)) if isinstance(part, (str, bytes)) else _plain(part)
        if not isinstance(part, list):
            raise ValueError(f"{key} must decode to a list of test cases, got {type(part).__name__}")
        items += part
    return _from_case_list(items, fn_name)


def _spec(cases: list[CodeCase], fn_name: str | None) -> CodeSpec:
    if any(c.testtype == "functional" for c in cases) and not fn_name:
        raise ValueError("functional test cases need the function name: put fn_name in the ground "
                         "truth or func_name in extra_info['metadata']")
    return CodeSpec(cases=tuple(cases), fn_name=fn_name)


def _functional_case(i: int, arg_lines: str, output: Any) -> CodeCase:
    output = output if isinstance(output, str) else json.dumps(output)
    try:
        json.loads(output)
    except ValueError:
        raise ValueError(f"functional test case {i}: output {_short(output)} is not JSON") from None
    return CodeCase(arg_lines, output, "functional")


def _lines_as_arguments(i: int, raw: Any) -> str:
    if isinstance(raw, list):
        return "\n".join(json.dumps(a) for a in raw)
    if not isinstance(raw, str):
        raise ValueError(f"functional test case {i}: input must be JSON lines (one argument per line), "
                         f"got {_short(raw)}")
    for n, line in enumerate(raw.split("\n")):
        if line.strip():
            try:
                json.loads(line)
            except ValueError:
                raise ValueError(f"functional test case {i}: input line {n} {_short(line)} is not JSON "
                                 f"(LiveCodeBench writes one JSON argument per line)") from None
    return raw


def _text(i: int, what: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        joined = "\n".join(v.rstrip("\n") for v in value)
        return joined + "\n" if value else joined
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"stdin test case {i}: {what} must be text, got {_short(value)}")


# -- decoding ------------------------------------------------------------------------------

def _decode_text(raw: str | bytes) -> Any:
    """JSON text, or LiveCodeBench's base64(zlib(pickle(json text)))."""
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    stripped = text.strip()
    if not stripped:
        raise ValueError("code ground_truth is empty; expected " + _FORMATS)
    if stripped[0] in "[{\"":
        try:
            return json.loads(stripped)
        except ValueError as e:
            raise ValueError(f"code ground_truth looks like JSON but does not parse: {e}") from None
    try:
        compressed = base64.b64decode(stripped, validate=True)
    except ValueError:
        raise ValueError(f"code ground_truth {_short(stripped)} is neither JSON nor "
                         f"base64+zlib+pickle; expected {_FORMATS}") from None
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(compressed, MAX_DECODED_BYTES)
    except zlib.error as e:
        raise ValueError(f"code ground_truth is base64 but not zlib data ({e}); "
                         f"expected {_FORMATS}") from None
    if inflater.unconsumed_tail:
        raise ValueError(f"compressed test cases exceed {MAX_DECODED_BYTES >> 20} MiB when unpacked")
    try:
        inner = _SafeUnpickler(io.BytesIO(data)).load()
    except Exception as e:
        raise ValueError(f"compressed test cases do not unpickle as plain data: {e}") from None
    if isinstance(inner, bytes):
        inner = inner.decode("utf-8")
    return json.loads(inner) if isinstance(inner, str) else inner


class _SafeUnpickler(pickle.Unpickler):
    """Loads only what pickle builds without importing anything (str, bytes, numbers,
    lists, dicts, tuples): a data file must never be able to run code here."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _plain(value: Any) -> Any:
    """numpy arrays / pyarrow scalars (as pandas hands them out) -> lists and scalars."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _json_dict(value: Any) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def _fn_name_from(d: dict) -> str | None:
    for key in _FN_KEYS:
        name = d.get(key)
        if isinstance(name, str) and name.strip():
            return name.strip()
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
