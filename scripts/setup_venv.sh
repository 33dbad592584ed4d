#!/usr/bin/env bash
# Create .venv and install everything hetcomp needs; idempotent and fast when done already.
# Order matters: torch first (the CPU build, pinned, so nothing pulls CUDA wheels), then aihwkit
# from its sdist (no wheel for Python 3.11 + torch 2.13), then hetcomp itself in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.hetcomp-installed
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
  $PIP install --upgrade pip setuptools wheel
fi

# Fast path: all installed and pyproject.toml unchanged since (by content: mtimes lie after a checkout).
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VENV/bin/python" -c "import torch, aihwkit, hetcomp" 2>/dev/null; then
  exit 0
fi

if ! "$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0')" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU build)"
  # This machine's pip finds the local CPU wheel (find-links); a looser pin would pull CUDA wheels.
  $PIP install "torch==2.13.0" numpy
fi

if ! "$VENV/bin/python" -c "import aihwkit.simulator.tiles" 2>/dev/null; then
  echo "[setup] building aihwkit 1.2.0 from its sdist (about 5-10 minutes on 2 cores; done once)"
  if ! ldconfig -p 2>/dev/null | grep -q libopenblas; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas-dev >/dev/null
    else
      echo "[setup] error: aihwkit needs OpenBLAS; install libopenblas-dev (Debian) and re-run" >&2; exit 1
    fi
  fi
  $PIP install "cmake>=4.2.1" "scikit-build>=0.18.1" "pybind11>=3.0.1" ninja mypy setuptools wheel \
    scipy tqdm requests protobuf
  # --no-deps keeps pip from pulling torchvision (which would replace our torch);
  # --no-build-isolation lets the build see torch; PATH gives it mypy's stubgen.
  PATH="$PWD/$VENV/bin:$PATH" MAX_JOBS=2 CMAKE_BUILD_PARALLEL_LEVEL=2 \
    $PIP install --no-build-isolation --no-deps "aihwkit==1.2.0"
fi

echo "[setup] installing hetcomp and its dependencies"
$PIP install -e ".[dev,hf]"
"$VENV/bin/python" -c "import torch, aihwkit, hetcomp; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$WANT" > "$STAMP"
