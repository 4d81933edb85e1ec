#!/usr/bin/env bash
# Runs the whole test suite on the CPU (after setting up .venv if needed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
