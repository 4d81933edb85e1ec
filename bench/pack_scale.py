"""Memory and speed of the offline stage against the number of images (issue N: WebFace42M's 42M images).

Generates N distinct 112x112 JPEGs (real glint24 face crops, each with its own faint noise, so that the
bytes differ and maskgen still finds faces), 20 per identity, in an ImageFolder tree; then runs, each as
its own process tree, `pipeline pack`, `pipeline verify`, `maskgen build --ratio 0.05`, one epoch of the
trainer's torch reader (`TorchTrainLoader`) and one of the DALI reader on the CPU, and the readers'
combined index alone (the shard check and DALI's one index). For each: wall time,
images/s, and the peak memory of the whole process tree, polled from /proc: the sum of PSS (shared pages
split between the processes that share them: a forked worker is not counted twice), the anonymous part of
it (without the pages of files a process maps: clean page cache the kernel takes back at will, but counted
in RSS), and the largest single RSS. The slope of peak memory against N, in bytes per image, is the figure
that matters (goal: at most 100).

    python bench/pack_scale.py --sizes 1e4 1e5 1e6 [--workers 2] [--work DIR] [--record]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.peers import REPO, SHARED_DATA  # noqa: E402

PER_IDENTITY = 20
DONE = ".complete"  # written last in a generated tree
LOG = REPO / "bench" / "log" / "pack.md"

_FACES: list = []


def _load_faces(src: Path) -> list[np.ndarray]:
    return [cv2.imread(str(p)) for p in sorted(src.rglob("*.png"))]


def _write_range(args: tuple[Path, int, int, int]) -> int:
    dst, lo, hi, seed = args
    rng = np.random.default_rng([seed, lo])
    for i in range(lo, hi):
        face = _FACES[i % len(_FACES)]
        noise = rng.integers(-2, 3, face.shape, dtype=np.int16)
        img = np.clip(face.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        folder = dst / f"id{i // PER_IDENTITY:07d}"
        folder.mkdir(exist_ok=True)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        (folder / f"{i:08d}.jpg").write_bytes(buf.tobytes())
    return hi - lo


def make_images(dst: Path, n: int, workers: int, src: Path) -> None:
    global _FACES
    _FACES = _load_faces(src)
    if not _FACES:
        raise SystemExit(f"no face crops (*.png) under {src}; give --src")
    dst.mkdir(parents=True)
    step = 5000
    jobs = [(dst, lo, min(lo + step, n), 0) for lo in range(0, n, step)]
    with mp.get_context("fork").Pool(workers) as pool:
        for _ in pool.imap_unordered(_write_range, jobs):
            pass


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _memory(pids: list[int]) -> tuple[int, int, int]:
    """(sum of PSS, sum of anonymous PSS, largest RSS) in bytes over `pids`."""
    pss = anon = rss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss_Anon:"):
                        anon += int(line.split()[1]) * 1024
                    elif line.startswith("Rss:"):
                        rss = max(rss, int(line.split()[1]) * 1024)
        except OSError:
            pass
    return pss, anon, rss


def measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd`; its wall time and the peak memory of its process tree (polled every 0.2 s)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    peak = {"pss": 0, "anon": 0, "rss": 0}

    def poll() -> None:
        while proc.poll() is None:
            for key, value in zip(("pss", "anon", "rss"), _memory(_tree(proc.pid))):
                peak[key] = max(peak[key], value)
            time.sleep(0.2)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:5])} failed:\n{err[-3000:]}")
    return {"s": time.perf_counter() - t, **peak, "stdout": out}


# The readers' combined index alone: every training shard checked (FACETRAIN_CACHE=off: no cached result)
# and DALI's one index for all of them written, as DaliTrainLoader does before DALI starts.
INDEX = """
import sys, tempfile
from pathlib import Path
from pipeline.dali_reader import check_shards, write_combined_index
from pipeline.manifest import load_manifest
data = Path(sys.argv[1])
manifest = load_manifest(data)
checked = check_shards(data, manifest)
with tempfile.TemporaryDirectory() as tmp:
    write_combined_index(data, manifest, checked, Path(tmp) / "all.idx")
print(sum(len(c.offsets) for c in checked))
"""


# The DALI reader on the CPU, one epoch, as the trainer builds it (its shard check and combined index, then
# DALI's own file reads and decoding).
DALI = """
import sys
from pipeline.dali_reader import DaliTrainLoader
n = 0
for images, labels in DaliTrainLoader(sys.argv[1], batch_size=128, num_threads=int(sys.argv[2]), device="cpu",
                                      drop_last=False):
    n += len(labels)
print(n)
"""


# The trainer's torch reader (TorchTrainLoader: its own permutation sampler, batches normalised in the main
# process), one epoch.
LOADER = """
import sys, torch
from pipeline.dataset import TorchTrainLoader
torch.set_num_threads(1)
n = 0
for images, labels in TorchTrainLoader(sys.argv[1], batch_size=128, num_workers=int(sys.argv[2]), drop_last=False):
    n += len(labels)
print(n)
"""


# `python -m trainer.eval --data` (all-pairs 1:1): the smallest real backbone, FaceX-Zoo's MobileFaceNet with
# its input shrunk to 16 px so that 1e5 images embed in minutes on 2 cores, 512-d and untrained (memory
# depends on the number of images and the embedding size, not on the weights).
EVAL_MODEL = """
import sys, torch
from trainer.backbones import build_backbone
from trainer.checkpoint import save_model
kw = {"embedding_size": 512, "resolution": 16}
torch.manual_seed(0)
save_model(sys.argv[1], build_backbone("mbf_facexzoo", **kw), "mbf_facexzoo", kw)
"""


STAGES = ("pack", "verify", "maskgen", "index", "loader", "dali", "eval")


def run_size(n: int, workers: int, tmp: Path, src: Path, stages: tuple[str, ...] = STAGES,
             shard_mb: float = 1024.0) -> dict:
    images, data = tmp / f"img{n}", tmp / f"data{n}"
    t = time.perf_counter()
    if not (images / DONE).is_file():  # --work keeps a finished tree for the next run
        shutil.rmtree(images, ignore_errors=True)
        make_images(images, n, workers, src)
        (images / DONE).touch()
    shutil.rmtree(data, ignore_errors=True)
    gen = time.perf_counter() - t
    py = sys.executable
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = {"n": n, "generate_s": gen}
    res["pack"] = measured([py, "-m", "pipeline", "pack", str(images), "--out", str(data), "--workers",
                            str(workers), "--shard-size", f"{shard_mb:g}", "--no-progress"], env)
    if "verify" in stages:
        res["verify"] = measured([py, "-m", "pipeline", "verify", str(data), "--no-progress"], env)
    if "maskgen" in stages:
        res["maskgen"] = measured([py, "-m", "maskgen", "build", "--data", str(data), "--ratio", "0.05",
                                   "--workers", str(workers), "--shard-size", f"{shard_mb:g}", "--no-progress"],
                                  env)
    if "index" in stages:
        res["index"] = measured([py, "-c", INDEX, str(data)], dict(env, FACETRAIN_CACHE="off"))
    if "loader" in stages:
        res["loader"] = measured([py, "-c", LOADER, str(data), str(workers)], env)
    if "dali" in stages:
        res["dali"] = measured([py, "-c", DALI, str(data), str(workers)], env)
    if "eval" in stages:
        ckpt = tmp / "eval_model.pt"
        if not ckpt.exists():
            subprocess.run([py, "-c", EVAL_MODEL, str(ckpt)], cwd=REPO, check=True)
        res["eval"] = measured([py, "-m", "trainer.eval", "--checkpoint", str(ckpt), "--data", str(data),
                                "--no-progress", "--no-flip", "--device", "cpu", "--workers", str(workers)],
                               dict(env, OMP_NUM_THREADS="2"))
    return res


def table(results: list[dict]) -> str:
    mib = 1 << 20
    lines = ["| stage | images | wall (s) | images/s | peak PSS, tree (MiB) | of it anonymous (MiB) | "
             "largest RSS (MiB) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for st in STAGES:
            if st not in r:
                continue
            m = r[st]
            count = round(0.05 * r["n"]) if st == "maskgen" else r["n"]
            lines.append(f"| {st} | {r['n']} | {m['s']:.1f} | {count / m['s']:.0f} | {m['pss'] / mib:.0f} | "
                         f"{m['anon'] / mib:.0f} | {m['rss'] / mib:.0f} |")
    # The first to the last size, then (with three or more) each size to the next: the last step is the
    # slope once one-off costs (a model loaded, a first shard cut) are in both figures.
    steps = [] if len(results) < 2 else [(results[0], results[-1])] + (
        list(zip(results, results[1:])) if len(results) > 2 else [])
    if steps:
        lines.append("")
    for a, b in steps:
        for key, what in (("pss", "peak PSS"), ("anon", "peak anonymous PSS (file pages mapped from shards left out)")):
            lines.append(f"Slope of {what} from {a['n']} to {b['n']} images, bytes per image (goal <= 100): "
                         + ", ".join(f"{st} {(b[st][key] - a[st][key]) / (b['n'] - a['n']):.0f}"
                                     for st in STAGES if st in a and st in b) + "  ")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES,
                    help="pack always runs (the others read its output)")
    ap.add_argument("--shard-size", type=float, default=1024.0, metavar="MB",
                    help="shard size of pack and maskgen: their per-shard state (~40 bytes a record of the open "
                         "shard) grows with N until the first shard is cut, so a slope measured below one "
                         "shard's worth of images includes it")
    ap.add_argument("--src", type=Path, default=Path(os.environ.get("FACE_DATA", SHARED_DATA)) / "glint24")
    ap.add_argument("--tmp", type=Path, default=None, help="folder for the images and datasets (default: $TMPDIR)")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the generated images in this folder and use them again in later runs (10^6 images "
                         "take minutes to write and to delete); the datasets are made anew each run")
    ap.add_argument("--record", action="store_true", help="append a dated section to bench/log/pack.md")
    args = ap.parse_args()
    results = []
    tmp = args.work or Path(tempfile.mkdtemp(dir=args.tmp, prefix="pack_scale."))
    tmp.mkdir(parents=True, exist_ok=True)
    for n in sorted(int(s) for s in args.sizes):
        results.append(run_size(n, args.workers, tmp, args.src, tuple(args.stages), args.shard_size))
        print(table(results[-1:]), flush=True)
    text = table(results)
    print(text)
    if args.record:
        model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in model.splitlines() if line.startswith("Model name")),
                     "unknown")
        cmd = "python bench/pack_scale.py --sizes " + " ".join(str(int(s)) for s in args.sizes) + \
            f" --workers {args.workers} --shard-size {args.shard_size:g}" + (f" --stages {' '.join(args.stages)}" if len(args.stages) < len(STAGES) else "")
        with open(LOG, "a") as f:
            f.write(f"\n## Memory against dataset size ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)\n\n"
                    f"- machine: {model}, {os.cpu_count()} cores (shared with other jobs)\n- command: `{cmd}`\n\n"
                    f"{text}")
    if args.work is None:
        print(f"removing {tmp} (a million small files take a while)", flush=True)
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
