"""Partial FC: the class-centre matrix split by rows over the ranks (An et al., 2022).

Rank r owns the contiguous class range `shard_range(num_classes, r, world)`; its `weight` Parameter is
that shard, `[num_local, embedding_size]`. One step:

1. every rank's embeddings (with gradient) and labels are all-gathered, so each rank sees the whole
   global batch;
2. each rank computes the cosines of the whole batch against its own class centres (optionally a
   sample of them) and applies the margin loss to its block of logits;
3. a softmax cross-entropy over all classes is computed without ever materialising the full logit
   matrix: the row max and the row sum of exp are all-reduced, in fp32.

The loss is the mean over the gathered batch, the same scalar on every rank. Backward gives each rank
the exact gradient of that loss for its weight shard, and the gradient for its own embeddings summed
over all ranks (see `trainer.distributed.all_gather_with_grad`).

Sampling (`sample_rate < 1`): every class present in the gathered batch is kept and
`int(sample_rate * num_local)` rows in all (at least the gathered batch size, at most the shard) are drawn
per step per rank, from a seed and a draw count. The sampled rows are
taken from the full `weight` by `_SampledRows` (an index_select), so the weight's gradient is a sparse
tensor holding the sampled rows only. What "correct" means for the optimizer here: a row behaves as if
it were its own parameter that is stepped only on the steps where it was sampled. An unsampled row's
weight, momentum / Adam moments and step count are untouched (no momentum drift, no weight decay);
row i's state always stays row i's, because the state tensors have the weight's shape and are indexed
by the same row numbers. `RowSparseSGD` and `RowSparseAdamW` (trainer/optim.py) implement that rule
(torch's SGD would keep applying a decaying momentum to rows that were not sampled, and AdamW refuses
sparse gradients). With a dense gradient (`sample_rate=1`) they step every row and equal torch's SGD / AdamW.

Why this rule rather than insightface's PartialFC_V2 one (index the full weight, so unsampled rows get a
zero gradient, then a dense SGD step): there, an unsampled row keeps moving along its old momentum
and shrinks by weight decay on every step, updates computed from no data about that row, whose size
depends on how often the row happens to be drawn. Here a row's trajectory depends only on the
gradients it received, in order; the sampled step is exactly a step of the smaller classifier made of
the sampled rows, which is the premise of Partial FC. It also never builds a dense [C, D] gradient,
and the optimizer touches only the sampled rows (O(sampled rows), not O(C), per step).
"""
from __future__ import annotations

import math
import zlib
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_,
    gather_to,
    get_rank,
    get_world_size,
    is_distributed,
    shard_range,
)
from trainer.losses import at_least_fp32
from trainer.shard_state import slice_rows

__all__ = ["PartialFC", "DistSoftmaxCrossEntropy"]

# Initial weights are drawn in fixed blocks of rows, each from its own seed, so the initial classifier
# is the same whatever the world size (and each rank only draws the blocks it owns).
_INIT_BLOCK_ROWS = 1 << 16


class _DistSoftmaxCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, row_weight: Optional[torch.Tensor]) -> torch.Tensor:
        n = logits.shape[0]
        if logits.shape[1] > 0:
            row_max = logits.amax(dim=1)
        else:  # this rank owns no class: neutral elements for the reductions below
            row_max = logits.new_full((n,), -math.inf)
        all_reduce_(row_max, "max")
        probs = logits - row_max[:, None]
        # Masks rather than the rows of this shard's labels (nonzero): no host sync.
        mine = labels != -1
        if logits.shape[1] > 0:
            target = torch.where(mine, probs.gather(1, labels.clamp_min(0)[:, None]).squeeze(1), 0.0)
        else:
            target = logits.new_zeros(n)
        all_reduce_(target, "sum")  # each row's target logit lives on exactly one rank
        probs.exp_()
        denom = probs.sum(dim=1)
        all_reduce_(denom, "sum")
        probs.div_(denom[:, None])
        # Each row's share of the loss: 1/N, or its class weight over the batch's sum of them (torch's
        # F.cross_entropy(weight=...) with reduction "mean").
        share = logits.new_full((n,), 1.0 / n) if row_weight is None else row_weight / row_weight.sum()
        ctx.save_for_backward(probs, labels, share)
        ctx.used = False
        # log-sum-exp minus the target logit: stays finite where softmax(target) underflows.
        return ((denom.log() - target) * share).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.used:
            raise RuntimeError("Partial FC's cross-entropy reuses its softmax buffer: backward "
                               "cannot run twice (retain_graph is not supported)")
        ctx.used = True
        probs, labels, share = ctx.saved_tensors
        # d(CE)/d logit = (softmax - onehot) * the row's share, built in the saved buffer to spare a
        # [N, C] copy.
        grad = probs
        if grad.shape[1] > 0:
            grad.scatter_add_(1, labels.clamp_min(0)[:, None], -(labels != -1).to(grad.dtype)[:, None])
        grad.mul_((share * grad_loss)[:, None])
        return grad, None, None


def cosine_matmul_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype of the cosine matmuls: fp16 under fp16 autocast (arcface_torch's precision: cosine error
    ~3e-4 at a target cosine of 0.994), else fp32 (None: the inputs' own). bf16's 8-bit mantissa would
    put ~2.5e-3 on the target cosine, 0.16 on its logit at s=64, the size of the gaps the margin works
    on; the layer's matmuls are a small share of a step's FLOPs (bench/log/partial_fc.md). On a GPU with
    the config's tf32=True the fp32 matmuls run in TF32, whose 10-bit mantissa is fp16's."""
    return torch.float16 if _autocast_dtype(device_type) == torch.float16 else None


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype an enclosing torch.autocast gives matmuls on `device_type`, None outside one."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: per-device functions
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


class _NormalizedLinear(torch.autograd.Function):
    """cos = e @ normalize(w).T for unit rows e, computed as (e @ w.T) / ||w_j||.

    Normalising the [C_local, D] weight would keep a normalised copy for backward and cost several
    passes over it in each direction; dividing the logit columns instead keeps only the weight itself
    and a [C_local] vector of inverse norms. Backward, with G = grad.T @ e and w_hat = w / ||w||:
        grad_w = (G - w_hat * <w_hat, G>) / ||w||,   grad_e = grad @ w_hat.
    """

    @staticmethod
    def forward(ctx, e: torch.Tensor, w: torch.Tensor, matmul_dtype: Optional[torch.dtype]) -> torch.Tensor:
        inv_norm = w.norm(dim=1).clamp_min(1e-12).reciprocal()
        cast = (lambda t: t) if matmul_dtype is None else (lambda t: t.to(matmul_dtype))
        cos = at_least_fp32(F.linear(cast(e), cast(w))).mul_(inv_norm)
        ctx.save_for_backward(e, w, inv_norm)
        ctx.matmul_dtype = matmul_dtype
        return cos

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        e, w, inv_norm = ctx.saved_tensors
        dtype = ctx.matmul_dtype or w.dtype
        grad_e = grad_w = None
        if ctx.needs_input_grad[0]:
            # Scale whichever operand is smaller: the [N, C] gradient or the [C, D] weight.
            if grad.shape[0] < w.shape[1]:
                grad_e = (grad * inv_norm).to(dtype) @ w.to(dtype)
            else:
                grad_e = grad.to(dtype) @ (w * inv_norm[:, None]).to(dtype)
            grad_e = grad_e.to(e.dtype)
        if ctx.needs_input_grad[1]:
            g = (grad.to(dtype).t() @ e.to(dtype)).to(w.dtype)  # [C, D]
            radial = (w * g).sum(dim=1).mul_(inv_norm * inv_norm)  # <w_hat, G> / ||w||
            grad_w = g.addcmul_(w, radial[:, None], value=-1.0).mul_(inv_norm[:, None])
        return grad_e, grad_w, None


class _SampledRows(torch.autograd.Function):
    """weight[index] for sorted unique `index`; the weight's gradient is a sparse tensor of those rows,
    marked coalesced (F.embedding(sparse=True) leaves it uncoalesced: the optimizer would have to read the
    rows back to the host to learn they are unique)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, index: torch.Tensor, owner: "PartialFC") -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.shape = weight.shape
        ctx.owner = owner
        return weight.index_select(0, index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        out = torch.sparse_coo_tensor(index[None], grad, ctx.shape, is_coalesced=True, check_invariants=False)
        ctx.owner._fresh_grad_indices = out._indices().data_ptr()
        return out, None, None


class DistSoftmaxCrossEntropy(nn.Module):
    """Mean softmax cross-entropy over classes sharded by columns across ranks.

    `logits` [N, C_local] are this rank's columns for the whole (gathered) batch, `labels` [N] the
    local column of each row's class or -1, `row_weight` [N] (optional, the same on every rank) each
    row's class weight: the mean is then weighted, sum(w_i * CE_i) / sum(w_i), as torch's
    F.cross_entropy(weight=...). Computed in fp32; returns the same scalar on every rank.
    """

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                row_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        logits = at_least_fp32(logits)
        if row_weight is not None:
            row_weight = row_weight.reshape(-1).to(logits.dtype)
        return _DistSoftmaxCEFunction.apply(logits, labels.reshape(-1).long(), row_weight)


class PartialFC(nn.Module):
    """Model-parallel classifier + margin softmax loss (docs/design.md section 4).

    Build it after `torch.distributed.init_process_group` (or without a process group: one rank).
    `margin_loss` is a callable from `trainer.losses` / `trainer.heads`. If it has a true
    `needs_norms` attribute it is called as `margin_loss(cos, labels, norms=norms)` with the L2 norms
    of the gathered embeddings ([N], differentiable). It may return `logits` or `(logits, extra)`,
    where `extra` is a scalar loss term computed identically on every rank from gathered quantities
    (e.g. a feature-norm regulariser); it is added to the loss once (its gradient is divided by the
    world size, because every rank back-propagates its own copy).

    `embedding_grad_scale`: the backward gives each rank the gradient of the global mean loss for its
    own embeddings times this factor. Keep 1.0 for the true gradient; a trainer whose backbone is
    wrapped in DistributedDataParallel (which averages gradients over ranks) passes the world size,
    so that the backbone receives the gradient of the global mean loss, as insightface does.

    `equal_batches` (the trainer's contract: every rank trains on batches of the same size): the all-gathers
    use the known sizes, so no batch size is read back to the host (after the first forward, which checks
    them); an unequal batch later fails an on-device check. False: ranks may hold different numbers of rows (one more small collective and a
    host sync per forward).

    `class_weight` ([num_classes], optional): the cross-entropy weighted by the class of each row, as
    torch's F.cross_entropy(weight=...) (trainer/class_weights.py: inverse class frequencies). Every rank
    holds the whole vector (4 bytes a class): the gathered labels index it directly.

    A head with `needs_raw_logits` (trainer/heads/linear.py) is given `x @ W.T` of the raw embeddings
    and rows instead of their cosines; it needs `sample_rate == 1`.
    """

    def __init__(
        self,
        margin_loss: Callable[..., Any],
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        *,
        embedding_grad_scale: float = 1.0,
        seed: int = 0,
        init_std: float = 0.01,
        equal_batches: bool = True,
        class_weight: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        if not callable(margin_loss):
            raise TypeError(f"margin_loss must be callable, got {type(margin_loss).__name__}")
        if embedding_size < 1 or num_classes < 1:
            raise ValueError(f"need embedding_size >= 1 and num_classes >= 1, got "
                             f"{embedding_size} and {num_classes}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.raw_logits = bool(getattr(margin_loss, "needs_raw_logits", False))
        if self.raw_logits and sample_rate < 1.0:
            raise ValueError(f"a head on raw logits ({type(margin_loss).__name__}) needs sample_rate 1, got "
                             f"{sample_rate}: its per-class bias would be stepped on unsampled rows")
        if class_weight is not None:
            class_weight = torch.as_tensor(class_weight, dtype=torch.float32).reshape(-1)
            if class_weight.shape[0] != num_classes or not bool(torch.isfinite(class_weight).all()) \
                    or bool((class_weight < 0).any()):
                raise ValueError(f"class_weight must be {num_classes} finite values >= 0, got "
                                 f"{tuple(class_weight.shape)}")
        self.margin_loss = margin_loss
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.sample_rate = float(sample_rate)
        self.embedding_grad_scale = float(embedding_grad_scale)
        self.seed = int(seed)
        self.equal_batches = bool(equal_batches)
        self._batches_checked = False
        self.rank, self.world_size = get_rank(), get_world_size()
        self.class_start, self.num_local = shard_range(self.num_classes, self.rank, self.world_size)
        self.weight = nn.Parameter(self._initial_weight(init_std))
        self._fresh_grad_indices: Optional[int] = None
        self.weight.register_post_accumulate_grad_hook(self._keep_coalesced)
        self.cross_entropy = DistSoftmaxCrossEntropy()
        # Not in state_dict: rebuilt from the data by whoever builds the classifier.
        self.register_buffer("class_weight", class_weight, persistent=False)
        # Rows of `weight` used by the last training step (all of them when not sampling).
        self.sampled_index: Optional[torch.Tensor] = None
        self._generator: Optional[torch.Generator] = None
        # Negative sampling draws from seed + draw count: a state that means the same on any device.
        self._draws = 0

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"sample_rate={self.sample_rate}, rank={self.rank}/{self.world_size}, "
                f"classes=[{self.class_start}, {self.class_start + self.num_local})")

    def _initial_weight(self, std: float) -> torch.Tensor:
        weight = torch.empty(self.num_local, self.embedding_size)
        end = self.class_start + self.num_local
        first_block = self.class_start // _INIT_BLOCK_ROWS
        for block in range(first_block, -(-end // _INIT_BLOCK_ROWS)):
            lo, hi = block * _INIT_BLOCK_ROWS, min((block + 1) * _INIT_BLOCK_ROWS, self.num_classes)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + block)
            rows = torch.normal(0.0, std, (hi - lo, self.embedding_size), generator=gen)
            a, b = max(lo, self.class_start), min(hi, end)
            weight[a - self.class_start: b - self.class_start] = rows[a - lo: b - lo]
        return weight

    # ---- forward -----------------------------------------------------------------------------

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This rank's batch (`[B, D]`, `[B]` global class ids) -> global mean loss (a scalar)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be [B, {self.embedding_size}], got {tuple(embeddings.shape)}")
        labels = labels.reshape(-1).long()
        if labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {embeddings.shape[0]} embeddings")
        self._check_labels(labels)

        embeddings, labels = self.gather(embeddings, labels)
        local_labels = self.local_labels(labels)

        if self.training and self.sample_rate < 1.0:
            index, local_labels = self.sample(local_labels)
            # The weight's gradient holds the sampled rows only (see the module doc).
            weight = _SampledRows.apply(self.weight, index, self)
        else:
            index, weight = None, self.weight
        self.sampled_index = index

        cosine = self.linear(embeddings, weight) if self.raw_logits else self.cosine(embeddings, weight)
        device_type = cosine.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            kw = {}
            if getattr(self.margin_loss, "needs_norms", False):
                kw["norms"] = at_least_fp32(embeddings).norm(dim=1)
            if getattr(self.margin_loss, "needs_class_index", False):
                kw["class_index"] = index  # per-class head state follows the sampled rows
            out = self.margin_loss(cosine, local_labels, **kw)
            extra = None
            if isinstance(out, tuple):
                out, extra = out
            row_weight = self.class_weight[labels] if self.class_weight is not None else None
            loss = self.cross_entropy(out, local_labels, row_weight)
            if extra is not None:
                w = self.world_size
                loss = loss + extra / w + (extra * (w - 1) / w).detach()
        return loss

    def _keep_coalesced(self, weight: torch.Tensor) -> None:
        # Autograd stores a lone sparse gradient without its "coalesced" mark; put it back when the
        # gradient is exactly one backward's (its indices are _SampledRows's own), so that the optimizer
        # need not coalesce it (a host sync). A sum over micro-batches is a new tensor: left as it is.
        grad, fresh = weight.grad, self._fresh_grad_indices
        self._fresh_grad_indices = None
        if grad is not None and grad.is_sparse and not grad.is_coalesced() and fresh is not None \
                and grad._indices().data_ptr() == fresh:
            weight.grad = torch.sparse_coo_tensor(grad._indices(), grad._values(), grad.shape,
                                                  is_coalesced=True, check_invariants=False)

    def gather(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch: every rank's embeddings (differentiable) and labels, in rank order."""
        if not is_distributed():
            return all_gather_with_grad(embeddings, self.embedding_grad_scale), labels
        if not self.equal_batches:
            sizes = torch.tensor([embeddings.shape[0]], device=labels.device)
            sizes = all_gather_no_grad(sizes, [1] * self.world_size).tolist()
            return (all_gather_with_grad(embeddings, self.embedding_grad_scale, sizes),
                    all_gather_no_grad(labels, sizes))
        b = embeddings.shape[0]
        sizes = [b] * self.world_size
        if not self._batches_checked:  # once, on every rank alike: a clear error for a misconfigured run
            seen = all_gather_no_grad(torch.tensor([b], device=labels.device), [1] * self.world_size).tolist()
            if seen != sizes:
                raise ValueError(f"Partial FC with equal_batches=True got batches of {seen} rows on the "
                                 f"{self.world_size} ranks; pass equal_batches=False for uneven batches")
            self._batches_checked = True
        # Each rank's batch size rides along with its labels, checked on the device (no host sync).
        tagged = all_gather_no_grad(torch.cat([labels, labels.new_full((1,), b)]), [b + 1] * self.world_size)
        tagged = tagged.view(self.world_size, b + 1)
        torch._assert_async((tagged[:, b] == b).all(),
                            "Partial FC: ranks hold batches of different sizes (equal_batches=True)")
        return all_gather_with_grad(embeddings, self.embedding_grad_scale, sizes), tagged[:, :b].reshape(-1)

    def _check_labels(self, labels: torch.Tensor) -> None:
        if labels.numel() == 0:
            return
        bad = (labels < 0) | (labels >= self.num_classes)
        # Checked on the device: no host sync on a GPU (a device-side assert), immediate on the CPU.
        try:
            torch._assert_async(~bad.any(), f"labels outside [0, {self.num_classes})")
        except RuntimeError:
            raise ValueError(f"labels outside [0, {self.num_classes}): {labels[bad][:5].tolist()}") from None

    def local_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Global class ids -> this shard's row numbers, -1 for classes owned by other ranks."""
        local = labels - self.class_start
        return local.masked_fill((local < 0) | (local >= self.num_local), -1)

    def cosine(self, embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """fp32 (fp64 for fp64 inputs) cosines [N, rows of weight]; the matmuls run in fp16 under fp16
        autocast, as insightface's fp16 option does, and in fp32 otherwise (`cosine_matmul_dtype`)."""
        e = F.normalize(at_least_fp32(embeddings), dim=1)
        device_type = e.device.type
        matmul_dtype = cosine_matmul_dtype(device_type)
        with torch.autocast(device_type=device_type, enabled=False):
            return _NormalizedLinear.apply(e, at_least_fp32(weight), matmul_dtype)

    def linear(self, embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x @ W.T of the raw embeddings and rows (a linear classifier's logits, before its bias), fp32
        (fp64 for fp64 inputs), with the matmul in the dtype `cosine` uses."""
        device_type = embeddings.device.type
        matmul_dtype = cosine_matmul_dtype(device_type)
        e, w = at_least_fp32(embeddings), at_least_fp32(weight)
        with torch.autocast(device_type=device_type, enabled=False):
            if matmul_dtype is not None:
                e, w = e.to(matmul_dtype), w.to(matmul_dtype)
            return at_least_fp32(F.linear(e, w))

    def sample(self, local_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows to use this step (sorted) and the labels renumbered into them.

        Every positive class of the gathered batch is kept; the rest of the rows are drawn uniformly
        from the negatives. The count is fixed on the host, so that nothing is read back from the
        device: `int(sample_rate * num_local)` rows, or the gathered batch size if that is more (a
        batch may hold that many positives), never more than the shard.
        """
        device = local_labels.device
        if self.num_local == 0:  # a rank that owns no class (fewer classes than ranks)
            return torch.zeros(0, dtype=torch.long, device=device), local_labels
        num_sample = min(self.num_local, max(int(self.sample_rate * self.num_local), local_labels.shape[0]))
        score = torch.rand(self.num_local, generator=self.generator(device), device=device)
        positive = local_labels != -1
        rows = local_labels.clamp_min(0)
        # 2 is above any uniform draw: positives always make the top k (foreign rows add 0: no change).
        score.scatter_reduce_(0, rows, torch.where(positive, 2.0, 0.0).to(score.dtype), "amax")
        index = torch.topk(score, num_sample, sorted=False).indices.sort().values
        relabelled = torch.where(positive, torch.searchsorted(index, rows), -1)
        return index, relabelled

    def generator(self, device: torch.device) -> torch.Generator:
        """This rank's sampling generator on `device`, seeded for the next draw."""
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device)
        self._generator.manual_seed(self._draw_seed(self._draws))
        self._draws += 1
        return self._generator

    def _draw_seed(self, draw: int) -> int:
        return (self.seed * 1_000_003 + 7919 * self.rank + 1 + draw * 2_654_435_761) % (1 << 63)

    # ---- checkpoint helpers ------------------------------------------------------------------

    def sampler_state_dict(self) -> Dict[str, Any]:
        """This rank's negative-sampling stream: plain numbers, so a checkpoint resumes on any device
        (a generator's own state is device-specific: a CPU one cannot be set into a CUDA generator)."""
        return {"rank": self.rank, "world_size": self.world_size, "seed": self.seed, "draws": self._draws}

    def load_sampler_state_dict(self, state: Dict[str, Any]) -> None:
        """Continues the saved stream if it was saved by the same rank of a world of the same size;
        otherwise keeps the fresh seeded stream (a different world size draws different negatives anyway).
        A checkpoint from before the draw count (a device generator state) also keeps the fresh stream."""
        if state.get("world_size") != self.world_size or state.get("rank") != self.rank:
            return
        if "draws" not in state:
            return
        self.seed, self._draws = int(state["seed"]), int(state["draws"])

    def local_state(self, optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, Any]:
        """This rank's shard (weight rows and, given the optimizer, their per-row state), on the CPU."""
        state: Dict[str, Any] = {
            "num_classes": self.num_classes,
            "embedding_size": self.embedding_size,
            "class_start": self.class_start,
            "num_local": self.num_local,
            "weight": self.weight.detach().cpu().clone(),
        }
        if optimizer is not None:
            state["optimizer_state"] = {
                k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                for k, v in optimizer.state.get(self.weight, {}).items()
            }
        return state

    def full_weight_state(
        self, optimizer: Optional[torch.optim.Optimizer] = None, dst: int = 0
    ) -> Optional[Dict[str, Any]]:
        """The whole classifier `[num_classes, D]` (and the per-row optimizer state) on rank `dst`.

        Collective: every rank must call it. Returns the dict on `dst` (CPU tensors) and None on the
        other ranks. The whole matrix passes through `dst`'s device (NCCL: its GPU); for classifiers
        too large for that, save every rank's `local_state()` and join them with
        `trainer.shard_state.assemble_full_state`.
        Per-row optimizer tensors (first dim = rows of the shard) are gathered like the weight;
        anything else (e.g. AdamW's scalar `step`) is taken from `dst`.
        """
        weight = gather_to(self.weight.detach(), dst)
        per_row: Dict[str, Any] = {}
        other: Dict[str, Any] = {}
        if optimizer is not None:
            state = optimizer.state.get(self.weight, {})
            keys = sorted(state)
            per_row_flags = [self._is_per_row(state[k]) for k in keys]
            self._check_same_on_all_ranks(keys, per_row_flags)
            for key, is_per_row in zip(keys, per_row_flags):
                value = state[key]
                if is_per_row:
                    per_row[key] = gather_to(value.detach(), dst)
                else:
                    other[key] = value.detach().cpu().clone() if torch.is_tensor(value) else value
        if weight is None:
            return None
        state: Dict[str, Any] = {
            "num_classes": self.num_classes,
            "embedding_size": self.embedding_size,
            "weight": weight.cpu(),
        }
        if optimizer is not None:
            state["optimizer_state"] = {**other, **{k: v.cpu() for k, v in per_row.items()}}
        return state

    def _check_same_on_all_ranks(self, keys: List[str], flags: List[bool]) -> None:
        # The gathers below pair up only if every rank walks the same keys in the same order; a rank
        # whose optimizer never stepped would otherwise hang the others.
        if not is_distributed():
            return
        code = zlib.crc32(repr((keys, flags)).encode())  # str hash() differs between processes
        t = torch.tensor([code, -code], dtype=torch.float64, device=self.weight.device)
        all_reduce_(t, "max")
        if t[0].item() != code or -t[1].item() != code:
            raise RuntimeError("ranks hold different optimizer state for the Partial FC weight "
                               f"(this rank: {keys}); step every rank before saving")

    def _is_per_row(self, value: Any) -> bool:
        return torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == self.num_local

    def load_full_weight(self, weight: torch.Tensor) -> None:
        """Takes this rank's rows out of a whole `[num_classes, D]` classifier (any saved world size)."""
        if tuple(weight.shape) != (self.num_classes, self.embedding_size):
            raise ValueError(f"full weight must be [{self.num_classes}, {self.embedding_size}], "
                             f"got {tuple(weight.shape)}")
        with torch.no_grad():
            self.weight.copy_(self.slice_rows(weight))

    def slice_rows(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a per-class tensor `[num_classes, ...]`."""
        return slice_rows(full, self.num_classes, self.rank, self.world_size)

    def load_full_state(
        self, state: Dict[str, Any], optimizer: Optional[torch.optim.Optimizer] = None
    ) -> None:
        """Loads `full_weight_state()` / `assemble_full_state()` output, re-sharded for this world.

        Given `optimizer` (which must hold `self.weight`) and a saved `optimizer_state`, this rank's
        rows of every per-class state tensor become the optimizer's state for `weight`.
        """
        if state["num_classes"] != self.num_classes or state["embedding_size"] != self.embedding_size:
            raise ValueError(f"checkpoint holds {state['num_classes']} classes x {state['embedding_size']}"
                             f" dims, this Partial FC {self.num_classes} x {self.embedding_size}")
        self.load_full_weight(state["weight"])
        if optimizer is None or "optimizer_state" not in state:
            return
        if not any(p is self.weight for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("the optimizer does not hold this Partial FC's weight")
        device = self.weight.device
        new_state = {}
        for key, value in state["optimizer_state"].items():
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == self.num_classes:
                value = self.slice_rows(value)
            new_state[key] = value.clone().to(device) if torch.is_tensor(value) else value
        optimizer.state[self.weight] = new_state
