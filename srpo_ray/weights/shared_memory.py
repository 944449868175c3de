"""The shared_memory weight transport (the CPU default): one /dev/shm file per publisher, reused for
every weight version, read in place by the generators on the same node.

Why: the object store allocates fresh shared memory for every publish, and touching
fresh pages costs more than the copy itself (a 338 MB first write into new /dev/shm
pages took 0.3 s here, a rewrite of already-touched pages 0.023 s, a plain copy
0.020 s). Here the publisher keeps one file and each generator keeps its mapping, so
after the first version no page is faulted again: publish is one copy into the file,
delivery is the engine's own copy out of it (it is given views of the file).

Pipelined: `SharedWeightBuffer.write` returns at once and copies in a background
thread, raising a "ready bytes" counter in the file's header after each chunk; a
reader waits for a tensor's last byte before handing it to the engine, so generators
copy bucket i while the publisher writes bucket i+1. The counter is stored after the
bytes it covers, and x86-64 (TSO) makes stores visible to other cores in program
order; elsewhere the copy finishes before `write` returns (no overlap, and the Ray
reply that carries the record orders it).

Versions and overwrite safety: the file has two slots and versions alternate between
them, so a late joiner still loading version N (queued before N+1 was published)
is not disturbed by N+1. A reader holds a shared lock on its slot (fcntl.lockf, one
byte per slot) while it loads; a publish takes the slot's exclusive lock only to bump
the slot's publish number (waiting up to timeout_s for readers of the version two
back), then writes without it. A reader checks that its slot holds the publish number
its record names: a load of a version since overwritten fails loudly
(WeightsSupersededError), never silently mixes two versions. The kernel drops the
locks of a process that dies, so a dead reader blocks no one.

Cleanup: the file is /dev/shm/srpo_weights_<pid>_<token>; `close()` (and interpreter
exit) unlinks it. A SIGKILLed publisher (ray.kill, OOM killer) cannot: its file stays
until the next publisher on the node starts, which removes every srpo_weights_ file
whose pid is no longer alive (same pid namespace assumed: one /dev/shm per
container). Readers keep their mapping of an unlinked file valid until they remap.

No Ray here: the caller supplies the node id and hands records around.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import mmap
import os
import platform
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Mapping

from srpo_ray.weights.common import ask_copy
from srpo_ray.weights.layout import ALIGN_BYTES, BucketMeta, as_bytes, distinct_slots, laid_out_names, plan_buckets
from srpo_ray.weights.transport import PublishedWeights, WeightsSupersededError, WeightTransport, transport_class

if TYPE_CHECKING:
    import numpy as np
    import torch

    from srpo_ray.weights.source import WeightSource
    from srpo_ray.weights.transport import Receiver

SHM_DIR = "/dev/shm"
FILE_PREFIX = "srpo_weights_"
HEADER_BYTES = 4096  # one page: the payload starts page-aligned
CHUNK_BYTES = 16 << 20  # the ready counter advances at least every 16 MiB
MAGIC = 0x5352504F57454947  # "SRPOWEIG"
SLOTS = 2
_MAGIC, _PID = 0, 1  # int64 header fields; then per slot s: _field(s, _SEQ/_READY/_STATUS)
_SEQ, _READY, _STATUS = range(3)
WRITING, DONE, FAILED = 0, 1, 2
PIPELINED = platform.machine().lower() in ("x86_64", "amd64")


def _field(slot: int, name: int) -> int:
    return 8 + 4 * slot + name


class SharedMemoryError(RuntimeError):
    """The shared-memory transport cannot go on (no room, publisher failed or gone).
    A slot taken over by a newer publish is WeightsSupersededError instead (transport.py:
    the fleet catches it)."""


@dataclass(frozen=True)
class SharedBufferRef:
    """Where one published version lies: file `path` on node `node_id`, publish number
    `seq` in slot `slot`; bucket i's packed bytes start at file offset `bucket_offsets[i]`."""

    path: str
    node_id: str
    seq: int
    slot: int
    bucket_offsets: tuple[int, ...]
    timeout_s: float = 600.0


def payload_layout(buckets: list[BucketMeta]) -> tuple[tuple[int, ...], int]:
    """(offset of each bucket within a slot, slot size): back to back, page-rounded."""
    offsets, end = [], 0
    for meta in buckets:
        offsets.append(end)
        end += (meta.nbytes + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES
    return tuple(offsets), (end + HEADER_BYTES - 1) // HEADER_BYTES * HEADER_BYTES


def check_shm_space(directory: str, nbytes: int) -> None:
    """Refuse, naming the fix, when `directory` (a tmpfs) has no room for `nbytes`:
    writing past a full tmpfs kills the writer with SIGBUS instead of an error."""
    stats = os.statvfs(directory)
    free = stats.f_bavail * stats.f_frsize
    if free < nbytes:
        raise SharedMemoryError(
            f"rollout.weight_transport=shared_memory needs {nbytes / 2**20:.1f} MiB in {directory}, "
            f"only {free / 2**20:.1f} MiB free: enlarge it (docker run --shm-size, or the tmpfs size), "
            "or set rollout.weight_transport=object_store")


def remove_stale_files(directory: str = SHM_DIR) -> list[str]:
    """Unlink srpo_weights_<pid>_* files whose publisher process is gone (SIGKILLed)."""
    removed = []
    for name in os.listdir(directory):
        if not name.startswith(FILE_PREFIX):
            continue
        try:
            pid = int(name[len(FILE_PREFIX):].split("_")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
                removed.append(name)
        except (ValueError, PermissionError):  # not ours, or alive under another user
            continue
    return removed


def _map(path: str, size: int, writable: bool) -> tuple[int, "torch.Tensor", "np.ndarray"]:
    """(open fd, the whole file as uint8 [size], its int64 header fields)."""
    import numpy as np
    import torch

    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    # MAP_POPULATE: map every page now, once, not one fault per page at first touch
    mm = mmap.mmap(fd, size, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot)
    with warnings.catch_warnings():  # a read-only mapping: readers never write (the engine copies)
        warnings.simplefilter("ignore", UserWarning)
        data = torch.frombuffer(mm, dtype=torch.uint8)
    return fd, data, np.frombuffer(mm, dtype=np.int64, count=_field(SLOTS, 0))


class SharedWeightBuffer:
    """The publisher's file. `write` a state dict's buckets into it (in the
    background where PIPELINED), get a SharedBufferRef to hand to readers."""

    def __init__(self, node_id: str, timeout_s: float = 600.0, directory: str = SHM_DIR):
        self.node_id, self.timeout_s, self.directory = node_id, float(timeout_s), directory
        self.path: str | None = None
        self._slot_bytes = 0
        self._seq = 0
        self._fd = -1
        self._data: torch.Tensor | None = None
        self._header: np.ndarray | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        remove_stale_files(directory)
        atexit.register(self.close)

    def write(self, state: Mapping[str, "torch.Tensor"], buckets: list[BucketMeta]) -> SharedBufferRef:
        """Start publishing `state` (laid out as `buckets`) as the next version."""
        self.wait()
        offsets, slot_bytes = payload_layout(buckets)
        if slot_bytes > self._slot_bytes:
            self._create(slot_bytes)
        seq = self._seq + 1
        slot = seq % SLOTS
        base = HEADER_BYTES + slot * self._slot_bytes
        self._begin(slot, seq)
        offsets = tuple(base + o for o in offsets)
        jobs = [(offset + s.offset, as_bytes(state[s.name])) for meta, offset in zip(buckets, offsets)
                for s in distinct_slots(meta)]
        if PIPELINED:
            self._thread = threading.Thread(target=self._copy, args=(slot, jobs), name="weight-publish",
                                            daemon=True)
            self._thread.start()
        else:
            self._copy(slot, jobs)
            self.wait()
        return SharedBufferRef(self.path, self.node_id, seq, slot, offsets, self.timeout_s)

    def bucket_bytes(self, ref: SharedBufferRef, buckets: list[BucketMeta]) -> list["torch.Tensor"]:
        """Each bucket's packed bytes (views into the file), once the copy is done."""
        self.wait()
        if ref.path != self.path or int(self._header[_field(ref.slot, _SEQ)]) != ref.seq:
            raise WeightsSupersededError(f"weight publish {ref.seq} was overwritten by a newer one")
        return [self._data[base:base + meta.nbytes] for base, meta in zip(ref.bucket_offsets, buckets)]

    def wait(self) -> None:
        """Until the last write is in the file; raises if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise SharedMemoryError("publishing weights into shared memory failed") from error

    def close(self) -> None:
        """Finish the copy in flight, unlink the file (mapped readers keep their pages)."""
        with contextlib.suppress(BaseException):
            self.wait()
        self._release()
        atexit.unregister(self.close)

    # ---------------------------------------------------------------- internals
    def _create(self, slot_bytes: int) -> None:
        self._release()
        size = HEADER_BYTES + SLOTS * slot_bytes
        check_shm_space(self.directory, size)
        path = os.path.join(self.directory, f"{FILE_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:8]}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # claim the pages now: ENOSPC here, not SIGBUS later
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            if e.errno in (errno.ENOSPC, errno.ENOMEM):
                check_shm_space(self.directory, size * 2)  # raises, naming the fix
            raise
        os.close(fd)
        self._fd, self._data, self._header = _map(path, size, writable=True)
        self._header[_MAGIC], self._header[_PID] = MAGIC, os.getpid()
        self.path, self._slot_bytes = path, slot_bytes

    def _release(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self._fd)
        # the mapping itself goes with the last tensor view of it
        self.path, self._slot_bytes, self._fd, self._data, self._header = None, 0, -1, None, None

    def _begin(self, slot: int, seq: int) -> None:
        """Take `slot` over for publish `seq`, once no reader holds its old version."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise SharedMemoryError(
                        f"a generation worker still reads weight publish {seq - SLOTS} from {self.path} after "
                        f"{self.timeout_s:.0f} s (learner.collective_timeout_s): not overwriting it") from None
                time.sleep(0.001)
        try:
            header = self._header
            header[_field(slot, _STATUS)], header[_field(slot, _READY)] = WRITING, 0
            header[_field(slot, _SEQ)] = seq
            self._seq = seq
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, slot)

    def _copy(self, slot: int, jobs: list[tuple[int, "torch.Tensor"]]) -> None:
        data, header = self._data, self._header
        ready, status = _field(slot, _READY), _field(slot, _STATUS)
        try:
            for offset, src in jobs:
                for start in range(0, src.numel(), CHUNK_BYTES):
                    part = src[start:start + CHUNK_BYTES]
                    data[offset + start:offset + start + part.numel()].copy_(part)
                    header[ready] = offset + start + part.numel()  # stored after the bytes it covers
            header[ready] = data.numel()
            header[status] = DONE
        except BaseException as e:  # noqa: BLE001 - re-raised by wait(); readers see FAILED
            self._error = e
            header[status] = FAILED


class SharedWeightReader:
    """A generation worker's mapping of a publisher's file, kept from one version to
    the next (remapped only when the publisher made a new file)."""

    def __init__(self):
        self.path: str | None = None
        self._fd = -1
        self._data: torch.Tensor | None = None
        self._header: np.ndarray | None = None

    @contextlib.contextmanager
    def reading(self, ref: SharedBufferRef,
                buckets: list[BucketMeta]) -> Iterator[Iterator[tuple[str, "torch.Tensor"]]]:
        """(name, tensor) of every slot of every bucket, as read-only views into the
        file, each yielded once its bytes are written. The version is not overwritten
        while the context is open: leave it only after the engine has copied the values.
        Raises WeightsSupersededError on entry if a newer publish took the slot over."""
        self._open(ref.path)
        fcntl.lockf(self._fd, fcntl.LOCK_SH, 1, ref.slot)
        try:
            seq = int(self._header[_field(ref.slot, _SEQ)])
            if seq != ref.seq:
                raise WeightsSupersededError(
                    f"{ref.path} slot {ref.slot} holds publish {seq}, this load asked for {ref.seq}: newer "
                    "weights were published before this worker loaded these")
            yield self._stream(ref, buckets)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, ref.slot)

    def _stream(self, ref: SharedBufferRef, buckets: list[BucketMeta]) -> Iterator[tuple[str, "torch.Tensor"]]:
        import torch

        ready = 0
        for meta, base in zip(buckets, ref.bucket_offsets):
            for slot in meta.slots:
                end = base + slot.offset + slot.nbytes
                if end > ready:
                    ready = self._wait_ready(ref, end)
                view = self._data[base + slot.offset:end]
                yield slot.name, view.view(getattr(torch, slot.dtype)).reshape(slot.shape)

    def _wait_ready(self, ref: SharedBufferRef, end: int) -> int:
        header, deadline, pause = self._header, time.monotonic() + ref.timeout_s, 20e-6
        ready_at, status_at = _field(ref.slot, _READY), _field(ref.slot, _STATUS)
        while True:
            ready, status = int(header[ready_at]), int(header[status_at])
            if ready >= end:
                return ready
            if status == FAILED:
                raise SharedMemoryError(f"the publisher of {ref.path} failed while writing publish {ref.seq}")
            pid = int(header[_PID])
            if not _alive(pid):
                raise SharedMemoryError(f"the publisher of {ref.path} (pid {pid}) died while writing "
                                        f"publish {ref.seq}")
            if time.monotonic() > deadline:
                raise SharedMemoryError(f"{ref.path}: publish {ref.seq} stalled at byte {ready} of {end} "
                                        f"for {ref.timeout_s:.0f} s")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def _open(self, path: str) -> None:
        if path == self.path:
            return
        self.close()
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise WeightsSupersededError(f"weight buffer {path} is gone: its publisher closed or replaced it "
                                         "(newer weights, or the learner restarted)") from None
        self._fd, self._data, self._header = _map(path, size, writable=False)
        if int(self._header[_MAGIC]) != MAGIC:
            self.close()
            raise SharedMemoryError(f"{path} is not a weight buffer")
        self.path = path

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self.path, self._fd, self._data, self._header = None, -1, None, None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- the transport

class SharedMemoryTransport(WeightTransport):
    """Learner side: the state goes (in the background where PIPELINED) into this
    process's /dev/shm file, reused from one publish to the next; `close` removes it.
    Generation side: a worker on the file's node reads views of it as each tensor's bytes
    land; one on another node asks the publisher for an object-store copy (`catch_up`).
    Fleet side: every worker loads, late joiners alike."""

    name = "shared_memory"
    takes_full_state_on_cpu = True

    def __init__(self, ops, settings=None):
        super().__init__(ops, settings)
        self._buffer: SharedWeightBuffer | None = None
        self._reader: SharedWeightReader | None = None
        self._published: PublishedWeights | None = None
        self._copy: PublishedWeights | None = None

    def publish(self, source: "WeightSource") -> PublishedWeights | None:
        state = source.state_dict()  # every rank takes part; rank 0 holds the result
        if state is None:
            return None
        buckets = plan_buckets(state, self.settings.bucket_bytes)
        if self._buffer is None:
            self._buffer = SharedWeightBuffer(self.ops.node_id(), self.settings.timeout_s)
        self._copy = None
        # returns while the copy goes on: generators load each tensor as it lands
        ref = self._buffer.write(state, buckets)
        self._published = PublishedWeights(self.name, buckets, source=self.ops.current_actor(),
                                           timeout_s=self.settings.timeout_s, detail=ref, publish_id=ref.seq)
        return self._published

    def serve_catch_up(self) -> PublishedWeights:
        """The last publish as object-store buckets, for a generator on another node
        (put once per publish, on first request)."""
        from srpo_ray.weights.object_store import put_buckets

        if self._published is None:
            raise RuntimeError("no weights published yet")
        if self._copy is None:
            pub = self._published
            self._copy = put_buckets(self.ops, pub, self._buffer.bucket_bytes(pub.detail, pub.buckets))
        return self._copy

    def wait(self) -> None:
        if self._buffer is not None:
            self._buffer.wait()

    def close(self) -> None:
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def load(self, published: PublishedWeights, version: int, receiver: "Receiver", *extra) -> int:
        ref: SharedBufferRef = published.detail
        if ref.node_id != self.ops.node_id():
            copy = ask_copy(self.ops, self.name, published)
            return transport_class(copy.transport)(self.ops).load(copy, version, receiver)
        if self._reader is None:
            self._reader = SharedWeightReader()  # the mapping, kept across versions
        with self._reader.reading(ref, published.buckets) as stream:  # checks the version first
            return receiver.load_stream(laid_out_names(published.buckets), stream, version)
