#!/usr/bin/env bash
# One call on the GPU machine: install nsa-lab, train experiments/needle_{full,nsa,window}.yaml,
# evaluate each on the needle grid, and leave the tables, heatmaps and logs in $OUT.
# Usage (device tool, carry [".whl"]): bash scripts/needle_evidence.sh
#
# Environment (all optional):
#   NEEDLE_TRAIN_LIMIT  seconds one training may take (default 140); a training cut by it
#                       stops like Ctrl-C (run FAILED, on_exception.ckpt) and is still evaluated
#   NEEDLE_OVERRIDES    extra key=value overrides for the three trainings (e.g. a CPU dry run)
#   NEEDLE_EVAL         extra options for `nsa-lab eval needle` (default: its defaults)
#   NEEDLE_SKIP_INSTALL 1 to use the environment as it is
#   NEEDLE_WORK         scratch folder (default /tmp/needle_work, emptied first)
set -uo pipefail
out=${OUT:-/tmp/needle_out}
work=${NEEDLE_WORK:-/tmp/needle_work}
limit=${NEEDLE_TRAIN_LIMIT:-140}
read -r -a overrides <<<"${NEEDLE_OVERRIDES:-}"
read -r -a eval_opts <<<"${NEEDLE_EVAL:-}"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
rm -rf "$work" && mkdir -p "$out" "$work/results"
log="$work/needle_evidence.log"
say() { echo "$*" | tee -a "$log"; }

if [[ ${NEEDLE_SKIP_INSTALL:-0} != 1 ]]; then
  $py -m pip install -q --no-index --find-links .whl omegaconf optuna mlflow-skinny datasets 2>&1 | grep -v "^WARNING" | tail -3
  $py -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$log"

uri="sqlite:///$work/mlflow.db"
for variant in full nsa window; do
  run="needle-$variant"
  say "== $variant: training (limit ${limit}s)"
  t0=$(date +%s)
  # Evaluation runs below, on whichever checkpoint the training leaves, so that a training
  # cut by the time limit is still measured; it is the same code as train.eval_needle.
  timeout -s INT -k 30 "$limit" $py -m nsa_lab train "experiments/needle_$variant.yaml" \
    "tracking.uri=$uri" "train.ckpt_dir=$work/ckpt" "tracking.run_name=$run" \
    train.eval_needle=false "${overrides[@]}" >"$work/train_$variant.log" 2>&1
  status=$?
  t1=$(date +%s)
  say "$variant: training exit $status after $((t1 - t0))s; $(grep -E '^run ' "$work/train_$variant.log" || echo 'no final line (cut or failed)')"
  ckpt=$(ls -t "$work/ckpt/$run"/*.ckpt 2>/dev/null | head -1)
  if [[ -z $ckpt ]]; then
    say "$variant: no checkpoint; last lines of its log:"; tail -20 "$work/train_$variant.log" | tee -a "$log"
    continue
  fi
  say "== $variant: evaluating $ckpt"
  $py -m nsa_lab eval needle "$ckpt" --out "$work/results/$variant" "${eval_opts[@]}" \
    >"$work/results/$variant.table.md" 2>"$work/eval_$variant.log"
  say "$variant: eval exit $? after $(($(date +%s) - t1))s"
  cat "$work/results/$variant.table.md" | tee -a "$log"
done

# One summary table (mean accuracy per length and overall, per variant) and the heatmaps.
$py - "$work" >"$out/needle_summary.md" <<'EOF'
import json, sys
from pathlib import Path

from nsa_lab.evaluation.results import NeedleResults, markdown_table

work = Path(sys.argv[1])
found = {
    v: NeedleResults.from_json((work / "results" / v / "needle_results.json").read_text())
    for v in ("full", "nsa", "window")
    if (work / "results" / v / "needle_results.json").is_file()
}
lengths = sorted({n for r in found.values() for n in r.lengths})
print("| variant | step | " + " | ".join(f"acc @ {n}" for n in lengths) + " | overall | eval s |")
print("|---" * (len(lengths) + 4) + "|")
for v, r in found.items():
    accs = [f"{100 * r.acc_at_length(n):.1f}" if n in r.lengths else "-" for n in lengths]
    row = [v, str(r.meta["step"]), *accs, f"{100 * r.acc:.1f}", str(r.meta["seconds"])]
    print("| " + " | ".join(row) + " |")
for v, r in found.items():
    print("\n" + markdown_table(r, f"{v} (step {r.meta['step']}, {r.meta['device']})"))
EOF
cat "$out/needle_summary.md" | tee -a "$log"
for variant in full nsa window; do
  png="$work/results/$variant/needle_heatmap.png"
  [[ -f $png ]] && cp "$png" "$out/needle_heatmap_$variant.png"
done
cp "$log" "$out/"
tar -czf "$out/needle_evidence.tar.gz" -C "$work" results $(cd "$work" && ls ./*.log)
ls -la "$out"
