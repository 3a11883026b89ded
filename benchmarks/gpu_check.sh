#!/usr/bin/env bash
# The prepared check of the CUDA paths on one GPU (issue 16): nvidia-smi, the `gpu` tests, the trainer benchmark with
# an SD-1.5-size UNet in fp16 beside TRL's DDPOTrainer, and the MRC reward's time per sample on CUDA.
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]     # OUTPUT_DIR defaults to $OUT if set, else gpu_check_results/
#   make gpu-check [GPU_CHECK_OUT=OUTPUT_DIR]
#
# What it assumes (read this first):
# - A fresh machine: the project's set-up (scripts/bootstrap.sh, what `make setup` runs) runs first and creates
#   .venv. Nothing else is installed by hand.
# - The machine may not reach the internet at all (no PyPI). Set-up then fails within seconds (pip gets one retry and
#   a 15 s timeout here); that is recorded and the check goes on: with .venv/bin/python when it imports the project's
#   dependencies, else with python3 and the repository on PYTHONPATH. If python3 lacks some of them (on a bare CUDA
#   image typically diffusers, trl, lpips, datasets), put their wheels in .whl/ (or $GPU_CHECK_WHEELS): they are
#   installed offline (pip --no-index --no-deps --target) before the tests; benchmarks/RESULTS.md ("GPU") has the
#   command that fetched them for an H200 image (Python 3.12). Nothing is downloaded: the models are built in-process
#   with random weights, and HF_HUB_OFFLINE=1 is set.
# - One GPU (written for an H200 with 16 CPU cores): the whole check takes at most GPU_CHECK_BUDGET seconds (450,
#   plus at most 15 s to kill a step that overran: under 8 minutes). Every step runs under `timeout`, each with a
#   limit that keeps the later steps' minimum times in the budget; a failing or timed-out step (exit code 124) does
#   not stop the later steps.
#
# The output folder holds 8 files (a tool that returns at most 8 files returns them all):
#   summary.txt       exit code, duration and limit of every step, the interpreter and versions
#   nvidia-smi.txt    nvidia-smi, and the GPU's name, memory, clocks and driver as CSV
#   steps.log         the set-up's output and the progress and errors (stderr) of every step
#   gpu_tests.log     `pytest -m gpu -rs -v` (tests/gpu: training in fp16/bf16, KL, resume, memory, MRC CUDA vs CPU)
#   gpu_tests.xml     the same as JUnit XML
#   bench_trainer.md  benchmarks/bench_trainer.py: epoch times of DDPOTrainer and Carve3DTrainer KL off / on and their
#                     ratios, and the peak CUDA memory KL on / off (LoRA and full fine-tuning)
#   mrc_speed.md      benchmarks/bench_mrc_speed.py on CUDA: MRC seconds per sample, 4 views of 64 and 256 px,
#   mrc_speed.json    batches of 1, 8 and 32 (table, then JSON)
#
# Knobs (environment): GPU_CHECK_DRY_RUN=1 runs the same steps on CPU with tiny sizes (to test this script without a
# GPU; the gpu tests then skip); GPU_CHECK_SKIP_SETUP=1 skips set-up (an existing .venv is used as it is);
# GPU_CHECK_BUDGET (seconds); GPU_CHECK_SETUP_TIMEOUT (by default set-up gets at most 120 s of the budget; set, it
# gets exactly that limit, outside the budget: for a machine that must download PyTorch); GPU_CHECK_WHEELS (a folder
# of wheels, default .whl).

set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${1:-${OUT:-gpu_check_results}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$ROOT"

DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
BUDGET=${GPU_CHECK_BUDGET:-$([ "$DRY_RUN" = 1 ] && echo 1500 || echo 450)}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

SUMMARY=$OUT_DIR/summary.txt
STEPS_LOG=$OUT_DIR/steps.log
: >"$STEPS_LOG"
TABLE=$(mktemp)
trap 'rm -f "$TABLE"' EXIT

# Minimum seconds each later step keeps in the budget (a step's limit is its maximum, cut so that these still fit).
declare -A MIN_SECONDS=([nvidia-smi]=5 [setup]=20 [wheels]=10 [environment]=10 [gpu_tests]=90 [bench_trainer]=120
    [mrc_speed]=60)
REMAINING=(nvidia-smi setup wheels environment gpu_tests bench_trainer mrc_speed)

log() { echo "$*" >>"$STEPS_LOG"; }

forget_step() {
    local kept=() step
    for step in "${REMAINING[@]}"; do
        [ "$step" != "$1" ] && kept+=("$step")
    done
    REMAINING=("${kept[@]}")
}

# run_step NAME MAX_SECONDS STDOUT_FILE STDERR_FILE COMMAND...: run COMMAND under `timeout`, record its exit code.
run_step() {
    local name=$1 max=$2 stdout=$3 stderr=$4
    shift 4
    forget_step "$name"
    local reserve=0 later
    for later in "${REMAINING[@]}"; do
        reserve=$((reserve + MIN_SECONDS[$later]))
    done
    local limit=$((BUDGET - SECONDS - reserve))
    ((limit > max)) && limit=$max
    ((limit < MIN_SECONDS[$name])) && limit=${MIN_SECONDS[$name]}
    log ""
    log "=== $(date -u +%H:%M:%S) $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout -k 15 "$limit" "$@" >>"$stdout" 2>>"$stderr"
    local rc=$?
    local status=ok
    ((rc == 124 || rc == 137)) && status=TIMEOUT
    ((rc != 0 && rc != 124 && rc != 137)) && status=FAILED
    log "=== $name: exit code $rc ($status) after $((SECONDS - start)) s"
    local command="$*"
    command=${command//$'\n'/ }
    ((${#command} > 200)) && command="${command:0:197}..."
    printf '%-14s %9s %8s %8s  %s\n' "$name" "$rc $status" "$((SECONDS - start))" "$limit" "$command" >>"$TABLE"
    return 0
}

skip_step() {
    forget_step "$1"
    printf '%-14s %9s %8s %8s  %s\n' "$1" "-" "-" "-" "skipped: $2" >>"$TABLE"
}

# ------------------------------------------------------------------------------------------------ 1. the GPU
run_step nvidia-smi 20 "$OUT_DIR/nvidia-smi.txt" "$OUT_DIR/nvidia-smi.txt" bash -c 'nvidia-smi && echo &&
    nvidia-smi --format=csv --query-gpu=name,memory.total,clocks.max.sm,clocks.max.memory,driver_version,compute_cap'

# ------------------------------------------------------------------------------------------------ 2. set-up
if [ "${GPU_CHECK_SKIP_SETUP:-0}" = 1 ]; then
    skip_step setup "GPU_CHECK_SKIP_SETUP=1"
else
    # offline, pip fails fast instead of retrying for minutes
    SETUP=(env PIP_RETRIES="${PIP_RETRIES:-1}" PIP_DEFAULT_TIMEOUT="${GPU_CHECK_PIP_TIMEOUT:-15}" bash scripts/bootstrap.sh)
    if [ -n "${GPU_CHECK_SETUP_TIMEOUT:-}" ]; then
        # an explicit limit (a machine that downloads PyTorch): set-up gets exactly it, and is timed apart from the
        # budget of the check proper
        setup_start=$SECONDS
        MIN_SECONDS[setup]=$GPU_CHECK_SETUP_TIMEOUT
        run_step setup "$GPU_CHECK_SETUP_TIMEOUT" "$STEPS_LOG" "$STEPS_LOG" "${SETUP[@]}"
        BUDGET=$((BUDGET + SECONDS - setup_start))
    else
        run_step setup 120 "$STEPS_LOG" "$STEPS_LOG" "${SETUP[@]}"
    fi
fi

# ------------------------------------------------------------------------------------------------ 3. the interpreter
IMPORTS="import torch, diffusers, transformers, trl, peft, accelerate, lpips, carve3d_trl"
if [ -x .venv/bin/python ] && .venv/bin/python -c "$IMPORTS" >>"$STEPS_LOG" 2>&1; then
    PY=.venv/bin/python
else
    [ -x .venv/bin/python ] && log "(.venv/bin/python cannot import the project, see above: using python3)"
    PY=python3
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "$IMPORTS" >/dev/null 2>&1 && compgen -G "$WHEELS/*.whl" >/dev/null; then
    SITE=${TMPDIR:-/tmp}/gpu_check_site
    run_step wheels 60 "$STEPS_LOG" "$STEPS_LOG" "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    skip_step wheels "not needed, or no $WHEELS/*.whl"
fi
ENVIRONMENT=$(mktemp)
run_step environment 60 "$ENVIRONMENT" "$STEPS_LOG" "$PY" -c "
import platform, sys, torch
print('python', platform.python_version(), sys.executable)
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    print('device', torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in ('diffusers', 'transformers', 'trl', 'peft', 'accelerate', 'lpips', 'carve3d_trl'):
    try:
        module = __import__(name)
        print(name, getattr(module, '__version__', '?'), module.__file__)
    except Exception as error:
        print(name, 'MISSING', type(error).__name__, error)
"

# ------------------------------------------------------------------------------------------------ 4. the gpu tests
# every test module is collected (for the `gpu` marks); one that cannot import does not stop the others
run_step gpu_tests 180 "$OUT_DIR/gpu_tests.log" "$OUT_DIR/gpu_tests.log" "$PY" -m pytest -m gpu -rs -v --durations=15 \
    -p no:cacheprovider --continue-on-collection-errors --junitxml="$OUT_DIR/gpu_tests.xml" tests

# ------------------------------------------------------------------------------------------------ 5. the benchmarks
if [ "$DRY_RUN" = 1 ]; then
    # the same flags in miniature, on CPU in fp32: SD 1.5's block structure (cross-attention in the first blocks, two
    # layers per block) at widths 32, 64
    TRAINER_FLAGS=(--rounds 1 --steps 2 --image_size 32 --vae_blocks 2 --sample_batch_size 2 --batches_per_epoch 1
        --train_batch_size 2 --unet_channels 32,64 --layers_per_block 2 --cross_attention_blocks 1 --norm_num_groups 8
        --text_hidden_size 32 --mixed_precision no)
    MRC_FLAGS=(--device cpu --threads 1 --views 4 --sizes 32 --batches 1 2 --objects 1 --repeats 1
        --reconstructor_kwargs '{"steps": 5}')
else
    # an SD-1.5-size UNet (860M parameters, random weights) on 256x256 grids (latent 32x32), fp16 with LoRA
    TRAINER_FLAGS=(--rounds 3 --steps 20 --image_size 256 --vae_blocks 4 --sample_batch_size 8 --batches_per_epoch 2
        --train_batch_size 8 --unet_channels 320,640,1280,1280 --layers_per_block 2 --cross_attention_blocks 3
        --norm_num_groups 32 --text_hidden_size 768 --mixed_precision fp16)
    MRC_FLAGS=(--device cuda --views 4 --sizes 64 256 --batches 1 8 32 --objects 4 --repeats 1)
fi
run_step bench_trainer 240 "$OUT_DIR/bench_trainer.md" "$STEPS_LOG" "$PY" benchmarks/bench_trainer.py "${TRAINER_FLAGS[@]}"
run_step mrc_speed 120 "$OUT_DIR/mrc_speed.md" "$OUT_DIR/mrc_speed.md" \
    "$PY" benchmarks/bench_mrc_speed.py "${MRC_FLAGS[@]}" --out "$OUT_DIR/mrc_speed.json"

# ------------------------------------------------------------------------------------------------ summary
{
    echo "benchmarks/gpu_check.sh, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(uname -n), ${SECONDS} s in all" \
        "(budget ${BUDGET} s)$([ "$DRY_RUN" = 1 ] && echo ', DRY RUN on CPU with tiny sizes')"
    if commit=$(git rev-parse --short HEAD 2>/dev/null); then
        echo "commit: $commit$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
    else
        echo "commit: unknown (no git repository)"
    fi
    echo "interpreter: $PY"
    [ -s "$ENVIRONMENT" ] && cat "$ENVIRONMENT" || echo "(the environment step failed: see steps.log)"
    echo
    printf '%-14s %9s %8s %8s  %s\n' step "exit" seconds limit command
    cat "$TABLE"
    echo
    echo "exit 124/137: the step ran out of time; steps.log has every step's stderr."
    echo
    echo "gpu tests: $(grep -E '^=+ .*( in [0-9.]+s)' "$OUT_DIR/gpu_tests.log" 2>/dev/null | tail -n 1)"
    grep -E '^(FAILED|ERROR) ' "$OUT_DIR/gpu_tests.log" 2>/dev/null
} >"$SUMMARY"
rm -f "$ENVIRONMENT"
cat "$SUMMARY"
