"""The typed configuration of how a training job spreads over processes (``parallel.*``)."""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS: tuple[str, ...] = ("auto", "gloo", "nccl")


@dataclass
class ParallelConfig:
    """Tensor parallelism (TP) inside a group of ranks, data parallelism (DP) across the groups.

    The world size comes from the launcher (torchrun's ``WORLD_SIZE`` or Slurm's ``SLURM_NTASKS`` under
    submitit), so it is not a field: DP = world size / ``tensor_parallel``. A plain ``python train.py``
    is a world of one and never touches ``torch.distributed``.
    """

    tensor_parallel: int = 1  # TP ranks that share one model replica (megatron-core's tensor_model_parallel_size)
    backend: str = "auto"  # "auto": nccl on CUDA, gloo on the CPU
    timeout_min: int = 30  # how long a collective may wait for the other ranks before the job fails

    def __post_init__(self) -> None:
        if self.tensor_parallel < 1:
            raise ValueError(f"parallel.tensor_parallel={self.tensor_parallel} must be >= 1 (1 = no tensor parallelism)")
        if self.backend not in BACKENDS:
            raise ValueError(f"parallel.backend={self.backend!r}; expected one of {list(BACKENDS)}")
        if self.timeout_min < 1:
            raise ValueError(f"parallel.timeout_min={self.timeout_min} must be >= 1")
