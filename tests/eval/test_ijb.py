"""IJB-B/IJB-C protocols (trainer/ijb.py) on a small IJB root made of real glint24 faces: alignment from the
five given points, pooling, pair scores, the TAR@FAR rule of insightface's eval_ijbc.py and the 1:N
figures, each against a straightforward loop implementation; the command line end to end; bad input."""
from __future__ import annotations

import ast
import json
import os
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests._ijb_fixture import build_ijb
from trainer.eval import __main__ as eval_cli
from trainer.eval import ijb

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fixture(glint24, tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb")
    return build_ijb(glint24, root / "IJBC", persons=8, templates_per_person=4)


@pytest.fixture(scope="module")
def layout(fixture):
    return ijb.read_layout(fixture.root, "IJBC")


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory):
    """A real registered backbone, untrained and tiny (the protocol, not the model, is under test)."""
    from trainer.backbones import build_backbone
    from trainer.checkpoint import save_model

    kwargs = {"embedding_size": 32, "scale": 1, "units": (1, 1, 1, 1), "resolution": 32}
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("ijbmodel") / "model.pt"
    save_model(path, build_backbone("mbf", **kwargs), "mbf", kwargs)
    return path


def _rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


# ------------------------------------------------------------------------------------ brute force


def brute_template_features(features, faceness, templates, medias, norm_score, detector_score):
    """eval_ijbc.py's pooling, one template and one media at a time."""
    out = {}
    for t in sorted(set(templates.tolist())):
        media_feats = []
        for m in sorted(set(medias[templates == t].tolist())):
            rows = []
            for i in np.flatnonzero((templates == t) & (medias == m)):
                x = features[i].astype(np.float64)
                if not norm_score:
                    x = x / np.linalg.norm(x)
                if detector_score:
                    x = x * faceness[i]
                rows.append(x)
            media_feats.append(np.mean(rows, axis=0))
        s = np.sum(media_feats, axis=0)
        out[t] = s / np.linalg.norm(s)
    return out


def brute_nearest_tar(scores, labels, fars):
    """sklearn's roc_curve with drop_intermediate, then eval_ijbc.py's nearest point, by loops."""
    pts = []
    for thr in sorted(set(scores.tolist()), reverse=True):
        accepted = scores >= thr
        pts.append((int(np.sum(accepted & ~labels)), int(np.sum(accepted & labels))))
    kept = [pts[0]]
    for i in range(1, len(pts) - 1):
        (f0, t0), (f1, t1), (f2, t2) = pts[i - 1], pts[i], pts[i + 1]
        if (f2 - f1) != (f1 - f0) or (t2 - t1) != (t1 - t0):
            kept.append(pts[i])
    if len(pts) > 1:
        kept.append(pts[-1])
    curve = [(0.0, 0.0)] + [(f / (~labels).sum(), t / labels.sum()) for f, t in kept]
    out = {}
    for far in fars:
        best = None
        for i, (f, t) in enumerate(reversed(curve)):  # the flipped curve, first nearest wins
            if best is None or abs(f - far) < best[0]:
                best = (abs(f - far), t)
        out[far] = best[1]
    return out


def brute_search(tf, gallery, probe, fpirs, max_rank):
    """Per probe: its best mate's rank among non-mates, and TPIR at FPIR by sorting non-mated tops."""
    ranks, mate_scores, non_mated_tops = [], [], []
    for t, s in zip(probe.templates, probe.subjects):
        scores = [(float(tf[t] @ tf[g]), gs) for g, gs in zip(gallery.templates, gallery.subjects)]
        mates = [x for x, gs in scores if gs == s]
        others = [x for x, gs in scores if gs != s]
        if not mates:
            non_mated_tops.append(max(others))
            continue
        best = max(mates)
        ranks.append(1 + sum(o > best for o in others))
        mate_scores.append(best)
    ranks = np.array(ranks)
    cmc = [float(np.mean(ranks <= r)) for r in range(1, max_rank + 1)]
    tops = sorted(non_mated_tops, reverse=True)
    tpir = {}
    for f in fpirs:
        k = int(np.floor(f * len(tops) * (1 + 1e-9)))
        if k < 1:
            tpir[f] = None
            continue
        thr = tops[k] if k < len(tops) else -np.inf
        tpir[f] = float(np.mean([(r == 1) and (m > thr) for r, m in zip(ranks, mate_scores)]))
    return cmc, tpir


# ------------------------------------------------------------------------------------- the protocol


def test_alignment_recovers_the_aligned_face(fixture, layout):
    """Each loose crop, warped from its five points, is the glint24 face it was made from."""
    diffs = [np.abs(ijb.aligned_crop(layout, i).astype(int) - _rgb(fixture.sources[i])).mean()
             for i in range(0, len(layout.images), 7)]
    other = np.abs(ijb.aligned_crop(layout, 0).astype(int) - _rgb(fixture.sources[1])).mean()
    assert max(diffs) < 6.0  # JPEG and two bilinear resamplings
    assert other > 30.0


def test_layout_reads_the_released_files(fixture, layout):
    assert len(layout.images) == len(fixture.sources)
    assert set(np.unique(layout.templates).tolist()) == set(fixture.subject_of_template)
    assert len(layout.pair_t1) == 32 * 31 // 2
    assert layout.pair_label.sum() == 8 * (4 * 3 // 2)
    assert [g.name for g in layout.galleries] == ["G1", "G2"]
    assert len(layout.probe.templates) == 8 * 3
    for s in layout.galleries + [layout.probe]:
        assert all(fixture.subject_of_template[t] == sub for t, sub in zip(s.templates, s.subjects))


@pytest.mark.parametrize("norm_score,detector_score", [(True, True), (False, True), (True, False),
                                                       (False, False)])
def test_pooling_and_scores_equal_brute_force(layout, norm_score, detector_score):
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((len(layout.images), 24)).astype(np.float32) * rng.uniform(
        0.5, 3, (len(layout.images), 1)).astype(np.float32)
    known, tf = ijb.template_features(feats, layout.faceness, layout.templates, layout.medias, norm_score,
                                      detector_score)
    ref = brute_template_features(feats, layout.faceness, layout.templates, layout.medias, norm_score,
                                  detector_score)
    assert known.tolist() == sorted(ref)
    np.testing.assert_allclose(tf, np.stack([ref[t] for t in known]), atol=1e-6)
    res = ijb.verify_templates(known, tf, layout.pair_t1, layout.pair_t2, layout.pair_label,
                               progress=False)
    want = np.array([ref[a] @ ref[b] for a, b in zip(layout.pair_t1, layout.pair_t2)])
    np.testing.assert_allclose(res.scores, want, atol=1e-6)
    # The TAR rule on the protocol's own scores, against the loops.
    assert res.tar_at_far == brute_nearest_tar(res.scores, layout.pair_label, list(res.tar_at_far))


def test_tar_rule_with_ties_and_collinear_points():
    """Rounded scores make ties and straight runs of the ROC, which sklearn's curve drops."""
    rng = np.random.default_rng(2)
    for trial in range(20):
        n = int(rng.integers(5, 400))
        labels = rng.random(n) < rng.uniform(0.1, 0.6)
        labels[:2] = [True, False]
        scores = np.round(rng.normal(labels * 0.5, 0.4), int(rng.integers(1, 3)))
        fars = (1e-3, 1e-2, 0.05, 1e-1, 0.3)
        fpr, tpr = ijb.insightface_roc(scores, labels)
        assert ijb.nearest_tar_at_far(fpr, tpr, fars) == brute_nearest_tar(scores, labels, fars), trial


@pytest.mark.parametrize("block", [1, 3, 1024])
def test_pair_scores_grid_and_gather_agree(block):
    rng = np.random.default_rng(4)
    feats = rng.standard_normal((300, 32)).astype(np.float32)
    r1 = rng.integers(0, 300, 5000)  # unsorted: scored in sorted order, returned in the given order
    r2 = rng.integers(0, 300, 5000)
    dense = ijb.pair_scores(feats, r1, r2, block=block, progress=False)
    np.testing.assert_allclose(dense, np.einsum("ij,ij->i", feats[r1], feats[r2]), rtol=1e-5, atol=1e-5)
    sparse_r1 = np.sort(rng.integers(0, 300, 40))  # few pairs per row block: the gather path
    np.testing.assert_allclose(ijb.pair_scores(feats, sparse_r1, r2[:40], block=block, progress=False),
                               np.einsum("ij,ij->i", feats[sparse_r1], feats[r2[:40]]), rtol=1e-5, atol=1e-5)


def test_identification_equals_brute_force():
    """Synthetic galleries big enough for FPIR 0.1 and 0.01 to be measurable, a subject with two gallery
    templates, and ties."""
    rng = np.random.default_rng(5)
    n_subj, dim = 60, 8
    centres = rng.standard_normal((n_subj, dim))
    g_subj = np.r_[np.arange(30), [3]]  # G1: subjects 0..29, subject 3 twice
    p_subj = rng.integers(0, n_subj, 400)  # probes of subjects 30..59 are non-mated
    p_subj[:4] = 5
    subj = np.r_[g_subj, p_subj]
    feats = centres[subj] + 1.3 * rng.standard_normal((len(subj), dim))
    # Quarter steps: every dot product is exact in float32 and float64, so ties are ties in both.
    feats = (np.round(feats * 4) / 4).astype(np.float32)
    # Subjects 5 and 6 tie exactly in G1 (a tie goes to the mate), and four probes of subject 5 are that
    # very feature: found at rank 1 with a score that passes the thresholds.
    feats[5] = feats[6] = np.round(3 * centres[5] * 4) / 4
    feats[len(g_subj):len(g_subj) + 4] = feats[5]
    known = np.arange(len(subj)) * 3 + 10
    gallery = ijb.TemplateSet("G1", known[:len(g_subj)], g_subj)
    probe = ijb.TemplateSet("probe", known[len(g_subj):], p_subj)
    got = ijb.search(known, feats, gallery, probe, (1e-2, 1e-1, 0.5), max_rank=10)
    tf = {t: f.astype(np.float64) for t, f in zip(known, feats)}
    cmc, tpir = brute_search(tf, gallery, probe, (1e-2, 1e-1, 0.5), 10)
    np.testing.assert_allclose(got.cmc, cmc)
    assert got.tpir == pytest.approx(tpir)
    assert got.non_mated == int((p_subj >= 30).sum()) and all(v is not None for v in tpir.values())
    both = ijb.identification_summary([got, got])
    assert both["rank1"] == pytest.approx(cmc[0]) and both["rank5"] == pytest.approx(cmc[4])


# ---------------------------------------------------------------------------------- command line


def _eval(capsys, *argv) -> tuple[int, list[str], str]:
    code = eval_cli.main([*argv, "--no-progress", "--workers", "0", "--device", "cpu", "--batch-size", "32"])
    out = capsys.readouterr()
    return code, out.out.strip().splitlines(), out.err


def test_command_line_end_to_end(fixture, layout, model_pt, tmp_path, capsys):
    feats_file, out = tmp_path / "f.npz", tmp_path / "r.json"
    code, lines, err = _eval(capsys, "--checkpoint", str(model_pt), "--ijb", str(fixture.root), "--ijb-set",
                             "IJBC", "--save-features", str(feats_file), "--output", str(out))
    assert code == 0, err
    result = json.loads(lines[-1])
    assert set(result["tar_at_far"]) == {"1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"}
    assert result["pairs"] == len(layout.pair_t1) and result["images"] == len(layout.images)
    assert set(result["tpir_at_fpir"]) == {"1e-2", "1e-1"} and len(result["cmc"]) == 10
    assert set(result["galleries"]) == {"G1", "G2"}
    assert (tmp_path / "r.roc.png").stat().st_size > 0 and (tmp_path / "r.cmc.png").stat().st_size > 0
    assert json.loads(out.read_text())["results"][0]["tar_at_far"] == result["tar_at_far"]
    assert result["features"] == str(feats_file)
    # Without --save-features, --output keeps them beside the results.
    code, lines3, err = _eval(capsys, "--checkpoint", str(model_pt), "--ijb", str(fixture.root), "--output",
                              str(tmp_path / "s.json"))
    assert code == 0, err
    assert json.loads(lines3[-1])["features"] == str(tmp_path / "s.ijbc_features.npz")
    assert (tmp_path / "s.ijbc_features.npz").is_file()

    # The figures follow from the saved features by the brute-force loops.
    with np.load(feats_file) as z:
        feats = z["embeddings"]
    assert feats.shape[0] == len(layout.images)
    ref = brute_template_features(feats, layout.faceness, layout.templates, layout.medias, True, True)
    scores = np.array([ref[a] @ ref[b] for a, b in zip(layout.pair_t1, layout.pair_t2)])
    want = brute_nearest_tar(scores, layout.pair_label, [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    assert list(result["tar_at_far"].values()) == pytest.approx(list(want.values()))
    cmcs, tpirs = zip(*[brute_search(ref, g, layout.probe, (1e-2, 1e-1), 10) for g in layout.galleries])
    np.testing.assert_allclose(result["cmc"], np.mean(cmcs, axis=0))
    assert result["rank1"] == pytest.approx(np.mean([c[0] for c in cmcs]))

    # Re-scoring the saved features gives the same line without embedding.
    code, lines2, err = _eval(capsys, "--checkpoint", str(model_pt), "--ijb", str(fixture.root),
                              "--features", str(feats_file))
    assert code == 0, err
    again = json.loads(lines2[-1])
    assert {k: v for k, v in again.items() if k != "features"} == \
        {k: v for k, v in result.items() if k != "features"}
    code, _, err = _eval(capsys, "--checkpoint", str(model_pt), "--ijb", str(fixture.root), "--features",
                         str(feats_file), "--no-ijb-detector-score", "--no-ijb-norm-score")
    assert code == 0, err


def test_features_are_saved_before_scoring(fixture, model_pt, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise ijb.IJBError("scoring failed")

    monkeypatch.setattr(ijb, "score_layout", boom)
    feats_file = tmp_path / "f.npz"
    code, _, err = _eval(capsys, "--checkpoint", str(model_pt), "--ijb", str(fixture.root), "--save-features",
                         str(feats_file))
    assert code == 2 and "scoring failed" in err
    with np.load(feats_file) as z:
        assert z["embeddings"].shape[0] == len(fixture.sources)


def _broken_copy(fixture, tmp_path) -> Path:
    root = tmp_path / "IJBC"
    shutil.copytree(fixture.root, root)
    return root


def _edit_line(path: Path, lineno: int, edit) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = edit(lines[lineno - 1])
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("fault", ["missing meta", "unknown template", "missing crop", "landmark outside",
                                   "points out of order", "bad label", "1:N unknown template",
                                   "landmark not a number"])
def test_bad_input_is_one_line_naming_file_and_line(fixture, model_pt, tmp_path, capsys, fault):
    root = _broken_copy(fixture, tmp_path)
    meta = root / "meta"
    if fault == "missing meta":
        (meta / "ijbc_template_pair_label.txt").unlink()
        expect = f"{meta / 'ijbc_template_pair_label.txt'}: no such file"
    elif fault == "unknown template":
        _edit_line(meta / "ijbc_template_pair_label.txt", 7, lambda s: "99999 " + s.split(" ", 1)[1])
        expect = f"{meta / 'ijbc_template_pair_label.txt'}:7: template 99999 has no face"
    elif fault == "missing crop":
        (root / "loose_crop" / "5.jpg").unlink()
        expect = f"{root / 'loose_crop' / '5.jpg'}: no such file (line 5 of"
    elif fault == "landmark outside":
        _edit_line(meta / "ijbc_name_5pts_score.txt", 9, lambda s: " ".join(
            [s.split()[0], "-3.0"] + s.split()[2:]))
        expect = f"{meta / 'ijbc_name_5pts_score.txt'}:9: a landmark of 9.jpg lies outside"
    elif fault == "points out of order":
        _edit_line(meta / "ijbc_name_5pts_score.txt", 4, lambda s: "3.jpg " + s.split(" ", 1)[1])
        expect = f"{meta / 'ijbc_name_5pts_score.txt'}:4: image '3.jpg'"
    elif fault == "landmark not a number":
        _edit_line(meta / "ijbc_name_5pts_score.txt", 6, lambda s: " ".join(
            s.split()[:3] + ["abc"] + s.split()[4:]))
        expect = f"{meta / 'ijbc_name_5pts_score.txt'}:6: a landmark or score is not a number"
    elif fault == "bad label":
        _edit_line(meta / "ijbc_template_pair_label.txt", 3, lambda s: s.rsplit(" ", 1)[0] + " 2")
        expect = f"{meta / 'ijbc_template_pair_label.txt'}:3: label 2"
    else:
        _edit_line(meta / "ijbc_1N_probe_mixed.csv", 4, lambda s: "77777," + s.split(",", 1)[1])
        expect = f"{meta / 'ijbc_1N_probe_mixed.csv'}:4: template 77777 has no face"
    code, lines, err = _eval(capsys, "--checkpoint", str(model_pt), "--ijb", str(root), "--save-features",
                             str(tmp_path / "f.npz"))
    assert code == 2
    assert err.count("\n") == 1 and expect in err, err
    assert not (tmp_path / "f.npz").exists()  # stopped before embedding


# ------------------------------------------------------------------------ insightface's own functions


def _insightface_functions(path: Path, names: set[str]) -> dict:
    """Functions of a script that runs on import (eval_ijbc.py), compiled alone from its source."""
    import sklearn.preprocessing  # noqa: F401  (the functions use sklearn.preprocessing.normalize)

    tree = ast.parse(path.read_text())
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    namespace = {"np": np, "sklearn": sys.modules["sklearn"]}
    exec(compile(ast.Module(body=defs, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


@pytest.mark.skipif(not os.environ.get("INSIGHTFACE_ROOT"), reason="set INSIGHTFACE_ROOT to an insightface "
                                                                  "checkout to compare with eval_ijbc.py")
def test_equals_insightface_eval_ijbc(layout):
    pytest.importorskip("sklearn")
    from sklearn.metrics import roc_curve

    script = Path(os.environ["INSIGHTFACE_ROOT"]) / "recognition" / "arcface_torch" / "eval_ijbc.py"
    ns = _insightface_functions(script, {"image2template_feature", "verification"})
    rng = np.random.default_rng(7)
    feats = rng.standard_normal((len(layout.images), 32)).astype(np.float32)
    # eval_ijbc.py's N1 D1 F2 input: features kept as they are, times the detector score.
    ref_tf, ref_known = ns["image2template_feature"](feats * layout.faceness[:, None], layout.templates,
                                                     layout.medias)
    known, tf = ijb.template_features(feats, layout.faceness, layout.templates, layout.medias)
    assert np.array_equal(known, ref_known)
    np.testing.assert_allclose(tf, ref_tf, atol=1e-6)
    ref_scores = ns["verification"](ref_tf, ref_known, layout.pair_t1, layout.pair_t2)
    res = ijb.verify_templates(known, tf, layout.pair_t1, layout.pair_t2, layout.pair_label, progress=False)
    np.testing.assert_allclose(res.scores, ref_scores, atol=1e-6)
    # eval_ijbc.py's table: sklearn's ROC flipped, the first point nearest to each FAR.
    fpr, tpr, _ = roc_curve(layout.pair_label.astype(int), ref_scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    for far, tar in res.tar_at_far.items():
        _, i = min(zip(abs(fpr - far), range(len(fpr))))
        assert tar == tpr[i], far


def test_roc_equals_sklearn_roc_curve():
    """insightface_roc re-implements sklearn's roc_curve (drop_intermediate=True) that eval_ijbc.py calls."""
    metrics_mod = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(8)
    for trial in range(20):
        n = int(rng.integers(3, 2000))
        labels = rng.random(n) < 0.3
        labels[:2] = [True, False]
        scores = np.round(rng.normal(labels * 0.4, 0.3), int(rng.integers(1, 4))).astype(np.float32)
        fpr, tpr, _ = metrics_mod.roc_curve(labels.astype(int), scores)
        got = ijb.insightface_roc(scores, labels)
        assert np.array_equal(got[0], fpr) and np.array_equal(got[1], tpr), trial


def test_ijbb_layout_uses_its_own_names(glint24, tmp_path):
    build_ijb(glint24, tmp_path / "IJBB", name="IJBB", persons=3, templates_per_person=2)
    layout = ijb.read_layout(tmp_path / "IJBB", "IJBB")
    assert [g.name for g in layout.galleries] == ["S1", "S2"] and len(layout.probe.templates) == 3
    with pytest.raises(ijb.IJBError, match="ijbc_face_tid_mid.txt: no such file"):
        ijb.read_layout(tmp_path / "IJBB", "IJBC")
