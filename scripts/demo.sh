#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then pack the real faces in ../shared/data/glint24,
# add 5% masked copies, train the CPU demo config on 2 ranks and evaluate on held-out images.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
export PATH="$root/.venv/bin:$PATH"
faces="${FACE_DATA:-$root/../shared/data}/glint24"
work="${WORK:-$root/work}"
mkdir -p "$work"
python -m pipeline pack "$faces" --out "$work/glint24" --holdout 5 --shard-size 2
python -m pipeline verify "$work/glint24"
maskgen build --ratio 0.05 --data "$work/glint24" --mode mixed
maskgen preview --data "$work/glint24" -n 32 --out "$work/masked_preview.png"
# The launcher runs as the venv's python, so that its workers do too: a venv that keeps a system CUDA torch
# (--system-site-packages) has no torchrun of its own, and a bare `torchrun` would be the base interpreter's,
# whose workers lack DALI and the project's dependencies.
"$root/.venv/bin/python" -m torch.distributed.run --standalone --nproc_per_node="${NPROC:-2}" trainer/main.py \
  --config trainer/configs/cpu_demo.py --data "$work/glint24" --output "$work/run"
python -m trainer.eval --checkpoint "$work/run/model.pt" --pairs "$work/glint24/holdout_pairs.bin"
