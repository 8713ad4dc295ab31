"""Where the fused projector's time goes: each kernel launch of ours timed alone, each GEMM against cuBLAS.

bench_projector.py times whole passes. On the H100 (benchmarks/results/projector_nvidia-h100-80gb-hbm3.md)
our forward ran at 430-473 TFLOP/s and our backward at 223-230, against eager's 322-336 in cuBLAS, with the
same GEMM kernel in both passes. This script says which launch of the backward falls short and whether the
operand layout is the cause: the backward's GEMMs read operands M- or N-major (transposed weights, d embeds
as A^T), the forward's read them K-major.

How: one forward + backward of ``projector_scatter_triton`` runs with the op's kernels wrapped, so every
launch is recorded with its grid and arguments as the op made them (the autotuner has chosen its config by
then; the config goes in the table). Each recorded launch is then replayed alone and timed. Each GEMM's
peer is ``torch.mm`` (cuBLAS on a GPU) of the same logical operands in the same memory layouts, the gathered
rows of d embeds materialized beforehand and no epilogue: the bare product our kernel's loads and epilogue
add to. The last rows per pass: the sum of the launches, and the pass itself under autograd, timed whole (the
difference is allocation, torch's ops around the kernels: the copy of d embeds, the gather of its image rows
for d W2, the casts of the float32 weight gradients). Replays write their outputs again; the LayerNorm
backward overwrites its input in place, so its replays work on changed values (the same work, so the same
time).

Rows: ``mode`` is the pass, ``provider`` ours or torch.mm; ``x vs ours`` = ms / ms(ours) of the same launch, so
a torch.mm row below 1 is a GEMM where cuBLAS is faster. A/B: how the kernel reads its operands (K-major:
contiguous along the reduction; M/N-major: along the output's rows/columns; gathered: rows through an
index vector).

GPU:   python benchmarks/bench_projector_gemms.py --images 64     (LLaVA-1.5 shapes, bf16)
CPU:   python benchmarks/bench_projector_gemms.py --smoke         (tiny, ours in Triton's interpreter)
Results go to benchmarks/results/projector_gemms_<device>.{md,csv,png}.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_packed_attention import device_slug, median_ms  # noqa: E402
from benchmarks.bench_projector import parse_shape_arguments, providers, setup  # noqa: E402
from benchmarks.kernel_bench import DTYPES, header, timed_call  # noqa: E402
from benchmarks.report import echo_rows, write_tables  # noqa: E402
from vlm_core.kernels import fused_projector, fused_projector_kernels as fpk  # noqa: E402

# What each GEMM kind computes (fused_projector_kernels's kinds), as the table names it.
GEMM_NAMES = {
    fpk._FWD_GELU: "fc1: gelu(x W1^T + b1)",
    fpk._FWD_SCATTER: "fc2: act W2^T + b2 -> embeds[rows]",
    fpk._BWD_DACT: "d pre = G[rows] W2 * gelu'(pre)",
    fpk._BWD_DW2: "d W2 = G[rows]^T act",
    fpk._BWD_DW2_GELU: "d W2 = G[rows]^T gelu(pre)",
    fpk._BWD_DW1: "d W1 = d pre^T x",
    fpk._BWD_DX: "d x = d pre W1",
}
OTHER_NAMES = {"column_sum": "d b2: column sums of G[rows]", "layer_norm_stats": "LayerNorm statistics",
               "layer_norm_backward": "LayerNorm backward"}  # fmt: skip
COLUMNS = ("images", "P", "D_v", "D_h", "D", "LayerNorm", "dtype", "launch", "M", "N", "K", "A", "B", "mode",
           "provider", "ms", "TFLOP/s", "x vs ours", "note")
_MATMUL_PARAMS = list(inspect.signature(fpk._matmul_kernel).parameters)


@dataclasses.dataclass
class Launch:
    """One kernel launch as the op made it, and what the autotuner chose for it."""

    pass_name: str  # "forward" or "backward"
    kernel_name: str  # the attribute of fused_projector_kernels._kernels(...)
    kernel: object
    grid: object
    args: tuple
    kwargs: dict
    config: str

    def arg(self, name: str):
        """A _matmul_kernel argument by parameter name."""
        index = _MATMUL_PARAMS.index(name)
        return self.args[index] if index < len(self.args) else self.kwargs[name]

    @property
    def is_gemm(self) -> bool:
        return self.kernel_name == "matmul"

    def replay(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)


def _config_text(kernel) -> str:
    config = getattr(kernel, "best_config", None)
    if config is None:
        return ""
    blocks = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in config.kwargs)
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


class _Recorder:
    """Launches the real kernel, then records the launch (its config read back from the autotuner)."""

    def __init__(self, name: str, kernel, sink: list[Launch], pass_name: Callable[[], str]):
        self.name, self.kernel, self.sink, self.pass_name = name, kernel, sink, pass_name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kernel[grid](*args, **kwargs)
            self.sink.append(Launch(self.pass_name(), self.name, self.kernel, grid, args, kwargs,
                                    _config_text(self.kernel)))  # fmt: skip

        return launch


@contextmanager
def recording(sink: list[Launch], pass_name: Callable[[], str]) -> Iterator[None]:
    """fused_projector's kernels wrapped by recorders while the block runs (both modules look them up by
    calling ``_kernels``; fused_projector imported its own name for it)."""
    saved = fused_projector._kernels

    def wrapped(interpret: bool):
        real = saved(interpret)
        return types.SimpleNamespace(**{n: _Recorder(n, k, sink, pass_name) for n, k in vars(real).items()})

    fused_projector._kernels = wrapped
    try:
        yield
    finally:
        fused_projector._kernels = saved


def record_launches(workload) -> list[Launch]:
    """Every launch of one forward + backward of ours on ``workload``, after one untimed call that autotunes."""
    ours = providers(workload)["ours"](workload)
    full, _ = timed_call(ours, workload, "full")
    full()  # autotuning (on a GPU) happens here, outside the recording
    leaves = [x.detach().clone().requires_grad_(True) for x in workload.inputs]
    sink: list[Launch] = []
    current = ["forward"]
    with recording(sink, lambda: current[0]):
        out = ours(*leaves)
        current[0] = "backward"
        out.backward(workload.grad_out)
    return sink


def operand_layout(strides: tuple[int, int], gathered: str, names: str) -> str:
    """How a GEMM reads an operand of logical strides (rows, columns): "K-major" etc., and any gather."""
    outer, inner = names  # e.g. "MK" for A [m, k], "KN" for B [k, n]
    if strides[1] == 1:
        major = f"{inner}-major"
    elif strides[0] == 1:
        major = f"{outer}-major"
    else:
        major = "strided"
    return major + (f", {gathered}" if gathered else "")


def _logical(
    t: torch.Tensor, shape: tuple[int, int], strides: tuple[int, int], rows: torch.Tensor | None
) -> torch.Tensor:
    """The [m, k] operand the kernel addresses in ``t`` (row i read at rows[i] when given), in the same layout: a
    view where nothing is gathered, else a K-major copy."""
    if rows is None:
        return t.as_strided(shape, strides)
    if strides[1] != 1:
        raise ValueError(f"rows gathered from an operand that is not K-major; strides {strides}")
    base = t.as_strided(((t.numel() - shape[1]) // strides[0] + 1, shape[1]), (strides[0], 1))  # every whole row
    return base.index_select(0, rows.to(torch.int64))


def peer_operands(launch: Launch) -> tuple[torch.Tensor, torch.Tensor]:
    """A [m, k] and B [k, n] of a GEMM launch in the kernel's layouts, gathers done, loads' transforms left out."""
    m, n, k = launch.arg("M"), launch.arg("N"), launch.arg("K")
    a_strides = (launch.arg("stride_am"), launch.arg("stride_ak"))
    b_strides = (launch.arg("stride_bk"), launch.arg("stride_bn"))
    rows_a = launch.arg("RowsA") if launch.arg("GATHER_A_ROWS") else None
    a = _logical(launch.arg("A"), (m, k), a_strides, rows_a)
    b = launch.arg("B").as_strided((k, n), b_strides)
    if a.dtype != b.dtype:  # float32 d embeds against half weights: the kernel rounds A per tile in its loads
        a = a.to(b.dtype)
    return a, b


def gemm_columns(launch: Launch) -> dict[str, object]:
    m, n, k = launch.arg("M"), launch.arg("N"), launch.arg("K")
    a_gather = "gathered rows" if launch.arg("GATHER_A_ROWS") else ""
    a_gather += ", LayerNorm" if launch.arg("NORM_A") else ""
    b_extra = ", ".join(x for x, on in (("GELU", launch.arg("GELU_B")), ("LayerNorm", launch.arg("NORM_B"))) if on)
    return {"launch": GEMM_NAMES[launch.arg("kind")], "M": m, "N": n, "K": k,
            "A": operand_layout((launch.arg("stride_am"), launch.arg("stride_ak")), a_gather.lstrip(", "), "MK"),
            "B": operand_layout((launch.arg("stride_bk"), launch.arg("stride_bn")), b_extra, "KN")}  # fmt: skip


def _timed_row(columns: dict, mode: str, provider: str, ms: float, flops: float | None, note: str = "") -> dict:
    row = {**columns, "mode": mode, "provider": provider, "ms": f"{ms:.3f}",
           "TFLOP/s": f"{flops / (ms * 1e-3) / 1e12:.3g}" if flops else "", "_ms": ms}  # fmt: skip
    if note:
        row["note"] = note
    return row


def workload_rows(workload, device: torch.device, warmup: int, reps: int, args) -> list[dict]:
    """The table rows of one workload, pass by pass: each launch of ours (and torch.mm beside each GEMM), then
    the sums of the pass's launches and the pass timed whole."""
    base = {k: workload.columns[k] for k in ("images", "P", "D_v", "D_h", "D", "LayerNorm", "dtype")}
    launches = record_launches(workload)
    ours = providers(workload)["ours"](workload)

    def timed(call: Callable[[], None], leaves=()) -> float:
        return median_ms(call, list(leaves), device, warmup, reps, args.warmup_ms, args.rep_ms)

    rows: list[dict] = []
    for pass_name in dict.fromkeys(launch.pass_name for launch in launches):
        sums = {"ours": 0.0, "torch.mm": 0.0}
        for launch in (launch for launch in launches if launch.pass_name == pass_name):
            flops = None
            if launch.is_gemm:
                columns = {**base, **gemm_columns(launch)}
                flops = 2.0 * launch.arg("M") * launch.arg("N") * launch.arg("K")
            else:
                columns = {**base, "launch": OTHER_NAMES.get(launch.kernel_name, launch.kernel_name)}
            ours_ms = timed(launch.replay)
            sums["ours"] += ours_ms
            pair = [_timed_row(columns, pass_name, "ours", ours_ms, flops,
                               f"tuned: {launch.config}" if launch.config else "")]  # fmt: skip
            if launch.is_gemm:
                a, b = peer_operands(launch)
                peer_ms = timed(lambda a=a, b=b: torch.mm(a, b))
                sums["torch.mm"] += peer_ms
                pair.append(_timed_row(columns, pass_name, "torch.mm", peer_ms, flops))
            rows += _with_ratios(pair)
        flops = workload.work[pass_name]
        total = [_timed_row({**base, "launch": "sum of the launches above"}, pass_name, provider, ms, flops)
                 for provider, ms in sums.items()]  # fmt: skip
        whole_ms = timed(*timed_call(ours, workload, pass_name))
        total.append(_timed_row({**base, "launch": "the whole pass (autograd)"}, pass_name, "ours", whole_ms, flops))
        rows += _with_ratios(total)
    return rows


def _with_ratios(rows: list[dict]) -> list[dict]:
    """``x vs ours`` within a group of rows (the first ours row is the reference); drops the raw times."""
    ours = next((r["_ms"] for r in rows if r["provider"] == "ours"), None)
    for row in rows:
        if ours:
            row["x vs ours"] = f"{row['_ms'] / ours:.3g}"
        row.pop("_ms")
    return rows


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    args, images, tokens_per_image, dims = parse_shape_arguments(__doc__.split("\n\n")[0], argv, [64])
    from vlm_core.kernels.triton_runtime import triton_status

    device = args.device
    ok, reason = triton_status(device)
    if not ok:
        raise SystemExit(f"bench_projector_gemms.py: ours cannot run on {device}: {reason}")
    warmup, reps = (1, 3) if device.type == "cpu" else (3, 10)
    command = "python benchmarks/bench_projector_gemms.py " + " ".join(sys.argv[1:] if argv is None else argv)
    extra = ["each launch of ours replayed alone, with the arguments and the config the op's own call had; "
             "torch.mm (cuBLAS on a GPU): the same logical operands in the same layouts (gathers materialized "
             "beforehand, no bias, GELU or LayerNorm, output in the operands' dtype); its sum counts the GEMMs only",
             "TFLOP/s: 2 M N K per GEMM; the pass rows use bench_projector.py's FLOPs (2 M (D_v D_h + D_h D) "
             "forward, twice that backward)"]  # fmt: skip
    lines = header(device, command, extra, warmup, reps,
                   ratios="x vs ours = ms / ms(ours) of the same launch (the pass rows: of the sum of ours)")
    stem = args.stem or ("projector_gemms_smoke_cpu" if args.smoke else f"projector_gemms_{device_slug(device)}")
    rows: list[dict] = []
    paths = (args.out_dir / f"{stem}.md", args.out_dir / f"{stem}.csv")
    for n in images:
        workload = setup(n, tokens_per_image, dims, DTYPES[args.dtype], device, args.seed, args.layer_norm)
        new_rows = workload_rows(workload, device, warmup, reps, args)
        rows += new_rows
        paths = write_tables("Fused projector, launch by launch", rows, lines, args.out_dir, stem, COLUMNS)
        echo_rows(new_rows, f"{n} images: done")
        del workload
    print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    return paths


if __name__ == "__main__":
    main()
