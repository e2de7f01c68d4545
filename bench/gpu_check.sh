#!/usr/bin/env bash
# The GPU check: every CUDA path this project has, run and recorded on one GPU box.
#
#   bash bench/gpu_check.sh [DIR]          # default DIR: ./gpu_check_out
#
# Stages (each logged to DIR/logs/<stage>.log, one line each in DIR/summary.md):
#   info         the device, driver, torch / transformers / triton versions
#   cuda_tests   tests/test_cuda.py (bf16 / fp16 with the grad scaler, shared prefix, chunked head
#                losses, --compile with Triton, SIGTERM + resume, non-finite steps; BERT and Llama pairs)
#   cpu_subset   a subset of the CPU suite under this box's torch and transformers (in the background,
#                on the CPU only: CUDA_VISIBLE_DEVICES is emptied), when pytest-xdist is there
#   setup_*      a BERT teacher and an extracted DistilBERT student, tiny and BERT-base shapes,
#                through the pipeline's own scripts (bench/gpu_check_setup.py)
#   train_*      causal_train.py --n_gpu 1 with --bf16, --fp16, --bf16 --compile
#   torchrun     torchrun --nproc_per_node 1 (NCCL), SIGTERM to the process group, then --resume
#   bench_*      bench/bench_train_step.py on CUDA in bf16: the base preset (WikiText-like lengths and
#                all-512), the largest batch at length 512, the base_clm preset (Llama, vocabulary
#                128,256), a torch.profiler table per mode; fp16 beside bf16 at length 512
#   quickstart   scripts/quickstart.py --preset gpu, shortened (QUICKSTART_ARGS), when time is left
#
# Environment: GPU_CHECK_BUDGET (seconds for the whole check, default 3600: a stage that would not
# fit in what is left is skipped and says so), TOKENIZER (a local BERT tokenizer folder for the
# set-up; default: a WordPiece learned from the standard library's prose), STAGES (a regex of the
# stages to run, default all), PYTHON (default python3), TRAIN_EXTRA (flags added to every causal_train.py run, e.g. a smaller --batch_size for a CPU smoke test), TORCHRUN_SHAPE (tiny|base, default base), QUICKSTART_ARGS (default "--seeds 1 --steps 300 --teacher_steps 1500").
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-gpu_check_out}
mkdir -p "$DIR/logs" "$DIR/profile" "$DIR/work"
DIR=$(cd "$DIR" && pwd)
BUDGET=${GPU_CHECK_BUDGET:-3600}
STAGES=${STAGES:-.}
QUICKSTART_ARGS=${QUICKSTART_ARGS:---seeds 1 --steps 300 --teacher_steps 1500}
TORCHRUN_SHAPE=${TORCHRUN_SHAPE:-base}
TRAIN_EXTRA=${TRAIN_EXTRA:-}
PY=${PYTHON:-$(command -v python3 || command -v python)}
# The repository's modules, importable where it is not pip-installed (a bare GPU box)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
SUMMARY=$DIR/summary.md
START=$SECONDS
echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ) on $(hostname)" >"$SUMMARY"
echo "" >>"$SUMMARY"
echo "| stage | result | seconds |" >>"$SUMMARY"
echo "|---|---|---|" >>"$SUMMARY"

left() { echo $((BUDGET - (SECONDS - START))); }

# stage NAME MAX_SECONDS MIN_SECONDS command...: run when wanted and at least MIN_SECONDS remain,
# under a timeout of min(MAX_SECONDS, what remains); record the outcome.
stage() {
    local name=$1 max=$2 min=$3
    shift 3
    if ! [[ $name =~ $STAGES ]]; then return 0; fi
    local remaining
    remaining=$(left)
    if ((remaining < min)); then
        echo "| $name | skipped: ${remaining}s left of GPU_CHECK_BUDGET, needs ${min}s | 0 |" >>"$SUMMARY"
        echo "== $name skipped (${remaining}s left)"
        return 0
    fi
    local limit=$((max < remaining ? max : remaining))
    echo "== $name (limit ${limit}s)"
    local t0=$SECONDS rc
    # (functions of this script run through bash -c: timeout runs programs, and stops the whole group)
    timeout --kill-after=10 "$limit" bash -c '"$@"' stage "$@" >"$DIR/logs/$name.log" 2>&1
    rc=$?
    local took=$((SECONDS - t0)) result=ok
    if ((rc == 124 || rc == 137)); then result="TIMEOUT after ${limit}s"; elif ((rc != 0)); then result="FAILED (exit $rc)"; fi
    echo "| $name | $result | $took |" >>"$SUMMARY"
    echo "   $result in ${took}s"
    tail -n 3 "$DIR/logs/$name.log" | sed 's/^/   | /'
    return 0
}

info() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PY" -c "
import sys, torch, transformers
print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda)
print('transformers', transformers.__version__)
print('device', torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for m in ('triton', 'datasets', 'tensorboardX', 'seqeval', 'accelerate', 'xdist'):
    try:
        mod = __import__(m); print(m, getattr(mod, '__version__', '?'))
    except Exception as err:
        print(m, 'MISSING', type(err).__name__, err)
"
}
export DIR TORCHRUN_SHAPE PY TRAIN_EXTRA
export -f info
stage info 60 10 info
grep -E "^(torch|transformers|device|triton|datasets|tensorboardX|seqeval|NVIDIA|name)" "$DIR/logs/info.log" | sed 's/^/    /' >>"$SUMMARY.info"

# The CPU subset under this box's versions, in the background while the GPU tests run.
CPU_PID=
if [[ cpu_subset =~ $STAGES ]] && "$PY" -c "import xdist" 2>/dev/null && (($(left) > 300)); then
    (CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 timeout 400 "$PY" -m pytest -q -p no:cacheprovider -n 8 \
        tests/test_losses.py tests/test_shared_prefix.py tests/test_interventions.py tests/test_step_interventions.py \
        tests/test_llama_family.py tests/test_cpu_dropout.py tests/test_batching.py tests/test_neuron_mapping.py \
        >"$DIR/logs/cpu_subset.log" 2>&1
     echo "exit $?" >>"$DIR/logs/cpu_subset.log") &
    CPU_PID=$!
fi

stage cuda_tests 420 120 "$PY" -m pytest -q -p no:cacheprovider -rA --durations=15 tests/test_cuda.py

W=$DIR/work
TOK_ARGS=()
if [[ -n ${TOKENIZER:-} ]]; then TOK_ARGS=(--tokenizer "$TOKENIZER"); fi
stage setup_tiny 180 60 "$PY" bench/gpu_check_setup.py --out "$W" --shape tiny "${TOK_ARGS[@]}"
stage setup_base 180 60 "$PY" bench/gpu_check_setup.py --out "$W" --shape base "${TOK_ARGS[@]}"

# causal_train.py on one GPU: the seed README's DIITO recipe, short. train_cmd SHAPE DUMP flags... sets CMD.
train_cmd() {
    local shape=$1 dump=$2
    shift 2
    eval "$(grep -E '^[A-Z]+=' "$DIR/logs/setup_$shape.log")"
    CMD=(causal_train.py --force --log_interval 10 --student_type distilbert
        --student_config "$STUDENT" --student_pretrained_weights "$STUDENT"
        --teacher_type bert --teacher_name "$TEACHER" --neuron_mapping "$MAPPING"
        --mlm --alpha_ce 0.25 --alpha_mlm 0.25 --alpha_cos 0.25 --alpha_clm 0.0
        --alpha_causal_ce 0.25 --alpha_causal_cos 0.0
        --interchange_prop 0.3 --interchange_max_token -1 --interchange_consecutive_only --freeze_pos_embs
        --dump_path "$dump" --data_file "$DATA" --token_counts "$COUNTS" --no_progress
        --seed 42 --n_epoch 3 --gradient_accumulation_steps 2 --batch_size 40 --n_gpu 1 "$@" ${TRAIN_EXTRA:-})
}
run_train() {  # SHAPE NAME flags...
    local shape=$1 name=$2
    shift 2
    train_cmd "$shape" "$W/$name" "$@"
    "$PY" "${CMD[@]}"
}
export W
export -f train_cmd run_train
stage train_tiny_bf16 120 40 run_train tiny tiny_bf16 --bf16 --max_steps 40
stage train_tiny_fp16 120 40 run_train tiny tiny_fp16 --fp16 --max_steps 40
stage train_base_bf16_compile 240 60 run_train base base_bf16c --bf16 --compile --max_steps 60

# torchrun with NCCL: SIGTERM to the whole process group mid-run, then --resume to a longer run.
torchrun_check() {
    local dump=$W/torchrun log=$DIR/logs/torchrun_first.log
    train_cmd "$TORCHRUN_SHAPE" "$dump" --bf16 --max_steps 400 --checkpoint_interval 0
    setsid "$PY" -m torch.distributed.run --nproc_per_node 1 "${CMD[@]}" >"$log" 2>&1 &
    local pid=$! waited=0
    until grep -q "step 20 |" "$log" 2>/dev/null || ! kill -0 "$pid" 2>/dev/null || ((waited > 1200)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    echo "sending SIGTERM to torchrun's process group (pid $pid) at: $(grep -o 'step [0-9]* |' "$log" | tail -n 1)"
    kill -TERM -- "-$pid"
    wait "$pid"
    echo "torchrun exit status after SIGTERM: $?"
    tail -n 8 "$log"
    local ckpt
    ckpt=$(find "$dump" -maxdepth 1 -name 'checkpoint-*' ! -name checkpoint-0 | sort -V | tail -n 1)
    [[ -n $ckpt ]] || { echo "no stop checkpoint written"; return 1; }
    echo "stop checkpoint: $ckpt"
    train_cmd "$TORCHRUN_SHAPE" "$dump" --bf16 --max_steps 60 --checkpoint_interval 0 --resume
    "$PY" -m torch.distributed.run --nproc_per_node 1 "${CMD[@]}" || return 1
    ls "$dump"
    [[ -f $dump/model.safetensors ]]
}
export -f torchrun_check
stage torchrun_sigterm_resume 300 90 torchrun_check

if [[ -n $CPU_PID ]]; then  # the bench must have the machine to itself
    if kill -0 "$CPU_PID" 2>/dev/null; then
        pkill -TERM -f "pytest -q -p no:cacheprovider -n 8" 2>/dev/null
        echo "exit: stopped before the bench" >>"$DIR/logs/cpu_subset.log"
    fi
    wait "$CPU_PID"
    rc=$(grep '^exit' "$DIR/logs/cpu_subset.log" | head -n 1)
    echo "| cpu_subset (CPU, this box's versions) | $rc: $(grep -E '[0-9]+ (passed|failed)' "$DIR/logs/cpu_subset.log" | tail -n 1) | - |" >>"$SUMMARY"
fi

# The bench: figures of the training step in bf16 (each mode in its own process).
BENCH=("$PY" bench/bench_train_step.py --device cuda --dtypes bf16 --steps 6 --warmup 3 --timeout 300)
stage bench_base 360 90 "${BENCH[@]}" --preset base --json_out "$DIR/bench_base.json"
stage bench_base_512 360 90 "${BENCH[@]}" --preset base --seq_len 512 --profile "$DIR/profile" \
    --json_out "$DIR/bench_base_512.json"
stage bench_base_clm_512 420 120 "${BENCH[@]}" --preset base_clm --seq_len 512 --profile "$DIR/profile" \
    --json_out "$DIR/bench_base_clm_512.json"
stage bench_max_batch 420 120 "${BENCH[@]}" --preset base --seq_len 512 --modes kd,diito_shared --max_batch \
    --json_out "$DIR/bench_max_batch.json"
stage bench_fp16_512 300 60 "${BENCH[@]}" --preset base --seq_len 512 --modes kd,diito_shared --dtypes bf16,fp16 \
    --json_out "$DIR/bench_fp16_512.json"

# shellcheck disable=SC2086
stage quickstart 1800 120 "$PY" scripts/quickstart.py --preset gpu --out "$W/quickstart" $QUICKSTART_ARGS
if [[ -f $W/quickstart/report.md ]]; then cp "$W/quickstart/report.md" "$DIR/quickstart_report.md"; fi

{
    echo ""
    cat "$SUMMARY.info" 2>/dev/null
    echo ""
    echo "total $((SECONDS - START)) s"
    for f in "$DIR"/logs/bench_*.log; do
        [[ -f $f ]] && { echo ""; echo "### $(basename "$f" .log)"; sed -n '/^## bench_train_step/,$p' "$f"; }
    done
} >>"$SUMMARY"
rm -f "$SUMMARY.info"
echo ""
cat "$SUMMARY"
