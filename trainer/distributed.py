"""Small torch.distributed helpers shared by the trainer, Partial FC and the heads.

Every helper also works without a process group (one process, world size 1), so the same code runs in
`python trainer/main.py` and under `torchrun`.
"""
from __future__ import annotations

import inspect
import os
import time
import uuid
from datetime import timedelta
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

# torch >= 2.10 renamed the single-tensor collectives; keep older releases working.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard_range(total: int, rank: int, world_size: int) -> Tuple[int, int]:
    """`(start, count)` of the contiguous block of `total` items that `rank` owns.

    The first `total % world_size` ranks own one item more. A rank may own nothing when
    `total < world_size`.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")
    if total < 0:
        raise ValueError(f"cannot shard a negative count ({total})")
    base, extra = divmod(total, world_size)
    return base * rank + min(rank, extra), base + int(rank < extra)


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (`op` is "sum", "max", "min" or "mean"); a no-op on one process."""
    if not is_distributed():
        return tensor
    if op == "mean":
        dist.all_reduce(tensor, dist.ReduceOp.SUM)
        return tensor.div_(get_world_size())
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"unknown reduce op {op!r}")
    dist.all_reduce(tensor, ops[op])
    return tensor


def _supports_reduce_scatter() -> bool:
    # Gloo gained reduce_scatter late; older builds raise. NCCL always has it.
    return dist.get_backend() != "gloo" or hasattr(dist, "reduce_scatter_single")


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    sizes = torch.zeros(get_world_size(), dtype=torch.int64, device=device)
    sizes[get_rank()] = n
    dist.all_reduce(sizes)
    return sizes.tolist()


def all_gather_no_grad(tensor: torch.Tensor, sizes: Optional[list[int]] = None) -> torch.Tensor:
    """Concatenation over ranks (rank order) of each rank's `tensor` along dim 0.

    Ranks may hold different numbers of rows; pass `sizes` (rows per rank) when known to save one
    collective.
    """
    if not is_distributed():
        return tensor
    tensor = tensor.contiguous()
    if sizes is None:
        sizes = _gather_sizes(tensor.shape[0], tensor.device)
    world, rows = get_world_size(), max(sizes)
    padded = tensor
    if tensor.shape[0] < rows:
        padded = tensor.new_zeros((rows,) + tuple(tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
    out = tensor.new_empty((world * rows,) + tuple(tensor.shape[1:]))
    _all_gather_single(out, padded)
    if all(s == rows for s in sizes):
        return out
    return torch.cat([out[r * rows: r * rows + s] for r, s in enumerate(sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands every rank the sum over ranks of the gradients of its rows.

    Each rank differentiates its own share of a loss that depends on the gathered tensor, so the
    gradient of rank r's rows is split over all ranks; a reduce-scatter adds those pieces up and gives
    each rank its own rows.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int], grad_scale: float) -> torch.Tensor:
        ctx.sizes, ctx.grad_scale = sizes, grad_scale
        return all_gather_no_grad(tensor, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sizes, rank = ctx.sizes, get_rank()
        rows = max(sizes)
        grad = grad.contiguous()
        if all(s == rows for s in sizes):
            padded = grad
        else:
            padded = grad.new_zeros((len(sizes) * rows,) + tuple(grad.shape[1:]))
            offset = 0
            for r, s in enumerate(sizes):
                padded[r * rows: r * rows + s] = grad[offset: offset + s]
                offset += s
        if _supports_reduce_scatter():
            mine = grad.new_empty((rows,) + tuple(grad.shape[1:]))
            _reduce_scatter_single(mine, padded)
        else:
            dist.all_reduce(padded)
            mine = padded[rank * rows: (rank + 1) * rows]
        mine = mine[: sizes[rank]]
        if ctx.grad_scale != 1.0:
            mine = mine * ctx.grad_scale
        return mine, None, None


def all_gather_with_grad(
    tensor: torch.Tensor, grad_scale: float = 1.0, sizes: Optional[list[int]] = None
) -> torch.Tensor:
    """Differentiable all-gather along dim 0 (ranks may hold different numbers of rows).

    The backward returns to each rank the gradient of its own rows summed over all ranks, times
    `grad_scale`. With `grad_scale=1` that is the true gradient of a loss computed identically on every
    rank from disjoint shares; a backbone wrapped in DistributedDataParallel, which averages gradients
    over ranks, needs `grad_scale=world_size` to receive the gradient of the global loss.
    """
    if not is_distributed():
        return tensor if grad_scale == 1.0 else _ScaleGrad.apply(tensor, grad_scale)
    if sizes is None:
        sizes = _gather_sizes(tensor.shape[0], tensor.device)
    return _AllGatherWithGrad.apply(tensor, sizes, grad_scale)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def gather_to(tensor: torch.Tensor, dst: int = 0) -> Optional[torch.Tensor]:
    """Concatenation (rank order, dim 0) of every rank's `tensor` on rank `dst`; None on other ranks.

    Unlike an all-gather only `dst` ever holds the whole, which matters when the whole is a
    multi-gigabyte classifier. Ranks may hold different numbers of rows.
    """
    if not is_distributed():
        return tensor.clone()  # a snapshot, as on several ranks: the caller may keep training
    tensor = tensor.contiguous()
    sizes = _gather_sizes(tensor.shape[0], tensor.device)
    rows = max(sizes)
    padded = tensor
    if tensor.shape[0] < rows:
        padded = tensor.new_zeros((rows,) + tuple(tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
    if get_rank() == dst:
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.gather(padded, parts, dst=dst)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])
    dist.gather(padded, None, dst=dst)
    return None


# ------------------------------------------------------------------------------- the trainer's setup
def init_distributed() -> tuple[torch.device, int]:
    """Join torchrun's process group when launched by it; returns (device, local_rank)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        backend, timeout = ("nccl" if use_cuda else "gloo"), timedelta(minutes=30)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store = _fresh_store(timeout)
            dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=world_size,
                                    timeout=timeout)
        else:
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
    return device, local_rank


def _fresh_store(timeout: timedelta) -> dist.Store:
    """A TCPStore that only this attempt's workers use, for a run under torchrun's shared agent store.

    torchrun (c10d rendezvous, TORCH_DISABLE_SHARE_RDZV_TCP_STORE unset) hands its workers the agents' own
    TCPStore, whose server outlives a worker restart: a restarted worker would read the dead workers'
    addresses left there by the last attempt and never connect (gloo: "connectFullMesh failed ... Connection
    refused"). Scoping keys by TORCHELASTIC_RESTART_COUNT does not work across nodes: the agent whose worker
    failed counts a restart, the others only see a membership change and do not. So rank 0 opens a new
    server on a free port with a random token in it and publishes "host port token" in the agent store; the
    others connect to what they read there until they find the token (a value read from the last attempt
    names a dead server or a server without that token).
    """
    env = os.environ
    host, rank = env["MASTER_ADDR"], int(env["RANK"])
    agent = dist.TCPStore(host, int(env["MASTER_PORT"]), is_master=False, timeout=timeout)
    key, token_key = f"facetrain/{env.get('TORCHELASTIC_RUN_ID', '')}/process_group_store", "facetrain/token"
    if rank == 0:  # on the node of rendezvous rank 0, which hosts the agent store at MASTER_ADDR
        token = uuid.uuid4().hex
        store = dist.TCPStore(host, 0, is_master=True, timeout=timeout, wait_for_workers=False)
        store.set(token_key, token)
        agent.set(key, f"{host} {store.port} {token}")
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        addr, port, token = agent.get(key).decode().split()
        try:
            store = dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=3))
            if store.get(token_key).decode() == token:
                store.set_timeout(timeout)
                return store
        except (RuntimeError, dist.DistError):  # a dead server from the last attempt, or a stranger
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no process-group store of this attempt appeared under {key} in the agent "
                               f"store {host}:{env['MASTER_PORT']}")
        time.sleep(0.5)


def wrap_ddp(backbone: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around the backbone when there are several ranks (else the backbone itself).

    DDP broadcasts rank 0's weights (a resumed backbone is the same on every rank anyway). BatchNorm
    statistics stay per rank, as in insightface (model.pt keeps rank 0's).
    """
    if get_world_size() == 1:
        return backbone
    no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in \
        inspect.signature(DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False}
    return DistributedDataParallel(backbone, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True, **no_buffer_sync)


# ------------------------------------------------------------------------------------------ the run
