"""The packed labelled set protocols of `python -m trainer.eval --data`: all-to-all 1:1 verification
(every genuine against every impostor pair, MFR challenge), maskgen's masked copies as probes against the
unmasked gallery (ResSaNet, MFR) per mask type, and rank-K identification (MegaFace) against a
distractor gallery."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.imageio import ImageRejected, decode_jpeg_rgb
from pipeline.manifest import decode_identity
from pipeline.recordio import RecordIOError
from trainer.eval.common import EvalError, far_key, l2_normalize, narrow_ints
from trainer.eval.embedding import embed_dataset
from trainer.eval.folder import embed_folder, load_npz
from trainer.eval.identification import CMCResult, megaface_cmc
from trainer.eval.images import IMAGE_SIZE
from trainer.eval.kfold import majority_accuracy
from trainer.eval.rowfile import release, row_file
from trainer.eval.tar_far import AllPairsResult, all_pairs_verification


@dataclass
class PackedSetInfo:
    """Per embedded record of a packed set (records that did not decode are left out and counted)."""

    # Integer columns are int32 where every value fits, else int64 (common.narrow_ints).
    identity: np.ndarray
    masked: np.ndarray  # bool
    mask_type: np.ndarray  # 0 when the dataset has no such field
    ids: np.ndarray  # record id
    source_ids: np.ndarray  # id2: the source photo of a masked copy, 0 otherwise
    skipped: int
    mask_type_names: dict[int, str]  # from maskgen's manifest entry: 1 -> "surgical", ...


class _Records(Dataset):
    """(uint8 crop, identity, masked, mask_type, id, id2, ok) per record of a PackedDataset."""

    def __init__(self, data_dir: str, holdout: bool, val: bool = False) -> None:
        from pipeline.dataset import PackedDataset

        self.ds = PackedDataset(data_dir, kinds=("train", "masked"), holdout=holdout, val=val, raw=True)
        fields = self.ds.label_fields
        self.masked_at = fields.index("masked") if "masked" in fields else None
        self.type_at = fields.index("mask_type") if "mask_type" in fields else None

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        blank = np.zeros((IMAGE_SIZE[1], IMAGE_SIZE[0], 3), np.uint8)
        try:
            header, payload = self.ds.read_record(i)
            rgb = decode_jpeg_rgb(payload)
        except (ImageRejected, RecordIOError):
            return blank, -1, False, 0, 0, 0, False
        if rgb.shape[:2] != blank.shape[:2]:
            return blank, -1, False, 0, 0, 0, False
        vec = self.ds.label_vector(header)
        identity = int(decode_identity(vec, self.ds.label_fields))
        masked = bool(vec[self.masked_at]) if self.masked_at is not None else False
        mask_type = int(vec[self.type_at]) if self.type_at is not None else 0
        return rgb, identity, masked, mask_type, int(header.id), int(header.id2), True


def embed_packed(model: torch.nn.Module, data_dir: str, device: torch.device, batch_size: int, flip: bool,
                 holdout: bool = False, workers: int = 2, progress: bool = True, val: bool = False,
                 normalize: bool = True, folder: Optional[str | os.PathLike] = None
                 ) -> tuple[np.ndarray, PackedSetInfo]:
    """Flip-test embeddings (L2-normalised unless `normalize` is False: then the sum of the two views) of
    every record of a packed set that decoded (its held-out shards with `holdout`, its validation shards
    with `val`), and what each record is. The rows are a file-backed array (embed_dataset)."""
    records = _Records(data_dir, holdout, val)
    if len(records) == 0:
        which = "held-out" if holdout else "val" if val else "train/masked"
        raise EvalError(f"{data_dir}: no records in the {which} shards")
    emb, cols = embed_dataset(model, records, device, batch_size, flip, normalize=normalize, workers=workers,
                              progress=progress, desc=f"embed {Path(data_dir).name}", keep=lambda c: c[-1],
                              folder=folder)
    identity, masked, mask_type, ids, id2, ok = cols
    ok = ok.astype(bool)
    names = records.ds.manifest.get("maskgen", {}).get("mask_types", {})
    info = PackedSetInfo(narrow_ints(identity[ok]), masked[ok].astype(bool), narrow_ints(mask_type[ok]),
                         narrow_ints(ids[ok]), narrow_ints(id2[ok]), int((~ok).sum()),
                         {int(k): str(v) for k, v in names.items()})
    return emb, info


def _subset_summary(res: AllPairsResult) -> dict[str, Any]:
    return {
        "pairs": res.pairs,
        "genuine": res.n_genuine,
        "impostor": res.n_impostor,
        "acc": res.acc,
        "std": res.std,
        "balanced_acc": res.balanced_acc,
        "balanced_std": res.balanced_std,
        "majority_acc": majority_accuracy(res.n_genuine, res.n_impostor),
        "tar_at_far": {far_key(f): r.tar for f, r in res.tar_at_far.items()},
        "threshold_at_far": {far_key(f): r.threshold for f, r in res.tar_at_far.items()},
    }


def _cmc_summary(res: CMCResult) -> dict[str, Any]:
    return {"rank1": float(res.rates[0]), "cmc": [float(r) for r in res.rates], "cmc_pairs": res.n_pairs,
            "distractors": res.n_distractors}


@dataclass
class Curves:
    roc: dict[str, tuple[np.ndarray, np.ndarray]]
    cmc: dict[str, np.ndarray]


def evaluate_packed(emb: np.ndarray, info: PackedSetInfo, masked_probe: bool, fars: Sequence[float],
                    tile: int, device: torch.device, cmc: bool, max_rank: int,
                    distractors: Optional[np.ndarray], progress: bool) -> tuple[dict[str, dict], Curves]:
    """{subset: summary}: "unmasked" (all-to-all), and with masked probes "masked" (masked probe against
    unmasked gallery, a copy never against its own source photo) and "masked/<mask type>" (maskgen's
    name of the type, or "mask_type=T")."""
    unmasked = ~info.masked
    if unmasked.sum() < 2:
        raise EvalError("the set has fewer than 2 unmasked images")
    # Row numbers, not copies: `emb` may be a file-backed array of any size, read a tile at a time.
    g_rows = None if unmasked.all() else narrow_ints(np.flatnonzero(unmasked))
    g_id, g_src = (info.identity, info.ids) if g_rows is None else (info.identity[g_rows], info.ids[g_rows])
    subsets: dict[str, dict] = {}
    curves = Curves({}, {})

    def run(name: str, probe: Optional[np.ndarray]) -> None:
        kw = dict(fars=fars, tile=tile, device=device, progress=progress)
        if probe is None:
            res = all_pairs_verification(emb, g_id, probe_rows=g_rows, **kw)
        else:
            p_rows = narrow_ints(np.flatnonzero(probe))
            res = all_pairs_verification(emb, info.identity[p_rows], emb, g_id, probe_rows=p_rows,
                                         gallery_rows=g_rows, probe_groups=info.source_ids[p_rows],
                                         gallery_groups=g_src, **kw)
        subsets[name] = _subset_summary(res)
        curves.roc[name] = (res.roc_fpr, res.roc_tpr)
        if cmc:
            d = dict(distractors=distractors) if distractors is not None else \
                dict(distractors=emb, distractor_rows=g_rows, distractor_labels=g_id)
            kw = dict(max_rank=max_rank, device=device, progress=progress, **d)
            if probe is None:
                c = megaface_cmc(emb, g_id, probe_rows=g_rows, **kw)
            else:
                c = megaface_cmc(emb, info.identity[p_rows], probe_rows=p_rows, mates=emb, mate_labels=g_id,
                                 mate_rows=g_rows, probe_groups=info.source_ids[p_rows], mate_groups=g_src,
                                 **kw)
            subsets[name].update(_cmc_summary(c))
            curves.cmc[name] = c.rates

    run("unmasked", None)
    if masked_probe:
        if not info.masked.any():
            raise EvalError("--masked-probe: the set has no masked records (add them with "
                            "`maskgen build --data DATA`)")
        run("masked", info.masked)
        for t in np.unique(info.mask_type[info.masked]):
            name = info.mask_type_names.get(int(t), f"mask_type={int(t)}")
            run(f"masked/{name}", info.masked & (info.mask_type == t))
    return subsets, curves


def load_distractors(spec: str | os.PathLike, model: torch.nn.Module, checkpoint: str | os.PathLike,
                     device: torch.device, batch_size: int = 64, flip: bool = True, align: bool = False,
                     workers: int = 2, progress: bool = True) -> np.ndarray:
    """The L2-normalised distractor gallery of --cmc: a `.npz` of `python -m trainer.eval.embed` (made
    from `checkpoint`), a packed set, or an image folder embedded here."""
    path = Path(spec)
    if path.suffix == ".npz":
        data = load_npz(path, checkpoint, map_embeddings=True)  # read a block at a time, not whole
        emb = data["embeddings"]
        if bool(data.get("normalized", True)):
            return emb
        unit = row_file(len(emb), emb.shape[1])
        for a in range(0, len(emb), 8192):
            unit[a:a + 8192] = l2_normalize(emb[a:a + 8192])
            release(emb)
            release(unit)
        return unit
    if (path / "manifest.json").is_file():
        emb, _ = embed_packed(model, str(path), device, batch_size, flip, workers=workers, progress=progress)
        return emb
    return embed_folder(model, path, device, batch_size, flip, align, workers=workers,
                        progress=progress).embeddings
