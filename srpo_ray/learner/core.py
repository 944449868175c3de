"""One rank of the FSDP2 learner: pure torch + torch.distributed (no Ray).

N processes (Ray actors in practice, any launcher works) each build an FSDPLearner with
their rank; together they hold one sharded copy of the policy and its AdamW state.

Gradient convention. The loss of every micro-batch is already divided by the GLOBAL
denominator (response tokens, or sequences, of the whole batch over all ranks), so the
batch gradient is the plain SUM of the ranks' gradients. FSDP2 averages by default;
we set its divide factor to 1 with sum-only reductions, so its reduce-scatter sums.

Collectives. FSDP2 all-gathers in every forward and reduce-scatters in every backward,
so every rank must run the SAME number of passes. Ranks agree on the micro-batch count
(all-reduce MAX); a rank with fewer (or no) sequences runs zero-weighted dummy passes.

Precision. Parameters and AdamW state are float32 on every rank; model.dtype
(auto: bfloat16 on GPUs, float32 on CPUs) is the compute dtype FSDP2 casts gathered
weights to, with fp32 gradient reduction. Weights handed out (full_state_dict, hf/)
are in that dtype.

Reference policy. With algo.kl_coef > 0 every rank also keeps a frozen copy of the
initial policy (model.path), sharded the same way, held in model.dtype, with no
gradients and no optimizer state. It is rebuilt from model.path at setup (a resumed run
keeps the same reference) and is never checkpointed. A training pass runs the reference
forward first (no grad, so its activations are freed before the policy's are built);
a dummy pass does too, so the ranks' all-gathers stay in step.

Log-probs (response_logprobs). A micro-batch of more than 2 x learner.logprob_chunk_tokens
positions gets them from the final hidden states and the head, chunk by chunk
(srpo_ray/learner/logprob_head.py), never building its [B, T, V] logits; a smaller one
from model(...).logits and token_logprobs, bit for bit as before.

Loading. Only rank 0 reads the model files; the other ranks build the model on the
meta device, shard it and receive their shards (srpo_ray/learner/sharded_weights.py, which also
holds full_state_dict and the checkpoints). Host memory at setup: rank 0 reads the files
a piece at a time (learner/weight_files.py), every rank holds its shard. What a step's
freed heap does: learner.host_heap.
"""
from __future__ import annotations

import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from srpo_ray.algo.loss import METRIC_COUNTS, count_denominator, metric_count_key, policy_loss
from srpo_ray.config.schema import SRPOConfig, resolve_dtype
from srpo_ray.host_heap import release_free_memory, resolve_heap_policy, set_heap_policy
from srpo_ray.learner.batch import TrainBatch, micro_batches, split_into_chunks
from srpo_ray.learner.logprob_head import chunked_token_logprobs, final_hidden_and_head, uses_full_logits
from srpo_ray.learner.sharded_weights import ShardedWeightsIO, build_sharded_model
from srpo_ray.learner.weight_files import open_full_weights


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor,
                   temperature: float, with_entropy: bool = False,
                   entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of `input_ids` under `logits / temperature`.

    logits [B, T, V] (from model(input_ids)), input_ids [B, T], response_mask [B, T].
    Returns logprobs [B, T] float32 with `logprobs[b, t] = log p(input_ids[b, t] |
    input_ids[b, :t])` where response_mask is 1 and 0 elsewhere, and entropy [B, T] of
    the distribution that predicted each masked token (or None). Only the masked
    positions are turned into fp32 log-softmax rows ([N, V], N = masked tokens): the full
    [B, T, V] log-softmax is never built.
    """
    mask = response_mask.bool()
    if mask.shape[1] and mask[:, 0].any():
        raise ValueError("response_mask marks position 0, which has no preceding context; "
                         "every sequence must start with at least one prompt token")
    rows = logits[:, :-1][mask[:, 1:]].float() / temperature  # [N, V]: row for token t is logits[t-1]
    lse = torch.logsumexp(rows, dim=-1)
    picked = rows.gather(-1, input_ids[mask].unsqueeze(-1)).squeeze(-1) - lse
    logprobs = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    logprobs[mask] = picked
    if not with_entropy:
        return logprobs, None
    if entropy_grad and torch.is_grad_enabled():  # a loss term: the full graph is needed
        per_row = lse - (torch.softmax(rows, dim=-1) * rows).sum(-1)
    else:  # a metric: ENTROPY_CHUNK_ROWS rows at a time, no graph ([N, V] temporaries
        per_row = _entropy_no_grad(rows, lse)  # were 10s of GB at 16k tokens x 152k vocab)
    entropy = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    entropy[mask] = per_row
    return logprobs, entropy


ENTROPY_CHUNK_ROWS = 1024


@torch.no_grad()
def _entropy_no_grad(rows: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(rows) per row, ENTROPY_CHUNK_ROWS rows at a time."""
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
    for start in range(0, rows.shape[0], ENTROPY_CHUNK_ROWS):
        chunk, chunk_lse = rows[start:start + ENTROPY_CHUNK_ROWS], lse[start:start + ENTROPY_CHUNK_ROWS]
        out[start:start + chunk.shape[0]] = chunk_lse - (torch.softmax(chunk, dim=-1) * chunk).sum(-1)
    return out


def response_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor, temperature: float, with_entropy: bool = False,
                      entropy_grad: bool = False, chunk_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """token_logprobs of `model` on one micro-batch. Small ones (learner.logprob_chunk_tokens,
    logprob_head.uses_full_logits): from model(...).logits, exactly as before; larger ones
    from the final hidden states, `chunk_tokens` response tokens at a time, never
    building the [B, T, V] logits nor [N, V] float32 rows (srpo_ray/learner/logprob_head.py)."""
    if uses_full_logits(input_ids.numel(), chunk_tokens):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return token_logprobs(logits, input_ids, response_mask, temperature, with_entropy, entropy_grad)
    hidden, weight, bias = final_hidden_and_head(model, input_ids, attention_mask)
    return chunked_token_logprobs(hidden, weight, bias, input_ids, response_mask, temperature,
                                  with_entropy, entropy_grad, chunk_tokens)


class FSDPLearner(ShardedWeightsIO):
    """One rank. Every method except __init__ is collective: all ranks call it, in the
    same order (they would otherwise wait for each other until collective_timeout_s).
    full_state_dict, save_checkpoint and load_checkpoint come from ShardedWeightsIO."""

    def __init__(self, model_path: str, cfg: SRPOConfig, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.model_path = str(model_path)
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.model: nn.Module | None = None
        self.ref_model: nn.Module | None = None  # frozen initial policy, only when algo.kl_coef > 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.device = torch.device("cpu")
        self.optimizer_steps = 0

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Join the process group (MASTER_ADDR/MASTER_PORT from the environment), build
        the HF model sharded with FSDP2 (each decoder layer, then the root; weights read
        by rank 0 only) and AdamW; with algo.kl_coef > 0 also the frozen reference model."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

        cfg = self.cfg
        backend = _pick_backend(cfg.learner.backend, cfg.learner.gpus_per_rank)
        # before the process group's threads and the model start allocating
        set_heap_policy(resolve_heap_policy(cfg.learner.host_heap, cfg.learner.gpus_per_rank > 0))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            self.device = torch.device("cuda", torch.cuda.current_device())
        if not dist.is_initialized():
            dist.init_process_group(backend, rank=self.rank, world_size=self.world_size,
                                    timeout=timedelta(seconds=cfg.learner.collective_timeout_s))
        mesh = init_device_mesh(self.device.type, (self.world_size,))

        # Master weights and AdamW state stay float32; with model.dtype bfloat16/float16
        # FSDP2 casts the gathered parameters for compute and reduces gradients in fp32.
        self.compute_dtype = getattr(torch, resolve_dtype(cfg.model.dtype, self.device.type == "cuda"))
        mp_policy = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        full = open_full_weights(self.model_path) if self.rank == 0 else None  # read piece by piece
        model, self._tied_names = build_sharded_model(
            self.model_path, mesh, self.device, torch.float32, full, mp_policy=mp_policy,
            gradient_checkpointing=cfg.learner.gradient_checkpointing)
        for module in model.modules():
            if isinstance(module, FSDPModule):  # sum the ranks' gradients, see module docstring
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        model.train()
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr,
                                           betas=tuple(cfg.optim.betas),
                                           eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
        if cfg.algo.kl_coef > 0:
            # the initial policy, frozen: in the compute dtype (what FSDP2 casts the policy's
            # fp32 weights to, so both agree exactly before any update), sharded like the
            # policy, without mixed precision, gradients or optimizer
            ref, _ = build_sharded_model(self.model_path, mesh, self.device, self.compute_dtype, full,
                                         trainable=False)
            self.ref_model = ref.eval()
        del full
        release_free_memory()

    # ------------------------------------------------------------------ training

    def train_step(self, shard: TrainBatch, loss_denominator: float, temperature: float) -> dict:
        """Update the policy on this rank's `shard` of one rollout batch.

        loss_denominator: the global denominator of algo.loss_agg for the WHOLE batch
          (response tokens, or sequences, summed over all ranks' shards); the same value
          on every rank. temperature: the sampling temperature (logits are divided by it
          so log-probs match the sampler's).

        algo.minibatches == 1 (SRPO): one optimizer step; old log-probs are the current
        ones detached, so the ratio is exactly 1 and the loss is the plain policy
        gradient. algo.minibatches = k > 1: old log-probs are recomputed (no grad) before
        the first update, the shard is cut into k contiguous chunks and each is one
        optimizer step whose denominator is that chunk's global count (all-reduced;
        `loss_denominator` is then unused).

        algo.kl_coef > 0: each micro-batch's reference log-probs [b, T] (frozen initial
        policy, same temperature) enter the loss as kl_coef * k3 per token; `kl_ref` is
        their token-weighted mean over the batch.

        Returns the same dict on every rank (all-reduced over ranks): `loss` (batch loss,
        mean over optimizer steps), `grad_norm` (global pre-clip norm, mean over steps),
        `response_tokens`, `sequences`, `skipped_steps` (non-finite gradient norm: the
        step is skipped), `optimizer_steps` (total so far), and the loss's metrics:
        pg_loss summed like the loss, ratio_max and offpolicy/ratio_max as maxima, the
        rest (clip_frac_low/high, logprob_mismatch vs the sampler, entropy, ratio_mean,
        approx_kl, offpolicy/... per domain too, ...) as means weighted by their tokens
        (sequences for the *_seq_frac ones; algo/loss.py metric_count_key); all
        prefixed `learner/`.
        """
        self._require_setup()
        cfg = self.cfg
        k = cfg.algo.minibatches
        if k == 1:
            chunks, denominators, old = [shard], [float(loss_denominator)], [None]
        else:
            chunks = split_into_chunks(shard, k)
            denominators = [self._all_reduce_sum(count_denominator(c.response_mask, cfg.algo.loss_agg)) for c in chunks]
            old = [self._old_logprobs(c, temperature) for c in chunks]
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        maxima: dict[str, float] = {}
        steps = {"loss": 0.0, "grad_norm": 0.0, "skipped_steps": 0.0, "taken": 0.0}
        for chunk, denominator, chunk_old in zip(chunks, denominators, old):
            if not denominator > 0:  # the same on all ranks: nothing to learn in this chunk anywhere
                continue
            loss, grad_norm = self._optimizer_step(chunk, denominator, chunk_old, temperature,
                                                   sums, weights, maxima)
            steps["taken"] += 1
            steps["loss"] += loss
            if math.isfinite(grad_norm):
                steps["grad_norm"] += grad_norm
            else:
                steps["skipped_steps"] += 1
        metrics = self._reduce_metrics(shard, steps, sums, weights, maxima)
        release_free_memory()  # the step's activations and logits, gigabytes at 135M params
        release_gpu_cache(self.device, self.cfg.cluster.colocate)
        return metrics

    def _optimizer_step(self, chunk: TrainBatch, denominator: float, old: list[torch.Tensor] | None,
                        temperature: float, sums: dict, weights: dict, maxima: dict) -> tuple[float, float]:
        optimizer, cfg = self.optimizer, self.cfg
        mbs = micro_batches(chunk, cfg.learner.micro_batch_size, cfg.learner.max_tokens_per_micro_batch)
        positions = sum(mb.input_ids.numel() for mb in mbs)  # padding_frac: weighted by positions
        sums["padding_frac"] = sums.get("padding_frac", 0.0) + positions - sum(mb.num_tokens for mb in mbs)
        weights["padding_frac"] = weights.get("padding_frac", 0.0) + positions
        passes = self._all_reduce_max(len(mbs))
        optimizer.zero_grad(set_to_none=True)
        local_loss = 0.0
        for i in range(passes):
            if i < len(mbs):
                mb = _to_device(mbs[i], self.device)
                ref_lp = self._ref_logprobs(mb, temperature)
                lp, entropy = self._forward_logprobs(mb, temperature, with_entropy=True,
                                                     entropy_grad=cfg.algo.entropy_coef > 0)
                old_lp = lp.detach() if old is None else old[i].to(self.device)
                loss, metrics = policy_loss(lp, old_lp, mb.advantages, mb.response_mask, cfg.algo,
                                            loss_denominator=denominator,
                                            rollout_logprobs=mb.rollout_logprobs, ref_logprobs=ref_lp,
                                            entropy=entropy, domains=mb.domains or None)
                _accumulate(metrics, sums, weights, maxima)
                local_loss += loss.item()
            else:
                loss = self._dummy_loss(with_reference=True)
            loss.backward()
        grad_norm = self._clip_gradients()
        if math.isfinite(grad_norm):
            optimizer.step()
            self.optimizer_steps += 1
        optimizer.zero_grad(set_to_none=True)
        return self._all_reduce_sum(local_loss), grad_norm

    def _clip_gradients(self) -> float:
        """Global (all ranks) pre-clip L2 norm; clips to optim.grad_clip unless it is 0.
        clip_grad_norm_ reduces over the DTensor shards, so every rank sees the same norm."""
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm.item())

    def _old_logprobs(self, chunk: TrainBatch, temperature: float) -> list[torch.Tensor]:
        """Log-probs per micro-batch of `chunk` before any update (no grad), on CPU."""
        mbs = micro_batches(chunk, self.cfg.learner.micro_batch_size, self.cfg.learner.max_tokens_per_micro_batch)
        out = []
        with torch.no_grad():
            for i in range(self._all_reduce_max(len(mbs))):
                if i < len(mbs):
                    lp, _ = self._forward_logprobs(_to_device(mbs[i], self.device), temperature)
                    out.append(lp.cpu())
                else:
                    self._dummy_loss()
        return out

    def _forward_logprobs(self, mb: TrainBatch, temperature: float, with_entropy: bool = False,
                          entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        return response_logprobs(self.model, mb.input_ids, mb.attention_mask, mb.response_mask, temperature,
                                 with_entropy, entropy_grad, self.cfg.learner.logprob_chunk_tokens)

    @torch.no_grad()
    def _ref_logprobs(self, mb: TrainBatch, temperature: float) -> torch.Tensor | None:
        """[b, T] log-probs of the response tokens under the reference model, or None
        when there is none (algo.kl_coef == 0)."""
        if self.ref_model is None:
            return None
        return response_logprobs(self.ref_model, mb.input_ids, mb.attention_mask, mb.response_mask, temperature,
                                 chunk_tokens=self.cfg.learner.logprob_chunk_tokens)[0]

    def _dummy_loss(self, with_reference: bool = False) -> torch.Tensor:
        """A zero loss through the whole model: one 2-token forward, so this rank joins
        the all-gathers (and, on backward, the reduce-scatters) of a real pass.
        with_reference: first a reference forward too, as a real training pass runs."""
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        if with_reference and self.ref_model is not None:
            with torch.no_grad():
                self.ref_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        return logits.float().sum() * 0.0

    def _reduce_metrics(self, shard: TrainBatch, steps: dict, sums: dict, weights: dict,
                        maxima: dict) -> dict:
        local = {"sums": sums, "weights": weights, "maxima": maxima,
                 "tokens": shard.num_response_tokens, "sequences": shard.num_sequences}
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, local)
        taken = max(steps["taken"], 1.0)
        out = {
            "learner/loss": steps["loss"] / taken,
            "learner/grad_norm": steps["grad_norm"] / max(taken - steps["skipped_steps"], 1.0),
            "learner/skipped_steps": steps["skipped_steps"],
            "learner/optimizer_steps": float(self.optimizer_steps),
            "learner/response_tokens": float(sum(g["tokens"] for g in gathered)),
            "learner/sequences": float(sum(g["sequences"] for g in gathered)),
        }
        names = sorted({n for g in gathered for n in g["sums"]} | {n for g in gathered for n in g["maxima"]})
        for name in names:
            if name in _MAX_METRICS:
                out[f"learner/{name}"] = max(g["maxima"][name] for g in gathered if name in g["maxima"])
            elif name in _ADDITIVE_METRICS:
                out[f"learner/{name}"] = sum(g["sums"].get(name, 0.0) for g in gathered) / taken
            else:
                total_w = sum(g["weights"].get(name, 0.0) for g in gathered)
                total = sum(g["sums"].get(name, 0.0) for g in gathered)
                out[f"learner/{name}"] = total / total_w if total_w else 0.0
        return out

    # ------------------------------------------------------------------ weights out

    @torch.no_grad()
    def logprobs_of(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    temperature: float = 1.0) -> torch.Tensor:
        """[B, T] log-probs of every real token given its prefix (position 0 and padding:
        0), on CPU, float32. Collective (the forward all-gathers the shards)."""
        self._require_setup()
        ids = input_ids.to(self.device)
        am = torch.ones_like(ids) if attention_mask is None else attention_mask.to(self.device)
        mask = am.clone().float()
        mask[:, 0] = 0
        return response_logprobs(self.model, ids, am, mask, temperature,
                                 chunk_tokens=self.cfg.learner.logprob_chunk_tokens)[0].cpu()

    # ------------------------------------------------------------------ helpers

    def _require_setup(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("FSDPLearner.setup() must be called (on every rank) first")
        return self.model

    def _all_reduce_sum(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def _all_reduce_max(self, value: int) -> int:
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


# How policy_loss's per-call metrics combine over micro-batches and ranks: pg_loss is
# already divided by the global denominator, so it adds up (like the loss); the ratio
# maxima are maxima; every other metric is a mean over the call's tokens (or sequences,
# or one domain's: the count metric_count_key names), weighted by that count.
_ADDITIVE_METRICS = ("pg_loss",)
_MAX_METRICS = ("ratio_max", "offpolicy/ratio_max")


def _accumulate(metrics: dict, sums: dict, weights: dict, maxima: dict) -> None:
    """Fold one micro-batch's loss metrics into the running sums (see above)."""
    for name, value in metrics.items():
        if name.rpartition("/")[2] in METRIC_COUNTS:
            continue
        if name in _MAX_METRICS:
            maxima[name] = max(maxima.get(name, float("-inf")), float(value))
        elif name in _ADDITIVE_METRICS:
            sums[name] = sums.get(name, 0.0) + float(value)
        else:
            count = float(metrics.get(metric_count_key(name), 0.0))
            sums[name] = sums.get(name, 0.0) + float(value) * count
            weights[name] = weights.get(name, 0.0) + count


def release_gpu_cache(device: torch.device, colocated: bool) -> bool:
    """Hand the step's cached GPU blocks back to the driver when vLLM shares this GPU:
    PyTorch's caching allocator keeps what the step reserved while the engine slept, and
    the engine's wake-up (weights, then KV cache) would not find room (an OOM). Separate
    GPUs keep the cache: the next step reuses it."""
    if not colocated or device.type != "cuda":
        return False
    torch.cuda.empty_cache()
    return True


def _pick_backend(backend: str, gpus_per_rank: float) -> str:
    """From the config, not from the GPUs this process sees (Ray no longer hides a node's
    GPUs from actors that asked for none)."""
    if backend == "auto":
        backend = "nccl" if gpus_per_rank > 0 else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError(f"learner.backend=nccl with learner.gpus_per_rank={gpus_per_rank:g}, but this rank "
                         "sees no CUDA device; check the node's GPUs (nvidia-smi) and that Ray advertises them")
    return backend


def _to_device(mb: TrainBatch, device: torch.device) -> TrainBatch:
    if device.type == "cpu":
        return mb
    return TrainBatch(**{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                         for k, v in vars(mb).items()})
