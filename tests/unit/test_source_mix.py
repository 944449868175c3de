"""Weighted data sources (data.source_weights, stages.N.source_weights): realised mix
follows the weights, History Resampling stays per prompt, resume repeats the draws,
checkpoints of the unweighted ledger still load, and bad weights are clear errors."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from srpo_ray.algo.ledger import HistoryLedger
from srpo_ray.algo.source_mix import check_source_weights
from srpo_ray.config.load import ConfigError, ResampleConfig, load_config
from srpo_ray.records import Prompt

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "ledger_state_1e6677e.pt"  # tests/data/
SIZES = {"small": 40, "medium": 150, "large": 600}  # small is upsampled, large subsampled
WEIGHTS = {"small": 0.5, "medium": 0.3, "large": 0.2}
SIGMAS = 4.0  # the bound on a count: 4 binomial standard deviations (fixed seed: deterministic)


def pool_of(sizes: dict[str, int]) -> tuple[list[str], list[str]]:
    ids = [f"{source}-{i}" for source, n in sizes.items() for i in range(n)]
    return ids, [i.rsplit("-", 1)[0] for i in ids]


def weighted_ledger(sizes=SIZES, weights=WEIGHTS, seed=0, **cfg) -> HistoryLedger:
    led = HistoryLedger(ResampleConfig(**cfg), seed=seed)
    led.set_pool(*pool_of(sizes), weights)
    return led


def binomial_bound(draws: int, p: float) -> float:
    return SIGMAS * math.sqrt(draws * p * (1 - p))


def test_realised_proportions_follow_the_weights_within_binomial_bounds():
    led = weighted_ledger()
    drawn = []
    closes = 0
    for _ in range(500):  # 4000 draws, about 5 epochs of 790
        batch, closed = led.next_batch(8)
        closes += bool(closed)
        drawn += batch
    counts = Counter(pid.rsplit("-", 1)[0] for pid in drawn)
    total = sum(WEIGHTS.values())
    for source, weight in WEIGHTS.items():
        expected = len(drawn) * weight / total
        assert abs(counts[source] - expected) <= binomial_bound(len(drawn), weight / total), (source, counts)
    assert closes == len(drawn) // sum(SIZES.values())  # an epoch is as many draws as the pool has prompts


def test_an_epoch_repeats_a_small_source_and_subsamples_a_large_one():
    led = weighted_ledger()
    epoch = []
    while not led.epoch_exhausted:
        epoch += led.next_batch(50)[0]
    assert len(epoch) == led.pool_size == sum(SIZES.values())
    per_source = Counter(pid.rsplit("-", 1)[0] for pid in epoch)
    small = Counter(pid for pid in epoch if pid.startswith("small"))
    assert per_source["small"] > SIZES["small"] and min(small.values()) >= 1  # every one, some twice or more
    assert max(small.values()) - min(small.values()) <= 1  # laps of fresh shuffles: evenly repeated
    large = {pid for pid in epoch if pid.startswith("large")}
    assert len(large) == per_source["large"] < SIZES["large"]  # a subset, none twice


def test_history_resampling_stays_per_prompt_and_solved_sources_give_up_their_share():
    led = weighted_ledger({"easy": 10, "mixed": 30, "hard": 30}, {"easy": 1, "mixed": 1, "hard": 1})
    first = []
    while not led.epoch_exhausted:
        batch = led.next_batch(7)[0]
        first += batch
        for pid in batch:
            led.observe(pid, 4 if pid.startswith("easy") else 2 if pid.startswith("mixed") else 0, 4)
    seen_easy = {pid for pid in first if pid.startswith("easy")}
    batch, closed = led.next_batch(7)
    assert closed["dropped"] == len(seen_easy) == led.num_removed  # every observed all-correct prompt, no other
    assert closed["pool_size_before"] == 70 and closed["unobserved"] == 70 - len(set(first))
    assert led.pool_size == 70 - len(seen_easy)
    later = batch + [pid for _ in range(60) for pid in led.next_batch(7)[0]]
    assert len(seen_easy) == 10  # drawn about 23 times: every easy prompt, in laps (fixed seed)
    assert not any(pid.startswith("easy") for pid in later)  # all removed: mixed and hard share the draws
    later_sources = Counter(pid.split("-")[0] for pid in later)
    assert abs(later_sources["mixed"] - len(later) / 2) <= binomial_bound(len(later), 0.5)


@pytest.mark.parametrize("cut", [1, 37, 99, 100, 151])
def test_resume_reproduces_the_same_weighted_draws(cut):
    def observe(led, batch):
        for pid in batch:
            led.observe(pid, 4 if pid.endswith(("0", "5")) else 1, 4)

    full = weighted_ledger(seed=5, retest_every_epochs=2)
    reference = []
    for _ in range(300):
        batch, closed = full.next_batch(8)
        reference.append((batch, closed))
        observe(full, batch)
    part = weighted_ledger(seed=5, retest_every_epochs=2)
    for step in range(cut):
        batch, _ = part.next_batch(8)
        observe(part, batch)
    state = torch.load(_saved(part.state_dict()), weights_only=True)
    resumed = HistoryLedger(ResampleConfig(retest_every_epochs=2), seed=5)
    resumed.load_state_dict(state)
    resumed.use_source_weights(*pool_of(SIZES), WEIGHTS)
    for step in range(cut, 300):
        batch, closed = resumed.next_batch(8)
        assert (batch, closed) == reference[step], step
        observe(resumed, batch)


def _saved(state):
    import io
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_without_weights_the_draws_are_exactly_those_of_the_ledger_before_weights():
    saved = torch.load(FIXTURE, weights_only=True)  # written by the code before this feature
    led = HistoryLedger(ResampleConfig(retest_every_epochs=2), seed=3)
    led.set_pool([f"p{i}" for i in range(12)], sources=["x"] * 12, weights={})  # {}: unweighted
    for expected in saved["fresh_batches"]:
        batch, _ = led.next_batch(5)
        assert batch == expected
        for pid in batch:
            led.observe(pid, 4 if int(pid[1:]) % 3 == 0 else int(pid[1:]) % 2, 4)
    assert {k: v for k, v in led.state_dict().items() if not isinstance(v, torch.Tensor)} == \
        {k: v for k, v in saved["state"].items() if not isinstance(v, torch.Tensor)}
    assert all(torch.equal(led.state_dict()[k], v) for k, v in saved["state"].items() if isinstance(v, torch.Tensor))


def test_a_checkpoint_of_the_ledger_before_weights_still_loads():
    saved = torch.load(FIXTURE, weights_only=True)
    led = HistoryLedger(ResampleConfig(retest_every_epochs=2), seed=3)
    led.load_state_dict(saved["state"])
    for expected in saved["future_batches"]:
        batch, _ = led.next_batch(5)
        assert batch == expected
        for pid in batch:
            led.observe(pid, 4 if int(pid[1:]) % 3 == 0 else 1, 4)


def test_an_old_checkpoint_resumed_with_weights_ends_its_epoch_as_saved_then_draws_by_weight():
    saved = torch.load(FIXTURE, weights_only=True)
    led = HistoryLedger(ResampleConfig(retest_every_epochs=2), seed=3)
    led.load_state_dict(saved["state"])
    ids = [f"p{i}" for i in range(12)]
    led.use_source_weights(ids, ["low" if int(i[1:]) < 6 else "high" for i in ids], {"low": 1, "high": 3})
    assert led.next_batch(5) == (saved["future_batches"][0], {})  # the rest of the saved epoch
    drawn = []
    for _ in range(400):
        batch, _ = led.next_batch(5)
        drawn += batch
    high = sum(int(pid[1:]) >= 6 for pid in drawn)
    assert abs(high - 0.75 * len(drawn)) <= binomial_bound(len(drawn), 0.75)


def test_the_ledger_names_a_source_without_weight():
    led = HistoryLedger(ResampleConfig(), seed=0)
    with pytest.raises(ValueError, match=r"source\(s\) \['c'\] have prompts in the pool but no weight"):
        led.set_pool(["a1", "c1"], ["a", "c"], {"a": 1.0})
    with pytest.raises(ValueError, match="needs each prompt id's source"):
        led.set_pool(["a1"], None, {"a": 1.0})


# -- config and data checks --------------------------------------------------------------------

def prompts_for(sources: dict[str, str]) -> list[Prompt]:
    return [Prompt(f"{s}-{i}", domain, [{"role": "user", "content": "q"}], "1", data_source=s)
            for s, domain in sources.items() for i in range(3)]


DATA = {"gsm8k": "math", "aime": "math", "apps": "code"}


@pytest.mark.parametrize("overrides, key, message", [
    (["data.source_weights={gsm8k: 1, aime: 1, apps: 1, gsm9k: 2}"], "data.source_weights",
     r"no rows with data_source \['gsm9k'\].*its sources: \['aime', 'apps', 'gsm8k'\]"),
    (["stages.1.source_weights={apps: 1, nope: 1}"], "stages.1.source_weights", r"\['nope'\]"),
    (["data.source_weights={gsm8k: 1}"], "data.source_weights", r"data_source \['aime'\] with no weight"),
    (["data.source_weights={gsm8k: 0, aime: 0, apps: 1}"], "data.source_weights",
     r"every source of stage 0 \(math\) has weight 0"),
    (["stages.0.source_weights={gsm8k: 1, aime: 1, apps: 1}"], "stages.0.source_weights",
     r"source\(s\) \['apps'\] have no rows in stage 0's domains \['math'\]"),
])
def test_bad_source_weights_are_errors_naming_the_key(overrides, key, message):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=message) as err:
        check_source_weights(cfg, prompts_for(DATA))
    assert str(err.value).startswith(key)


def test_good_source_weights_pass_and_weight_zero_leaves_a_source_out():
    cfg = load_config(None, ["data.source_weights={gsm8k: 3, aime: 1, apps: 0}",
                             "stages.1.source_weights={gsm8k: 1, aime: 1, apps: 2}"])
    check_source_weights(cfg, prompts_for(DATA))


@pytest.mark.parametrize("override, message", [
    ("data.source_weights={a: -1}", "finite numbers >= 0"),
    ("data.source_weights={a: .nan}", "finite numbers >= 0"),
    ("stages.0.source_weights={a: 0}", "every weight is 0"),
])
def test_bad_weight_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_weighted_draws_depend_only_on_seed_epoch_and_pool():
    a, b = weighted_ledger(seed=9), weighted_ledger(seed=9)
    assert all(a.next_batch(16) == b.next_batch(16) for _ in range(120))
    reference, reordered = weighted_ledger(seed=9), HistoryLedger(ResampleConfig(), seed=9)
    ids, sources = pool_of(SIZES)
    reordered.set_pool(ids[::-1], sources[::-1], dict(reversed(WEIGHTS.items())))  # the same pool and weights
    assert all(reordered.next_batch(16) == reference.next_batch(16) for _ in range(120))
    assert weighted_ledger(seed=10).next_batch(16) != weighted_ledger(seed=9).next_batch(16)
