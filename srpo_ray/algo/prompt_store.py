"""What the History Resampling ledger (srpo_ray/algo/ledger.py) remembers per prompt,
numpy-backed: its id, whether it is eligible (in the current stage's set) or removed,
the open epoch's counts, and the history of closed epochs and removals, exported as one
table (`history_table`, `python -m srpo_ray.ledger`). The sampling rules live in the
ledger; this is its memory.

Memory: no per-prompt Python objects. Every prompt has an integer slot; its state lives
in numpy arrays indexed by slot; ids are stored as one UTF-8 byte buffer plus offsets;
the id -> slot map is a sorted array of 64-bit BLAKE2b hashes searched with
np.searchsorted (hash collisions are detected and raised). About 37 bytes per prompt
plus its id's bytes, plus 16 bytes per (prompt, epoch) observation kept as history and 8
per removal.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

_LOG_FIELDS = ("slot", "epoch", "correct", "samples")
_REMOVAL_FIELDS = ("slot", "epoch")  # one row per removal by History Resampling


def _hash_ids(ids: Sequence[str]) -> np.ndarray:
    """Stable (across processes and runs) 64-bit hash of each id -> uint64 [len(ids)]."""
    blake2b = hashlib.blake2b
    return np.fromiter((int.from_bytes(blake2b(i.encode("utf-8"), digest_size=8).digest(), "little")
                        for i in ids), dtype=np.uint64, count=len(ids))


class HashCollisionError(ValueError):
    """Two different prompt ids have the same 64-bit hash (odds about 3 in 10^6 for 10^7 ids)."""


class PromptStore:
    """Per-prompt state by slot (see the module docstring). `_epoch` is the index of the
    open epoch, the one the `_ep_*` counts belong to; the ledger advances it."""

    def __init__(self) -> None:
        self._epoch = 0
        self._id_data = np.zeros(0, np.uint8)
        self._id_offsets = np.zeros(1, np.int64)
        self._keys_sorted = np.zeros(0, np.uint64)
        self._slot_by_key = np.zeros(0, np.int32)
        self._removed_at = np.zeros(0, np.int32)  # epoch whose close removed it; -1: not removed
        self._eligible = np.zeros(0, bool)  # in the current stage's set
        self._ep_samples = np.zeros(0, np.int32)  # rollouts recorded in the open epoch
        self._ep_correct = np.zeros(0, np.int32)
        self._log: dict[str, list[np.ndarray]] = {f: [] for f in _LOG_FIELDS}  # closed epochs
        self._removals: dict[str, list[np.ndarray]] = {f: [] for f in _REMOVAL_FIELDS}

    @property
    def num_known(self) -> int:
        """Prompts ever registered through set_pool."""
        return len(self._removed_at)

    def _store_nbytes(self) -> int:
        arrays = [self._id_data, self._id_offsets, self._keys_sorted, self._slot_by_key,
                  self._removed_at, self._eligible, self._ep_samples, self._ep_correct]
        logs = [a for f in _LOG_FIELDS for a in self._log[f]] + [a for f in _REMOVAL_FIELDS for a in self._removals[f]]
        return sum(a.nbytes for a in arrays + logs)

    # ---- checkpointing and export --------------------------------------------------------

    def _id_state(self) -> dict[str, np.ndarray]:
        """The ids and per-prompt arrays, as the ledger's state_dict stores them."""
        return {
            "id_data": self._id_data, "id_offsets": self._id_offsets,
            "keys_sorted": self._keys_sorted.view(np.int64), "slot_by_key": self._slot_by_key,
            "removed_at": self._removed_at, "eligible": self._eligible, "ep_samples": self._ep_samples,
            "ep_correct": self._ep_correct,
        }

    def _history_state(self) -> dict[str, np.ndarray]:
        """The closed epochs' log and the removals, as the ledger's state_dict stores them."""
        arrays = {f"log_{f}": self._log_array(f) for f in _LOG_FIELDS}
        arrays.update({f"removal_{f}": _compact(self._removals, f) for f in _REMOVAL_FIELDS})
        return arrays

    def _load_store(self, state: dict[str, Any], arr: Callable[[str, Any], np.ndarray]) -> None:
        """Restore what `_id_state` and `_history_state` saved; `arr(name, dtype)` reads
        one array of `state`."""
        n = len(arr("removed_at", np.int32))
        keys = arr("keys_sorted", np.int64).view(np.uint64)
        offsets = arr("id_offsets", np.int64)
        if len(keys) != n or len(offsets) != n + 1:
            raise ValueError("ledger state is inconsistent (array lengths differ); the checkpoint is damaged")
        self._id_data, self._id_offsets = arr("id_data", np.uint8), offsets
        self._keys_sorted, self._slot_by_key = keys, arr("slot_by_key", np.int32)
        self._removed_at, self._eligible = arr("removed_at", np.int32), arr("eligible", bool)
        self._ep_samples, self._ep_correct = arr("ep_samples", np.int32), arr("ep_correct", np.int32)
        self._log = {f: [arr(f"log_{f}", np.int32)] for f in _LOG_FIELDS}
        if "removal_slot" in state:
            self._removals = {f: [arr(f"removal_{f}", np.int32)] for f in _REMOVAL_FIELDS}
        else:  # written before removals were logged: what removed_at still knows
            slots = np.flatnonzero(self._removed_at >= 0).astype(np.int32)
            self._removals = {"slot": [slots], "epoch": [self._removed_at[slots]]}

    def history_table(self) -> pa.Table:
        """Per-prompt difficulty history, one row per known prompt (data curation):
        prompt_id; epochs (epoch indices in which it was observed) with correct, samples
        and pass_rates in those epochs (the last may be the open epoch); pass_rate over
        all of them (null if never observed); removed_epochs (every epoch whose close
        removed it); removed_at_epoch (the latest of those while it is still out; null if
        never removed or re-tested back); in_pool; total_samples, total_correct."""
        slot, epoch, correct, samples = (self._history_array(f) for f in _LOG_FIELDS)
        n = self.num_known

        def per_prompt(slots: np.ndarray, epochs: np.ndarray, *values: np.ndarray) -> list[pa.Array]:
            order = np.lexsort((epochs, slots))
            offsets = np.zeros(n + 1, np.int64)
            np.cumsum(np.bincount(slots, minlength=n), out=offsets[1:])
            return [pa.LargeListArray.from_arrays(offsets, pa.array(v[order])) for v in (epochs, *values)]

        epochs, correct_lists, sample_lists, rates = per_prompt(slot, epoch, correct, samples,
                                                                correct / np.maximum(samples, 1))
        removed_slot, removed_epoch = (_compact(self._removals, f).astype(np.int64) for f in _REMOVAL_FIELDS)
        [removed_epochs] = per_prompt(removed_slot, removed_epoch)
        total_samples = np.bincount(slot, weights=samples, minlength=n).astype(np.int64)
        total_correct = np.bincount(slot, weights=correct, minlength=n).astype(np.int64)
        return pa.table({
            "prompt_id": self._id_array(),
            "epochs": epochs, "correct": correct_lists, "samples": sample_lists, "pass_rates": rates,
            "pass_rate": pa.array(total_correct / np.maximum(total_samples, 1), mask=total_samples == 0),
            "removed_epochs": removed_epochs,
            "removed_at_epoch": pa.array(self._removed_at, mask=self._removed_at < 0),
            "in_pool": pa.array(self._eligible & (self._removed_at < 0)),
            "total_samples": pa.array(total_samples), "total_correct": pa.array(total_correct),
        })

    def export_parquet(self, path: str | Path) -> None:
        """`history_table()` written as parquet."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(self.history_table(), path)

    # ---- history -------------------------------------------------------------------------

    def _append_history(self, epoch: int) -> None:
        """Move the open epoch's counts into the log (as `epoch`), with the removals its
        close made, and reset the counts."""
        seen = np.flatnonzero(self._ep_samples > 0).astype(np.int32)
        chunk = {"slot": seen, "epoch": np.full(len(seen), epoch, np.int32),
                 "correct": self._ep_correct[seen], "samples": self._ep_samples[seen]}
        for f in _LOG_FIELDS:
            self._log[f].append(chunk[f])
        self._ep_samples[seen] = 0
        self._ep_correct[seen] = 0
        removed = np.flatnonzero(self._removed_at == epoch).astype(np.int32)  # by this close
        if removed.size:
            self._removals["slot"].append(removed)
            self._removals["epoch"].append(np.full(len(removed), epoch, np.int32))

    def _log_array(self, field: str) -> np.ndarray:
        return _compact(self._log, field)

    def _history_array(self, field: str) -> np.ndarray:
        """Closed epochs' log plus the open epoch's observations."""
        seen = np.flatnonzero(self._ep_samples > 0)
        open_part = {"slot": seen, "epoch": np.full(len(seen), self._epoch),
                     "correct": self._ep_correct[seen], "samples": self._ep_samples[seen]}[field]
        return np.concatenate([self._log_array(field), open_part.astype(np.int32)]).astype(np.int64)

    # ---- ids -------------------------------------------------------------------------------

    def _id_array(self) -> pa.LargeStringArray:
        return pa.LargeStringArray.from_buffers(len(self._id_offsets) - 1, pa.py_buffer(self._id_offsets),
                                                pa.py_buffer(self._id_data))

    def _ids_of(self, slots: np.ndarray) -> list[str]:
        data, off = self._id_data, self._id_offsets
        return [data[off[s]:off[s + 1]].tobytes().decode("utf-8") for s in slots.tolist()]

    def _slot_of(self, prompt_id: str) -> int:
        key = _hash_ids([prompt_id])[0]
        pos = int(np.searchsorted(self._keys_sorted, key))
        if pos < len(self._keys_sorted) and self._keys_sorted[pos] == key:
            slot = int(self._slot_by_key[pos])
            start, end = self._id_offsets[slot], self._id_offsets[slot + 1]
            if self._id_data[start:end].tobytes() == prompt_id.encode("utf-8"):  # not a collision
                return slot
        raise KeyError(f"prompt id {prompt_id!r} is not in the ledger; observe only ids handed out by "
                       f"next_batch (ids are registered by set_pool)")

    def _register(self, prompt_ids: Sequence[str]) -> np.ndarray:
        """Slots of `prompt_ids`, registering unknown ones. Raises on duplicates, empty or
        non-string ids, and hash collisions."""
        ids = prompt_ids if isinstance(prompt_ids, list) else list(prompt_ids)
        try:
            arr = pa.array(ids, type=pa.large_string())
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ValueError(f"prompt ids must be strings: {e}") from None
        if len(ids) == 0:
            return np.zeros(0, np.int64)
        if arr.null_count or not pc.all(pc.greater(pc.binary_length(arr), 0)).as_py():
            raise ValueError("prompt ids must be non-empty strings; give every prompt an id "
                             "(or let the data loader hash its content)")
        keys = _hash_ids(ids)
        by_key = np.argsort(keys, kind="stable")
        sorted_keys = keys[by_key]
        same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
        if same.size:
            a, b = ids[by_key[same[0]]], ids[by_key[same[0] + 1]]
            if a == b:
                raise ValueError(f"prompt id {a!r} appears twice in set_pool; ids must be unique")
            raise HashCollisionError(f"prompt ids {a!r} and {b!r} have the same 64-bit hash; rename one")
        if self.num_known == 0:  # first registration: the sorted keys are the whole map
            self._append_ids(arr)
            self._keys_sorted, self._slot_by_key = sorted_keys, by_key.astype(np.int32)
            return np.arange(len(ids), dtype=np.int64)
        del sorted_keys, by_key

        pos = np.minimum(np.searchsorted(self._keys_sorted, keys), len(self._keys_sorted) - 1)
        known = self._keys_sorted[pos] == keys
        slots = np.empty(len(ids), np.int64)
        slots[known] = self._slot_by_key[pos[known]]
        if known.any():  # a known hash must also be the known text
            stored = self._id_array().take(pa.array(slots[known]))
            same_text = pc.equal(stored, arr.filter(pa.array(known)))
            if not pc.all(same_text).as_py():
                first_bad = int(pc.index(same_text, False).as_py())
                i = int(np.flatnonzero(known)[first_bad])
                raise HashCollisionError(f"prompt id {ids[i]!r} has the same 64-bit hash as the known id "
                                         f"{self._ids_of(slots[i:i + 1])[0]!r}; rename one")
        fresh = np.flatnonzero(~known)
        if fresh.size:
            new_slots = self._append_ids(arr.take(pa.array(fresh)))
            slots[fresh] = new_slots
            all_keys = np.concatenate([self._keys_sorted, keys[fresh]])
            order = np.argsort(all_keys, kind="stable")
            self._keys_sorted = all_keys[order]
            self._slot_by_key = np.concatenate([self._slot_by_key, new_slots])[order]
        return slots

    def _append_ids(self, new: pa.LargeStringArray) -> np.ndarray:
        """Store the ids' text, give them fresh slots (returned, int32) with empty state.
        The caller updates the hash map."""
        first, count = self.num_known, len(new)
        offsets = np.frombuffer(new.buffers()[1], dtype=np.int64)[new.offset:new.offset + count + 1]
        data_buf = new.buffers()[2]
        data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0]:offsets[-1]]
        self._id_data = np.concatenate([self._id_data, data])
        self._id_offsets = np.concatenate([self._id_offsets, self._id_offsets[-1] + offsets[1:] - offsets[0]])
        grow = {"_removed_at": -1, "_eligible": False, "_ep_samples": 0, "_ep_correct": 0}
        for name, fill in grow.items():
            old = getattr(self, name)
            setattr(self, name, np.concatenate([old, np.full(count, fill, old.dtype)]))
        return np.arange(first, first + count, dtype=np.int32)


def _compact(log: dict[str, list[np.ndarray]], field: str) -> np.ndarray:
    """One array of a log's field (its per-epoch parts concatenated once, so the list
    stays short)."""
    parts = log[field]
    if len(parts) > 1:
        log[field] = parts = [np.concatenate(parts)]
    return parts[0] if parts else np.zeros(0, np.int32)
