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

Memory: the per-prompt state (ids, counts, removals, history) is numpy-backed, about
37 bytes per prompt plus its id's bytes: srpo_ray/algo/prompt_store.py, which also
exports the history (`history_table`, `python -m srpo_ray.ledger`).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from srpo_ray.algo.prompt_store import HashCollisionError, PromptStore
from srpo_ray.algo.source_mix import SourceMix, weighted_order
from srpo_ray.config.schema import ResampleConfig

__all__ = ["HashCollisionError", "HistoryLedger", "PromptStore"]

_STATE_VERSION = 1


class HistoryLedger(PromptStore):
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
        super().__init__()  # ids and per-prompt state; self._epoch = 0
        self.cfg = cfg
        self._seed = int(seed)
        self._generation = 0  # set_pool calls; part of the shuffle's seed
        self._cursor = 0
        self._started = False
        self._order = np.zeros(0, np.int32)  # the open epoch's shuffled pool (slots)
        self._mix: SourceMix | None = None  # weighted sources; None: plain epochs

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

    def seed_history(self, outcomes: Mapping[str, tuple[int, int]]) -> dict:
        """Start from measured outcomes, {prompt id: (correct, samples)} (the difficulty
        pre-pass; resample.seed_from): recorded as epoch 0, and with History Resampling on,
        the all-correct prompts start out removed, as if epoch 0 had been a pass over them.
        Only before anything is drawn; training's first epoch is epoch 1. Returns
        close_epoch's metrics for epoch 0."""
        if self._epoch != 0 or self.epoch_in_progress:
            raise RuntimeError("seed_history: the ledger has already handed out prompts (seed a fresh run only)")
        slots = self._register(list(outcomes))
        counts = np.array(list(outcomes.values()), dtype=np.int64).reshape(-1, 2)
        correct, samples = counts[:, 0], counts[:, 1]
        if ((samples < 1) | (correct < 0) | (correct > samples)).any():
            bad = int(np.flatnonzero((samples < 1) | (correct < 0) | (correct > samples))[0])
            raise ValueError(f"seed_history: prompt {list(outcomes)[bad]!r} has {correct[bad]} correct of "
                             f"{samples[bad]} samples")
        self._ep_samples[slots], self._ep_correct[slots] = samples, correct
        all_correct, all_wrong = correct == samples, correct == 0
        if self.cfg.enabled:
            self._removed_at[slots[all_correct]] = 0
        self._append_history(0)
        self._epoch = 1
        if self._started:
            self._start_epoch()
        observed = max(1, len(slots))
        return {"epoch": 0, "observed": len(slots), "dropped": int(all_correct.sum()) if self.cfg.enabled else 0,
                "frac_all_correct": float(all_correct.sum()) / observed,
                "frac_all_wrong": float(all_wrong.sum()) / observed,
                "frac_mixed": float((~all_correct & ~all_wrong).sum()) / observed}

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
    def nbytes(self) -> int:
        """Bytes held in the ledger's arrays (the whole state)."""
        mix = self._mix.nbytes if self._mix is not None else 0
        return mix + self._order.nbytes + self._store_nbytes()

    # ---- checkpointing -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (same future batches and decisions), as
        torch tensors and Python scalars, so torch.save/torch.load(weights_only=True) work."""
        arrays = {**self._id_state(), "order": self._order, **self._history_state()}
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

        self._load_store(state, arr)
        self._order = arr("order", np.int32)
        self._seed, self._epoch = int(state["seed"]), int(state["epoch"])
        self._generation, self._cursor = int(state["generation"]), int(state["cursor"])
        self._started = bool(state["started"])

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
