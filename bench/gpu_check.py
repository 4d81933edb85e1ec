#!/usr/bin/env python
"""Every GPU path of the project in one command, with one table of figures (issue 8).

    python bench/gpu_check.py                    # a CUDA machine: the full sizes below
    python bench/gpu_check.py --record           # ... and append the table to bench/RESULTS.md
    python bench/gpu_check.py --device cpu       # the CPU path: the same code at small sizes, labelled CPU

Checks (`--checks`, all by default):
  dali   the training reader `pipeline.dali_reader.DaliTrainLoader` with device='cuda' (DALI `mixed` decoding:
         nvJPEG plus the hardware JPEG decoder) at hw_decoder_load 0.65 and 0.9, batch 512: real images/s
         delivered as normalised float batches on the GPU.
  nvjpeg the second GPU reader `pipeline.nvjpeg_reader.NvjpegTrainLoader` (torchvision's batched nvJPEG
         decode, flip on the GPU), batch 512 at 112x112: real images/s; goal >= 30,000.
  pfc    `trainer.partial_fc.PartialFC` at 1e6 classes, sample_rate 0.1 and 1.0: time of one step (forward,
         backward, the row-sparse SGD step) and the peak GPU memory it allocates.
  train  IResNet-50 (`trainer.backbones` r50) training samples/s at batch 512 under bf16 autocast: the
         trainer's own `train_step` with Partial FC (93,431 classes, MS1MV3's) and SGD, on a synthetic batch.
  busy   whether the data pipeline keeps the GPU busy: the step time of the same model fed by the trainer's
         reader (`trainer.main.build_loader`, DALI; `--reader torch` for the PyTorch reader where DALI is not
         installed) over its step time on the synthetic batch; goal <= 1.05.
  syncs  host synchronisations per training step (the reader's batch and the trainer's step), counted as the
         warnings of torch.cuda.set_sync_debug_mode("warn") over the last steps of the converge run (torch's
         own syncs; DALI's inside its C++ are not seen); the extra field names where they come from.
  converge  50 steps of the trainer (`ms1mv3_r50`: IResNet-50, batch 512, bf16, Partial FC over the data's
         classes) on the real packed data through the trainer's reader: the loss falls, and never turns NaN.

The model, optimizers and reader come from the trainer's own builders and the `ms1mv3_r50` config (`--config`,
`--set key=value`), so the figures are the trainer's, under the trainer's cuDNN/TF32 switches
(trainer/cuda_flags.py). The data is a packed dataset (`--data`), or `--src` (glint24 by default) packed
into a temporary folder first and its shards replicated (bench/replicate.py) to 8 batches of the largest
batch, so that an epoch is not a single 512-image step; the readers count the real images they deliver.

Without CUDA the same code runs on the CPU at small sizes (DALI device='cpu', a tiny class count), so that it
is tested on machines without a GPU; its table says CPU and its figures are no GPU figures. A check that
fails (say, out of memory, or DALI not installed) is a row with its reason; the others still run, and the exit
status is then 1. A full GPU run is sized to take under 8 minutes on one H100 (the title says how long it
took).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import collections
import contextlib
import gc
import json
import math
import os
import subprocess
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
from tqdm import tqdm

from bench.partial_fc import rss_bytes
from bench.peers import REPO, SHARED_DATA, record
from bench.replicate import replicate_shards
from trainer.cuda_flags import apply_cuda_flags, cuda_flags_text

CHECKS = ("dali", "nvjpeg", "pfc", "train", "busy", "syncs", "converge")
REAL_DATA_CHECKS = ("syncs", "converge")
BUSY_GOAL = 1.05
NVJPEG_GOAL = 30_000  # images/s at 112x112, batch 512, on one H100


@dataclass
class Sizes:
    """What each check runs at; the GPU preset is what issue 8 asks for, the CPU one keeps the check fast."""

    dali_batch: int
    dali_loads: tuple[float, ...]
    dali_batches: int
    nvjpeg_batches: int
    reader_threads: int
    pfc_classes: int
    pfc_batch: int
    pfc_rates: tuple[float, ...]
    network: str
    batch: int
    amp: str
    train_classes: int
    warmup: int
    steps: int
    converge_steps: int
    sync_steps: int  # the last steps of the converge run, counted for host syncs


GPU_SIZES = Sizes(dali_batch=512, dali_loads=(0.65, 0.9), dali_batches=200, nvjpeg_batches=100,
                  reader_threads=4, pfc_classes=1_000_000, pfc_batch=512, pfc_rates=(0.1, 1.0), network="r50",
                  batch=512, amp="bf16", train_classes=93_431, warmup=5, steps=20, converge_steps=50, sync_steps=10)
# DALI's CPU decoder has no hardware-decoder share: one row. fp32, as bf16 autocast on a CPU without bf16
# instructions measures an emulation.
CPU_SIZES = Sizes(dali_batch=32, dali_loads=(), dali_batches=10, nvjpeg_batches=10, reader_threads=2,
                  pfc_classes=10_000, pfc_batch=64, pfc_rates=(0.1, 1.0), network="r50", batch=2,
                  amp="fp32", train_classes=1_000, warmup=1, steps=2, converge_steps=4, sync_steps=2)


@dataclass
class Row:
    check: str
    settings: str
    result: str = ""
    goal: str = ""
    value: Optional[float] = None  # the headline figure: images/s, ms/step, samples/s, or the ratio
    unit: str = ""
    error: Optional[str] = None
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class MemoryMeter:
    """Peak CUDA memory allocated inside the block; on the CPU, the growth of the resident set (the CPU keeps
    no resettable peak), which is what the tensors built inside the block still hold at its end."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.label = "peak allocated" if device.type == "cuda" else "RSS growth"
        self.bytes = 0

    def __enter__(self) -> "MemoryMeter":
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self.bytes = max(0, rss_bytes() - self._base)

    def text(self) -> str:
        return f"{self.label} {self.bytes / 2**30:.2f} GiB"


def timed_steps(step: Callable[[], int], warmup: int, steps: int, device: torch.device,
                desc: str) -> tuple[float, int]:
    """`(seconds, items)` of `steps` calls of `step` (each returns how many items it processed), after
    `warmup` untimed calls."""
    for _ in tqdm(range(warmup), desc=f"{desc} (warm-up)", leave=False):
        step()
    sync(device)
    items = 0
    t0 = time.perf_counter()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        items += step()
    sync(device)
    return time.perf_counter() - t0, items


def explain(exc: BaseException) -> str:
    """One line for the table."""
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").startswith("nvidia"):
        return (f"{exc.name} is not installed (pip install nvidia-dali-cuda120 with a CUDA 12 torch, "
                f"nvidia-dali-cuda130 with CUDA 13)")
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, torch {torch.__version__}"
    threads = torch.get_num_threads()
    return f"CPU, {threads} torch thread{'s' * (threads != 1)}, torch {torch.__version__}"


def load_check_config(args: argparse.Namespace, sizes: Sizes, data: Path):
    """The trainer's config for the training checks: `--config`, then the sizes, then `--set`."""
    from trainer.config import load_config
    from trainer.main import check_config
    from trainer.modes import build_mode

    overrides = [f"network={sizes.network}", f"batch_size={sizes.batch}", f"amp={sizes.amp}",
                 f"loader_backend={args.reader}", f"num_threads={sizes.reader_threads}", "gradient_acc=1",
                 *args.set]
    cfg = load_config(args.config, overrides)
    cfg.data = str(data)
    check_config(cfg)
    build_mode(cfg)  # the mode's own keys (sample_rate, margin_list, ...) checked
    return cfg


# ------------------------------------------------------------------------------------------ checks
# Each measurement runs in its own function, so that a failure (out of memory, say) drops its tensors with its
# frame before the next one starts.
def check_dali(data: Path, device: torch.device, sizes: Sizes) -> list[Row]:
    """The reader alone, one row per hardware-decoder share."""
    rows = []
    for load in sizes.dali_loads or (None,):
        decoder = "mixed" if device.type == "cuda" else "cpu"
        settings = (f"device='{decoder}'" + (f", hw_decoder_load {load}" if load is not None else "")
                    + f", batch {sizes.dali_batch}, {sizes.reader_threads} threads")
        try:
            rows.append(_dali_row(data, device, sizes, load, settings))
        except Exception as exc:  # noqa: BLE001 - a failed setting is a row; the others still run
            rows.append(Row("DALI reader decode", settings, error=explain(exc)))
        release(device)
    return rows


def _dali_row(data: Path, device: torch.device, sizes: Sizes, load: Optional[float], settings: str) -> Row:
    from pipeline.dali_reader import DaliTrainLoader
    from trainer.step import micro_batches

    kwargs = {"hw_decoder_load": load} if load is not None else {}
    # drop_last=False: every real image of an epoch counts, and the last batch's padding does not.
    loader = DaliTrainLoader(data, sizes.dali_batch, device=device, num_threads=sizes.reader_threads,
                             drop_last=False, **kwargs)
    batches = micro_batches(loader)  # across epochs
    secs, images = timed_steps(lambda: next(batches)[0].shape[0], max(2, sizes.warmup), sizes.dali_batches,
                               device, f"dali {settings}")
    rate = images / secs
    return Row("DALI reader decode", f"{settings}; {loader.num_samples} images/epoch",
               f"{num(rate)} images/s", value=rate, unit="images/s",
               extra={"hw_decoder_load": load, "images": images, "seconds": secs})


def check_nvjpeg(data: Path, device: torch.device, sizes: Sizes) -> list[Row]:
    """The nvJPEG reader alone: torchvision's batched GPU decode, flip, normalisation. On the CPU the same
    reader runs with a CPU stand-in decoder (its figure is no nvJPEG figure)."""
    decoder = "nvJPEG (torchvision decode_jpeg on cuda)" if device.type == "cuda" else "CPU stand-in decoder"
    settings = f"{decoder}, batch {sizes.dali_batch}, {sizes.reader_threads} host threads"
    try:
        row = _nvjpeg_row(data, device, sizes, settings)
    except Exception as exc:  # noqa: BLE001 - e.g. no torchvision for this torch: a row, and go on
        row = Row("nvJPEG reader decode", settings, error=explain(exc))
    release(device)
    return [row]


def _nvjpeg_row(data: Path, device: torch.device, sizes: Sizes, settings: str) -> Row:
    from pipeline.nvjpeg_reader import NvjpegTrainLoader, decode_jpeg_cpu
    from trainer.step import micro_batches

    decode = None if device.type == "cuda" else decode_jpeg_cpu
    loader = NvjpegTrainLoader(data, sizes.dali_batch, device=device, num_threads=sizes.reader_threads,
                               augment={"flip": True}, drop_last=False, decode=decode)
    batches = micro_batches(loader)
    secs, images = timed_steps(lambda: next(batches)[0].shape[0], max(2, sizes.warmup), sizes.nvjpeg_batches,
                               device, f"nvjpeg {settings}")
    rate = images / secs
    size = "x".join(str(v) for v in reversed(loader.dataset.manifest["image_size"]))
    if device.type == "cuda":
        goal = f">= {NVJPEG_GOAL:,} images/s: {'met' if rate >= NVJPEG_GOAL else 'MISSED'}"
    else:
        goal = f">= {NVJPEG_GOAL:,} images/s on a GPU"
    return Row("nvJPEG reader decode", f"{settings}; {size}, {loader.num_samples} images/epoch",
               f"{num(rate)} images/s", goal=goal, value=rate, unit="images/s",
               extra={"images": images, "seconds": secs})


def check_partial_fc(device: torch.device, sizes: Sizes, cfg) -> list[Row]:
    """One Partial FC step on one rank (forward, backward, the row-sparse optimizer step), per sample rate."""
    rows = []
    for rate in sizes.pfc_rates:
        settings = (f"{sizes.pfc_classes:,} classes, sample_rate {rate}, batch {sizes.pfc_batch}, "
                    f"dim {cfg.embedding_size}, {sizes.amp}, {cfg.optimizer}")
        try:
            rows.append(_partial_fc_row(device, sizes, cfg, rate, settings))
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory at 1e6 classes: a row, and go on
            rows.append(Row("Partial FC step", settings, error=explain(exc)))
        release(device)
    return rows


def _partial_fc_row(device: torch.device, sizes: Sizes, cfg, rate: float, settings: str) -> Row:
    from trainer.heads import build_margin_loss
    from trainer.optim import build_optimizer
    from trainer.partial_fc import PartialFC
    from trainer.step import AMP_DTYPES

    classes, batch, dim = sizes.pfc_classes, sizes.pfc_batch, cfg.embedding_size
    amp = AMP_DTYPES[sizes.amp]
    gen = torch.Generator(device=device).manual_seed(round(rate * 1000))
    labels = iter([torch.randint(0, classes, (batch,), device=device, generator=gen)
                   for _ in range(sizes.warmup + sizes.steps)])
    embeddings = torch.randn(batch, dim, device=device, generator=gen, requires_grad=True)
    rows_used = []
    with MemoryMeter(device) as memory:
        pfc = PartialFC(build_margin_loss(cfg, classes), dim, classes, sample_rate=rate,
                        seed=cfg.seed).to(device).train()
        optimizer = build_optimizer(cfg, pfc.parameters(), row_sparse=True)

        def step() -> int:
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = pfc(embeddings, next(labels))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            embeddings.grad = None
            rows_used.append(pfc.num_local if pfc.sampled_index is None else pfc.sampled_index.numel())
            return 1

        secs, steps = timed_steps(step, sizes.warmup, sizes.steps, device, f"pfc sample_rate {rate}")
    if not torch.isfinite(pfc.weight).all():
        raise FloatingPointError("the class centres became non-finite")
    ms = 1e3 * secs / steps
    return Row("Partial FC step", f"{settings}; {max(rows_used):,} class rows per step",
               f"{num(ms)} ms/step, {memory.text()}", value=ms, unit="ms/step",
               extra={"sample_rate": rate, "classes": classes, "rows_per_step": max(rows_used),
                      "memory_bytes": memory.bytes, "memory_kind": memory.label})


class TrainingBench:
    """The trainer's model, classifier and optimizers, built by its own functions from `cfg`, and a timer
    for `trainer.step.train_step` fed from any source of batches."""

    def __init__(self, cfg, classes: int, device: torch.device, sizes: Sizes) -> None:
        from trainer.backbones import build_backbone
        from trainer.heads import build_margin_loss
        from trainer.optim import build_optimizer
        from trainer.partial_fc import PartialFC

        self.cfg, self.classes, self.device, self.sizes = cfg, classes, device, sizes
        self.backbone = build_backbone(cfg.network, embedding_size=cfg.embedding_size, dropout=cfg.dropout,
                                       **cfg.network_kwargs).to(device).train()
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.backbone = self.backbone.to(memory_format=self.memory_format)
        self.pfc = PartialFC(build_margin_loss(cfg, classes), cfg.embedding_size, classes,
                             sample_rate=cfg.sample_rate, seed=cfg.seed).to(device).train()
        self.optimizers = [build_optimizer(cfg, self.backbone.parameters()),
                           build_optimizer(cfg, self.pfc.parameters(), row_sparse=True)]
        self.scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.synthetic = (torch.rand(cfg.batch_size, 3, 112, 112, device=device, generator=gen) * 2 - 1,
                          torch.randint(0, classes, (cfg.batch_size,), device=device, generator=gen))

    def train_one(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One `trainer.step.train_step`; its loss."""
        from trainer.step import AMP_DTYPES, train_step

        group = [(images.contiguous(memory_format=self.memory_format), labels)]
        result = train_step(self.backbone, self.pfc, group, self.optimizers, self.scaler,
                            AMP_DTYPES[self.cfg.amp], self.cfg.clip_grad_norm)
        return result.loss

    def step_time(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], warmup: int,
                  desc: str) -> float:
        """Seconds per training step on batches drawn from `batches`."""

        def step() -> int:
            images, labels = next(batches)
            loss = self.train_one(images, labels)
            if not math.isfinite(loss):
                raise FloatingPointError(f"the training loss became {loss}")
            return images.shape[0]

        secs, _ = timed_steps(step, warmup, self.sizes.steps, self.device, desc)
        return secs / self.sizes.steps

    def synthetic_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.synthetic


def check_training(data: Path, device: torch.device, sizes: Sizes, cfg, want: Sequence[str]) -> list[Row]:
    """`train`: the trainer's step on a synthetic batch. `busy`: the same model fed by the trainer's reader,
    timed between two synthetic runs (synthetic, real, synthetic), so that a drift of the clocks cancels."""
    settings = (f"{cfg.network}, batch {cfg.batch_size}, {cfg.amp}, Partial FC {sizes.train_classes:,} "
                f"classes (sample_rate {cfg.sample_rate}), {cfg.optimizer}")
    workers = "threads" if cfg.loader_backend == "dali" else "workers"
    busy_settings = (f"{cfg.loader_backend} reader, {cfg.num_threads} {workers}, vs the synthetic batch; "
                     f"{settings}")
    rows: list[Row] = []
    try:
        with MemoryMeter(device) as memory:
            bench = TrainingBench(cfg, sizes.train_classes, device, sizes)
            t_synthetic = bench.step_time(bench.synthetic_batches(), sizes.warmup, "train, synthetic batch")
    except Exception as exc:  # noqa: BLE001 - a row with the reason; the other checks still run
        if "train" in want:
            rows.append(Row("training step, synthetic batch", settings, error=explain(exc)))
        if "busy" in want:
            rows.append(Row("reader keeps the GPU busy", busy_settings,
                            error=f"the synthetic step it is compared with failed: {explain(exc)}"))
        return rows
    if "train" in want:
        rate = cfg.batch_size / t_synthetic
        rows.append(Row("training step, synthetic batch", settings,
                        f"{num(rate)} samples/s ({num(1e3 * t_synthetic)} ms/step), {memory.text()}",
                        value=rate, unit="samples/s",
                        extra={"step_s": t_synthetic, "memory_bytes": memory.bytes,
                               "memory_kind": memory.label}))
    if "busy" in want:
        try:
            rows.append(_busy_row(bench, data, t_synthetic, busy_settings))
        except Exception as exc:  # noqa: BLE001
            rows.append(Row("reader keeps the GPU busy", busy_settings, error=explain(exc)))
    return rows


def _busy_row(bench: TrainingBench, data: Path, t_synthetic: float, settings: str) -> Row:
    from trainer.main import build_loader
    from trainer.step import micro_batches

    cfg, device = bench.cfg, bench.device
    loader = build_loader(cfg, device, 0, 1)  # what trainer.main.train builds for rank 0 of 1
    if loader.num_classes > bench.classes:
        raise ValueError(f"{data} has {loader.num_classes} classes, more than the classifier's "
                         f"{bench.classes}: raise --train-classes")
    t_real = bench.step_time(micro_batches(loader), bench.sizes.warmup, "train, reader's batches")
    t_synthetic = (t_synthetic + bench.step_time(bench.synthetic_batches(), 0, "train, synthetic again")) / 2
    ratio = t_real / t_synthetic
    if device.type == "cuda":
        goal = f"<= {BUSY_GOAL}: {'met' if ratio <= BUSY_GOAL else 'MISSED'}"
    else:
        goal = f"<= {BUSY_GOAL} on a GPU (on the CPU the reader and the model share the cores)"
    return Row("reader keeps the GPU busy", settings,
               f"{ratio:.3f} (reader {num(1e3 * t_real)} vs synthetic {num(1e3 * t_synthetic)} ms/step)",
               goal=goal, value=ratio, unit="reader/synthetic step time",
               extra={"real_step_s": t_real, "synthetic_step_s": t_synthetic,
                      "images_per_epoch": loader.num_samples})


@contextlib.contextmanager
def host_syncs(device: torch.device, enabled: bool = True):
    """The list of torch's synchronising-call warnings (sync debug mode "warn") raised inside the block;
    None on the CPU, where nothing waits for a device."""
    if device.type != "cuda" or not enabled:
        yield None
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every sync, not one per call site
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode("default")


def check_real_data(data: Path, device: torch.device, sizes: Sizes, cfg, want: Sequence[str]) -> list[Row]:
    """`converge`: the trainer's steps on the real data through the trainer's reader, the loss recorded;
    `syncs`: the host synchronisations of the last `sync_steps` of them (reader batch + step)."""
    steps = sizes.converge_steps if "converge" in want else sizes.warmup + sizes.sync_steps
    settings = (f"{cfg.config_name or 'config'}: {cfg.network}, batch {cfg.batch_size}, {cfg.amp}, "
                f"{cfg.loader_backend} reader, lr {cfg.lr}")
    try:
        return _real_data_rows(data, device, sizes, cfg, want, steps, settings)
    except Exception as exc:  # noqa: BLE001
        return [Row(name, settings, error=explain(exc)) for name, check in
                (("host syncs per step", "syncs"), (f"{steps} training steps on real data", "converge"))
                if check in want]
    finally:
        release(device)


def _real_data_rows(data: Path, device: torch.device, sizes: Sizes, cfg, want: Sequence[str], steps: int,
                    settings: str) -> list[Row]:
    from trainer.main import build_loader
    from trainer.step import micro_batches

    loader = build_loader(cfg, device, 0, 1)
    bench = TrainingBench(cfg, loader.num_classes, device, sizes)
    batches = micro_batches(loader)
    counted = min(sizes.sync_steps, steps)
    losses: list[float] = []
    syncs: list[warnings.WarningMessage] = []
    for i in tqdm(range(steps), desc="train on real data", leave=False):
        with host_syncs(device, enabled="syncs" in want and i >= steps - counted) as caught:
            images, labels = next(batches)
            losses.append(bench.train_one(images, labels))
        if caught is not None:
            syncs += caught
    rows = []
    if "syncs" in want:
        sync_settings = f"last {counted} of {steps} steps; {settings}"
        if device.type == "cuda":
            sites = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
            per_step = len(syncs) / counted
            rows.append(Row("host syncs per step", sync_settings,
                            f"{per_step:.1f} (at {', '.join(f'{k} x{v}' for k, v in sites.most_common(4))})",
                            value=per_step, unit="syncs/step", extra={"sites": dict(sites)}))
        else:
            rows.append(Row("host syncs per step", sync_settings,
                            "not counted: the CPU has no device to wait for", goal="on a GPU"))
    if "converge" in want:
        first, last = losses[: max(1, steps // 5)], losses[-max(1, steps // 5):]
        finite = all(math.isfinite(v) for v in losses)
        falls = finite and sum(last) / len(last) < sum(first) / len(first)
        result = (f"loss {sum(first) / len(first):.3f} (first {len(first)}) -> {sum(last) / len(last):.3f} "
                  f"(last {len(last)}); {'finite' if finite else 'NON-FINITE'}")
        where = "" if device.type == "cuda" else " (CPU: tiny sizes, not the goal's)"
        goal = f"falls, no NaN: {'met' if falls else 'MISSED'}{where}"
        row = Row(f"{steps} training steps on real data", f"{loader.num_classes} classes, "
                  f"{loader.num_samples} images/epoch; {settings}", result, goal=goal,
                  value=sum(last) / len(last), unit="loss", extra={"losses": losses})
        if not finite:
            bad = next(i for i, v in enumerate(losses) if not math.isfinite(v))
            row.error = f"the loss became non-finite at step {bad}"
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ table
def render(rows: list[Row], title: str) -> str:
    lines = [title, "", "| check | settings | result | goal |", "|---|---|---|---|"]
    for r in rows:
        result = f"FAILED: {r.error}" if r.error else r.result
        lines.append(f"| {r.check} | {r.settings} | {result} | {r.goal} |")
    return "\n".join(lines) + "\n"


def pack_source(src: Path, out: Path) -> None:
    if not src.is_dir():
        raise SystemExit(f"error: no source images at {src} (give --src DIR or --data PACKED_DIR)")
    subprocess.run([sys.executable, "-m", "pipeline", "pack", str(src), "--out", str(out), "--no-progress",
                    "--workers", str(min(8, os.cpu_count() or 1))], cwd=REPO, check=True)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: the GPU path where CUDA is available, else the CPU path")
    p.add_argument("--data", type=Path,
                   help="a packed dataset (python -m pipeline pack); default: pack --src")
    p.add_argument("--src", type=Path, default=SHARED_DATA / "glint24", help="images to pack when no --data")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    p.add_argument("--config", default="ms1mv3_r50", help="trainer config for the training checks")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="trainer config override for the training checks (repeatable)")
    p.add_argument("--reader", choices=["dali", "nvjpeg", "torch"], default="dali",
                   help="reader of the busy check (nvjpeg: torchvision on the GPU; torch: PackedDataset + DataLoader workers)")
    g = p.add_argument_group("sizes (defaults: the GPU or the CPU preset)")
    g.add_argument("--dali-batch", type=int)
    g.add_argument("--dali-batches", type=int, help="timed batches per reader setting")
    g.add_argument("--nvjpeg-batches", type=int,
                   help="timed batches of the nvJPEG reader (batch: --dali-batch)")
    g.add_argument("--reader-threads", type=int, help="DALI threads (torch reader: workers)")
    g.add_argument("--pfc-classes", type=int)
    g.add_argument("--pfc-batch", type=int)
    g.add_argument("--network", help="backbone of the training checks (trainer.backbones name)")
    g.add_argument("--batch", type=int, help="training batch")
    g.add_argument("--amp", choices=["fp32", "bf16", "fp16"])
    g.add_argument("--train-classes", type=int, help="Partial FC classes of the training checks")
    g.add_argument("--warmup", type=int, help="untimed steps before each timing")
    g.add_argument("--steps", type=int, help="timed steps per timing")
    g.add_argument("--converge-steps", type=int, help="training steps on the real data")
    g.add_argument("--sync-steps", type=int, help="last steps of those counted for host syncs")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", type=Path, help="also write every row as JSON here")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args(argv)
    args.checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = sorted(set(args.checks) - set(CHECKS))
    if unknown or not args.checks:
        p.error(f"--checks takes a subset of {','.join(CHECKS)}, got {','.join(unknown) or 'nothing'}")
    return args


def sizes_for(args: argparse.Namespace, device: torch.device) -> Sizes:
    base = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    keys = ("dali_batch", "dali_batches", "nvjpeg_batches", "reader_threads", "pfc_classes", "pfc_batch",
            "network", "batch", "amp", "train_classes", "warmup", "steps", "converge_steps", "sync_steps")
    chosen = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    return Sizes(**{**asdict(base), **chosen})


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = sizes_for(args, device)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        started = time.perf_counter()
        data = args.data
        if data is None:
            data = Path(tmp) / "data"
            pack_source(args.src, data)
            replicate_shards(data, 8 * max(sizes.dali_batch, sizes.batch))
        rows: list[Row] = []
        cfg = None
        cuda_flags: dict = {}
        try:
            cfg = load_check_config(args, sizes, data)
            # the trainer's cuDNN/TF32 switches from the same config keys (--set tf32=false to compare)
            cuda_flags = apply_cuda_flags(cfg, device)
        except Exception as exc:  # noqa: BLE001 - the config feeds every check but dali
            for check in [c for c in args.checks if c != "dali"]:
                rows.append(Row(check, f"config {args.config}", error=explain(exc)))
        for check in tqdm(args.checks, desc="gpu check", unit="check"):
            release(device)
            if check == "dali":
                rows += check_dali(data, device, sizes)
            elif check == "nvjpeg":
                rows += check_nvjpeg(data, device, sizes)
            elif cfg is None or check == "busy" and "train" in args.checks:
                continue  # busy is measured together with train
            elif check in REAL_DATA_CHECKS:
                if check == "syncs" and "converge" in args.checks:
                    continue  # counted during the converge run
                wanted = [c for c in args.checks if c in REAL_DATA_CHECKS]
                rows += check_real_data(data, device, sizes, cfg, wanted)
            elif check == "pfc":
                rows += check_partial_fc(device, sizes, cfg)
            else:
                wanted = [c for c in args.checks if c in ("train", "busy")]
                rows += check_training(data, device, sizes, cfg, wanted)

        elapsed = time.perf_counter() - started
    if device.type == "cuda":
        title = f"GPU check on {device_label(device)}"
        if cuda_flags:
            title += f"; {cuda_flags_text(cuda_flags)}"
    else:
        title = f"GPU check, CPU PATH (no CUDA: small sizes; not GPU figures), {device_label(device)}"
    title += f"; {elapsed:.0f} s in all"
    table = render(rows, title)
    print(table)
    if args.json:
        report = {"device": device_label(device), "device_type": device.type, "cuda_flags": cuda_flags,
                  "seconds": elapsed, "sizes": asdict(sizes),
                  "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(report, indent=1))
    if args.record:
        section = "GPU check" if device.type == "cuda" else "GPU check, CPU path (no GPU here)"
        command = ["python bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]
        record(section, " ".join(command), table)
    failed = [r for r in rows if r.error]
    if failed:
        print(f"{len(failed)} of {len(rows)} checks failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
