"""The harness the fused-kernel benchmarks share (bench_projector, bench_linear_cross_entropy, bench_norm_swiglu).

A benchmark builds ``Workload``s (one setup shared by the speed and the memory runs) and a dict of
providers; :func:`run` times every provider in every mode (forward: no autograd graph; backward: the
backward of one recorded forward; full: forward + backward), measures the CUDA peak memory of one
call, and writes the table with the header STYLE.md asks for (device, date, commit, versions,
command). Ratios ("x vs ours", "peak / eager") are taken within one configuration of one run.
Timing and header helpers come from bench_packed_attention.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_packed_attention import (
    device_name,
    device_slug,
    git_commit,
    median_ms,
    peak_mib,
    versions,
)
from benchmarks.report import echo_rows, write_tables

MODES = ("forward", "backward", "full")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Unavailable(Exception):
    """A provider cannot run this workload; the message goes into the table."""


@dataclasses.dataclass
class Workload:
    """One configuration: its table columns, inputs, the shared grad_out, and the work per mode."""

    columns: dict[str, object]  # e.g. {"op": "rmsnorm", "tokens": 16384, "D": 4096}
    inputs: list[torch.Tensor]  # differentiable inputs, cloned into fresh leaves per provider
    grad_out: torch.Tensor
    work: dict[str, float]  # per mode: FLOPs (unit TFLOP/s) or bytes moved (unit GB/s)
    unit: str  # "TFLOP/s" or "GB/s"
    ceiling: float | None = None  # GB/s measured on the device (bandwidth-bound ops), for "% of ceiling"
    constants: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # non-differentiable inputs (labels)


Provider = Callable[[Workload], Callable[..., torch.Tensor]]  # may raise Unavailable


def timed_call(fn: Callable[..., torch.Tensor], workload: Workload, mode: str):
    """(the callable to time for ``mode``, the leaves whose .grad is reset between calls)."""
    if mode == "forward":

        def forward() -> None:
            with torch.no_grad():
                fn(*workload.inputs)

        return forward, []
    leaves = [x.detach().clone().requires_grad_(True) for x in workload.inputs]
    if mode == "backward":
        out = fn(*leaves)

        def backward() -> None:
            out.backward(workload.grad_out, retain_graph=True)

        return backward, leaves

    def full() -> None:
        fn(*leaves).backward(workload.grad_out)

    return full, leaves


def run_workload(workload: Workload, providers: dict[str, Provider], modes, device, warmup, reps, args) -> list[dict]:
    rows: list[dict] = []
    for mode in modes:
        mode_rows = []
        for name, provider in providers.items():
            row = {**workload.columns, "mode": mode, "provider": name}
            try:
                fn = provider(workload)
                call, leaves = timed_call(fn, workload, mode)
                ms = median_ms(call, leaves, device, warmup, reps, args.warmup_ms, args.rep_ms)
                rate = workload.work[mode] / (ms * 1e-3) / (1e12 if workload.unit == "TFLOP/s" else 1e9)
                row.update({"ms": f"{ms:.3f}", workload.unit: f"{rate:.3g}", "_ms": ms})
                if workload.ceiling:
                    row["% of ceiling"] = f"{100 * rate / workload.ceiling:.0f}"
                peak = peak_mib(call, leaves, device)
                row["peak MiB"] = "" if peak is None else f"{peak:.0f}"
                row["_peak"] = peak
            except Unavailable as reason:
                row["note"] = f"skipped: {reason}"
            except (RuntimeError, ValueError, NotImplementedError) as error:  # OOM, compile errors: recorded
                row["note"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
                print(f"{name} {mode} {workload.columns}: {row['note']}", file=sys.stderr)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            mode_rows.append(row)
        ours = next((r["_ms"] for r in mode_rows if r["provider"] == "ours" and "_ms" in r), None)
        eager_peak = next((r.get("_peak") for r in mode_rows if r["provider"] == "eager"), None)
        for row in mode_rows:
            if ours is not None and "_ms" in row:
                row["x vs ours"] = f"{row['_ms'] / ours:.3g}"
            if eager_peak and row.get("_peak") is not None:
                row["peak / eager"] = f"{row['_peak'] / eager_peak:.2f}"
            row.pop("_ms", None)
            row.pop("_peak", None)
        rows += mode_rows
    return rows


RATIOS = "x vs ours = ms / ms(ours); peak / eager = CUDA peak MiB / eager's in the same mode"


def header(device: torch.device, command: str, extra: list[str], warmup: int, reps: int,
           ratios: str = RATIOS) -> list[str]:  # fmt: skip
    """STYLE.md's header lines: device, date, commit, versions, command, ``extra``, and how the times were taken
    (with what the table's ratio columns mean)."""
    return [
        f"device: {device_name(device)}",
        f"date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"commit: {git_commit(ROOT)} (working tree may differ)",
        f"versions: {versions()}",
        f"command: `{command.strip()}`",
        *extra,
        f"times: medians ({'do_bench' if device.type == 'cuda' else f'{reps} reps after {warmup} warmup'}); {ratios}",
    ]


def add_common_arguments(parser) -> None:
    parser.add_argument("--smoke", action="store_true", help="tiny CPU-sized run (CI)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, cpu for --smoke)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 (fp32 for --smoke)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--warmup-ms", type=int, default=25, help="do_bench warmup on CUDA")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--stem", default=None, help="output file name without suffix")


def finish_arguments(args) -> None:
    if args.smoke:
        args.device = args.device or "cpu"
        args.dtype = args.dtype or "fp32"
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = args.dtype or "bf16"


def triton_provider(fn_factory: Callable[[Workload], Callable[..., torch.Tensor]]) -> Provider:
    """Wrap ours: Unavailable (with the reason) where the Triton kernels cannot run on the workload's device."""
    from vlm_core.kernels.triton_runtime import triton_status

    def provider(workload: Workload):
        ok, reason = triton_status(workload.inputs[0].device)
        if not ok:
            raise Unavailable(reason)
        return fn_factory(workload)

    return provider


def compiled_provider(fn: Callable[..., torch.Tensor]) -> Provider:
    """torch.compile of the eager reference; CUDA only (inductor's CPU build takes minutes here)."""

    def provider(workload: Workload):
        if workload.inputs[0].device.type != "cuda":
            raise Unavailable("compiled only on CUDA here (inductor's CPU build takes minutes)")
        return torch.compile(fn)

    return provider


def standard_providers(eager: Callable[..., torch.Tensor], ours: Callable[..., torch.Tensor]) -> dict[str, Provider]:
    """The three providers of a kernel benchmark: eager, compiled (torch.compile of eager) and ours (Triton)."""
    return {"eager": lambda _: eager, "compiled": compiled_provider(eager), "ours": triton_provider(lambda _: ours)}


def bandwidth_ceiling_gbs(device: torch.device, warmup: int, reps: int, args) -> float:
    """GB/s of a plain device copy of 1 GiB (64 MiB on the CPU): bytes read + written / time."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 24)
    source = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    target = torch.empty_like(source)
    ms = median_ms(lambda: target.copy_(source), [], device, warmup, reps, args.warmup_ms, args.rep_ms)
    return 2 * source.numel() * 4 / (ms * 1e-3) / 1e9


def main_loop(title, script, workloads, providers, args, argv, extra_header, stem_base) -> tuple[Path, Path]:
    """Run every workload (built lazily, one at a time) and rewrite the tables after each."""
    device = args.device
    warmup, reps = (1, 3) if device.type == "cpu" else (3, 10)
    command = f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = header(device, command, extra_header, warmup, reps)
    stem = args.stem or (f"{stem_base}_smoke_cpu" if args.smoke else
                         f"{stem_base}_{device_slug(device)}")
    rows: list[dict] = []
    paths = (args.out_dir / f"{stem}.md", args.out_dir / f"{stem}.csv")
    for make_workload in workloads:
        if device.type == "cuda":
            torch._dynamo.reset()
        workload = make_workload()
        new_rows = run_workload(workload, providers(workload), args.modes, device, warmup, reps, args)
        rows += new_rows
        # after every workload, so a run cut short leaves what it finished; never before the first, so a
        # run cut before any figure leaves an earlier run's tables of the same name as they were
        paths = write_tables(title, rows, lines, args.out_dir, stem)
        echo_rows(new_rows, f"{workload.columns}: done")
    print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    return paths
