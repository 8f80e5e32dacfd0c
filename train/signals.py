"""A graceful stop on SIGTERM or SIGUSR1 (what schedulers send before preemption or a time limit).

The handler only records the signal. After each step every rank learns whether any rank got one
(one all-reduce of a flag), so all ranks finish the same step, save one checkpoint together and
exit with PREEMPTED_EXIT_CODE, which launchers read as "requeue me". A second signal during the
save only sets the flag again: nothing is interrupted halfway.
"""

from __future__ import annotations

import signal

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
