"""Generation on a real vLLM engine (CPU) and the Ray generation worker.

One engine serves the whole module (starting vLLM costs seconds); tests that change
its weights put the originals back. Log-probs are checked against an HF forward of
the same weights, which is what the learner computes.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import pytest
import ray
import torch
from fixtures_models import hf_logprobs, perturbed_state_dict, small_rollout_config
from published_weights import load_into
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.generation import GenerationWorker, send_interrupt
from srpo_ray.generation.engines import VLLMEngine
from srpo_ray.models import chat_prompt_ids
from srpo_ray.records import Prompt, Sampling

TOL = 1e-3
NUCLEUS_TOL = 1e-4  # float32 on both sides; the same weights
PROMPTS = [[5, 6, 7, 8], list(range(20, 60)), [300, 301]]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    start = time.perf_counter()
    eng = VLLMEngine(tiny_model_dir, small_rollout_config(), "float32", max_model_len=256)
    print(f"\n[timing] tiny vLLM engine start incl. warm-up: {time.perf_counter() - start:.1f} s")
    return eng


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_generate_returns_n_consistent_samples(engine, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    groups = engine.generate(PROMPTS, Sampling(n=4, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=3))
    assert [len(g) for g in groups] == [4, 4, 4]
    for sample in (s for g in groups for s in g):
        assert 1 <= len(sample.token_ids) <= 8 and len(sample.logprobs) == len(sample.token_ids)
        assert all(math.isfinite(lp) and lp <= 0 for lp in sample.logprobs)
        if sample.finish_reason == "length":
            assert len(sample.token_ids) == 8
        else:
            assert sample.finish_reason == "stop" and sample.token_ids[-1] == tok.eos_token_id
        assert sample.text == tok.decode(sample.token_ids.tolist(), skip_special_tokens=True)
        assert sample.token_ids.dtype == np.int32 and sample.logprobs.dtype == np.float32  # compact, not lists
    assert len({tuple(s.token_ids) for s in groups[1]}) > 1  # n distinct draws, not one copy


def test_seeded_generation_is_reproducible(engine):
    sampling = Sampling(n=2, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=11)
    run = lambda: engine.generate(PROMPTS, sampling)  # noqa: E731
    first, second = run(), run()
    assert [[s.token_ids.tolist() for s in g] for g in first] == [[s.token_ids.tolist() for s in g] for g in second]


def test_generation_without_logprobs_draws_the_same_samples(engine):
    """Evaluation asks for no log-probs (they cost 12-15% of generation): the same seeded
    samples and texts come back, with empty log-prob lists."""
    run = lambda **kw: engine.generate(PROMPTS, Sampling(n=3, temperature=0.9, top_p=0.95,  # noqa: E731
                                       max_new_tokens=7, seed=5, **kw))
    with_lp, without = run(), run(logprobs=False)
    assert [[(s.token_ids.tolist(), s.text, s.finish_reason) for s in g] for g in with_lp] == \
        [[(s.token_ids.tolist(), s.text, s.finish_reason) for s in g] for g in without]
    assert all(len(s.logprobs) == 0 for g in without for s in g)
    assert all(len(s.logprobs) == len(s.token_ids) for g in with_lp for s in g)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_are_those_of_the_sampling_distribution(engine, hf_model, temperature):
    groups = engine.generate(PROMPTS, Sampling(n=2, temperature=temperature, top_p=1.0, max_new_tokens=16, seed=0))
    for prompt, group in zip(PROMPTS, groups):
        for sample in group:
            ref = hf_logprobs(hf_model, prompt, sample.token_ids, temperature)
            assert torch.allclose(torch.tensor(sample.logprobs), ref, atol=TOL)


@pytest.mark.parametrize("top_p", [0.8, 0.5])
def test_top_p_logprobs_are_renormalised_over_the_nucleus(engine, hf_model, top_p):
    """vLLM's processed log-probs (engines.py asks for logprobs_mode=processed_logprobs)
    are those of the distribution it samples from: softmax(logits / T) with the tokens
    outside the top-p nucleus removed and the rest renormalised (vllm/v1/sample/sampler.py
    Sampler.sample, ops/topk_topp_sampler.py apply_top_k_top_p_pytorch + log_softmax).
    So the importance ratio exp(learner's full-softmax log-prob - sampler's) of the same
    weights is the nucleus mass, which algo.offpolicy's docs rely on."""
    temperature = 0.7
    groups = engine.generate(PROMPTS, Sampling(n=4, temperature=temperature, top_p=top_p, max_new_tokens=12,
                                               seed=4))
    gaps = []
    for prompt, group in zip(PROMPTS, groups):
        for sample in group:
            ids = torch.tensor([prompt + sample.token_ids.tolist()])
            with torch.no_grad():
                logits = hf_model(ids).logits[0, len(prompt) - 1:-1].float() / temperature
            # the nucleus, as vLLM cuts it: drop the least likely tokens whose total
            # probability is <= 1 - top_p (the most likely token always stays)
            sorted_logits, order = logits.sort(dim=-1)
            outside = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
            outside[:, -1] = False
            inside = torch.empty_like(outside).scatter(1, order, ~outside)  # back to vocabulary order
            sampled = torch.tensor(sample.token_ids.tolist())[:, None]
            assert inside.gather(1, sampled).all()  # never a token outside the nucleus
            nucleus = torch.log_softmax(logits.masked_fill(~inside, float("-inf")), -1).gather(1, sampled)[:, 0]
            full = torch.log_softmax(logits, -1).gather(1, sampled)[:, 0]
            reported = torch.tensor(sample.logprobs)
            assert torch.allclose(reported, nucleus, atol=NUCLEUS_TOL), (reported - nucleus).abs().max()
            mass = (torch.softmax(logits, -1) * inside).sum(-1)
            assert torch.allclose(torch.exp(full - reported), mass, atol=NUCLEUS_TOL)
            gaps.append((full - nucleus).abs().max().item())
    assert max(gaps) > 0.1  # the renormalisation is visible: a full-softmax log-prob would fail


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_hf(engine, hf_model, temperature):
    prompt, response = PROMPTS[1], [9, 99, 199, 299, 399, 2, 7]
    got = engine.token_logprobs(prompt, response, temperature)
    assert torch.allclose(torch.tensor(got), hf_logprobs(hf_model, prompt, response, temperature), atol=TOL)


def test_load_weights_updates_in_place(engine, tiny_model_dir):
    prompt, response = PROMPTS[1], [9, 99, 199, 299, 399]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    before = torch.tensor(engine.token_logprobs(prompt, response))
    try:
        engine.load_weights(perturbed_state_dict(model))
        after = torch.tensor(engine.token_logprobs(prompt, response, 0.7))
        assert torch.allclose(after, hf_logprobs(model, prompt, response, 0.7), atol=TOL)
        assert (torch.tensor(engine.token_logprobs(prompt, response)) - before).abs().max() > 1e-2
        # a fresh generation (no stale prefix cache) samples from the new weights too
        sample = engine.generate([prompt], Sampling(n=1, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=0))[0][0]
        assert torch.allclose(torch.tensor(sample.logprobs), hf_logprobs(model, prompt, sample.token_ids),
                              atol=TOL)
    finally:
        engine.load_weights(original)
    assert torch.allclose(torch.tensor(engine.token_logprobs(prompt, response)), before, atol=1e-5)


def test_load_weights_refuses_a_partial_or_foreign_state_dict(engine, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    partial = dict(model.state_dict())
    partial.pop("model.norm.weight")
    with pytest.raises(ValueError, match="missing .*model.norm.weight"):
        engine.load_weights(partial)
    with pytest.raises(ValueError, match="unknown .*module.lm_head.weight"):
        engine.load_weights({("module." + k if k == "lm_head.weight" else k): v
                             for k, v in model.state_dict().items()})


def test_prompt_too_long_for_the_engine_is_an_error(engine):
    with pytest.raises(ValueError, match="rollout.max_model_len"):
        engine.generate([list(range(250))], Sampling(n=1, temperature=1.0, top_p=1.0, max_new_tokens=16, seed=None))


# ----------------------------------------------------------------------------- partial rollouts

def _stop_after(steps: int):
    calls = iter(range(10**6))
    return lambda: next(calls) >= steps


def test_stoppable_generation_samples_what_generate_samples(engine):
    """The step loop partial rollouts run (asked between steps whether to pause) draws the
    same tokens and log-probs as vLLM's own generate when nothing pauses it."""
    sampling = Sampling(n=3, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=21)
    plain, stoppable = engine.generate(PROMPTS, sampling), engine.generate(PROMPTS, sampling, should_stop=lambda: False)
    for a, b in zip((s for g in plain for s in g), (s for g in stoppable for s in g)):
        assert a.token_ids.tolist() == b.token_ids.tolist() and (a.text, a.finish_reason) == (b.text, b.finish_reason)
        assert np.allclose(a.logprobs, b.logprobs, atol=1e-6)


def test_paused_samples_resume_under_new_weights(engine, tiny_model_dir):
    """A pause keeps every token sampled so far with its log-prob; resumed after a weight
    load, each sample continues from its kept tokens, and the new tokens' log-probs are
    the new weights' given the whole prefix (the KV cache was recomputed, not reused)."""
    from srpo_ray.records import ABORTED

    sampling = Sampling(n=3, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=8)
    seeds = [sampling.for_prompt(i).seed for i in range(len(PROMPTS))]
    paused = engine.generate(PROMPTS, sampling, should_stop=_stop_after(4))
    aborted = [s for g in paused for s in g if s.finish_reason == ABORTED]
    assert aborted and all(1 <= len(s.token_ids) <= 4 and s.text == "" for s in aborted)
    assert all(len(s.logprobs) == len(s.token_ids) for g in paused for s in g)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        engine.load_weights(perturbed_state_dict(model))
        resumed = engine.resume(PROMPTS, paused, sampling, seeds)
    finally:
        engine.load_weights(original)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for prompt, before, after in zip(PROMPTS, paused, resumed):
        for old, new in zip(before, after):
            kept = len(old.token_ids)
            assert new.token_ids[:kept].tolist() == old.token_ids.tolist()
            assert np.array_equal(new.logprobs[:kept], old.logprobs)
            if old.finish_reason != ABORTED:
                assert new.finish_reason == old.finish_reason and len(new.token_ids) == kept
                continue
            assert new.finish_reason in ("stop", "length") and kept < len(new.token_ids) <= 12
            assert new.text == tok.decode(new.token_ids.tolist(), skip_special_tokens=True)
            expected = hf_logprobs(model, prompt + old.token_ids.tolist(), new.token_ids[kept:].tolist())
            assert torch.allclose(torch.tensor(new.logprobs[kept:]), expected, atol=TOL)
    # seeded continuations are reproducible
    first, second = (engine.resume(PROMPTS, paused, sampling, seeds) for _ in range(2))
    assert [[s.token_ids.tolist() for s in g] for g in first] == [[s.token_ids.tolist() for s in g] for g in second]


# ----------------------------------------------------------------------------- Ray actor

def _prompt(pid: str, text: str) -> Prompt:
    return Prompt(prompt_id=pid, domain="math", messages=[{"role": "user", "content": text}], ground_truth="5")


def test_worker_generates_and_syncs_tied_weights_inside_ray(ray_local, tiny_tied_model_dir):
    """The tied-embedding model (like SmolLM2): lm_head shares the embedding, and a
    sync must still reach vLLM's output layer."""
    cfg = small_rollout_config()
    worker = GenerationWorker.options(num_cpus=1, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}).remote(
        tiny_tied_model_dir, cfg, "float32", 64, 0)
    try:  # the session's Ray: kill the worker whatever happens, to free its CPU for later tests
        assert ray.get(worker.ping.remote()) and ray.get(worker.version.remote()) == 0
        tok = AutoTokenizer.from_pretrained(tiny_tied_model_dir)
        prompts = [_prompt("p0", "What is 2+3?"), _prompt("p1", "Write a function.")]
        sampling = Sampling(n=3, temperature=1.0, top_p=1.0, max_new_tokens=5)

        groups = ray.get(worker.generate.remote(prompts, sampling))
        assert [g.prompt.prompt_id for g in groups] == ["p0", "p1"]
        assert all(len(g.tokens.logprobs) == len(g.tokens.token_ids) > 0 for g in groups)
        unscored = ray.get(worker.generate.remote(prompts, replace(sampling, seed=3, logprobs=False)))
        assert all(len(g.tokens.logprobs) == 0 and all(s.num_tokens for s in g.samples) for g in unscored)
        assert all(g.policy_version == 0 and len(g.samples) == 3 for g in groups)
        assert groups[0].tokens.prompt_token_ids.tolist() == chat_prompt_ids(tok, prompts[0].messages)
        # apart: the summaries first, then one GroupTokens per group (the fleet keeps those by reference)
        summaries, tokens0, texts0, tokens1, texts1 = ray.get(
            worker.generate_apart.options(num_returns=5).remote(prompts, sampling))
        assert [(g.tokens, g.texts) for g in summaries] == [(None, None), (None, None)]
        assert [t.num_samples for t in (tokens0, tokens1)] == [3, 3] and len(texts0) == len(texts1) == 3
        assert [s.num_tokens for s in summaries[0].samples] == [len(tokens0.response(i)[0]) for i in range(3)]

        model = AutoModelForCausalLM.from_pretrained(tiny_tied_model_dir, dtype=torch.float32).eval()
        new_weights = perturbed_state_dict(model, seed=5)
        new_weights.pop("lm_head.weight")  # a tied learner may send only the embedding
        assert load_into(worker, new_weights, 7) == 7  # through the object store, as a late joiner
        assert ray.get(worker.version.remote()) == 7
        groups = ray.get(worker.generate.remote(prompts, sampling, policy_version_expected=7))
        assert all(g.policy_version == 7 for g in groups)
        ids = groups[0].tokens.prompt_token_ids.tolist()
        sample_ids, sample_logprobs = groups[0].tokens.response(0)
        assert torch.allclose(torch.tensor(sample_logprobs), hf_logprobs(model, ids, sample_ids.tolist()), atol=TOL)
        got = ray.get(worker.token_logprobs.remote(ids, [11, 22, 33]))
        assert torch.allclose(torch.tensor(got), hf_logprobs(model, ids, [11, 22, 33]), atol=TOL)

        with pytest.raises(RuntimeError, match="holds policy version 7"):
            ray.get(worker.generate.remote(prompts, sampling, policy_version_expected=6))
        with pytest.raises(ValueError, match="prompt 'long'"):
            ray.get(worker.generate.remote([_prompt("long", "x " * 200)], sampling))
        with pytest.raises(TypeError, match="must be a records.Sampling"):  # no untyped settings bag
            ray.get(worker.generate.remote(prompts, {"n": 3, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 5}))
    finally:
        ray.kill(worker)


def _decodes_until_stopped():
    """An engine that decodes until told to stop (defined in a function: Ray pickles it by
    value, the worker cannot import this test module)."""
    class _DecodesUntilStopped:
        max_model_len = 64

        def generate(self, prompt_token_ids, sampling, should_stop=None):
            from srpo_ray.records import ABORTED, Sample

            steps, deadline = 0, time.monotonic() + 30
            while not should_stop() and time.monotonic() < deadline:
                steps += 1
                time.sleep(0.01)
            return [[Sample([1] * steps, [-0.5] * steps, "", ABORTED) for _ in range(sampling.n)]
                    for _ in prompt_token_ids]

    return _DecodesUntilStopped()


def test_worker_interrupt_pauses_and_resume_records_token_versions(ray_local, tiny_model_dir):
    """interrupt(v) runs beside a generate call (its own concurrency group) and pauses the
    stoppable calls of a worker older than v; the paused groups resume on the weights v
    that a load brings, each token's version recorded. Calls sent to the default group
    still run in the order sent."""
    from srpo_ray.records import ABORTED, token_versions

    worker = GenerationWorker.options(num_cpus=1, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}).remote(
        tiny_model_dir, small_rollout_config(), "float32", 64, 0)
    try:
        prompts = [_prompt("p0", "What is 2+3?"), _prompt("p1", "Write a function.")]
        sampling = Sampling(n=3, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=40)
        assert ray.get(send_interrupt(worker, 2)) == 0
        paused = ray.get(worker.generate.remote(prompts, sampling, 0, True))  # stops before its first step
        assert all(s.finish_reason == ABORTED and s.num_tokens == 0 for g in paused for s in g.samples)
        assert ray.get(worker.generate.remote(prompts, sampling, 0)) and True  # not stoppable: runs to the end
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        assert load_into(worker, perturbed_state_dict(model, seed=2), 2) == 2
        seeds = [sampling.for_prompt(i).seed for i in range(2)]
        summaries, *parts = ray.get(worker.resume_apart.options(num_returns=5).remote(paused, sampling, seeds, 2))
        resumed = [g.by_reference(parts[2 * k], parts[2 * k + 1]) for k, g in enumerate(summaries)]
        for g in resumed:
            assert g.policy_version == 0 and not g.paused  # the version that started it, and every sample done
            for j, s in enumerate(g.samples):
                assert s.version_runs == ((0, 2),) and s.finish_reason in ("stop", "length")
                assert token_versions(s.version_runs, s.num_tokens, g.policy_version).tolist() == [2] * s.num_tokens
                assert len(g.tokens.response(j)[0]) == s.num_tokens
        # paused groups left in the object store; one's objects are lost (their owner died):
        # it starts again from nothing on the new weights, the other resumes as it was
        assert ray.get(send_interrupt(worker, 3)) == 2
        refs = worker.generate_apart.options(num_returns=5).remote(prompts, sampling, 2, True)
        paused = [g.by_reference(refs[1 + 2 * k], refs[2 + 2 * k]) for k, g in enumerate(ray.get(refs[0]))]
        assert all(g.paused for g in paused)

        @ray.remote(num_cpus=0)
        class Owner:  # defined here: Ray ships it by value (workers cannot import this module)
            def put(self, values):
                return [ray.put(v) for v in values]
        owner = Owner.remote()
        lost = ray.get(owner.put.remote(ray.get([refs[1], refs[2]])))  # group 0's tokens and texts
        paused[0] = paused[0].by_reference(*lost)
        ray.kill(owner)
        assert load_into(worker, perturbed_state_dict(model, seed=3), 3) == 3
        again = ray.get(worker.resume.remote(paused, sampling, seeds, 3))
        assert all(s.version_runs == ((0, 3),) and s.num_tokens > 0 for g in again for s in g.samples)
        assert [g.prompt.prompt_id for g in again] == ["p0", "p1"]
    finally:
        ray.kill(worker)
    # interrupted while running: an engine that decodes until told to stop (a stand-in:
    # the pause inside vLLM's step loop is tested on the real engine above)
    worker = GenerationWorker.options(num_cpus=1).remote(tiny_model_dir, small_rollout_config(), "float32", 64, 0,
                                                         engine=_decodes_until_stopped())
    try:
        assert ray.get(worker.ping.remote())  # started
        running = worker.generate.remote(prompts, sampling, 0, True)
        time.sleep(1.0)
        assert ray.wait([running], timeout=0)[1]  # still decoding
        assert ray.get(send_interrupt(worker, 1)) == 0
        groups = ray.get(running, timeout=20)
        assert all(s.finish_reason == ABORTED and s.num_tokens > 0 for g in groups for s in g.samples)
    finally:
        ray.kill(worker)


def test_fleet_resumes_paused_groups_on_the_pushed_weights(ray_local, tiny_model_dir):
    """The rollout fleet with partial rollouts on a real worker: interrupted for version 1,
    its call comes back paused; the fleet waits in on_pause (the pipeline's: the trainer
    pushes meanwhile), then resumes every paused group, whose tokens the new weights
    sampled and say so."""
    from srpo_ray.runtime.fleets import RayRolloutFleet
    from srpo_ray.runtime.worker_pool import WorkerPool

    pool = WorkerPool("generation", lambda i: GenerationWorker.options(
        num_cpus=1, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}).remote(
        tiny_model_dir, small_rollout_config(), "float32", 64, i), 1)
    try:
        fleet = RayRolloutFleet(pool, max_staleness=1, partial=True)
        pool.wait_ready()
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        new_weights = perturbed_state_dict(model, seed=3)  # (model now holds them too)
        pushes = []

        def push():  # the trainer's push, which pause_for_push waits for
            for m in pool.ready():
                m.version = load_into(m.handle, new_weights, 1)
            fleet.version = 1
            pushes.append(1)
        fleet.on_pause = push
        fleet.interrupt(1)  # the learner holds version 1: the worker pauses before its first step
        prompts = [_prompt(f"p{i}", f"What is {i}+3?") for i in range(3)]
        groups = fleet.fetch(fleet.generate(prompts, Sampling(n=2, temperature=1.0, top_p=1.0, max_new_tokens=6,
                                                              seed=9)))
        assert pushes == [1] and [g.prompt.prompt_id for g in groups] == ["p0", "p1", "p2"]
        assert all(not g.paused and g.policy_version == 0 for g in groups)
        assert all(s.version_runs == ((0, 1),) and s.num_tokens > 0 for g in groups for s in g.samples)
        assert fleet.pop_metrics()["rollout/pauses"] == 1
        ids = groups[0].tokens.prompt_token_ids.tolist()
        tokens, logprobs = groups[0].tokens.response(1)
        assert torch.allclose(torch.tensor(logprobs), hf_logprobs(model, ids, tokens.tolist()), atol=TOL)
    finally:
        for handle in pool.workers:
            ray.kill(handle)


# ----------------------------------------------------------------------------- SmolLM2 (slow)

@pytest.mark.slow
def test_smollm2_serves_and_syncs_on_vllm(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    start = time.perf_counter()
    eng = VLLMEngine(smollm2_dir, small_rollout_config(kv_cache_memory_bytes=128 << 20), "float32",
                     max_model_len=512)
    print(f"\n[timing] SmolLM2 vLLM engine start incl. warm-up: {time.perf_counter() - start:.1f} s")
    ids = chat_prompt_ids(tok, [{"role": "user", "content": "What is 2+3?"}])
    greedy = eng.generate([ids], Sampling(n=1, temperature=0.0, top_p=1.0, max_new_tokens=24, seed=None))[0][0]
    print(f"[smollm2] greedy answer to 'What is 2+3?': {greedy.text!r}")
    assert any(ch.isalnum() for ch in greedy.text)

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert torch.allclose(torch.tensor(greedy.logprobs), hf_logprobs(model, ids, greedy.token_ids), atol=2e-3)
    new_weights = perturbed_state_dict(model, scale=0.002)
    start = time.perf_counter()
    eng.load_weights(new_weights)
    print(f"[timing] SmolLM2 load_weights: {time.perf_counter() - start:.2f} s")
    got = eng.token_logprobs(ids, greedy.token_ids)
    assert torch.allclose(torch.tensor(got), hf_logprobs(model, ids, greedy.token_ids), atol=2e-3)
