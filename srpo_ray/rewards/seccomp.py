"""A small seccomp deny-list for sandboxed programs (classic BPF, built here, no libseccomp).

Namespaces already isolate programs; this closes what they leave open to an
unprivileged uid: creating user/mount/... namespaces of its own (with which it could
mount unbounded tmpfs and exhaust host memory), mount APIs, kernel keyrings (shared by
every process of a uid), ptrace, bpf, userfaultfd, perf events, io_uring, module and
kexec calls, and the x32 / i386 entry points that would bypass a filter on x86-64
syscall numbers. Denied calls fail with EPERM; clone3 fails with ENOSYS so the C
library falls back to clone, whose namespace flags are checked here.

`deny_filter()` is the compiled filter for bubblewrap, `kafel_policy()` the same list
for nsjail. Only x86-64 is covered; elsewhere both return None and the sandbox runs
without a filter (the namespaces and rlimits still apply).
"""
from __future__ import annotations

import errno
import platform
import struct

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
CLONE_NAMESPACE_FLAGS = 0x7E020080  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME

# x86-64 syscall numbers.
DENIED = {
    "ptrace": 101, "pivot_root": 155, "mount": 165, "umount2": 166, "init_module": 175,
    "delete_module": 176, "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250,
    "unshare": 272, "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "setns": 308, "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "mount_setattr": 442,
}
CLONE, CLONE3 = 56, 435

_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000


def deny_filter() -> bytes | None:
    """The compiled filter (struct sock_filter[]) for bwrap --seccomp, or None off x86-64."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    # (label, opcode, k, jump-if-true label, jump-if-false label); None = next instruction.
    code: list[tuple[str | None, int, int, str | None, str | None]] = [
        (None, _LD_W_ABS, 4, None, None),                       # A = arch
        (None, _JEQ_K, AUDIT_ARCH_X86_64, None, "deny"),
        (None, _LD_W_ABS, 0, None, None),                       # A = syscall number
        (None, _JGE_K, X32_SYSCALL_BIT, "deny", None),
        *[(None, _JEQ_K, nr, "deny", None) for nr in sorted(DENIED.values())],
        (None, _JEQ_K, CLONE3, "enosys", None),
        (None, _JEQ_K, CLONE, "clone", None),
        (None, _RET_K, _ALLOW, None, None),
        ("clone", _LD_W_ABS, 16, None, None),                   # A = low half of flags
        (None, _JSET_K, CLONE_NAMESPACE_FLAGS, "deny", None),
        (None, _RET_K, _ALLOW, None, None),
        ("deny", _RET_K, _ERRNO | errno.EPERM, None, None),
        ("enosys", _RET_K, _ERRNO | errno.ENOSYS, None, None),
    ]
    where = {label: i for i, (label, *_rest) in enumerate(code) if label}

    def offset(i: int, target: str | None) -> int:
        return 0 if target is None else where[target] - i - 1

    return b"".join(struct.pack("=HBBI", op, offset(i, jt), offset(i, jf), k)
                    for i, (_, op, k, jt, jf) in enumerate(code))


def kafel_policy() -> str | None:
    """The same deny-list as an nsjail --seccomp_string (kafel) policy, or None off x86-64."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    denied = ", ".join(f"SYSCALL[{nr}]" for nr in sorted(DENIED.values()))
    clone_rule = f"clone {{ (clone_flags & {CLONE_NAMESPACE_FLAGS:#x}) != 0 }}"
    return (f"ERRNO({errno.EPERM}) {{ {denied}, {clone_rule} }} "
            f"ERRNO({errno.ENOSYS}) {{ SYSCALL[{CLONE3}] }} DEFAULT ALLOW")
