"""Results on disk: one JSON and one PNG per scenario, summary.json, README-table.md."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ORDER = ["ceiling", "pipeline", "naive", "duplicates", "mixed_lengths", "profile", "latency", "overhead", "chunking", "http", "processes", "recall", "mapping", "backfill", "fairness", "tenancy"]


def _clean(value: Any) -> Any:
    """JSON-safe: tuples to lists, NaN to None, numpy scalars to Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(_clean(data), indent=2) + "\n", encoding="utf-8")


def _fmt_target(t: dict[str, Any]) -> str:
    return f"{t['name']}: {t['value']:.3g} {t['op']} {t['threshold']:.3g} -> {'PASS' if t['passed'] else 'FAIL'}"


# ---- tables --------------------------------------------------------------------------


def rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    out = []
    for name in ORDER:
        if name not in results:
            continue
        for metric, value, goal, passed in results[name].get("table", []):
            out.append((metric, value, goal or "", "" if passed is None else ("PASS" if passed else "FAIL")))
    return out


def text_table(results: dict[str, dict[str, Any]]) -> str:
    table = [("measurement", "result", "target", "")] + rows(results)
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    lines = []
    for index, row in enumerate(table):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results: dict[str, dict[str, Any]], machine: dict[str, Any]) -> str:
    when = max((r.get("finished_at", "") for r in results.values()), default="")
    quick = any(r.get("quick") for r in results.values())
    lines = [
        f"Benchmarks (`make bench`), {when[:10]}: {machine.get('cpu_model', '?')}, {machine.get('cores_logical', '?')} cores, "
        f"device {machine.get('device', '?')}, torch {machine.get('torch', '?')} on {machine.get('torch_threads', '?')} threads"
        + (" (quick run: tiny sizes, not representative)" if quick else "")
        + ". Shared, noisy machine: ratios are paired per repetition, medians of "
        + f"{max((r.get('repeat', 1) for r in results.values()), default=1)} repetitions.",
        "",
        "| measurement | result | target | |",
        "|---|---|---|---|",
    ]
    for metric, value, goal, verdict in rows(results):
        lines.append(f"| {metric} | {value} | {goal} | {verdict} |")
    clean = ", ".join(f"{name} {results[name].get('clean_units', '?')}" for name in ORDER if name in results)
    lines += ["", f"Measured units free of other processes' load (<= 0.35 cores): {clean}."]
    return "\n".join(lines) + "\n"


def summary(results: dict[str, dict[str, Any]], machine: dict[str, Any], args: dict[str, Any], ran: list[str]) -> dict[str, Any]:
    targets = [dict(t, scenario=name) for name in ORDER if name in results for t in results[name]["targets"]]
    return {
        "machine": machine,
        "arguments": args,
        "scenarios_run_now": ran,
        "scenarios": {
            name: {
                "finished_at": results[name].get("finished_at"),
                "duration_seconds": results[name].get("duration_seconds"),
                "quick": results[name].get("quick"),
                "clean_units": results[name].get("clean_units"),
                "medians": results[name]["medians"] if name != "latency" else results[name]["medians"],
                "ratios": results[name]["ratios"],
                "targets": results[name]["targets"],
            }
            for name in ORDER if name in results
        },
        "targets_passed": sum(t["passed"] for t in targets),
        "targets_total": len(targets),
        "failed": [_fmt_target(t) for t in targets if not t["passed"]],
    }


# ---- plots -----------------------------------------------------------------------------


def _bars(ax: Any, labels: list[str], series: dict[str, list[list[float]]], ylabel: str, log: bool = False) -> None:
    """Grouped bars: `series[name][i]` holds the repetitions of group i (median bar, min-max whisker)."""
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    for j, (name, groups) in enumerate(series.items()):
        med = [float(np.median(g)) for g in groups]
        low = [m - min(g) for m, g in zip(med, groups)]
        high = [max(g) - m for m, g in zip(med, groups)]
        bars = ax.bar(x + (j - (len(series) - 1) / 2) * width, med, width, yerr=[low, high], capsize=3, label=name)
        for bar, m in zip(bars, med):
            ax.annotate(f"{m:.0f}" if m >= 10 else f"{m:.2g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(x, labels)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def plot(name: str, result: dict[str, Any], path: Path) -> None:
    reps = result["repetitions"]
    if name == "profile":
        _plot_profile(result, path)
        return
    if name == "latency":
        _plot_latency(result, path)
        return
    if name == "recall":
        _plot_recall(result, path)
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    if name == "ceiling":
        kinds = [k for k in ("short", "mixed") if k in reps[0]]
        _bars(ax, kinds, {
            "model.encode bs=32 (ceiling)": [[r[k]["encode_rate"] for r in reps] for k in kinds],
            "embedder.embed (length-aware)": [[r[k]["embed_rate"] for r in reps] for k in kinds],
        }, "messages / s")
        ax.set_title("Model ceiling on this machine")
    elif name == "pipeline":
        kinds = [k for k in ("short", "mixed") if k in reps[0]]
        _bars(ax, kinds, {
            "model.encode bs=32 (ceiling)": [[r[k]["ceiling_rate"] for r in reps] for k in kinds],
            "worker's batches, embed alone (replay)": [[r[k]["replay"]["rate"] for r in reps] for k in kinds],
            "Worker end to end": [[r[k]["pipeline_rate"] for r in reps] for k in kinds],
        }, "messages / s")
        ratios = ", ".join(f"{k}: {result['medians'][k]['ratio']:.2f}x" for k in kinds)
        ax.set_title(f"Pipeline vs ceiling ({ratios}; target >= 0.90x)")
    elif name == "naive":
        kinds = [k for k in ("short", "mixed") if k in reps[0]]
        _bars(ax, kinds, {
            "naive one-at-a-time consumer": [[r[k]["naive_rate"] for r in reps] for k in kinds],
            "Worker end to end": [[r[k]["pipeline_rate"] for r in reps] for k in kinds],
        }, "messages / s (log)", log=True)
        ratios = ", ".join(f"{k}: {result['medians'][k]['ratio']:.1f}x" for k in kinds)
        ax.set_title(f"Pipeline vs naive consumer ({ratios}; target >= 10x)")
    elif name == "duplicates":
        arms = ["unique", "dup50", "dup90"]
        _bars(ax, ["all unique", "50% repeated", "90% repeated"], {"Worker end to end": [[r[a]["rate"] for r in reps] for a in arms]}, "messages / s")
        ax.set_title(f"Repeated content (90%: {result['ratios']['dup90_over_unique']:.2f}x unique; target >= 5x)")
    elif name == "mixed_lengths":
        arms = ["fixed_count", "token_budget"]
        _bars(ax, ["fixed count (256/batch)", "token budget (default)"], {"Worker end to end": [[r[a]["rate"] for r in reps] for a in arms]}, "messages / s")
        ax.set_title(f"Mixed lengths: token budget {result['ratios']['token_budget_over_fixed_count']:.2f}x fixed count (target >= 1.3x)")
    elif name == "overhead":
        one = [r.get("one_torch_thread", r) for r in reps]
        _bars(ax, ["model on its default threads", "model on 1 torch thread"], {
            "tiny model encode alone": [[r["encode_rate"] for r in reps], [r["encode_rate"] for r in one]],
            "Worker end to end": [[r["worker_rate"] for r in reps], [r["worker_rate"] for r in one]],
        }, "messages / s")
        ax.set_title(f"Host path: worker {result['ratios']['worker_over_encode']:.2f}x the tiny model "
                     f"({result['medians'].get('worker_over_encode_one_thread', float('nan')):.2f}x with it on 1 thread)")
    elif name == "chunking":
        _bars(ax, ["long documents as chunks"], {
            "model.encode on the same chunks": [[r["ceiling_chunks_rate"] for r in reps]],
            "Worker end to end (chunks/s)": [[r["chunks_rate"] for r in reps]],
        }, "chunks / s")
        ax.set_title(f"Chunking: worker {result['ratios']['chunks_over_ceiling']:.2f}x the model on its chunks")
    elif name == "processes":
        many = result["parameters"]["processes"]
        _bars(ax, ["short texts, tiny model"], {
            "1 worker process": [[r["one_rate"] for r in reps]],
            f"{many} worker processes, one group": [[r["many_rate"] for r in reps]],
        }, "messages / s")
        ax.set_title(f"Worker processes on one host: {result['ratios']['speedup']:.2f}x with {many}")
    elif name == "mapping":
        arms = ["native", "flat", "debezium"]
        _bars(ax, ["native {id, text}", "flat JSON, mapped", "Debezium, mapped"],
              {"Worker end to end, tiny model": [[r[a]["rate"] for r in reps] for a in arms]}, "messages / s")
        ax.set_title(f"Mapping: flat {result['ratios']['flat_over_native']:.2f}x, Debezium "
                     f"{result['ratios']['debezium_over_native']:.2f}x native events")
    elif name == "http" and reps:
        _bars(ax, ["short texts, infinity-emb on the CPU"], {
            "server driven directly (32/request, 4 in flight)": [[r["direct_rate"] for r in reps]],
            "Worker end to end, http embedder": [[r["worker_rate"] for r in reps]],
        }, "messages / s")
        ax.set_title(f"http embedder: worker {result['ratios']['worker_over_direct']:.2f}x the server driven directly")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_profile(result: dict[str, Any], path: Path) -> None:
    med = result["medians"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, sweep, xlabel in ((axes[0], "batch_size", "batch size (mixed-length corpus texts)"),
                              (axes[1], "text_length", "text length, characters (batch size 32)")):
        keys = list(med[sweep])
        x = np.arange(len(keys))
        rates = [med[sweep][k]["rate"] for k in keys]
        rss = [med[sweep][k]["peak_rss_delta_mib"] for k in keys]
        ax.plot(x, rates, "o-", color="tab:blue", label="throughput (texts/s)")
        for xi, r in zip(x, rates):
            ax.annotate(f"{r:.0f}", (xi, r), ha="center", va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
        ax.set_xticks(x, keys)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("texts / s", color="tab:blue")
        if sweep == "text_length":
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.margins(y=0.15)
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        twin.bar(x, rss, 0.4, color="tab:orange", alpha=0.35, label="peak RSS delta (MiB)")
        twin.set_ylabel("peak RSS delta during encode, MiB", color="tab:orange")
        lines = ax.get_legend_handles_labels()
        bars = twin.get_legend_handles_labels()
        ax.legend(lines[0] + bars[0], lines[1] + bars[1], fontsize=8, loc="upper right")
    axes[0].set_title("model.encode throughput and memory by batch size")
    axes[1].set_title("model.encode throughput and memory by text length")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_recall(result: dict[str, Any], path: Path) -> None:
    """recall@10 by query kind and search mode (qdrant-edge), one bar per mode."""
    recall = result["medians"]["edge"]
    groups = ["keyword", "paraphrase", "mixed", "all"]
    counts = result["parameters"]["queries"]
    labels = [f"{g} ({counts[g]})" if g in counts else f"all ({sum(counts.values())})" for g in groups]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _bars(ax, labels, {
        "dense (model)": [[recall["dense"][g]] for g in groups],
        "sparse (BM25)": [[recall["sparse"][g]] for g in groups],
        "hybrid (RRF k=60)": [[recall["hybrid"][g]] for g in groups],
        **({"what-if: hybrid, RRF k=2": [[recall["hybrid_k2"][g]] for g in groups]} if "hybrid_k2" in recall else {}),
    }, "recall@10")
    ax.set_ylim(0, 1.25)  # room above the bars for the legend
    ax.legend(fontsize=8, loc="upper center", ncol=4)
    p = result["parameters"]
    ax.set_title(f"recall@10 on {sum(counts.values())} labelled queries, {p['labelled_documents']} documents "
                 f"+ {p['distractors']} demo texts (qdrant-edge)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_latency(result: dict[str, Any], path: Path) -> None:
    reps = result["repetitions"]
    med = result["medians"]
    whatif = result["parameters"].get("whatif_arm", "whatif_fetch_max_wait_20ms")
    options = result["parameters"].get("whatif_client_options", {})
    label = "what-if: " + ", ".join(f"{k} {kk}={vv}" for k, v in options.items() for kk, vv in v.items())
    arms = [("default", "Worker as shipped", "tab:blue", med),
            (whatif, label, "tab:green", med.get("whatif"))]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for arm, label, color, stats in arms:
        if not stats or arm not in reps[0]:
            continue
        latencies = sorted(x for r in reps for x in r[arm]["latencies_ms"])
        if not latencies:
            continue
        y = np.arange(1, len(latencies) + 1) / len(latencies)
        ax.plot(latencies, y, color=color, label=f"{label} ({len(latencies)} msgs): p50 {stats['pooled_p50_ms']:.0f}, "
                                                 f"p99 {stats['pooled_p99_ms']:.0f} ms")
        ax.axvline(stats["pooled_p99_ms"], color=color, linestyle="--", alpha=0.6)
    ax.axvline(med["target_ms"], color="tab:red", label=f"target: p99 <= {med['target_ms']:.0f} ms")
    ax.set_xscale("log")
    ax.set_xlabel("produce timestamp -> result acknowledged, ms (log); dashed: p99")
    ax.set_ylabel("share of messages")
    p = result["parameters"]
    ax.set_title(f"Latency at {p['rate_msg_per_s']:.0f} msg/s (10% of capacity {p['capacity_msg_per_s']:.0f} msg/s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
