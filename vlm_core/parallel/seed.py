"""Seeding per tensor-parallel and data-parallel rank, on the CPU and on CUDA.

megatron-core keeps its per-rank streams in ``CudaRNGStatesTracker`` (``model_parallel_cuda_manual_seed``),
which only runs on CUDA. The project keeps its own, device-agnostic tracker with megatron's seeds:

- the **default** stream (torch's global RNG) gets ``seed`` on every rank. The model is initialised from it
  before it is sharded, so TP=n starts from exactly the TP=1 weights; replicated computations (dropout on
  the residual stream, say) draw the same numbers on every rank of a TP group, as they must;
- the **tensor-parallel** stream gets ``seed + 2718 + tp_rank`` (megatron's offset): draws inside a rank's
  shard (dropout on its heads) differ across the TP ranks of a group and repeat across DP replicas.

Data order needs no per-rank seed: each DP rank takes its share of one global batch stream
(:mod:`vlm_core.parallel.data`), which is what makes DP=2 reproduce DP=1 with the doubled batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from vlm_core.parallel.env import ParallelEnv

TENSOR_PARALLEL_SEED_OFFSET = 2718  # megatron.core.tensor_parallel.random.model_parallel_cuda_manual_seed's
TENSOR_PARALLEL_STREAM = "tensor-parallel"


@dataclass(frozen=True)
class RankSeeds:
    """The seeds of this rank's streams."""

    default: int  # torch's global RNG: the same on every rank
    tensor_parallel: int  # the tensor-parallel stream: seed + 2718 + tp_rank


def rank_seeds(seed: int, env: ParallelEnv) -> RankSeeds:
    return RankSeeds(default=seed, tensor_parallel=seed + TENSOR_PARALLEL_SEED_OFFSET + env.tp_rank)


class RNGTracker:
    """Named RNG streams: inside ``fork(name)`` torch draws from that stream; outside, the global state is untouched.

    Each stream keeps its position between forks (a second fork continues where the first stopped). The
    state is the CPU generator's, plus the current CUDA device's when ``device`` is CUDA.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._states: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _capture(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _restore(self, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        cpu, cuda = state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"RNGTracker: stream {name!r} already exists")
        outer = self._capture()
        torch.manual_seed(seed)  # seeds the CPU generator and every CUDA device
        self._states[name] = self._capture()
        self._restore(outer)

    @contextlib.contextmanager
    def fork(self, name: str = TENSOR_PARALLEL_STREAM) -> Iterator[None]:
        if name not in self._states:
            raise KeyError(f"RNGTracker: no stream {name!r}; streams: {sorted(self._states)}")
        outer = self._capture()
        self._restore(self._states[name])
        try:
            yield
        finally:
            self._states[name] = self._capture()
            self._restore(outer)


_TRACKER: RNGTracker | None = None


def seed_ranks(seed: int, env: ParallelEnv) -> RankSeeds:
    """Seed the default stream (same on every rank) and the tensor-parallel stream (per TP rank).

    On CUDA with TP > 1 megatron-core's own tracker is seeded too, with the same seeds, so megatron code
    that forks it (its dropout inside parallel regions) draws from per-rank streams as well.
    """
    global _TRACKER
    seeds = rank_seeds(seed, env)
    torch.manual_seed(seeds.default)
    _TRACKER = RNGTracker(env.device)
    _TRACKER.add(TENSOR_PARALLEL_STREAM, seeds.tensor_parallel)
    if env.device.type == "cuda" and env.tensor_parallel:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed, tp_rank=env.tp_rank, ep_rank=0, etp_rank=0, force_reset_rng=True)
        torch.manual_seed(seeds.default)  # megatron seeds CUDA only; keep the CPU generator in step with it
    return seeds


def rng_tracker() -> RNGTracker:
    """The tracker :func:`seed_ranks` built (fork ``"tensor-parallel"`` for per-TP-rank randomness)."""
    if _TRACKER is None:
        raise RuntimeError("seed_ranks() has not run in this process; the job calls it before building the model")
    return _TRACKER
