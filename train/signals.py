"""A graceful stop on SIGTERM or SIGUSR1 (what schedulers send before preemption or a time limit).

The handler only records the signal. After each step every rank learns whether any rank got one
(one all-reduce of a flag), so all ranks finish the same step, save one checkpoint together and
exit with PREEMPTED_EXIT_CODE, which launchers read as "requeue me". A second signal during the
save only sets the flag again: nothing is interrupted halfway.

A worker started by torchrun also dies with its agent (die_with_agent).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: a temporary failure, try again
# Left in the run dir by rank 0 after the stop checkpoint: torchrun reports a failed worker
# without its exit code, so launchers (launch/slurm.py) read this file as "requeue me".
PREEMPTED_MARKER = "PREEMPTED"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised once the stop checkpoint is written; exits the process with PREEMPTED_EXIT_CODE."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step, self.signal_name = step, signal_name


class StopSignals:
    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def install(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        self.received = self.received or signal.Signals(signum).name


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_agent() -> None:
    """Under torchrun, have the kernel SIGKILL this worker as soon as its agent dies.

    torchrun starts its workers in sessions of their own and stops them only when it is itself
    stopped gently, so a `kill -9` of the launcher and its agent (or an agent that crashes) left
    them training as orphans, still writing checkpoints. A plain `python -m train` is left alone:
    its parent may be a shell that exits under nohup.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    agent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # An agent that died before prctl sends nothing: this worker was then handed to init (pid 1)
    # or, between the two reads, to another parent. (A subreaper that adopted it before the first
    # read cannot be told from the agent.)
    if agent == 1 or os.getppid() != agent:
        raise SystemExit("train: the torchrun agent that started this worker is gone")
