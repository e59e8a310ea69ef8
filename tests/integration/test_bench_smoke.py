"""The benchmark suite's code path, at its smallest: `python -m bench --quick`.

Runs the ceiling, pipeline, overhead and recall scenarios with tiny sizes and one repetition against the
local broker, a local redis-server and the embedded Qdrant engine (what `make bench`
uses), and checks what lands on disk. The numbers themselves are not checked: with
--quick they mean nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[2]
SCENARIO_KEYS = {"scenario", "machine", "parameters", "repetitions", "medians", "ratios", "targets", "quick", "repeat", "table"}
MACHINE_KEYS = {"platform", "cpu_model", "cores_logical", "torch", "device"}
TARGET_KEYS = {"name", "value", "op", "threshold", "passed"}


def test_quick_bench_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenarios", "ceiling,pipeline,overhead,recall", "--device", "cpu", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    for name in ("ceiling", "pipeline"):
        data = json.loads((out / f"{name}.json").read_text())
        assert SCENARIO_KEYS <= set(data), f"{name}.json lacks {SCENARIO_KEYS - set(data)}"
        assert data["scenario"] == name and data["quick"] is True and data["repeat"] == 1
        assert MACHINE_KEYS <= set(data["machine"]) and data["machine"]["device"] == "cpu"
        assert len(data["repetitions"]) == 1
        assert (out / f"{name}.png").stat().st_size > 0

    ceiling = json.loads((out / "ceiling.json").read_text())
    for kind in ("short", "mixed"):
        assert ceiling["medians"][kind]["encode_rate"] > 0 and ceiling["medians"][kind]["embed_rate"] > 0

    pipeline = json.loads((out / "pipeline.json").read_text())
    assert {t["name"] for t in pipeline["targets"]} == {"pipeline_over_ceiling_short", "pipeline_over_ceiling_mixed"}
    for t in pipeline["targets"]:
        assert TARGET_KEYS <= set(t) and isinstance(t["passed"], bool)
    for kind in ("short", "mixed"):
        run = pipeline["repetitions"][0][kind]["pipeline"]
        assert run["processed"] == run["messages"] and run["dead_letters"] == 0 and run["cached"] == 0
        assert pipeline["medians"][kind]["pipeline_rate"] > 0 and pipeline["medians"][kind]["ratio"] > 0

    overhead = json.loads((out / "overhead.json").read_text())
    run = overhead["repetitions"][0]
    assert run["worker"]["processed"] == run["worker"]["messages"] and run["worker"]["dead_letters"] == 0
    assert run["encode_rate"] > 0 and run["passthrough_rate"] > 0 and run["worker_rate"] > 0
    assert {"worker_over_encode", "worker_over_passthrough"} <= set(overhead["ratios"])
    assert run["model_cpu_ms_per_message"] > 0 and "MainThread" in run["thread_cores"]
    assert run["one_torch_thread"]["worker_rate"] > 0 and run["worker_over_encode_one_thread"] > 0
    assert (out / "overhead.png").stat().st_size > 0

    # Recall numbers are not checked either (48 distractors make the task easy); what was stored and measured is.
    recall = json.loads((out / "recall.json").read_text())
    (runs,) = recall["repetitions"]
    assert set(runs) == {"edge", "memory"}  # the write-time arm is skipped at quick sizes
    for run in runs.values():
        facts = run["facts"]
        assert facts["points_with_sparse"] == facts["points"] > facts["documents"] > 0 and facts["chunked_documents"] >= 3
        assert len(run["queries"]) == sum(recall["parameters"]["queries"].values()) >= 20
        for mode in ("dense", "sparse", "hybrid", "hybrid_k2"):
            assert 0.0 <= run["recall"][mode]["all"] <= 1.0
    assert {t["name"] for t in recall["targets"]} == {"hybrid_recall_at_least_dense", "hybrid_recall_at_least_sparse"}
    assert (out / "recall.png").stat().st_size > 0

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["scenarios"]) == {"ceiling", "pipeline", "overhead", "recall"}
    assert summary["targets_total"] == 8
    table = (out / "README-table.md").read_text()
    assert table.count("\n|") >= 6 and "pipeline, short" in table
    assert "targets passed" in proc.stdout


def test_host_costs_writes_its_figures_with_their_baselines(tmp_path):
    import json

    from bench import host_costs

    assert host_costs.main(["--calls", "200", "--rounds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "host_costs.json").read_text())
    assert result["decode"]["debezium_ratio"] > 0 and result["decode"]["refused_0_8_mb_us"] > 0
    for kind in ("memory", "edge"):
        assert set(result["version_guard"][kind]) == {"unguarded_ms", "guarded_ms", "ratio", "conditional_upsert_ms", "conditional_upsert_ratio"}
        metadata_only = result["metadata_only"][kind]
        assert metadata_only["payload_only_writes"] == metadata_only["updates"] == 3 * 256 and metadata_only["ratio"] > 0
    assert result["cache_writes"]["ratio"] > 0 and result["cache_writes"]["batches"] == 3
    assert result["edge_points"]["worker_payload_us"] > result["edge_points"]["no_payload_us"] > 0
    assert result["edge_points"]["beside_python_cpu_us"] > 0 and result["edge_points"]["beside_python_cpu_ratio"] > 0
    assert result["client_points"]["batch_us"] > 0 and result["client_points"]["ratio"] > 0
    assert (tmp_path / "host_costs.png").stat().st_size > 0
