"""Step time and peak memory of the classification layer against the number of classes.

One step = forward (all-gather, cosine logits, ArcFace margin, softmax CE) + backward + SGD step
(momentum 0.9, weight decay 5e-4) of the FC layer alone, on random embeddings. Modes:

    full       one replicated [C, D] classifier per rank (data parallel: its gradient all-reduced)
    pfc<r>     trainer.partial_fc.PartialFC with sample_rate r (r < 1: RowSparseSGD on the sampled rows)
    if<r>      insightface's PartialFC_V2 with sample_rate r, imported from --insightface DIR (the
               column is skipped when DIR is not given); never copied into this repository

Every configuration runs in fresh processes (one per rank, gloo on the CPU, NCCL on CUDA), so that the
peak memory is its own: on CUDA torch.cuda.max_memory_allocated, on the CPU the growth of the resident
set size (peak RSS minus the RSS before the layer was built), the max over ranks.

    python bench/partial_fc.py --classes 1e5 1e6 --world 1 2 \
        --insightface /tmp/scratch/insightface/recognition/arcface_torch
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from trainer.losses import ArcFace  # noqa: E402
from trainer.optim import RowSparseSGD  # noqa: E402
from trainer.partial_fc import PartialFC  # noqa: E402

SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=float, nargs="+", default=[1e5, 1e6],
                   help="numbers of classes (1e5 .. 1e7 where memory allows)")
    p.add_argument("--modes", nargs="+",
                   default=["full", "pfc1.0", "pfc0.3", "pfc0.1", "if1.0", "if0.3", "if0.1"])
    p.add_argument("--world", type=int, nargs="+", default=[1, 2], help="ranks per configuration")
    p.add_argument("--batch", type=int, default=64, help="samples per rank")
    p.add_argument("--dim", type=int, default=512, help="embedding size")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="autocast for the logits matmul (the softmax stays fp32)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per rank (0: cores / world size)")
    p.add_argument("--insightface", type=Path, default=None,
                   help="folder holding insightface's partial_fc_v2.py and losses.py")
    p.add_argument("--pair-modes", nargs="*", default=None,
                   help="pfc modes to time interleaved with insightface's (default: every pfc mode); "
                        "a pair holds both layers in memory at once")
    p.add_argument("--json", type=Path, default=None, help="write every result here as JSON")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reduce_device(backend: str, device: torch.device) -> torch.device:
    """Where a tensor must live for a collective of `backend`: NCCL reduces CUDA tensors only (a CPU tensor
    raises "No backend type associated with device type cpu"), gloo CPU ones."""
    return device if backend == "nccl" else torch.device("cpu")


def max_over_ranks(value: float, device: torch.device) -> float:
    """The largest `value` of any rank, reduced on the process group's device."""
    t = torch.tensor([value], dtype=torch.float64, device=reduce_device(dist.get_backend(), device))
    dist.all_reduce(t, dist.ReduceOp.MAX)
    return t.item()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@contextlib.contextmanager
def cuda_calls_stay_on_cpu(device: str):
    """PartialFC_V2 calls `.cuda()` on its buffers; on a CPU-only run make that a no-op, so that its
    code runs unchanged (its arithmetic does not depend on the device)."""
    if device != "cpu":
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


class FullFC(torch.nn.Module):
    """The baseline: every rank holds all C class centres; plain softmax CE on its own batch."""

    def __init__(self, margin, dim: int, num_classes: int):
        super().__init__()
        self.margin = margin
        self.weight = torch.nn.Parameter(torch.normal(0, 0.01, (num_classes, dim)))

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(emb.float()), F.normalize(self.weight))
        with torch.autocast(emb.device.type, enabled=False):
            return F.cross_entropy(self.margin(cos.float(), labels), labels)


def build_layer(mode: str, num_classes: int, args):
    if mode == "full":
        layer = FullFC(ArcFace(64.0, 0.5), args.dim, num_classes)
        return layer, torch.optim.SGD(layer.parameters(), **SGD)
    rate = float(mode[3:] if mode.startswith("pfc") else mode[2:])
    if mode.startswith("pfc"):
        layer = PartialFC(ArcFace(64.0, 0.5), args.dim, num_classes, sample_rate=rate)
        opt_cls = torch.optim.SGD if rate >= 1.0 else RowSparseSGD
        return layer, opt_cls(layer.parameters(), **SGD)
    sys.path.insert(0, str(args.insightface))
    from losses import CombinedMarginLoss  # insightface's, from --insightface
    from partial_fc_v2 import PartialFC_V2
    layer = PartialFC_V2(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), args.dim, num_classes, rate,
                         fp16=args.amp == "fp16")
    # train_v2.py puts the PFC parameters into the SGD optimizer as a plain dense parameter group.
    return layer, torch.optim.SGD(layer.parameters(), **SGD)


def worker(rank: int, world: int, port: int, modes: list, num_classes: int, args, out: str) -> None:
    """Builds the layer of every mode in `modes` and steps them in turn (interleaved, so that a load
    change on the machine hits them alike); peak memory is meaningful for a single mode only."""
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(1234 + rank)
    batches = [(torch.randn(args.batch, args.dim, generator=gen),
                torch.randint(0, num_classes, (args.batch,), generator=gen))
               for _ in range(args.warmup + args.steps)]
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    with cuda_calls_stay_on_cpu(device.type):
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = rss_bytes()
        layers = {}
        for mode in modes:
            layer, opt = build_layer(mode, num_classes, args)
            layers[mode] = (layer.to(device).train(), opt)
        times = {mode: [] for mode in modes}
        for i, (emb_cpu, labels_cpu) in enumerate(batches):
            for mode, (layer, opt) in layers.items():
                emb = emb_cpu.to(device).requires_grad_(True)
                labels = labels_cpu.to(device)
                autocast = (torch.autocast(device.type, dtype=amp) if amp is not None
                            else contextlib.nullcontext())
                dist.barrier()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with autocast:
                    loss = layer(emb, labels)
                loss.backward()
                if mode == "full" and world > 1:
                    dist.all_reduce(layer.weight.grad)  # data-parallel replicas keep the weight in sync
                    layer.weight.grad.div_(world)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                # a step lasts as long as its slowest rank
                elapsed = max_over_ranks(time.perf_counter() - t0, device)
                if i >= args.warmup:
                    times[mode].append(elapsed)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"{mode}: loss became {loss.item()}")
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = peak_rss_bytes() - base
    peak = max_over_ranks(float(peak), device)
    if rank == 0:
        Path(out).write_text(json.dumps({"times": times, "peak_bytes": peak}))
    dist.destroy_process_group()


def run_config(modes: list, num_classes: int, world: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(worker, args=(world, free_port(), modes, num_classes, args, out), nprocs=world,
                           join=True, start_method="forkserver")
        return json.loads(Path(out).read_text())


def median(xs: list) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


def main(argv=None) -> int:
    args = parse_args(argv)
    modes = [m for m in args.modes if not m.startswith("if") or args.insightface]
    if args.insightface and not (args.insightface / "partial_fc_v2.py").is_file():
        print(f"error: no partial_fc_v2.py in {args.insightface}", file=sys.stderr)
        return 2
    if args.device == "cuda" and max(args.world) > torch.cuda.device_count():
        print(f"error: {max(args.world)} ranks need as many GPUs", file=sys.stderr)
        return 2
    mp.set_forkserver_preload(["torch", "torch._dynamo"])
    # Alone: each mode's peak memory and step time. Paired: ours and insightface's at the same rate
    # stepped in turn in one process group, for a step-time ratio that machine load cannot skew.
    runs = [(w, int(c), (m,)) for w in args.world for c in args.classes for m in modes]
    if args.insightface:
        pair_modes = args.pair_modes if args.pair_modes is not None else modes
        runs += [(w, int(c), (m, "if" + m[3:])) for w in args.world for c in args.classes for m in modes
                 if m.startswith("pfc") and "if" + m[3:] in modes and m in pair_modes]
    results = {}
    for world, classes, group in tqdm(runs, desc="partial_fc bench", unit="run"):
        try:
            r = run_config(list(group), classes, world, args)
        except Exception as exc:  # e.g. out of memory at 1e7 classes: record it, keep going
            r = {"error": str(exc).strip().splitlines()[-1][:200]}
        results[(world, classes, group)] = r
        tqdm.write(json.dumps({"world": world, "classes": classes, "modes": group, **r}))
    print(f"\ndevice {args.device}, batch {args.batch}/rank, dim {args.dim}, amp {args.amp}, "
          f"{args.steps} timed steps (median); peak = max over ranks")
    print("| world | classes | mode | step ms | peak MiB "
          "| step / insightface's (interleaved) | peak / insightface's |")
    print("|---|---|---|---|---|---|---|")
    for (world, classes, group), r in results.items():
        if len(group) != 1:
            continue
        mode = group[0]
        if "error" in r:
            print(f"| {world} | {classes:.0e} | {mode} | failed: {r['error']} | | | |")
            continue
        ratio_t = ratio_m = ""
        pair = results.get((world, classes, (mode, "if" + mode[3:]))) if mode.startswith("pfc") else None
        if pair and "error" not in pair:
            ours, theirs = pair["times"][mode], pair["times"]["if" + mode[3:]]
            ratio_t = f"{median([a / b for a, b in zip(ours, theirs)]):.2f}"
        alone = results.get((world, classes, ("if" + mode[3:],))) if mode.startswith("pfc") else None
        if alone and "error" not in alone:
            ratio_m = f"{r['peak_bytes'] / max(alone['peak_bytes'], 1):.2f}"
        print(f"| {world} | {classes:.0e} | {mode} | {1e3 * median(r['times'][mode]):.0f} | "
              f"{r['peak_bytes'] / 2**20:.0f} | {ratio_t} | {ratio_m} |")
    if args.json:
        rows = [{"world": w, "classes": c, "modes": g, **r} for (w, c, g), r in results.items()]
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
