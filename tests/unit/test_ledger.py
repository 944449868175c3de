"""History Resampling ledger: epochs, the drop rule (property-tested against a plain
model), stage pools, re-tests, exact resume, export, errors, and memory at scale."""
import io
import random
import tracemalloc

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import srpo_ray.algo.prompt_store as prompt_store
from srpo_ray.algo.ledger import HashCollisionError, HistoryLedger
from srpo_ray.config.schema import ResampleConfig


def _ledger(ids, seed=0, **cfg) -> HistoryLedger:
    led = HistoryLedger(ResampleConfig(**cfg), seed=seed)
    led.set_pool(ids)
    return led


def _drain_epoch(led: HistoryLedger, k: int) -> list[str]:
    out = []
    while not led.epoch_exhausted:
        out += led.next_batch(k)[0]
    return out


def test_one_epoch_hands_out_each_prompt_once_and_closes_on_the_next_call():
    ids = [f"p{i}" for i in range(10)]
    led = _ledger(ids)
    batches = [led.next_batch(4) for _ in range(3)]
    assert [len(b) for b, _ in batches] == [4, 4, 2]  # the last batch is shorter
    assert all(m == {} for _, m in batches)
    assert sorted(sum((b for b, _ in batches), [])) == sorted(ids)
    assert led.epoch == 0 and led.epoch_in_progress and led.epoch_exhausted
    outcome = {"p0": (4, 4), "p1": (0, 4), "p2": (2, 4), "p3": (3, 3)}  # p3 also all-correct
    for pid, (c, n) in outcome.items():
        led.observe(pid, c, n)
    batch, closed = led.next_batch(4)
    assert closed == {"epoch": 0, "pool_size_before": 10, "pool_size_after": 8, "dropped": 2, "returned": 0,
                      "observed": 4, "unobserved": 6, "frac_all_correct": 0.5, "frac_all_wrong": 0.25,
                      "frac_mixed": 0.25}
    assert led.epoch == 1 and led.pool_size == 8 and led.num_removed == 2
    rest = batch + _drain_epoch(led, 4)
    assert sorted(rest) == sorted(set(ids) - {"p0", "p3"})


def _model_step(pool, counts):
    """The rule, stated plainly: drop pool prompts whose epoch rollouts were all correct."""
    drop = {p for p in pool if p in counts and counts[p][0] == counts[p][1]}
    return pool - drop, drop


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10**6), size=st.integers(1, 30), k=st.integers(1, 12), epochs=st.integers(1, 5),
       p_correct=st.sampled_from([0.0, 0.5, 0.9, 1.0]), late=st.booleans())
def test_drop_rule_matches_the_model_on_random_observations(seed, size, k, epochs, p_correct, late):
    rnd = random.Random(seed)
    ids = [f"q{i}" for i in range(size)]
    led = _ledger(ids, seed=seed)
    pool, counts = set(ids), {}
    pending: list[str] = []  # with `late`, a batch is observed after the next one is drawn
    seen_this_epoch: list[str] = []
    closes = 0
    while closes < epochs:
        batch, closed = led.next_batch(k)
        if closed:
            closes += 1
            assert sorted(seen_this_epoch) == sorted(pool)  # every pool prompt exactly once
            new_pool, drop = _model_step(pool, counts)
            assert closed["dropped"] == len(drop) and closed["pool_size_after"] == len(new_pool)
            pool, counts, seen_this_epoch = new_pool, {}, []
            assert led.pool_size == len(pool)
        seen_this_epoch += batch
        if not batch and not pool:
            break
        to_observe = pending if late else batch
        for pid in to_observe:
            for _ in range(rnd.choice([0, 1, 1, 2])):  # unobserved, once, or twice
                n = rnd.randint(1, 4)
                c = sum(rnd.random() < p_correct for _ in range(n))
                led.observe(pid, c, n)
                tot = counts.setdefault(pid, [0, 0])
                tot[0] += c
                tot[1] += n
        pending = batch
    assert led.num_removed == size - len(pool)


def test_mixed_all_wrong_and_unobserved_stay_all_correct_leave():
    led = _ledger(["right", "wrong", "mixed", "silent"])
    _drain_epoch(led, 10)
    led.observe("right", 8, 8)
    led.observe("wrong", 0, 8)
    led.observe("mixed", 8, 8)
    led.observe("mixed", 0, 1)  # one failure anywhere in the epoch keeps it
    batch, closed = led.next_batch(10)
    assert closed["dropped"] == 1
    assert sorted(batch) == ["mixed", "silent", "wrong"]


def test_disabled_never_drops():
    led = _ledger(["a", "b"], enabled=False)
    for _ in range(3):
        for pid in _drain_epoch(led, 1):
            led.observe(pid, 4, 4)
    _, closed = led.next_batch(1)
    assert closed["dropped"] == 0 and led.pool_size == 2 and closed["frac_all_correct"] == 1.0


def test_retest_brings_removed_prompts_back_after_k_epochs():
    led = _ledger(["easy", "hard"], retest_every_epochs=2)
    for pid in _drain_epoch(led, 2):
        led.observe(pid, 4 if pid == "easy" else 0, 4)
    pools = []
    for _ in range(4):  # closes epochs 0..3
        batch, closed = led.next_batch(2)
        pools.append((closed["epoch"], closed["returned"], sorted(batch + _drain_epoch(led, 2))))
    # removed at the close of epoch 0; sits out epochs 1 and 2; back for epoch 3
    assert pools == [(0, 0, ["hard"]), (1, 0, ["hard"]), (2, 1, ["easy", "hard"]), (3, 0, ["easy", "hard"])]


def test_set_pool_switches_stage_keeps_removals_and_carries_observations():
    math_ids = [f"m{i}" for i in range(4)]
    led = _ledger(math_ids)
    _drain_epoch(led, 4)
    led.observe("m0", 2, 2)
    led.next_batch(0)  # k=0 only closes the finished epoch
    assert led.num_removed == 1 and led.epoch == 1
    led.observe("m1", 2, 2)  # mid-epoch, then the stage switches
    led.set_pool(math_ids + ["c0", "c1"])
    assert led.epoch == 1 and led.pool_size == 5 and not led.epoch_in_progress
    got = _drain_epoch(led, 10)
    assert sorted(got) == ["c0", "c1", "m1", "m2", "m3"]
    _, closed = led.next_batch(10)
    assert closed["dropped"] == 1 and led.num_removed == 2  # m1's carried-over all-correct record
    led.set_pool(["c0", "c1"])  # a stage of code only
    assert sorted(_drain_epoch(led, 10)) == ["c0", "c1"]


def test_shuffle_is_seeded_and_independent_of_id_order():
    ids = [f"x{i}" for i in range(50)]
    a, b, c = _ledger(ids, seed=3), _ledger(list(reversed(ids)), seed=3), _ledger(ids, seed=4)
    ea, eb, ec = _drain_epoch(a, 7), _drain_epoch(b, 7), _drain_epoch(c, 7)
    assert ea == eb and ea != ec
    assert _drain_epoch(a, 7) == [] and a.next_batch(7)[0] != ea[:7]  # a new epoch, a new shuffle


def test_empty_pool_returns_nothing_and_stops_closing():
    led = _ledger(["a", "b"])
    for pid in _drain_epoch(led, 2):
        led.observe(pid, 1, 1)
    batch, closed = led.next_batch(2)
    assert batch == [] and closed["pool_size_after"] == 0
    assert led.next_batch(2) == ([], {}) and led.epoch == 1


def _script(led: HistoryLedger, rnd: random.Random, steps: int, k: int) -> list:
    trace = []
    for _ in range(steps):
        batch, closed = led.next_batch(k)
        trace.append((batch, closed))
        for pid in batch:
            n = rnd.randint(1, 4)
            led.observe(pid, rnd.choice([0, n, rnd.randint(0, n)]), n)
    return trace


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), size=st.integers(1, 25), k=st.integers(1, 8), before=st.integers(0, 20),
       retest=st.integers(0, 2))
def test_resume_is_exact(seed, size, k, before, retest):
    ids = [f"r{i}" for i in range(size)]
    original = _ledger(ids, seed=seed, retest_every_epochs=retest)
    _script(original, random.Random(seed), before, k)
    buf = io.BytesIO()
    torch.save(original.state_dict(), buf)
    buf.seek(0)
    resumed = HistoryLedger(ResampleConfig(retest_every_epochs=retest), seed=seed + 1)  # saved seed wins
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert _script(original, random.Random(seed + 7), 20, k) == _script(resumed, random.Random(seed + 7), 20, k)
    assert original.state_dict().keys() == resumed.state_dict().keys()
    for key, value in original.state_dict().items():
        other = resumed.state_dict()[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_export_parquet_has_per_epoch_history(tmp_path):
    led = _ledger(["a", "b", "c"])
    _drain_epoch(led, 3)
    led.observe("a", 2, 2)
    led.observe("b", 1, 4)
    led.next_batch(0)
    led.observe("b", 3, 4)  # the open epoch counts too
    led.export_parquet(tmp_path / "h.parquet")
    rows = {r["prompt_id"]: r for r in pq.read_table(tmp_path / "h.parquet").to_pylist()}
    assert rows["a"] == {"prompt_id": "a", "epochs": [0], "correct": [2], "samples": [2], "pass_rates": [1.0],
                         "pass_rate": 1.0, "removed_epochs": [0], "removed_at_epoch": 0,
                         "in_pool": False, "total_samples": 2, "total_correct": 2}
    assert rows["b"]["epochs"] == [0, 1] and rows["b"]["pass_rates"] == [0.25, 0.75]
    assert rows["b"]["correct"] == [1, 3] and rows["b"]["samples"] == [4, 4] and rows["b"]["pass_rate"] == 0.5
    assert rows["b"]["removed_at_epoch"] is None and rows["b"]["total_correct"] == 4
    assert rows["b"]["removed_epochs"] == []
    assert rows["c"]["epochs"] == [] and rows["c"]["in_pool"] and rows["c"]["total_samples"] == 0
    assert rows["c"]["pass_rate"] is None


def test_bad_input_raises_with_a_clear_message(monkeypatch):
    with pytest.raises(RuntimeError, match="set_pool"):
        HistoryLedger(ResampleConfig(), 0).next_batch(1)
    with pytest.raises(ValueError, match="retest_every_epochs"):
        HistoryLedger(ResampleConfig(retest_every_epochs=-1), 0)
    led = _ledger(["a"])
    with pytest.raises(KeyError, match="not in the ledger"):
        led.observe("zzz", 1, 1)
    with pytest.raises(ValueError, match="num_correct"):
        led.observe("a", 3, 2)
    with pytest.raises(ValueError, match="twice"):
        led.set_pool(["a", "b", "a"])
    with pytest.raises(ValueError, match="non-empty"):
        led.set_pool(["b", ""])
    with pytest.raises(ValueError, match="strings"):
        led.set_pool(["b", 3])
    with pytest.raises(ValueError, match="k must be"):
        led.next_batch(-1)


def test_hash_collisions_are_detected(monkeypatch):
    weak = lambda ids: np.array([len(i) for i in ids], dtype=np.uint64)  # noqa: E731
    monkeypatch.setattr(prompt_store, "_hash_ids", weak)
    with pytest.raises(HashCollisionError, match="same 64-bit hash"):
        _ledger(["ab", "cd"])
    led = _ledger(["ab", "xyz"])
    with pytest.raises(HashCollisionError, match="known id 'ab'"):
        led.set_pool(["cd"])
    with pytest.raises(KeyError):
        led.observe("cd", 1, 1)  # same hash as "ab", different text: not mistaken for it
    led.observe("ab", 1, 1)


def _ids(n: int) -> list[str]:
    return [f"prompt-{i:09d}" for i in range(n)]  # 16-byte ids


def test_memory_per_prompt_is_small():
    n = 200_000
    led = _ledger(_ids(n))
    per_prompt = led.nbytes / n
    assert per_prompt <= 40 + 16  # numpy state + the id's bytes
    assert per_prompt * 10_000_000 < 0.6e9  # 10M prompts: well under 1 GB


def test_the_ledger_holds_what_its_nbytes_says():
    """Python's allocator tracer sees every byte the ledger keeps (numpy and pyarrow
    report theirs to it): nbytes hides nothing, so the 10M test below can trust it."""
    _ledger(_ids(1000)).next_batch(4)  # first use's one-time allocations (caches) happen here
    ids = _ids(1_000_000)
    tracemalloc.start()
    try:
        led = _ledger(ids)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held <= 1.01 * led.nbytes + 1e6  # measured: 2 kB over nbytes


@pytest.mark.slow
def test_ten_million_prompts_fit_well_under_a_gigabyte():
    # built for real (nothing goes quadratic at this scale); measured by nbytes, which the
    # test above checks against the tracer (tracing 10M ids would take 4x as long)
    led = _ledger(_ids(10_000_000))
    batch, _ = led.next_batch(256)
    for pid in batch:
        led.observe(pid, 1, 2)
    assert len(batch) == 256 and led.nbytes < 0.6e9


# ---- seeded from the difficulty pre-pass (resample.seed_from) ------------------------------
def test_seeded_history_is_epoch_zero_and_removes_the_all_correct():
    led = _ledger(["a", "b", "c"], retest_every_epochs=2)
    seeded = led.seed_history({"a": (16, 16), "b": (3, 16), "c": (0, 16), "code-1": (16, 16)})
    assert seeded["dropped"] == 2 and seeded["observed"] == 4 and seeded["frac_all_correct"] == 0.5
    assert led.epoch == 1 and led.num_removed == 2
    assert sorted(_drain_epoch(led, 2)) == ["b", "c"]  # "a" sits out; "code-1" joins no pool yet
    led.set_pool(["a", "b", "c", "code-1"])  # a later stage: the removed stay out
    assert sorted(_drain_epoch(led, 2)) == ["b", "c"]
    table = led.history_table().to_pylist()
    assert {r["prompt_id"]: (r["epochs"], r["correct"], r["samples"]) for r in table}["a"] == ([0], [16], [16])
    led.next_batch(1)  # closes epoch 1; the re-test brings "a" and "code-1" back after 2 epochs
    _drain_epoch(led, 4)
    assert sorted(led.next_batch(4)[0] + _drain_epoch(led, 4)) == ["a", "b", "c", "code-1"]


def test_seeding_without_history_resampling_removes_nothing_and_needs_a_fresh_ledger():
    led = _ledger(["a", "b"], enabled=False)
    assert led.seed_history({"a": (4, 4)})["dropped"] == 0 and led.num_removed == 0
    assert sorted(_drain_epoch(led, 2)) == ["a", "b"]
    with pytest.raises(RuntimeError, match="seed a fresh run only"):
        led.seed_history({"b": (0, 4)})
    with pytest.raises(ValueError, match="'x' has 5 correct of 4"):
        _ledger(["x"]).seed_history({"x": (5, 4)})
