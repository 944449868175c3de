"""Weighted data sources: several sources (files, data_source values) mixed by weight
(`data.source_weights`, per stage `stages.N.source_weights`), with History Resampling
still per prompt (srpo_ray/algo/ledger.py uses `weighted_order`).

What an epoch is with weights (as Megatron's blended data sets): an epoch is as many
draws as the pool has prompts. Each draw picks a source with probability proportional
to its weight, among the sources that still have prompts in the pool (so when History
Resampling has removed all of a source's prompts, the others share its weight), and
takes that source's next prompt in a shuffled order; a source drawn more often than it
has prompts starts a fresh shuffle (its prompts repeat within the epoch: upsampling),
one drawn less often shows a fresh random subset each epoch (downsampling). At the
epoch's end History Resampling judges every prompt of the pool on the rollouts it got
in the epoch (all correct: removed; unobserved: kept). Without weights nothing here is
used and the ledger's plain epochs (one pass over the pool) apply.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from srpo_ray.config.schema import ConfigError, DataConfig, SRPOConfig, StageConfig


class SourceMix:
    """The weighting the ledger draws with: a weight per source and each ledger slot's
    source (-1: none). Not checkpointed: the trainer re-attaches it from the config and
    the data on resume, so checkpoints keep the ledger's state format."""

    def __init__(self, slots: np.ndarray, sources: Sequence[str], weights: Mapping[str, float], num_slots: int):
        if len(sources) != len(slots):
            raise ValueError(f"need one source per prompt id, got {len(sources)} sources for {len(slots)} ids")
        self.names = sorted(weights)
        self.weights = np.array([float(weights[n]) for n in self.names], dtype=np.float64)
        if not np.all(np.isfinite(self.weights)) or (self.weights < 0).any():
            raise ValueError(f"source weights must be finite and >= 0, got {dict(weights)}")
        index = {name: i for i, name in enumerate(self.names)}
        encoded = pa.array(list(sources), pa.string()).dictionary_encode()
        codes = np.array([index.get(n, -1) for n in encoded.dictionary.to_pylist()], dtype=np.int32)
        per_prompt = codes[encoded.indices.to_numpy(zero_copy_only=False)] if len(codes) else np.zeros(0, np.int32)
        unweighted = sorted({s for s, c in zip(encoded.dictionary.to_pylist(), codes) if c < 0})
        if unweighted:
            raise ValueError(f"source(s) {unweighted[:5]} have prompts in the pool but no weight; give every "
                             f"source of the pool a weight")
        self.source_of = np.full(num_slots, -1, np.int32)
        self.source_of[np.asarray(slots, np.int64)] = per_prompt

    def grow(self, num_slots: int) -> None:
        """Slots registered after the mix was built have no source."""
        if num_slots > len(self.source_of):
            self.source_of = np.concatenate([self.source_of, np.full(num_slots - len(self.source_of), -1, np.int32)])

    @property
    def nbytes(self) -> int:
        return self.source_of.nbytes + self.weights.nbytes


def weighted_order(pool: np.ndarray, mix: SourceMix, rng: np.random.Generator) -> np.ndarray:
    """One weighted epoch over `pool` (slots): len(pool) draws (see the module docstring)."""
    n = len(pool)
    if n == 0:
        return np.zeros(0, np.int32)
    src = mix.source_of[pool]
    if (src < 0).any():
        raise ValueError("a prompt of the pool has no source weight; set the pool with its sources")
    present = np.unique(src)
    weights = mix.weights[present]
    if weights.sum() <= 0:
        raise ValueError(f"every source of the pool ({[mix.names[i] for i in present]}) has weight 0")
    picks = rng.choice(len(present), size=n, p=weights / weights.sum())
    order = np.empty(n, np.int32)
    for j, source in enumerate(present):
        positions = np.flatnonzero(picks == j)
        if not len(positions):
            continue
        members = pool[src == source]
        laps = -(-len(positions) // len(members))
        sequence = np.concatenate([members[rng.permutation(len(members))] for _ in range(laps)])
        order[positions] = sequence[:len(positions)]
    return order


def stage_source_weights(data_cfg: DataConfig, stage: StageConfig) -> dict[str, float]:
    """The stage's source weights: stages.N.source_weights, else data.source_weights
    ({}: unweighted)."""
    weights = stage.source_weights if stage.source_weights is not None else data_cfg.source_weights
    return {str(k): float(v) for k, v in weights.items()}


def check_weight_values(key: str, weights: Mapping[str, Any]) -> None:
    """Weights are finite numbers >= 0, at least one > 0 unless there are none."""
    bad = {s: w for s, w in weights.items() if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0)}
    if bad:
        raise ConfigError(f"{key}: weights must be finite numbers >= 0, got {bad}")
    if weights and not any(w > 0 for w in weights.values()):
        raise ConfigError(f"{key}: every weight is 0; give at least one source a weight > 0 (or set {{}} to "
                          f"draw unweighted)")


def check_source_weights(cfg: SRPOConfig, prompts: Sequence[Any]) -> None:
    """Before training: every weighted source has rows in the data, and every source a
    weighted stage draws from has a weight. Raises ConfigError naming the key."""
    present = {p.data_source for p in prompts}
    keyed = [("data.source_weights", cfg.data.source_weights)]
    keyed += [(f"stages.{i}.source_weights", st.source_weights) for i, st in enumerate(cfg.stages)
              if st.source_weights is not None]
    for key, weights in keyed:
        unknown = sorted(set(weights) - present)
        if unknown:
            raise ConfigError(f"{key}: no rows with data_source {unknown} in data.train_files (its sources: "
                              f"{sorted(present)}); fix the name or drop the weight")
    for i, st in enumerate(cfg.stages):
        weights = stage_source_weights(cfg.data, st)
        if not weights:
            continue
        key = f"stages.{i}.source_weights" if st.source_weights is not None else "data.source_weights"
        drawn = {p.data_source for p in prompts if p.domain in st.domains}
        outside = sorted(set(st.source_weights or {}) - drawn)
        if outside:  # data.source_weights spans stages; a stage's own weights are for its own sources
            raise ConfigError(f"{key}: source(s) {outside} have no rows in stage {i}'s domains "
                              f"{list(st.domains)}; add the domain to the stage or drop the weight")
        missing = sorted(drawn - set(weights))
        if missing:
            raise ConfigError(f"{key}: stage {i} ({st.name}) draws by source weight, but its domains "
                              f"{list(st.domains)} have rows of data_source {missing} with no weight; give each "
                              f"source a weight (0 leaves it out)")
        if not any(weights[s] > 0 for s in drawn):
            raise ConfigError(f"{key}: every source of stage {i} ({st.name}) has weight 0; it would draw nothing")
