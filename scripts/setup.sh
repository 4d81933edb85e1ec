#!/usr/bin/env bash
# Creates .venv in the repository root with every dependency, idempotently.
# A CUDA build of torch already importable by python3 is kept (the venv then sees the system site-packages);
# otherwise torch==2.13.0 (the CPU build) is installed. DALI is the build for that torch's CUDA major
# (scripts/dali_package.py; DALI_PACKAGE overrides it), and a GPU that torch cannot use is said out loud.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
stamp=".venv/.setup-done"
want="$(cat setup.cfg scripts/setup.sh scripts/dali_package.py | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  # installed already; still warn on every run when a GPU is here but the venv's torch cannot use it
  .venv/bin/python scripts/dali_package.py --base-python "$PY" >/dev/null || true
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
    echo "setup: keeping the CUDA torch of $PY" >&2
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
pip=(.venv/bin/python -m pip -q --disable-pip-version-check)
"${pip[@]}" install --upgrade pip wheel >/dev/null
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  "${pip[@]}" install torch==2.13.0
fi
# timm (the `timm` extra) needs torchvision: the release matching the installed torch (2.N -> 0.N+15),
# without dependencies, so that neither a CPU nor a kept CUDA torch is ever swapped for PyPI's CUDA build.
tv="$(.venv/bin/python -c 'import torch; print("0.%d.*" % (int(torch.__version__.split(".")[1]) + 15))')"
"${pip[@]}" install --no-deps "torchvision==$tv"
dali="${DALI_PACKAGE:-$(.venv/bin/python scripts/dali_package.py --base-python "$PY")}"
echo "setup: DALI package $dali" >&2
"${pip[@]}" install "$dali" -e ".[mask,export,test,timm]"
echo "$want" > "$stamp"
