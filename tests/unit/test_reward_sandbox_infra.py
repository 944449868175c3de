"""Sandbox plumbing: start-up checks, backends, the hard backstop, reaping."""
from __future__ import annotations

import ctypes
import logging
import os
import shutil

import pytest
from test_sandbox import sandbox_processes, zombie_children

from srpo_ray.config.schema import RewardConfig
from srpo_ray.records import CodeCase, CodeSpec, Prompt
from srpo_ray.rewards import sandbox
from srpo_ray.rewards.sandbox import CaseInput, ProgramJob, SandboxLimits, make_sandbox
from srpo_ray.rewards.scorer import RewardScorer


def test_worker_becomes_a_child_subreaper():
    make_sandbox("bubblewrap", SandboxLimits())
    libc = ctypes.CDLL(None, use_errno=True)
    flag = ctypes.c_int(0)
    assert libc.prctl(37, ctypes.byref(flag), 0, 0, 0) == 0  # PR_GET_CHILD_SUBREAPER
    assert flag.value == 1


def test_broken_sandbox_fails_at_start_up(monkeypatch):
    monkeypatch.setattr(sandbox.BubblewrapSandbox, "command", lambda self, *fds: ["/bin/false"])
    with pytest.raises(RuntimeError, match="does not work on this host"):
        RewardScorer(RewardConfig())


def test_missing_bubblewrap_is_a_clear_error(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(sandbox.shutil, "which",
                        lambda name, *a, **k: None if name == "bwrap" else real_which(name))
    with pytest.raises(RuntimeError, match="bubblewrap"):
        make_sandbox("bubblewrap", SandboxLimits())


@pytest.mark.skipif(shutil.which("nsjail") is not None, reason="nsjail is installed here")
def test_missing_nsjail_is_a_clear_error():
    with pytest.raises(RuntimeError, match="nsjail is not installed"):
        RewardScorer(RewardConfig(sandbox="nsjail"))


def test_unsafe_mode_warns_and_runs(caplog):
    with caplog.at_level(logging.WARNING):
        s = RewardScorer(RewardConfig(sandbox="UNSAFE_no_sandbox", math_processes=1))
    try:
        assert "WITHOUT isolation" in caplog.text
        spec = CodeSpec(cases=(CodeCase("2\n", "4\n", "stdin"),))
        prompt = Prompt("c", "code", [{"role": "user", "content": "x"}], spec)
        texts = ["```python\nprint(int(input()) * 2)\n```",
                 "```python\nimport os\nprint(len(os.environ))\n```"]
        assert [r.reward for r in s.score(prompt, texts)] == [1.0, 0.0]
    finally:
        s.close()


def test_backstop_kills_a_stuck_sandbox_and_the_batch_goes_on(monkeypatch):
    # The harness enforces time limits itself; make the outer backstop fire first.
    monkeypatch.setattr(sandbox, "BACKSTOP_SLACK_S", -2.0)
    box = make_sandbox("bubblewrap", SandboxLimits(case_timeout_s=3.0, total_timeout_s=3.0))
    case = (CaseInput("", False, 1000),)
    runs = box.run_batch([ProgramJob("print(1)", case), ProgramJob("import time\ntime.sleep(30)", case),
                          ProgramJob("print(2)", case)])
    assert runs[0].error is None and runs[0].cases[0].stdout == "1\n"
    assert "hard wall-clock limit" in runs[1].error and runs[1].cases == []
    assert runs[2].error is None and runs[2].cases[0].stdout == "2\n"
    assert zombie_children(box) == []
    if os.geteuid() == 0:
        uid = box.sandbox_uid(0)
        assert not [p for p in os.listdir("/proc") if p.isdigit() and _uid(p) == uid]


def _uid(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return None


def test_sandbox_processes_helper_sees_running_programs():
    # Guards the hostile-program tests: the helper must find a live sandboxed process.
    import threading
    import time

    box = make_sandbox("bubblewrap", SandboxLimits(case_timeout_s=2.0, total_timeout_s=2.0))

    class Holder:
        _sandbox = box

    seen: list[int] = []
    runner = threading.Thread(target=box.run,
                              args=("import time\ntime.sleep(1.5)", [CaseInput("", False, 100)]))
    runner.start()
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline and runner.is_alive():
        seen = sandbox_processes(Holder)  # type: ignore[arg-type]
        time.sleep(0.05)
    runner.join()
    if os.geteuid() == 0:
        assert seen
    assert sandbox_processes(Holder) == []  # type: ignore[arg-type]


@pytest.mark.skipif(shutil.which("nsjail") is None, reason="nsjail is not installed")
def test_nsjail_backend_contains_hostile_programs(monkeypatch):
    from test_sandbox import SUM_SPEC, assert_contained

    s = RewardScorer(RewardConfig(sandbox="nsjail", code_case_timeout_s=1.0, code_total_timeout_s=3.0,
                                  math_processes=1))
    try:
        assert_contained(s, "while True:\n    pass\n")
        assert_contained(s, "import os\nwhile True:\n    try:\n        os.fork()\n"
                            "    except OSError:\n        pass\n")
        assert_contained(s, "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n")
        assert_contained(s, "import ctypes\nctypes.string_at(0)\n")
        monkeypatch.setattr(sandbox, "BACKSTOP_SLACK_S", -2.0)  # the outer kill path, too
        assert_contained(s, "import time\ntime.sleep(30)\n", SUM_SPEC)
    finally:
        s.close()
