"""Packing throughput: `python -m pipeline pack` against mxnet's `im2rec.py` on the same images.

Both get the same input (glint24, 112x112 PNG, made R times larger with distinct copies so that process
start-up does not dominate), the same number of processes and JPEG quality 95; both must decode PNG and
encode JPEG. The ratio is measured in one run.

    python bench/pack.py --workers 2 --repeat 5 [--record]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.peers import REPO, SHARED_DATA, mxnet_python, record  # noqa: E402


def make_input(src: Path, dst: Path, repeat: int) -> int:
    """`repeat` distinct copies of every image (one pixel changed per copy: no duplicate bytes)."""
    n = 0
    files = sorted(src.rglob("*.png"))
    for r in range(repeat):
        for f in files:
            out = dst / f"{f.parent.name} {r}" / f.name
            out.parent.mkdir(parents=True, exist_ok=True)
            if r == 0:
                shutil.copy(f, out)
            else:
                arr = np.array(Image.open(f))
                arr[0, 0, 0] ^= r
                Image.fromarray(arr).save(out)
            n += 1
    return n


def timed(cmd: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=SHARED_DATA / "glint24")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="alternating timed rounds per tool (best kept)")
    ap.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    args = ap.parse_args()
    mx_py = mxnet_python()
    im2rec = subprocess.run([str(mx_py), "-c", "import mxnet, os; print(os.path.dirname(mxnet.__file__))"],
                            capture_output=True, text=True, check=True).stdout.strip() + "/tools/im2rec.py"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = make_input(args.src, tmp / "src", args.repeat)
        times = {"pack": [], "im2rec": []}
        for r in range(args.rounds):
            shutil.rmtree(tmp / "ours", ignore_errors=True)
            times["pack"].append(timed([sys.executable, "-m", "pipeline", "pack", str(tmp / "src"), "--out",
                                        str(tmp / "ours"), "--workers", str(args.workers), "--no-progress"], REPO))
            for p in tmp.glob("mx.*"):
                p.unlink()
            # im2rec's two steps: the list, then the records (the same work pack does in one command)
            t = timed([str(mx_py), im2rec, "--list", "--recursive", str(tmp / "mx"), str(tmp / "src")], tmp)
            t += timed([str(mx_py), im2rec, "--num-thread", str(args.workers), "--quality", "95",
                        str(tmp / "mx"), str(tmp / "src")], tmp)
            times["im2rec"].append(t)
        ours, theirs = min(times["pack"]), min(times["im2rec"])
    table = ("| tool | images | processes | best wall time (s) | images/s |\n|---|---|---|---|---|\n"
             f"| `python -m pipeline pack` | {n} | {args.workers} | {ours:.2f} | {n / ours:.0f} |\n"
             f"| mxnet 1.9.1 `im2rec.py` (list + rec) | {n} | {args.workers} | {theirs:.2f} | {n / theirs:.0f} |\n"
             f"\npack / im2rec throughput ratio: **{theirs / ours:.2f}x** (goal >= 2x)\n")
    print(table)
    if args.record:
        record("Packing: pipeline pack vs im2rec",
               f"python bench/pack.py --workers {args.workers} --repeat {args.repeat} --rounds {args.rounds}", table)


if __name__ == "__main__":
    main()
