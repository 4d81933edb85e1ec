"""Reader throughput: decoded, flipped, normalised images/s into training batches.

Side by side, on the same packed file and with the same number of CPU workers:
- our DALI reader (`device='cpu'` here; `--gpu` adds `device='mixed'` with hw_decoder_load 0.65 and 0.9),
- our PyTorch `PackedDataset` + `DataLoader`,
- the reference path of insightface's arcface_torch: `mx.recordio` read + `mx.image.imdecode` + flip +
  normalise in a `DataLoader`, run in the mxnet peer venv (bench/peers.py).

    python bench/loader.py --workers 2 --batch 128 --epochs 3 [--gpu] [--record]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.peers import REPO, SHARED_DATA, mxnet_python, record  # noqa: E402

REFERENCE = r'''
import json, sys, time
import mxnet as mx, numpy as np, torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

class MXFaceDataset(Dataset):
    """The shape of insightface arcface_torch's MXFaceDataset (ToPILImage, flip, ToTensor, Normalize)."""
    def __init__(self, rec, idx):
        self.imgrec = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
        self.imgidx = np.array(list(self.imgrec.keys))
    def __getitem__(self, index):
        header, img = mx.recordio.unpack(self.imgrec.read_idx(int(self.imgidx[index])))
        label = header.label if np.isscalar(header.label) else header.label[0]
        sample = Image.fromarray(mx.image.imdecode(img).asnumpy())
        if np.random.rand() < 0.5:
            sample = sample.transpose(Image.FLIP_LEFT_RIGHT)
        t = torch.from_numpy(np.asarray(sample, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (t - 0.5) / 0.5, torch.tensor(label, dtype=torch.long)
    def __len__(self):
        return len(self.imgidx)

rec, idx, workers, batch, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
loader = DataLoader(MXFaceDataset(rec, idx), batch_size=batch, shuffle=True, num_workers=workers,
                    drop_last=True, persistent_workers=True)
n = 0
for x, y in loader:  # warm-up epoch: worker start-up
    pass
t = time.perf_counter()
for _ in range(epochs):
    for x, y in loader:
        n += x.shape[0]
print(json.dumps({"images": n, "seconds": time.perf_counter() - t}))
'''


def measure(loader, epochs: int) -> tuple[int, float]:
    for _ in loader:  # warm-up epoch: pipeline build, worker start-up
        pass
    n = 0
    t = time.perf_counter()
    for _ in range(epochs):
        for images, _labels in loader:
            n += images.shape[0]
    if images.is_cuda:
        import torch

        torch.cuda.synchronize()
    return n, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=SHARED_DATA / "glint24")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--gpu", action="store_true", help="also DALI device='mixed' (needs CUDA)")
    ap.add_argument("--gpu-batch", type=int, default=512)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    from pipeline.dali_reader import DaliTrainLoader
    from pipeline.dataset import TorchTrainLoader
    from pipeline.manifest import load_manifest

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "pipeline", "pack", str(args.src), "--out", str(data),
                        "--no-progress", "--workers", str(args.workers)], cwd=REPO, check=True)
        shard = load_manifest(data)["shards"][0]
        rows = []
        dali = DaliTrainLoader(data, args.batch, num_threads=args.workers, device="cpu")
        rows.append(("DALI reader, device='cpu'", *measure(dali, args.epochs)))
        del dali
        torch_loader = TorchTrainLoader(data, args.batch, num_workers=args.workers, augment={"flip": True})
        rows.append(("PackedDataset + DataLoader", *measure(torch_loader, args.epochs)))
        script = Path(tmp) / "reference.py"
        script.write_text(REFERENCE)
        out = subprocess.run([str(mxnet_python()), str(script), str(data / shard["rec"]), str(data / shard["idx"]),
                              str(args.workers), str(args.batch), str(args.epochs)],
                             capture_output=True, text=True, check=True).stdout
        ref = json.loads(out.strip().splitlines()[-1])
        rows.append(("insightface reference (mxnet read+imdecode, DataLoader)", ref["images"], ref["seconds"]))
        if args.gpu:
            for load in (0.65, 0.9):
                gpu = DaliTrainLoader(data, args.gpu_batch, num_threads=args.workers, device="cuda",
                                      hw_decoder_load=load)
                rows.append((f"DALI reader, device='mixed', hw_decoder_load {load}, batch {args.gpu_batch}",
                             *measure(gpu, args.epochs * 4)))
    ref_rate = rows[2][1] / rows[2][2]
    table = "| reader | workers | batch | images | images/s | vs reference |\n|---|---|---|---|---|---|\n"
    for name, n, secs in rows:
        table += f"| {name} | {args.workers} | {args.batch} | {n} | {n / secs:.0f} | {n / secs / ref_rate:.2f}x |\n"
    print(table)
    if args.record:
        record("Readers: decoded, augmented images/s", " ".join(["python bench/loader.py", *sys.argv[1:]]), table)


if __name__ == "__main__":
    main()
