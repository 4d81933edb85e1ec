"""Small real inputs for the evaluation/export tests: face folders cut from glint24, .bin packs, model.pt
files of a real backbone, a packed set with masked copies laid out as docs/design.md section 1 says, and a
small random conv net."""
from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
EMBEDDING = 64


def face_folder(glint24: Path, out: Path, identities: int, per_identity: int) -> Path:
    """An ImageFolder of the first `identities` people of glint24, `per_identity` images each."""
    out.mkdir(parents=True, exist_ok=True)
    people = sorted(p for p in glint24.iterdir() if p.is_dir())[:identities]
    for person in people:
        dst = out / person.name
        dst.mkdir(exist_ok=True)
        for f in sorted(person.glob("*.png"))[:per_identity]:
            shutil.copy(f, dst / f.name)
    return out


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def face_images(faces: Path) -> dict[str, list[np.ndarray]]:
    """{person: RGB images} of a face_folder, in file order."""
    people = sorted(p for p in faces.iterdir())
    return {p.name: [read_rgb(f) for f in sorted(p.glob("*.png"))] for p in people}


def encode(rgb: np.ndarray, ext: str = ".png") -> bytes:
    ok, buf = cv2.imencode(ext, cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def write_bin(path: Path, images: Sequence[bytes], issame: Sequence[bool]) -> Path:
    """An insightface verification pack: pickle of (list of encoded images, list of bool)."""
    with open(path, "wb") as f:
        pickle.dump((list(images), list(issame)), f, protocol=4)
    return path


def save_model(path: Path, seed: int = 0, network: str = "mbf") -> Path:
    """A model.pt of a real registered backbone, as the trainer writes it."""
    from trainer.backbones import build_backbone
    from trainer.checkpoint import save_model as trainer_save_model

    torch.manual_seed(seed)
    model = build_backbone(network, embedding_size=EMBEDDING)
    trainer_save_model(path, model, network, {"embedding_size": EMBEDDING})
    return path


def run_module(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def last_json(stdout: str) -> dict:
    import json

    return json.loads(stdout.strip().splitlines()[-1])


def cover_lower_face(rgb: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """A crude mask (a filled polygon over nose tip, mouth and chin) for a masked test copy."""
    out = rgb.copy()
    poly = np.array([[18, 62], [94, 62], [90, 100], [56, 111], [22, 100]], np.int32)
    cv2.fillPoly(out, [poly], colour)
    return out


def add_masked_shard(data_dir: Path, every: int = 2) -> list[dict]:
    """Masked copies of every `every`-th train record, in a `masked-00000` shard listed in the manifest:
    label vector [identity, masked=1, mask_type], a new id, the source id in id2 (docs/design.md section 1).
    Mask types 1 and 2 alternate. Returns one dict per copy (identity, id, id2, mask_type)."""
    from pipeline.manifest import load_manifest, shard_entry, write_manifest
    from pipeline.recordio import IndexedRecordIO, IRHeader, first_label, pack_record, unpack_record

    manifest = load_manifest(data_dir)
    sources = []
    for s in manifest["shards"]:
        with IndexedRecordIO(data_dir / s["idx"], data_dir / s["rec"], "r") as r:
            for key in r.keys:
                header, payload = unpack_record(r.read_idx(key))
                sources.append((int(first_label(header)), int(header.id), payload))
    next_id = int(manifest["next_id"])
    copies = []
    with IndexedRecordIO(data_dir / "masked-00000.idx", data_dir / "masked-00000.rec", "w") as w:
        for n, (identity, src_id, payload) in enumerate(sources[::every]):
            mask_type = 1 + n % 2
            bgr = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            masked = cover_lower_face(rgb, (40, 90, 200) if mask_type == 1 else (230, 230, 230))
            ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(masked, cv2.COLOR_RGB2BGR))
            label = np.array([identity, 1, mask_type], np.float32)
            w.write_idx(n, pack_record(IRHeader(len(label), label, next_id + n, src_id), jpg.tobytes()))
            copies.append({"identity": identity, "id": next_id + n, "id2": src_id, "mask_type": mask_type})
    entry = shard_entry(data_dir, "masked-00000.rec", "masked-00000.idx", len(copies), "masked")
    manifest["shards"].append(entry)
    manifest["label_fields"] = ["identity", "masked", "mask_type"]
    manifest["next_id"] = next_id + len(copies)
    manifest["num_images"] += len(copies)  # the shards' counts sum to it (docs/design.md section 1)
    manifest["maskgen"] = {"mask_types": {"1": "surgical", "2": "kn95"}}  # the names maskgen gives codes
    write_manifest(data_dir, manifest)
    return copies


class SmallConv(nn.Module):
    """A random conv net with BatchNorm (to see that eval mode is used and restored)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 5, 4), nn.BatchNorm2d(8), nn.PReLU(8),
                                  nn.Conv2d(8, 16, 3, 2), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                  nn.Linear(64, 16))

    def forward(self, x):
        return self.body(x)


def with_extra_record(src: Path, dst: Path, label: float, image: bytes) -> Path:
    """A copy of the packed set `src` at `dst` with one more record (identity `label`, image bytes `image`)
    in a shard of its own, listed first: record 0 of the readers."""
    import shutil

    from pipeline.manifest import load_manifest, shard_entry, write_manifest
    from pipeline.recordio import IndexedRecordIO, IRHeader, pack_record

    shutil.copytree(src, dst)
    m = load_manifest(dst)
    with IndexedRecordIO(dst / "extra-00000.idx", dst / "extra-00000.rec", "w") as w:
        w.write_idx(10**6, pack_record(IRHeader(0, float(label), 10**6, 0), image))
    m["shards"].insert(0, shard_entry(dst, "extra-00000.rec", "extra-00000.idx", 1))
    m["num_images"] += 1
    write_manifest(dst, m)
    return dst
