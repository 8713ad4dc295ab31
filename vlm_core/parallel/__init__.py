"""Tensor and data parallelism for the single-device model code, and launching on torchrun and Slurm.

    config.py       ParallelConfig (``parallel.*``)
    env.py          process groups from torchrun's or Slurm's environment (megatron-core's parallel_state)
    seed.py         per-rank RNG streams on the CPU and CUDA
    plan.py         the tensor-parallel plan: which layer splits how; ``parallelize(model, env)``
    layers.py       megatron-core's parallel layers shaped like the torch modules they replace
    loss.py         the vocab-parallel LM-head cross-entropy
    data.py         each data-parallel rank's share of the global batch stream
    ddp.py          torch DDP over the data-parallel group, gradients summed
    grad_norm.py    gradient clipping across tensor-parallel shards
    reshard.py      shard / merge maths for checkpoints (pure tensors)
    checkpoint.py   sharded checkpoint files, read back under any TP size
    collectives.py  small collectives of the job (sums, flags, broadcasts)
    preemption.py   Slurm preemption: checkpoint at a step boundary, then submitit's requeue

Nothing here is imported by ``vlm_core.model``; megatron-core is imported only when a job runs distributed.
"""
