"""History Resampling as a sampler: the ledger hands out prompt ids epoch by epoch,
records how many rollouts of each prompt were correct, and at each epoch's end removes
the prompts that were solved every time.

Rules (SRPO, arXiv 2504.14286, plus the choices the paper leaves open):
- An epoch is one pass over the pool in a seeded random order; `next_batch` hands it
  out k ids at a time. When the order is used up, the *next* `next_batch` call closes
  the epoch (so the last batch's observations land in it) and starts another.
- Closing an epoch: among the prompts of that epoch's pool, those whose every recorded
  rollout in the epoch was correct leave the pool. Mixed and all-wrong prompts stay
  (all-wrong ones may become solvable); prompts never observed stay.
- Observations count in the epoch that is open when `observe` is called: with a
  pipelined driver, results of the last batch that arrive after the close count in the
  next epoch (a prompt is never dropped on missing evidence).
- `set_pool` (start, stage switch) restricts the pool to the given ids, minus removed
  ones, and starts a fresh shuffle. The epoch count does not advance; observations made
  so far in the open epoch carry over and are judged when it closes.
- Re-test (`retest_every_epochs=K>0`, our choice): a removed prompt sits out K epochs
  and then comes back into the pool; if it is all-correct again it leaves again.
- `enabled=False` never removes anything (plain epoch sampler that still keeps history).
- Weighted sources (`set_pool(ids, sources, weights)`): an epoch is as many draws as the
  pool has prompts, each from a source picked by weight (srpo_ray/algo/source_mix.py);
  the drop rule above is unchanged, judged on every prompt of the epoch's pool.

Memory: no per-prompt Python objects. Every prompt has an integer slot; its state lives
in numpy arrays indexed by slot; ids are stored as one UTF-8 byte buffer plus offsets;
the id -> slot map is a sorted array of 64-bit BLAKE2b hashes searched with
np.searchsorted (hash collisions are detected and raised). About 37 bytes per prompt
plus its id's bytes, plus 16 bytes per (prompt, epoch) observation kept as history and 8
per removal (`history_table` and `python -m srpo_ray.ledger` read them back).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from srpo_ray.algo.source_mix import SourceMix, weighted_order
from srpo_ray.config.schema import ResampleConfig

_STATE_VERSION = 1
_LOG_FIELDS = ("slot", "epoch", "correct", "samples")
_REMOVAL_FIELDS = ("slot", "epoch")  # one row per removal by History Resampling


def _hash_ids(ids: Sequence[str]) -> np.ndarray:
    """Stable (across processes and runs) 64-bit hash of each id -> uint64 [len(ids)]."""
    blake2b = hashlib.blake2b
    return np.fromiter((int.from_bytes(blake2b(i.encode("utf-8"), digest_size=8).digest(), "little")
                        for i in ids), dtype=np.uint64, count=len(ids))


class HashCollisionError(ValueError):
    """Two different prompt ids have the same 64-bit hash (odds about 3 in 10^6 for 10^7 ids)."""


class HistoryLedger:
    """See the module docstring. Typical driver use:

        ledger.set_pool(ids_of_stage)
        ids, closed = ledger.next_batch(k)     # closed: metrics of an epoch that ended
        ... ledger.observe(pid, num_correct, num_samples) for each scored group ...
    """

    def __init__(self, cfg: ResampleConfig, seed: int):
        if cfg.retest_every_epochs < 0:
            raise ValueError(f"resample.retest_every_epochs={cfg.retest_every_epochs} must be >= 0 "
                             f"(0 = removed prompts never come back)")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"ledger seed must be an integer >= 0, got {seed!r} (check trainer.seed)")
        self.cfg = cfg
        self._seed = int(seed)
        self._epoch = 0
        self._generation = 0  # set_pool calls; part of the shuffle's seed
        self._cursor = 0
        self._started = False
        self._order = np.zeros(0, np.int32)  # the open epoch's shuffled pool (slots)
        self._id_data = np.zeros(0, np.uint8)
        self._id_offsets = np.zeros(1, np.int64)
        self._keys_sorted = np.zeros(0, np.uint64)
        self._slot_by_key = np.zeros(0, np.int32)
        self._removed_at = np.zeros(0, np.int32)  # epoch whose close removed it; -1: not removed
        self._eligible = np.zeros(0, bool)  # in the current stage's set
        self._ep_samples = np.zeros(0, np.int32)  # rollouts recorded in the open epoch
        self._ep_correct = np.zeros(0, np.int32)
        self._log: dict[str, list[np.ndarray]] = {f: [] for f in _LOG_FIELDS}  # closed epochs
        self._mix: SourceMix | None = None  # weighted sources; None: plain epochs
        self._removals: dict[str, list[np.ndarray]] = {f: [] for f in _REMOVAL_FIELDS}

    # ---- sampler interface -------------------------------------------------------------

    def set_pool(self, prompt_ids: Sequence[str], sources: Sequence[str] | None = None,
                 weights: Mapping[str, float] | None = None) -> None:
        """Make `prompt_ids` the eligible set (removed ones stay out) and start a new
        shuffle over the pool. Ids not seen before are registered. With `weights`
        ({source: weight}) and `sources` (each id's source), epochs draw by source
        weight (see the module docstring); without, plain epochs."""
        slots = self._register(prompt_ids)
        self._eligible[:] = False
        self._eligible[slots] = True
        self._set_mix(slots, sources, weights)
        self._generation += 1
        self._started = True
        self._start_epoch()

    def use_source_weights(self, prompt_ids: Sequence[str], sources: Sequence[str],
                           weights: Mapping[str, float] | None) -> None:
        """Draw the pool's next epochs by these source weights (None or {}: plain epochs),
        leaving the open epoch's order as it is: after `load_state_dict`, the trainer
        re-attaches its stage's weighting this way (it is config, not checkpointed)."""
        self._set_mix(self._register(prompt_ids), sources, weights)

    def next_batch(self, k: int) -> tuple[list[str], dict]:
        """Up to k ids of the open epoch (fewer at its end). If the epoch's order is used
        up, first close it (History Resampling) and start the next; the dict then holds
        the closed epoch's metrics (see `close_epoch`), else it is empty. Returns ([], ...)
        when the pool is empty: the caller stops or switches stage."""
        if not self._started:
            raise RuntimeError("HistoryLedger.next_batch called before set_pool; give it the "
                               "prompt ids of the first stage first")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"next_batch(k): k must be an integer >= 0, got {k!r}")
        closed: dict = {}
        if self.epoch_exhausted and len(self._order) > 0:
            closed = self.close_epoch()
        taken = self._order[self._cursor:self._cursor + int(k)]
        self._cursor += len(taken)
        return self._ids_of(taken), closed

    def observe(self, prompt_id: str, num_correct: int, num_samples: int) -> None:
        """Record that `num_correct` of `num_samples` rollouts of the prompt were correct."""
        if not 0 <= num_correct <= num_samples or num_samples < 1:
            raise ValueError(f"observe({prompt_id!r}): need 0 <= num_correct <= num_samples and "
                             f"num_samples >= 1, got num_correct={num_correct}, num_samples={num_samples}")
        slot = self._slot_of(prompt_id)
        self._ep_samples[slot] += num_samples
        self._ep_correct[slot] += num_correct

    def close_epoch(self) -> dict:
        """Close the open epoch now: apply History Resampling (and re-tests), keep its
        observations as history, start the next epoch. `next_batch` calls this itself
        when the order is used up. Returns metrics: epoch (index of the closed epoch),
        pool_size_before/after, dropped, returned (re-tests), observed, unobserved,
        frac_all_correct / frac_all_wrong / frac_mixed (of the observed pool prompts)."""
        if not self._started:
            raise RuntimeError("HistoryLedger.close_epoch called before set_pool")
        closing = self._epoch
        pool = self._order if self._mix is None else self._pool_slots()  # weighted: draws repeat or skip
        samples, correct = self._ep_samples[pool], self._ep_correct[pool]
        observed = samples > 0
        all_correct = observed & (correct == samples)
        all_wrong = observed & (correct == 0)
        num_observed = int(observed.sum())

        returned = 0
        if self.cfg.retest_every_epochs > 0:  # before this close's drops: they must sit out
            back = (self._removed_at >= 0) & (closing - self._removed_at >= self.cfg.retest_every_epochs)
            returned = int((back & self._eligible).sum())
            self._removed_at[back] = -1
        dropped = 0
        if self.cfg.enabled:
            self._removed_at[pool[all_correct]] = closing
            dropped = int(all_correct.sum())

        self._append_history(closing)
        self._epoch += 1
        self._start_epoch()

        def frac(x: np.ndarray) -> float:
            return float(x.sum()) / num_observed if num_observed else 0.0

        return {
            "epoch": closing,
            "pool_size_before": len(pool),
            "pool_size_after": len(self._order),
            "dropped": dropped,
            "returned": returned,
            "observed": num_observed,
            "unobserved": len(pool) - num_observed,
            "frac_all_correct": frac(all_correct),
            "frac_all_wrong": frac(all_wrong),
            "frac_mixed": frac(observed & ~all_correct & ~all_wrong),
        }

    # ---- properties --------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """Number of completed (closed) epochs; also the index of the open one."""
        return self._epoch

    @property
    def epoch_in_progress(self) -> bool:
        """True when the open epoch has handed out at least one id."""
        return self._cursor > 0

    @property
    def epoch_exhausted(self) -> bool:
        """True when every id of the open epoch has been handed out (it closes on the
        next `next_batch`, or call `close_epoch` to see its metrics first)."""
        return self._cursor >= len(self._order)

    @property
    def pool_size(self) -> int:
        """Prompts in the open epoch's pool (eligible and not removed)."""
        return len(self._order)

    @property
    def num_removed(self) -> int:
        """Known prompts currently removed by History Resampling (any stage)."""
        return int((self._removed_at >= 0).sum())

    @property
    def num_known(self) -> int:
        """Prompts ever registered through set_pool."""
        return len(self._removed_at)

    @property
    def nbytes(self) -> int:
        """Bytes held in the ledger's arrays (the whole state)."""
        arrays = [self._order, self._id_data, self._id_offsets, self._keys_sorted, self._slot_by_key,
                  self._removed_at, self._eligible, self._ep_samples, self._ep_correct]
        mix = self._mix.nbytes if self._mix is not None else 0
        logs = [a for f in _LOG_FIELDS for a in self._log[f]] + [a for f in _REMOVAL_FIELDS for a in self._removals[f]]
        return mix + sum(a.nbytes for a in arrays + logs)

    # ---- checkpointing and export --------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (same future batches and decisions), as
        torch tensors and Python scalars, so torch.save/torch.load(weights_only=True) work."""
        arrays = {
            "id_data": self._id_data, "id_offsets": self._id_offsets,
            "keys_sorted": self._keys_sorted.view(np.int64), "slot_by_key": self._slot_by_key,
            "removed_at": self._removed_at, "eligible": self._eligible, "ep_samples": self._ep_samples,
            "ep_correct": self._ep_correct, "order": self._order,
        }
        arrays.update({f"log_{f}": self._log_array(f) for f in _LOG_FIELDS})
        arrays.update({f"removal_{f}": _compact(self._removals, f) for f in _REMOVAL_FIELDS})
        state: dict[str, Any] = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}
        state.update(version=_STATE_VERSION, seed=self._seed, epoch=self._epoch,
                     generation=self._generation, cursor=self._cursor, started=self._started)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output. The config of this ledger (not the saved one)
        applies from now on; the saved seed is kept so future shuffles match."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"ledger state version {state.get('version')!r} is not {_STATE_VERSION}; "
                             f"this checkpoint was written by another srpo_ray version")

        def arr(name: str, dtype: Any) -> np.ndarray:
            v = state[name]
            v = v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            return np.array(v, copy=True).astype(dtype, copy=False)

        n = len(arr("removed_at", np.int32))
        keys = arr("keys_sorted", np.int64).view(np.uint64)
        offsets = arr("id_offsets", np.int64)
        if len(keys) != n or len(offsets) != n + 1:
            raise ValueError("ledger state is inconsistent (array lengths differ); the checkpoint is damaged")
        self._id_data, self._id_offsets = arr("id_data", np.uint8), offsets
        self._keys_sorted, self._slot_by_key = keys, arr("slot_by_key", np.int32)
        self._removed_at, self._eligible = arr("removed_at", np.int32), arr("eligible", bool)
        self._ep_samples, self._ep_correct = arr("ep_samples", np.int32), arr("ep_correct", np.int32)
        self._order = arr("order", np.int32)
        self._log = {f: [arr(f"log_{f}", np.int32)] for f in _LOG_FIELDS}
        if "removal_slot" in state:
            self._removals = {f: [arr(f"removal_{f}", np.int32)] for f in _REMOVAL_FIELDS}
        else:  # written before removals were logged: what removed_at still knows
            slots = np.flatnonzero(self._removed_at >= 0).astype(np.int32)
            self._removals = {"slot": [slots], "epoch": [self._removed_at[slots]]}
        self._seed, self._epoch = int(state["seed"]), int(state["epoch"])
        self._generation, self._cursor = int(state["generation"]), int(state["cursor"])
        self._started = bool(state["started"])

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

    # ---- internals -------------------------------------------------------------------------

    def _start_epoch(self) -> None:
        pool = self._pool_slots()
        rng = np.random.default_rng([self._seed, self._epoch, self._generation])
        if self._mix is None:
            self._order = pool[rng.permutation(len(pool))].astype(np.int32)
        else:
            self._mix.grow(self.num_known)
            self._order = weighted_order(pool, self._mix, rng)
        self._cursor = 0

    def _pool_slots(self) -> np.ndarray:
        """The eligible, not removed slots in canonical order (by hash): a shuffle then
        depends on the pool as a set, not on the order the caller listed the ids in."""
        by_key = self._slot_by_key
        return by_key[self._eligible[by_key] & (self._removed_at[by_key] < 0)]

    def _set_mix(self, slots: np.ndarray, sources: Sequence[str] | None,
                 weights: Mapping[str, float] | None) -> None:
        if not weights:
            self._mix = None
            return
        if sources is None:
            raise ValueError("set_pool with source weights needs each prompt id's source (sources=...)")
        self._mix = SourceMix(slots, sources, weights, self.num_known)

    def _append_history(self, epoch: int) -> None:
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
