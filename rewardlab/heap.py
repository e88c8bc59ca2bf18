"""Hand the C heap's free memory back to the operating system before an optimizer step.

On CPU, tensors live in glibc's malloc. Memory that the forward and backward passes free (activations,
log-prob blocks, anything under malloc's mmap threshold, which glibc raises up to 32 MB as large blocks are
freed) stays in malloc's heaps, resident, rather than going back to the system. The first optimizer step
then allocates AdamW's state (8 bytes per parameter) beside it, and the process peaks at parameters +
gradients + optimizer state + that free-but-resident heap. Measured at Qwen2.5-0.5B's shape on CPU (one GRPO
iteration, 32 completions, micro-batches of 8, BENCHMARKS.md §7): 1.0 GB of the heap was free and resident just
before the first step (resident 5,259 MB, 4,287 MB after a trim), and the peak fell from 8,423 MB to 8,055 MB.

PyTorch has no host-memory caching allocator on CPU to release, and neither it nor HF's Trainer trims, so
this module calls glibc's `malloc_trim(0)` through ctypes: it returns every free page of every heap that
the system can take back. Without glibc (macOS, musl) it does nothing. It costs a walk of the heaps
(microseconds at the tiny model's size, measured in BENCHMARKS.md) and the page faults of memory that is
used again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return malloc's free memory to the system where glibc allows it; True when some was released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
