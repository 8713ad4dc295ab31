"""Where a process sits in the world, read from torchrun's and Slurm's environments; the config's checks."""

from __future__ import annotations

import pytest
import torch

from vlm_core.parallel.config import ParallelConfig
from vlm_core.parallel.env import LaunchInfo, detect_launch, init_parallel


def test_torchrun_environment() -> None:
    launch = detect_launch({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node7",
                            "MASTER_PORT": "29400"})
    assert launch == LaunchInfo(rank=3, world_size=4, local_rank=1, master_addr="node7", master_port=29400,
                                launcher="torchrun")


def test_slurm_multi_task_step() -> None:
    env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
           "SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "vm"}
    launch = detect_launch(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr) == (1, 2, 1, "127.0.0.1")
    requeued = detect_launch({**env, "SLURM_RESTART_COUNT": "1"})
    assert requeued.master_port != launch.master_port, "a requeued job must not reuse its predecessor's port"


def test_single_process_and_slurm_batch_shell_are_a_world_of_one() -> None:
    assert detect_launch({}) == LaunchInfo()
    # the batch script of a 2-task job (no srun step yet) is one process
    assert detect_launch({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_ID": "5"}).world_size == 1


def test_tensor_parallel_needs_processes() -> None:
    with pytest.raises(ValueError, match="torchrun --nproc_per_node 2"):
        init_parallel(ParallelConfig(tensor_parallel=2), torch.device("cpu"), LaunchInfo())
    assert not init_parallel(ParallelConfig(), torch.device("cpu"), LaunchInfo()).distributed


def test_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="parallel.tensor_parallel=0"):
        ParallelConfig(tensor_parallel=0)
    with pytest.raises(ValueError, match="parallel.backend='mpi'"):
        ParallelConfig(backend="mpi")
