"""Test harness that runs INSIDE the code sandbox (standalone: stdlib only, no srpo_ray).

    python -I -S _harness.py JOB_FD RESULT_FD CONTROL_FD

Reads one job (JSON) from JOB_FD: programs, each with the cases to run. Each case runs
in a fresh child forked from this process, with its stdin, stdout and stderr on
in-memory files, rlimits set in the child before the program's first line, and a
wall-clock limit enforced from here. Messages on RESULT_FD, one JSON object a line:

    {"p": 0, "begin": true}
    {"p": 0, "i": 0, "status": "exited"|"timeout", "exit": 0, "signal": null,
     "stdout": "...", "truncated": false, "returned": "<JSON text>"|null,
     "stderr": "<tail>", "seconds": 0.01}
    {"p": 0, "end": true}
    ... {"done": true}

After each case line the harness waits for one byte on CONTROL_FD: "c" to go on, "s"
to skip the program's remaining cases (the worker judges; a failed case ends an
all-or-nothing program). The harness never sees expected outputs and never judges, so
nothing a program prints or returns can decide its own verdict. RESULT_FD is a
separate channel: children close it before the program starts, and this process makes
itself non-dumpable so programs of the same uid cannot reopen it via /proc/1/fd or
ptrace it.

Run as PID 1 of a fresh PID namespace (bwrap --as-pid-1), `kill(-1, SIGKILL)` after
each case ends every process the case left behind (daemons included), and signals sent
by programs cannot kill this process (the kernel shields a namespace's init). Before
each program /tmp and /dev/shm are emptied and System V IPC objects removed, so one
program leaves nothing for the next (if that fails, the harness stops and the worker
runs the rest in a fresh sandbox). Outside a namespace (UNSAFE_no_sandbox) only the
case's process group is killed and nothing is reset.
"""
import json
import os
import resource
import select
import signal
import sys
import time

# LeetCode-style programs use these names without importing them (LiveCodeBench's
# grader pre-imports them too); only functional cases get this prelude.
FUNCTIONAL_PRELUDE = (
    "from typing import *\nfrom collections import *\nfrom heapq import *\n"
    "from bisect import *\nfrom itertools import *\nfrom functools import *\n"
    "import math, heapq, bisect, collections, itertools, functools, re, string, operator\n"
)
STDERR_TAIL_BYTES = 2000
WRITABLE_DIRS = ("/tmp", "/dev/shm")


def main() -> None:
    job_fd, result_fd, control_fd = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    _make_undumpable()
    # Python turns SIGINT into KeyboardInterrupt; a program must not end the harness
    # that way (init ignores only signals without a handler).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    job = json.loads(_read_all(job_fd).decode("utf-8"))
    os.close(job_fd)
    sys.path.extend(job.get("sys_path", []))
    if any(case["functional"] for spec in job["specs"] for case in spec["cases"]):
        # Imported once here so every forked case finds them loaded.
        exec(compile(FUNCTIONAL_PRELUDE, "<prelude>", "exec"), {})
    as_init = os.getpid() == 1
    for p, program in enumerate(job["programs"]):
        # Reset before "begin", so its time is never charged to a program.
        if as_init and job.get("reset_between_programs") and not _reset_shared_state():
            return  # dirty: the worker reruns the remaining programs in a fresh sandbox
        _write_line(result_fd, {"p": p, "begin": True})
        spec = job["specs"][program["spec"]]
        deadline = time.monotonic() + job["total_timeout_s"]
        for i, case in enumerate(spec["cases"]):
            left = deadline - time.monotonic()
            if left <= 0:
                record = {"status": "timeout", "exit": None, "signal": None, "stdout": "",
                          "truncated": False, "returned": None, "stderr": "total time limit reached",
                          "seconds": 0.0}
            else:
                record = run_case(job, program["code"], spec["fn_name"], case,
                                  min(job["case_timeout_s"], left), as_init)
            record["p"], record["i"] = p, i
            _write_line(result_fd, record)
            reply = os.read(control_fd, 1)
            if reply == b"s":
                break
            if reply != b"c":
                return  # the worker is gone
        _write_line(result_fd, {"p": p, "end": True})
    _write_line(result_fd, {"done": True})


def _reset_shared_state() -> bool:
    """Empty /tmp and /dev/shm and drop System V IPC objects (they outlive processes).
    -> whether everything is clean; if not, the sandbox ends and the worker starts a
    fresh one for the programs still to run."""
    try:
        for folder in WRITABLE_DIRS:
            if os.path.isdir(folder):
                _empty_folder(folder)
        _remove_sysv_ipc()
        return not any(os.listdir(f) for f in WRITABLE_DIRS if os.path.isdir(f))
    except Exception:  # noqa: BLE001 - whatever went wrong, a dirty sandbox is not reused
        return False


def _empty_folder(top: str) -> None:
    """Iterative (a program may nest folders deeper than Python's recursion limit)."""
    stack = [(top, False)]
    while stack:
        path, listed = stack.pop()
        if listed:
            if path != top:
                os.rmdir(path)
            continue
        if path != top:
            os.chmod(path, 0o700)  # a program may have locked its own folders
        stack.append((path, True))
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, False))
                else:
                    os.unlink(entry.path)


def _remove_sysv_ipc() -> None:
    ids = {}
    for kind in ("shm", "sem", "msg"):
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                ids[kind] = [int(line.split()[1]) for line in f.readlines()[1:] if line.strip()]
        except (OSError, ValueError, IndexError):
            ids[kind] = []
    if not any(ids.values()):
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    ipc_rmid = 0
    for ipc_id in ids["shm"]:
        libc.shmctl(ipc_id, ipc_rmid, None)
    for ipc_id in ids["sem"]:
        libc.semctl(ipc_id, 0, ipc_rmid)
    for ipc_id in ids["msg"]:
        libc.msgctl(ipc_id, ipc_rmid, None)


def run_case(job: dict, code: str, fn_name, case: dict, timeout: float, as_init: bool) -> dict:
    functional = case["functional"]
    stdin = _memfd("stdin", b"" if functional else case["input"].encode("utf-8"))
    stdout, stderr = _memfd("stdout", b""), _memfd("stderr", b"")
    returned = _memfd("returned", b"") if functional else None
    sys.stdout.flush()
    sys.stderr.flush()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(job, code, fn_name, case, stdin, stdout, stderr, returned, timeout)  # never returns
    status, timed_out = _wait(pid, timeout)
    seconds = time.monotonic() - start
    _end_everything(pid, as_init)
    cap = case["output_cap"]
    out, truncated = _read_capped(stdout, cap)
    ret = None
    if returned is not None:
        ret_bytes, ret_truncated = _read_capped(returned, cap)
        ret = None if ret_truncated else ret_bytes.decode("utf-8", "replace")
        truncated = truncated or ret_truncated
        os.close(returned)
    err = _read_tail(stderr, STDERR_TAIL_BYTES)
    for fd in (stdin, stdout, stderr):
        os.close(fd)
    exit_code = sig = None
    if status is not None:
        if os.WIFEXITED(status):
            exit_code = os.WEXITSTATUS(status)
        elif os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
    return {"status": "timeout" if timed_out else "exited", "exit": exit_code, "signal": sig,
            "stdout": out.decode("utf-8", "replace"), "truncated": truncated, "returned": ret,
            "stderr": err.decode("utf-8", "replace"), "seconds": round(seconds, 4)}


def _child(job, code, fn_name, case, stdin, stdout, stderr, returned, timeout) -> None:
    status = 1
    try:
        os.setsid()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.dup2(stdin, 0)
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        first_free = 3
        if returned is not None:
            os.dup2(returned, 3)
            first_free = 4
        # Drops the result channel, the job and every other descriptor of the harness.
        os.closerange(first_free, 1 << 20)
        _limit(job, case, timeout)
        status = _run_program(code, fn_name, case)
    except SystemExit as e:
        status = _exit_code(e)
    except BaseException:
        status = 1
        try:
            import traceback
            traceback.print_exc()
        except BaseException:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            status = status or 1
        os._exit(status)


def _run_program(code: str, fn_name, case: dict) -> int:
    import types
    sys.set_int_max_str_digits(0)  # programs print big integers as on older Pythons
    functional = case["functional"]
    module = types.ModuleType("solution" if functional else "__main__")
    module.__file__ = "solution.py"
    sys.modules[module.__name__] = module
    sys.argv = ["solution.py"]
    if functional:
        exec(compile(FUNCTIONAL_PRELUDE, "<prelude>", "exec"), module.__dict__)
    exec(compile(code, "solution.py", "exec"), module.__dict__)
    if functional:
        target = _find_function(module.__dict__, fn_name)
        args = [json.loads(line) for line in case["input"].split("\n") if line.strip()]
        data = json.dumps(target(*args)).encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(3, view):]
    _finish_like_interpreter()
    return 0


def _find_function(namespace: dict, name: str):
    solution = namespace.get("Solution")
    if isinstance(solution, type) and callable(getattr(solution, name, None)):
        return getattr(solution(), name)
    if callable(namespace.get(name)):
        return namespace[name]
    raise NameError(f"the program defines no function or Solution method named {name!r}")


def _finish_like_interpreter() -> None:
    # A normal interpreter exit waits for non-daemon threads (programs that run main()
    # in a big-stack thread rely on it) and runs atexit handlers.
    threading = sys.modules.get("threading")
    if threading is not None:
        threading._shutdown()
    import atexit
    atexit._run_exitfuncs()


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code & 0xFF
    try:
        print(e.code, file=sys.stderr)
    except BaseException:
        pass
    return 1


def _limit(job: dict, case: dict, timeout: float) -> None:
    cpu = int(timeout) + 1
    limits = [
        # (resource, soft, hard): soft == hard so the program cannot raise it again,
        # except CPU, where the catchable SIGXCPU comes a second before SIGKILL.
        (resource.RLIMIT_AS, job["memory_bytes"], job["memory_bytes"]),
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_NPROC, job["max_processes"], job["max_processes"]),
        (resource.RLIMIT_FSIZE, case["output_cap"] + 1, case["output_cap"] + 1),
        (resource.RLIMIT_NOFILE, job["max_open_files"], job["max_open_files"]),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_MSGQUEUE, 0, 0),  # POSIX queues would outlive the program
        (resource.RLIMIT_STACK, min(job["memory_bytes"], 256 << 20), min(job["memory_bytes"], 256 << 20)),
    ]
    for which, soft, hard in limits:
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:
            hard = min(hard, current_hard)
        resource.setrlimit(which, (min(soft, hard), hard))


def _wait(pid: int, timeout: float):
    """-> (wait status or None, timed_out). Uses a pidfd so the wait has a deadline."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        try:
            ready, _, _ = select.select([pidfd], [], [], max(timeout, 0.0))
        finally:
            os.close(pidfd)
        if not ready:
            return None, True
        return os.waitpid(pid, 0)[1], False
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status, False
        time.sleep(0.002)
    return None, True


def _end_everything(pid: int, as_init: bool) -> None:
    """Kill whatever the case left running and reap it, so nothing carries over."""
    if as_init:
        try:
            os.kill(-1, signal.SIGKILL)  # every process of the namespace but us
        except ProcessLookupError:
            pass
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    while True:
        try:
            done, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not done:
            return


def _make_undumpable() -> None:
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE = 4
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")
    except (ImportError, OSError) as e:
        print(f"harness: cannot make itself non-dumpable: {e}", file=sys.stderr)
        raise SystemExit(3)


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_capped(fd: int, cap: int):
    """At most cap bytes of the file, and whether it held more."""
    size = os.fstat(fd).st_size
    return _pread(fd, min(size, cap), 0), size > cap


def _read_tail(fd: int, n: int) -> bytes:
    size = os.fstat(fd).st_size
    return _pread(fd, min(size, n), max(0, size - n))


def _pread(fd: int, n: int, offset: int) -> bytes:
    parts = []
    while n > 0:
        chunk = os.pread(fd, min(n, 1 << 20), offset)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _read_all(fd: int) -> bytes:
    parts = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


def _write_line(fd: int, record: dict) -> None:
    view = memoryview((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    while view:
        view = view[os.write(fd, view):]


if __name__ == "__main__":
    main()
