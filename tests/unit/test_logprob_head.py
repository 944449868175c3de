"""The chunked log-prob head (srpo_ray/learner/logprob_head.py): small micro-batches are
bitwise today's full-logits path; chunked ones match it to float32 rounding (values and
gradients, entropy as a loss term and as a metric, temperature != 1, tied and untied
heads, a bias, bfloat16); under FSDP2 with 2 gloo ranks the head weight read after the
root's forward gets the right gradient (same update as the full-logits path)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from learner_cases import assert_same_weights, free_port

from srpo_ray.learner.core import response_logprobs, token_logprobs
from srpo_ray.learner.logprob_head import chunked_token_logprobs, uses_full_logits

TEMP = 0.7


def _inputs(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 11), generator=g)
    mask = torch.zeros(3, 11)
    mask[0, 4:], mask[1, 2:9], mask[2, 6:] = 1, 1, 1  # right padding in row 1
    coef = torch.randn(2, 3, 11, generator=g)  # loss weights of log-probs and entropy
    return ids, torch.ones_like(ids), mask, coef


def _run(fn, params, coef):
    """(log-probs, entropy, gradients of params) of sum(coef0 * lp + coef1 * entropy)."""
    for p in params:
        p.grad = None
    lp, ent = fn()
    ((coef[0] * lp).sum() + (coef[1] * ent).sum()).backward()
    return [lp.detach(), ent.detach()] + [p.grad.clone() for p in params]


def _model(model_dir: str, bias: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if bias:  # Qwen2 has none: give the (untied) head one
        head = model.lm_head
        model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
        with torch.no_grad():
            model.lm_head.weight.copy_(head.weight)
            model.lm_head.bias.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("case", ["tied", "untied", "untied+bias"])
def test_small_is_bitwise_today_and_chunked_matches(case, tiny_model_dir, tiny_tied_model_dir):
    model = _model(tiny_tied_model_dir if case == "tied" else tiny_model_dir, bias=case.endswith("bias"))
    params = list(model.parameters())
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == (case == "tied")
    ids, am, mask, coef = _inputs(model.config.vocab_size)

    def today():  # FSDPLearner before the chunked head
        logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits
        return token_logprobs(logits, ids, mask, TEMP, with_entropy=True, entropy_grad=True)

    want = _run(today, params, coef)
    assert uses_full_logits(ids.numel(), 1024) and not uses_full_logits(ids.numel(), 4)
    small = _run(lambda: response_logprobs(model, ids, am, mask, TEMP, True, True, chunk_tokens=1024), params, coef)
    assert all(torch.equal(a, b) for a, b in zip(want, small))
    chunked = _run(lambda: response_logprobs(model, ids, am, mask, TEMP, True, True, chunk_tokens=4), params, coef)
    for name, a, b in zip(["logprobs", "entropy"] + [n for n, _ in model.named_parameters()], want, chunked):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert want[-1].abs().max() > 0  # the head (or the tied embedding) got a gradient


def test_chunked_head_math_with_bias_metric_entropy_and_errors():
    torch.manual_seed(0)
    vocab = 50
    ids, _, mask, coef = _inputs(vocab, seed=1)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    weight = torch.randn(vocab, 16, requires_grad=True)
    bias = torch.randn(vocab, requires_grad=True)
    params = [hidden, weight, bias]
    want = _run(lambda: token_logprobs(F.linear(hidden, weight, bias), ids, mask, TEMP, True, True), params, coef)
    for chunk in (1, 5, 64):  # one row per chunk, uneven chunks, a single chunk
        got = _run(lambda: chunked_token_logprobs(hidden, weight, bias, ids, mask, TEMP, True, True, chunk),
                   params, coef)
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a, atol=5e-5, rtol=1e-4)
    lp, metric = chunked_token_logprobs(hidden, weight, bias, ids, mask, TEMP, True, False, 5)
    assert metric.grad_fn is None and lp.grad_fn is not None  # entropy as a metric: no graph
    torch.testing.assert_close(metric, want[1], atol=5e-5, rtol=1e-4)
    assert (lp[mask == 0] == 0).all() and (metric[mask == 0] == 0).all()
    with torch.no_grad():
        lp, none = chunked_token_logprobs(hidden, weight, None, ids, mask, 1.0, chunk_tokens=5)
    assert none is None and lp.grad_fn is None
    with pytest.raises(ValueError, match="position 0"):
        chunked_token_logprobs(hidden, weight, bias, ids, torch.ones(3, 11), 1.0)


def test_chunked_head_in_bfloat16_returns_bfloat16_gradients():
    """Hidden states and head in bfloat16 (FSDP2's compute dtype on GPUs): chunk math in
    float32, gradients in bfloat16, close to the float32 result."""
    torch.manual_seed(0)
    ids, _, mask, coef = _inputs(64, seed=2)
    h32, w32 = torch.randn(3, 11, 32), torch.randn(64, 32) * 0.3
    h16, w16 = (h32.bfloat16().requires_grad_(), w32.bfloat16().requires_grad_())
    h32, w32 = h16.detach().float().requires_grad_(), w16.detach().float().requires_grad_()
    want = _run(lambda: chunked_token_logprobs(h32, w32, None, ids, mask, TEMP, True, True, 4), [h32, w32], coef)
    got = _run(lambda: chunked_token_logprobs(h16, w16, None, ids, mask, TEMP, True, True, 4), [h16, w16], coef)
    assert got[2].dtype == got[3].dtype == torch.bfloat16 and got[0].dtype == torch.float32
    for a, b in zip(want, got):
        torch.testing.assert_close(b.float(), a, atol=0.05, rtol=0.02)


def test_two_fsdp2_ranks_chunked_equals_full_logits(tiny_model_dir, tiny_tied_model_dir, tmp_path):
    """2 gloo ranks, FSDP2 with the head in the root module: one train step (KL to the
    reference model, entropy in the loss, a dummy pass on one rank) and logprobs_of, with
    the full logits (logprob_chunk_tokens=0) and chunked (4): same loss, pre-clip gradient
    norm, log-probs and updated weights, tied and untied."""
    import torch.multiprocessing as mp
    from logprob_head_ranks import run_rank

    runs = [(d, chunk, free_port()) for d in (tiny_tied_model_dir, tiny_model_dir) for chunk in (0, 4)]
    mp.start_processes(run_rank, args=(2, runs, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for i in (0, 2):
        full, chunked = torch.load(tmp_path / f"run{i}.pt"), torch.load(tmp_path / f"run{i + 1}.pt")
        for key in ("learner/loss", "learner/grad_norm", "learner/entropy", "learner/kl_ref"):
            assert chunked["metrics"][key] == pytest.approx(full["metrics"][key], rel=1e-5, abs=1e-7), key
        assert full["metrics"]["learner/grad_norm"] > 0
        torch.testing.assert_close(chunked["logprobs"], full["logprobs"], atol=1e-5, rtol=1e-5)
        assert_same_weights(chunked["weights"], full["weights"], atol=1e-6)
