"""What every scenario shares: local services, the model, text sets, timed worker runs.

One broker (Tansu, `LocalBroker`), one `redis-server` (`LocalRedis`) and one loaded
model serve the whole run; every measured worker run gets topics, a consumer group, a
Qdrant store (qdrant-edge, fresh directory) and a Redis key prefix of its own, so no
run sees another run's cache entries or offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import re
import platform
import random
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import numpy as np
import orjson
import psutil

from processors.torch_thread import run as on_torch_thread  # every direct model call: one OpenMP pool

log = logging.getLogger("bench")


# ---- small statistics ------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile (share in 0..1)."""
    if not len(values):
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=float), share * 100, method="inverted_cdf"))


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": median(values), "min": float(min(values)), "max": float(max(values))} if values else {}


# ---- machine -----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str) -> dict[str, Any]:
    import sentence_transformers
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "sentence_transformers": sentence_transformers.__version__,
        "device": device,
        "cuda_device": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
    }


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


class CpuMeter:
    """How busy the machine was with other people's work while we measured.

    `foreign_cores`: average number of cores used by processes outside this one and its
    children (the broker, redis-server) over the measured interval. On this shared
    machine it is the noise figure to read next to every rate.
    """

    def __init__(self) -> None:
        self._process = psutil.Process()

    def _own(self) -> float:
        total = 0.0
        for proc in [self._process, *self._process.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)

    def __enter__(self) -> "CpuMeter":
        self._wall0, self._busy0, self._own0 = time.perf_counter(), self._busy(), self._own()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = max(1e-9, time.perf_counter() - self._wall0)
        busy, own = self._busy() - self._busy0, self._own() - self._own0
        self.own_cores = own / wall
        self.foreign_cores = max(0.0, (busy - own) / wall)

    def as_dict(self) -> dict[str, float]:
        return {"own_cores": round(self.own_cores, 2), "foreign_cores": round(self.foreign_cores, 2)}


def max_foreign(value: Any) -> float:
    """Largest `foreign_cores` anywhere inside a result."""
    if isinstance(value, dict):
        own = [float(value["foreign_cores"])] if isinstance(value.get("foreign_cores"), (int, float)) else []
        return max(own + [max_foreign(v) for k, v in value.items() if k != "noise"], default=0.0)
    if isinstance(value, list):
        return max((max_foreign(v) for v in value), default=0.0)
    return 0.0


# ---- memory --------------------------------------------------------------------------------


def trim_memory() -> None:
    """Give freed heap back to the OS so RSS deltas of the next measurement mean something."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class GcTime:
    """Python's garbage collections over an interval: how many, and the seconds they took, by generation."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]

    def __enter__(self) -> "GcTime":
        self._started: dict[int, float] = {}
        gc.callbacks.append(self._callback)
        return self

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started[threading.get_ident()] = time.perf_counter()
            return
        started = self._started.pop(threading.get_ident(), None)
        if started is not None:
            generation = info["generation"]
            self.collections[generation] += 1
            self.seconds[generation] += time.perf_counter() - started

    def __exit__(self, *exc: object) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def as_dict(self) -> dict[str, Any]:
        return {"collections_by_generation": self.collections, "seconds_by_generation": [round(s, 4) for s in self.seconds]}


class ThreadCpu:
    """Cores each of this process's threads used over an interval (`/proc/self/task`), by thread name.

    Python threads by their names (pool members together: `qdrant-edge_0` and `_1` are
    `qdrant-edge`), the event loop as `MainThread`, threads Python did not start (torch's
    OpenMP pool, Rust's) as `native`.
    """

    def __enter__(self) -> "ThreadCpu":
        self._start, self._wall0 = self._sample(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        end, wall = self._sample(), max(1e-9, time.perf_counter() - self._wall0)
        names = {t.native_id: re.sub(r"_\d+$", "", t.name) for t in threading.enumerate()}
        cores: dict[str, float] = {}
        for tid, seconds in end.items():
            name = names.get(tid, "native")
            cores[name] = cores.get(name, 0.0) + (seconds - self._start.get(tid, 0.0)) / wall
        self.cores = {name: round(value, 3) for name, value in sorted(cores.items(), key=lambda kv: -kv[1])}

    @staticmethod
    def _sample() -> dict[int, float]:
        ticks, found = os.sysconf("SC_CLK_TCK"), {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat", encoding="ascii") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # the thread ended meanwhile
            found[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        return found


class RssSampler:
    """Peak resident set size of this process, sampled every `interval` seconds in a thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start_rss = 0
        self.peak_rss = 0

    def __enter__(self) -> "RssSampler":
        self.start_rss = self.peak_rss = self._process.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)

    @property
    def delta_rss(self) -> int:
        return self.peak_rss - self.start_rss


# ---- threads ------------------------------------------------------------------------------------


def native_threads() -> int:
    """Threads of this process not started by Python (torch/OpenMP pool workers and the like)."""
    python = {t.native_id for t in threading.enumerate()}
    try:
        return sum(1 for tid in os.listdir("/proc/self/task") if int(tid) not in python)
    except OSError:
        return -1


# ---- texts -----------------------------------------------------------------------------------


def make_unique(texts: Sequence[str]) -> list[str]:
    """Texts with every repeat made distinct (a short reference appended), order kept."""
    seen: dict[str, int] = {}
    out = []
    for text in texts:
        count = seen.get(text, 0)
        seen[text] = count + 1
        out.append(text if count == 0 else f"{text} (ref {count})")
    assert len(set(out)) == len(out)
    return out


def short_texts(n: int, seed: int = 101) -> list[str]:
    """~1 sentence each (about 15 tokens), all distinct."""
    from streams import corpus

    rng = random.Random(seed)
    return make_unique([corpus.text(rng, 1) for _ in range(n)])


def mixed_texts(n: int, seed: int = 202) -> list[str]:
    """`streams.corpus.texts` (1 to 12 sentences, short ones more common), all distinct."""
    from streams import corpus

    return make_unique(corpus.texts(n, seed=seed))


def with_duplicates(texts: Sequence[str], share: float, seed: int = 303) -> list[str]:
    """len(texts) messages of which `share` repeat content: a pool of the first
    (1 - share) * n texts, each used at least once, the rest drawn from it, shuffled."""
    n = len(texts)
    pool = list(texts[: max(1, round(n * (1 - share)))])
    rng = random.Random(seed)
    out = pool + [rng.choice(pool) for _ in range(n - len(pool))]
    rng.shuffle(out)
    return out


# ---- the run's context ----------------------------------------------------------------------


@dataclass
class Context:
    device: str
    quick: bool
    repeat: int
    out: Any
    torch_threads: int = 0
    embedder: Any = None
    broker: Any = None
    redis: Any = None
    machine: dict[str, Any] = field(default_factory=dict)
    # Measurements later scenarios may reuse (e.g. capacity for the latency scenario).
    shared: dict[str, Any] = field(default_factory=dict)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _pipeline_warm: bool = False
    # Noise handling on a shared machine: before each measured unit wait (up to the
    # budget) for a quiet second; redo a unit measured while others used the CPU.
    quiet_threshold: float = 0.25
    noise_limit: float = 0.35
    max_attempts: int = 3
    noise_budget_seconds: float = 420.0
    noise_spent_seconds: float = 0.0

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    @property
    def noise_budget_left(self) -> float:
        return self.noise_budget_seconds - self.noise_spent_seconds

    async def wait_quiet(self, max_seconds: float = 60.0) -> float:
        """Wait until other processes use less than `quiet_threshold` cores for 1 s."""
        waited = 0.0
        while self.noise_budget_left > 0 and waited < max_seconds:
            with CpuMeter() as cpu:
                await asyncio.sleep(1.0)  # a measurement window, not synchronization
            if cpu.foreign_cores < self.quiet_threshold:
                return waited
            waited += 1.0
            self.noise_spent_seconds += 1.0
        return waited

    async def measured(self, label: str, unit: Callable[[], Any]) -> dict[str, Any]:
        """Run one measured unit (a coroutine function returning a dict with
        `foreign_cores` somewhere inside) in a quiet moment; redo it if it was noisy."""
        attempts: list[dict[str, Any]] = []
        best: dict[str, Any] | None = None
        for attempt in range(self.max_attempts):
            waited = await self.wait_quiet()
            began = time.monotonic()
            result = await unit()
            noise = max_foreign(result)
            attempts.append({"foreign_cores_max": noise, "waited_for_quiet_s": waited})
            if best is None or noise < best[1]:
                best = (result, noise)
            if noise <= self.noise_limit:
                break
            if attempt + 1 < self.max_attempts and self.noise_budget_left > 0:
                self.noise_spent_seconds += time.monotonic() - began
                log.info("%s: other processes used %.2f cores meanwhile; measuring again", label, noise)
            else:
                break
        result, noise = best  # type: ignore[misc]
        result = dict(result)
        result["noise"] = {"foreign_cores_max": noise, "clean": noise <= self.noise_limit, "attempts": attempts}
        return result

    def start(self) -> None:
        from processors.embedder import SentenceTransformerEmbedder
        from streams.devstack import LocalBroker, LocalRedis

        self.broker = self._stack.enter_context(LocalBroker())
        self.redis = self._stack.enter_context(LocalRedis())
        self.embedder = SentenceTransformerEmbedder(device=self.device, threads=self.torch_threads or None)  # on the torch thread
        self.machine = machine_info(self.embedder.device)
        on_torch_thread(warm_model, self.embedder)
        self.machine["native_threads_idle"] = native_threads()

    def close(self) -> None:
        self._stack.close()


def warm_model(embedder: Any) -> None:
    """First calls allocate and pick kernels; keep that out of every measurement."""
    texts = mixed_texts(96, seed=9) + short_texts(64, seed=9)
    embedder._model.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)
    embedder.embed(texts)


def encode_ceiling(embedder: Any, texts: Sequence[str], batch_size: int = 32) -> dict[str, float]:
    """Plain sentence-transformers on `texts` (the model's limit here): seconds, rate, noise."""
    return on_torch_thread(_encode_ceiling, embedder, texts, batch_size)


def _encode_ceiling(embedder: Any, texts: Sequence[str], batch_size: int) -> dict[str, float]:
    with CpuMeter() as cpu:
        started = time.perf_counter()
        embedder._model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "rate": len(texts) / seconds, **cpu.as_dict()}


def embed_ours(embedder: Any, texts: Sequence[str]) -> dict[str, float]:
    with CpuMeter() as cpu:
        started = time.perf_counter()
        embedder.embed(list(texts))
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "rate": len(texts) / seconds, **cpu.as_dict()}


# ---- embedders for comparisons ---------------------------------------------------------------


def fixed_count_embedder(base: Any, batch_size: int = 256) -> Any:
    """The same loaded model, but each call is one `encode(batch_size=256)`: a fixed count
    per forward pass, padded to the longest text in it (no length-aware planning).

    `SentenceTransformerEmbedder(max_sub_batch=256, sub_batch_tokens=10**9)` would not do:
    `plan_sub_batches` still sorts by length and cuts wherever padding costs more than
    the per-call overhead, so it stays length-aware.
    """
    from processors.embedder import Embeddings, SentenceTransformerEmbedder

    class FixedCountEmbedder(SentenceTransformerEmbedder):
        def __init__(self) -> None:  # share the loaded model, do not load another
            self.__dict__.update(base.__dict__)
            self.fixed_batch = batch_size

        def embed(self, texts: Sequence[str], token_counts: Sequence[int] | None = None) -> Embeddings:
            if not texts:
                return Embeddings(np.zeros((0, self.dim), dtype=np.float32), [])
            counts = self.count_tokens(texts)  # same truncation flags as the real embedder
            vectors = self._model.encode(
                list(texts), batch_size=self.fixed_batch, normalize_embeddings=True,
                convert_to_numpy=True, show_progress_bar=False,
            )
            return Embeddings(np.asarray(vectors, dtype=np.float32), [c > self.max_tokens for c in counts])

    return FixedCountEmbedder()


class TimedEmbedder:
    """Forwards to an embedder and records each `embed` call: (start, end, texts).

    The Worker runs `embed` on its single embedding thread, so the recorded calls are
    that thread's busy periods: busy share ~1 means the run was bound by the model.
    """

    def __init__(self, base: Any) -> None:
        self.base = base
        self.calls: list[tuple[float, float, list[str]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def embed(self, texts: Sequence[str], token_counts: Sequence[int] | None = None) -> Any:
        started = time.perf_counter()
        result = self.base.embed(texts, token_counts)
        self.calls.append((started, time.perf_counter(), list(texts)))
        return result


def replay_embed_calls(embedder: Any, calls: Sequence[tuple[float, float, list[str]]]) -> dict[str, float]:
    """The worker's embed calls again, alone: what the model does with the worker's batches."""
    texts = sum(len(c[2]) for c in calls)
    with CpuMeter() as cpu:
        started = time.perf_counter()
        for _, _, batch in calls:
            embedder.embed(batch)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "rate": texts / seconds, "calls": len(calls), **cpu.as_dict()}


# ---- worker runs -------------------------------------------------------------------------------


BACKEND: Any = None
"""The Kafka backend of workers the bench starts (None: the default); `client_overrides` swaps it."""


class BenchProbe:
    """The instants a throughput measurement needs, read through the Worker's public observer hooks."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.first_consumed_at: float | None = None
        self.done_at: float | None = None
        self.done = asyncio.Event()
        self.fetch_rounds = 0
        self.worker: Any = None

    def _round(self) -> None:
        self.fetch_rounds += 1

    def _consumed(self) -> None:
        if self.first_consumed_at is None:
            self.first_consumed_at = time.perf_counter()

    def _batch_done(self, messages: int) -> None:
        stats = self.worker.stats
        if self.done_at is None and stats.processed + stats.dead_letters >= self.target:
            self.done_at = time.perf_counter()
            self.done.set()


def bench_worker(settings: Any, *, target: int, backend: Any = None, **parts: Any) -> tuple[Any, BenchProbe]:
    """The Worker users run (built by `streams.assembly.build_worker`), with a probe on its observer hooks."""
    from streams.assembly import build_worker
    from streams.runtime import WorkerObserver

    probe = BenchProbe(target)
    observer = WorkerObserver(on_fetch_round=probe._round, on_consumed=probe._consumed, on_batch_done=probe._batch_done)
    probe.worker = build_worker(settings, backend=backend, observer=observer, **parts)
    return probe.worker, probe


async def new_settings(ctx: Context, *, partitions: int = 2, **overrides: Any) -> Any:
    from streams.config import load_settings
    from streams.backends.kafka import ensure_topics

    name = f"b{uuid.uuid4().hex[:10]}"
    values: dict[str, Any] = {
        "bootstrap_servers": ctx.broker.bootstrap_servers,
        "input_topic": f"{name}.in",
        "output_topic": f"{name}.out",
        "dlq_topic": f"{name}.dlq",
        "group_id": f"{name}.group",
        "collection": name,
        "redis_url": ctx.redis.url,
        "metrics_port": 0,
        "device": ctx.device,
    }
    values.update(overrides)
    settings = load_settings(values, environ={})
    await ensure_topics(settings, {settings.input_topic: partitions, settings.output_topic: partitions, settings.dlq_topic: 1})
    return settings


def encode_events(texts: Sequence[str], prefix: str, ids: Sequence[str] | None = None) -> list[bytes]:
    """Upsert events of `texts`, ids `ids` (default `prefix-i`)."""
    ids = ids if ids is not None else [f"{prefix}-{i}" for i in range(len(texts))]
    return [orjson.dumps({"id": ids[i], "text": t, "metadata": {"n": i}}) for i, t in enumerate(texts)]


async def produce_backlog(settings: Any, values: Sequence[bytes], keys: Sequence[bytes] | None = None) -> None:
    """`values` to the input topic, keyed `keys` (default: each one's index)."""
    from streams.backends.kafka import make_producer

    producer = make_producer(settings, linger_ms=20)
    await producer.start()
    try:
        for i, value in enumerate(values):
            await producer.send(settings.input_topic, value=value, key=keys[i] if keys is not None else str(i).encode())
        await producer.flush()
    finally:
        await producer.stop()


class WorkerParts:
    """Sink and cache (Redis, own prefix) for one worker run.

    The sink is the worker's default embedded store, qdrant-edge with its write-ahead log,
    in a fresh directory; `EMBEDWORKER_BENCH_SINK=memory` (or `sink_kind="memory"`) uses
    qdrant-client's in-memory engine instead (the store of runs before 2026-11-22 09:40 UTC).
    Sparse vectors as `settings.sparse` says.
    """

    def __init__(self, ctx: Context, settings: Any, sink_kind: str | None = None) -> None:
        import tempfile

        from processors.cache import RedisCache
        from processors.edge_sink import EdgeSink
        from processors.sink import QdrantSink

        self._directory: str | None = None
        if (sink_kind or os.environ.get("EMBEDWORKER_BENCH_SINK", "edge")) == "memory":
            self.sink: Any = QdrantSink(collection=settings.collection, sparse=settings.sparse)
        else:
            self._directory = tempfile.mkdtemp(prefix="embedworker-bench-")
            self.sink = EdgeSink(collection=settings.collection, path=self._directory, sparse=settings.sparse)
        self.cache = RedisCache(url=ctx.redis.url, prefix=f"bench:{settings.collection}:")

    async def close(self) -> None:
        import shutil

        await self.cache.close()
        await self.sink.close()
        if self._directory:
            shutil.rmtree(self._directory, ignore_errors=True)


class PySpy:
    """py-spy sampling this very process for a while (every thread, native frames off): a summary
    of where the busy worker's time goes, by function, own time and total time."""

    def __init__(self, process: Any, path: str) -> None:
        self.process, self.path = process, path

    @classmethod
    def start(cls, seconds: float) -> "PySpy | None":
        import shutil
        import subprocess
        import tempfile

        binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not os.path.exists(binary):
            return None
        path = tempfile.mktemp(suffix=".txt", prefix="embedworker-pyspy-")
        process = subprocess.Popen(
            [binary, "record", "--pid", str(os.getpid()), "--duration", str(max(1, int(seconds))), "--rate", "200",
             "--format", "raw", "--output", path, "--nonblocking", "--threads"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        return cls(process, path)

    def summary(self, top: int = 12) -> dict[str, Any] | None:
        try:
            self.process.wait(timeout=60)
            lines = Path(self.path).read_text().splitlines()
        except Exception:
            return None
        own: dict[str, int] = {}
        total: dict[str, int] = {}
        threads: dict[str, int] = {}
        samples = 0
        for line in lines:
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            samples += n
            frames = stack.split(";")
            thread = frames[0].split(" (")[0] if frames else "?"
            threads[thread] = threads.get(thread, 0) + n
            names = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] for f in frames[1:]] or [thread]
            own[names[-1]] = own.get(names[-1], 0) + n
            for name in set(names):
                total[name] = total.get(name, 0) + n
        if not samples:
            return None
        share = lambda d: [{"function": k, "share": round(v / samples, 3)} for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]  # noqa: E731
        return {"samples": samples, "threads": share(threads), "own": share(own), "total": share(total)}


def _metric(metrics: Any, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    return float(value) if value is not None else 0.0


async def run_worker_backlog(
    ctx: Context,
    texts: Sequence[str],
    *,
    embedder: Any = None,
    settings_overrides: dict[str, Any] | None = None,
    timeout: float = 900.0,
    profile_seconds: float = 0.0,
    ids: Sequence[str] | None = None,
    sink_kind: str | None = None,
    after: Callable[[Any], Awaitable[Any]] | None = None,
    encode: Callable[[Sequence[str], str, Sequence[str] | None], list[bytes]] | None = None,
) -> dict[str, Any]:
    """Produce `texts` as a backlog, start the Worker, time first consumed -> last acked.

    `ids`: the events' ids (default `collection-i`); `encode(texts, prefix, ids)`: the records
    (default `encode_events`, the native contract); `sink_kind`: see `WorkerParts`;
    `after(sink)`: awaited once the backlog is stored, before the sink closes (its result: "after").
    """
    from streams.metrics import Metrics

    settings = await new_settings(ctx, **(settings_overrides or {}))
    await produce_backlog(settings, (encode or encode_events)(texts, settings.collection, ids))
    parts = WorkerParts(ctx, settings, sink_kind)
    metrics = Metrics()
    timed = TimedEmbedder(embedder or ctx.embedder)
    worker, probe = bench_worker(
        settings, embedder=timed, sink=parts.sink, cache=parts.cache, metrics=metrics, target=len(texts), backend=BACKEND,
    )
    load_before = load_average()
    native_before = native_threads()
    task = asyncio.create_task(worker.run(), name="bench-worker")
    cpu, collections = CpuMeter(), GcTime()
    try:
        done_wait = asyncio.create_task(probe.done.wait())
        while probe.first_consumed_at is None and not task.done():
            await asyncio.sleep(0.002)  # only to start the CPU meter near the first fetch
        cpu.__enter__()
        threads = ThreadCpu().__enter__()
        collections.__enter__()
        profiler = PySpy.start(profile_seconds) if profile_seconds else None
        finished, _ = await asyncio.wait({task, done_wait}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        cpu.__exit__()
        threads.__exit__()
        collections.__exit__()
        if task in finished:
            task.result()
            raise RuntimeError("worker stopped before processing the backlog")
        if done_wait not in finished:
            raise TimeoutError(f"worker processed {worker.stats.processed}/{len(texts)} in {timeout}s")
        worker.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, timeout=60)
        after_result = await after(parts.sink) if after is not None else None
    finally:
        collections.__exit__()
        worker.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, timeout=60)
        await parts.close()
    seconds = probe.done_at - probe.first_consumed_at  # type: ignore[operator]
    sizes = list(worker.stats.batch_sizes)
    embed_sum = _metric(metrics, "embedworker_embed_duration_seconds_sum")
    busy = sum(end - start for start, end, _ in timed.calls)
    return {
        "messages": len(texts),
        "seconds": seconds,
        "rate": len(texts) / seconds,
        "processed": worker.stats.processed,
        "dead_letters": worker.stats.dead_letters,
        "cached": worker.stats.cached,
        "texts_embedded": _metric(metrics, "embedworker_texts_embedded_total"),
        "batches": worker.stats.batches,
        "batch_size_median": median(sizes),
        "batch_size_max": max(sizes) if sizes else 0,
        "batch_sizes": sizes,
        "fetch_loop_rounds_per_s": probe.fetch_rounds / seconds if seconds else None,
        "embed_calls": len(timed.calls),
        "embed_thread_busy_seconds": busy,
        "embed_thread_busy_share": busy / seconds if seconds else None,
        "embed_metric_seconds_sum": embed_sum,  # includes waiting for the embed thread
        "_embed_calls": timed.calls,  # for replay_embed_calls; dropped before JSON
        "upsert_seconds_sum": _metric(metrics, "embedworker_upsert_duration_seconds_sum"),
        "max_rss_mib": worker.stats.max_rss_bytes / 2**20,
        "pauses": worker.stats.pauses,
        "profile": profiler.summary() if profiler is not None else None,
        "pause_reasons": dict(worker.stats.pause_reasons),
        "after": after_result,
        "load_average_before": load_before,
        "native_threads_before": native_before,
        "thread_cores": threads.cores,
        "gc": collections.as_dict(),
        **cpu.as_dict(),
    }


async def warm_pipeline(ctx: Context) -> None:
    """One small untimed worker run per process (imports, connections, first upserts)."""
    if ctx._pipeline_warm:
        return
    await run_worker_backlog(ctx, mixed_texts(ctx.size(160, 32), seed=5))
    ctx._pipeline_warm = True


# ---- the naive consumer --------------------------------------------------------------------


async def run_naive(ctx: Context, texts: Sequence[str]) -> dict[str, Any]:
    """What the consumer tutorials write: one message at a time, everything awaited.

    getone() -> model.encode([text]) -> upsert one point -> send_and_wait the result ->
    commit. Timed like the worker: first message consumed -> last commit done.
    """
    settings = await new_settings(ctx)
    await produce_backlog(settings, encode_events(texts, settings.collection))
    # The tutorial consumer does everything on one thread, so its event loop runs on the
    # torch thread: the model call stays a blocking call inside the loop, as written.
    return on_torch_thread(lambda: asyncio.run(_naive_consumer(ctx, settings, texts)))


async def _naive_consumer(ctx: Context, settings: Any, texts: Sequence[str]) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from qdrant_client import QdrantClient, models

    from schemas import point_id

    model = ctx.embedder._model
    client = QdrantClient(location=":memory:")
    client.create_collection(settings.collection, vectors_config=models.VectorParams(size=ctx.embedder.dim, distance=models.Distance.COSINE))
    consumer = AIOKafkaConsumer(
        settings.input_topic, bootstrap_servers=settings.bootstrap_servers, group_id=settings.group_id,
        enable_auto_commit=False, auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await consumer.start()
    await producer.start()
    started = None
    cpu = CpuMeter()
    spent = {"getone": 0.0, "encode": 0.0, "upsert": 0.0, "send_and_wait": 0.0, "commit": 0.0}
    clock = time.perf_counter
    try:
        for _ in range(len(texts)):
            t0 = clock()
            message = await consumer.getone()
            t1 = clock()
            if started is None:
                started = t1
                cpu.__enter__()
            else:
                spent["getone"] += t1 - t0
            event = orjson.loads(message.value)
            vector = model.encode([event["text"]], normalize_embeddings=True, show_progress_bar=False)[0]
            t2 = clock()
            client.upsert(
                settings.collection,
                points=[models.PointStruct(id=point_id(event["id"]), vector=vector.tolist(), payload={"id": event["id"], "text": event["text"]})],
            )
            t3 = clock()
            result = {"id": event["id"], "status": "ok", "point_id": point_id(event["id"]), "dim": int(vector.shape[0])}
            await producer.send_and_wait(settings.output_topic, orjson.dumps(result), key=event["id"].encode())
            t4 = clock()
            await consumer.commit()
            t5 = clock()
            spent["encode"] += t2 - t1
            spent["upsert"] += t3 - t2
            spent["send_and_wait"] += t4 - t3
            spent["commit"] += t5 - t4
        seconds = time.perf_counter() - started  # type: ignore[operator]
        cpu.__exit__()
    finally:
        await consumer.stop()
        await producer.stop()
        client.close()
    per_message_ms = {k: round(1000 * v / len(texts), 3) for k, v in spent.items()}
    return {"messages": len(texts), "seconds": seconds, "rate": len(texts) / seconds, **cpu.as_dict(),
            "per_message_ms": per_message_ms,
            "encode_only_rate": len(texts) / spent["encode"] if spent["encode"] else None}


# ---- repetition helper --------------------------------------------------------------------------


async def repeat_async(ctx: Context, body: Callable[[int], Any]) -> list[Any]:
    out = []
    for rep in range(ctx.repeat):
        out.append(await body(rep))
    return out
