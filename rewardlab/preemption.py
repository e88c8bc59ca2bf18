"""Preemption and Ctrl-C: SLURM (and most schedulers) send SIGTERM shortly before killing a job; a user
stops a run with SIGINT.

During the training loop either signal asks the run to stop at the end of the iteration in progress: it
finishes that iteration, checkpoints it (whatever `run.checkpoint_every` says), and then raises
`Preempted`, so a preempted run loses nothing it computed. A second signal before then stops at once,
abandoning the iteration (the last checkpoint is intact; a checkpoint being written is finished first). Outside
the loop (loading models) a signal raises `Preempted` at once. The CLI then prints how to resume and exits
with `PREEMPTED_EXIT_CODE` after SIGTERM, distinct from success (0), a crash (1) and a user error (2), so a
job script can requeue on it, and with `INTERRUPTED_EXIT_CODE` after SIGINT (the shell's 128 + 2). Python's
`signal` module is all this needs.
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
    """While entered, SIGTERM and SIGINT raise `Preempted`; inside `finishing()` the first one is only
    recorded (`pending`), for the loop to act on at the end of its iteration, and a second raises; inside
    `deferred()` they wait until the block ends, and it raises after the block if one came."""

    def __init__(self) -> None:
        self._previous: dict[int, object] = {}
        self._deferring = self._finishing = False
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

    @property
    def pending(self) -> bool:
        """Whether a signal asked the run to stop (and has not raised yet)."""
        return self._pending is not None

    def _handle(self, signum: int, frame) -> None:
        if self._fired:  # already unwinding: let the cleanup (summary, W&B finish) complete
            return
        if self._deferring or (self._finishing and self._pending is None):
            self._pending = self._pending or signum
            return
        self._fired = True
        again = " again: stopped at once, the iteration in progress abandoned" if self._pending else ""
        raise Preempted(f"{signal.Signals(signum).name} received{again}", signum)

    @contextlib.contextmanager
    def finishing(self) -> Iterator[None]:
        """The training loop: a first signal lets the iteration in progress finish (see `pending`)."""
        self._finishing = True
        try:
            yield
        finally:
            self._finishing = False

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Run the block to the end even if a signal arrives; raise `Preempted` after it if one did (or
        had arrived before it, while `finishing`)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending is not None:
            self._fired = True
            name = signal.Signals(self._pending).name
            raise Preempted(f"{name} received; stopped after the checkpoint completed", self._pending)
