"""Preemption and Ctrl-C: SLURM (and most schedulers) send SIGTERM shortly before killing a job; a user
stops a run with SIGINT.

Training turns either signal into a `Preempted` exception raised at once in the main thread, so the
iteration in progress is abandoned and the run directory is left as the last checkpoint wrote it. A
checkpoint being written when the signal arrives is finished first (it is seconds of work and saves an
iteration). The CLI then prints how to resume and exits with `PREEMPTED_EXIT_CODE` after SIGTERM, distinct
from success (0), a crash (1) and a user error (2), so a job script can requeue on it, and with
`INTERRUPTED_EXIT_CODE` after SIGINT (the shell's 128 + 2). Python's `signal` module is all this needs.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

#: EX_TEMPFAIL from sysexits.h: "temporary failure; the user is invited to retry"
PREEMPTED_EXIT_CODE = 75
#: 128 + SIGINT, what a shell reports for a program stopped by Ctrl-C
INTERRUPTED_EXIT_CODE = 130

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(BaseException):
    """SIGTERM or SIGINT arrived during training; the run directory holds a resumable checkpoint. A
    BaseException, like KeyboardInterrupt, so no `except Exception` on the way (instantiate, W&B
    fallback) swallows it."""

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return INTERRUPTED_EXIT_CODE if self.signum == signal.SIGINT else PREEMPTED_EXIT_CODE


class PreemptionGuard:
    """While entered, SIGTERM and SIGINT raise `Preempted`; inside `deferred()` they wait until the block ends."""

    def __init__(self) -> None:
        self._previous: dict[int, object] = {}
        self._deferring = False
        self._pending: int | None = None
        self._fired = False

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self._fired:  # already unwinding: let the cleanup (summary, W&B finish) complete
            return
        if self._deferring:
            self._pending = signum
            return
        self._fired = True
        raise Preempted(f"{signal.Signals(signum).name} received", signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Run the block to the end even if a signal arrives; raise `Preempted` after it if one did."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending is not None:
            self._fired = True
            name = signal.Signals(self._pending).name
            raise Preempted(f"{name} received while writing a checkpoint (the checkpoint completed)", self._pending)
