#!/usr/bin/env bash
# Set up hetcomp on a CUDA machine that already has torch (a cluster image): keep the machine's torch, add
# aihwkit and hetcomp's other dependencies, install hetcomp itself without dependencies.
#
#   HETCOMP_WHEELHOUSE=/path/to/wheels bash scripts/setup_gpu.sh   # offline: everything missing from that folder
#   bash scripts/setup_gpu.sh                                      # online: aihwkit built from its sdist
#
# PYTHON picks the interpreter (default python3). aihwkit's C++ extension may be CPU-only: hetcomp's PCM tiles
# (TorchInferenceRPUConfig) run on CUDA through torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELHOUSE=${HETCOMP_WHEELHOUSE:-}
PIP="$PY -m pip --disable-pip-version-check -q"
SOURCE=()
if [ -n "$WHEELHOUSE" ]; then
  SOURCE=(--no-index --find-links "$WHEELHOUSE")
fi

"$PY" -c "import torch; print(f'[setup-gpu] keeping torch {torch.__version__} (CUDA: {torch.cuda.is_available()})')"

# hetcomp's dependencies as pyproject.toml lists them, except torch (pinned there to the CPU build).
mapfile -t DEPS < <("$PY" - <<'PYEOF'
import tomllib
for requirement in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    if not requirement.replace(" ", "").startswith("torch"):
        print(requirement)
PYEOF
)
MISSING=()
for requirement in "${DEPS[@]}"; do
  if ! "$PY" -c "import importlib.metadata as m, sys; from packaging.requirements import Requirement as R; r = R(sys.argv[1]); sys.exit(0 if r.specifier.contains(m.version(r.name), prereleases=True) else 1)" "$requirement" 2>/dev/null; then
    MISSING+=("$requirement")
  fi
done
if [ ${#MISSING[@]} -gt 0 ]; then
  echo "[setup-gpu] installing ${MISSING[*]}"
  $PIP install "${SOURCE[@]}" "${MISSING[@]}"
fi

if ! "$PY" -c "import aihwkit.simulator.tiles" 2>/dev/null; then
  echo "[setup-gpu] installing aihwkit 1.2.0${WHEELHOUSE:+ from $WHEELHOUSE}"
  if [ -n "$WHEELHOUSE" ]; then
    $PIP install --no-deps "${SOURCE[@]}" "aihwkit==1.2.0"
  else  # from its sdist, against this torch; --no-deps keeps pip from replacing torch through torchvision
    $PIP install --no-build-isolation --no-deps "aihwkit==1.2.0"
  fi
fi

$PIP install --no-deps --no-build-isolation -e .
"$PY" -c "import torch, aihwkit, hetcomp; print(f'[setup-gpu] hetcomp {hetcomp.__version__}, aihwkit {aihwkit.__version__}, torch {torch.__version__}')"
