"""Process groups of a job: this process's rank, the world, and which ranks share a model (TP) or data (DP).

A job learns its place from the launcher that started it:
- ``torchrun``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
- a Slurm job step with several tasks (submitit's multi-task jobs, or ``srun``): ``SLURM_PROCID``,
  ``SLURM_NTASKS``, ``SLURM_LOCALID`` and the job's first node as the rendezvous host;
- anything else is a world of one, and nothing here touches ``torch.distributed`` or imports megatron-core.

The groups come from ``megatron.core.parallel_state.initialize_model_parallel``: ranks ``[k*tp, (k+1)*tp)``
form tensor-parallel group k, and ranks with equal TP rank form a data-parallel group.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from vlm_core.parallel.config import ParallelConfig

log = logging.getLogger(__name__)

# Rendezvous ports of Slurm jobs: a fixed range, offset by the job id and by the restart count, so that two
# jobs on one node, or a requeued job whose predecessor's socket lingers in TIME_WAIT, do not collide.
SLURM_PORT_BASE = 15_000
SLURM_PORT_SPAN = 20_000


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in the world, as its launcher says."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29_500
    launcher: str = "single"  # "single", "torchrun" or "slurm"


def detect_launch(environ: Mapping[str, str] | None = None) -> LaunchInfo:
    """Read the launcher's environment (torchrun first, then a multi-task Slurm step)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return LaunchInfo(
            rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(env.get("MASTER_PORT", 29_500)),
            launcher="torchrun",
        )
    tasks = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")))
    if tasks > 1 and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:  # inside srun, one process per task
        job_id = int(env.get("SLURM_ARRAY_JOB_ID", env.get("SLURM_JOB_ID", "0")))
        task_id = int(env.get("SLURM_ARRAY_TASK_ID", "0"))
        restarts = int(env.get("SLURM_RESTART_COUNT", "0"))
        port = SLURM_PORT_BASE + (job_id * 97 + task_id * 13 + restarts) % SLURM_PORT_SPAN
        return LaunchInfo(
            rank=int(env["SLURM_PROCID"]), world_size=tasks, local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=_slurm_master(env), master_port=int(env.get("MASTER_PORT", port)), launcher="slurm",
        )
    return LaunchInfo()


def _slurm_master(env: Mapping[str, str]) -> str:
    """The rendezvous host of a Slurm job: loopback on one node, else the first host of the node list."""
    if int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1"))) == 1:
        return "127.0.0.1"
    if "MASTER_ADDR" in env:
        return env["MASTER_ADDR"]
    nodes = env["SLURM_JOB_NODELIST"]
    hosts = subprocess.run(
        ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True
    ).stdout.split()
    return hosts[0]


@dataclass
class ParallelEnv:
    """This process's ranks. The world-of-one default is what a plain ``python train.py`` runs with."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tp_rank: int = 0
    tp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    launcher: str = "single"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Global rank 0: the rank that writes logs, metrics and the shared parts of checkpoints."""
        return self.rank == 0

    @property
    def tensor_parallel(self) -> bool:
        return self.tp_size > 1

    def tp_group(self) -> Any:
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_group()

    def dp_group(self) -> Any:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group()

    @property
    def collective_device(self) -> torch.device:
        """Where tensors for collectives live: the GPU under nccl, the CPU under gloo."""
        return self.device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size} ({self.launcher}): tensor-parallel rank {self.tp_rank}/{self.tp_size}, "
            f"data-parallel rank {self.dp_rank}/{self.dp_size}, device {self.device}"
        )


def init_parallel(cfg: ParallelConfig, device: torch.device, launch: LaunchInfo | None = None) -> ParallelEnv:
    """Join the launcher's process group and build megatron-core's TP and DP groups; a world of one joins nothing.

    ``device`` is the job's resolved device; on CUDA each process takes GPU ``local_rank``.
    """
    launch = detect_launch() if launch is None else launch
    tp = cfg.tensor_parallel
    if launch.world_size == 1:
        if tp > 1:
            raise ValueError(
                f"parallel.tensor_parallel={tp} needs {tp} processes, but this is a single process; launch with "
                f"`torchrun --nproc_per_node {tp} train.py parallel.tensor_parallel={tp} ...` or as a Slurm job with "
                f"hydra.launcher.tasks_per_node={tp}"
            )
        return ParallelEnv(device=device)
    if launch.world_size % tp:
        raise ValueError(
            f"parallel.tensor_parallel={tp} does not divide the world of {launch.world_size} processes "
            f"({launch.launcher}); data parallelism needs world_size = tensor_parallel x replicas"
        )
    if device.type == "cuda":
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(
            backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}", rank=launch.rank,
            world_size=launch.world_size, timeout=timedelta(minutes=cfg.timeout_min),
        )
    parallel_state = _megatron_parallel_state()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, distributed_timeout_minutes=cfg.timeout_min)
    env = ParallelEnv(
        rank=launch.rank, world_size=launch.world_size, local_rank=launch.local_rank,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(), tp_size=tp,
        dp_rank=parallel_state.get_data_parallel_rank(), dp_size=parallel_state.get_data_parallel_world_size(),
        device=device, launcher=launch.launcher,
    )
    log.info("joined %s process group: %s", backend, env.describe())
    return env


def shutdown_parallel(env: ParallelEnv) -> None:
    """Leave the process groups ``init_parallel`` joined (nothing for a world of one)."""
    if not env.distributed or not dist.is_initialized():
        return
    _megatron_parallel_state().destroy_model_parallel()
    dist.destroy_process_group()


def _megatron_parallel_state() -> Any:
    import warnings

    with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": expected on the CPU
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state
    return parallel_state
