"""Python's cyclic garbage collector while a worker runs.

A worker's heap is mostly what exists before its first message: torch, transformers and the
model's modules, the clients, the imported libraries (about 460,000 tracked objects with the
bundled model; a full collection of them takes ~0.2 s here). CPython's oldest-generation
collection walks all of it, holding the GIL: in the `overhead` bench (a tiny model standing in
for a GPU) two or three of them took 0.4-0.6 s of a 7 s run, every thread stopped meanwhile,
and young collections ran every 700 allocations, about 550 of them.

`steady_collector` moves what exists when the worker starts out of the collector's view
(`gc.freeze`: those objects are not scanned, nor freed if they become cyclic garbage, until
the worker stops) and lets young collections run every `young_threshold` container
allocations. Reference counting still frees almost everything at once; only garbage
in reference cycles waits for a young collection a little longer. Workers sharing a process
(tests, `bench`) share it: the last one to leave restores the collector as it found it.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator

YOUNG_THRESHOLD = 10_000
"""Container allocations between young collections (CPython's default: 700)."""

_users = 0
_saved_thresholds: tuple[int, int, int] = (700, 10, 10)


@contextlib.contextmanager
def steady_collector(young_threshold: int = YOUNG_THRESHOLD) -> Iterator[None]:
    """0: the collector is left as it is."""
    global _users, _saved_thresholds
    if not young_threshold:
        yield
        return
    if _users == 0:
        _saved_thresholds = gc.get_threshold()
        gc.freeze()  # garbage frozen with the rest is collected after `unfreeze`, at the end
        gc.set_threshold(max(young_threshold, _saved_thresholds[0]), *_saved_thresholds[1:])
    _users += 1
    try:
        yield
    finally:
        _users -= 1
        if _users == 0:
            gc.unfreeze()
            gc.set_threshold(*_saved_thresholds)
