"""`embedworker run --processes N`: refused on single-process stores; N group members on a Qdrant server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from streams import cli
from streams.config import load_settings
from streams.processes import child_environment
from support import event, make_settings, produce, read_topic

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("store", [["--qdrant-path", "/tmp/embedworker-store"], []])
def test_several_processes_are_refused_on_a_single_process_store(capsys, store):
    assert cli.main(["run", "--processes", "2", *store]) == 2
    line = capsys.readouterr().err.strip()
    assert "EMBEDWORKER_PROCESSES" in line and "EMBEDWORKER_QDRANT_URL" in line and "\n" not in line


def test_each_child_gets_the_settings_its_own_metrics_port_and_a_share_of_the_threads():
    settings = load_settings({"processes": 3, "qdrant_url": "http://qdrant:6333", "qdrant_api_key": "k3y", "metrics_port": 9200},
                             environ={})
    envs = [child_environment(settings, i, environ={}) for i in range(3)]
    assert [e["EMBEDWORKER_METRICS_PORT"] for e in envs] == ["9200", "9201", "9202"]
    assert all(e["EMBEDWORKER_PROCESSES"] == "1" for e in envs)  # a child never supervises
    assert all(e["EMBEDWORKER_QDRANT_API_KEY"] == "k3y" for e in envs)  # by environment, never on a command line
    assert all(int(e["EMBEDWORKER_TORCH_THREADS"]) == max(1, (os.cpu_count() or 1) // 3) for e in envs)
    child = load_settings(environ=envs[1])
    assert child.processes == 1 and child.qdrant_url == "http://qdrant:6333" and child.metrics_port == 9201


@pytest.mark.integration
async def test_two_processes_share_the_partitions_and_stop_cleanly(services):
    if not services.qdrant_url:
        pytest.skip("several processes need a Qdrant server (testcontainers' Qdrant where Docker answers, or QDRANT_URL)")
    settings = await make_settings(services, partitions=4)
    await produce(settings, [event(f"p-{i}", f"text {i} for two processes") for i in range(200)],
                  keys=[f"k{i}".encode() for i in range(200)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDWORKER_")}
    env.update({"EMBEDWORKER_" + k.upper(): str(v) for k, v in {
        "bootstrap_servers": settings.bootstrap_servers, "input_topic": settings.input_topic,
        "output_topic": settings.output_topic, "dlq_topic": settings.dlq_topic, "group_id": settings.group_id,
        "collection": settings.collection, "redis_url": settings.redis_url, "qdrant_url": settings.qdrant_url,
        "metrics_port": 0, "processes": 2, "device": "cpu",
    }.items()})
    process = subprocess.Popen([sys.executable, "-m", "streams.cli", "run"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        results = await read_topic(settings, settings.output_topic, expect=200, timeout=180)
        assert len({r.key for r in results}) == 200
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-2000:]
    assert output.count("stopped cleanly") == 2  # both children drained and committed
