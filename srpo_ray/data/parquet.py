"""Training prompts from parquet files in the column layout verl users already have.

Columns: `prompt` (chat messages: a list of {role, content}; a plain string is taken as
one user message), `data_source` (str), `ability` (the domain: math or code),
`reward_model` (struct with `ground_truth`), `extra_info` (struct, optional). Code rows
carry their tests in `reward_model.ground_truth` (see srpo_ray.rewards.code_tests for the
accepted encodings). Rows whose data source a reward plug-in scores
(`scored_by_plugin`, srpo_ray/rewards/plugins.py) may have any `ability`: it becomes
their domain (lowercased, spaces as _; math and code aliases still map to math and
code), and their ground truth is kept as it is, for the plug-in. Every row is checked
before training starts; a bad row is an error naming the file and the row.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow.parquet as pq

from srpo_ray.config.schema import BUILTIN_PREFIX
from srpo_ray.data.registry import builtin_dataset_path
from srpo_ray.data.verl_rows import DataError, write_verl_parquet
from srpo_ray.records import Prompt, domain_problem

__all__ = ["DataError", "check_prompt_lengths", "load_prompts", "row_to_prompt", "write_verl_parquet"]


# Domain names seen in the wild (verl `ability`, LiveCodeBench, DeepScaleR ...) -> ours.
_DOMAIN_ALIASES = {
    "math": "math", "mathematics": "math", "math_reasoning": "math", "arithmetic": "math",
    "code": "code", "coding": "code", "codegen": "code", "programming": "code",
}
_ID_KEYS = ("prompt_id", "id", "uid", "problem_id", "question_id")


def load_prompts(files: Iterable[str], cache_dir: str | None = None,
                 system_prompt: str | None = None,
                 scored_by_plugin: Callable[[str], bool] | None = None) -> list[Prompt]:
    """Read and validate every row of every file. Duplicate ids with the same content
    are kept once; the same id with different content is an error. `system_prompt`
    (data.system_prompt) becomes the first message of every prompt that has no system
    message; a prompt's id does not depend on it. `scored_by_plugin(data_source)`: True
    when a reward plug-in scores that source's rows (any ability, truth kept as is)."""
    prompts: dict[str, Prompt] = {}
    for spec in files:
        path = _resolve_file(spec, cache_dir)
        for row_index, prompt in _read_file(path, scored_by_plugin):
            if system_prompt and prompt.messages[0]["role"] != "system":
                prompt.messages.insert(0, {"role": "system", "content": system_prompt})
            seen = prompts.get(prompt.prompt_id)
            if seen is not None and (seen.messages, seen.ground_truth) != (prompt.messages, prompt.ground_truth):
                raise DataError(f"{path} row {row_index}: id {prompt.prompt_id!r} is already used by a "
                                f"different prompt; ids must be unique (fix the `id` in extra_info, or drop it "
                                f"to use a content hash)")
            prompts[prompt.prompt_id] = prompt
    if not prompts:
        raise DataError(f"no prompts in {list(files)}; data.train_files must name parquet files with rows")
    return list(prompts.values())


def _resolve_file(spec: str, cache_dir: str | None) -> Path:
    if spec.startswith(BUILTIN_PREFIX):
        return builtin_dataset_path(spec[len(BUILTIN_PREFIX):], cache_dir)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"data file {spec} does not exist; data.train_files takes parquet paths "
                        f"(or builtin:tiny_math_code)")
    return path


def _read_file(path: Path, scored_by_plugin: Callable[[str], bool] | None) -> Iterable[tuple[int, Prompt]]:
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a non-parquet file
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    missing = [c for c in ("prompt", "reward_model") if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected verl layout with columns "
                        f"prompt, data_source, ability, reward_model.ground_truth, extra_info "
                        f"(found {table.column_names})")
    row_index = 0
    for batch in table.to_batches(max_chunksize=4096):
        for row in batch.to_pylist():
            try:
                yield row_index, row_to_prompt(row, scored_by_plugin)
            except (DataError, ValueError, TypeError) as e:
                raise DataError(f"{path} row {row_index}: {e}") from None
            row_index += 1


def row_to_prompt(row: dict[str, Any], scored_by_plugin: Callable[[str], bool] | None = None) -> Prompt:
    """One verl-layout row -> Prompt. Raises ValueError saying what is wrong."""
    messages = _messages(row.get("prompt"))
    data_source = str(row.get("data_source") or "")
    extra_info = row.get("extra_info") or {}
    if not isinstance(extra_info, dict):
        raise ValueError(f"extra_info must be a struct/dict, got {type(extra_info).__name__}")
    plugin = bool(scored_by_plugin and scored_by_plugin(data_source))
    domain = _domain(row.get("ability"), extra_info, data_source, plugin)
    reward_model = row.get("reward_model")
    raw_truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
    if plugin:  # the plug-in reads the truth as the data has it (None when there is none)
        truth: Any = raw_truth.tolist() if hasattr(raw_truth, "tolist") else raw_truth
    elif raw_truth is None:
        raise ValueError("reward_model.ground_truth is missing; every row needs the answer (math) or the tests (code)")
    elif domain == "math":
        truth = _math_truth(raw_truth)
    else:
        from srpo_ray.rewards.code_tests import parse_code_tests
        truth = parse_code_tests(raw_truth, extra_info)
    prompt_id = _explicit_id(row, extra_info) or _content_id(data_source, messages, raw_truth)
    return Prompt(prompt_id=prompt_id, domain=domain, messages=messages, ground_truth=truth,
                  data_source=data_source, extra_info=extra_info)


def _messages(value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise ValueError("prompt must be a non-empty list of chat messages {role, content} (or a string)")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"prompt[{i}] must be a dict with string `role` and `content`, got {m!r:.200}")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"prompt[{i}] has role {m['role']!r}; use system, user or assistant")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise ValueError("the last prompt message must be from the user (the policy answers it)")
    return out


def _domain(ability: Any, extra_info: dict, data_source: str, plugin: bool) -> str:
    raw = ability if ability is not None else extra_info.get("domain")
    if raw is None:
        raise ValueError(f"no domain: set the `ability` column to math or code (data_source {data_source!r})")
    name = "_".join(str(raw).strip().lower().split())
    domain = _DOMAIN_ALIASES.get(name)
    if domain is not None:
        return domain
    if not plugin:
        raise ValueError(f"unknown domain {raw!r} in `ability` (data_source {data_source!r}); use one of "
                         f"{sorted(set(_DOMAIN_ALIASES))}, or score this source with a reward plug-in "
                         f"(reward.custom_functions.{data_source or '<data_source>'}=path/to/file.py:function)")
    problem = domain_problem(name)
    if problem:
        raise ValueError(f"`ability` {raw!r} cannot be a domain name: {problem}")
    return name


def _math_truth(raw: Any) -> str:
    if hasattr(raw, "tolist"):
        raw = raw.tolist()
    if isinstance(raw, list) and len(raw) == 1:
        raw = raw[0]
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ValueError(f"math ground_truth must be a string or number, got {type(raw).__name__}")
    text = str(raw).strip()
    if not text:
        raise ValueError("math ground_truth is empty")
    return text


def _explicit_id(row: dict, extra_info: dict) -> str | None:
    for source in (row, extra_info):
        for key in _ID_KEYS:
            value = source.get(key)
            if value is not None and str(value).strip():
                return str(value).strip()
    return None


def _content_id(data_source: str, messages: list[dict], raw_truth: Any) -> str:
    """Stable across runs and machines: a hash of what defines the prompt."""
    blob = json.dumps([data_source, messages, raw_truth], sort_keys=True, default=str, ensure_ascii=False)
    return "h" + hashlib.sha1(blob.encode()).hexdigest()[:16]


PROMPT_LENGTH_CHUNK = 2048  # prompts rendered and tokenized per batch call: bounds the texts held at once
_BYTES_BOUND_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD"}  # the identity on ASCII text
_BYTES_BOUND_SPLITTERS = {"Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit"}  # split, add nothing


def check_prompt_lengths(tokenizer: Any, prompts: list[Prompt], max_tokens: int,
                         chunk_size: int = PROMPT_LENGTH_CHUNK) -> None:
    """Every prompt must fit in `max_tokens` after the chat template: checked before the
    run starts, not discovered mid-run by a generation worker. Raises DataError naming
    the first offending prompt ids and data.max_prompt_tokens.

    Counts the same tokens as `chat_prompt_ids` (what the workers feed vLLM) but for
    millions of prompts: the template renders `chunk_size` prompts per call, and with a
    byte-level BPE tokenizer (Qwen, Llama 3, SmolLM) an ASCII text of at most
    `max_tokens` characters is not encoded at all, since every token covers at least one
    byte. The rest are encoded in one batch call per chunk (Rust, all cores)."""
    from srpo_ray.models import chat_prompt_ids

    if not prompts:
        return
    chat_prompt_ids(tokenizer, prompts[0].messages)  # clear errors for a template-less tokenizer / bad messages
    bounded = _tokens_at_most_bytes(tokenizer)
    too_long = []
    for start in range(0, len(prompts), chunk_size):
        chunk = prompts[start:start + chunk_size]
        texts = tokenizer.apply_chat_template([p.messages for p in chunk], tokenize=False,
                                              add_generation_prompt=True)
        unsure = [i for i, text in enumerate(texts)
                  if not (bounded and len(text) <= max_tokens and text.isascii())]
        if unsure:
            ids = tokenizer([texts[i] for i in unsure], add_special_tokens=False,
                            return_attention_mask=False)["input_ids"]
            too_long += [(chunk[i].prompt_id, len(t)) for i, t in zip(unsure, ids) if len(t) > max_tokens]
    if too_long:
        shown = ", ".join(f"{pid} ({n} tokens)" for pid, n in too_long[:5])
        raise DataError(f"{len(too_long)} prompt(s) are longer than data.max_prompt_tokens={max_tokens} after "
                        f"the chat template: {shown}{' ...' if len(too_long) > 5 else ''}; raise "
                        f"data.max_prompt_tokens or drop them from the data")


def _tokens_at_most_bytes(tokenizer: Any) -> bool:
    """True if the tokenizer provably yields at most one token per byte of an ASCII text
    (without added special tokens): a BPE model behind a byte-level pre-tokenizer that
    adds no prefix space, and only normalisers and splitters that leave ASCII as is.
    Anything else (SentencePiece's prefix, slow tokenizers) is encoded in full."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())

    def parts(node: dict | None, key: str) -> list[dict]:
        return [] if node is None else node.get(key, []) if node["type"] == "Sequence" else [node]

    normalizers_ok = all(n["type"] in _BYTES_BOUND_NORMALIZERS for n in parts(spec.get("normalizer"), "normalizers"))
    pre = parts(spec.get("pre_tokenizer"), "pretokenizers")
    byte_level = [p for p in pre if p["type"] == "ByteLevel"]
    return (spec["model"]["type"] == "BPE" and normalizers_ok and len(byte_level) == 1
            and not byte_level[0].get("add_prefix_space", False)
            and all(p["type"] in _BYTES_BOUND_SPLITTERS | {"ByteLevel"} for p in pre))

