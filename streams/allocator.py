"""The C allocator, so that RSS tracks what the worker holds.

torch frees a forward pass's activations (tens of MiB on a 128-text batch) right after
it, but glibc raises its mmap threshold on the first such free (up to 32 MiB), so later
activations come from the embed thread's malloc arena, whose freed pages glibc keeps:
RSS then sits 100-200 MiB above what is in use, and a memory budget measures the
allocator rather than the buffered work. Fixing the threshold sends large blocks back to
the OS on free; `release_free_memory` returns what the arenas still keep. Both are
no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import sys

_M_MMAP_THRESHOLD = -3
DEFAULT_MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


def tune_allocator(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (setting it turns its dynamic raising off)."""
    return _LIBC is not None and bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, mmap_threshold))


def release_free_memory() -> bool:
    """Give the free pages of every malloc arena back to the OS (`malloc_trim(0)`)."""
    return _LIBC is not None and bool(_LIBC.malloc_trim(0))
