"""maskgen against MaskTheFace on the same aligned crops: throughput (whole process) and mask quality.

Both tools mask the same N glint24 crops (112x112 PNG, ArcFace-aligned) from a folder into a folder, as
separate processes timed from start to exit. MaskTheFace (dlib 68 landmarks, a template homography) runs
from a scratch checkout outside the repository with its own venv (dlib-bin, face-recognition-models); its
column is skipped when that is absent:

    git checkout of aqeelanwar/MaskTheFace in /tmp/scratch/MaskTheFace, with
    dlib_models/shape_predictor_68_face_landmarks.dat linked from face_recognition_models;
    venv /tmp/scratch/mtf-venv: dlib-bin face-recognition-models dotmap imutils opencv-python-headless
    "numpy<2" pillow tqdm click requests, and face-recognition --no-deps

Quality, for both tools measured the same way: FaceMesh's landmarks on the unmasked crop (no fallback),
the region each tool changed (pixels moved by > 24 levels, closed, holes filled), then
- masked: share of the N crops the tool wrote a masked copy of (maskgen: template fallbacks counted too);
- coverage: share of the lower-face landmarks inside the crop (nose tip and wings, mouth, chin, cheeks)
  in the changed region; for maskgen masks drawn below the nose, the landmarks below the nostrils;
- leaks: eye and brow landmarks in the changed region (summed over all images).

    python bench/maskgen.py -n 300 --workers 2 [--record]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("GLOG_minloglevel", "2")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.peers import REPO, SHARED_DATA, record  # noqa: E402

MTF_DIR = Path("/tmp/scratch/MaskTheFace")
MTF_PYTHON = Path("/tmp/scratch/mtf-venv/bin/python")
MTF_MASKS = "surgical,surgical_blue,surgical_green,N95,KN95,cloth"  # its real masks ('random' may pick none)


def pick_images(src: Path, n: int, dst: Path, seed: int = 0) -> list[Path]:
    files = sorted(src.rglob("*.png"))
    chosen = np.random.default_rng(seed).choice(len(files), size=min(n, len(files)), replace=False)
    dst.mkdir(parents=True)
    out = []
    for k, i in enumerate(sorted(chosen.tolist())):
        target = dst / f"img{k:04d}.png"
        shutil.copy(files[i], target)
        out.append(target)
    return out


def timed(cmd: list, cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and every child it waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def evaluate(originals: list[Path], outputs: dict, low: set, detector) -> dict:
    """outputs: original path -> masked file (absent when the tool made none)."""
    from maskgen import quality

    covers, leaks, found = [], 0, 0
    for path in originals:
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        marks, _ = detector.detect(rgb)
        masked = outputs.get(path)
        if masked is None or marks is None:
            continue
        found += 1
        out = cv2.cvtColor(cv2.imread(str(masked)), cv2.COLOR_BGR2RGB)
        region = quality.changed_region(rgb, out)
        ids = quality.BELOW_NOSE if path in low else quality.LOWER_FACE
        covers.append(quality.coverage(region, marks, ids))
        leaks += quality.leaks(region, marks)
    covers = np.array([c for c in covers if c == c])
    return {"masked": len(outputs) / len(originals), "scored": found,
            "coverage": float(covers.mean()) if covers.size else float("nan"),
            "coverage_min": float(covers.min()) if covers.size else float("nan"), "leaks": leaks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=SHARED_DATA / "glint24")
    ap.add_argument("-n", type=int, default=300, help="images (default 300)")
    ap.add_argument("--workers", type=int, default=2, help="maskgen processes (default 2)")
    ap.add_argument("--mode", default="mixed", choices=("2d", "3d", "mixed"))
    ap.add_argument("--mtf-dir", type=Path, default=MTF_DIR)
    ap.add_argument("--mtf-python", type=Path, default=MTF_PYTHON)
    ap.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    args = ap.parse_args()
    from pipeline.landmarks import FaceMeshDetector

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        originals = pick_images(args.src, args.n, tmp / "in")
        n = len(originals)
        rows = []
        results = {}
        for workers in sorted({1, args.workers}):
            out = tmp / f"ours{workers}"
            t = timed([sys.executable, "-m", "maskgen", "folder", tmp / "in", "--out", out, "--workers", workers,
                       "--mode", args.mode, "--no-progress"], REPO)
            results[f"maskgen, {workers} process{'es' if workers > 1 else ''}"] = (t, out)
        have_mtf = (args.mtf_dir / "mask_the_face.py").exists() and args.mtf_python.exists()
        if have_mtf:
            t = timed([args.mtf_python, "mask_the_face.py", "--path", tmp / "in", "--code", MTF_MASKS],
                      args.mtf_dir)
            results["MaskTheFace (1 process)"] = (t, tmp / "in_masked")

        detector = FaceMeshDetector()
        for name, ((t, cpu), out) in results.items():
            if name.startswith("maskgen"):
                meta = [json.loads(line) for line in (out / "maskgen-meta.jsonl").read_text().splitlines()]
                outputs = {tmp / "in" / m["file"]: out / m["file"] for m in meta if "skipped" not in m}
                low = {tmp / "in" / m["file"] for m in meta if m.get("nose_covered") is False}
                extra = f"{sum(m.get('fallback', False) for m in meta)} fallbacks"
            else:
                outputs = {}
                for f in out.glob("*.png"):
                    outputs[tmp / "in" / (f.name.split("_", 1)[0] + ".png")] = f
                low, extra = set(), ""
            q = evaluate(originals, outputs, low, detector)
            rows.append((name, t, cpu, q, extra))
        detector.close()

    mtf = next(((n / t, n / cpu) for name, t, cpu, _, _ in rows if name.startswith("MaskTheFace")), None)
    table = ("| tool | images | wall (s) | images/s | vs MaskTheFace | CPU (s) | images per CPU-s | vs MaskTheFace "
             "| masked | lower-face coverage mean / min | eye+brow leaks |\n"
             "|---|---|---|---|---|---|---|---|---|---|---|\n")
    for name, t, cpu, q, extra in rows:
        ratio = f"{(n / t) / mtf[0]:.2f}x" if mtf else "-"
        cpu_ratio = f"{(n / cpu) / mtf[1]:.2f}x" if mtf else "-"
        masked = f"{q['masked']:.3f}" + (f" ({extra})" if extra else "")
        table += (f"| {name} | {n} | {t:.1f} | {n / t:.1f} | {ratio} | {cpu:.1f} | {n / cpu:.1f} | {cpu_ratio} | "
                  f"{masked} | {q['coverage']:.3f} / {q['coverage_min']:.3f} | {q['leaks']} |\n")
    if not mtf:
        table += "\nMaskTheFace is not set up (see this script's help): its column is left out.\n"
    print(table)
    if args.record:
        record("maskgen vs MaskTheFace", f"python bench/maskgen.py -n {args.n} --workers {args.workers} "
                                         f"--mode {args.mode}", table)


if __name__ == "__main__":
    main()
