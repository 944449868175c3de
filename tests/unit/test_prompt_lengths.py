"""check_prompt_lengths: the batched start-up check finds exactly the prompts that
chat_prompt_ids (what generation workers feed vLLM) finds too long, across chunk
boundaries, with non-ASCII text, and with or without the bytes-per-token shortcut."""
from __future__ import annotations

import random
import re

import pytest

from srpo_ray.data.parquet import DataError, _tokens_at_most_bytes, check_prompt_lengths
from srpo_ray.models import CHATML_TEMPLATE, build_tiny_tokenizer, chat_prompt_ids
from srpo_ray.records import Prompt


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _prompts(n: int, seed: int = 0) -> list[Prompt]:
    rng = random.Random(seed)
    pieces = ["What is", " 12345", " x^2", "\\frac{1}{2}", " déjà vu", " 数学", " <|im_start|>", " 🙂", "\n\n", "   "]
    out = []
    for i in range(n):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))
        system = [{"role": "system", "content": "Think."}] if i % 4 == 0 else []
        out.append(Prompt(prompt_id=f"p{i}", domain="math", ground_truth="1",
                          messages=system + [{"role": "user", "content": text}]))
    return out


def _found_too_long(tok, prompts: list[Prompt], limit: int, **kwargs) -> tuple[int, list[str]] | None:
    try:
        check_prompt_lengths(tok, prompts, limit, **kwargs)
    except DataError as err:
        message = str(err)
        assert f"data.max_prompt_tokens={limit}" in message
        count = int(message.split(" prompt(s)")[0])
        return count, re.findall(r"(p\d+) \(\d+ tokens\)", message)
    return None


@pytest.mark.parametrize("limit", [20, 60, 120, 10_000])
@pytest.mark.parametrize("chunk_size", [7, 2048])
def test_batched_check_matches_chat_prompt_ids(tokenizer, limit, chunk_size):
    prompts = _prompts(200)
    lengths = {p.prompt_id: len(chat_prompt_ids(tokenizer, p.messages)) for p in prompts}
    expected = [pid for pid, n in lengths.items() if n > limit]
    found = _found_too_long(tokenizer, prompts, limit, chunk_size=chunk_size)
    if not expected:
        assert found is None
    else:
        assert found == (len(expected), expected[:5])


def test_bytes_bound_holds_and_is_used_only_where_it_is_proven(tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    assert _tokens_at_most_bytes(tokenizer)  # Qwen2-style: NFC, Split, ByteLevel without prefix space
    for p in _prompts(200, seed=1):
        text = tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
        if text.isascii():
            assert len(chat_prompt_ids(tokenizer, p.messages)) <= len(text)
    # SentencePiece-style: a prefix "▁" may add a token that covers no byte: no shortcut
    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    assert not _tokens_at_most_bytes(PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>"))


def test_slow_path_without_the_shortcut_finds_the_same(tokenizer, monkeypatch):
    import srpo_ray.data.parquet as data

    monkeypatch.setattr(data, "_tokens_at_most_bytes", lambda tok: False)
    prompts = _prompts(60, seed=2)
    expected = [p.prompt_id for p in prompts if len(chat_prompt_ids(tokenizer, p.messages)) > 50]
    assert expected and _found_too_long(tokenizer, prompts, 50, chunk_size=16) == (len(expected), expected[:5])


def test_tokenizer_without_a_chat_template_is_a_clear_error():
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        check_prompt_lengths(tok, _prompts(3), 100)
    tok.chat_template = CHATML_TEMPLATE
    check_prompt_lengths(tok, [], 100)  # nothing to check
