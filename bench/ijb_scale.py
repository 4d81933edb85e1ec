"""IJB-C at full scale on the CPU, without the images: the protocol's stages on synthetic features of the
release's shape (trainer/ijb.py), in time and peak memory.

IJB-C: 469,375 face lines, 23,124 templates (3,531 gallery templates of G1 + G2, 19,593 probe templates),
15,658,489 template pairs (19,557 genuine). Here each probe template is paired with its subject's gallery
template (genuine) and random gallery templates of other subjects (impostors), the file sorted by its first
template as the release's is; image features are subject centre plus noise, D = 512.

    python bench/ijb_scale.py                    # full scale: parse, pool, score, ROC, 1:N
    python bench/ijb_scale.py --pairs 2000000    # smaller
    [--shuffle] (pairs in random order) [--no-parse] (skip writing and reading the meta files) [--record]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.eval_scale import PeakRSS  # noqa: E402
from bench.peers import record  # noqa: E402
from trainer.eval import ijb  # noqa: E402
from trainer.eval.common import FARS, far_key  # noqa: E402
from trainer.eval.tar_far import tar_at_far  # noqa: E402


def synthetic_ijbc(images: int, gallery: int, probes: int, pairs: int, dim: int, seed: int, shuffle: bool):
    rng = np.random.default_rng(seed)
    n_t = gallery + probes
    subject = np.r_[np.arange(gallery), rng.integers(0, gallery, probes)]  # a gallery template per subject
    tids = np.arange(n_t) + 1
    img_t = np.sort(np.r_[np.arange(n_t), rng.integers(0, n_t, images - n_t)])  # no empty template
    medias = img_t * 4 + rng.integers(0, 4, images)
    centres = rng.standard_normal((gallery, dim), dtype=np.float32)
    feats = np.empty((images, dim), np.float32)
    for a in range(0, images, 65536):
        b = min(a + 65536, images)
        feats[a:b] = centres[subject[img_t[a:b]]] + 12.0 * rng.standard_normal((b - a, dim), dtype=np.float32)
    faceness = rng.uniform(0.5, 1.0, images).astype(np.float32)
    probe_idx = gallery + np.arange(probes)
    g = np.r_[subject[probe_idx], rng.integers(0, gallery, pairs - probes)]  # genuine first
    p = np.r_[probe_idx, rng.integers(gallery, n_t, pairs - probes)]
    label = subject[g] == subject[p]
    order = rng.permutation(pairs) if shuffle else np.argsort(g, kind="stable")
    g, p, label = g[order], p[order], label[order]
    no_points = np.zeros((0, 5, 2), np.float32)
    layout = ijb.IJBLayout(Path("synthetic"), "IJBC", [], tids[img_t], medias, no_points,
                           faceness, tids[g], tids[p], label,
                           [ijb.TemplateSet("G1", tids[:gallery // 2], subject[:gallery // 2]),
                            ijb.TemplateSet("G2", tids[gallery // 2:gallery], subject[gallery // 2:gallery])],
                           ijb.TemplateSet("probe", tids[probe_idx], subject[probe_idx]))
    return layout, feats


def write_meta(root: Path, layout: ijb.IJBLayout) -> None:
    """The release's meta files for a synthetic layout (crops 1.jpg ...; points inside a 200x200 crop)."""
    meta = root / "meta"
    meta.mkdir()
    names = [f"{i + 1}.jpg" for i in range(len(layout.templates))]
    (meta / "ijbc_face_tid_mid.txt").write_text(
        "".join(f"{n} {t} {m}\n" for n, t, m in zip(names, layout.templates.tolist(),
                                                    layout.medias.tolist())))
    pts = np.random.default_rng(1).uniform(20, 180, (len(names), 10))
    rows = np.char.mod("%.3f", np.c_[pts, layout.faceness])
    (meta / "ijbc_name_5pts_score.txt").write_text("".join(n + " " + " ".join(r) + "\n"
                                                           for n, r in zip(names, rows.tolist())))
    table = np.stack([layout.pair_t1, layout.pair_t2, layout.pair_label.astype(np.int64)], axis=1)
    np.savetxt(meta / "ijbc_template_pair_label.txt", table, fmt="%d")
    files = ["1N_gallery_G1", "1N_gallery_G2", "1N_probe_mixed"]
    for ts, file in zip(layout.galleries + [layout.probe], files):
        subject = dict(zip(ts.templates.tolist(), ts.subjects.tolist()))
        lines = [f"{t},{subject[t]},img/{n}\n" for n, t in zip(names, layout.templates.tolist())
                 if t in subject]
        (meta / f"ijbc_{file}.csv").write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + "".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=469375)
    ap.add_argument("--gallery", type=int, default=3531)
    ap.add_argument("--probes", type=int, default=19593)
    ap.add_argument("--pairs", type=int, default=15658489)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--shuffle", action="store_true", help="pairs in random order (the release is sorted)")
    ap.add_argument("--no-parse", action="store_true", help="skip writing and reading the meta files")
    ap.add_argument("--check", action="store_true", help="compare 1M pair scores with a row-wise product")
    ap.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    args = ap.parse_args()
    t0 = time.perf_counter()
    layout, feats = synthetic_ijbc(args.images, args.gallery, args.probes, args.pairs, args.dim, 0,
                                   args.shuffle)
    print(f"synthetic data: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    rows = []

    def stage(name, fn):
        with PeakRSS() as rss:
            t, cpu = time.perf_counter(), time.process_time()
            out = fn()
            dt, cpu = time.perf_counter() - t, time.process_time() - cpu
        rows.append(f"| {name} | {dt:.2f} | {cpu:.2f} | {rss.before:.2f} -> {rss.peak:.2f} |")
        print(rows[-1], file=sys.stderr, flush=True)
        return out

    if not args.no_parse:
        with tempfile.TemporaryDirectory() as tmp:
            write_meta(Path(tmp), layout)
            read = stage(f"read and check the meta files ({args.pairs:,} pairs, {args.images:,} faces)",
                         lambda: ijb.read_layout(tmp, "IJBC"))
            assert np.array_equal(read.pair_t2, layout.pair_t2) and np.array_equal(read.medias, layout.medias)
            assert [len(g.templates) for g in read.galleries] == [len(g.templates) for g in layout.galleries]
            del read
    known, tf = stage(f"pool {args.images:,} image features into templates",
                      lambda: ijb.template_features(feats, layout.faceness, layout.templates, layout.medias))
    r1, r2 = ijb.template_rows(known, layout.pair_t1), ijb.template_rows(known, layout.pair_t2)
    scores = stage(f"score {args.pairs:,} template pairs",
                   lambda: ijb.pair_scores(tf, r1, r2, progress=False))
    roc = stage("ROC and TAR@FAR (eval_ijbc.py rule and strict rule)",
                lambda: (ijb.nearest_tar_at_far(*ijb.insightface_roc(scores, layout.pair_label),
                                                FARS),
                         tar_at_far(scores[layout.pair_label], scores[~layout.pair_label])))
    ident = stage("1:N, G1 and G2 against every probe template",
                  lambda: [ijb.search(known, tf, g, layout.probe) for g in layout.galleries])
    # CPU seconds (all threads) next to the wall clock: on a shared machine the wall clock also counts the
    # time other processes held the cores.
    lines = ["| stage | wall s | CPU s | RSS before -> peak (GiB) |", "|---|---|---|---|"] + rows
    tar = roc[0]
    lines.append("\nTAR@FAR (eval_ijbc.py rule): " + ", ".join(f"{far_key(f)}: {v:.4f}"
                                                               for f, v in tar.items())
                 + f"; rank-1 G1/G2: {ident[0].cmc[0]:.4f} / {ident[1].cmc[0]:.4f}")
    if args.check:
        n = min(1_000_000, args.pairs)
        ref = np.einsum("ij,ij->i", tf[r1[:n]], tf[r2[:n]])
        lines.append(f"\nlargest score difference to a row-wise product on the first {n:,} pairs: "
                     f"{float(np.abs(ref - scores[:n]).max()):.2g}")
    text = "\n".join(lines)
    print(text)
    if args.record:
        command = "python bench/ijb_scale.py " + " ".join(a for a in sys.argv[1:] if a != "--record")
        record("IJB-C protocol at scale (bench/ijb_scale.py)", command.strip(), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
