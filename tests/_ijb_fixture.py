"""A small IJB-format root made of real glint24 faces, laid out as insightface's IJB release.

Each face line gets its own loose crop: an ArcFace-aligned 112x112 glint24 face placed into a wider
canvas (grey noise around it) by a known similarity transform, so that its five points are the template's
points moved by that transform, exactly. Templates hold 1-6 faces of one person over 1-3 media; media ids
are shared between the templates of a person (IJB's videos recur), so pooling must group by (template,
media). 1:N: the first template of each person is its gallery template, persons alternating between
G1 and G2 (S1/S2 for IJB-B); every other template is a mixed probe.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pipeline.landmarks import ARCFACE_112


@dataclass
class IJBFixture:
    root: Path
    name: str
    sources: list[Path] = field(default_factory=list)  # the aligned glint24 face behind each face line
    subject_of_template: dict[int, int] = field(default_factory=dict)


def _loose_crop(face: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(canvas, five points): `face` scaled, rotated and moved into a wider noisy canvas."""
    scale = rng.uniform(1.0, 1.3)
    angle = np.deg2rad(rng.uniform(-15, 15))
    w, h = int(rng.integers(230, 260)), int(rng.integers(240, 270))
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.array([w / 2 + rng.uniform(-8, 8), h / 2 + rng.uniform(-8, 8)])
    m = np.hstack([rot, (centre - rot @ np.array([55.5, 55.5]))[:, None]])
    canvas = rng.integers(90, 170, (h, w, 3), dtype=np.uint8)
    warped = cv2.warpAffine(face, m, (w, h), flags=cv2.INTER_LINEAR)
    inside = cv2.warpAffine(np.full(face.shape[:2], 255, np.uint8), m, (w, h), flags=cv2.INTER_NEAREST)
    canvas[inside > 0] = warped[inside > 0]
    points = ARCFACE_112 @ m[:, :2].T + m[:, 2]
    return canvas, points


def build_ijb(glint24: Path, root: Path, name: str = "IJBC", persons: int = 6, templates_per_person: int = 3,
              seed: int = 0, one_to_n: bool = True) -> IJBFixture:
    rng = np.random.default_rng(seed)
    people = sorted(p for p in glint24.iterdir() if p.is_dir())[:persons]
    meta, crops = root / "meta", root / "loose_crop"
    meta.mkdir(parents=True, exist_ok=True)
    crops.mkdir(exist_ok=True)
    fx = IJBFixture(root, name)
    faces_lines, points_lines = [], []
    csv_rows: dict[int, list[str]] = {}  # template -> its image rows
    order = []  # (person, template id)
    for p, person in enumerate(people):
        photos = sorted(person.glob("*.png"))[:12]
        for k in range(templates_per_person):
            tid = 100 + 7 * (p * templates_per_person + k)  # ids need not be contiguous
            fx.subject_of_template[tid] = 1000 + p
            order.append((p, tid))
            n = int(rng.integers(1, 7))
            n_media = int(rng.integers(1, min(3, n) + 1))
            for j in range(n):
                src = photos[int(rng.integers(len(photos)))]
                face = cv2.imread(str(src), cv2.IMREAD_COLOR)
                canvas, pts = _loose_crop(face, rng)
                line = len(faces_lines) + 1
                image = f"{line}.jpg"
                cv2.imwrite(str(crops / image), canvas, [cv2.IMWRITE_JPEG_QUALITY, 95])
                media = 50 * p + j % n_media  # shared by the person's templates
                faces_lines.append(f"{image} {tid} {media}")
                score = round(float(rng.uniform(0.6, 1.0)), 4)
                points_lines.append(" ".join([image] + [f"{v:.4f}" for v in pts.ravel()] + [str(score)]))
                csv_rows.setdefault(tid, []).append(f"{tid},{1000 + p},img/{image},{line}")
                fx.sources.append(src)
    low = name.lower()
    (meta / f"{low}_face_tid_mid.txt").write_text("\n".join(faces_lines) + "\n")
    (meta / f"{low}_name_5pts_score.txt").write_text("\n".join(points_lines) + "\n")
    tids = [t for _, t in order]
    pairs = [(a, b, int(fx.subject_of_template[a] == fx.subject_of_template[b]))
             for i, a in enumerate(tids) for b in tids[i + 1:]]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    (meta / f"{low}_template_pair_label.txt").write_text("".join(f"{a} {b} {y}\n" for a, b, y in pairs))
    if one_to_n:
        g1, g2 = ("G1", "G2") if name == "IJBC" else ("S1", "S2")
        header = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID\n"
        first = {}
        for p, t in order:
            first.setdefault(p, t)
        files = {g1: [], g2: [], "probe": []}
        for p, t in order:
            key = "probe" if first[p] != t else (g1 if p % 2 == 0 else g2)
            files[key] += csv_rows[t]
        (meta / f"{low}_1N_gallery_{g1}.csv").write_text(header + "\n".join(files[g1]) + "\n")
        (meta / f"{low}_1N_gallery_{g2}.csv").write_text(header + "\n".join(files[g2]) + "\n")
        (meta / f"{low}_1N_probe_mixed.csv").write_text(header + "\n".join(files["probe"]) + "\n")
    return fx
