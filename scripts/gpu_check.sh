#!/usr/bin/env bash
# The GPU self-check (issue 17 part 4): oaif's GPU paths in one short run on a machine with an
# NVIDIA GPU, one table at the end (check, result, seconds, key number).
#
#   scripts/gpu_check.sh              # run every check (about 8 minutes at most, --budget)
#   scripts/gpu_check.sh --dry-run    # print the commands it would run; needs no GPU
#   scripts/gpu_check.sh --budget 300 # seconds for all checks together (default 450)
#
# Pythons: $OAIF_PYTHON (default .venv/bin/python, else python3) trains; $OAIF_VLLM_PYTHON (default
# .venv-vllm/bin/python, else $OAIF_PYTHON when it imports vLLM) runs vLLM; .venv-bench/bin/python
# (TRL) runs the benchmark when present, else oaif's side of it alone. Logs: $OAIF_GPU_CHECK_DIR
# (default a new /tmp/oaif-gpu-check.* directory). Exit status: 0 when every check that ran passed.
# Without a GPU it says so in one line and exits 1. docs/scaling.md's "GPU" section says what each checks.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD

DRY=0
BUDGET=450
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (--dry-run, --budget SECONDS)" >&2; exit 2 ;;
  esac
  shift
done

PY=${OAIF_PYTHON:-}
[ -n "$PY" ] || { [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; }
VPY=${OAIF_VLLM_PYTHON:-}
if [ -z "$VPY" ]; then
  if [ -x .venv-vllm/bin/python ]; then VPY=.venv-vllm/bin/python
  elif [ "$DRY" = 1 ] || "$PY" -c "import vllm" >/dev/null 2>&1; then VPY=$PY
  fi
fi
BPY=$PY
[ -x .venv-bench/bin/python ] && BPY=.venv-bench/bin/python
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

OUT=${OAIF_GPU_CHECK_DIR:-}
if [ "$DRY" = 1 ]; then OUT=${OUT:-/tmp/oaif-gpu-check}; else OUT=${OUT:-$(mktemp -d /tmp/oaif-gpu-check.XXXXXX)}; fi
PORT=${OAIF_GPU_CHECK_PORT:-8765}
GPUS=1

if [ "$DRY" = 0 ]; then
  GPUS=$(CUDA_DEVICE_ORDER=PCI_BUS_ID "$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null)
  if [ "${GPUS:-0}" = 0 ]; then
    echo "gpu_check: no GPU here (torch at $PY sees no CUDA device); nothing run. --dry-run lists the checks." >&2
    exit 1
  fi
  mkdir -p "$OUT"
fi

# ---------------------------------------------------------------------------------- the checks
# The settings the CLI checks share: a rule judge except where the judge itself is checked, short runs.
RULE="annotator.type=callable annotator.callable=oaif.annotators.rules:prefer_shorter"
SHORT="train.device=cuda train.max_steps=3 train.save_every=0 logging.progress_bar=false"
MODEL_DIR="\$($PY -c 'from oaif.models.resolve import resolve_model_path; print(resolve_model_path(\"smollm2-135m-instruct\"))')"
SERVER_URL="http://127.0.0.1:$PORT"
N=$(( GPUS >= 2 ? 2 : 1 ))
MULTI=$([ "$N" -gt 1 ] && echo "--multi_gpu ")
QWEN=""
if [ "$DRY" = 0 ]; then
  HUB=${HF_HUB_CACHE:-${HF_HOME:-$HOME/.cache/huggingface}/hub}
  for name in Qwen2.5-0.5B-Instruct Qwen3-0.6B Qwen2.5-1.5B-Instruct Qwen3-1.7B Qwen2.5-Coder-1.5B-Instruct; do
    if [ -d "$HUB/models--Qwen--$name/snapshots" ]; then QWEN="Qwen/$name"; break; fi
  done
fi

NAMES=(pytest_trainer train_cli vllm_colocated pytest_vllm_colocated vllm_server vllm_server_disk
       vllm_collective pytest_vllm_server fsdp bench_smollm2 colocated_2gpu bench_qwen)
declare -A CMD LIMIT
CMD[pytest_trainer]="OAIF_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_trainer.py"
LIMIT[pytest_trainer]=120
CMD[train_cli]="$PY -m oaif.cli train configs/demo.yaml $SHORT train.output_dir=$OUT/train_cli"
LIMIT[train_cli]=120
CMD[vllm_colocated]="$VPY -m oaif.cli train configs/vllm_demo.yaml $RULE $SHORT train.output_dir=$OUT/vllm_colocated"
LIMIT[vllm_colocated]=150
CMD[pytest_vllm_colocated]="OAIF_TEST_DEVICE=cuda $VPY -m pytest -q -p no:cacheprovider -m gpu tests/test_vllm_colocated_trainer.py"
LIMIT[pytest_vllm_colocated]=150
CMD[vllm_server]="VLLM_SERVER_DEV_MODE=1 $VPY -m vllm.entrypoints.openai.api_server --model $MODEL_DIR --host 127.0.0.1 --port $PORT --worker-extension-cls oaif.generation.vllm_worker.WeightSyncExtension --no-enable-chunked-prefill --max-num-batched-tokens 2048 --max-model-len 2048 --enforce-eager --gpu-memory-utilization 0.25"
LIMIT[vllm_server]=150
CMD[vllm_server_disk]="$PY -m oaif.cli train configs/vllm_demo.yaml $RULE $SHORT vllm.mode=server vllm.server_url=$SERVER_URL train.output_dir=$OUT/vllm_server_disk"
LIMIT[vllm_server_disk]=90
# collective sync: NCCL when the server is on another GPU; on one GPU (the server on the trainer's) auto uses gloo.
CMD[vllm_collective]="$PY -m oaif.cli train configs/vllm_demo.yaml $RULE $SHORT vllm.mode=server vllm.server_url=$SERVER_URL vllm.weight_sync=collective train.output_dir=$OUT/vllm_collective"
LIMIT[vllm_collective]=90
CMD[pytest_vllm_server]="OAIF_TEST_DEVICE=cuda OAIF_VLLM_PYTHON=$VPY $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_vllm_trainer.py"
LIMIT[pytest_vllm_server]=150
# One GPU: one process (train.fsdp is then a no-op with a note); several GPUs: one process each, sharded.
CMD[fsdp]="$PY -m accelerate.commands.launch ${MULTI}--num_processes $N --num_machines 1 --mixed_precision no --dynamo_backend no -m oaif.cli train configs/demo.yaml $RULE $SHORT train.fsdp=true train.output_dir=$OUT/fsdp"
LIMIT[fsdp]=120
ONLY=$([ "$BPY" = "$PY" ] && echo " --only oaif")
CMD[bench_smollm2]="$BPY benchmarks/bench_vs_trl.py --device cuda --steps 3 --rounds 1 --no-floors$ONLY"
LIMIT[bench_smollm2]=150
CMD[colocated_2gpu]="$VPY -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no -m oaif.cli train configs/vllm_demo.yaml $RULE $SHORT train.batch_size=2 train.output_dir=$OUT/colocated_2gpu"
LIMIT[colocated_2gpu]=180
CMD[bench_qwen]="$BPY benchmarks/bench_vs_trl.py --device cuda --steps 3 --rounds 1 --no-floors$ONLY --model ${QWEN:-Qwen/Qwen2.5-0.5B-Instruct}"
LIMIT[bench_qwen]=180

if [ "$DRY" = 1 ]; then
  for name in "${NAMES[@]}"; do echo "$name: ${CMD[$name]}"; done
  exit 0
fi

# ---------------------------------------------------------------------------------- running them
DEADLINE=$((SECONDS + BUDGET))
declare -A RESULT SECS KEY
SERVER_PID=""

stop_server() {
  [ -n "$SERVER_PID" ] && { kill -TERM -- "-$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; }
  SERVER_PID=""
}
trap stop_server EXIT

metric() {  # metric RUN_DIR KEY...: the median of each key over the run's metrics.jsonl
  "$PY" - "$@" <<'EOF'
import json, statistics, sys
from pathlib import Path
run, keys = Path(sys.argv[1]), sys.argv[2:]
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
print(", ".join(f"{k} {statistics.median(r[k] for r in rows if k in r):.3g}" for k in keys) + f" ({len(rows)} steps)")
EOF
}

key_number() {  # key_number NAME LOG
  case "$1" in
    pytest_*) grep -E "[0-9]+ (passed|failed)" "$2" | tail -n 1 | sed -E 's/ in [0-9.]+s.*//; s/=//g; s/^ +//' ;;
    train_cli|fsdp) metric "$OUT/$1" time_step_s pairs_used 2>/dev/null ;;
    vllm_colocated|vllm_server_disk|colocated_2gpu) metric "$OUT/$1" time_weight_sync_s time_sample_s 2>/dev/null ;;
    vllm_collective)
      echo "$(metric "$OUT/$1" time_weight_sync_s time_sample_s 2>/dev/null); files in vllm_weights:" \
           "$(find "$OUT/$1/vllm_weights" -type f 2>/dev/null | wc -l)" ;;
    vllm_server) echo "$SERVER_URL" ;;
    bench_*) grep -E "^oaif " "$2" | awk '{print "step " $2 " s, sample " $3 " s, update " $5 " s, peak " $9 " GiB"}' ;;
  esac
}

start_server() {  # the server of the two server-mode checks; ready when /health answers
  setsid bash -c "exec ${CMD[vllm_server]}" >"$OUT/vllm_server.log" 2>&1 &  # its own process group
  SERVER_PID=$!
  local until=$((SECONDS + $1))
  while [ $SECONDS -lt $until ]; do
    "$PY" -c "import urllib.request; urllib.request.urlopen('$SERVER_URL/health', timeout=2)" 2>/dev/null && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || return 1
    sleep 2
  done
  return 124
}

run_check() {  # run_check NAME: runs it under its limit (and what is left of the budget), records the row
  local name=$1 left=$((DEADLINE - SECONDS)) limit=${LIMIT[$1]} start=$SECONDS rc
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then RESULT[$name]="skipped"; KEY[$name]="out of --budget"; SECS[$name]=0; return; fi
  echo "gpu_check: $name (up to ${limit}s)" >&2
  if [ "$name" = vllm_server ]; then
    start_server "$limit"; rc=$?
  else
    timeout --kill-after=10 "$limit" bash -c "${CMD[$name]}" >"$OUT/$name.log" 2>&1; rc=$?
  fi
  SECS[$name]=$((SECONDS - start))
  case $rc in
    0) RESULT[$name]="pass" ;;
    124|137) RESULT[$name]="timeout" ;;
    *) RESULT[$name]="FAIL($rc)" ;;
  esac
  KEY[$name]=$(key_number "$name" "$OUT/$name.log")
  [ "$rc" = 0 ] || KEY[$name]="${KEY[$name]:+${KEY[$name]}; }log: $OUT/$name.log"
}

skip() { RESULT[$1]="skipped"; SECS[$1]=0; KEY[$1]=$2; }

for name in "${NAMES[@]}"; do
  case "$name" in
    vllm_*|pytest_vllm_*|colocated_2gpu) [ -z "$VPY" ] && { skip "$name" "no Python with vLLM (OAIF_VLLM_PYTHON)"; continue; } ;;
  esac
  case "$name" in
    vllm_server_disk|vllm_collective)
      [ "${RESULT[vllm_server]}" = pass ] || { skip "$name" "the server did not start"; continue; } ;;
    pytest_vllm_server) stop_server ;;  # its own server; this one's memory freed first
    colocated_2gpu) [ "$GPUS" -lt 2 ] && { skip "$name" "needs 2 GPUs, this machine has $GPUS"; continue; } ;;
    bench_qwen) [ -z "$QWEN" ] && { skip "$name" "no Qwen 0.5B-1.5B in the Hugging Face cache"; continue; } ;;
  esac
  run_check "$name"
done
stop_server

CARD=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
VERSIONS=$("$PY" -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}')" 2>/dev/null)
[ -n "$VPY" ] && VERSIONS="$VERSIONS, vllm $("$VPY" -c 'import vllm; print(vllm.__version__)' 2>/dev/null)"
echo
echo "oaif GPU check: $GPUS x ${CARD:-unknown GPU}; $VERSIONS; commit $(git rev-parse --short HEAD 2>/dev/null); logs $OUT"
printf '| %-21s | %-9s | %7s | %s\n' check result seconds "key number"
printf '| %-21s | %-9s | %7s | %s\n' --- --- --- ---
FAILED=0
for name in "${NAMES[@]}"; do
  printf '| %-21s | %-9s | %7s | %s\n' "$name" "${RESULT[$name]}" "${SECS[$name]}" "${KEY[$name]}"
  case "${RESULT[$name]}" in pass|skipped) ;; *) FAILED=1 ;; esac
done
exit $FAILED
