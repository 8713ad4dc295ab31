"""Preemption and time limits on Slurm: checkpoint at the next step boundary, then submitit's requeue.

Slurm warns a job before it preempts it or hits its time limit with a signal (submitit asks for ``USR2``
``signal_delay_s`` seconds ahead; ``scancel --signal=USR2 JOB`` sends the same). submitit's own handler
requeues the job at once, wherever the training is, so the steps since the last periodic checkpoint would
be lost. Inside a submitit job the guard takes the signal over:

1. the handler only records the signal (a handler may run between any two bytecodes, mid-backward);
2. after each optimizer step the training loop asks :meth:`PreemptionGuard.requested`; the ranks agree
   with one all-reduce, so all of them stop after the same step;
3. the loop writes a checkpoint and calls :meth:`PreemptionGuard.stop`, which hands the signal to
   submitit's handler: on rank 0 it calls the launcher's ``checkpoint()`` (hydra-submitit-launcher's
   resubmits the same Hydra job), requeues the job with ``scontrol requeue`` and exits; the other ranks exit.
4. The requeued job (``SLURM_RESTART_COUNT`` >= 1) resumes from the newest checkpoint of its run
   directory (``vlm_core.train.job``), and goes on exactly as an uninterrupted run would.

A signal that arrives while no training loop runs (data preparation, evaluation) goes to submitit's
handler right away: there is no step to finish, and the last checkpoint is the resume point.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

from vlm_core.parallel.collectives import any_rank
from vlm_core.parallel.env import ParallelEnv

log = logging.getLogger(__name__)


def _submitit_signal() -> int:
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")  # submitit's variable and default
    return getattr(signal, name if name.startswith("SIG") else f"SIG{name}")


class PreemptionGuard:
    """Records the preemption signal; the training loop checkpoints and stops at its next step boundary."""

    def __init__(self, env: ParallelEnv, signum: int) -> None:
        self.env = env
        self.signum = signum
        self.received: int | None = None
        self.in_loop = False  # set by the training loop while it can stop at a step boundary
        self._previous: Any = None

    @classmethod
    def install(cls, env: ParallelEnv) -> PreemptionGuard | None:
        """Take over submitit's preemption signal; None outside a submitit job (nothing to requeue)."""
        if not os.environ.get("SUBMITIT_EXECUTOR") or threading.current_thread() is not threading.main_thread():
            return None
        guard = cls(env, _submitit_signal())
        guard._previous = signal.signal(guard.signum, guard._on_signal)
        log.info("preemption: %s will checkpoint at the next step boundary, then requeue",
                 signal.Signals(guard.signum).name)
        return guard

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        if not self.in_loop:
            log.warning("preemption: caught %s outside training; requeueing now", signal.Signals(signum).name)
            self._hand_over()
        log.warning("preemption: caught %s; stopping after this step", signal.Signals(signum).name)

    def requested(self) -> bool:
        """Whether any rank has received the signal (a collective: every rank must call it, every step)."""
        return any_rank(self.received is not None, self.env)

    def stop(self, step: int) -> None:
        """After the checkpoint of ``step``: requeue through submitit and exit (does not return)."""
        log.warning("preemption: checkpoint of step %d written; handing over to submitit to requeue", step)
        self._hand_over()

    def _hand_over(self) -> None:
        previous = self._previous
        if callable(previous):
            previous(self.signum, None)  # rank 0: submitit checkpoints the launcher, requeues and sys.exit()s
        # Other ranks return from submitit's handler ("not checkpointing since I am a slave"); they stop here,
        # and Slurm restarts every task of the requeued job.
        sys.exit(0 if self.env.rank else 1)
