"""Preemption: SIGTERM or SIGUSR1 end the run at the next optimizer step, with a checkpoint.

Schedulers warn a job before they kill it: SLURM sends SIGTERM (or, with
`#SBATCH --signal=USR1@SECONDS`, SIGUSR1 that long ahead) to every task; torchrun and
DeepSpeed's `launch.py` forward SIGTERM to their ranks. The handler only records the
signal. After each optimizer step the ranks agree with one tiny all-reduce whether any
of them got one (signals reach ranks at different moments, some never), so every rank
stops after the same step, writes the same checkpoint and exits with PREEMPTED_EXIT.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any, Optional

from owlore_ds import distributed as dist

log = logging.getLogger("owlore_ds")

# sysexits' EX_TEMPFAIL ("try again later"): the run saved its state and stopped before the
# end; the same command with --resume_from_checkpoint auto continues it.
PREEMPTED_EXIT = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Ends the process with PREEMPTED_EXIT once the checkpoint is written."""

    def __init__(self) -> None:
        super().__init__(PREEMPTED_EXIT)


class PreemptionWatch:
    """Records SIGTERM/SIGUSR1 from construction until close(); `requested()` is collective."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # signal() works only there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)

    def _record(self, signum: int, frame: Optional[FrameType]) -> None:
        self.received = signum

    def requested(self) -> bool:
        """True on every rank when any rank got a signal (every rank must call it, once per step)."""
        return dist.all_reduce([0.0 if self.received is None else 1.0], op="max")[0] > 0

    def stop(self, step: int) -> None:
        """Logs on every rank and raises Preempted (after close()); checkpoint-`step` is written."""
        self.close()
        why = signal.Signals(self.received).name if self.received else "another rank's signal"
        log.warning("rank %d: preempted (%s) after step %d, checkpoint-%d saved; exiting with status %d",
                    dist.rank(), why, step, step, PREEMPTED_EXIT)
        raise Preempted()

    def close(self) -> None:
        """Puts the previous handlers back (a signal after training ends the process as usual)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous = {}
