"""Training checkpoints that resume on any number of ranks, written so that a crash never leaves a torn one.

Layout of OUTPUT/checkpoints/step_00001234/ (one folder per checkpoint):

    train_state.pt      rank 0: step, counters, config, backbone, backbone optimizer, GradScaler, and
                        the replicated modules (a head every rank holds alike, e.g. SST's gallery + queue)
    rank-00000.pt ...   each rank: its Partial FC shard with that shard's optimizer rows, the sampler
                        and RNG states, the data reader's position
    fc_full.pt          rank-free: the whole classifier [num_classes, D] and its per-row optimizer state,
                        assembled by rank 0 from the shard files

Every file is written to a temporary name, fsynced and renamed; the folder is filled as
`step_XXXXXXXX.tmp` and renamed once every rank's file is in, and only then does `checkpoints/latest`
name it. A run killed at any point therefore leaves the previous checkpoint whole and named.
The run folder must be on a file system every rank sees (one machine, or a shared mount).

Resuming on the world size that saved: each rank reads its own shard (and its RNG streams, so the run
continues bit for bit). On another world size: every rank slices its new class range out of
`fc_full.pt` (memory-mapped), and the reader restarts the saved epoch (see pipeline.loader).

The shards' per-class state (Partial FC's rows, a margin head's per-class tensors) is split and joined by
trainer/shard_state.py.

OUTPUT/model.pt holds the backbone alone: {"network", "network_kwargs", "state_dict", "step", "config"};
trainer.model_io.load_backbone rebuilds it.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from pipeline.atomic import atomic_write_bytes, atomic_write_with, fsync_dir
from trainer.distributed import barrier, get_rank, get_world_size
from trainer.shard_state import assemble_full_state, head_state, join_head_states, load_head_state

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAIN_STATE = "train_state.pt"
FC_FULL = "fc_full.pt"
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the model being trained."""


@dataclass
class TrainState:
    """The run's own counters, saved in train_state.pt."""

    step: int = 0  # optimizer steps done (skipped non-finite steps included)
    epoch: int = 0
    total_steps: int = 0
    world_size: int = 1
    # samples the optimizer steps took, all ranks together (the lr schedule's clock: trainer/schedule.py);
    # -1: a checkpoint from before it was counted
    samples_seen: int = -1
    nan_steps: int = 0  # steps skipped for a non-finite loss or gradient, in all
    nan_in_a_row: int = 0
    overflow_steps: int = 0  # fp16 steps skipped because the scaled gradient overflowed


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ------------------------------------------------------------------------------------ atomic files
def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file beside `path`, fsync, rename over it."""
    atomic_write_with(path, lambda f: torch.save(obj, f))


def write_config(output: str | os.PathLike, cfg: dict) -> None:
    atomic_write_bytes(Path(output) / CONFIG_FILE,
                       (json.dumps(dict(cfg), indent=1, default=str) + "\n").encode())


def save_model(path: str | os.PathLike, backbone: torch.nn.Module, network: str, network_kwargs: dict,
               extra: Optional[dict] = None) -> None:
    """The backbone alone, with what rebuilds it: `build_backbone(network, **network_kwargs)`."""
    state_dict = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    obj = {"network": network, "network_kwargs": dict(network_kwargs), "state_dict": state_dict}
    obj.update(extra or {})
    atomic_torch_save(obj, path)


# ------------------------------------------------------------------------------------ RNG streams
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------ save
def save_checkpoint(
    output: str | os.PathLike,
    state: TrainState,
    *,
    cfg: dict,
    network_kwargs: dict,
    backbone: torch.nn.Module,
    partial_fc: Optional[torch.nn.Module],
    opt_backbone: torch.optim.Optimizer,
    opt_fc: Optional[torch.optim.Optimizer],
    scaler: Optional[torch.amp.GradScaler],
    loader,
    keep: int = 2,
    replicated: Optional[dict[str, torch.nn.Module]] = None,
) -> Path:
    """Collective: every rank calls it at the same step. Returns the checkpoint folder.

    `partial_fc` None: a run without a classifier. `replicated`: modules every rank holds alike (saved
    from rank 0, loaded by every rank on any world size)."""
    rank, world = get_rank(), get_world_size()
    root = Path(output) / CHECKPOINTS
    final = root / step_dir_name(state.step)
    tmp = root / f"{final.name}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a run killed while saving
        tmp.mkdir()
    barrier()

    state.world_size = world
    atomic_torch_save({
        "format": FORMAT,
        "rank": rank,
        "world_size": world,
        "fc": partial_fc.local_state(opt_fc) if partial_fc is not None else None,
        "sampler": partial_fc.sampler_state_dict() if partial_fc is not None else None,
        "head": head_state(partial_fc, opt_fc),
        "loader": loader.state_dict(),
        "rng": rng_state(),
    }, tmp / rank_file(rank))
    if rank == 0:
        atomic_torch_save({
            "format": FORMAT,
            "train_state": asdict(state),
            "config": dict(cfg),
            "network": cfg["network"],
            "network_kwargs": dict(network_kwargs),
            "num_classes": partial_fc.num_classes if partial_fc is not None else None,
            "embedding_size": partial_fc.embedding_size if partial_fc is not None else None,
            "backbone": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
            "replicated": {name: {k: v.detach().cpu() for k, v in m.state_dict().items()}
                           for name, m in (replicated or {}).items()},
            "optimizer_backbone": opt_backbone.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
        }, tmp / TRAIN_STATE)
    barrier()

    if rank == 0:
        shards = [torch.load(tmp / rank_file(r), map_location="cpu", mmap=True, weights_only=False)
                  for r in range(world)]
        atomic_torch_save({
            "format": FORMAT,
            "world_size": world,
            "fc": assemble_full_state([s["fc"] for s in shards]) if partial_fc is not None else None,
            "head": join_head_states([s["head"] for s in shards]),
        }, tmp / FC_FULL)
        del shards
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (a resumed run that had already finished)
            old = root / f"{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        fsync_dir(root)
        atomic_write_bytes(root / LATEST, (final.name + "\n").encode())
        _prune(root, keep)
    barrier()
    return final


def _complete_steps(root: Path) -> list[tuple[int, Path]]:
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and is_complete(p):
                found.append((int(m.group(1)), p))
    return sorted(found)


def _prune(root: Path, keep: int) -> None:
    steps = _complete_steps(root)
    for _, path in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for p in root.glob("step_*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------ find / load
def is_complete(path: Path) -> bool:
    if not (path / TRAIN_STATE).is_file() or not (path / FC_FULL).is_file():
        return False
    ranks = sorted(path.glob("rank-*.pt"))
    return len(ranks) > 0 and all((path / rank_file(r)).is_file() for r in range(len(ranks)))


def find_checkpoint(path: str | os.PathLike) -> Optional[Path]:
    """The checkpoint folder that `--resume path` means, or None when there is none.

    `path` may be a checkpoint folder or a file in one, a run folder (OUTPUT) or its checkpoints/
    folder: then the one `latest` names, or the newest complete one when `latest` is unusable.
    """
    p = Path(path)
    if p.is_file():
        if p.name == MODEL_FILE:
            raise CheckpointError(f"{p} holds the backbone alone; resuming needs a checkpoint folder "
                                  f"(OUTPUT or OUTPUT/{CHECKPOINTS}/step_...)")
        p = p.parent
    if not p.is_dir():
        return None
    if is_complete(p):
        return p
    root = p / CHECKPOINTS if (p / CHECKPOINTS).is_dir() else p
    latest = root / LATEST
    if latest.is_file():
        named = root / latest.read_text().strip()
        if named.is_dir() and is_complete(named):
            return named
    steps = _complete_steps(root)
    return steps[-1][1] if steps else None


def saved_config(path: str | os.PathLike) -> dict:
    """The config a checkpoint was trained with (train_state.pt memory-mapped: its weights stay on disk)."""
    path = Path(path)
    try:
        saved = torch.load(path / TRAIN_STATE, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # a torn or foreign file: say which
        raise CheckpointError(f"{path / TRAIN_STATE}: cannot be read ({type(e).__name__}: {e})") from None
    return dict(saved.get("config") or {})


def check_resume_config(path: str | os.PathLike, cfg: dict, allow_change: bool = False) -> dict:
    """Refuse to resume from `path` when its config differs from `cfg` in a key that changes what is
    trained (trainer/config.py's RESUME_FREE_KEYS lists those that may differ); `allow_change` lets it
    through. Returns the differences (for the log)."""
    from trainer.config import config_diff, describe_diff

    diff = config_diff(saved_config(path), cfg)
    if diff and not allow_change:
        raise CheckpointError(f"{path} was trained with another config: {describe_diff(diff)}. Resume with "
                              f"the same settings, pass --allow-config-change (allow_config_change=true) if "
                              f"the change is meant, or start afresh in another --output")
    return diff


def _check_compatible(saved: dict, backbone: torch.nn.Module, partial_fc: Optional[torch.nn.Module],
                      replicated: dict[str, torch.nn.Module], path: Path) -> None:
    if (saved["num_classes"] is None) != (partial_fc is None):
        raise CheckpointError(f"{path} was saved {'without' if saved['num_classes'] is None else 'with'} a "
                              f"classifier, this run has {'none' if partial_fc is None else 'one'} "
                              f"(another training mode?)")
    if partial_fc is not None and (saved["num_classes"] != partial_fc.num_classes
                                   or saved["embedding_size"] != partial_fc.embedding_size):
        raise CheckpointError(
            f"{path} was trained for {saved['num_classes']} classes x {saved['embedding_size']}-d "
            f"embeddings; this run has {partial_fc.num_classes} x {partial_fc.embedding_size} "
            f"(another dataset or config?)")
    current = backbone.state_dict()
    # a backbone whose parameter names changed maps an older state dict itself (ViT: trainer/backbones/vit.py)
    upgrade = getattr(backbone, "upgrade_state_dict", None)
    if upgrade is not None:
        saved["backbone"] = upgrade(saved["backbone"])
    saved_keys, keys = set(saved["backbone"]), set(current)
    if saved_keys != keys:
        raise CheckpointError(f"{path} holds a {saved['network']} backbone whose weights do not fit this "
                              f"one ({len(saved_keys ^ keys)} tensors differ by name)")
    for k, v in saved["backbone"].items():
        if tuple(v.shape) != tuple(current[k].shape):
            raise CheckpointError(f"{path}: backbone tensor {k} is {tuple(v.shape)}, this model's "
                                  f"{tuple(current[k].shape)} (another network or embedding size?)")
    saved_replicated = saved.get("replicated", {})
    if set(saved_replicated) != set(replicated):
        raise CheckpointError(f"{path} holds the modules {sorted(saved_replicated)} beside the backbone, "
                              f"this run {sorted(replicated)} (another training mode, or ema_decay set in "
                              f"one run only?)")


def load_checkpoint(
    path: str | os.PathLike,
    *,
    backbone: torch.nn.Module,
    partial_fc: Optional[torch.nn.Module],
    opt_backbone: torch.optim.Optimizer,
    opt_fc: Optional[torch.optim.Optimizer],
    scaler: Optional[torch.amp.GradScaler],
    loader,
    device: torch.device,
    replicated: Optional[dict[str, torch.nn.Module]] = None,
) -> TrainState:
    """Restores everything `save_checkpoint` wrote into the given (already built) objects."""
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint")
    rank, world = get_rank(), get_world_size()
    saved = torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=False)
    if saved.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {saved.get('format')}, this trainer reads {FORMAT}")
    replicated = replicated or {}
    _check_compatible(saved, backbone, partial_fc, replicated, path)
    backbone.load_state_dict(saved["backbone"])
    for name, module in replicated.items():
        module.load_state_dict(saved["replicated"][name])
    opt_backbone.load_state_dict(saved["optimizer_backbone"])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
    state = TrainState(**saved["train_state"])
    saved_world = state.world_size

    if saved_world == world:
        mine = torch.load(path / rank_file(rank), map_location="cpu", weights_only=False)
        fc = mine["fc"]
        if partial_fc is not None:
            if (fc["class_start"], fc["num_local"]) != (partial_fc.class_start, partial_fc.num_local):
                raise CheckpointError(f"{path}: rank {rank}'s shard covers other classes than this rank's")
            with torch.no_grad():
                partial_fc.weight.copy_(fc["weight"])
            opt_fc.state[partial_fc.weight] = {k: v.clone().to(device) if torch.is_tensor(v) else v
                                               for k, v in fc.get("optimizer_state", {}).items()}
            partial_fc.load_sampler_state_dict(mine["sampler"])
            load_head_state(partial_fc, opt_fc, mine["head"], reshard=False,
                            num_classes=partial_fc.num_classes)
        set_rng_state(mine["rng"])
        loader_state = mine["loader"]
    else:
        if partial_fc is not None:
            full = torch.load(path / FC_FULL, map_location="cpu", mmap=True, weights_only=False)
            try:
                partial_fc.load_full_state(full["fc"], opt_fc)
                load_head_state(partial_fc, opt_fc, full["head"], reshard=True,
                                num_classes=partial_fc.num_classes)
            except ValueError as e:  # a state that does not fit this run's classifier or head
                raise CheckpointError(f"{path / FC_FULL}: {e}") from None
            del full
        # Another world size: the reader restarts the saved epoch, whichever rank's state it gets.
        other = torch.load(path / rank_file(min(rank, saved_world - 1)), map_location="cpu", mmap=True,
                           weights_only=False)
        loader_state = other["loader"]
    loader.load_state_dict(loader_state)
    barrier()
    return state
