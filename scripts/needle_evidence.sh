#!/usr/bin/env bash
# One call on the GPU machine: install nsa-lab, train experiments/needle_{full,nsa,window}.yaml,
# evaluate each on the needle grid, and leave the tables, heatmaps and logs in $OUT.
# Usage (device tool, carry [".whl"]): bash scripts/needle_evidence.sh
#
# $OUT gets needle_summary.md (environment, one row per variant, the per-variant tables),
# needle_heatmap_{full,nsa,window}.png, needle_evidence.log and needle_evidence.tar.gz
# (results/, every log, one MLflow store per variant: mlflow_<variant>.db). The summary and
# heatmaps are rewritten after every variant, so a call killed at its limit still returns
# the variants done by then.
# Exit code: 0 when every variant asked for was evaluated, 1 otherwise.
#
# Environment (all optional):
#   NEEDLE_TRAIN_LIMIT  seconds one training may take (default 140); a training cut by it
#                       gets SIGTERM, which Lightning turns into a stop after the current
#                       step (run FAILED, on_exception.ckpt), and is still evaluated
#   NEEDLE_DEADLINE     seconds from the start by which everything should be done (default 540);
#                       a training gets less than NEEDLE_TRAIN_LIMIT when the time left,
#                       minus NEEDLE_EVAL_RESERVE per evaluation still to come, shared by the
#                       trainings still to come, is shorter
#   NEEDLE_EVAL_RESERVE seconds set aside per evaluation (default 40)
#   NEEDLE_EVAL_LIMIT   seconds one evaluation may take before it is stopped (default 120)
#   NEEDLE_OVERRIDES    extra key=value overrides for the three trainings (e.g. a CPU dry run)
#   NEEDLE_EVAL         extra options for `nsa-lab eval needle` (default: its defaults)
#   NSA_LAB_AUTOTUNE    the evaluations run with 0 (first Triton candidate only) unless set;
#                       set it to 0 for the trainings too if compiling eats their budget
#   NEEDLE_PARALLEL     1 to train the three variants side by side on the one GPU, each for
#                       NEEDLE_TRAIN_LIMIT seconds (or until NEEDLE_DEADLINE minus one
#                       NEEDLE_EVAL_RESERVE), then evaluate them side by side
#   NEEDLE_VARIANTS     the variants to train and evaluate (default "full nsa window"), e.g. to
#                       redo one whose training ran out of time
#   NEEDLE_SKIP_INSTALL 1 to use the environment as it is; PYTHON picks the interpreter
#   NEEDLE_WORK         scratch folder (default /tmp/needle_work, emptied first)
# CPU dry run (about 1 minute on 2 cores; docs/needle.md):
#   NEEDLE_SKIP_INSTALL=1 PYTHON=.venv/bin/python OMP_NUM_THREADS=1 NEEDLE_OVERRIDES="\
#     train.max_steps=20 model.n_layers=1 model.d_model=64 model.n_heads=2 model.n_kv_heads=1 \
#     data.batch_size=2 data.seq_len=256 model.max_seq_len=256 train.val_every=10 \
#     train.val_batches=1 train.log_every=5 train.warmup_steps=2" \
#     NEEDLE_EVAL="--lengths 128,256 --depths 0,0.5,1 --trials 4" bash scripts/needle_evidence.sh
set -uo pipefail
start=$(date +%s)
out=${OUT:-/tmp/needle_out}
work=${NEEDLE_WORK:-/tmp/needle_work}
limit=${NEEDLE_TRAIN_LIMIT:-140}
deadline=${NEEDLE_DEADLINE:-540}
eval_reserve=${NEEDLE_EVAL_RESERVE:-40}
eval_limit=${NEEDLE_EVAL_LIMIT:-120}
read -r -a overrides <<<"${NEEDLE_OVERRIDES:-}"
read -r -a eval_opts <<<"${NEEDLE_EVAL:-}"
py=${PYTHON:-python3}
read -r -a variants <<<"${NEEDLE_VARIANTS:-full nsa window}"
for variant in "${variants[@]}"; do
  if [[ ! -f experiments/needle_$variant.yaml ]]; then
    echo "NEEDLE_VARIANTS: no experiments/needle_$variant.yaml for variant '$variant' (run from the repository root; known: full nsa window)" >&2
    exit 2
  fi
done
export PYTHONUNBUFFERED=1
rm -rf "$work" && mkdir -p "$out" "$work/results"
out=$(cd "$out" && pwd)  # absolute: the tarball is made from inside $work
log="$work/needle_evidence.log"
say() { echo "$*" | tee -a "$log"; }

if [[ ${NEEDLE_SKIP_INSTALL:-0} != 1 ]]; then
  $py -m pip install -q --no-index --find-links .whl omegaconf optuna mlflow-skinny datasets matplotlib 2>&1 | grep -v "^WARNING" | tail -3
  $py -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
fi
{
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo ' (dirty tree)')"
  echo "- gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  echo "- $($py -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available())")"
  echo "- $($py -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo 'triton: none')"
  echo "- training: experiments/needle_<variant>.yaml ${overrides[*]}, limit ${limit}s each"
  echo "- evaluation: nsa-lab eval needle CHECKPOINT ${eval_opts[*]}"
  echo "- NSA_LAB_AUTOTUNE: trainings ${NSA_LAB_AUTOTUNE:-unset (all candidates)}, evaluations ${NSA_LAB_AUTOTUNE:-0}"
} | tee "$work/environment.md" | tee -a "$log"

# Rewrites $OUT/needle_summary.md from what results/ holds so far, and copies the heatmaps.
summarise() {
  $py - "$work" "${variants[@]}" >"$out/.needle_summary.md" <<'EOF'
import sys
from pathlib import Path

from nsa_lab.evaluation.results import NeedleResults, markdown_table

work = Path(sys.argv[1])
variants = sys.argv[2:]
found = {
    v: NeedleResults.from_json((work / "results" / v / "needle_results.json").read_text())
    for v in variants
    if (work / "results" / v / "needle_results.json").is_file()
}
trainings = {}  # variant -> (exit code, seconds, limit) of its training
for v in variants:
    record = work / "results" / f"{v}.train"
    if record.is_file():
        trainings[v] = record.read_text().split()
lengths = sorted({n for r in found.values() for n in r.lengths})
print("**Environment**\n")
print((work / "environment.md").read_text())
columns = ["variant", "step", "train s (limit)", "train exit"]
columns += [f"acc @ {n}" for n in lengths] + ["overall", "eval s"]
print("| " + " | ".join(columns) + " |")
print("|---" * len(columns) + "|")
for v in variants:
    code, seconds, limit = trainings.get(v, ("-", "-", "-"))
    if v in found:
        r = found[v]
        step, seconds_eval = str(r.meta["step"]), str(r.meta["seconds"])
        accs = [f"{100 * r.acc_at_length(n):.1f}" if n in r.lengths else "-" for n in lengths]
        accs.append(f"{100 * r.acc:.1f}")
    else:
        step, seconds_eval = "-", "no result (see needle_evidence.log)"
        accs = ["-"] * (len(lengths) + 1)
    print("| " + " | ".join([v, step, f"{seconds} ({limit})", code, *accs, seconds_eval]) + " |")
print("\ntrain exit: 0 reached max_steps; 124 cut by the time limit, then evaluated all the same.")
for v, r in found.items():
    print("\n" + markdown_table(r, f"{v} (step {r.meta['step']}, {r.meta['device']})"))
EOF
  mv "$out/.needle_summary.md" "$out/needle_summary.md"
  local v
  for v in "${variants[@]}"; do
    if [[ -f $work/results/$v/needle_heatmap.png ]]; then
      cp "$work/results/$v/needle_heatmap.png" "$out/.needle_heatmap_$v.png"
      mv "$out/.needle_heatmap_$v.png" "$out/needle_heatmap_$v.png"
    fi
  done
}

# Trains one variant for at most $2 seconds, then records exit code, seconds and limit.
train_variant() {
  local variant=$1 budget=$2 t0 status
  say "== $variant: training (limit ${budget}s)"
  t0=$(date +%s)
  # Evaluation runs afterwards, on whichever checkpoint the training leaves, so that a training
  # cut by the time limit is still measured; it is the same code as train.eval_needle.
  # SIGTERM rather than SIGINT: Lightning stops at the next step boundary, whereas a
  # KeyboardInterrupt can land inside an MLflow SQLite write and leave the store locked.
  # Each variant has its own store, so that trainings running side by side never wait on a lock.
  timeout -k 30 "$budget" $py -m nsa_lab train "experiments/needle_$variant.yaml" \
    "tracking.uri=sqlite:///$work/mlflow_$variant.db" "train.ckpt_dir=$work/ckpt" \
    "tracking.run_name=needle-$variant" train.eval_needle=false "${overrides[@]}" \
    >"$work/train_$variant.log" 2>&1
  status=$?
  echo "$status $(($(date +%s) - t0)) $budget" >"$work/results/$variant.train"
  say "$variant: training exit $status after $(($(date +%s) - t0))s; $(grep -E '^run ' "$work/train_$variant.log" || echo 'no final line (cut or failed)')"
}

# Evaluates the newest checkpoint a variant's training left.
eval_variant() {
  local variant=$1 t0 ckpt status
  ckpt=$(ls -t "$work/ckpt/needle-$variant"/*.ckpt 2>/dev/null | head -1)
  if [[ -z $ckpt ]]; then
    say "$variant: no checkpoint; last lines of its log:"; tail -20 "$work/train_$variant.log" | tee -a "$log"
    return
  fi
  say "== $variant: evaluating $ckpt"
  t0=$(date +%s)
  # One autotune candidate per kernel: the evaluation is a few hundred forward passes at
  # prompt lengths the training never compiled for, so compiling matters more than tiles.
  NSA_LAB_AUTOTUNE=${NSA_LAB_AUTOTUNE:-0} timeout -k 10 "$eval_limit" \
    $py -m nsa_lab eval needle "$ckpt" --out "$work/results/$variant" "${eval_opts[@]}" \
    >"$work/results/$variant.table.md" 2>"$work/eval_$variant.log"
  status=$?
  say "$variant: eval exit $status after $(($(date +%s) - t0))s"
  if ((status == 0)); then
    tee -a "$log" <"$work/results/$variant.table.md"
  else
    tail -20 "$work/eval_$variant.log" | tee -a "$log"
  fi
}

if [[ ${NEEDLE_PARALLEL:-0} == 1 ]]; then
  # All trainings at once on the one GPU (small models leave most of it idle), then all
  # evaluations at once; one evaluation reserve is kept for the evaluations together.
  left=$((deadline - ($(date +%s) - start) - eval_reserve))
  budget=$((left < limit ? left : limit))
  for variant in "${variants[@]}"; do train_variant "$variant" "$budget" & done
  wait
  for variant in "${variants[@]}"; do eval_variant "$variant" & done
  wait
  summarise
else
  for i in "${!variants[@]}"; do
    variant=${variants[$i]}
    left=$((${#variants[@]} - i))
    share=$(((deadline - ($(date +%s) - start) - left * eval_reserve) / left))
    budget=$((share < limit ? share : limit))
    if ((share < 20)); then
      say "$variant: skipped, ${share}s left for its training (NEEDLE_DEADLINE=${deadline}s)"
      echo "skipped 0 $share" >"$work/results/$variant.train"
      continue
    fi
    train_variant "$variant" "$budget"
    eval_variant "$variant"
    summarise
  done
fi
evaluated=$(ls "$work"/results/*/needle_results.json 2>/dev/null | wc -l)

say "== summary: $evaluated of ${#variants[@]} variants evaluated, $(($(date +%s) - start))s since the start"
summarise
tee -a "$log" <"$out/needle_summary.md"
cp "$log" "$out/"
cd "$work" || exit 1
kept=(results environment.md ./*.log)
kept+=(mlflow_*.db)
tar -czf "$out/needle_evidence.tar.gz" "${kept[@]}"
ls -la "$out"
((evaluated == ${#variants[@]}))
