#!/usr/bin/env bash
# The GPU work of issues 3 and 7 (and the training MFU of issue 6), in stages that each fit one 10-minute
# call on a lent H100/H200 (see DEVELOPERS.md). Run from the repo root on the GPU machine:
#
#   bash scripts/gpu_session.sh check       # versions, CUDA build of csrc/, every kernel test on the GPU
#   bash scripts/gpu_session.sh attention   # bench_packed_attention.py at Dh 128 (the targets'; 447 s on an H100)
#   bash scripts/gpu_session.sh attention64 # the same at Dh 64 (its own call: both overran one in 2026-11)
#   bash scripts/gpu_session.sh fused       # bench_projector (+ its launch-by-launch breakdown), bench_linear_cross_entropy,
#                                           # bench_norm_swiglu
#   bash scripts/gpu_session.sh train       # bench_train.py --model small (MFU at TP=1) at batch 64, 128 and 256,
#                                           # then a profile of 3 steps at 64
#   bash scripts/gpu_session.sh e2e         # train.py on the GPU (Triton kernels in the training loop): a
#                                           # small run, then the default recipe (needs carry [".gpu-wheels"])
#
# e2e runs the project's own entry point, which needs hydra-core and omegaconf (the GPU image has neither):
# `make gpu-wheels` downloads the pinned ones here into .gpu-wheels/ (under 1 MB), which the device call carries;
# the stage installs them into /tmp/gpu-e2e-site without an index. It does not run torchrun: a world of one
# process joins no process group, and nccl refuses two ranks on one GPU, so the nccl paths need a machine with
# two GPUs, which is not lent (tensor parallelism runs on CPU with gloo in CI).
#
# For flash-attn 4 in the attention stage, install it first with scripts/fa4_wheels.sh (two calls; see there).
#
# Needs only what the GPU image already has (torch, triton, pytest, numpy, pillow, tokenizers, ...): the kernels, their
# tests and these benchmarks import neither hydra, megatron-core nor faiss. Each stage writes its log and the
# benchmark results it produced (benchmarks/results/*, with device, date, commit and versions) into one archive,
# $OUT/<stage>.tar.gz (the device tool returns at most 8 files), and stops its own work before `STAGE_BUDGET_S`
# (default 540 s) so that what finished still comes back. GPU_SESSION_SMOKE=1 runs the same plumbing on a CPU
# with the benchmarks' --smoke sizes (tests/scripts/test_gpu_session.py). First run on an H100 on 2026-11-24
# (benchmarks/results/gpu_session_h100_2026-11-24.md): check 415 s (cut), attention 447 s at Dh 128, fused
# 237 s, train 132 s; e2e not yet run. On the 2-core CPU, `check` took 42 s.
set -uo pipefail
cd "$(dirname "$0")/.."

stage="${1:-}"
case "$stage" in
check | attention | attention64 | fused | train | e2e) ;;
*)
    echo "usage: bash scripts/gpu_session.sh check|attention|attention64|fused|train|e2e   (see the header)" >&2
    exit 2
    ;;
esac
out="${OUT:-gpu-out}"
runs="${E2E_RUNS:-/tmp/gpu-e2e}" # e2e's run directories, outside $OUT (checkpoints would come back with it)
budget="${STAGE_BUDGET_S:-540}"
smoke="${GPU_SESSION_SMOKE:-0}"
py="${PYTHON:-python3}"
mkdir -p "$out"
out_abs="$(cd "$out" && pwd)"
log="$out/$stage.log"
start=$(date +%s)
export PYTHONUNBUFFERED=1
fa4_paths="${FA4_SITE:-/tmp/fa4-site}/.pythonpath"
if [ -f "$fa4_paths" ]; then # flash-attn 4, installed by scripts/fa4_wheels.sh in an earlier call on this machine
    export PYTHONPATH="$(cat "$fa4_paths")${PYTHONPATH:+:$PYTHONPATH}"
fi

left() { echo $((budget - ($(date +%s) - start))); }

# run LABEL CMD...: run a step with what is left of the stage's budget; a step that overruns is cut, the rest go on
run() {
    local label="$1"
    shift
    local remaining
    remaining=$(left)
    if [ "$remaining" -le 10 ]; then
        echo "== $label: skipped, the stage's ${budget}s budget is spent" | tee -a "$log"
        return 0
    fi
    echo "== $label ($(date -u +%H:%M:%S), ${remaining}s left): $*" | tee -a "$log"
    timeout --signal=INT --kill-after=15 "$remaining" "$@" >>"$log" 2>&1
    local rc=$?
    echo "== $label: exit $rc" | tee -a "$log"
}

smoke_flag() { [ "$smoke" = 1 ] && echo "--smoke"; }

touch "$out/.stamp"
case "$stage" in
check)
    versions="import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'triton', triton.__version__)
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    run versions "$py" -c "$versions"
    command -v nvidia-smi >/dev/null && run nvidia-smi nvidia-smi
    # the CUDA part of csrc/ builds where torch is a CUDA build and nvcc is found (setup.py says which it did)
    run build-ext "$py" setup.py build_ext --inplace
    # Every kernel test, each autotuned kernel narrowed to its first config (one compile per shape class, no
    # timing: hundreds of test shapes would otherwise each compile and time ~10 configs); then the real-size
    # tests (marked gpu) again with full autotuning, so that the configs training would pick are checked too.
    run ext-probe "$py" scripts/ext_probe.py # which calls crash: ours valid, ours raising, libtorch raising
    # The extension's tests in a process of their own: on 2026-11-24 one segfaulted there and took the
    # Triton kernels' tests after it down with it (-v: each test's name is logged before it runs, so a
    # crash names its test).
    run ext-tests "$py" -m pytest -v -p no:cacheprovider --junitxml="$out/junit-ext.xml" \
        tests/vlm_core/kernels/test_ext.py
    run kernel-tests env VLM_TRITON_AUTOTUNE=first "$py" -m pytest -q -p no:cacheprovider \
        --junitxml="$out/junit-kernels.xml" --ignore=tests/vlm_core/kernels/test_ext.py tests/vlm_core/kernels \
        tests/vlm_core/model/test_attn_impl_training.py tests/vlm_core/train/test_lm_loss.py
    run kernel-tests-autotuned "$py" -m pytest -q -p no:cacheprovider -m gpu \
        --junitxml="$out/junit-kernels-autotuned.xml" tests/vlm_core/kernels
    ;;
attention)
    if [ "$smoke" = 1 ]; then
        run attention "$py" benchmarks/bench_packed_attention.py --smoke
    else
        run attention-dh128 "$py" benchmarks/bench_packed_attention.py --head-dims 128
    fi
    ;;
attention64)
    run attention-dh64 "$py" benchmarks/bench_packed_attention.py --head-dims 64 $(smoke_flag)
    ;;
fused)
    run projector "$py" benchmarks/bench_projector.py $(smoke_flag)
    # each launch of ours at 64 images timed alone beside torch.mm of its operands: which GEMM the backward loses in
    run projector-gemms "$py" benchmarks/bench_projector_gemms.py $(smoke_flag)
    run linear-ce "$py" benchmarks/bench_linear_cross_entropy.py $(smoke_flag)
    run norm-swiglu "$py" benchmarks/bench_norm_swiglu.py $(smoke_flag)
    run projector-layernorm "$py" benchmarks/bench_projector.py --layer-norm $(smoke_flag)
    ;;
train)
    # the training default (64) and larger batches: how the MFU grows with the batch tells a host-bound step
    batches="--batch-size 64 128 256"
    [ "$smoke" = 1 ] && batches="" # the smoke world is too small for them
    run train "$py" benchmarks/bench_train.py $batches --profile 3 $(smoke_flag)
    ;;
e2e)
    site="${E2E_SITE:-/tmp/gpu-e2e-site}"
    wheels="${GPU_WHEELS:-.gpu-wheels}"
    if compgen -G "$wheels/*" >/dev/null; then
        # antlr4-python3-runtime 4.9.3 is a source archive only: built here, offline, with the image's setuptools
        run install-wheels "$py" -m pip install --quiet --no-deps --no-index --no-build-isolation --upgrade \
            --target "$site" "$wheels"/*
    else
        echo "== install-wheels: no $wheels/ (make gpu-wheels here, then carry it); $site from an earlier call, if any" |
            tee -a "$log"
    fi
    if compgen -G "$site/*" >/dev/null; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    # The small world and model of tests/test_train_e2e.py: seconds of training, every stage of the job
    small=(train=smoke data.world.train_per_skill=16 data.world.eval_per_skill=3 data.world.turns_per_record=2
        model.layers=2 model.vision.layers=2 train.batch_size=16 train.align.batch_size=16 train.tower.batch_size=32
        eval.max_new_tokens=24 "data.cache_dir=$runs/cache")
    run train-small "$py" train.py "hydra.run.dir=$runs/small" "${small[@]}"
    if [ "$smoke" != 1 ]; then # the default recipe, as `make train` runs it on the CPU (~8 min on 2 cores)
        run train-default "$py" train.py "hydra.run.dir=$runs/default" "data.cache_dir=$runs/cache-default"
    fi
    ;;
esac

# everything this stage wrote under benchmarks/results, plus its log and junit file, as one archive
echo "== $stage: $(($(date +%s) - start))s" | tee -a "$log"
mapfile -t results < <(find benchmarks/results -type f -newer "$out/.stamp" | sort)
mapfile -t own < <(cd "$out" && find . -maxdepth 1 -type f -newer .stamp \( -name "$stage.log" -o -name '*.xml' \) |
    sort)
members=("${results[@]}" -C "$out_abs" "${own[@]}")
runs_files=() # e2e: the runs' logs, metrics and evaluations, as gpu-e2e/<run>/... (checkpoints and caches stay)
if [ "$stage" = e2e ] && [ -d "$runs" ]; then
    name="$(basename "$runs")"
    mapfile -t runs_files < <(cd "$runs/.." && find "$name" -mindepth 2 -type f -newer "$out_abs/.stamp" \
        -not -path "$name/cache*" -not -path '*/checkpoints/*' | sort)
    [ ${#runs_files[@]} -gt 0 ] && members+=(-C "$(cd "$runs/.." && pwd)" "${runs_files[@]}")
fi
tar -czf "$out/$stage.tar.gz" "${members[@]}"
echo "archived ${#results[@]} result files, ${#own[@]} logs and ${#runs_files[@]} run files in $out/$stage.tar.gz"
