"""`python -m bench`: the benchmark suite against a real local broker, Redis and Qdrant engine.

    python -m bench                               # everything, 3 repetitions (~20 min on 2 cores)
    python -m bench --quick --scenarios ceiling,pipeline --out /tmp/b
    make bench BENCH_ARGS="--scenarios latency --repeat 1"

Writes <out>/<scenario>.json and .png, <out>/summary.json and <out>/README-table.md
(built from every scenario JSON in <out>, so a partial run updates its rows only), and
prints the table. Exit status 1 if a scenario crashed, or with --fail-on-miss if a
target was missed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bench.report import ORDER

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (passed to SentenceTransformerEmbedder)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch CPU threads for every scenario (default 0: one per core; 1 leaves a core to the rest)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repetition (smoke test; numbers not representative)")
    parser.add_argument("--scenarios", default=",".join(ORDER), help=f"comma-separated subset of: {', '.join(ORDER)}")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions per scenario, medians reported (default 3; 1 with --quick)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT})")
    parser.add_argument("--fail-on-miss", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--noise-budget", type=float, default=None,
                        help="seconds the run may spend waiting for a quiet machine and redoing units measured while other "
                             "processes used the CPU (default 420; 0 with --quick)")
    args = parser.parse_args(argv)
    names = [s.strip().replace("-", "_") for s in args.scenarios.split(",") if s.strip()]
    unknown = [n for n in names if n not in ORDER]
    if unknown or not names:
        parser.error(f"unknown scenario(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ORDER)}")
    args.names = [n for n in ORDER if n in names]  # dependency order: pipeline feeds naive and latency
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


async def run(args: argparse.Namespace) -> int:
    from bench import report
    from bench.harness import Context
    from bench.registry import scenario

    log = logging.getLogger("bench")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(device=args.device, quick=args.quick, repeat=args.repeat, out=out, torch_threads=args.torch_threads)
    ctx.noise_budget_seconds = args.noise_budget if args.noise_budget is not None else (0.0 if args.quick else 420.0)
    started = time.monotonic()
    log.info("starting broker, redis, model (device %s)", args.device)
    ctx.start()
    failures = 0
    try:
        for name in args.names:
            log.info("scenario %s ...", name)
            began = time.monotonic()
            began_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            try:
                body = await scenario(name)(ctx)
            except Exception:
                failures += 1
                log.error("scenario %s failed:\n%s", name, traceback.format_exc())
                continue
            result = {
                "scenario": name,
                "noise_rule": f"unit clean when other processes used <= {ctx.noise_limit} cores during it",
                "machine": ctx.machine,
                "quick": args.quick,
                "repeat": args.repeat,
                "started_at": began_at,
                "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "duration_seconds": round(time.monotonic() - began, 1),
                **body,
            }
            report.write_json(out / f"{name}.json", result)
            try:
                report.plot(name, result, out / f"{name}.png")
            except Exception:
                log.error("plot of %s failed:\n%s", name, traceback.format_exc())
            log.info("scenario %s done in %.0f s", name, result["duration_seconds"])
            for row in report.rows({name: result}):
                log.info("  %s: %s %s %s", *row)
    finally:
        ctx.close()

    # The summary and the README table cover every scenario JSON in the directory.
    results = {}
    for name in report.ORDER:
        path = out / f"{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text(encoding="utf-8"))
    machine = ctx.machine or next((r["machine"] for r in results.values()), {})
    arguments = {"device": args.device, "quick": args.quick, "repeat": args.repeat, "scenarios": args.names,
                 "total_seconds": round(time.monotonic() - started, 1),
                 "noise_budget_seconds": ctx.noise_budget_seconds, "noise_seconds_spent": round(ctx.noise_spent_seconds, 1),
                 "noise_rule": f"a unit is clean when other processes used <= {ctx.noise_limit} cores during it; "
                               f"each unit waits for a quiet second (< {ctx.quiet_threshold} cores) and is redone up to "
                               f"{ctx.max_attempts - 1} times if noisy, within the noise budget"}
    summary = report.summary(results, machine, arguments, args.names)
    report.write_json(out / "summary.json", summary)
    (out / "README-table.md").write_text(report.markdown_table(results, machine), encoding="utf-8")

    print()
    print(report.text_table(results))
    print()
    print(f"targets passed: {summary['targets_passed']}/{summary['targets_total']}; results in {out} "
          f"({arguments['total_seconds']:.0f} s)")
    for line in summary["failed"]:
        print(f"  missed: {line}")
    if failures:
        return 1
    if args.fail_on_miss and summary["failed"]:
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("bench").setLevel(logging.INFO)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
