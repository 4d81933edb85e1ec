#!/usr/bin/env python
"""Throughput of whole training steps: backbone forward/backward + Partial FC + optimizer, synthetic input.

    python bench/train.py --network mbf --batch-size 32                       # CPU, one process
    python bench/train.py --network r50 --batch-size 512 --amp bf16           # one GPU
    .venv/bin/python -m torch.distributed.run --nproc_per_node=8 bench/train.py --network r50 \
        --batch-size 512 --amp bf16

Each step is trainer.step.train_step, the trainer's own step (DDP on the backbone when several ranks,
gradient clipping, the non-finite check), under the trainer's CUDA switches (trainer/cuda_flags.py: the
config's `cudnn_benchmark` and `tf32`, both on by default; `--set tf32=false` to compare). Input is random
images and labels made on the device once, so the figure is the model's and not the reader's. Prints one
JSON line: samples/s per rank and in all, seconds per step, peak memory.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import platform
import resource
import time

import torch
from tqdm import tqdm

from trainer.config import apply_overrides, base_config
from trainer.cuda_flags import apply_cuda_flags
from trainer.distributed import barrier, get_rank, get_world_size, init_distributed, wrap_ddp
from trainer.losses import ArcFace
from trainer.optim import build_optimizer
from trainer.partial_fc import PartialFC
from trainer.step import AMP_DTYPES, train_step


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", default="r50")
    p.add_argument("--batch-size", type=int, default=128, help="per rank")
    p.add_argument("--embedding-size", type=int, default=512)
    p.add_argument("--num-classes", type=int, default=93431, help="MS1MV3's by default")
    p.add_argument("--sample-rate", type=float, default=1.0)
    p.add_argument("--amp", choices=sorted(AMP_DTYPES), default="fp32")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per rank (0: torch's default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="trainer config key over the base config, e.g. cudnn_benchmark=false (repeatable)")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, _ = init_distributed()
    rank, world = get_rank(), get_world_size()
    torch.manual_seed(rank)
    cfg = base_config()
    cfg.update(optimizer=args.optimizer, lr=0.1, momentum=0.9, weight_decay=5e-4, betas=(0.9, 0.999),
               eps=1e-8)
    apply_overrides(cfg, args.set)
    cuda_flags = apply_cuda_flags(cfg, device)  # what the trainer sets, from the same keys

    from trainer.backbones import build_backbone

    backbone = build_backbone(args.network, embedding_size=args.embedding_size).to(device)
    if args.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    model = wrap_ddp(backbone, device)
    if args.compile:
        model = torch.compile(model)
    pfc = PartialFC(ArcFace(), args.embedding_size, args.num_classes,
                    sample_rate=args.sample_rate, embedding_grad_scale=float(world)).to(device)
    optimizers = [build_optimizer(cfg, backbone.parameters()),
                  build_optimizer(cfg, pfc.parameters(), row_sparse=True)]
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None

    images = torch.randn(args.batch_size, 3, 112, 112, device=device).clamp_(-1, 1)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    batch = [(images, labels)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        barrier()

    for _ in tqdm(range(args.warmup), desc="warmup", disable=rank != 0):
        train_step(model, pfc, batch, optimizers, scaler, AMP_DTYPES[args.amp], 5.0)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in tqdm(range(args.steps), desc="timed", disable=rank != 0):
        train_step(model, pfc, batch, optimizers, scaler, AMP_DTYPES[args.amp], 5.0)
    sync()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    per_rank = args.batch_size * args.steps / wall
    result = {
        "network": args.network, "batch_per_rank": args.batch_size, "world_size": world, "amp": args.amp,
        "num_classes": args.num_classes, "sample_rate": args.sample_rate, "channels_last": args.channels_last,
        "compile": args.compile, **cuda_flags, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads/rank)",
        "steps": args.steps, "sec_per_step": wall / args.steps,
        "samples_per_sec_per_rank": per_rank, "samples_per_sec": per_rank * world,
        # CPU time per sample: what the figure would be on an otherwise idle core (shared machines)
        "samples_per_cpu_sec": args.batch_size * args.steps / cpu if device.type == "cpu" else None,
        "peak_memory_gib": (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30,
    }
    if rank == 0:
        print(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
