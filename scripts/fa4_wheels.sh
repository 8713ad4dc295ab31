#!/usr/bin/env bash
# flash-attn 4 for bench_packed_attention.py on a lent GPU, carried in two device calls.
#
# The GPU image has no flash-attn, and FA4's wheels for its Python 3.12 come to ~111 MB (the CUTLASS DSL's
# cu13 library alone is 92 MB, already stripped), while one device call carries at most 64 MiB. So the wheels
# go in one tar, split into two parts of at most 57 MB that two calls carry one after the other; the machine
# keeps /tmp between calls as long as the second starts within its 30 s idle release.
#
#   here:    bash scripts/fa4_wheels.sh download     # the pinned wheels into .fa4/wheels (needs PyPI)
#            bash scripts/fa4_wheels.sh pack         # .fa4/part1 and .fa4/part2, each with the manifest
#   device, call 1, carry [".fa4/part1"]:   bash scripts/fa4_wheels.sh stash
#   device, call 2, carry [".fa4/part2"], at once:
#            bash scripts/fa4_wheels.sh install && bash scripts/gpu_session.sh attention
#
# `install` checks the joined tar against the manifest's SHA-256, installs the wheels whose distributions the
# machine's Python lacks (no index, no dependency resolution: the pins below are the whole set) into
# /tmp/fa4-site in one pip call (several of them share the nvidia_cutlass_dsl/ folder), and imports
# flash_attn.cute. The CUTLASS DSL reaches its `cutlass` package through a .pth file, which Python reads only in
# site directories, not on PYTHONPATH: so install writes the paths that site.addsitedir adds to
# /tmp/fa4-site/.pythonpath, and gpu_session.sh puts them on PYTHONPATH. FA4_DIR, FA4_STASH and FA4_SITE move
# .fa4, /tmp/fa4-parts and /tmp/fa4-site (tests/scripts/test_fa4_wheels.py uses them).
#
# The set was checked on the dev CPU with the same pins' cp311 wheels: installed this way, flash_attn.cute
# imports (nvidia-cutlass-dsl-libs-cu12, a declared dependency, is left out: the cu13 libraries serve).
set -euo pipefail
cd "$(dirname "$0")/.."

dir="${FA4_DIR:-.fa4}"
stash="${FA4_STASH:-/tmp/fa4-parts}"
site="${FA4_SITE:-/tmp/fa4-site}"
py="${PYTHON:-python3}"
part_bytes="${FA4_PART_BYTES:-57000000}" # + the ~3 MB working tree stays under a call's 64 MiB
# flash-attn-4 4.0.0b36 and what it imports, for CPython 3.12 on x86-64 (the GPU image's), as of 2026-11.
PINS=(flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
    nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5
    apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 einops==0.8.2 cuda-bindings==13.5.0
    cuda-pathfinder==1.9.0 protobuf==7.36.2)

die() {
    echo "fa4_wheels.sh: $*" >&2
    exit 1
}

case "${1:-}" in
download)
    mkdir -p "$dir/wheels"
    platforms=()
    for tag in manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$tag")
    done
    "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$dir/wheels" "${PINS[@]}"
    ls -l "$dir/wheels"
    ;;
pack)
    shopt -s nullglob
    wheels=("$dir"/wheels/*.whl)
    [ ${#wheels[@]} -gt 0 ] || die "no wheels in $dir/wheels: run 'bash scripts/fa4_wheels.sh download' first"
    rm -rf "$dir/part1" "$dir/part2" "$dir/fa4.tar"
    tar -cf "$dir/fa4.tar" -C "$dir/wheels" "${wheels[@]##*/}"
    size=$(stat -c %s "$dir/fa4.tar")
    [ "$size" -le $((2 * part_bytes)) ] || die "the tar is $size bytes, more than two parts of $part_bytes"
    mkdir -p "$dir/part1" "$dir/part2"
    head -c "$part_bytes" "$dir/fa4.tar" >"$dir/part1/fa4.tar.1"
    tail -c +$((part_bytes + 1)) "$dir/fa4.tar" >"$dir/part2/fa4.tar.2"
    manifest="$(sha256sum "$dir/fa4.tar" | cut -d' ' -f1) $size"
    echo "$manifest" >"$dir/part1/MANIFEST"
    echo "$manifest" >"$dir/part2/MANIFEST"
    rm "$dir/fa4.tar"
    du -b "$dir/part1" "$dir/part2"
    ;;
stash | install)
    mkdir -p "$stash"
    found=0
    for part in "$dir"/part1 "$dir"/part2; do
        if [ -d "$part" ]; then
            cp "$part"/fa4.tar.* "$part"/MANIFEST "$stash"/
            found=1
        fi
    done
    [ "$found" = 1 ] || die "neither $dir/part1 nor $dir/part2 is here: name one in the call's carry"
    echo "stashed in $stash: $(cd "$stash" && ls fa4.tar.* | tr '\n' ' ')"
    [ "$1" = install ] || exit 0
    for n in 1 2; do
        [ -f "$stash/fa4.tar.$n" ] || die "part $n is missing from $stash: the machine was given back between \
the two calls (a fresh one starts bare), so stash part1 again and install with part2 at once"
    done
    read -r want size <"$stash/MANIFEST"
    cat "$stash/fa4.tar.1" "$stash/fa4.tar.2" >"$stash/fa4.tar"
    got=$(sha256sum "$stash/fa4.tar" | cut -d' ' -f1)
    [ "$got" = "$want" ] || die "the joined tar's SHA-256 is $got, the manifest says $want ($size bytes)"
    rm -rf "$stash/wheels" && mkdir -p "$stash/wheels"
    tar -xf "$stash/fa4.tar" -C "$stash/wheels"
    wanted=()
    for wheel in "$stash"/wheels/*.whl; do # a distribution the image already has stays the image's
        name=$(basename "$wheel" | cut -d- -f1)
        if "$py" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" 2>/dev/null; then
            echo "keeping the machine's own $name"
        else
            wanted+=("$wheel")
        fi
    done
    [ ${#wanted[@]} -gt 0 ] || die "every wheel's distribution is already installed here"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "${wanted[@]}"
    "$py" -c "import site, sys
before = list(sys.path)
site.addsitedir(sys.argv[1])
print(':'.join(p for p in sys.path if p not in before))" "$site" >"$site/.pythonpath"
    echo "installed ${#wanted[@]} wheels into $site; its paths: $(cat "$site/.pythonpath")"
    PYTHONPATH="$(cat "$site/.pythonpath")${PYTHONPATH:+:$PYTHONPATH}" "$py" -c \
        "import flash_attn.cute; print('flash_attn.cute imports')"
    ;;
*)
    echo "usage: bash scripts/fa4_wheels.sh download|pack|stash|install   (see the header)" >&2
    exit 2
    ;;
esac
