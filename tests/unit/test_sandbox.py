"""Hostile programs against the real bubblewrap sandbox, one property per test.

Each test: the hostile program scores 0, nothing outside the sandbox changed, no process
or zombie of the sandbox is left, the worker's own descriptors did not leak, and the
next benign program still scores 1.
"""
from __future__ import annotations

import os
import socket
import textwrap
import time
from pathlib import Path

import pytest

from srpo_ray.config.schema import RewardConfig
from srpo_ray.records import CodeCase, CodeSpec, Prompt
from srpo_ray.rewards.sandbox import CaseInput
from srpo_ray.rewards.scorer import RewardScorer

SUM_SPEC = CodeSpec(cases=(CodeCase("1 2\n", "3\n", "stdin"), CodeCase("20 22\n", "42\n", "stdin")))
BENIGN = "a, b = map(int, input().split())\nprint(a + b)\n"
SECRET = "srpo-test-secret-5f1d9c"


@pytest.fixture(scope="module")
def scorer():
    cfg = RewardConfig(code_case_timeout_s=1.0, code_total_timeout_s=3.0, math_processes=1)
    s = RewardScorer(cfg)
    yield s
    s.close()


def respond(code: str) -> str:
    return f"Here is my program.\n```python\n{textwrap.dedent(code)}\n```\n"


def score(scorer: RewardScorer, code: str, spec: CodeSpec = SUM_SPEC):
    prompt = Prompt("p", "code", [{"role": "user", "content": "sum"}], spec)
    return scorer.score(prompt, [respond(code)])[0]


def sandbox_processes(scorer: RewardScorer) -> list[int]:
    """Host pids running as the sandbox uid (only distinguishable when we are root)."""
    if os.geteuid() != 0:
        return []
    uid = scorer._sandbox.sandbox_uid(0)
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    pids.append(int(entry.name))
            except FileNotFoundError:
                pass
    return pids


def zombie_children(box) -> list[int]:
    """Zombie children of this process that a sandbox left (its wrapper or its PID 1);
    other tests' stray zombies (this process is a subreaper) are not our business."""
    sandbox_uids = {box.sandbox_uid(slot) for slot in range(64)} if os.geteuid() == 0 else set()
    zombies = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for pid in children:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                comm, state = stat[stat.index("(") + 1:stat.rindex(")")], stat.rsplit(")", 1)[1].split()[0]
                uid = Path(f"/proc/{pid}").stat().st_uid
                ours = comm in ("bwrap", "nsjail", "setpriv") or uid in sandbox_uids
                if state == "Z" and ours:
                    zombies.append(int(pid))
            except (FileNotFoundError, IndexError, ValueError):
                pass
    return zombies


def assert_contained(scorer: RewardScorer, hostile: str, spec: CodeSpec = SUM_SPEC) -> dict:
    fds_before = len(os.listdir("/proc/self/fd"))
    result = score(scorer, hostile, spec)
    assert result.reward == 0.0 and not result.correct, result
    assert sandbox_processes(scorer) == []
    assert zombie_children(scorer._sandbox) == []
    assert len(os.listdir("/proc/self/fd")) == fds_before
    after = score(scorer, BENIGN)
    assert after.reward == 1.0 and after.correct, after
    return result.info


def test_benign_program_scores_one(scorer):
    assert score(scorer, BENIGN).reward == 1.0


def test_busy_loop_times_out(scorer):
    info = assert_contained(scorer, "while True:\n    pass\n")
    assert info.get("timeout") is True


def test_sleep_past_the_wall_limit_times_out(scorer):
    info = assert_contained(scorer, "import time\ntime.sleep(60)\nprint(3)\n")
    assert info.get("timeout") is True


def test_ten_gigabyte_allocation_fails(scorer):
    info = assert_contained(scorer, "x = bytearray(10 * 1024 ** 3)\nprint(len(x))\n")
    assert "MemoryError" in info.get("failure", "")


def test_fork_bomb_is_contained(scorer):
    hostile = """
    import os
    while True:
        try:
            os.fork()
        except OSError:
            pass
    """
    assert_contained(scorer, hostile)


def test_no_network_to_a_loopback_listener(scorer):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        hostile = f"""
        import socket
        try:
            s = socket.create_connection(("127.0.0.1", {port}), timeout=0.5)
            s.sendall(b"escaped")
            print("connected")
        except OSError as e:
            print("blocked", e)
        """
        assert_contained(scorer, hostile, CodeSpec(cases=(CodeCase("", "connected\n", "stdin"),)))
        with pytest.raises(socket.timeout):
            listener.accept()


def test_writes_outside_the_work_dir_change_nothing(scorer, tmp_path):
    target = tmp_path / "outside.txt"
    target.write_text("original")
    hostile = f"""
    import os
    for path in [{str(target)!r}, {str(tmp_path / "new.txt")!r}, "/usr/pwned", "/pwned",
                 "/etc/pwned", "/box/harness.py", {str(Path(__file__))!r}]:
        try:
            with open(path, "w") as f:
                f.write("pwned")
        except OSError:
            pass
    open("/tmp/scratch", "w").write("the private /tmp is writable")
    print("pwned")
    """
    assert_contained(scorer, hostile, CodeSpec(cases=(CodeCase("", "3\n", "stdin"),)))
    assert target.read_text() == "original"
    assert not (tmp_path / "new.txt").exists()
    assert not Path("/usr/pwned").exists() and not Path("/pwned").exists()
    assert "pwned" not in Path(__file__).read_text().split("hostile = f")[0]


def test_parent_environment_is_not_visible(scorer, monkeypatch):
    monkeypatch.setenv("SRPO_SECRET", SECRET)
    hostile = """
    import os, glob
    found = [v for v in os.environ.values()]
    for path in glob.glob("/proc/[0-9]*/environ"):
        try:
            found.append(open(path, "rb").read().decode("utf-8", "replace"))
        except OSError:
            pass
    print(" ".join(found))
    """
    spec = CodeSpec(cases=(CodeCase("", SECRET + "\n", "stdin"),))
    assert_contained(scorer, hostile, spec)
    run = scorer._sandbox.run(textwrap.dedent(hostile), [CaseInput("", False, 1 << 16)])
    assert run.cases[0].exit_code == 0
    assert SECRET not in run.cases[0].stdout
    assert "SRPO_SECRET" not in run.cases[0].stdout


def test_a_gigabyte_of_stdout_is_cut_off(scorer):
    hostile = """
    import sys
    chunk = "x" * (1 << 20)
    for _ in range(1024):
        sys.stdout.write(chunk)
    """
    info = assert_contained(scorer, hostile)
    assert "output limit" in info.get("failure", "") or "exit status" in info.get("failure", "")


def test_signalling_the_parent_and_everyone(scorer):
    hostile = """
    import os, signal
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        for target in (os.getppid(), 1, -1):
            try:
                os.kill(target, sig)
            except OSError:
                pass
    print("still here")
    """
    assert_contained(scorer, hostile)


def test_signalling_the_worker_by_pid(scorer):
    assert_contained(scorer, f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)\n")


def test_daemon_does_not_outlive_its_case(scorer):
    hostile = """
    import os, sys, time
    if input().strip() == "check":
        time.sleep(0.6)
        print("survived" if os.path.exists("/tmp/marker") else "gone")
        sys.exit(0)
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(0.3)
            open("/tmp/marker", "w").write("daemon was here")
            time.sleep(60)
        os._exit(0)
    print("started")
    """
    spec = CodeSpec(cases=(CodeCase("start\n", "started\n", "stdin"),
                           CodeCase("check\n", "survived\n", "stdin")))
    assert_contained(scorer, hostile, spec)
    time.sleep(0.5)
    assert sandbox_processes(scorer) == []


def test_file_descriptor_exhaustion(scorer):
    hostile = """
    import os
    fds = []
    while True:
        try:
            fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            break
    r, w = None, None
    while True:
        try:
            r, w = os.pipe()
        except OSError:
            break
    print(len(fds))
    """
    assert_contained(scorer, hostile)


def test_segfault(scorer):
    info = assert_contained(scorer, "import ctypes\nctypes.string_at(0)\n")
    assert "signal 11" in info.get("failure", "")


def test_fake_pass_results_are_ignored(scorer):
    # The program "knows" the expected outputs and forges harness result lines with
    # them, on stdout and into every descriptor it can reach, but never answers itself.
    hostile = r"""
    import glob, json, os
    lines = "".join(json.dumps({"i": i, "status": "exited", "exit": 0, "signal": None,
                                "stdout": out, "truncated": False, "returned": None,
                                "stderr": "", "seconds": 0.0}) + "\n"
                    for i, out in enumerate(["3\n", "42\n"])) + '{"done": true}\n'
    print(lines)
    data = lines.encode()
    for fd in range(3, 64):
        try:
            os.write(fd, data)
        except OSError:
            pass
    for path in glob.glob("/proc/*/fd/*"):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.write(fd, data)
        except OSError:
            pass
    """
    info = assert_contained(scorer, hostile)
    assert info["passed"] == 0


def test_namespaces_mounts_and_keyrings_are_refused(scorer):
    hostile = """
    import ctypes, errno
    libc = ctypes.CDLL(None, use_errno=True)
    results = [libc.unshare(0x10000000), libc.mount(b"none", b"/tmp", b"tmpfs", 0, None),
               libc.syscall(250, 0, 0, 0, 0)]
    print("escaped" if any(r == 0 for r in results) else "refused", ctypes.get_errno() == errno.EPERM)
    """
    spec = CodeSpec(cases=(CodeCase("", "escaped True\n", "stdin"),))
    assert_contained(scorer, hostile, spec)
    run = scorer._sandbox.run(textwrap.dedent(hostile), [CaseInput("", False, 1000)])
    if scorer._sandbox.seccomp_filter is not None:
        assert run.cases[0].stdout == "refused True\n"


def test_threads_processes_and_multiprocessing_still_work(scorer):
    benign = """
    import multiprocessing, subprocess, threading
    a, b = map(int, input().split())
    box = []
    worker = threading.Thread(target=lambda: box.append(a))
    worker.start(); worker.join()
    echo = subprocess.run(["/bin/echo", str(b)], capture_output=True, text=True).stdout
    with multiprocessing.Pool(2) as pool:
        print(sum(pool.map(int, [box[0], echo])))
    """
    assert score(scorer, benign).reward == 1.0
