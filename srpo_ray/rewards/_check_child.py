"""One checker process of a ChildPool (srpo_ray/rewards/child_pool.py), run as a script:

    python _check_child.py MEM_BYTES TIMEOUT_S math
    python _check_child.py MEM_BYTES TIMEOUT_S plugins SPECS_JSON

Protocol, one JSON object per line: it prints {"ready": true} once its checker is loaded
(or {"fatal": "..."} and exits), then answers each request with a reply that carries the
request's "id".
- math: request {"gold", "answer"} -> {"correct", "timeout"?, "error"?}; math-verify's
  own signal timeouts are off.
- plugins: SPECS_JSON is a list of {"key", "path", "name"} (the config key naming it, a
  .py file, a function in it). Each file is imported once, here, at start. Request {"fn":
  index into the list, "args": {data_source, solution_str, ground_truth, extra_info}} ->
  {"score": float, "metrics"?: {name: float}} or {"error": why} or {"timeout": true}.
  The function is called with keyword arguments, as verl calls compute_score; it returns
  a number or a dict with a numeric `score` (its other numeric entries become metrics).
One SIGALRM TIMEOUT_S seconds after a request arrives (setitimer; a float) ends the
request, whatever it is doing in Python. The pool kills this process if it overruns that
(code stuck in C, or code that swallows the alarm), so nothing here can block a step.
The protocol uses private copies of stdin and stdout: fd 0 reads /dev/null and fd 1 goes
to stderr (which the pool discards), so code that reads input or prints cannot break it.
When the pool goes away, the protocol input reaches EOF and this process exits. (No
PR_SET_PDEATHSIG: it fires when the spawning *thread* exits, which in a threaded host is
not the parent dying.)
Processes a request starts end with it: this process is a child subreaper, and before
each reply every process below it that the request left behind is killed and reaped
(_process_tree.py; those started while the checker loaded are left alone). A forked
child would otherwise spin for the life of the reward worker: it does not inherit the
alarm, and the pool kills the process group only on a timeout, a death or close.
"""
import importlib.util
import json
import math
import os
import resource
import signal
import sys

from _process_tree import become_subreaper, descendants, end_descendants  # beside this script

MAX_METRICS = 16  # extra numeric entries kept from a plug-in's dict
MAX_NAME = 64
MAX_ERROR = 300


class CheckTimedOut(BaseException):
    """BaseException so the library's `except Exception` handlers cannot swallow it."""


class CannotStart(Exception):
    """The checker cannot be loaded; the message goes to the pool."""


def main() -> None:
    memory_bytes, timeout_s, kind = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # this folder's modules (sandbox, scorer ...) must not shadow a plug-in's imports
    requests = os.fdopen(os.dup(0), "rb")
    out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    become_subreaper()  # before loading: what an import starts is below this process too
    try:
        handle = math_checker() if kind == "math" else plugin_caller(json.loads(sys.argv[4]))
    except CannotStart as e:
        _send(out, {"fatal": str(e)})
        return

    def on_alarm(signum, frame):
        raise CheckTimedOut()

    signal.signal(signal.SIGALRM, on_alarm)
    started_by_loading = frozenset(descendants(os.getpid()))
    _send(out, {"ready": True})
    for line in requests:
        request = json.loads(line)
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                reply = handle(request)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except CheckTimedOut:
            reply = {"correct": False, "timeout": True} if kind == "math" else {"timeout": True}
        except MemoryError:
            reply = {"correct": False, "error": "out of memory"}
        except RecursionError:
            reply = {"correct": False, "error": "recursion too deep"}
        except BaseException as e:  # noqa: BLE001 - any failure scores 0 (SystemExit included)
            reply = {"correct": False, "error": _describe(e, detail=kind != "math")}
        end_descendants(keep=started_by_loading)  # before the reply: the call is over when it is read
        reply["id"] = request["id"]
        _send(out, reply)


def math_checker():
    try:
        import logging
        logging.disable(logging.CRITICAL)  # math-verify logs every timeout and parse failure
        from functools import lru_cache

        from math_verify import parse, verify
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        raise CannotStart(f"cannot import math-verify: {type(e).__name__}: {e}") from None

    @lru_cache(maxsize=4096)
    def parsed_gold(gold: str):
        if not any(mark in gold for mark in ("\\boxed", "$", "\\(", "\\[")):
            gold = "\\boxed{" + gold + "}"
        return parse(gold, parsing_timeout=None)

    def check(request: dict) -> dict:
        gold_parsed = parsed_gold(request["gold"])
        if not gold_parsed:
            return {"correct": False, "error": "ground truth does not parse"}
        pred = parse("\\boxed{" + request["answer"] + "}", parsing_timeout=None)
        return {"correct": bool(verify(gold_parsed, pred, timeout_seconds=None))}

    return check


def plugin_caller(specs: list):
    functions = [_load_plugin(i, spec) for i, spec in enumerate(specs)]

    def call(request: dict) -> dict:
        return plugin_reply(functions[request["fn"]](**request["args"]))

    return call


def _load_plugin(index: int, spec: dict):
    path, name, key = spec["path"], spec["name"], spec["key"]
    try:
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in sys.path:
            sys.path.insert(0, folder)  # the plug-in may import modules that sit next to it
        module_name = f"srpo_reward_plugin_{index}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"{path} is not a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
        function = getattr(module, name)
    except BaseException as e:  # noqa: BLE001 - a broken plug-in is a start-up error naming its key
        raise CannotStart(f"{key}: cannot load `{name}` from {path}: {_describe(e, detail=True)}") from None
    if not callable(function):
        raise CannotStart(f"{key}: `{name}` in {path} is a {type(function).__name__}, not a function")
    return function


def plugin_reply(value) -> dict:
    """A plug-in's return value -> {"score", "metrics"?} or {"error"}: a finite number, or
    a dict whose `score` is one (other numeric entries become metrics, the rest is
    ignored). Anything else is an error, never a guess."""
    if isinstance(value, dict):
        if "score" not in value:
            return {"error": f"returned a dict without `score` (keys {sorted(map(str, value))[:8]})"}
        score = _finite(value["score"])
        if score is None:
            return {"error": f"`score` is {_shown(value['score'])}, not a finite number"}
        metrics = {}
        for name, item in value.items():
            number = _finite(item) if isinstance(name, str) and name != "score" else None
            if number is not None and len(metrics) < MAX_METRICS:
                metrics[name[:MAX_NAME]] = number
        return {"score": score, "metrics": metrics} if metrics else {"score": score}
    score = _finite(value)
    if score is None:
        return {"error": f"returned {_shown(value)}, not a finite number or a dict with `score`"}
    return {"score": score}


def _finite(value):
    """value as a finite float (bools, ints, floats, numpy / torch scalars), else None."""
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        try:
            value = value.item()  # numpy / torch scalars
        except Exception:  # noqa: BLE001 - not a scalar
            return None
    if not isinstance(value, (bool, int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return number if math.isfinite(number) else None


def _shown(value) -> str:
    text = repr(value) if isinstance(value, (str, int, float, type(None))) else type(value).__name__
    return text[:80]


def _describe(error: BaseException, detail: bool) -> str:
    if not detail:
        return type(error).__name__
    try:
        message = str(error)
    except Exception:  # noqa: BLE001 - a broken __str__
        message = ""
    return f"{type(error).__name__}: {message}"[:MAX_ERROR] if message else type(error).__name__


def _send(out, message: dict) -> None:
    out.write((json.dumps(message) + "\n").encode("utf-8"))
    out.flush()


if __name__ == "__main__":
    main()
