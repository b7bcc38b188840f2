#!/usr/bin/env bash
# Set up a virtual environment with the test and parity dependencies, then run
# the whole suite (fast tests and torch parity tests). Extra args go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: the parity references must not pull a CUDA build
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[parity,masks]"

# On Linux the mlx CPU wheel's bundled BLAS is slow; Debian's OpenBLAS is
# ~15x faster for the parity tests. Optional: the product never needs it.
blas=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
if [ "$(uname -s)" = Linux ] && [ ! -e "$blas" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) >/dev/null 2>&1 || true
fi
if [ "$(uname -s)" = Linux ] && [ -e "$blas" ]; then
  export LD_PRELOAD="$blas${LD_PRELOAD:+:$LD_PRELOAD}"
fi

python -m pytest -q "$@"
