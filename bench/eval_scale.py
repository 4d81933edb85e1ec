"""Scale of the evaluation metrics: all-to-all 1:1 TAR@FAR on N images, and rank-K identification against
a gallery of G distractors, in time and peak memory (synthetic L2-normalised embeddings, D = 512).

Targets (issue 7): the all-to-all protocol on 100k images, and a top-k over >= 1M gallery embeddings,
both in bounded memory (tiles / chunks), on the GPU or the CPU.

    python bench/eval_scale.py --images 20000 --check        # all-to-all, checked against brute force
    python bench/eval_scale.py --images 100000                # the 100k target (long on a CPU)
    python bench/eval_scale.py --gallery 1000000 --probes 1000 # chunked top-k over a 1M memmap
    [--device cuda] [--tile 2048] [--chunk 65536] [--record]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.peers import record  # noqa: E402
from trainer.eval import identification, tar_far  # noqa: E402
from trainer.eval.common import FARS, l2_normalize, resolve_device  # noqa: E402


def synthetic(n: int, dim: int, per_id: int, seed: int, noise: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of n images of n / per_id identities: identity centre plus noise, normalised."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) // per_id
    out = np.empty((n, dim), np.float32)
    for a in range(0, n, 65536):
        b = min(a + 65536, n)
        centres = np.random.default_rng([seed, 1]).standard_normal((labels[b - 1] + 1, dim), dtype=np.float32)
        out[a:b] = centres[labels[a:b]] + noise * rng.standard_normal((b - a, dim), dtype=np.float32)
    return l2_normalize(out), labels


def _rss() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


class PeakRSS:
    """Highest resident memory (GiB) while the block runs, sampled every 20 ms, and the RSS before it:
    the process-lifetime maximum would also count the synthetic data's generation."""

    def __enter__(self) -> "PeakRSS":
        self.before = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def peak_memory(device: torch.device, rss: PeakRSS) -> str:
    host = f"RSS {rss.before:.2f} -> peak {rss.peak:.2f} GiB"
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU, {host}"
    return host


def bench_all_pairs(args, device) -> str:
    emb, labels = synthetic(args.images, args.dim, args.per_id, seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        r = tar_far.all_pairs_verification(emb, labels, tile=args.tile, device=device, progress=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
    lines = ["| images | pairs | genuine | seconds | Mpairs/s | peak memory | TAR@FAR=1e-6 | 1e-4 | 1e-2 |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| {args.images} | {r.pairs} | {r.n_genuine} | {dt:.1f} | {r.pairs / dt / 1e6:.1f} | "
             f"{peak_memory(device, rss)} | {_tar(r, 1e-6)} | {_tar(r, 1e-4)} | {_tar(r, 1e-2)} |"]
    if args.check:
        s = emb @ emb.T
        i, j = np.triu_indices(len(emb), 1)
        same = labels[i] == labels[j]
        scores = s[i, j]
        ref = tar_far.tar_at_far(scores[same], scores[~same])
        worst = max(abs((r.tar_at_far[f].tar or 0) - (ref[f].tar or 0)) for f in FARS)
        lines.append(f"\nbrute force over the full score matrix: largest TAR difference {worst:.2g}")
    return "\n".join(lines)


def _tar(r, far) -> str:
    t = r.tar_at_far[far].tar
    return "-" if t is None else f"{t:.4f}"


class RowFile:
    """Rows of a float32 .npy file read from disk slice by slice (no memory map: the resident memory then
    shows what the chunked top-k itself holds)."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, _ = read(f)
            self.offset = f.tell()
        self.path, self.shape = path, shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(len(self))
        width = self.shape[1]
        return np.fromfile(self.path, np.float32, count=(stop - start) * width,
                           offset=self.offset + start * width * 4).reshape(-1, width)


def bench_topk(args, device) -> str:
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        path = Path(tmp) / "gallery.npy"
        gallery = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(args.gallery, args.dim))
        rng = np.random.default_rng(1)
        for a in range(0, args.gallery, 131072):
            b = min(a + 131072, args.gallery)
            gallery[a:b] = l2_normalize(rng.standard_normal((b - a, args.dim), dtype=np.float32))
        gallery.flush()
        del gallery
        rows = RowFile(path)
        probes, probe_ids = synthetic(args.probes, args.dim, 5, seed=7)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            r = identification.megaface_cmc(probes, probe_ids, rows, max_rank=args.max_rank, chunk=args.chunk,
                                     device=device)
            dt = time.perf_counter() - t0
        if args.check:
            sub = rows[0:min(args.gallery, 200000)]
            full = torch.topk(torch.from_numpy(probes @ sub.T), args.max_rank, dim=1).values
            mine = identification.chunked_topk(probes, sub, args.max_rank, chunk=args.chunk, device=device,
                                        progress=False)[0]
            ok = torch.allclose(full, mine.cpu())
    lines = ["| gallery | probes | mate pairs | seconds | Mscores/s | peak memory | rank-1 |",
             "|---|---|---|---|---|---|---|",
             f"| {args.gallery} | {args.probes} | {r.n_pairs} | {dt:.1f} | "
             f"{args.gallery * args.probes / dt / 1e6:.0f} | "
             f"{peak_memory(device, rss)} | {r.rank(1):.4f} |"]
    if args.check:
        lines.append(f"\nchunked top-{args.max_rank} equals torch.topk on the first 200k rows: {ok}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=0, help="all-to-all over this many images")
    ap.add_argument("--per-id", type=int, default=10, help="images per identity")
    ap.add_argument("--gallery", type=int, default=0, help="top-k over this many distractors (a disk memmap)")
    ap.add_argument("--probes", type=int, default=1000)
    ap.add_argument("--max-rank", type=int, default=10)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--tile", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--scratch", default=None, help="folder for the temporary gallery file (default: /tmp)")
    ap.add_argument("--check", action="store_true", help="compare with a brute-force computation")
    ap.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    args = ap.parse_args()
    if not args.images and not args.gallery:
        ap.error("give --images N and/or --gallery G")
    device = resolve_device(args.device)
    command = "python bench/eval_scale.py " + " ".join(sys.argv[1:])
    tables = []
    if args.images:
        tables.append(f"All-to-all 1:1 (trainer.eval.tar_far.all_pairs_verification, tile {args.tile}, "
                      f"{device}):\n\n"
                      + bench_all_pairs(args, device))
    if args.gallery:
        tables.append(f"Rank-{args.max_rank} identification against a memmapped gallery "
                      f"(trainer.eval.identification.megaface_cmc, chunk {args.chunk}, {device}):\n\n"
                      + bench_topk(args, device))
    text = "\n\n".join(tables)
    print(text)
    if args.record:
        record("Evaluation metrics at scale (bench/eval_scale.py)", command.replace(" --record", ""), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
