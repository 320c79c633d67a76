#!/usr/bin/env bash
# One call on the GPU machine: install nsa-lab (with the spine's wheels carried in .whl/),
# run the ablation grid (sweeps/ablations.yaml: 7 variants x 2 seeds), then `nsa-lab report`.
# Everything the lead needs for docs/ablations.md lands in $OUT: report.md,
# val_loss_curves.png, trials.csv, sweep.log, run.txt (commands, GPU, commit, timings).
#
# Usage (device tool, carry [".whl"]):   bash scripts/ablation_evidence.sh
# Knobs (environment):
#   WORKERS=2               sweep worker processes sharing the GPU
#   SWEEP_BUDGET_S=400      the sweep is stopped (SIGTERM) after this; the report then
#                           covers the finished trials and says which ones are missing
#   ABLATION_OVERRIDES=...  extra key=value overrides for every trial
#   SKIP_INSTALL=1 PYTHON=.venv/bin/python   use an installed nsa-lab, e.g. a CPU dry run:
#     SKIP_INSTALL=1 PYTHON=.venv/bin/python OMP_NUM_THREADS=1 ABLATION_OVERRIDES="\
#       data.seq_len=128 model.max_seq_len=128 model.n_layers=1 model.d_model=64 \
#       model.n_heads=2 model.n_kv_heads=1 model.head_dim=32 data.batch_size=4 \
#       train.max_steps=4 train.val_every=2 train.val_batches=1 train.log_every=2 \
#       train.warmup_steps=1" bash scripts/ablation_evidence.sh
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
workers=${WORKERS:-2}
budget=${SWEEP_BUDGET_S:-400}
extra=${ABLATION_OVERRIDES:-}
start=$(date +%s)

if [[ -z ${SKIP_INSTALL:-} ]]; then
  python3 -m pip install -q --no-index --find-links .whl omegaconf optuna mlflow-skinny datasets matplotlib 2>&1 | grep -v "^WARNING" | tail -3
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
fi
installed=$(date +%s)
"$py" -c "import matplotlib, pandas, optuna, mlflow, lightning" || {
  echo "missing a package the sweep needs (matplotlib, pandas, optuna, mlflow, lightning)"
  exit 1
}

store=$(mktemp -d)  # MLflow + Optuna stores of this run only
uri="tracking.uri=sqlite:///$store/mlflow.db"
# shellcheck disable=SC2206  # word splitting of the overrides is intended
overrides=("$uri" "train.ckpt_dir=$store/checkpoints" $extra)
sweep=("$py" -m nsa_lab sweep sweeps/ablations.yaml "${overrides[@]}" --workers "$workers")
report=("$py" -m nsa_lab report ablations "$uri" --out "$out")

{
  echo "git commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo +dirty)"
  echo "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  "$py" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: none"
  echo "sweep command: timeout $budget ${sweep[*]}"
  echo "report command: ${report[*]}"
  echo "stores (MLflow, Optuna): $store"
} | tee "$out/run.txt"

timeout "$budget" "${sweep[@]}" > "$out/sweep.log" 2>&1
sweep_rc=$?
grep -E "^(sweep|nsa-lab)" "$out/sweep.log" | tail -25
swept=$(date +%s)

"${report[@]}" 2>&1 | tee "$out/report.log" | grep -v "^INFO"
report_rc=${PIPESTATUS[0]}
find "$store/mlartifacts" -path "*study/trials.csv" -exec cp {} "$out/trials.csv" \; 2>/dev/null
{
  echo "sweep exit code: $sweep_rc (124 or 130: stopped by the time budget; report covers finished trials)"
  echo "report exit code: $report_rc"
  echo "seconds: install $((installed - start)), sweep $((swept - installed)), total $(($(date +%s) - start))"
} | tee -a "$out/run.txt"
