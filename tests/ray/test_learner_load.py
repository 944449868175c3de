"""The sharded load (rank 0 reads the files, the others build on the meta device and
receive their shards) gives exactly the weights of the model files: policy and, with
algo.kl_coef > 0, reference model; tied and untied embeddings; non-persistent buffers
(rotary inv_freq) included. Real 2-rank FSDP2 learners in Ray actors."""
from __future__ import annotations

import functools

import pytest
import torch
from learner_cases import learner_cfg
from published_weights import learner_weights


def _file_weights(model_path: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state dict, buffers) of a plain transformers load of `model_path`, float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return dict(model.state_dict()), {k: v.clone() for k, v in model.named_buffers()}


def _in_actor(what: str, which: str = "model"):
    """A function for `handle.__ray_call__` (defined locally so Ray pickles it by value:
    the actors cannot import this test module). what="state": the full state dict of
    learner.<which> (collective: call every rank at once); what="buffers": its buffers."""
    def probe(rank_impl):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        model = getattr(rank_impl.learner, which)
        if what == "buffers":
            return {k: v.detach().cpu().clone() for k, v in model.named_buffers()}
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return probe


def _group(ray, model_path: str, ranks: int = 2, **algo):
    from srpo_ray.runtime.learner_group import create_learner_group

    cfg = learner_cfg()
    for k, v in algo.items():
        setattr(cfg.algo if k != "dtype" else cfg.model, k, v)
    group = create_learner_group(cfg, model_path, num_ranks=ranks, actor_options=lambda r: {"num_cpus": 0.5},
                                 setup=False)
    group.get = functools.partial(ray.get, timeout=120)  # a hung rank fails the test
    group.setup()
    return group


def _assert_equal(got: dict, want: dict, dtype: torch.dtype) -> None:
    assert got.keys() == want.keys()
    for k in want:
        expected = want[k].to(dtype) if want[k].is_floating_point() else want[k]
        torch.testing.assert_close(got[k], expected, atol=0, rtol=0, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_sharded_load_equals_model_files(tied, tmp_path):
    from local_ray import ensure_local_ray

    from srpo_ray.models import build_tiny_model

    ray = ensure_local_ray()
    model_path = build_tiny_model(str(tmp_path / "m"), tie_word_embeddings=tied, seed=3)
    state, buffers = _file_weights(model_path)
    # tied: with the reference model (kl_coef > 0) and bfloat16 compute, which both use
    kwargs = {"kl_coef": 0.5, "dtype": "bfloat16"} if tied else {}
    dtype = torch.bfloat16 if tied else torch.float32
    group = _group(ray, model_path, **kwargs)
    try:
        _assert_equal(learner_weights(group), state, dtype)
        for rank_buffers in ray.get([h.__ray_call__.remote(_in_actor("buffers")) for h in group.handles]):
            _assert_equal(rank_buffers, buffers, torch.float32)
        if tied:
            refs = ray.get([h.__ray_call__.remote(_in_actor("state", "ref_model")) for h in group.handles])
            ref = refs[0]
            ref.setdefault("lm_head.weight", ref["model.embed_tokens.weight"])
            _assert_equal(ref, state, torch.bfloat16)
            for rank_buffers in ray.get([h.__ray_call__.remote(_in_actor("buffers", "ref_model")) for h in group.handles]):
                _assert_equal(rank_buffers, buffers, torch.float32)
    finally:
        for handle in group.handles:
            ray.kill(handle)


def test_one_float32_rank_is_a_plain_module_with_tied_embeddings(tmp_path):
    """Nothing to shard or cast: the one rank skips FSDP2 (its per-layer copies cost 12%
    of a CPU step) and must still load the files exactly, with the embeddings tied."""
    from local_ray import ensure_local_ray

    from srpo_ray.models import build_tiny_model

    ray = ensure_local_ray()
    model_path = build_tiny_model(str(tmp_path / "m"), tie_word_embeddings=True, seed=4)
    state, _ = _file_weights(model_path)
    group = _group(ray, model_path, ranks=1)

    def probe(rank_impl):
        from torch.distributed.fsdp import FSDPModule
        model = rank_impl.learner.model
        return (any(isinstance(m, FSDPModule) for m in model.modules()),
                model.lm_head.weight is model.model.embed_tokens.weight)
    try:
        _assert_equal(learner_weights(group), state, torch.float32)
        assert ray.get(group.handles[0].__ray_call__.remote(probe)) == (False, True)
    finally:
        for handle in group.handles:
            ray.kill(handle)
