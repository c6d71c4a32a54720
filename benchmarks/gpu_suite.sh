#!/usr/bin/env bash
# The GPU suite in one command (benchmarks/gpu_suite.py says what each table measures):
#   bash benchmarks/gpu_suite.sh                     # CUDA: DiT-XL/2 and DiT-B/2 at 256 px, DyDiT-XL/2, sampling
#   bash benchmarks/gpu_suite.sh --tiny --device cpu --no-compile --out /tmp/suite     # tiny sizes, on the CPU
# Writes benchmarks/results/gpu_suite.json and the gpu_suite section of docs/benchmarks.md (or DIR/ with --out DIR).
# Runs from any directory; Python is $PYTHON, else the repository's .venv, else python3 on the PATH.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
if [[ -n "${PYTHON:-}" ]]; then
  python="$PYTHON"
elif [[ -x "$repo/.venv/bin/python" ]]; then
  python="$repo/.venv/bin/python"
else
  python="$(command -v python3 || command -v python)"
fi
cd "$repo"
exec "$python" "$here/gpu_suite.py" "$@"
