"""The configuration schema's rollout and reward sections (generation and reward
workers); re-exported by srpo_ray/config/schema.py, which holds the rest.

Values the SRPO paper does not publish are marked "(our choice)".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# Bundled data sources whose answers are integers: judged by the strict number rule.
NUMBER_ANSWER_SOURCES = {"builtin/arithmetic": "number", "arithmetic_heldout": "number", "aime": "number"}


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
