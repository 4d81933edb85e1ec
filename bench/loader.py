"""Reader throughput: decoded, augmented (flip), normalised images/s into training batches.

Side by side, on the same packed data and with the same number of CPU threads/workers:
- our DALI reader (`device='cpu'`; `--gpu` adds `device='mixed'` at hw_decoder_load 0.65 and 0.9),
- our nvJPEG reader (pipeline/nvjpeg_reader.py: torchvision's batched GPU decode; needs CUDA, else its row
  says why it was skipped),
- our PyTorch `PackedDataset` + `DataLoader`,
- the reference path of insightface's arcface_torch: `mx.recordio` read + `mx.image.imdecode` + flip +
  normalise in a `DataLoader`, run in the mxnet peer venv (bench/peers.py).

Every reader runs with drop_last=False and counts the real images it delivered, and the packed source is
replicated (bench/replicate.py) to at least 8 batches of the largest batch, so that an epoch is not one
batch with the rest decoded and dropped (glint24 is ~800 images: at batch 512, drop_last counted 512 per
epoch while DALI decoded 1024).

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
                    drop_last=False, persistent_workers=True)  # every decoded image counts
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
    """(real images delivered, seconds) over `epochs` epochs, after one untimed epoch."""
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
    ap.add_argument("--workers", type=int, default=2, help="DALI threads, nvjpeg host threads, torch workers")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--gpu", action="store_true", help="also DALI device='mixed' and nvJPEG (needs CUDA)")
    ap.add_argument("--gpu-batch", type=int, default=512)
    ap.add_argument("--min-batches", type=int, default=8,
                    help="replicate the packed source to at least this many of the largest batch")
    ap.add_argument("--no-reference", action="store_true", help="skip the mxnet reference row")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    import torch

    from bench.replicate import replicate_shards
    from pipeline.dali_reader import DaliTrainLoader
    from pipeline.dataset import TorchTrainLoader
    from pipeline.manifest import load_manifest
    from pipeline.nvjpeg_reader import NvjpegTrainLoader

    gpu_batch = args.gpu_batch if args.gpu else args.batch
    rows: list[tuple[str, int, object, object]] = []  # (reader, batch, images or None, seconds or reason)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "pipeline", "pack", str(args.src), "--out", str(data),
                        "--no-progress", "--workers", str(args.workers)], cwd=REPO, check=True)
        shards = list(load_manifest(data)["shards"])
        images_in_set = replicate_shards(data, args.min_batches * max(args.batch, gpu_batch))
        dali = DaliTrainLoader(data, args.batch, num_threads=args.workers, device="cpu", drop_last=False)
        rows.append(("DALI reader, device='cpu'", args.batch, *measure(dali, args.epochs)))
        del dali
        if args.gpu:
            for load in (0.65, 0.9):
                gpu = DaliTrainLoader(data, gpu_batch, num_threads=args.workers, device="cuda",
                                      hw_decoder_load=load, drop_last=False)
                rows.append((f"DALI reader, device='mixed', hw_decoder_load {load}", gpu_batch,
                             *measure(gpu, args.epochs)))
                del gpu
        if torch.cuda.is_available():
            nvjpeg = NvjpegTrainLoader(data, gpu_batch, num_threads=args.workers, device="cuda",
                                       augment={"flip": True}, drop_last=False)
            rows.append(("nvJPEG reader (torchvision decode_jpeg on cuda)", gpu_batch,
                         *measure(nvjpeg, args.epochs)))
            del nvjpeg
        else:
            rows.append(("nvJPEG reader (torchvision decode_jpeg on cuda)", gpu_batch, None,
                         "skipped: no CUDA device here (it decodes on the GPU)"))
        torch_loader = TorchTrainLoader(data, args.batch, num_workers=args.workers, augment={"flip": True},
                                        drop_last=False)
        rows.append(("PackedDataset + DataLoader", args.batch, *measure(torch_loader, args.epochs)))
        del torch_loader
        if not args.no_reference:
            script = Path(tmp) / "reference.py"
            script.write_text(REFERENCE)
            # the reference reads the first shard only (one .rec, as insightface's train.rec)
            out = subprocess.run([str(mxnet_python()), str(script), str(data / shards[0]["rec"]),
                                  str(data / shards[0]["idx"]), str(args.workers), str(args.batch),
                                  str(args.epochs)], capture_output=True, text=True, check=True).stdout
            ref = json.loads(out.strip().splitlines()[-1])
            rows.append(("insightface reference (mxnet read+imdecode, DataLoader; first shard)", args.batch,
                         ref["images"], ref["seconds"]))
    ref_rate = rows[-1][2] / rows[-1][3] if not args.no_reference else None
    table = (f"{images_in_set} images per epoch; images = real images delivered (drop_last=False)\n\n"
             "| reader | workers | batch | images | images/s | vs reference |\n|---|---|---|---|---|---|\n")
    for name, batch, n, secs in rows:
        if n is None:
            table += f"| {name} | {args.workers} | {batch} | | {secs} | |\n"
            continue
        ratio = f"{n / secs / ref_rate:.2f}x" if ref_rate else ""
        table += f"| {name} | {args.workers} | {batch} | {n} | {n / secs:.0f} | {ratio} |\n"
    print(table)
    if args.record:
        record("Readers: decoded, augmented images/s", " ".join(["python bench/loader.py", *sys.argv[1:]]),
               table)


if __name__ == "__main__":
    main()
