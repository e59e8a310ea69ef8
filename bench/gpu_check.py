"""The GPU check: the model's own fp16 ceiling against embedworker's embedder, on one CUDA machine.

    make bench-gpu                       # on a CUDA machine; writes bench/results/gpu/gpu_check.json
    python3 -m bench.gpu_check --device cpu --quick   # the same code path here, for a smoke run

Self-contained on purpose: the GPU machine the figures come from has torch, transformers,
sentence-transformers and numpy, and no network, broker or Redis. So this measures what the
GPU decides (the model side of the pipeline: one tokenization per text, length-aware
forward passes in fp16, device transfers on the torch thread) against `model.encode` at
its best batch size, on short and mixed texts; the Kafka/Redis/store side is measured by
`make bench` scenario `overhead` (a near-free model standing in for the GPU). The model
directory is `--model` (default: the bundled model; `make gpu-model` saves it in fp16 to
`bench/gpu_model/`, 45 MB, small enough to carry to the GPU machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

WORDS = ("the nightly export report search index cluster region customer invoice backup release latency "
         "queue partition broker consumer vector model embedding document storage node upgrade rollback "
         "token batch memory cache request response timeout retry error metric alert dashboard").split()


def texts(n: int, *, sentences: tuple[int, int], seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        parts = []
        for _ in range(rng.randint(*sentences)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
            parts.append(" ".join(words).capitalize() + ".")
        out.append(" ".join(parts) + f" #{i}")
    return out


def timed(function, repeat: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu")
    args = parser.parse_args(argv)

    import torch

    from processors import torch_thread
    from processors.embedder import SentenceTransformerEmbedder

    embedder = SentenceTransformerEmbedder(model=args.model, device=args.device)
    n = 2_000 if args.quick else 50_000
    sets = {"short": texts(n, sentences=(1, 1), seed=1), "mixed": texts(n // 5, sentences=(1, 12), seed=2)}
    repeat = 1 if args.quick else 3
    result = {"machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                          "device": embedder.device,
                          "gpu": torch.cuda.get_device_name(0) if embedder.device.startswith("cuda") else None,
                          "dtype": str(next(embedder._model.parameters()).dtype)},
              "model": args.model, "quick": args.quick, "sets": {}, "targets": []}
    for kind, batch in sets.items():
        warm = batch[:512]
        torch_thread.run(lambda: embedder._model.encode(warm, batch_size=256, show_progress_bar=False))
        embedder.embed(warm)
        ceilings = {}
        for bs in (64, 256, 1024):
            seconds = timed(lambda bs=bs: torch_thread.run(lambda: embedder._model.encode(
                batch, batch_size=bs, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)), repeat)
            ceilings[bs] = len(batch) / seconds
        chunk = 4096  # the worker's batches are smaller than a whole set: embed in worker-sized calls
        ours = len(batch) / timed(lambda: [embedder.embed(batch[i : i + chunk]) for i in range(0, len(batch), chunk)], repeat)
        best = max(ceilings.values())
        result["sets"][kind] = {"texts": len(batch), "encode_rate_by_batch_size": ceilings, "ceiling_rate": best,
                                "embedder_rate": ours, "embedder_over_ceiling": ours / best}
        result["targets"].append({"name": f"embedder_over_fp16_ceiling_{kind}", "value": ours / best, "op": ">=",
                                  "threshold": 0.9, "passed": ours / best >= 0.9})
        print(f"{kind}: model.encode best {best:,.0f} texts/s, embedworker's embedder {ours:,.0f} texts/s "
              f"({ours / best:.2f}x)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
