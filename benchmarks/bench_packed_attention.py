"""Benchmark of packed multimodal attention: our Triton kernel against PyTorch's and flash-attn's kernels.

Workloads are packed rows of ``total`` tokens made of LLaVA-like samples (a prompt, 1-3 image spans of
576 tokens with text between them, then question and answer text; images are bidirectional spans),
plus a ``causal`` workload with the same segments and no image spans, which the causal-only
FlashAttention kernels (torch's varlen_attn, flash-attn 2 and 4) can serve. The row's leftover
slots are padding segments, as the project's packer makes them.

Providers (each skipped, with the reason in the table, where it cannot run):
    ours                vlm_core.kernels.packed_attention_triton (Triton, forward and backward); its attention
                        windows are built on the first call and reused for the same packing tensors, as a
                        model's layers reuse them (before 2026-11-24 every call rebuilt them, with a host
                        sync: the H100 figures of that day include that cost)
    reference           the plain-PyTorch specification (only up to --reference-max-total tokens)
    reference_compiled  torch.compile of the reference (same limit)
    sdpa                F.scaled_dot_product_attention with a dense boolean mask (per-segment padded
                        batch), the mask and gathers built inside the timed call as the model pays them
    flex                compiled FlexAttention with the same rule as a mask_mod; the block mask is
                        built once, outside the timed region
    varlen              torch.nn.attention.varlen.varlen_attn (FlashAttention-2 inside PyTorch), causal only
    flash_attn          flash-attn 2's flash_attn_varlen_func, causal only
    flash_attn4         flash-attn 4's flash_attn.cute.flash_attn_varlen_func (Hopper/Blackwell), causal only
    ours_atomic_dq      ours with dq_mode="atomic": the dK/dV kernel adds dQ up with float32 atomics (five
                        matrix products in the backward instead of seven; not deterministic), backward and
                        full modes only (the forward is ours')

Modes: forward (no autograd graph), backward (the backward of one recorded forward, retain_graph),
full (forward + backward). Times are medians (triton.testing.do_bench on CUDA; perf_counter on the
CPU). TFLOP/s counts only the allowed (unmasked) score entries:

    forward FLOPs = 4 * Hq * Dh * allowed_pairs     (QK^T and PV, 2 FLOPs per multiply-add)
    backward      = 2.5 * forward                   (five matrix products against two; ours' separate
                                                     dQ kernel does seven, uncounted: the work is the same)
    full          = 3.5 * forward

``allowed_pairs`` sums, per segment of length L, L (L + 1) / 2 causal pairs plus m (m - 1) / 2 for
each image span of length m (the pairs above the diagonal inside the span). "x vs ours" is the
provider's median time over ours from the same run (> 1: ours is faster). Peak memory is the CUDA
peak allocated during one call, above what was allocated before it (inputs, block masks).

GPU:   python benchmarks/bench_packed_attention.py
CPU:   python benchmarks/bench_packed_attention.py --smoke   (tiny sizes; reference, sdpa, flex, and ours
       when TRITON_INTERPRET=1 makes Triton's interpreter available; seconds)
Results go to benchmarks/results/packed_attention_<device>[_dh<dims>].{md,csv,png} (the suffix unless Dh is
128 alone); the header records the device, date, commit, library versions and the exact command, and the
issue's targets are judged below the table. The figures are also printed to stderr as each case ends.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.metadata
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.provenance import git_commit  # kernel_bench and bench_train import it from here
from benchmarks.report import echo_rows, write_tables
from vlm_core.kernels import (
    _check_packed_attention_inputs,
    _triton_module,
    attn_impl_status,
    packed_attention_reference,
)
from vlm_core.kernels.attention_torch import (
    build_flex_block_mask,
    flex_attention_packed,
    packed_attention_flash_attn,
    packed_attention_sdpa,
    packed_attention_varlen,
)

# New providers go at the end: recover_bar_plot.py reads an old plot by the colours of this order.
PROVIDERS = ("ours", "reference", "reference_compiled", "sdpa", "flex", "varlen", "flash_attn", "flash_attn4",
             "ours_atomic_dq")
CAUSAL_ONLY = ("varlen", "flash_attn", "flash_attn4")
MODES = ("forward", "backward", "full")
FLOP_FACTOR = {"forward": 1.0, "backward": 2.5, "full": 3.5}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------ workloads


@dataclasses.dataclass(frozen=True)
class SampleShape:
    """Token counts of one LLaVA-like sample: prompt, images (each followed by a gap), answer."""

    image_tokens: int  # P per image (576 = LLaVA-1.5's 24x24 grid)
    prompt: tuple[int, int]  # text before the first image, [low, high)
    gap: tuple[int, int]  # text after each image
    answer: tuple[int, int]  # question and answer text at the end
    image_counts: tuple[int, ...] = (1, 2, 3)
    image_probs: tuple[float, ...] = (0.6, 0.25, 0.15)


LLAVA = SampleShape(image_tokens=576, prompt=(20, 80), gap=(5, 40), answer=(20, 400))
SMOKE = SampleShape(image_tokens=16, prompt=(1, 8), gap=(1, 4), answer=(1, 30))


def sample_spans(rng: np.random.Generator, shape: SampleShape) -> list[tuple[str, int]]:
    """One sample as spans ("t", n) of text and ("i", n) of one image."""
    spans = [("t", int(rng.integers(*shape.prompt)))]
    for _ in range(int(rng.choice(shape.image_counts, p=shape.image_probs))):
        spans += [("i", shape.image_tokens), ("t", int(rng.integers(*shape.gap)))]
    spans.append(("t", int(rng.integers(*shape.answer))))
    return spans


def packed_row(total: int, shape: SampleShape, seed: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Samples packed into one row of ``total`` slots: segment lengths, and (start, length) of each image.

    Samples are drawn in order and placed while they fit (a sample longer than the row is redrawn);
    the leftover slots become padding segments no longer than the longest sample, as in
    vlm_core.data.packing.
    """
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    images: list[tuple[int, int]] = []
    used = 0
    for _ in range(10_000):
        spans = sample_spans(rng, shape)
        length = sum(n for _, n in spans)
        if length > total:
            continue
        if used + length > total:
            break
        position = used
        for kind, n in spans:
            if kind == "i":
                images.append((position, n))
            position += n
        lengths.append(length)
        used += length
    longest = max(lengths) if lengths else total
    while used < total:
        pad = min(longest, total - used)
        lengths.append(pad)
        used += pad
    return lengths, images


def allowed_pairs(lengths: list[int], image_lengths: list[int]) -> int:
    """Unmasked (query, key) pairs: causal pairs per segment plus the upper triangle of each image span."""
    return sum(n * (n + 1) // 2 for n in lengths) + sum(m * (m - 1) // 2 for m in image_lengths)


@dataclasses.dataclass
class Case:
    """One configuration's inputs, shared by the speed and the memory runs of every provider."""

    workload: str
    total: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    q: torch.Tensor  # [total, Hq, Dh]
    k: torch.Tensor  # [total, Hkv, Dh]
    v: torch.Tensor  # [total, Hkv, Dh]
    grad_out: torch.Tensor  # [total, Hq, Dh]
    cu_seqlens: torch.Tensor  # [n + 1] int32
    max_seqlen: int
    bidir_group: torch.Tensor | None  # [total] int32, None for the causal workload
    num_segments: int
    num_images: int
    pairs: int  # allowed score entries per head

    def forward_flops(self) -> float:
        return 4.0 * self.num_q_heads * self.head_dim * self.pairs


def setup(
    workload: str, total: int, heads: tuple[int, int], head_dim: int, dtype: torch.dtype, device: torch.device,
    shape: SampleShape, seed: int,
) -> Case:
    """Inputs of one configuration: the packed layout (same segments for both workloads) and random q, k, v."""
    lengths, images = packed_row(total, shape, seed)
    cu_seqlens = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=device)
    bidir_group = None
    image_lengths: list[int] = []
    if workload == "llava":
        groups = torch.zeros(total, dtype=torch.int32)
        for image_id, (start, n) in enumerate(images, start=1):
            groups[start : start + n] = image_id
        bidir_group = groups.to(device)
        image_lengths = [n for _, n in images]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    num_q_heads, num_kv_heads = heads

    def randn(*size):
        return torch.randn(*size, generator=generator).to(device=device, dtype=dtype)

    return Case(
        workload=workload, total=total, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        dtype=dtype, q=randn(total, num_q_heads, head_dim), k=randn(total, num_kv_heads, head_dim),
        v=randn(total, num_kv_heads, head_dim), grad_out=randn(total, num_q_heads, head_dim),
        cu_seqlens=cu_seqlens, max_seqlen=max(lengths), bidir_group=bidir_group, num_segments=len(lengths),
        num_images=len(image_lengths) if workload == "llava" else 0, pairs=allowed_pairs(lengths, image_lengths),
    )


# ------------------------------------------------------------------------------------------ providers


class Unavailable(Exception):
    """A provider cannot run this case; the message goes into the table."""


def _flash_attn4_fn() -> Callable:
    try:
        module = importlib.import_module("flash_attn.cute")
        return module.flash_attn_varlen_func
    except (ImportError, AttributeError) as error:
        raise Unavailable(f"flash-attn 4 (flash_attn.cute) not importable: {error}") from error


def attention_fn(provider: str, case: Case, reference_max_total: int) -> Callable:
    """fn(q, k, v) -> out [total, Hq, Dh] for one provider, with everything a provider may prepare
    outside the timed region (block masks, compiled functions) prepared here."""
    device = case.q.device
    cu, max_seqlen, groups = case.cu_seqlens, case.max_seqlen, case.bidir_group
    if provider in CAUSAL_ONLY and groups is not None:
        raise Unavailable("causal-only kernel; image spans need a bidirectional mask")
    if provider in ("reference", "reference_compiled") and case.total > reference_max_total:
        raise Unavailable(f"total > --reference-max-total={reference_max_total} (dense scores)")
    if provider in ("ours", "ours_atomic_dq"):
        ok, reason = attn_impl_status("triton", device, needs_bidir=True, needs_backward=True)
        if not ok:
            raise Unavailable(reason)
        kernel = _triton_module()[0].packed_attention_triton
        dq_mode = "atomic" if provider == "ours_atomic_dq" else "separate"
        return lambda q, k, v: kernel(q, k, v, cu, max_seqlen, groups, dq_mode=dq_mode)
    if provider == "reference":
        return lambda q, k, v: packed_attention_reference(q, k, v, cu, max_seqlen, groups)
    if provider == "reference_compiled":
        if device.type != "cuda":
            raise Unavailable("compiled only on CUDA here (inductor's CPU build takes minutes)")
        compiled = torch.compile(packed_attention_reference)
        return lambda q, k, v: compiled(q, k, v, cu, max_seqlen, groups)
    if provider == "sdpa":
        return lambda q, k, v: packed_attention_sdpa(q, k, v, cu, max_seqlen, groups)
    if provider == "flex":
        block_mask = build_flex_block_mask(cu, groups, case.total)
        return lambda q, k, v: flex_attention_packed(q, k, v, block_mask)
    if device.type != "cuda":
        raise Unavailable("FlashAttention runs on CUDA only")
    if case.dtype not in (torch.float16, torch.bfloat16):
        raise Unavailable("FlashAttention takes fp16/bf16 only")
    if provider == "varlen":
        ok, reason = attn_impl_status("varlen", device, needs_bidir=False)
        if not ok:
            raise Unavailable(reason)
        return lambda q, k, v: packed_attention_varlen(q, k, v, cu, max_seqlen)
    if provider == "flash_attn":
        ok, reason = attn_impl_status("flash_attn", device, needs_bidir=False)
        if not ok:
            raise Unavailable(reason)
        return lambda q, k, v: packed_attention_flash_attn(q, k, v, cu, max_seqlen)
    if provider == "flash_attn4":
        fa4 = _flash_attn4_fn()

        def run_fa4(q, k, v):
            result = fa4(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
                         causal=True)
            return result[0] if isinstance(result, tuple) else result  # some versions return (out, lse)

        return run_fa4
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def timed_call(fn: Callable, case: Case, mode: str) -> tuple[Callable[[], None], list[torch.Tensor]]:
    """The callable to time for ``mode`` and the leaves whose .grad must be reset between calls."""
    if mode == "forward":
        q, k, v = case.q, case.k, case.v

        def forward() -> None:
            with torch.no_grad():
                fn(q, k, v)

        return forward, []
    leaves = [x.detach().clone().requires_grad_(True) for x in (case.q, case.k, case.v)]
    if mode == "backward":
        out = fn(*leaves)

        def backward() -> None:
            out.backward(case.grad_out, retain_graph=True)

        return backward, leaves

    def full() -> None:
        fn(*leaves).backward(case.grad_out)

    return full, leaves


def median_ms(call: Callable[[], None], leaves: list[torch.Tensor], device: torch.device, warmup: int, reps: int,
              warmup_ms: int, rep_ms: int) -> float:
    """Median time of one call in ms: triton.testing.do_bench on CUDA (when triton is importable),
    CUDA events otherwise, perf_counter on the CPU."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return float(do_bench(call, warmup=warmup_ms, rep=rep_ms, grad_to_none=leaves or None, return_mode="median"))
        times = []
        for index in range(warmup + reps):
            for leaf in leaves:
                leaf.grad = None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            if index >= warmup:
                times.append(start.elapsed_time(end))
        return statistics.median(times)
    times = []
    for index in range(warmup + reps):
        for leaf in leaves:
            leaf.grad = None
        started = time.perf_counter()
        call()
        if index >= warmup:
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def peak_mib(call: Callable[[], None], leaves: list[torch.Tensor], device: torch.device) -> float | None:
    """CUDA peak memory of one call above what was allocated before it; None off CUDA."""
    if device.type != "cuda":
        return None
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# ------------------------------------------------------------------------------------------ the run


def versions() -> str:
    """Library versions from the installed distributions' metadata: importing triton here would fix
    its interpreter mode before TRITON_INTERPRET is read."""
    parts = [f"torch {torch.__version__}", f"CUDA {torch.version.cuda}"]
    for distribution in ("triton", "flash-attn", "flash-attn-4"):
        try:
            parts.append(f"{distribution} {importlib.metadata.version(distribution)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{distribution} not installed")
    return ", ".join(parts)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """The device's name as results' file names carry it: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return device_name(device).lower().replace(" ", "-").replace("/", "-")


TITLE = "Packed attention benchmark"
COLUMNS = ["workload", "total", "segments", "images", "Hq", "Hkv", "Dh", "dtype", "mode", "provider", "ms",
           "TFLOP/s", "x vs ours", "peak MiB", "max |out - first|", "note"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU-sized run (CI): fp32, totals 64 and 203")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, cpu for --smoke)")
    parser.add_argument("--totals", type=int, nargs="+", default=None, help="row lengths (default 8192 16384 32768)")
    parser.add_argument("--heads", nargs="+", default=None, help="Hq:Hkv pairs (default 32:8 32:32)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=None, help="Dh values (default 128)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 (fp32 for --smoke)")
    parser.add_argument("--workloads", nargs="+", choices=("llava", "causal"), default=["llava", "causal"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--reference-max-total", type=int, default=8192, help="largest total the reference runs at")
    parser.add_argument("--warmup-ms", type=int, default=25, help="do_bench warmup on CUDA")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--stem", default=None, help="output file name without suffix")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device = args.device or "cpu"
        args.totals = args.totals or [64, 203]
        args.heads = args.heads or ["4:2"]
        args.head_dims = args.head_dims or [16]
        args.dtype = args.dtype or "fp32"
        args.providers = [p for p in args.providers if p in ("ours", "reference", "sdpa", "flex", "ours_atomic_dq")]
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.totals = args.totals or [8192, 16384, 32768]
    args.heads = [tuple(int(x) for x in pair.split(":")) for pair in (args.heads or ["32:8", "32:32"])]
    args.head_dims = args.head_dims or [128]
    args.dtype = args.dtype or "bf16"
    return args


def default_stem(device: torch.device, head_dims: list[int], smoke: bool) -> str:
    """packed_attention_<device>, with _dh<dims> unless the head dims are the targets' 128 alone: runs at
    other head dims on the same device must not replace the Dh-128 tables (on 2026-11-24 one did)."""
    if smoke:
        return "packed_attention_smoke_cpu"
    stem = "packed_attention_" + device_slug(device)
    return stem if head_dims == [128] else stem + "_dh" + "-".join(str(d) for d in head_dims)


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    args = parse_args(argv)
    device, dtype = args.device, DTYPES[args.dtype]
    shape = SMOKE if args.smoke else LLAVA
    warmup, reps = (1, 3) if device.type == "cpu" else (3, 10)
    command = "python benchmarks/bench_packed_attention.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = [
        f"device: {device_name(device)}",
        f"date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"commit: {git_commit(ROOT)} (working tree may differ)",
        f"versions: {versions()}",
        f"command: `{command.strip()}`",
        f"samples: image span {shape.image_tokens} tokens, 1-3 images per sample; dtype {args.dtype}",
        f"times: medians ({'do_bench' if device.type == 'cuda' else f'{reps} reps after {warmup} warmup'})",
        "FLOPs: 4 * Hq * Dh * allowed pairs (forward), x2.5 backward, x3.5 full; x vs ours = ms / ms(ours)",
    ]
    stem = args.stem or default_stem(device, args.head_dims, args.smoke)
    rows: list[dict] = []
    paths = (args.out_dir / f"{stem}.md", args.out_dir / f"{stem}.csv")
    for workload in args.workloads:
        for total in args.totals:
            for heads in args.heads:
                for head_dim in args.head_dims:
                    if device.type == "cuda":
                        torch._dynamo.reset()  # static-shape compiles per configuration (flex, reference_compiled)
                    case = setup(workload, total, heads, head_dim, dtype, device, shape, args.seed)
                    _check_packed_attention_inputs(case.q, case.k, case.v, case.cu_seqlens, case.max_seqlen,
                                                   case.bidir_group, None)  # the contract every provider assumes
                    new_rows = run_case(case, args, warmup, reps)
                    rows += new_rows
                    # after every case, so a run cut short leaves what it finished; never before the first
                    paths = write_tables(TITLE, rows, header, args.out_dir, stem, COLUMNS)
                    echo_rows(new_rows, f"{workload} total={total} heads={heads} Dh={head_dim}: done")
    print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    return paths


MODE_KERNELS = {"forward": ("forward",), "backward": ("dkdv", "dq"), "full": ("forward", "dkdv", "dq")}


def run_case(case: Case, args: argparse.Namespace, warmup: int, reps: int) -> list[dict]:
    """Every provider and mode on one configuration; ratios against ours within the configuration."""
    device = case.q.device
    base = {
        "workload": case.workload, "total": case.total, "segments": case.num_segments, "images": case.num_images,
        "Hq": case.num_q_heads, "Hkv": case.num_kv_heads, "Dh": case.head_dim, "dtype": args.dtype,
    }
    rows: list[dict] = []
    first_out: tuple[str, torch.Tensor] | None = None
    for mode in args.modes:
        mode_rows = []
        for provider in args.providers:
            row = {**base, "mode": mode, "provider": provider}
            try:
                if provider == "ours_atomic_dq" and mode == "forward":
                    raise Unavailable("its forward is ours'")
                fn = attention_fn(provider, case, args.reference_max_total)
                if mode != "forward" and provider == "flex" and device.type == "cpu":
                    raise Unavailable("FlexAttention has no backward on the CPU")
                if mode == "forward":
                    with torch.no_grad():
                        out = fn(case.q, case.k, case.v)
                    if first_out is None:
                        first_out = (provider, out.float())
                    else:
                        row["max |out - first|"] = f"{(out.float() - first_out[1]).abs().max().item():.2e} ({first_out[0]})"
                call, leaves = timed_call(fn, case, mode)
                ms = median_ms(call, leaves, device, warmup, reps, args.warmup_ms, args.rep_ms)
                row["ms"] = f"{ms:.3f}"
                row["TFLOP/s"] = f"{FLOP_FACTOR[mode] * case.forward_flops() / (ms * 1e-3) / 1e12:.3g}"
                peak = peak_mib(call, leaves, device)
                row["peak MiB"] = "" if peak is None else f"{peak:.0f}"
                row["_ms"] = ms
                if provider.startswith("ours"):  # which tile each kernel ran with: the autotuner's pick here
                    ran = set(MODE_KERNELS[mode]) - ({"dq"} if provider == "ours_atomic_dq" else set())  # no dq kernel
                    chosen = _triton_module()[0].chosen_configs()
                    row["note"] = "tuned: " + ", ".join(f"{k} {c}" for k, c in chosen.items() if k in ran)
            except Unavailable as reason:
                row["note"] = f"skipped: {reason}"
            except (RuntimeError, ValueError, NotImplementedError, AssertionError) as error:
                # Recorded in the table, not swallowed: OOM and compile failures are RuntimeErrors;
                # flash-attn 4 checks its limits (e.g. Hopper/Blackwell only) with assert.
                row["note"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
                print(f"{provider} {mode} {base}: {row['note']}", file=sys.stderr)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            mode_rows.append(row)
        ours = next((r["_ms"] for r in mode_rows if r["provider"] == "ours" and "_ms" in r), None)
        for row in mode_rows:
            if ours is not None and "_ms" in row:
                row["x vs ours"] = f"{row['_ms'] / ours:.2f}"
            row.pop("_ms", None)
        rows += mode_rows
    return rows


if __name__ == "__main__":
    main()
