"""The one thread of a process that runs torch.

torch's CPU kernels run on an OpenMP (libgomp) thread pool that belongs to the thread
that calls them and lives as long as that thread. Once two live threads have called
torch there are two pools, more OpenMP threads than cores, and libgomp then lets its
idle workers sleep instead of spin: each of the hundreds of parallel regions of a
forward pass pays a wake-up. On the 2-core CI machine the worker embedded 8-15% slower
when the model had been loaded or warmed on another thread than the one embedding
(`make bench`, pipeline scenario: 0.74-0.81x of the model's ceiling before, 0.86-0.88x
after). So loading, warm-up and every forward pass in embedworker go through `run`.

On CUDA the same thread also keeps host-to-device copies off the event loop.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_thread_ident: int | None = None


def _remember_thread() -> None:
    global _thread_ident
    _thread_ident = threading.get_ident()


def executor() -> ThreadPoolExecutor:
    """The process-wide single-thread executor for torch work (created on first use).

    It is never shut down: its thread is a daemon-like worker of the interpreter and
    ends with the process, so pipelines opened and closed in one process share it.
    """
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch", initializer=_remember_thread)
        return _executor


def on_torch_thread() -> bool:
    return _thread_ident is not None and threading.get_ident() == _thread_ident


def run(function: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Call `function` on the torch thread and wait for its result (direct when already there)."""
    if on_torch_thread():
        return function(*args, **kwargs)
    return executor().submit(function, *args, **kwargs).result()
