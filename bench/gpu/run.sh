#!/usr/bin/env bash
# The GPU checks of issue 22 in one prepared command, once bench/gpu/install.sh has installed the bundle.
# Each step runs under its own `timeout`, all of them within TOTAL_BUDGET seconds (480 by default); the report is
# rewritten after every step, so a run that is cut off keeps what it finished.
#
#   bash bench/gpu/run.sh --dry-run            # list the steps and their budgets (any machine)
#   bash bench/gpu/run.sh                      # on the GPU machine, after install.sh
#   bash bench/gpu/run.sh --only models,engine_tests
#
# Environment: FAST_SRT_SITE (the site dir install.sh filled, default /tmp/fast_srt_site), FAST_SRT_BUNDLE (the
# chunk dir, default /tmp/fast_srt_bundle: its payload/assets hold the tokenizer), REPORT_DIR (default $OUT when
# set, else bench/results/gpu_run_<date>), TOTAL_BUDGET, SIDE_TIMEOUT (seconds for each side of side_by_side,
# default 75), PYTHON (default python3).
# In REPORT_DIR: report.md (one row per step, each step's last lines) and logs.tar.gz (every step's full log and
# the reports the steps wrote) -- two files, within what a device command brings back.
set -uo pipefail
cd "$(dirname "$0")/../.."

SITE=${FAST_SRT_SITE:-/tmp/fast_srt_site}
BUNDLE=${FAST_SRT_BUNDLE:-/tmp/fast_srt_bundle}
MODELS=/tmp/fast_srt_models
PY=${PYTHON:-python3}
TOTAL_BUDGET=${TOTAL_BUDGET:-480}
SIDE_TIMEOUT=${SIDE_TIMEOUT:-75}   # each side of side_by_side: vLLM start-up, 3 steps, fast_srt's final checkpoint
REPORT_DIR=${REPORT_DIR:-${OUT:-bench/results/gpu_run_$(date +%Y-%m-%d)}}
WORK=/tmp/fast_srt_run      # logs and step reports (tarred into REPORT_DIR after every step)

# name | budget (s) | what it shows | command. The default set fits TOTAL_BUDGET; the optional ones (after the
# blank name) run only when named in --only.
STEPS=(
  "models|40|random-init SmolLM2-135M (the default's architecture, its real tokenizer) and Qwen2.5-1.5B shape|$PY bench/gpu/make_models.py --assets $BUNDLE/payload/assets/smollm2-135m --out $MODELS"
  "engine_tests|100|in-place weight write changes generation and log-probs; LoRA adapter written in place through vLLM's GPU kernels (tests/engine on CUDA)|$PY -m pytest -q -x -p no:cacheprovider tests/engine/test_weight_sync.py tests/engine/test_lora_engine.py -k 'not grouped'"
  "kv_release|60|KV cache released and woken around training: memory freed, same greedy tokens|$PY bench/checks/gpu_check.py --only kv_release --model $MODELS/smollm2-135m --report $WORK/gpu_check_kv_release.md"
  "train_3|110|3-step self-play run of the default config on the random-init default architecture|$PY bench/checks/gpu_check.py --only train_3 --model $MODELS/smollm2-135m --report $WORK/gpu_check_train_3.md"
  "side_by_side|$((2 * SIDE_TIMEOUT + 10))|fast_srt vs TRL GRPOTrainer (vLLM colocate), Qwen2.5-1.5B shape, 64 x 256 fixed-length tokens per step, 3 steps|$PY bench/gpu/compare_trl_gpu.py --model $MODELS/qwen2.5-1.5b --steps 3 --new-tokens 256 --side-timeout $SIDE_TIMEOUT --out $WORK/side_by_side.md"
  "||||"
  "kernels|60|compiled Triton kernels against their torch twins (passed on 2026-11-30)|$PY bench/checks/gpu_check.py --only kernels --report $WORK/gpu_check_kernels.md"
  "learner|120|learner step on synthetic games, SmolLM2-135M shape (measured on 2026-11-30)|$PY bench/checks/gpu_check.py --only learner --report $WORK/gpu_check_learner.md"
  "logprob_peers|150|fused log-probs against Liger and full logits at [8192, 4096, 151936] bf16|$PY bench/checks/gpu_check.py --only logprob_peers --report $WORK/gpu_check_logprob_peers.md"
  "learner_tests|90|one-call attention (torch varlen) and the fused RMSNorm/SwiGLU/RoPE Triton kernels against their twins on CUDA|$PY -m pytest -q -x -p no:cacheprovider tests/learner/test_packed_attention.py tests/kernels/test_fused_ops.py tests/learner/test_prefix_sharing.py tests/learner/test_policy.py"
  "learner_135m|150|learner step, SmolLM2-135M shape, 32 games: wall, host and device s per phase, kernel launches (the profiled last step), MFU; profile file|$PY bench/steps/learner_step.py --arch smollm2-135m --games 32 --steps 4 --count-ops --profile $WORK/learner_135m_profile.txt --report $WORK/learner_135m.md"
  "learner_135m_before|150|the same with the per-piece attention and transformers' small ops (the path before one call per layer)|$PY bench/steps/learner_step.py --arch smollm2-135m --games 32 --steps 4 --count-ops --attention per_piece --fused torch --profile $WORK/learner_135m_before_profile.txt --report $WORK/learner_135m_before.md"
  "learner_1p5b|200|learner step, Qwen2.5-1.5B shape, 32 games: as learner_135m; profile file|$PY bench/steps/learner_step.py --arch qwen2.5-1.5b --games 32 --steps 4 --count-ops --profile $WORK/learner_1p5b_profile.txt --report $WORK/learner_1p5b.md"
  "head_dtype|90|output head fp32 master weights vs TF32 vs bf16: fwd+bwd s and log-prob error against float64, 135M and 1.5B heads|$PY bench/ab/head_dtype.py --shape smollm2-135m --report $WORK/head_dtype_135m.md \&\& $PY bench/ab/head_dtype.py --shape qwen2.5-1.5b --report $WORK/head_dtype_1p5b.md"
)

DRY=0
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY=$2; shift ;;
    --only=*) ONLY=${1#--only=} ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (use --dry-run, --only a,b)" >&2; exit 2 ;;
  esac
  shift
done

selected() {  # step name, whether it is in the default set -> 0 when it runs
  if [ -n "$ONLY" ]; then [[ ",$ONLY," == *",$1,"* ]]; else [ "$2" = 1 ]; fi
}

known=","
default=1
for s in "${STEPS[@]}"; do
  IFS='|' read -r name _ _ _ <<< "$s"
  if [ -z "$name" ]; then default=0; else known="$known$name,"; fi
done
for n in ${ONLY//,/ }; do
  [[ "$known" == *",$n,"* ]] || { echo "run.sh: unknown step $n; steps:${known//,/ }" >&2; exit 2; }
done

if [ "$DRY" = 1 ]; then
  echo "run.sh (dry run): steps, each under its own timeout, $TOTAL_BUDGET s in all"
  total=0
  default=1
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name budget what cmd <<< "$s"
    if [ -z "$name" ]; then default=0; echo "optional (run with --only NAME):"; continue; fi
    mark=" "
    if selected "$name" "$default"; then mark="*"; total=$((total + budget)); fi
    printf '%s %-13s %4ss  %s\n' "$mark" "$name" "$budget" "$what"
    printf '      %s\n' "$cmd"
  done
  echo "selected (*): $total s of $TOTAL_BUDGET s; report in $REPORT_DIR/report.md, logs in $REPORT_DIR/logs.tar.gz"
  exit 0
fi

if [ ! -d "$SITE" ]; then
  echo "run.sh: $SITE does not exist: run bash bench/gpu/install.sh first (docs/gpu.md)" >&2
  exit 2
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
rm -rf "$WORK"  # this run's logs only
mkdir -p "$REPORT_DIR" "$WORK"
REPORT="$REPORT_DIR/report.md"
ROWS="$WORK/rows.md"
TAILS="$WORK/tails.md"
: > "$ROWS"
: > "$TAILS"
start=$(date +%s)
header="# GPU run $(date +%Y-%m-%dT%H:%M:%S)

$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi');
commit ${FAST_SRT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}; PYTHONPATH=$SITE;
command \`bash bench/gpu/run.sh${ONLY:+ --only $ONLY}\`; budget $TOTAL_BUDGET s."

write_report() {
  { echo "$header"; echo; echo "| step | result | seconds | budget | what |"; echo "|---|---|---:|---:|---|"
    cat "$ROWS"; echo; cat "$TAILS"; } > "$REPORT"
  tar -czf "$REPORT_DIR/logs.tar.gz.tmp" -C "$WORK" . 2>/dev/null && mv "$REPORT_DIR/logs.tar.gz.tmp" "$REPORT_DIR/logs.tar.gz"
}

default=1
failed=0
for s in "${STEPS[@]}"; do
  IFS='|' read -r name budget what cmd <<< "$s"
  if [ -z "$name" ]; then default=0; continue; fi
  selected "$name" "$default" || continue
  left=$((TOTAL_BUDGET - ($(date +%s) - start)))
  if [ "$left" -lt 10 ]; then
    echo "| $name | not run: the total budget is spent | | $budget | $what |" >> "$ROWS"
    write_report
    continue
  fi
  limit=$(( budget < left ? budget : left ))
  echo "[run.sh] $name (up to $limit s): $cmd"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$cmd" > "$WORK/$name.log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  case $rc in
    0) result="ok" ;;
    124|137) result="timed out"; failed=$((failed + 1)) ;;
    *) result="failed (exit $rc)"; failed=$((failed + 1)) ;;
  esac
  echo "[run.sh] $name: $result in $dt s"
  tail -n 5 "$WORK/$name.log" | sed 's/^/    /'
  echo "| $name | $result | $dt | $limit | $what |" >> "$ROWS"
  { echo "## $name ($result, $dt s)"; echo; echo '```'; echo "$cmd"; echo; tail -n 25 "$WORK/$name.log" | cut -c1-400
    echo '```'; echo; } >> "$TAILS"
  write_report
done
echo "[run.sh] done in $(( $(date +%s) - start )) s, $failed step(s) not ok; report: $REPORT"
[ "$failed" = 0 ]
