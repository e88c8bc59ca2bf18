"""Preemption: SLURM (and most schedulers) send SIGTERM shortly before killing a job.

Training turns SIGTERM into a `Preempted` exception raised at once in the main thread, so the iteration
in progress is abandoned and the run directory is left as the last checkpoint wrote it. A checkpoint
being written when the signal arrives is finished first (it is seconds of work and saves an iteration).
The CLI then exits with `PREEMPTED_EXIT_CODE`, distinct from success (0), a crash (1) and a user
error (2), so a job script can requeue on it. Python's `signal` module is all this needs.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

#: EX_TEMPFAIL from sysexits.h: "temporary failure; the user is invited to retry"
PREEMPTED_EXIT_CODE = 75


class Preempted(BaseException):
    """SIGTERM arrived during training; the run directory holds a resumable checkpoint. A BaseException,
    like KeyboardInterrupt, so no `except Exception` on the way (instantiate, W&B fallback) swallows it."""


class PreemptionGuard:
    """While entered, SIGTERM raises `Preempted`; inside `deferred()` it waits until the block ends."""

    def __init__(self) -> None:
        self._previous = None
        self._deferring = False
        self._pending = False
        self._fired = False

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame) -> None:
        if self._fired:  # already unwinding: let the cleanup (summary, W&B finish) complete
            return
        if self._deferring:
            self._pending = True
            return
        self._fired = True
        raise Preempted("SIGTERM received")

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Run the block to the end even if SIGTERM arrives; raise `Preempted` after it if one did."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending:
            self._fired = True
            raise Preempted("SIGTERM received while writing a checkpoint (the checkpoint completed)")
