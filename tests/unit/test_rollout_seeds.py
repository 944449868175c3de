"""The one rule of rollout seeds (records.rollout_seed + Sampling.for_prompt) gives every
prompt exactly the seed the three formulas it replaced gave: the trainer's call seed
(rollout.seed + step + round * 1_000_003), evaluation's (eval.seed + batch), the fleet's
chunk base (call seed * 1_000_000 + chunk start * n) and the engine's per-prompt offset
(chunk seed + i * n). A changed seed would change every run's samples and rewards."""
from __future__ import annotations

import itertools

import pytest

from srpo_ray.records import (
    PROMPT_SEED_SPAN,
    ROUND_SEED_STRIDE,
    CodeCase,
    CodeSpec,
    Prompt,
    RewardResult,
    RolloutGroup,
    Sample,
    Sampling,
    ScoreRequest,
    join_scores,
    rollout_seed,
)


# -- the formulas as they were before the one rule (copied from the code they lived in) --
def old_training_call_seed(rollout_seed_cfg: int, step: int, round_index: int) -> int:
    return rollout_seed_cfg + step + round_index * 1_000_003  # SRPOTrainer._rollout_round


def old_eval_call_seed(eval_seed_cfg: int, batch: int) -> int:
    return eval_seed_cfg + batch  # Evaluator.run


def old_prompt_seed(call_seed: int, chunk_start: int, i: int, n: int) -> int:
    chunk_seed = call_seed * 1_000_000 + chunk_start * n  # RayRolloutFleet.generate
    return chunk_seed + i * n  # VLLMEngine.generate: prompt i of the chunk


def new_prompt_seed(call: Sampling, chunk_start: int, i: int) -> int:
    return call.for_prompt(chunk_start).for_prompt(i).seed  # the fleet's chunk, then the engine's prompt


def test_constants_are_the_old_ones():
    assert (ROUND_SEED_STRIDE, PROMPT_SEED_SPAN) == (1_000_003, 1_000_000)


def test_training_seeds_are_bit_identical_to_the_old_formula():
    for base, step, round_index, n, start, i in itertools.product(
            (0, 1, 42), (1, 2, 7, 500), (0, 1, 2), (1, 4, 8, 16), (0, 3, 10), (0, 1, 5)):
        call = Sampling(n=n, temperature=1.0, top_p=1.0, max_new_tokens=8,
                        seed=rollout_seed(base, step, round_index))
        assert new_prompt_seed(call, start, i) == old_prompt_seed(
            old_training_call_seed(base, step, round_index), start, i, n)


def test_eval_seeds_are_bit_identical_to_the_old_formula():
    for base, batch, k, start, i in itertools.product((0, 77, 1234), (0, 1, 9), (1, 4, 16), (0, 2, 6), (0, 3)):
        call = Sampling(n=k, temperature=0.6, top_p=0.95, max_new_tokens=8, seed=rollout_seed(base, batch))
        assert new_prompt_seed(call, start, i) == old_prompt_seed(old_eval_call_seed(base, batch), start, i, k)


def test_pinned_values():
    # the default run: rollout.seed 0, n 8; step 1's prompt 0, and prompt 5 of step 3's third round
    assert rollout_seed(0, 1) == 1_000_000
    call = Sampling(n=8, temperature=1.0, top_p=1.0, max_new_tokens=64, seed=rollout_seed(0, 3, 2))
    assert call.seed == 2_000_009_000_000 and call.for_prompt(5).seed == 2_000_009_000_040
    # evaluation: eval.seed 77, k 4; batches 0..2, and prompt 3 of batch 2 served as chunk 2 + prompt 1
    assert [rollout_seed(77, b) for b in range(3)] == [77_000_000, 78_000_000, 79_000_000]
    ev = Sampling(n=4, temperature=0.6, top_p=1.0, max_new_tokens=8, seed=rollout_seed(77, 2))
    assert ev.for_prompt(2).for_prompt(1).seed == 79_000_012


def test_no_seed_stays_unseeded_and_settings_are_kept():
    plain = Sampling(n=3, temperature=0.7, top_p=0.9, max_new_tokens=5, logprobs=False)
    assert plain.for_prompt(4).seed is None
    shifted = plain.with_seed(10).for_prompt(2)
    assert shifted == Sampling(n=3, temperature=0.7, top_p=0.9, max_new_tokens=5, seed=16, logprobs=False)


# -- what a reward worker gets and gives back ---------------------------------------------
def _group(prompt: Prompt, texts: list[str], finish: str = "stop") -> RolloutGroup:
    return RolloutGroup.of(prompt, [1, 2, 3], [Sample([7, 8], [-0.1, -0.2], t, finish) for t in texts], 3)


def test_score_request_carries_what_the_scorer_reads_and_no_tokens():
    spec = CodeSpec(cases=(CodeCase("1\n", "2\n", "stdin"),))
    prompt = Prompt("c1", "code", [{"role": "user", "content": "q"}], spec, data_source="src",
                    extra_info={"func_name": "f"})
    request = ScoreRequest.of(_group(prompt, ["a", "b"], finish="length"))
    assert request == ScoreRequest("c1", "code", "src", spec, {"func_name": "f"}, ("a", "b"))
    assert request.ground_truth is spec  # the same CodeSpec object: the scorer dedups programs by it
    assert not hasattr(request, "samples") and not hasattr(request, "prompt_token_ids")


def test_results_join_back_to_their_groups_in_order():
    groups = [_group(Prompt(f"m{i}", "math", [], "1"), ["x"] * (i + 1)) for i in range(3)]
    results = [[RewardResult(float(j), j == 0) for j in range(i + 1)] for i in range(3)]
    scored = join_scores(groups, results)
    assert [sg.group for sg in scored] == groups and [sg.results for sg in scored] == results
    with pytest.raises(RuntimeError, match="results for groups"):
        join_scores(groups, results[:2])
