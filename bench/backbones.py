"""Size and speed of every registered backbone at 112x112.

For each backbone: parameters, GMACs (counted by trainer.model_io.flops on one image: multiply-adds, the
papers' "GFLOPs"), and images/s of inference (eval, no_grad) and of a training pass (train mode, forward +
backward) at a fixed batch, on the CPU and, when present, on CUDA (bf16 autocast + channels_last there
by default, as the trainer runs). `--compile NAME ...` also times the training pass under torch.compile
for those backbones (compilation time reported separately), to show where it helps.

    python bench/backbones.py                              # every backbone, CPU (and CUDA if present)
    python bench/backbones.py --names ressanet50 vit_t --batch 8 --iters 3 --compile vit_t --record
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.peers import record  # noqa: E402
from trainer.backbones import available_backbones, build_backbone  # noqa: E402
from trainer.backbones.timm_adapter import TimmUnavailable  # noqa: E402
from trainer.model_io.flops import count_gmacs, count_params  # noqa: E402

AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--names", nargs="+", default=None, help="backbones to measure (default: all registered)")
    p.add_argument("--skip", nargs="+", default=["timm"], help="registry names left out (the generic 'timm' "
                                                               "entry needs a model_name)")
    p.add_argument("--devices", nargs="+", default=None, choices=["cpu", "cuda"],
                   help="default: cpu, plus cuda when available")
    p.add_argument("--batch", type=int, default=0, help="images per pass (default: 8 on CPU, 128 on CUDA)")
    p.add_argument("--iters", type=int, default=0, help="timed passes (default: 2 on CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first (CUDA: at least 3)")
    p.add_argument("--amp", choices=sorted(AMP), default=None, help="autocast dtype (default: none on CPU, "
                                                                    "bf16 on CUDA)")
    p.add_argument("--channels-last", choices=["auto", "yes", "no"], default="auto",
                   help="auto: on CUDA only")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--compile", nargs="*", default=[], metavar="NAME",
                   help="also time these backbones' training pass under torch.compile")
    p.add_argument("--no-speed", action="store_true", help="sizes only")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_s(model: torch.nn.Module, x: torch.Tensor, train: bool, amp: Optional[torch.dtype], iters: int,
                 warmup: int) -> float:
    model.train(train)
    proj = torch.randn(x.shape[0], 512, device=x.device)

    def step() -> None:
        with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            if train:
                y = model(x)
                # a projection rather than y.sum(): the closing BatchNorm1d makes the sum's gradient zero
                (y.float() * proj[:, : y.shape[1]]).sum().backward()
            else:
                with torch.no_grad():
                    model(x)

    for _ in range(warmup):
        step()
    sync(x.device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync(x.device)
    return iters * x.shape[0] / (time.perf_counter() - start)


def measure(name: str, device: torch.device, args: argparse.Namespace, amp: Optional[torch.dtype],
            channels_last: bool) -> Dict[str, object]:
    torch.manual_seed(0)
    model = build_backbone(name).to(device)
    row: Dict[str, object] = {}
    batch = args.batch or (128 if device.type == "cuda" else 8)
    iters = args.iters or (10 if device.type == "cuda" else 2)
    warmup = max(args.warmup, 3 if device.type == "cuda" else 0)
    x = torch.randn(batch, 3, 112, 112, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    row["infer"] = images_per_s(model, x, False, amp, iters, warmup)
    row["train"] = images_per_s(model, x, True, amp, iters, warmup)
    if name in args.compile:
        compiled = torch.compile(model)
        start = time.perf_counter()
        images_per_s(compiled, x, True, amp, 1, 0)  # the first call compiles forward and backward
        row["compile_s"] = time.perf_counter() - start
        row["train_compiled"] = images_per_s(compiled, x, True, amp, iters, warmup)
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        torch.cuda.reset_peak_memory_stats(device)
    del model
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.names or [n for n in available_backbones() if n not in args.skip]
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        print("bench/backbones.py: --devices cuda but CUDA is not available", file=sys.stderr)
        return 2
    rows: List[Dict[str, object]] = []
    # A timeout's SIGTERM or a Ctrl-C ends the loop but still prints (and records) the rows measured so far.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    interrupted = False
    try:
        measure_all(names, devices, args, rows)
    except KeyboardInterrupt:
        interrupted = True
    table = format_table(rows, devices if not args.no_speed else [], args)
    if interrupted:
        table += f"\ninterrupted (timeout or Ctrl-C) after {len(rows)} of {len(names)} backbones."
    print(table)
    if args.record:
        record("Backbones: size and images/s at 112x112", "python bench/backbones.py " + " ".join(sys.argv[1:]),
               table)
    return 0


def measure_all(names: List[str], devices: List[str], args: argparse.Namespace, rows: List[Dict[str, object]]
                ) -> None:
    for name in tqdm(names, desc="backbones", unit="model"):
        try:
            with torch.device("meta"):
                sized = build_backbone(name)
        except TimmUnavailable as exc:
            tqdm.write(f"{name}: skipped ({exc})")
            continue
        row: Dict[str, object] = {"name": name, "params_m": count_params(sized) / 1e6, "gmacs": count_gmacs(sized)}
        del sized
        if not args.no_speed:
            for dev in devices:
                device = torch.device(dev)
                amp = AMP[args.amp] if args.amp else (torch.bfloat16 if dev == "cuda" else None)
                cl = args.channels_last == "yes" or (args.channels_last == "auto" and dev == "cuda")
                for key, value in measure(name, device, args, amp, cl).items():
                    row[f"{dev}_{key}"] = value
        rows.append(row)
        tqdm.write(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


def format_table(rows: List[Dict[str, object]], devices: List[str], args: argparse.Namespace) -> str:
    cols = [("backbone", "name", "{}"), ("params (M)", "params_m", "{:.2f}"), ("GMACs", "gmacs", "{:.3f}")]
    for dev in devices:
        amp = args.amp or ("bf16" if dev == "cuda" else "none")
        tag = f"{dev}, amp {amp}"
        cols += [(f"infer img/s ({tag})", f"{dev}_infer", "{:.1f}"), (f"train img/s ({tag})", f"{dev}_train", "{:.1f}")]
        if any(f"{dev}_train_compiled" in r for r in rows):
            cols += [(f"train img/s compiled ({dev})", f"{dev}_train_compiled", "{:.1f}"),
                     (f"compile s ({dev})", f"{dev}_compile_s", "{:.0f}")]
        if dev == "cuda":
            cols.append(("peak GiB (cuda)", "cuda_peak_gib", "{:.2f}"))
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[key]) if key in r else "-" for _, key, fmt in cols) + " |")
    batch = args.batch or "8 (CPU) / 128 (CUDA)"
    lines.append(f"\nbatch {batch}; GMACs: multiply-adds of one 112x112 image (conv, linear, matmul, attention).")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
