#!/usr/bin/env bash
# The GPU work of issues 3 and 7 (and the training MFU of issue 6), in stages that each fit one 10-minute
# call on a lent H100/H200 (see DEVELOPERS.md). Run from the repo root on the GPU machine:
#
#   bash scripts/gpu_session.sh check       # versions, CUDA build of csrc/, every kernel test at real sizes
#   bash scripts/gpu_session.sh attention   # bench_packed_attention.py at Dh 128, then Dh 64
#   bash scripts/gpu_session.sh fused       # bench_projector, bench_linear_cross_entropy, bench_norm_swiglu
#   bash scripts/gpu_session.sh train       # bench_train.py --model small (MFU at TP=1)
#
# For flash-attn 4 in the attention stage, install it first with scripts/fa4_wheels.sh (two calls; see there).
#
# Needs only what the GPU image already has (torch, triton, pytest, numpy, pillow, tokenizers, ...): the kernels, their
# tests and these benchmarks import neither hydra, megatron-core nor faiss. Each stage writes its log and the
# benchmark results it produced (benchmarks/results/*, with device, date, commit and versions) into one archive,
# $OUT/<stage>.tar.gz (the device tool returns at most 8 files), and stops its own work before `STAGE_BUDGET_S`
# (default 540 s) so that what finished still comes back. GPU_SESSION_SMOKE=1 runs the same plumbing on a CPU
# with the benchmarks' --smoke sizes (tests/scripts/test_gpu_session.py). None of it has run on a GPU yet;
# on the 2-core CPU, `check` took 42 s (258 kernel tests passed in the interpreter, 52 skipped).
set -uo pipefail
cd "$(dirname "$0")/.."

stage="${1:-}"
case "$stage" in
check | attention | fused | train) ;;
*)
    echo "usage: bash scripts/gpu_session.sh check|attention|fused|train   (see the header)" >&2
    exit 2
    ;;
esac
out="${OUT:-gpu-out}"
budget="${STAGE_BUDGET_S:-540}"
smoke="${GPU_SESSION_SMOKE:-0}"
py="${PYTHON:-python3}"
mkdir -p "$out"
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
    run kernel-tests "$py" -m pytest -q -p no:cacheprovider --junitxml="$out/junit-kernels.xml" \
        tests/vlm_core/kernels tests/vlm_core/model/test_attn_impl_training.py
    ;;
attention)
    if [ "$smoke" = 1 ]; then
        run attention "$py" benchmarks/bench_packed_attention.py --smoke
    else
        run attention-dh128 "$py" benchmarks/bench_packed_attention.py --head-dims 128
        run attention-dh64 "$py" benchmarks/bench_packed_attention.py --head-dims 64
    fi
    ;;
fused)
    run projector "$py" benchmarks/bench_projector.py $(smoke_flag)
    run linear-ce "$py" benchmarks/bench_linear_cross_entropy.py $(smoke_flag)
    run norm-swiglu "$py" benchmarks/bench_norm_swiglu.py $(smoke_flag)
    run projector-layernorm "$py" benchmarks/bench_projector.py --layer-norm $(smoke_flag)
    ;;
train)
    run train "$py" benchmarks/bench_train.py $(smoke_flag)
    ;;
esac

# everything this stage wrote under benchmarks/results, plus its log and junit file, as one archive
echo "== $stage: $(($(date +%s) - start))s" | tee -a "$log"
mapfile -t results < <(find benchmarks/results -type f -newer "$out/.stamp" | sort)
mapfile -t own < <(cd "$out" && find . -maxdepth 1 -type f -newer .stamp \( -name "$stage.log" -o -name '*.xml' \) |
    sort)
tar -czf "$out/$stage.tar.gz" "${results[@]}" -C "$out" "${own[@]}"
echo "archived ${#results[@]} result files and ${#own[@]} logs in $out/$stage.tar.gz"
