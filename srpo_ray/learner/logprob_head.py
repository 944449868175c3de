"""Log-probs (and entropy) of response tokens from the final hidden states, a chunk of
tokens at a time: no [B, T, V] logits and no [N, V] float32 rows (pure torch).

Why. The model's own head builds [B, T, V] logits and token_logprobs (core.py) then
[N, V] float32 rows (N = response tokens): with Qwen2.5's 151,936-token vocabulary and
a 16k-token micro-batch that is 10 GB each, more again in backward
(bench/bench_learner_head.py). Here the backbone's hidden states [N, H] and the head
(weight, bias) are all that is kept; forward and backward each rebuild one chunk of
logits at a time (ChunkedHeadLogprobs), so memory is a few [chunk, V] float32 tensors.

Small micro-batches (at most EXACT_PATH_CHUNKS x learner.logprob_chunk_tokens positions)
keep today's path, the model's logits and token_logprobs, bit for bit (the default run
is checked by re-running it): `uses_full_logits` decides, before the forward.

Precision. A chunk's logits come from F.linear in the inputs' dtype, as HF's lm_head
computes them, then float32 for everything after (as token_logprobs does); gradients go
back through the head in its dtype, the weight's (and bias's) summed over chunks in
float32 and returned in the parameter's dtype.

FSDP2. The head weight is a parameter of the root module, which FSDP2 does not reshard
after forward (torch/distributed/fsdp/_fully_shard/_fsdp_state.py, _lazy_init), so the
weight read after `model(...)` is the unsharded parameter; the gradient this module adds
to it is reduce-scattered by the root's post-backward, at the end of backward
(tests/unit/test_logprob_head.py checks it with 2 gloo ranks).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CHUNK_TOKENS = 1024
"""learner.logprob_chunk_tokens' default: [1024, 151936] float32 is 622 MB."""
EXACT_PATH_CHUNKS = 2
"""Micro-batches of at most this many chunks' positions take the full-logits path."""


def uses_full_logits(positions: int, chunk_tokens: int) -> bool:
    """True when a micro-batch of `positions` (B x T, prompt and padding included) takes
    today's path (model logits + token_logprobs): chunk_tokens <= 0 or a small batch."""
    return chunk_tokens <= 0 or positions <= EXACT_PATH_CHUNKS * chunk_tokens


def final_hidden_and_head(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(last hidden state [B, T, H], head weight [V, H], head bias [V] or None) of an HF
    CausalLM, without its [B, T, V] logits: a forward hook on the decoder backbone keeps
    its output, and the head runs on the last position only (logits_to_keep=1) where the
    model accepts it. Tied embeddings: the head weight is the embedding's parameter."""
    backbone = model.get_decoder()
    captured: list = []
    handle = backbone.register_forward_hook(lambda _module, _args, out: captured.append(out))
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    finally:
        handle.remove()
    out = captured[-1]
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if _is_dtensor(weight):  # FSDP2 resharded the root after forward: not the full head
        raise RuntimeError("the output embedding is still sharded after the forward; the chunked "
                           "log-prob head needs the root module unsharded (reshard_after_forward "
                           "of the root left at its default), or learner.logprob_chunk_tokens=0")
    return hidden, weight, bias


def chunked_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           input_ids: torch.Tensor, response_mask: torch.Tensor, temperature: float,
                           with_entropy: bool = False, entropy_grad: bool = False,
                           chunk_tokens: int = DEFAULT_CHUNK_TOKENS
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """token_logprobs (core.py) from hidden [B, T, H] and the head instead of logits:
    the same [B, T] float32 log-probs (and entropy, with a graph only when entropy_grad
    and grad mode are on), `chunk_tokens` response tokens at a time."""
    mask = response_mask.bool()
    if mask.shape[1] and mask[:, 0].any():
        raise ValueError("response_mask marks position 0, which has no preceding context; "
                         "every sequence must start with at least one prompt token")
    rows = hidden[:, :-1][mask[:, 1:]]  # [N, H]: the row for token t is hidden[t-1]
    grad_entropy = with_entropy and entropy_grad and torch.is_grad_enabled()
    picked, per_row = ChunkedHeadLogprobs.apply(rows, weight, bias, input_ids[mask], float(temperature),
                                                max(int(chunk_tokens), 1), with_entropy, grad_entropy)
    logprobs = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    logprobs[mask] = picked
    if not with_entropy:
        return logprobs, None
    entropy = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    entropy[mask] = per_row
    return logprobs, entropy


class ChunkedHeadLogprobs(torch.autograd.Function):
    """(log p(y), entropy) per row of z = (rows W^T + b) / temperature, chunk by chunk.

    Saved: rows [N, H], weight, bias, targets and two floats per row (lse, entropy);
    backward recomputes each chunk's logits. With p = softmax(z):
    d logprob/dz = onehot(y) - p, d entropy/dz = -p (z - E_p z), E_p z = lse - entropy.
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, temperature, chunk, with_entropy, entropy_grad):
        n = rows.shape[0]
        f32 = {"dtype": torch.float32, "device": rows.device}
        lse, picked = torch.empty(n, **f32), torch.empty(n, **f32)
        entropy = torch.empty(n if with_entropy else 0, **f32)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            z = _chunk_logits(rows[s:e], weight, bias, temperature)
            top = z.amax(-1, keepdim=True)  # logsumexp by hand: torch's holds two [C, V] temporaries
            unnormed = torch.sub(z, top).exp_()
            total = unnormed.sum(-1)
            chunk_lse = top.squeeze(-1) + total.log()
            lse[s:e] = chunk_lse
            picked[s:e] = z.gather(-1, targets[s:e].unsqueeze(-1)).squeeze(-1) - chunk_lse
            if with_entropy:  # lse - E_p z
                entropy[s:e] = chunk_lse - unnormed.mul_(z).sum(-1) / total
            del z, unnormed  # before the next chunk's are built: two [C, V] at most
        ctx.save_for_backward(rows, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.chunk, ctx.entropy_grad = temperature, chunk, entropy_grad
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return picked, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        rows, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_rows, need_weight, need_bias = ctx.needs_input_grad[:3]
        t = ctx.temperature
        g_lp = torch.zeros_like(lse) if grad_logprob is None else grad_logprob.float()
        g_ent = grad_entropy.float() if ctx.entropy_grad and grad_entropy is not None else None
        grad_rows = torch.empty_like(rows) if need_rows else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        for s in range(0, rows.shape[0], ctx.chunk):
            e = min(s + ctx.chunk, rows.shape[0])
            z = _chunk_logits(rows[s:e], weight, bias, t)
            grad_z = torch.sub(z, lse[s:e].unsqueeze(-1)).exp_()  # p
            if g_ent is not None:  # z <- g_ent * p * (z - E_p z)
                z.sub_((lse[s:e] - entropy[s:e]).unsqueeze(-1)).mul_(grad_z).mul_(g_ent[s:e].unsqueeze(-1))
            grad_z.mul_(-g_lp[s:e].unsqueeze(-1))  # -g_lp * p
            if g_ent is not None:
                grad_z.sub_(z)
            del z
            grad_z[torch.arange(e - s, device=grad_z.device), targets[s:e]] += g_lp[s:e]  # g_lp * onehot
            grad_z.div_(t)  # z = logits / temperature
            if need_rows:
                grad_rows[s:e] = grad_z.to(weight.dtype) @ weight
            if need_weight:
                grad_w.addmm_(grad_z.t(), rows[s:e].float())
            if need_bias:
                grad_b += grad_z.sum(0)
            del grad_z
        return (grad_rows, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None)


def _chunk_logits(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  temperature: float) -> torch.Tensor:
    """[C, V] float32 logits / temperature: F.linear in the inputs' dtype as HF's lm_head."""
    return F.linear(rows, weight, bias).float().div_(temperature)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)
