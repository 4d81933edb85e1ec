"""Small helpers every evaluation protocol shares: the FAR list and its JSON keys, L2 normalisation,
the device to score on, and arrays (numpy, memmap or torch) as tensors."""
from __future__ import annotations

import numpy as np
import torch

FARS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


class EvalError(ValueError):
    """A request this command cannot carry out; the message says why."""


def far_key(far: float) -> str:
    """The JSON key of a FAR: 1e-06 -> "1e-6", 0.001 -> "1e-3"."""
    mantissa, exponent = f"{far:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def narrow_ints(x) -> np.ndarray:
    """Integers as int32 when every value fits, else int64 (per-image labels, ids and row numbers: half
    the bytes an image). A signed array of 32 bits or fewer is taken as it is, without a copy."""
    arr = x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.dtype.kind == "i" and arr.dtype.itemsize <= 4:
        return arr
    if len(arr) == 0 or (arr.dtype.kind in "iub" and arr.min() >= -(1 << 31) and arr.max() < (1 << 31)):
        return arr.astype(np.int32)
    return arr.astype(np.int64, copy=False)


def as_tensor(x, dtype, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    arr = np.asarray(x)
    if not arr.flags.writeable:  # a memmap slice: torch wants memory it may write
        arr = arr.copy()
    return torch.as_tensor(arr, dtype=dtype, device=device)


def resolve_device(device=None) -> torch.device:
    """None or "auto": the GPU when there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def packed_set_only(args, option: str, what: str) -> None:
    """A protocol of one packed set (`--attributes`, `--closed-set`): refuse what it cannot honour."""
    if args.data is None:
        raise EvalError(f"{option} needs --data DATA ({what})")
    if args.cmc or args.masked_probe or args.table or args.distractors:
        raise EvalError(f"{option} does not go with --cmc, --masked-probe, --distractors or --table")
