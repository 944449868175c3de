"""Fakes and shapes shared by the weight-path tests (tests/unit/test_weights_gpu_paths.py and
tests/ray/test_weights_gpu_paths_ray.py): Ray-like refs, handles and fleet members, and
Qwen2.5-32B's tensor shapes."""
from __future__ import annotations

import time

from srpo_ray.weights.layout import TensorSpec

MB = 1 << 20


def qwen32b_specs() -> list[TensorSpec]:
    """The shapes of Qwen2.5-32B in bf16 (64 layers, hidden 5120, 152064 vocab)."""
    h, inter, kv, layers, vocab = 5120, 27648, 1024, 64, 152064
    specs = [TensorSpec("model.embed_tokens.weight", "bfloat16", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [TensorSpec(p + n, "bfloat16", s) for n, s in (
            ("self_attn.q_proj.weight", (h, h)), ("self_attn.q_proj.bias", (h,)),
            ("self_attn.k_proj.weight", (kv, h)), ("self_attn.k_proj.bias", (kv,)),
            ("self_attn.v_proj.weight", (kv, h)), ("self_attn.v_proj.bias", (kv,)),
            ("self_attn.o_proj.weight", (h, h)), ("mlp.gate_proj.weight", (inter, h)),
            ("mlp.up_proj.weight", (inter, h)), ("mlp.down_proj.weight", (h, inter)),
            ("input_layernorm.weight", (h,)), ("post_attention_layernorm.weight", (h,)))]
    return specs + [TensorSpec("model.norm.weight", "bfloat16", (h,)), TensorSpec("lm_head.weight", "bfloat16",
                                                                                   (vocab, h))]


class Ref:
    def __init__(self, value=None, error=None, ready=True):
        self.value, self.error, self.ready = value, error, ready


class RefOps:
    """ops over Ref objects; `on_abort` runs when the fleet sets an abort key."""

    def __init__(self):
        self.killed = []

    def get(self, ref, timeout=None):
        if isinstance(ref, list):
            return [self.get(r) for r in ref]
        if ref.error:
            raise ref.error
        return ref.value

    def wait(self, refs, num_returns, timeout, fetch_local=True):
        ready = [r for r in refs if r.ready][:max(num_returns, 1)]
        if not ready and timeout:
            time.sleep(min(timeout, 0.01))
        return ready, [r for r in refs if r not in ready]


class Handle:
    def __init__(self, ref):
        self.weights_call = type("M", (), {"remote": staticmethod(lambda *a: ref)})()


class Member:
    def __init__(self, ref):
        self.handle = Handle(ref)
