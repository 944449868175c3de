"""A tiny model whose output is known in advance, for end-to-end tests.

Every layer's output projection is zeroed, so a position's logits depend on its own
token only: the model is a bigram table we write by hand. After the chat template it
answers `\\boxed{A}` or `\\boxed{B}` then stops; `margin` (in logits) favours A. At
temperature 1 the answer is mixed (p(A) = 1/(1+e^-margin)); at a low temperature it
is always A. The weights are ordinary Qwen2 weights: the learner trains them and
vLLM serves them like any other model.
"""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from srpo_ray.models import build_tiny_model, chat_prompt_ids

CERTAIN = 20.0  # logit of every scripted transition (others are 0): p ~ 1 - 500 e^-20


def build_scripted_model(out_dir: str, answers: tuple[str, str] = ("7", "3"), margin: float = 0.5) -> str:
    build_tiny_model(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    start = chat_prompt_ids(tok, [{"role": "user", "content": "q"}])[-1]
    prefix = tok("\\boxed{", add_special_tokens=False)["input_ids"]
    choice_ids = [_single_token(tok, a) for a in answers]
    close = _single_token(tok, "}")
    chain = [start, *prefix]
    tokens = set(chain) | set(choice_ids) | {close}
    assert len(tokens) == len(chain) + len(choice_ids) + 1, "scripted tokens must be distinct"

    hidden = model.config.hidden_size
    basis = torch.linalg.qr(torch.randn(hidden, len(tokens), generator=torch.Generator().manual_seed(0)))[0].T
    unit = dict(zip(sorted(tokens), basis))  # orthonormal embeddings: no cross-talk between states
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        for t, u in unit.items():
            emb[t] = u
        model.model.norm.weight.fill_(1.0)
        head = model.lm_head.weight
        head.zero_()
        scale = 1.0 / hidden ** 0.5  # RMSNorm turns a unit vector into one of norm sqrt(hidden)

        def link(a: int, b: int, logit: float) -> None:
            head[b] += logit * scale * unit[a]

        for a, b in zip(chain, chain[1:]):
            link(a, b, CERTAIN)
        link(chain[-1], choice_ids[0], CERTAIN + margin)
        link(chain[-1], choice_ids[1], CERTAIN)
        for c in choice_ids:
            link(c, close, CERTAIN)
        link(close, tok.eos_token_id, CERTAIN)
    model.save_pretrained(out_dir)
    return out_dir


def _single_token(tok, text: str) -> int:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{text!r} must be one token, got {ids}"
    return ids[0]
