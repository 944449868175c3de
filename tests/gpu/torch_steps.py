"""check_device.py's steps that need torch and nothing else (no numpy, omegaconf,
transformers, pyarrow, Ray or vLLM): a GPU image without the project's other packages
still shows whether FSDP2, the streaming send, CUDA IPC and the log-prob head work.

Each step returns a one-line reason on success and raises on failure. `cpu=True` (the
script's --cpu-dry-run) runs what CPU can run on gloo, to check this file itself.
"""
from __future__ import annotations
import __future__ as future

import ast
import os
import socket
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
TIED = ("embed.weight", "lm_head.weight")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Block(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    """A decoder-shaped model built in code (no transformers): tied embeddings, as SmolLM2."""

    def __init__(self, vocab: int = 512, hidden: int = 128, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Block(hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


class Learner:
    """What the weight steps need of a learner: an FSDP2 model on this rank."""

    model: nn.Module
    device: torch.device

    def weight_source(self, dtype: torch.dtype, send_tied: bool = False):
        from srpo_ray.weights.source import ModelSource

        return ModelSource(self.model, dtype, 0, TIED, send_tied)


def fsdp2_train_step(state: Any, cpu: bool) -> str:
    """One rank of FSDP2 over NCCL: bf16 compute, fp32 master weights and gradient
    reduction, one AdamW step that moves the policy."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = torch.device("cpu" if cpu else "cuda", 0)
    if not cpu:
        torch.cuda.set_device(0)
    if not dist.is_initialized():
        dist.init_process_group("gloo" if cpu else "nccl", init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (1,))
    torch.manual_seed(0)
    model = TinyLM().to(device)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 512, (8, 24), generator=torch.Generator().manual_seed(0)).to(device)

    def loss_of() -> torch.Tensor:
        logits = model(ids[:, :-1])
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())

    masters = {p.dtype for p in model.parameters()}  # before a forward leaves the root's unsharded
    with torch.no_grad():
        before = loss_of().item()
    logits_dtype = model(ids[:1]).dtype
    loss = loss_of()
    loss.backward()
    grads = {p.grad.dtype for p in model.parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = loss_of().item()
    assert logits_dtype == torch.bfloat16, logits_dtype
    assert masters == {torch.float32}, f"master weights in {masters}"
    assert grads == {torch.float32}, f"gradients reduced in {grads}"
    assert after < before, (before, after)
    state.learner = Learner()
    state.learner.model, state.learner.device = model, device
    return f"bf16 compute, fp32 master weights and gradients, loss {before:.3f} -> {after:.3f}, " \
           f"grad norm {float(norm.full_tensor() if hasattr(norm, 'full_tensor') else norm):.3f}"


class RecordingComm:
    """In place of vLLM's PyNcclCommunicator: keeps each broadcast bucket's bytes. With
    `stall_cycles`, each broadcast also queues a GPU sleep on its stream, so the bucket's
    event stays pending as it does while a receiver is gone."""

    def __init__(self, stall_cycles: int = 0):
        self.sent: list[torch.Tensor] = []
        self.stall_cycles, self.destroyed = stall_cycles, False

    def broadcast(self, tensor: torch.Tensor, src: int, stream: Any = None) -> None:
        assert src == 0 and tensor.is_cuda
        if self.stall_cycles:  # (no copy to the host: it would wait for the sleep)
            torch.cuda._sleep(self.stall_cycles)
        else:
            self.sent.append(tensor.cpu())

    def destroy(self) -> None:
        self.destroyed = True


class LocalOps:
    def node_ip(self) -> str:
        return "127.0.0.1"

    def current_actor(self) -> None:
        return None


def streaming(state: Any, cpu: bool) -> str:
    """The nccl transport's send with real CUDA streams and events: peak extra memory
    within two buckets plus one gathered parameter, bytes identical; then the abort
    path: a pending bucket and the fleet's abort key make it stop, abort the communicator,
    keep joining the gathers and free its buckets."""
    from srpo_ray.weights.layout import streaming_peak_bytes, unpack_bucket
    from srpo_ray.weights.nccl import NcclTransport, TransferAborted
    from srpo_ray.weights.transport import SenderSettings

    ops = LocalOps()
    transport = NcclTransport(ops, SenderSettings(ops, bucket_bytes=64 << 10, timeout_s=60))
    comm = transport._comm = RecordingComm()
    source = state.learner.weight_source(torch.bfloat16)
    published = transport.publish(source)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    transport.serve_send(published.publish_id, "")
    extra = torch.cuda.max_memory_allocated() - base
    largest = max(s.nbytes for s in source.specs)  # bf16 bytes: its cast shard + the gathered tensor
    bound = streaming_peak_bytes(published.buckets) + 2 * largest + (1 << 20)
    assert extra <= bound, f"streaming held {extra} bytes extra, bound {bound}"
    torch.cuda.synchronize()
    torch.empty(1, device="cuda")  # frees of record_stream'ed blocks are settled on the next allocation
    assert torch.cuda.memory_allocated() <= base + (1 << 20), "the send buckets outlived the send"
    want = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().to(torch.bfloat16).cpu()
            for n, t in state.learner.model.state_dict().items()}
    assert len(comm.sent) == len(published.buckets)
    for flat, meta in zip(comm.sent, published.buckets):
        for name, got in unpack_bucket(flat, meta):
            assert torch.equal(got, want[name]), name
    # the abort path: buckets stay in flight (GPU sleep), the fleet has set the abort key
    stalled = transport._comm = RecordingComm(stall_cycles=2_000_000_000)
    gathered = CountingSource(state.learner.weight_source(torch.bfloat16))
    published = transport.publish(gathered)
    transport._control.store.set("abort/check", "1")
    try:
        transport.serve_send(published.publish_id, "abort/check")
        raise AssertionError("the send completed although the fleet aborted it")
    except TransferAborted as e:
        reason = str(e)
    assert stalled.destroyed and transport._comm is None, "the communicator was not aborted"
    assert gathered.yielded == len(gathered.specs), "rank 0 stopped joining the gathers"
    transport.close()
    torch.cuda.synchronize()
    return (f"{len(comm.sent)} buckets, bytes identical, peak extra {extra} <= {bound}; "
            f"abort: {reason!r}, every gather still joined")


class CountingSource:
    """A weight source that counts the tensors handed out (every rank must take all)."""

    def __init__(self, source: Any):
        self.source, self.specs, self.in_hand, self.yielded = source, source.specs, False, 0

    def tensors(self):
        for item in self.source.tensors():
            self.yielded += 1
            yield item

    def unchanged(self) -> bool:
        return True


def _ipc_reader(handle: dict, nbytes: int, queue: Any) -> None:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    args = list(next(iter(handle.values())))
    args[6] = 0  # this process's device index (vLLM's packed_ipc_consumer does the same)
    buf = rebuild_cuda_tensor(*args)
    queue.put(int(buf[:nbytes].to(torch.int64).sum().item()))


def cuda_ipc(state: Any, cpu: bool) -> str:
    """cuda_ipc's buffer read by another process through its IPC handle; the buffer is
    released after the update."""
    import torch.multiprocessing as mp

    from srpo_ray.weights.cuda_ipc import CudaIpcTransport
    from srpo_ray.weights.transport import SenderSettings

    ops = LocalOps()
    transport = CudaIpcTransport(ops, SenderSettings(ops, bucket_bytes=64 << 10, timeout_s=60))
    published = transport.publish(state.learner.weight_source(torch.bfloat16))
    handle = transport.serve_fill(published.publish_id, 0)
    meta = published.buckets[0]
    want = int(transport._buffer[:meta.nbytes].to(torch.int64).sum().item())
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    reader = ctx.Process(target=_ipc_reader, args=(handle, meta.nbytes, queue))
    reader.start()
    got = queue.get(timeout=60)
    reader.join(30)
    for index in range(1, len(published.buckets)):  # drain the stream: every rank's gathers done
        transport.serve_fill(published.publish_id, index)
    transport.serve_done()
    assert got == want, (got, want)
    assert transport._buffer is None, "the IPC buffer outlived the update"
    return f"another process read chunk 0 ({meta.nbytes} bytes) through the IPC handle"


def broadcast(state: Any, cpu: bool) -> str:
    from srpo_ray.weights.broadcast import BroadcastGroup
    from srpo_ray.weights.common import open_store

    store = open_store("127.0.0.1", free_port(), is_master=True, timeout_s=60)
    backend = "gloo" if cpu else "nccl"
    group = BroadcastGroup(store, "check", 0, 1, backend, 60)
    t = torch.arange(1000, device=group.device, dtype=torch.float32)
    group.broadcast(t)
    assert torch.equal(t.cpu(), torch.arange(1000, dtype=torch.float32))
    group.close()
    return f"a {backend} group on a TCPStore (no init_process_group) broadcast a {group.device.type} tensor"


def logprob_head() -> Callable[..., Any]:
    """srpo_ray.learner.core.token_logprobs; where core's other imports (numpy, pyarrow)
    are missing, the same function compiled from core.py's source alone."""
    try:
        from srpo_ray.learner.core import token_logprobs
        return token_logprobs
    except ImportError:
        pass
    path = REPO / "srpo_ray" / "learner" / "core.py"
    tree = ast.parse(path.read_text())
    keep = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("token_logprobs", "_entropy_no_grad")
            or isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "ENTROPY_CHUNK_ROWS" for t in n.targets)]
    names = {n.name for n in keep if isinstance(n, ast.FunctionDef)}
    if "token_logprobs" not in names:
        raise LookupError(f"{path} has no token_logprobs")
    namespace: dict[str, Any] = {"torch": torch}
    exec(compile(ast.Module(keep, []), str(path), "exec", flags=future.annotations.compiler_flag,
                 dont_inherit=True), namespace)
    return namespace["token_logprobs"]


def logprob_memory(state: Any, cpu: bool) -> str:
    """The log-prob head's GPU memory scales with the response tokens (fp32 rows of the
    masked positions only), not with batch x length x vocabulary; entropy is chunked."""
    token_logprobs = logprob_head()
    b, t, v = 4, 1024, 32768
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(b, t, v, device="cuda", dtype=torch.bfloat16, generator=gen)
    ids = torch.randint(0, v, (b, t), device="cuda", generator=gen)
    mask = torch.zeros(b, t, device="cuda")
    mask[:, -t // 8:] = 1  # an eighth of the positions are response tokens
    rows_bytes = int(mask.sum().item()) * v * 4
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        logprobs, entropy = token_logprobs(logits, ids, mask, 0.7, with_entropy=True)
    extra = torch.cuda.max_memory_allocated() - base
    full = b * t * v * 4  # one fp32 log-softmax of everything
    assert torch.isfinite(logprobs).all() and entropy is not None and (logprobs[mask == 0] == 0).all()
    assert extra <= 4 * rows_bytes + (64 << 20) < full, f"peak extra {extra} bytes: rows {rows_bytes}, full {full}"
    return f"peak extra {extra >> 20} MiB for {rows_bytes >> 20} MiB of fp32 response rows " \
           f"(a full fp32 log-softmax: {full >> 20} MiB)"


def close(state: Any) -> None:
    import torch.distributed as dist

    state.learner = None
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.pop("MASTER_PORT", None)
