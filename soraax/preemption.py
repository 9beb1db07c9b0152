"""Preemption: on SIGTERM a run saves at the next step boundary and exits cleanly; the next start resumes.

Preemptible TPU VMs and SLURM jobs get SIGTERM (a TPU VM's maintenance notice is delivered the same way)
some seconds before they are killed. One process alone installs a SIGTERM handler that only raises a flag;
the loop checks it between steps, never inside one. A multi-process run must stop every host at the same
step, or the save's collectives would wait forever for the hosts that went on: there JAX's preemption
service (started by `jax.distributed.initialize`) catches the signal on whichever host got it, tells the
others, and `reached_preemption_sync_point` returns True on all of them at one agreed step. Installing a
Python handler there would replace the service's own, so it is not done.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
    """`should_stop(step)`, called once after every step on every process: True when the run must save and
    stop at this step. A context manager: the previous SIGTERM handler comes back on exit."""

    def __init__(self):
        self._requested = threading.Event()
        self._previous = None
        self.signal_name = ""

    def __enter__(self) -> "PreemptionWatch":
        # signal.signal works in the main thread only; a loop driven from another thread (a notebook's
        # worker) simply has no handler and runs to its end.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_signal(self, signum, frame):
        del frame
        self.signal_name = signal.Signals(signum).name
        self._requested.set()

    def request(self, reason: str = "requested") -> None:
        """Asks the loop to stop at the next step boundary, as SIGTERM does (tests, embedding code)."""
        self.signal_name = reason
        self._requested.set()

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = self.signal_name or "SIGTERM (preemption service)"
                return True
            return False
        return self._requested.is_set()
