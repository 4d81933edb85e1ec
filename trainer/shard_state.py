"""Per-class state split over the ranks, and joined again for a checkpoint that any world size reads.

Partial FC's classifier rows (`PartialFC.local_state` per rank, `assemble_full_state` joins them) and a
margin head's per-class tensors (`head_state` per rank, `join_head_states`, `load_head_state`) are
sliced by the same contiguous class ranges (`trainer.distributed.shard_range`). trainer/checkpoint.py
writes and reads them; ValueError says a state does not fit (the checkpoint code names the file).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

import torch

from trainer.distributed import get_rank, get_world_size, shard_range


def slice_rows(full: torch.Tensor, num_classes: int, rank: int, world_size: int) -> torch.Tensor:
    """Rows of a per-class tensor `[num_classes, ...]` that `rank` of `world_size` owns."""
    if full.shape[0] != num_classes:
        raise ValueError(f"expected {num_classes} rows, got {full.shape[0]}")
    start, count = shard_range(num_classes, rank, world_size)
    return full[start: start + count]


def assemble_full_state(shards: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
    """Joins the `local_state()` dicts of all ranks of one run into a `full_weight_state()` dict."""
    shards = sorted(shards, key=lambda s: s["class_start"])
    if not shards:
        raise ValueError("no shards given")
    num_classes, dim = shards[0]["num_classes"], shards[0]["embedding_size"]
    expected = 0
    for s in shards:
        if s["num_classes"] != num_classes or s["embedding_size"] != dim:
            raise ValueError("shards come from different classifiers")
        if s["class_start"] != expected:
            raise ValueError(f"shards do not tile the classes: gap or overlap at class {expected}")
        expected += s["num_local"]
    if expected != num_classes:
        raise ValueError(f"shards cover {expected} of {num_classes} classes")
    full: Dict[str, Any] = {
        "num_classes": num_classes,
        "embedding_size": dim,
        "weight": torch.cat([s["weight"] for s in shards]),
    }
    if all("optimizer_state" in s for s in shards):
        opt: Dict[str, Any] = {}
        for key in shards[0]["optimizer_state"]:
            values = [s["optimizer_state"][key] for s in shards]
            per_row = all(torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == s["num_local"]
                          for v, s in zip(values, shards))
            opt[key] = torch.cat(values) if per_row else values[0]
        full["optimizer_state"] = opt
    return full


def _margin_head(partial_fc: torch.nn.Module) -> Optional[torch.nn.Module]:
    head = getattr(partial_fc, "margin_loss", None)
    return head if isinstance(head, torch.nn.Module) else None


def head_state(partial_fc: Optional[torch.nn.Module], opt_fc: Optional[torch.optim.Optimizer]) -> dict:
    """A head's (trainer.heads) state: tensors, which of them are per class, their optimizer state."""
    head = _margin_head(partial_fc) if partial_fc is not None else None
    if head is None:
        return {"state": {}, "per_class": [], "optimizer": {}}
    params = dict(head.named_parameters())
    optimizer = {name: {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                        for k, v in opt_fc.state.get(p, {}).items()}
                 for name, p in params.items() if p in opt_fc.state}
    return {"state": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
            "per_class": list(getattr(head, "per_class_state", ())), "optimizer": optimizer}


def join_head_states(shards: list[dict]) -> dict:
    """Per-class head tensors concatenated in rank order; everything else from rank 0."""
    first = shards[0]
    per_class = set(first["per_class"])
    state = {k: torch.cat([s["state"][k] for s in shards]) if k in per_class else v
             for k, v in first["state"].items()}
    optimizer = {}
    for name, opt_state in first["optimizer"].items():
        optimizer[name] = {}
        for key, value in opt_state.items():
            rows = [s["optimizer"][name][key] for s in shards]
            optimizer[name][key] = torch.cat(rows) if name in per_class and torch.is_tensor(value) \
                and value.dim() >= 1 else value
    return {"state": state, "per_class": first["per_class"], "optimizer": optimizer}


def load_head_state(partial_fc: torch.nn.Module, opt_fc: torch.optim.Optimizer, saved: dict,
                    reshard: bool, num_classes: int) -> None:
    """Puts `head_state()` (this rank's, or with `reshard` the joined one sliced for this rank) back."""
    head = _margin_head(partial_fc)
    if head is None or not saved["state"] and not saved["optimizer"]:
        return
    per_class = set(saved["per_class"])
    rank, world = get_rank(), get_world_size()

    def local(name: str, value):
        if reshard and name in per_class and torch.is_tensor(value) and value.dim() >= 1:
            if value.shape[0] != num_classes:
                raise ValueError(f"head state {name} has {value.shape[0]} rows for {num_classes} classes")
            return slice_rows(value, num_classes, rank, world)
        return value

    head.load_state_dict({k: local(k, v) for k, v in saved["state"].items()})
    params = dict(head.named_parameters())
    for name, opt_state in saved["optimizer"].items():
        if name in params:
            device = params[name].device
            opt_fc.state[params[name]] = {k: local(name, v).clone().to(device) if torch.is_tensor(v) else v
                                          for k, v in opt_state.items()}
