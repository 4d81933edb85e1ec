#!/usr/bin/env python
"""Train a face-recognition backbone with model-parallel Partial FC.

    .venv/bin/python -m torch.distributed.run --nproc_per_node=N trainer/main.py \
        --config trainer/configs/cpu_demo.py --data DATA --output OUT [key=value ...]
    python trainer/main.py ...                        # one process

The backbone is data-parallel (DDP: every rank holds all of it); the classifier is model-parallel (Partial
FC: every rank holds a contiguous block of classes and is never wrapped in DDP). NCCL on GPUs, gloo on CPUs,
env:// rendezvous from torchrun. A run resumes from OUTPUT's last checkpoint by itself (so a worker killed
under `torchrun --max-restarts=K` continues where the checkpoint left off), on any number of ranks.

`train()` reads top to bottom: the checks (the packed data, the config, the resume's config, every val
target read whole; none makes the run folder), data, model + head + optimizers, resume, the loop
(trainer/step.py's `train_step` per optimizer step), the last checkpoint and model.pt.

Exit status: 0 done; 2 bad input (one line on stderr: the project's typed errors, and a ValueError the
readers or the classifier raise on the data, whose traceback goes to training.log); 1 stopped by
non-finite losses.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (torchrun trainer/main.py): make `trainer` and `pipeline` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import logging
import os
import random
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from pipeline.loader import BACKENDS
from pipeline.manifest import MANIFEST, ManifestError, load_manifest
from pipeline.recordio import RecordIOError
from trainer import checkpoint as ckpt
from trainer.backbones import build_backbone
from trainer.config import Config, ConfigError, describe_diff, load_config
from trainer.cuda_flags import apply_cuda_flags, cuda_flags_text
from trainer.distributed import all_reduce_, barrier, get_rank, get_world_size, init_distributed, wrap_ddp
from trainer.early_stop import build_early_stopping
from trainer.ema import ModelEMA
from trainer.eval.images import VerificationError
from trainer.init_weights import load_init_weights
from trainer.logging_utils import MetricsLogger, config_text, require_wandb, setup_logging, truncate_metrics
from trainer.modes import build_mode
from trainer.optim import build_optimizer
from trainer.partial_fc import PartialFC
from trainer.schedule import KINDS as LR_SCHEDULES
from trainer.schedule import LRSchedule, SampleClock
from trainer.step import AMP_DTYPES, StepResult, micro_batches, train_step
from trainer.val_targets import prepare_val_targets, resolve_val_targets

# Bad input that the entry point reports in one line (exit 2), without a traceback: the project's typed
# errors, each naming the file or key and what to do.
INPUT_ERRORS = (ConfigError, ManifestError, RecordIOError, ckpt.CheckpointError, VerificationError)


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Distributed face-recognition training (backbone under DDP, Partial FC head).",
        epilog="Any config key can be overridden as key=value, e.g. lr=0.05 max_steps=100 amp=bf16.")
    parser.add_argument("--config", required=True, help="config module: a path or a name in trainer/configs/")
    parser.add_argument("--data", help="packed dataset folder (docs/design.md section 1); overrides config.data")
    parser.add_argument("--output", help="run folder for checkpoints, model.pt, metrics.jsonl; "
                                         "default runs/<config name>")
    parser.add_argument("--resume", help="checkpoint folder or file, or a run folder (its last checkpoint)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even where the checkpoint's config differs in a key that changes what "
                             "is trained (lr, batch_size, network, ...); same as allow_config_change=true")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_intermixed_args(argv)  # key=value may come before or after the options


# ----------------------------------------------------------------------------------------------- setup
def seed_everything(seed: int, rank: int) -> None:
    # Every rank differs (dropout, sampling) but a run is reproducible; DDP broadcasts rank 0's init.
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def check_config(cfg: Config) -> None:
    """Refuse settings that would only fail later, after the data and the model were loaded."""
    choices = {"amp": AMP_DTYPES, "optimizer": ("sgd", "adamw"), "lr_schedule": LR_SCHEDULES,
               "loader_backend": ("auto",) + BACKENDS}
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {cfg[key]!r}")
    for key in ("batch_size", "gradient_acc", "max_nan_steps", "frequent", "embedding_size"):
        if cfg[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {cfg[key]}")
    if cfg.wandb:
        require_wandb()


def check_data(cfg: Config, world_size: int) -> dict:
    """The packed dataset's manifest; before anything else, a one-line error when --data is not one or
    holds less than one optimizer step."""
    if not cfg.data:
        raise ConfigError("no training data: pass --data DATA (a folder made by `python -m pipeline pack`)")
    data = Path(cfg.data)
    if not data.is_dir():
        raise ConfigError(f"--data {data}: no such folder")
    if not (data / MANIFEST).is_file():
        raise ConfigError(f"--data {data}: no {MANIFEST}: run `python -m pipeline pack` first (this is not a "
                          f"packed dataset, or its pack did not finish)")
    try:
        manifest = load_manifest(data)
    except ManifestError as e:  # not UTF-8, not JSON, or outside the schema of docs/design.md section 1
        raise ConfigError(f"{e}: not a manifest as `python -m pipeline pack` writes it; pack the dataset "
                          f"again") from None
    per_step = cfg.batch_size * cfg.gradient_acc * world_size
    if manifest["num_images"] < per_step:
        raise ConfigError(f"{data} holds {manifest['num_images']} images, less than one optimizer step of "
                          f"{per_step} (batch_size {cfg.batch_size} x gradient_acc {cfg.gradient_acc} x "
                          f"{world_size} ranks): lower batch_size")
    return manifest


def check_val_targets(cfg: Config, output: Path, rank: int, device: torch.device) -> dict[str, Path]:
    """Every val target read once (rank 0, which evaluates), aligned and cached where asked; the other
    ranks stop too when rank 0 finds a problem, instead of waiting for it in the next collective."""
    targets, failed = {}, None
    try:
        targets = prepare_val_targets(cfg, output, progress=cfg.progress_bar) if rank == 0 else \
            resolve_val_targets(cfg)
    except Exception as e:  # raised after the other ranks heard of it
        failed = e
    flag = all_reduce_(torch.tensor([float(failed is not None)], device=device), "max")  # NCCL: on the GPU
    if failed is not None:
        raise failed
    if flag.item() > 0:
        raise ConfigError("rank 0 could not read a val target (its error says which)")
    return targets


def build_loader(cfg: Config, device: torch.device, rank: int, world_size: int):
    """The mode's reader: (images, labels) batches, with the label vectors for AAFace's attributes;
    (images1, images2, identities) pairs for SST."""
    if cfg.mode == "sst":
        from trainer.modes.sst import IdentityPairLoader

        return IdentityPairLoader(cfg.data, cfg.batch_size, rank, world_size, seed=cfg.seed, device=device,
                                  num_workers=cfg.num_threads, augment=cfg.augment, progress=cfg.progress_bar)
    from pipeline.loader import build_train_loader, dali_available

    backend = cfg.loader_backend
    if backend == "auto":
        # nvJPEG through torchvision where no DALI wheel exists for this CUDA/platform
        backend = ("dali" if dali_available() else "nvjpeg") if device.type == "cuda" else "torch"
    return build_train_loader(cfg.data, batch_size=cfg.batch_size, rank=rank, world_size=world_size,
                              seed=cfg.seed, device=device, backend=backend, num_threads=cfg.num_threads,
                              augment=cfg.augment, return_label_vectors=cfg.mode == "aaface",
                              dali_threads=cfg.dali_threads, dali_hw_decoder_load=cfg.dali_hw_decoder_load,
                              dali_dont_use_mmap=cfg.dali_dont_use_mmap, dali_decode_check=cfg.dali_decode_check)


def evaluate(backbone: torch.nn.Module, targets: dict[str, Path], cfg: Config, device: torch.device) -> dict:
    """Verification accuracy on every target (rank 0 only; the backbone is put back in train mode), each
    with its own progress bar."""
    from trainer.eval.pairs import verify
    from trainer.eval.targets import cached_target

    was_training, threads = backbone.training, torch.get_num_threads()
    if device.type == "cpu":
        # The other ranks of this machine wait in a barrier meanwhile: their cores are free.
        torch.set_num_threads(threads * int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    backbone.eval()
    try:
        results = {}
        for name, path in targets.items():
            target = cached_target(path, name=name)  # decoded before the first step
            results[name] = verify(backbone, target, device, cfg.val_batch_size,
                                   progress=cfg.progress_bar).summary()
            results[name]["align_failures"] = target.align_failures
        return results
    finally:
        backbone.train(was_training)
        torch.set_num_threads(threads)


def describe_devices(device: torch.device, world_size: int) -> str:
    if device.type == "cuda":
        return f"{world_size} x {torch.cuda.get_device_name(device)}"
    return f"{world_size} x CPU ({torch.get_num_threads()} threads each)"


def find_resume(resume: Optional[str], cfg: Config, output: Path) -> Optional[Path]:
    """The checkpoint to resume from: --resume, else (auto_resume) this run's own last one, else None."""
    if resume:
        found = ckpt.find_checkpoint(resume)
        if found is None:
            raise ckpt.CheckpointError(f"--resume {resume}: no complete checkpoint there")
        return found
    return ckpt.find_checkpoint(output) if cfg.auto_resume else None


def build_schedule(cfg: Config, clock: SampleClock, step: int,
                   samples_seen: int) -> tuple[LRSchedule, int]:
    """The learning-rate schedule over num_epoch (in this run's optimizer steps; its position is
    clock.position(samples_seen)), and the optimizer step at which this run stops.

    The schedule spans num_epoch; max_steps only stops the run (so a run stopped early and resumed with
    a larger max_steps follows the same schedule as one that never stopped). Without max_steps the run
    stops when num_epoch epochs of samples are seen, however many ranks saw them."""
    schedule = clock.schedule(cfg)
    if cfg.max_steps > 0:
        return schedule, cfg.max_steps
    return schedule, step + clock.steps_left(samples_seen, cfg.num_epoch)


def count_skipped(state: ckpt.TrainState, result: StepResult, step: int, fp16: bool, cfg: Config,
                  logger) -> None:
    """Counts a step `train_step` skipped; raises NonFiniteLossError after max_nan_steps in a row."""
    if not result.skipped:
        state.nan_in_a_row = 0
        return
    if result.loss_finite and fp16:
        state.overflow_steps += 1  # fp16 gradient overflow: the scaler backs off, as usual
        return
    state.nan_steps += 1
    state.nan_in_a_row += 1
    logger.warning("step %d: non-finite %s, step skipped (%d in a row, %d in all)", step,
                   "gradient" if result.loss_finite else "loss", state.nan_in_a_row, state.nan_steps)
    if state.nan_in_a_row >= cfg.max_nan_steps:
        raise NonFiniteLossError(
            f"{state.nan_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
            f"(max_nan_steps={cfg.max_nan_steps}); stopping at step {step}. Lower the lr, "
            f"use amp=bf16 or fp32, or resume from the last checkpoint in {cfg.output}")


def train(cfg: Config, resume: Optional[str] = None) -> dict:
    """The whole run on this rank; returns the last logged record (and the last eval on rank 0)."""
    # 1. distributed, the checks of the data, config, val targets and resume (before anything slow is
    # loaded, and before the run folder is made: a config error leaves no folder behind)
    device, _ = init_distributed()
    rank, world_size = get_rank(), get_world_size()
    logger = setup_logging(None, rank)  # stderr only, until the checks pass
    manifest = check_data(cfg, world_size)
    check_config(cfg)
    output = Path(cfg.output or Path("runs") / cfg.config_name)
    cfg.output = str(output)
    mode = build_mode(cfg)
    stopper = build_early_stopping(cfg)
    amp_dtype = AMP_DTYPES[cfg.amp]
    resume_dir = find_resume(resume, cfg, output)
    config_changes = ckpt.check_resume_config(resume_dir, cfg, cfg.allow_config_change) \
        if resume_dir is not None else {}
    targets = check_val_targets(cfg, output, rank, device)
    logger = setup_logging(output, rank)
    cuda_flags = apply_cuda_flags(cfg, device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(cfg.seed, rank)
    logger.info("config %s:\n%s", cfg.config_name, config_text(cfg))
    logger.info("data %s: %d images, %d identities, %d shards", cfg.data, manifest["num_images"],
                manifest["num_classes"], len(manifest["shards"]))
    logger.info("world size %d, devices: %s; output %s", world_size, describe_devices(device, world_size),
                output.resolve())
    if config_changes:
        logger.warning("resuming with a changed config (allowed): %s", describe_diff(config_changes))

    # 2. data
    loader = build_loader(cfg, device, rank, world_size)
    if not loader.steps_per_epoch or loader.steps_per_epoch < cfg.gradient_acc:
        raise ConfigError(f"{cfg.data} holds {manifest['num_images']} images: less than one optimizer step "
                          f"({cfg.batch_size} x gradient_acc {cfg.gradient_acc} per rank, {world_size} "
                          f"ranks); lower batch_size")
    mode.bind_data(loader)
    num_classes = loader.num_classes

    # 3. model, head, optimizers
    network_kwargs = dict(embedding_size=cfg.embedding_size, dropout=cfg.dropout, **cfg.network_kwargs,
                          **mode.network_kwargs())
    backbone = build_backbone(cfg.network, **network_kwargs)
    if cfg.init_weights:
        logger.info(load_init_weights(backbone, cfg.init_weights))
    backbone = backbone.to(device)
    if cfg.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    # The mode's head: a Partial FC (model-parallel classifier), or a module every rank holds alike (SST).
    head = mode.build_head(backbone, num_classes, world_size).to(device)
    opt_backbone = build_optimizer(cfg, backbone.parameters())
    opt_fc = build_optimizer(cfg, head.parameters(), row_sparse=True) \
        if any(p.requires_grad for p in head.parameters()) else None
    optimizers = [opt for opt in (opt_backbone, opt_fc) if opt is not None]
    scaler = torch.amp.GradScaler(device.type, growth_interval=100) if cfg.amp == "fp16" else None
    # A Partial FC is saved per rank (its shard); another head whole, from rank 0.
    head_parts = dict(partial_fc=head, opt_fc=opt_fc, replicated={}) if isinstance(head, PartialFC) else \
        dict(partial_fc=None, opt_fc=None, replicated={"head": head})
    # The weights' moving average (ema_decay > 0) is what gets evaluated and exported.
    ema = ModelEMA(backbone, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None:
        head_parts["replicated"]["ema"] = ema
    final_backbone = ema.module if ema is not None else backbone

    # 4. resume
    state = ckpt.TrainState(world_size=world_size, samples_seen=0)
    if resume_dir is not None:
        state = ckpt.load_checkpoint(resume_dir, backbone=backbone, opt_backbone=opt_backbone, scaler=scaler,
                                     loader=loader, device=device, **head_parts)
        logger.info("resumed from %s at step %d (saved on %d ranks, now %d)", resume_dir, state.step,
                    state.world_size, world_size)
        if rank == 0:
            dropped = truncate_metrics(output, state.step)
            if dropped:
                logger.info("dropped %d metrics records written after that checkpoint", dropped)
    if rank == 0:
        ckpt.write_config(output, cfg)

    # 5. the loop: schedule, DDP, logging, periodic eval and checkpoints
    ddp_backbone = wrap_ddp(backbone, device)
    samples_per_step = cfg.batch_size * cfg.gradient_acc * world_size
    clock = SampleClock(samples_per_step, loader.steps_per_epoch * cfg.batch_size * world_size)
    if state.samples_seen < 0:  # a checkpoint from before samples were counted: its steps were this size
        state.samples_seen = state.step * samples_per_step
    schedule, total_steps = build_schedule(cfg, clock, state.step, state.samples_seen)
    logger.info("%s: %s, mode %s, on %d rank(s) (%s), %d classes, %d optimizer steps of %d samples, amp=%s",
                cfg.config_name, cfg.network, mode.name, world_size, device.type, num_classes, total_steps,
                samples_per_step, cfg.amp)
    if cuda_flags:
        logger.info("CUDA switches: %s", cuda_flags_text(cuda_flags))
    metrics = MetricsLogger(output, rank, total_steps, state.step, samples_per_step,
                            tensorboard=cfg.tensorboard, progress_bar=cfg.progress_bar, config=cfg,
                            logger=logger)

    def save(step: int) -> None:
        nonlocal last_saved
        state.step, state.epoch, state.total_steps = step, loader.epoch, total_steps
        last_saved = step
        path = ckpt.save_checkpoint(output, state, cfg=cfg, network_kwargs=network_kwargs, backbone=backbone,
                                    opt_backbone=opt_backbone, scaler=scaler, loader=loader,
                                    keep=cfg.keep_checkpoints, **head_parts)
        logger.info("checkpoint %s", path)

    def run_eval(step: int) -> Optional[dict]:
        results = None
        with metrics.paused():  # evaluation time is not training throughput
            if targets and rank == 0:
                t0 = time.perf_counter()
                results = evaluate(final_backbone, targets, cfg, device)
                metrics.eval(step, clock.epoch(state.samples_seen), results)
                summary = ", ".join(f"{k} acc={v['acc']:.4f}+-{v.get('std', 0):.4f}"
                                    for k, v in results.items())
                logger.info("step %d eval (%.1fs): %s", step, time.perf_counter() - t0, summary)
            barrier()  # the other ranks wait while rank 0 evaluates
        return results

    ddp_backbone.train()
    head.train()
    batches = micro_batches(loader)
    step, last_record, last_eval = state.step, None, None
    last_saved = state.step if resume_dir is not None else -1
    epoch_at_start = loader.epoch
    try:
        while step < total_steps:
            lr = schedule.apply(optimizers, clock.position(state.samples_seen))
            epoch_progress = clock.epoch(state.samples_seen)
            stage = mode.begin_step(backbone, head, epoch_progress)
            if stage is not None:
                logger.info("step %d (epoch %.2f): %s stage %r", step, epoch_progress, mode.name, stage)
                # Parameters frozen or thawed: DDP's gradient buckets follow requires_grad.
                ddp_backbone = wrap_ddp(backbone, device)
            group = [next(batches) for _ in range(cfg.gradient_acc)]
            if cfg.channels_last:
                group = [(x.contiguous(memory_format=torch.channels_last), *rest) for x, *rest in group]
            result = train_step(ddp_backbone, head, group, optimizers, scaler, amp_dtype, cfg.clip_grad_norm,
                                objective=mode.loss)
            if not result.skipped:
                mode.end_step(backbone, head)
                if ema is not None:
                    ema.update(backbone)
            step += 1
            state.samples_seen += samples_per_step
            count_skipped(state, result, step, scaler is not None, cfg, logger)
            metrics.step(step, result.loss)

            epoch_done = loader.epoch != epoch_at_start
            if step % cfg.frequent == 0 or step == total_steps:
                skipped_records = all_reduce_(
                    torch.tensor(float(loader.skipped_records), device=device), "sum").item()
                extra = {"nan_steps": state.nan_steps, "skipped_records": int(skipped_records),
                         "grad_norm": result.grad_norm, **result.parts, **mode.log_fields(head)}
                if scaler is not None:
                    extra.update(loss_scale=scaler.get_scale(), overflow_steps=state.overflow_steps)
                last_record = metrics.flush(step, loader.epoch, lr, extra) or last_record
            if cfg.verbose > 0 and step % cfg.verbose == 0 and step < total_steps:
                results = run_eval(step)
                last_eval = results or last_eval
                if stopper is not None and stopper.should_stop(results, device, final_backbone, head):
                    logger.info("step %d: early stop, no better validation accuracy in %d evaluations",
                                step, stopper.patience)
                    break
            periodic = cfg.save_every > 0 and step % cfg.save_every == 0
            if step < total_steps and (periodic or (cfg.save_epoch_end and epoch_done)):
                save(step)
            if epoch_done:
                epoch_at_start = loader.epoch

        # 6. the last checkpoint, model.pt, the final eval
        if last_saved != step:
            save(step)
        if stopper is not None:
            stopper.restore_best(final_backbone)  # after the last checkpoint: model.pt is the best evaluation's
        if rank == 0:
            ckpt.save_model(output / ckpt.MODEL_FILE, final_backbone, cfg.network, network_kwargs,
                            extra={"step": step, "config": cfg.to_dict()})
        last_eval = run_eval(step) or last_eval
    finally:
        metrics.close()
    # every rank met its own corrupt records
    skipped_records = int(all_reduce_(torch.tensor(float(loader.skipped_records), device=device),
                                      "sum").item())
    logger.info("done: %d steps, %d non-finite steps skipped, %d corrupt records skipped; model in %s",
                step, state.nan_steps, skipped_records, output / ckpt.MODEL_FILE)
    return {"record": last_record, "eval": last_eval, "step": step}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        if args.data:
            cfg.data = args.data
        if args.output:
            cfg.output = args.output
        if args.allow_config_change:
            cfg.allow_config_change = True
        train(cfg, args.resume)
        return 0
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        # What the readers and the classifier refuse in the data (a label outside the classes, a record
        # that does not parse): one line here, the traceback in training.log for whoever debugs it.
        logger = logging.getLogger("trainer")
        if logger.handlers:  # set up by train(): the traceback goes to training.log alone
            logger.error("stopped by bad input", exc_info=True, extra={"console": False})
        data = (cfg.data if cfg is not None else "") or "DATA"
        print(f"error: {e} (the data does not fit this run: check it with `python -m pipeline verify "
              f"{data}`, or pack it again)", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
