"""How the `rewardlab` process ends: at once, without tearing down the interpreter.

Once a command has finished, Python's finalization still frees every module and object one by one; with
torch and transformers loaded that took ~1 s on 2 CPU cores (measured from the `run dir:` line to the
process's end), a tenth of a short run and of each of the test suite's ~100 CLI processes. Nothing a
command leaves depends on it: rewardlab closes its own files, and before `os._exit` the exit handlers run
as at any exit (`atexit`: W&B, logging, multiprocessing's children, temporary directories) and Python's
and C's output buffers are flushed. While another non-daemon thread still runs, the ordinary exit is used,
which waits for it. `os._exit` is the only way to skip finalization; no library wraps it.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import sys
import threading
from typing import NoReturn


def exit_now(code: object) -> NoReturn:
    """End the process with SystemExit's meaning of `code` (None: 0, an int: itself, else printed and 1)."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if others:
        raise SystemExit(code)
    if code is None or isinstance(code, int):
        status = code or 0
    else:
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be written to it
            pass
    try:
        ctypes.CDLL(None).fflush(None)  # what C libraries printed (a pipe's stdout is block-buffered)
    except (OSError, AttributeError):
        pass
    os._exit(status)
