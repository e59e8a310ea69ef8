"""The deployment files: Dockerfile, docker-compose.yml, Prometheus config and alerts, Grafana.

- promtool checks the Prometheus config and rules and runs the alert unit tests;
- Docker Compose v2 validates the compose file when installed (infra/install-system.sh
  installs it); structural checks run either way;
- every PromQL expression of the alerts and the dashboard may only name series that a real
  worker exposes (or Prometheus' `up`);
- integration: a real `embedworker run` process scraped by a real Prometheus, whose query
  API must show the consumer lag rise over a backlog and fall back to 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from streams.config import OPTIONS, ConfigError, load_settings
from streams.devstack import free_port
from streams.metrics import Metrics
from support import event, make_settings, produce, until

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DASHBOARD = INFRA / "grafana" / "dashboards" / "embedworker.json"
GRAFANA_DATASOURCES = INFRA / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARD_PROVIDERS = INFRA / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
OPTION_ENV_NAMES = {option.env for option in OPTIONS}


# ---- tools -------------------------------------------------------------------------------


def required_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `bash infra/install-system.sh` (Debian package prometheus)")
    return path


def run_tool(argv: list[str], *, cwd: Path = REPO, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def compose_command() -> list[str] | None:
    """Docker Compose v2 (`docker compose`, or a standalone v2 `docker-compose`); it needs no engine."""
    for candidate in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(candidate[0]) is None:
            continue
        try:
            result = run_tool([*candidate, "version", "--short"], timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if result.returncode == 0 and result.stdout.strip().lstrip("v").startswith("2."):
            return candidate
    return None


# ---- PromQL: the series names an expression reads ----------------------------------------

_GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan", "start", "end",
    # Aggregations may put their grouping before the parenthesis: `sum by (x) (...)`.
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile",
}


def substitute_grafana_variables(expr: str) -> str:
    """Dashboard queries with Grafana's variables replaced by values Prometheus accepts."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return _GRAFANA_VARIABLES.get(name, ".*")

    return re.sub(r"\$\{([A-Za-z_]\w*)(?::\w+)?\}|\$([A-Za-z_]\w*)", value, expr)


def metric_names_in(expr: str) -> set[str]:
    """Series names read by a PromQL expression (a tokenizer, enough for these files).

    Strings, label matchers, ranges and grouping clauses are removed first; what is left
    are numbers, operators, function names (followed by a parenthesis) and metric names.
    """
    text = substitute_grafana_variables(expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?[a-z]*|[A-Za-z_:][A-Za-z0-9_:]*", text):
        token = match.group(0)
        if token[0].isdigit() or token.lower() in _PROMQL_WORDS:
            continue
        if re.match(r"\s*\(", text[match.end():]):
            continue  # a function call
        names.add(token)
    return names


def exposed_series_names() -> set[str]:
    """Every series name a worker's /metrics can show, from the real registry, plus `up`."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    names = {"up"}
    for family in text_string_to_metric_families(generate_latest(Metrics().registry).decode()):
        names.update(sample.name for sample in family.samples)
        # Labelled metrics without children show no samples yet: derive their series names.
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


# ---- the files ---------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    with path.open() as handle:
        return yaml.safe_load(handle)


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(INFRA / "alerts.yml")["groups"] for rule in group["rules"]]


def dashboard_panels(panels: list[dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
    for panel in load_json_dashboard()["panels"] if panels is None else panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def load_json_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of the dashboard, template variables included."""
    exprs = [(panel["title"], target["expr"]) for panel in dashboard_panels() for target in panel.get("targets", [])]
    for variable in load_json_dashboard().get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else (query or "")
        selector = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
        if selector:  # Grafana's label_values(selector, label): the selector is PromQL
            exprs.append((f"variable {variable['name']}", selector.group(1)))
    return exprs


def interpolate_compose(value: Any) -> Any:
    """`${VAR:-default}` as Compose resolves it with VAR unset (for the YAML fallback)."""
    if isinstance(value, str):
        return re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", value).replace("$$", "$")
    return value


def compose_model() -> dict[str, Any]:
    """The compose model as Compose v2 resolves it, else as YAML (anchors merged by PyYAML)."""
    command = compose_command()
    if command is not None:
        result = run_tool([*command, "-f", str(COMPOSE_FILE), "config", "--format", "json"], timeout=60)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)
    return load_yaml(COMPOSE_FILE)


def bind_mounts(model: dict[str, Any], service: str) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (long or short syntax)."""
    found = {}
    for mount in model["services"][service].get("volumes", []):
        if isinstance(mount, dict):
            if mount.get("type") != "bind":
                continue
            source, target = mount["source"], mount["target"]
        else:
            source, target = mount.split(":")[:2]
            if not source.startswith((".", "/")):
                continue
        found[target] = (REPO / source).resolve()
    return found


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        keyword, _, rest = whole.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_healthcheck_command() -> list[str]:
    healthchecks = [rest for keyword, rest in dockerfile_instructions() if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1, "exactly one HEALTHCHECK"
    exec_form = re.search(r"\bCMD\s+(\[.*\])\s*$", healthchecks[0])
    assert exec_form, "HEALTHCHECK CMD in exec (JSON) form"
    return json.loads(exec_form.group(1))


# ---- (a) promtool --------------------------------------------------------------------------


def test_promtool_accepts_config_and_rules() -> None:
    promtool = required_tool("promtool")
    # prometheus.yml names alerts.yml relatively: Prometheus resolves it against the config
    # file's directory, so it is checked where it lies, as the compose stack mounts both.
    config = run_tool([promtool, "check", "config", "prometheus.yml"], cwd=INFRA)
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout + config.stderr
    rules = run_tool([promtool, "check", "rules", "alerts.yml"], cwd=INFRA)
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_alert_unit_tests_pass_and_prove_the_key_alerts_fire() -> None:
    promtool = required_tool("promtool")
    tests = load_yaml(INFRA / "alerts_test.yml")
    firing = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {"EmbedworkerHighLagRecords", "EmbedworkerDown", "EmbedworkerMigrationShadowBehind"} <= firing
    result = run_tool([promtool, "test", "rules", "alerts_test.yml"], cwd=INFRA)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_cover_the_failure_modes_with_summaries() -> None:
    rules = alert_rules()
    by_name = {rule["alert"]: rule for rule in rules}
    assert len(by_name) == len(rules), "alert names are unique"
    expected_metrics = {
        "EmbedworkerHighLagRecords": {"embedworker_consumer_lag_records"},
        "EmbedworkerHighLagSeconds": {"embedworker_consumer_lag_seconds"},
        "EmbedworkerLagGrowing": {"embedworker_consumer_lag_records"},
        "EmbedworkerDown": {"up"},
        "EmbedworkerDeadLetterRate": {"embedworker_messages_dead_lettered_total", "embedworker_messages_consumed_total"},
        "EmbedworkerCacheErrors": {"embedworker_cache_errors_total"},
        "EmbedworkerPausedTooLong": {"embedworker_backpressure_paused"},
        "EmbedworkerMigrationShadowBehind": {"embedworker_migration_shadow_lag_messages"},
    }
    for name, metrics in expected_metrics.items():
        assert name in by_name, f"missing alert {name}"
        assert metrics <= metric_names_in(by_name[name]["expr"]), name
    assert re.search(r"\bderiv\(|\bdelta\(", by_name["EmbedworkerLagGrowing"]["expr"])
    assert by_name["EmbedworkerPausedTooLong"]["for"] == "10m"
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip(), rule["alert"]
        assert "for" in rule, f"{rule['alert']} fires on a single evaluation"


def test_prometheus_scrapes_every_worker_replica() -> None:
    config = load_yaml(INFRA / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    worker_job = jobs["embedworker"]
    (dns,) = worker_job["dns_sd_configs"]
    assert dns["names"] == ["worker"] and dns["type"] == "A"
    # The compose service name and the worker's metrics port.
    compose = load_yaml(COMPOSE_FILE)
    assert "worker" in compose["services"]
    assert str(dns["port"]) == str(compose["services"]["worker"]["environment"]["EMBEDWORKER_METRICS_PORT"])


# ---- (b) compose -------------------------------------------------------------------------


def test_compose_file_validates_with_docker_compose() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("Docker Compose v2 is not installed (infra/install-system.sh installs it); structural checks still ran")
    result = run_tool([*command, "-f", str(COMPOSE_FILE), "config", "-q"])
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", f"compose warnings: {result.stderr}"


def test_compose_services_healthchecks_and_volumes() -> None:
    model = compose_model()
    services = model["services"]
    assert {"kafka", "topics", "redis", "qdrant", "worker", "prometheus", "grafana"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert services["qdrant"]["image"].startswith("qdrant/qdrant:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")

    for name, service in services.items():
        if name == "topics":
            continue  # one-shot: dependants wait for it to complete instead
        healthcheck = service.get("healthcheck") or {}
        assert healthcheck.get("test") and not healthcheck.get("disable"), f"{name} has no health check"

    declared_volumes = set(model.get("volumes") or {})
    for name in ("kafka", "redis", "qdrant", "prometheus", "grafana"):
        mounts = services[name].get("volumes", [])
        named = [m for m in mounts if (m.get("type") == "volume" if isinstance(m, dict) else not m.startswith((".", "/")))]
        assert named, f"{name} keeps its data in no named volume"
        for mount in named:
            source = mount["source"] if isinstance(mount, dict) else mount.split(":")[0]
            assert source in declared_volumes, f"{name}: volume {source} not declared"
    for name in services:
        for target, source in bind_mounts(model, name).items():
            assert source.exists(), f"{name}: bind mount source of {target} missing: {source}"

    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            if condition["condition"] == "service_healthy":
                assert services[dependency].get("healthcheck", {}).get("test"), f"{name} waits for {dependency}'s health"


def test_compose_worker_is_scalable_and_configured_by_known_settings() -> None:
    model = compose_model()
    worker = model["services"]["worker"]
    assert "container_name" not in worker, "fixed container names prevent --scale"
    assert not worker.get("ports"), "a fixed host port prevents --scale"
    build = worker["build"]
    assert Path(REPO / build["context"]).resolve() == REPO and build.get("dockerfile", "Dockerfile") == "Dockerfile"

    environment = {key: interpolate_compose(str(value)) for key, value in worker["environment"].items()}
    unknown = set(environment) - OPTION_ENV_NAMES
    assert not unknown, f"not settings of streams/config.py: {sorted(unknown)}"
    assert environment["EMBEDWORKER_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert environment["EMBEDWORKER_QDRANT_URL"] == "http://qdrant:6333"
    assert environment["EMBEDWORKER_METRICS_HOST"] == "0.0.0.0"
    assert environment["EMBEDWORKER_REDIS_URL"].startswith("redis://redis:6379")
    try:
        settings = load_settings(environ=environment)
    except ConfigError as exc:
        pytest.fail(f"the worker would refuse its compose environment: {exc}")

    depends = {name: spec["condition"] for name, spec in worker["depends_on"].items()}
    assert depends == {
        "kafka": "service_healthy",
        "redis": "service_healthy",
        "qdrant": "service_healthy",
        "topics": "service_completed_successfully",
    }
    assert worker["healthcheck"]["test"] == ["CMD", *dockerfile_healthcheck_command()]

    # The one-shot topics service creates exactly the worker's topics.
    script = "\n".join(model["services"]["topics"].get("command") or [])
    created = dict(re.findall(r"^\s*create\s+(\S+)\s+(\d+)\s*$", script, flags=re.MULTILINE))
    assert "kafka-topics.sh" in script
    assert created.keys() == {settings.input_topic, settings.output_topic, settings.dlq_topic}
    assert int(created[settings.input_topic]) >= 6


def test_compose_mounts_match_prometheus_and_grafana_provisioning() -> None:
    model = compose_model()
    prometheus = bind_mounts(model, "prometheus")
    assert prometheus["/etc/prometheus/prometheus.yml"] == (INFRA / "prometheus.yml").resolve()
    assert prometheus["/etc/prometheus/alerts.yml"] == (INFRA / "alerts.yml").resolve()  # beside it, as rule_files says

    grafana = bind_mounts(model, "grafana")
    assert grafana["/etc/grafana/provisioning"] == (INFRA / "grafana" / "provisioning").resolve()
    providers = load_yaml(GRAFANA_DASHBOARD_PROVIDERS)["providers"]
    assert grafana[providers[0]["options"]["path"]] == DASHBOARD.parent.resolve()

    (datasource,) = load_yaml(GRAFANA_DATASOURCES)["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"


def test_dockerfile_builds_a_non_root_worker_image() -> None:
    instructions = dockerfile_instructions()
    keywords = [keyword for keyword, _ in instructions]
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert all(base.split()[0] == "python:3.11-slim" for base in froms)
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert "-r requirements.lock" in runs and "--extra-index-url https://download.pytorch.org/whl/cpu" in runs
    assert re.search(r"pip install --no-deps \.", runs)

    final_stage = instructions[len(instructions) - 1 - keywords[::-1].index("FROM"):]
    users = [rest for keyword, rest in final_stage if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the worker runs as a non-root user"
    assert ("ENTRYPOINT", '["embedworker"]') in final_stage and ("CMD", '["run"]') in final_stage
    assert any(keyword == "EXPOSE" and "9108" in rest.split() for keyword, rest in final_stage)
    command = dockerfile_healthcheck_command()
    assert "/metrics" in " ".join(command) and "9108" in " ".join(command)

    # Every COPY source exists and is not excluded by .dockerignore; every package is copied.
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    copied = set()
    for keyword, rest in instructions:
        if keyword != "COPY" or rest.startswith("--from"):
            continue
        *sources, _destination = shlex.split(rest)
        for source in sources:
            top = source.rstrip("/").split("/")[0]
            assert top not in ignored, f"COPY {source} but .dockerignore excludes it"
            if "*" not in source:
                assert (REPO / source).exists(), f"COPY {source}: no such file"
            copied.add(top)
    pyproject = (REPO / "pyproject.toml").read_text()
    packages = re.search(r"^include\s*=\s*\[(.*?)\]", pyproject, flags=re.MULTILINE | re.DOTALL)
    assert packages, "pyproject.toml names its packages ([tool.setuptools.packages.find] include)"
    for package in re.findall(r'"([^"]+)"', packages.group(1)):
        assert package.rstrip("*").split(".")[0] in copied, f"package {package} is not copied into the image"
    from setuptools import find_packages

    patterns = re.findall(r'"([^"]+)"', packages.group(1))
    assert {"streams.steps", "streams.backends", "streams.commands"} <= set(find_packages(where=str(REPO), include=patterns))
    assert ".venv" in ignored and ".git" in ignored


# ---- (c) metric names in PromQL ------------------------------------------------------------


def test_promql_name_extraction() -> None:
    assert metric_names_in('sum by (topic, partition) (embedworker_consumer_lag_records{instance=~"$instance"})') == {
        "embedworker_consumer_lag_records"
    }
    assert metric_names_in(
        "histogram_quantile(0.95, sum by (le) (rate(embedworker_embed_duration_seconds_bucket[$__rate_interval])))"
    ) == {"embedworker_embed_duration_seconds_bucket"}
    assert metric_names_in(
        'deriv(sum by (topic) (a_total)[10m:30s]) > 0 and on () sum(rate(b[5m] offset 1h)) / ignoring(x) group_left c == 1e3'
    ) == {"a_total", "b", "c"}
    assert metric_names_in('absent(up{job="embedworker"} == 1)') == {"up"}
    assert metric_names_in('label_replace(x, "dst", "$1", "src", "(.*)")') == {"x"}


def test_alert_and_dashboard_queries_name_only_exposed_series() -> None:
    exposed = exposed_series_names()
    assert {"embedworker_consumer_lag_records", "embedworker_cache_errors_total", "embedworker_batch_size_messages_bucket"} <= exposed
    queries = [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()] + dashboard_exprs()
    unknown = {where: sorted(metric_names_in(expr) - exposed) for where, expr in queries if metric_names_in(expr) - exposed}
    assert not unknown, f"series no worker exposes: {unknown}"
    assert all(metric_names_in(expr) for _, expr in queries), "every query reads some series"


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    # promtool has no expression checker, but it parses recording rules: one rule per query.
    promtool = required_tool("promtool")
    rules = [
        {"record": f"dashboard:query_{index}", "expr": substitute_grafana_variables(expr)}
        for index, (_, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_tool([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_structure_and_coverage() -> None:
    dashboard = load_json_dashboard()
    assert dashboard["uid"] and dashboard["title"]
    (datasource,) = load_yaml(GRAFANA_DATASOURCES)["datasources"]
    panels = list(dashboard_panels())
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"

    boxes = []
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        boxes.append((panel["title"], grid["x"], grid["y"], grid["x"] + grid["w"], grid["y"] + grid["h"]))
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"] and target["expr"].strip(), panel["title"]
    for i, (title, x0, y0, x1, y1) in enumerate(boxes):
        for other, ox0, oy0, ox1, oy1 in boxes[i + 1:]:
            assert x1 <= ox0 or ox1 <= x0 or y1 <= oy0 or oy1 <= y0, f"panels {title!r} and {other!r} overlap"

    shown = set().union(*(metric_names_in(expr) for _, expr in dashboard_exprs()))
    assert {
        "embedworker_consumer_lag_records",
        "embedworker_consumer_lag_seconds",
        "embedworker_messages_processed_total",
        "embedworker_messages_consumed_total",
        "embedworker_batch_size_messages_bucket",
        "embedworker_batch_target_messages",
        "embedworker_batch_token_budget_tokens",
        "embedworker_embed_duration_seconds_bucket",
        "embedworker_upsert_duration_seconds_bucket",
        "embedworker_end_to_end_latency_seconds_bucket",
        "embedworker_cache_hits_total",
        "embedworker_cache_misses_total",
        "embedworker_backpressure_paused",
        "embedworker_backpressure_reason_active",
        "embedworker_process_resident_memory_bytes",
        "embedworker_in_flight_batches",
        "embedworker_messages_dead_lettered_total",
    } <= shown
    lag_queries = [expr for _, expr in dashboard_exprs() if "embedworker_consumer_lag_records" in expr]
    assert any(re.search(r"by \(topic, partition\)", expr) for expr in lag_queries), "lag per partition"


# ---- (d) a real worker scraped by a real Prometheus ----------------------------------------

BACKLOG = 1500


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


async def _stop(process: subprocess.Popen[bytes], *, timeout: float) -> int:
    """SIGTERM, then SIGKILL after `timeout`; the exit code of the SIGTERM (or -9)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)
    return process.returncode


def _prometheus_config(tmp_path: Path, metrics_port: int) -> Path:
    """infra/prometheus.yml with the worker job pointed at the local worker, scraped every second."""
    config = load_yaml(INFRA / "prometheus.yml")
    config["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"})
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "embedworker"]
    job.pop("dns_sd_configs")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    config["scrape_configs"] = [job]
    config.pop("alerting", None)
    shutil.copy(INFRA / "alerts.yml", tmp_path / "alerts.yml")  # the real rules, evaluated live
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.integration
async def test_prometheus_sees_lag_rise_and_drain_on_a_real_worker(services, tmp_path: Path) -> None:
    prometheus_binary = required_tool("prometheus")
    settings = await make_settings(services, partitions=2)
    # Produced before the worker starts, with distinct texts (no cache hits): the backlog
    # takes it tens of seconds here, many scrapes at 1 s.
    texts = [f"Backlog event {i}: a short sentence about subject {i % 37} and item {i * 7919 % 1000}." for i in range(BACKLOG)]
    await produce(
        settings,
        [event(f"lag-{i}", text) for i, text in enumerate(texts)],
        keys=[f"k{i}".encode() for i in range(BACKLOG)],
    )

    metrics_port, prometheus_port = free_port(), free_port()
    prometheus_url = f"http://127.0.0.1:{prometheus_port}"
    environment = {key: value for key, value in os.environ.items() if not key.startswith("EMBEDWORKER_")}
    environment.update(
        {
            "HF_HUB_OFFLINE": "1",
            "EMBEDWORKER_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "EMBEDWORKER_INPUT_TOPIC": settings.input_topic,
            "EMBEDWORKER_OUTPUT_TOPIC": settings.output_topic,
            "EMBEDWORKER_DLQ_TOPIC": settings.dlq_topic,
            "EMBEDWORKER_GROUP_ID": settings.group_id,
            "EMBEDWORKER_COLLECTION": settings.collection,
            "EMBEDWORKER_REDIS_URL": settings.redis_url,
            "EMBEDWORKER_DEVICE": "cpu",
            "EMBEDWORKER_METRICS_HOST": "127.0.0.1",
            "EMBEDWORKER_METRICS_PORT": str(metrics_port),
            "EMBEDWORKER_COMMIT_INTERVAL_MS": "200",
            "EMBEDWORKER_SHUTDOWN_TIMEOUT_SECONDS": "20",
        }
    )
    if services.qdrant_url:
        environment["EMBEDWORKER_QDRANT_URL"] = services.qdrant_url
    else:
        environment["EMBEDWORKER_QDRANT_PATH"] = str(tmp_path / "qdrant")

    prometheus_log, worker_log = tmp_path / "prometheus.log", tmp_path / "worker.log"
    embedworker = Path(sys.executable).with_name("embedworker")
    embedworker = str(embedworker) if embedworker.exists() else shutil.which("embedworker") or "embedworker"
    prometheus = worker = None
    # trust_env=False: a proxy from the environment must not carry loopback requests.
    async with httpx.AsyncClient(base_url=prometheus_url, timeout=5, trust_env=False) as client:

        async def query(expr: str) -> list[dict[str, Any]]:
            response = await client.get("/api/v1/query", params={"query": expr})
            body = response.json()
            assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
            return body["data"]["result"]

        async def scalar(expr: str) -> float | None:
            result = await query(expr)
            return float(result[0]["value"][1]) if result else None

        def check_alive() -> None:
            for name, process, log in (("worker", worker, worker_log), ("prometheus", prometheus, prometheus_log)):
                if process is not None and process.poll() is not None:
                    raise AssertionError(f"{name} exited with {process.returncode}:\n{_tail(log)}")

        try:
            with prometheus_log.open("wb") as log:
                prometheus = subprocess.Popen(
                    [
                        prometheus_binary,
                        f"--config.file={_prometheus_config(tmp_path, metrics_port)}",
                        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{prometheus_port}",
                    ],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                )

            async def prometheus_ready() -> bool:
                check_alive()
                try:
                    return (await client.get("/-/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await until(prometheus_ready, timeout=30, what="Prometheus ready", interval=0.2)

            with worker_log.open("wb") as log:
                worker = subprocess.Popen(
                    [embedworker, "run"], env=environment, cwd=tmp_path,
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                )

            observed_lag: list[float] = []

            async def lag_visible() -> bool:
                check_alive()
                value = await scalar("sum(embedworker_consumer_lag_records)")
                if value is not None and value > 0:
                    observed_lag.append(value)
                    return True
                return False

            await until(lag_visible, timeout=90, what="Prometheus to see consumer lag > 0", interval=0.25)
            assert await scalar('up{job="embedworker"}') == 1

            async def drained() -> bool:
                check_alive()
                processed = await scalar("sum(embedworker_messages_processed_total)")
                lag = await scalar("sum(embedworker_consumer_lag_records)")
                return processed is not None and processed >= BACKLOG and lag == 0

            await until(drained, timeout=120, what="lag back to 0 in Prometheus after the backlog", interval=0.25)
            # Prometheus stored the backlog, not just our poll: its peak over the run.
            peak = await scalar("max_over_time(sum(embedworker_consumer_lag_records)[5m:1s])")
            assert peak is not None and peak >= observed_lag[0] > 0
            per_partition = await query("embedworker_consumer_lag_records")
            assert {series["metric"]["partition"] for series in per_partition} == {"0", "1"}
            assert await scalar("sum(embedworker_messages_dead_lettered_total)") == 0

            # The image's HEALTHCHECK probe, run here against the live worker.
            probe = dockerfile_healthcheck_command()
            probe[0] = sys.executable
            probe_environment = {key: value for key, value in environment.items() if "proxy" not in key.lower()}
            result = await asyncio.to_thread(subprocess.run, probe, env=probe_environment, capture_output=True, timeout=30)
            assert result.returncode == 0, result.stderr

            # The real alert rules evaluate without errors against real series...
            async def rules_evaluated() -> bool:
                groups = (await client.get("/api/v1/rules")).json()["data"]["groups"]
                rules = [rule for group in groups for rule in group["rules"]]
                return len(rules) == len(alert_rules()) and all(rule["health"] != "unknown" for rule in rules)

            await until(rules_evaluated, timeout=30, what="alert rules evaluated", interval=0.25)
            groups = (await client.get("/api/v1/rules")).json()["data"]["groups"]
            broken = {rule["name"]: rule.get("lastError") for group in groups for rule in group["rules"] if rule["health"] != "ok"}
            assert not broken, broken
            # ...and so does every dashboard query.
            for title, expr in dashboard_exprs():
                try:
                    await query(substitute_grafana_variables(expr))
                except AssertionError as exc:
                    raise AssertionError(f"dashboard panel {title!r}: {exc}") from None
            assert await query('sum by (topic, partition) (embedworker_consumer_lag_records{instance=~".*"})')
        finally:
            worker_exit = await _stop(worker, timeout=45) if worker is not None else None
            if prometheus is not None:
                await _stop(prometheus, timeout=15)
    assert worker_exit == 0, f"worker exit code {worker_exit} on SIGTERM:\n{_tail(worker_log)}"
    assert "stopped cleanly" in _tail(worker_log, 20000)
