"""Benchmark of RMSNorm and SwiGLU's gate: GB/s of ours (Triton) against eager and compiled PyTorch, and
against the memory-bandwidth ceiling measured on the same device in the same run.

Providers: eager (vlm_core.kernels.rmsnorm.rmsnorm_reference / swiglu_reference, the model's reference
path), compiled (torch.compile of it; CUDA only), ours (rmsnorm_triton / swiglu_triton).
Bytes counted (s = element size; the minimum each op must move):
    rmsnorm   forward  2 N D s (read x, write y)          backward 3 N D s (read x, dy; write dx)
    swiglu    forward  3 N H s (read gate, up; write y)   backward 5 N H s (read dy, gate, up; write dgate, dup)
    full = forward + backward. "% of ceiling" = GB/s / the ceiling, a plain 1 GiB device copy
    (2 x bytes / time) measured at the start of the run.

GPU:   python benchmarks/bench_norm_swiglu.py        (tokens 16384; D 2048 4096 8192; H 5632 11008 14336; bf16)
CPU:   python benchmarks/bench_norm_swiglu.py --smoke   (tiny; eager, and ours under TRITON_INTERPRET=1)
Results go to benchmarks/results/norm_swiglu_<device>.{md,csv,png}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.kernel_bench import (
    DTYPES,
    Workload,
    add_common_arguments,
    bandwidth_ceiling_gbs,
    finish_arguments,
    main_loop,
    standard_providers,
)
from vlm_core.kernels.rmsnorm import rmsnorm_reference, rmsnorm_triton
from vlm_core.kernels.swiglu import swiglu_reference, swiglu_triton

EPS = 1e-5


def setup(op: str, tokens: int, width: int, dtype: torch.dtype, device: torch.device, seed: int, ceiling: float) -> Workload:
    """Inputs of one configuration, shared by the speed and memory runs of every provider."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=generator).to(device=device, dtype=dtype)

    size = torch.finfo(dtype).bits // 8
    if op == "rmsnorm":
        inputs = [randn(tokens, width), 1 + 0.1 * randn(width)]
        per_mode = {"forward": 2 * tokens * width * size, "backward": 3 * tokens * width * size}
    else:
        inputs = [randn(tokens, width), randn(tokens, width)]
        per_mode = {"forward": 3 * tokens * width * size, "backward": 5 * tokens * width * size}
    per_mode["full"] = per_mode["forward"] + per_mode["backward"]
    return Workload({"op": op, "tokens": tokens, "width": width, "dtype": str(dtype)[6:]}, inputs,
                    randn(tokens, width), per_mode, "GB/s", ceiling)  # fmt: skip


def providers(workload: Workload) -> dict:
    if workload.columns["op"] == "rmsnorm":
        eager = lambda x, w: rmsnorm_reference(x, w, EPS)
        ours = lambda x, w: rmsnorm_triton(x, w, EPS)
    else:
        eager, ours = swiglu_reference, swiglu_triton
    return standard_providers(eager, ours)


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--tokens", type=int, default=None, help="rows (default 16384; 64 for --smoke)")
    parser.add_argument("--norm-dims", type=int, nargs="+", default=None, help="RMSNorm D (default 2048 4096 8192)")
    parser.add_argument("--swiglu-dims", type=int, nargs="+", default=None, help="SwiGLU H (default 5632 11008 14336)")
    args = parser.parse_args(argv)
    finish_arguments(args)
    tokens = args.tokens or (64 if args.smoke else 16384)
    norm_dims = args.norm_dims or ([96] if args.smoke else [2048, 4096, 8192])
    swiglu_dims = args.swiglu_dims or ([352] if args.smoke else [5632, 11008, 14336])
    dtype = DTYPES[args.dtype]
    warmup, reps = (1, 3) if args.device.type == "cpu" else (3, 10)
    ceiling = bandwidth_ceiling_gbs(args.device, warmup, reps, args)
    workloads = [lambda d=d: setup("rmsnorm", tokens, d, dtype, args.device, args.seed, ceiling) for d in norm_dims]
    workloads += [lambda h=h: setup("swiglu", tokens, h, dtype, args.device, args.seed, ceiling) for h in swiglu_dims]
    extra = [f"bandwidth ceiling: {ceiling:.1f} GB/s (device copy of 1 GiB, 64 MiB on the CPU; read + write)",
             "bytes: the minimum each op moves (see the script's docstring); eps 1e-5"]  # fmt: skip
    return main_loop("RMSNorm and SwiGLU benchmark", "bench_norm_swiglu.py", workloads, providers, args, argv,
                     extra, "norm_swiglu")  # fmt: skip


if __name__ == "__main__":
    main()
