"""Processes a reward plug-in starts end with its call (srpo_ray/rewards/_process_tree.py):
a forked busy child, a double fork that leaves the process group with setsid, a child
that ignores SIGTERM, and the same from a call that times out or has to be killed.
Afterwards no such process runs and the checker holds no zombie.

Each process a plug-in here starts runs `python -c SPIN MARKER`, so a scan of
/proc/*/cmdline finds it (a plain fork writes its pid to a file instead); the fixture
kills, by pid, any a failing test leaves behind."""
from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from srpo_ray.config.schema import RewardConfig
from srpo_ray.records import Prompt
from srpo_ray.rewards import plugins
from srpo_ray.rewards._process_tree import children
from srpo_ray.rewards.plugins import CustomRewardPool

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")

MARKER = f"srpo-test-orphan-{uuid.uuid4().hex}"
FORKING = '''
import os, signal, sys, time

MARKER = {marker!r}
SPIN = "import signal\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\nwhile True: pass"

def _spawn_marked():
    """A busy process that ignores SIGTERM, named by MARKER in its command line."""
    os.execv(sys.executable, [sys.executable, "-c", SPIN, MARKER])

def forks_busy(data_source, solution_str, ground_truth, extra_info=None):
    pid = os.fork()
    if pid == 0:
        while True:
            pass
    with open(ground_truth, "w") as f:
        f.write(str(pid))
    return 1.0

def double_forks_with_setsid(data_source, solution_str, ground_truth, extra_info=None):
    pid = os.fork()
    if pid == 0:
        os.setsid()  # out of the checker's process group
        if os.fork() == 0:
            _spawn_marked()
        os._exit(0)
    os.waitpid(pid, 0)  # the grandchild is an orphan now
    return 1.0

def child_ignores_sigterm(data_source, solution_str, ground_truth, extra_info=None):
    if os.fork() == 0:
        _spawn_marked()
    return 1.0

def escapes_then_sleeps(data_source, solution_str, ground_truth, extra_info=None):
    double_forks_with_setsid(data_source, solution_str, ground_truth)
    time.sleep(3600)  # interrupted by the call's alarm

def escapes_then_swallows_the_alarm(data_source, solution_str, ground_truth, extra_info=None):
    double_forks_with_setsid(data_source, solution_str, ground_truth)
    while True:  # the pool kills the checker itself
        try:
            time.sleep(3600)
        except BaseException:
            pass
'''
NAMES = ["forks_busy", "double_forks_with_setsid", "child_ignores_sigterm", "escapes_then_sleeps",
         "escapes_then_swallows_the_alarm"]


def marked_processes() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if MARKER.encode() in f.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def outlived_by(wait_s: float = 1.0) -> list[int]:
    """Marked processes still there `wait_s` after the call: a left-over one may not have
    exec'd yet (so looking at once can miss it), and one SIGKILLed at the call's end may
    still be exiting on a loaded host (so looking at once can count it)."""
    time.sleep(wait_s)
    return marked_processes()


def gone_within(wait_s: float = 5.0) -> list[int]:
    """Marked processes left after waiting up to `wait_s` for all to exit ([]: none)."""
    end = time.monotonic() + wait_s
    while (found := marked_processes()) and time.monotonic() < end:
        time.sleep(0.05)
    return found


def is_running(pid: int) -> bool:
    """`pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def checker_pids(pool: CustomRewardPool) -> list[int]:
    return [child.proc.pid for child in pool._pool.children]


@pytest.fixture(scope="module")
def forking_pool(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugins") / "forking.py"
    path.write_text(FORKING.format(marker=MARKER))
    cfg = RewardConfig(custom_functions={name: f"{path}:{name}" for name in NAMES},
                       custom_timeout_s=1.0, custom_memory_mb=512, custom_processes=1)
    old_slack, plugins.HARD_SLACK_S = plugins.HARD_SLACK_S, 0.5
    try:
        pool = CustomRewardPool(cfg)
    finally:
        plugins.HARD_SLACK_S = old_slack
    yield pool
    pool.close()
    for pid in marked_processes():  # only what these tests started, by pid
        os.kill(pid, signal.SIGKILL)


def prompt(source: str, truth: str = "") -> Prompt:
    return Prompt(f"{source}-p", "wordplay", [{"role": "user", "content": "q"}], truth, data_source=source)


def test_a_forked_busy_child_ends_with_the_call(forking_pool, tmp_path):
    pid_file = tmp_path / "child.pid"
    [result] = forking_pool.score([(prompt("forks_busy", str(pid_file)), "x")])
    assert result.reward == 1.0, result.info  # the call itself is unharmed
    child = int(pid_file.read_text())
    try:
        assert not os.path.exists(f"/proc/{child}"), "the forked child outlived its call (or is a zombie)"
    finally:
        if is_running(child) and b"_check_child.py" in Path(f"/proc/{child}/cmdline").read_bytes():
            os.kill(child, signal.SIGKILL)  # ours: a copy of the checker


@pytest.mark.parametrize("name, flag", [("double_forks_with_setsid", None), ("child_ignores_sigterm", None),
                                        ("escapes_then_sleeps", "timeout"),
                                        ("escapes_then_swallows_the_alarm", "timeout")])
def test_no_process_a_call_started_outlives_it(forking_pool, name, flag):
    before = forking_pool.restarts
    [result] = forking_pool.score([(prompt(name), "x")])
    assert result.info.get(flag) if flag else result.reward == 1.0, result.info
    assert not outlived_by(), f"{name}: processes outlived the call"
    for checker in checker_pids(forking_pool):
        assert children(checker) == [], f"{name}: the checker holds children (zombies?) after the call"
    if name == "escapes_then_swallows_the_alarm":
        assert forking_pool.restarts == before + 1  # this one ended with its checker killed


def test_processes_the_plugin_started_while_loading_are_left_alone(tmp_path):
    path = tmp_path / "server.py"
    path.write_text(FORKING.format(marker=MARKER) + "\nif os.fork() == 0:\n    _spawn_marked()\n")
    pool = CustomRewardPool(RewardConfig(custom_function=f"{path}:forks_busy", custom_timeout_s=5.0,
                                         custom_memory_mb=512, custom_processes=1))
    try:
        deadline = time.monotonic() + 10
        while not marked_processes() and time.monotonic() < deadline:
            time.sleep(0.05)  # the exec has not named it yet
        server = marked_processes()
        assert len(server) == 1
        pool.score([(prompt("any", str(tmp_path / "child.pid")), "x")])
        assert marked_processes() == server  # still serving
    finally:
        pool.close()
    assert gone_within() == []  # close ends it with its checker (SIGKILL: gone once the kernel runs it)
