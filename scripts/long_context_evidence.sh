#!/usr/bin/env bash
# The long-context evidence (docs/long_context.md): experiments/long_context.yaml trained
# for the same number of steps (hence tokens) per variant, one variant per GPU at once,
# then evaluated on the needle grid at the trained length, and compared by `nsa-lab report`.
# Usage (device tool, kind nvidia-h100-x4, carry [".whl"]): bash scripts/long_context_evidence.sh
#
# Everything lives in LC_WORK (default .lc_work/ in the repository, which git ignores and
# a warm device machine keeps between calls): running the script again resumes every
# training from its newest checkpoint, skips the ones that reached LC_STEPS, and evaluates
# again. $OUT gets lc_summary.md (environment, trainings, needle accuracy per variant,
# the report's tables), lc_evidence.log and lc_evidence.tar.gz (results/, report/, logs,
# mlflow.db; no checkpoints).
# Exit code: 0 when every variant reached LC_STEPS and was evaluated, 1 otherwise.
#
# Environment (all optional):
#   LC_STEPS        optimizer steps per variant (default 4000: 131M tokens at 8192 x 4)
#   LC_DEADLINE     seconds from the start by which everything is done (default 560)
#   LC_EVAL_RESERVE seconds kept after the trainings for evaluation and report (default 130)
#   LC_VARIANTS     space-separated labels out of: full nsa window full_9l nsa_shared_kv
#                   (default "full nsa window full_9l"; full_9l = full with 9 layers,
#                   parameter-matched to nsa)
#   LC_OVERRIDES    extra key=value overrides for every training (e.g. a CPU dry run)
#   LC_EVAL         options for `nsa-lab eval needle` (default: --lengths 8192 --trials 20)
#   LC_SELECTION    1 (default) to run `nsa-lab eval selection` on the nsa checkpoint too
#   LC_SKIP_INSTALL 1 to use the environment as it is; PYTHON picks the interpreter
#   LC_WORK         work folder (default .lc_work)
# CPU dry run (a few minutes on 2 cores):
#   LC_SKIP_INSTALL=1 PYTHON=.venv/bin/python LC_STEPS=12 LC_DEADLINE=400 LC_OVERRIDES="\
#     model.n_layers=1 model.d_model=64 model.n_heads=2 model.n_kv_heads=1 model.head_dim=32 \
#     data.seq_len=512 model.max_seq_len=512 attn.w=64 attn.n=4 data.batch_size=2 \
#     data.curriculum_steps=4 train.val_every=6 train.val_batches=1 train.log_every=3 \
#     train.warmup_steps=2" LC_EVAL="--lengths 512 --depths 0,0.5,1 --trials 2" \
#     bash scripts/long_context_evidence.sh
set -uo pipefail
start=$(date +%s)
out=${OUT:-/tmp/lc_out}
work=${LC_WORK:-.lc_work}
steps=${LC_STEPS:-4000}
deadline=${LC_DEADLINE:-560}
eval_reserve=${LC_EVAL_RESERVE:-130}
read -r -a overrides <<<"${LC_OVERRIDES:-}"
read -r -a eval_opts <<<"${LC_EVAL:---lengths 8192 --trials 20}"
read -r -a variants <<<"${LC_VARIANTS:-full nsa window full_9l}"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

# The overrides that make each label's model.
variant_overrides() {
  case $1 in
    full | nsa | window | nsa_shared_kv) echo "attn.name=$1" ;;
    full_9l) echo "attn.name=full model.n_layers=9" ;;
    *) return 1 ;;
  esac
}
for label in "${variants[@]}"; do
  if ! variant_overrides "$label" >/dev/null; then
    echo "LC_VARIANTS: unknown label '$label' (known: full nsa window full_9l nsa_shared_kv)" >&2
    exit 2
  fi
done
mkdir -p "$out" "$work/results"
out=$(cd "$out" && pwd)
work=$(cd "$work" && pwd)
log="$work/lc_evidence.log"
say() { echo "[$(($(date +%s) - start))s] $*" | tee -a "$log"; }
store="sqlite:///$work/mlflow.db"
common=("tracking.uri=$store" "train.ckpt_dir=$work/ckpt" "data.cache_dir=$work/token_cache")

if [[ ${LC_SKIP_INSTALL:-0} != 1 ]]; then
  $py -m pip install -q --no-index --find-links .whl omegaconf optuna mlflow-skinny datasets matplotlib 2>&1 | grep -v "^WARNING" | tail -3
  $py -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
fi
n_gpus=$($py -c "import torch; print(torch.cuda.device_count())")
{
  echo "- date: $(date -u +%Y-%m-%d)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo ' (dirty tree)')"
  echo "- gpus ($n_gpus): $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sort | uniq -c | xargs || echo none)"
  echo "- $($py -c "import torch; print('torch', torch.__version__)") | $($py -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo 'triton: none')"
  echo "- training: nsa-lab train experiments/long_context.yaml <variant overrides> train.max_steps=$steps ${overrides[*]}"
  echo "- evaluation: nsa-lab eval needle CHECKPOINT ${eval_opts[*]}"
} | tee "$work/environment.md" | tee -a "$log"

say "== preparing the token cache"
$py -m nsa_lab prepare experiments/long_context.yaml "${common[@]}" "${overrides[@]}" 2>&1 | tee -a "$log" | tail -12

# Trains one label until LC_STEPS or the deadline, resuming its newest checkpoint.
train_label() {
  local label=$1 gpu=$2 budget=$3 t0 status resume=false
  read -r -a own <<<"$(variant_overrides "$label")"
  if [[ -f $work/results/$label.done ]]; then
    say "$label: already trained to $steps steps"
    return
  fi
  ls "$work/ckpt/lc-$label"/*.ckpt >/dev/null 2>&1 && resume=true
  say "== $label: training on GPU $gpu (resume=$resume, limit ${budget}s)"
  t0=$(date +%s)
  # SIGTERM: Lightning stops after the current step and leaves on_exception.ckpt.
  CUDA_VISIBLE_DEVICES=$gpu timeout -k 30 "$budget" $py -m nsa_lab train \
    experiments/long_context.yaml "${own[@]}" "${common[@]}" "tracking.run_name=lc-$label" \
    "train.max_steps=$steps" "train.resume=$resume" "${overrides[@]}" \
    >>"$work/train_$label.log" 2>&1
  status=$?
  ((status == 0)) && touch "$work/results/$label.done"
  say "$label: training exit $status after $(($(date +%s) - t0))s; $(grep -E '^run ' "$work/train_$label.log" | tail -1 || echo 'cut by the limit')"
}

# Evaluates the newest checkpoint of one label on the needle grid (and the selection, for nsa).
eval_label() {
  local label=$1 gpu=$2 ckpt
  ckpt=$(ls -t "$work/ckpt/lc-$label"/*.ckpt 2>/dev/null | head -1)
  if [[ -z $ckpt ]]; then
    say "$label: no checkpoint to evaluate"
    return
  fi
  say "== $label: evaluating $ckpt on GPU $gpu"
  NSA_LAB_AUTOTUNE=${NSA_LAB_AUTOTUNE:-0} CUDA_VISIBLE_DEVICES=$gpu $py -m nsa_lab eval needle \
    "$ckpt" --out "$work/results/$label" "${eval_opts[@]}" >"$work/results/$label.needle.md" \
    2>"$work/eval_$label.log" || tail -5 "$work/eval_$label.log" | tee -a "$log"
  if [[ $label == nsa && ${LC_SELECTION:-1} == 1 ]]; then
    NSA_LAB_AUTOTUNE=${NSA_LAB_AUTOTUNE:-0} CUDA_VISIBLE_DEVICES=$gpu $py -m nsa_lab eval \
      selection "$ckpt" --out "$work/results/$label" "${eval_opts[@]}" \
      >"$work/results/$label.selection.md" 2>>"$work/eval_$label.log" ||
      tail -5 "$work/eval_$label.log" | tee -a "$log"
  fi
  say "$label: evaluated"
}

gpu_of() { echo $(($1 % (n_gpus > 0 ? n_gpus : 1))); }
budget=$((deadline - ($(date +%s) - start) - eval_reserve))
for i in "${!variants[@]}"; do train_label "${variants[$i]}" "$(gpu_of "$i")" "$budget" & done
wait
for i in "${!variants[@]}"; do eval_label "${variants[$i]}" "$(gpu_of "$i")" & done
wait
say "== report"
$py -m nsa_lab report long_context "tracking.uri=$store" --out "$work/report" \
  >"$work/report.md" 2>>"$log" || say "report failed"

{
  echo "**Environment**"; echo; cat "$work/environment.md"; echo
  echo "**Trainings** (done = reached $steps steps)"; echo
  for label in "${variants[@]}"; do
    echo "- $label: $([[ -f $work/results/$label.done ]] && echo done || echo 'not done')"
  done
  for label in "${variants[@]}"; do
    echo; echo "**Needle: $label**"; echo; cat "$work/results/$label.needle.md" 2>/dev/null
  done
  [[ -f $work/results/nsa.selection.md ]] && { echo; echo "**Selection: nsa**"; echo; cat "$work/results/nsa.selection.md"; }
  echo; echo "**Report**"; echo; cat "$work/report.md" 2>/dev/null
} >"$out/lc_summary.md"
say "== done in $(($(date +%s) - start))s"
cp "$log" "$out/"
(cd "$work" && tar -czf "$out/lc_evidence.tar.gz" results report environment.md ./*.log mlflow.db 2>/dev/null)
ls -la "$out"
done_count=$(ls "$work"/results/*.done 2>/dev/null | wc -l)
((done_count == ${#variants[@]}))
