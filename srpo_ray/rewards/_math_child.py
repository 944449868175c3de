"""One math-check process of MathCheckPool (run as a script: python _math_child.py MEM_BYTES TIMEOUT_S).

Protocol, one JSON object per line: it prints {"ready": true} once math-verify is
imported (or {"fatal": "..."} and exits), then answers each request
{"id", "gold", "answer"} with {"id", "correct", "timeout"?, "error"?}. math-verify's own
signal timeouts are off; one SIGALRM of TIMEOUT whole seconds covers the whole check
(gold parse + answer parse + verify). The pool kills this process if it overruns that,
so code stuck in C (where the alarm cannot interrupt) still cannot block a step. When
the pool goes away, stdin reaches EOF and this process exits. (No PR_SET_PDEATHSIG: it
fires when the spawning *thread* exits, which in a threaded host is not the parent dying.)
"""
import json
import os
import resource
import signal
import sys


class CheckTimedOut(BaseException):
    """BaseException so the library's `except Exception` handlers cannot swallow it."""


def main() -> None:
    memory_bytes, timeout_s = int(sys.argv[1]), int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    # The protocol gets its own copy of stdout; anything a library prints goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    try:
        import logging
        logging.disable(logging.CRITICAL)  # math-verify logs every timeout and parse failure
        from functools import lru_cache

        from math_verify import parse, verify
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        _send(out, {"fatal": f"cannot import math-verify: {type(e).__name__}: {e}"})
        return

    @lru_cache(maxsize=4096)
    def parsed_gold(gold: str):
        if not any(mark in gold for mark in ("\\boxed", "$", "\\(", "\\[")):
            gold = "\\boxed{" + gold + "}"
        return parse(gold, parsing_timeout=None)

    def check(gold: str, answer: str) -> dict:
        gold_parsed = parsed_gold(gold)
        if not gold_parsed:
            return {"correct": False, "error": "ground truth does not parse"}
        pred = parse("\\boxed{" + answer + "}", parsing_timeout=None)
        return {"correct": bool(verify(gold_parsed, pred, timeout_seconds=None))}

    def on_alarm(signum, frame):
        raise CheckTimedOut()

    signal.signal(signal.SIGALRM, on_alarm)
    _send(out, {"ready": True})
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            signal.alarm(timeout_s)
            try:
                reply = check(request["gold"], request["answer"])
            finally:
                signal.alarm(0)
        except CheckTimedOut:
            reply = {"correct": False, "timeout": True}
        except MemoryError:
            reply = {"correct": False, "error": "out of memory"}
        except RecursionError:
            reply = {"correct": False, "error": "recursion too deep"}
        except Exception as e:  # noqa: BLE001 - any failure to verify scores 0
            reply = {"correct": False, "error": f"{type(e).__name__}"}
        reply["id"] = request["id"]
        _send(out, reply)


def _send(out, message: dict) -> None:
    out.write((json.dumps(message) + "\n").encode("utf-8"))
    out.flush()


if __name__ == "__main__":
    main()
