#!/usr/bin/env bash
# One call on the GPU machine: install nsa-lab (with the spine's wheels carried in .whl/),
# run the Triton kernel tests compiled for the GPU, then the benchmark.
# Usage (device tool, carry [".whl"]): bash scripts/device_check.sh [tests|bench|train|all] [bench args...]
# (bench: nsa-lab bench kernels; train: nsa-lab bench train, eager then compiled)
set -uo pipefail
what=${1:-all}
shift || true
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --find-links .whl omegaconf optuna mlflow-skinny datasets matplotlib pytest-xdist 2>&1 | grep -v "^WARNING" | tail -3
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [[ $what == tests || $what == all ]]; then
  # Compiling the kernels for each test shape is CPU work: pytest-xdist spreads it.
  python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_triton_*.py 2>&1 \
    | tee "$out/tests.log" | tail -15
fi
if [[ $what == bench || $what == all ]]; then
  python3 -m nsa_lab bench kernels --out "$out/bench.md" "$@" 2>&1 | tee "$out/bench.log" | tail -40
fi
if [[ $what == train || $what == all ]]; then
  python3 -m nsa_lab bench train --out "$out/train.md" "$@" 2>&1 | tee "$out/train.log" | grep "^| "
  python3 -m nsa_lab bench train --compile --out "$out/train_compiled.md" "$@" 2>&1 \
    | tee "$out/train_compiled.log" | grep "^| "
fi
