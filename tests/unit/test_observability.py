"""The shipped observability files: alert rules, Grafana dashboard, scrape wiring.

promtool (Debian's ``prometheus`` package, installed by scripts/setup-host.sh)
checks the rules, runs their unit tests (deploy/observability/alerts_test.yaml),
parses every dashboard query and lints a real scrape of the metrics endpoints.
Every metric the rules and the dashboard name must be exported by
sidecar/metrics.py, with the labels they use.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from sidecar.metrics import CollectorMetrics, DaemonMetrics, serve

REPO = Path(__file__).resolve().parents[2]
OBS = REPO / "deploy" / "observability"
ALERTS = OBS / "alerts.yaml"
ALERTS_TEST = OBS / "alerts_test.yaml"
DASHBOARD = OBS / "grafana-dashboard.json"
MONITORING = REPO / "deploy" / "kubernetes" / "monitoring"

# Labels that Prometheus adds at scrape time, not the exporter.
TARGET_LABELS = frozenset({"instance", "job"})

Obj = dict[str, Any]


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: run scripts/setup-host.sh (Debian package prometheus)"
    return path


def run_promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [promtool(), *args], input=stdin, capture_output=True, timeout=60, check=False
    )


def alert_rules() -> list[Obj]:
    data: Obj = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboard() -> Obj:
    data: Obj = json.loads(DASHBOARD.read_text())
    return data


def panels() -> list[Obj]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def variable_queries() -> list[str]:
    return [v["definition"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]


def metric_names(expr: str) -> set[str]:
    """The ``sidecar_*`` metric names an expression selects (label matchers removed)."""
    return set(re.findall(r"\bsidecar_[a-z0-9_]+\b", re.sub(r"\{[^}]*\}", "", expr)))


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """Each ``name{matchers}`` in an expression, with the label names it matches on."""
    found = []
    for name, body in re.findall(r"\b(sidecar_[a-z0-9_]+)\{([^}]*)\}", expr):
        found.append((name, set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", body))))
    return found


def used_exprs() -> list[str]:
    return [r["expr"] for r in alert_rules()] + dashboard_exprs() + variable_queries()


def exercised_daemon() -> DaemonMetrics:
    """A daemon registry with every series present, as after some real work."""
    m = DaemonMetrics()
    m.event_counts["exec"] = 4
    m.event_counts["connect"] = 2
    m.record_verdict("spiffe://example.org/agent", "model-api", "allow")
    m.record_verdict("spiffe://example.org/agent", "default", "deny")
    m.record_loss("ringbuf_full", 3)
    m.observe_attestation(0.002)
    m.set_live_instances("spiffe://example.org/agent", 2)
    m.set_policy_version("2024-05-01.1")
    m.record_policy_reload(True)
    m.record_policy_reload(False)
    m.set_spool_depth(10, 4096)
    m.set_stream_state("streaming")
    m.record_credential_issued("spiffe://example.org/agent", "x509")
    m.record_credential_issued("spiffe://example.org/agent", "jwt")
    m.record_credential_revoked("spiffe://example.org/agent")
    m.watch_heartbeats(lambda: {"loop": 0.5, "reader": 0.2})
    m.watch_ring(lambda: 0.01)
    m.set_attached_programs(11)
    m.set_svid_expiry("instance-1", 1_900_000_000.0)
    return m


def exercised_collector() -> CollectorMetrics:
    m = CollectorMetrics()
    m.record_stored("node-a", 5)
    m.record_duplicates("node-a", 1)
    m.record_verification_failure("gap")
    m.set_subscribers(1)
    m.record_ingest("node-a", 0.004, 1_800_000_000.0)
    m.set_store_size(42, 1 << 20)
    return m


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
}


def exported(registry: CollectorRegistry) -> dict[str, set[str]]:
    """Every sample name a registry exposes, with the label names seen on it."""
    names: dict[str, set[str]] = {}
    for family in registry.collect():
        for suffix in _SUFFIXES.get(family.type, ("",)):
            names.setdefault(family.name + suffix, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


@cache
def all_exported() -> dict[str, set[str]]:
    return exported(exercised_daemon().registry) | exported(exercised_collector().registry)


# Alert rules


def test_alert_rules_pass_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert b"SUCCESS" in result.stdout


def test_each_alert_fires_on_its_series_and_not_on_healthy_ones() -> None:
    """promtool test rules: expected alerts, labels and rendered annotations."""
    result = run_promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_promtool_check_rules_rejects_a_broken_expression(tmp_path: Path) -> None:
    """Guards the check above: a rule file promtool cannot parse fails it."""
    broken = tmp_path / "broken.yaml"
    good = "increase(sidecar_events_lost_total[10m]) > 0"
    assert good in ALERTS.read_text()
    broken.write_text(
        ALERTS.read_text().replace(good, "increase(sidecar_events_lost_total[10m] > 0")
    )
    assert run_promtool("check", "rules", str(broken)).returncode != 0


def test_alerts_cover_losses_stream_reload_heartbeat_expiry_and_silent_hosts() -> None:
    names = {r["alert"] for r in alert_rules()}
    assert {
        "SidecarEventsLost",
        "SidecarStreamNotStreaming",
        "SidecarPolicyReloadFailing",
        "SidecarDaemonHeartbeatStale",
        "SidecarSvidExpiryNear",
        "SidecarHostSilent",
    } <= names


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        for key in ("summary", "description", "runbook"):
            assert rule["annotations"].get(key, "").strip(), f"{rule['alert']}: no {key}"


def test_every_alert_is_exercised_by_the_promtool_unit_tests() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    fired = {
        case["alertname"] for t in tests for case in t["alert_rule_test"] if case.get("exp_alerts")
    }
    assert fired == {r["alert"] for r in alert_rules()}


# Metric names against sidecar/metrics.py


def test_every_metric_in_rules_and_dashboard_is_exported() -> None:
    used = set().union(*(metric_names(e) for e in used_exprs()))
    unknown = used - set(all_exported())
    assert not unknown, f"not exported by sidecar/metrics.py: {sorted(unknown)}"


def test_the_name_check_catches_a_misspelt_metric() -> None:
    """Guards the check above with the name of a real metric, misspelt."""
    assert "sidecar_events_lost_total" in all_exported()
    assert "sidecar_event_lost_total" not in all_exported()
    assert metric_names('increase(sidecar_event_lost_total{reason="x"}[5m])') == {
        "sidecar_event_lost_total"
    }


def test_label_matchers_name_labels_the_metric_has() -> None:
    known = all_exported()
    checked = 0
    for expr in used_exprs():
        for name, labels in selectors(expr):
            extra = labels - known[name] - TARGET_LABELS
            assert not extra, f"{name} has no label {sorted(extra)} (in {expr!r})"
            checked += 1
    assert checked >= 10


# Dashboard


def test_dashboard_is_valid_json_with_panels_that_all_query() -> None:
    data = dashboard()
    assert data["title"] and data["uid"]
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    assert len(panels()) >= 15
    for p in panels():
        assert p["targets"], p["title"]
        assert all(t["expr"].strip() for t in p["targets"]), p["title"]
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, p["title"]


def test_dashboard_data_source_is_a_variable() -> None:
    data = dashboard()
    (source,) = [v for v in data["templating"]["list"] if v["type"] == "datasource"]
    assert source["query"] == "prometheus"
    ref = "${" + source["name"] + "}"
    for p in panels():
        assert p["datasource"]["uid"] == ref, p["title"]
        assert all(t["datasource"]["uid"] == ref for t in p["targets"]), p["title"]
    for v in data["templating"]["list"]:
        if v["type"] == "query":
            assert v["datasource"]["uid"] == ref, v["name"]
    # No data source of a particular Grafana is baked in anywhere.
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', DASHBOARD.read_text()))
    assert uids == {data["uid"], ref}


def test_dashboard_has_host_and_identity_variables_that_its_queries_use() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    for name in ("instance", "identity", "host"):
        assert variables[name]["type"] == "query"
        assert any(f"${name}" in e for e in dashboard_exprs()), name


def test_every_dashboard_query_parses_as_promql(tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, as a recording rule for promtool."""
    fills = {
        "$__rate_interval": "5m",
        "$__range": "6h",
        "$instance": ".*",
        "$identity": ".*",
        "$host": ".*",
    }
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        for var, value in fills.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unfilled variable in {expr!r}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


# promtool check metrics on real scrapes


def test_promtool_check_metrics_accepts_a_live_scrape_of_the_daemon() -> None:
    metrics = exercised_daemon()
    endpoint = serve(metrics.registry, "127.0.0.1", 0)
    try:
        with urllib.request.urlopen(endpoint.url, timeout=5) as response:
            body: bytes = response.read()
    finally:
        endpoint.stop()
    assert b"sidecar_events_lost_total" in body
    result = run_promtool("check", "metrics", stdin=body)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert not result.stdout.strip() and not result.stderr.strip()


def test_promtool_check_metrics_accepts_the_collector_registry() -> None:
    body = generate_latest(exercised_collector().registry)
    assert b"sidecar_collector_events_stored_total" in body
    result = run_promtool("check", "metrics", stdin=body)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert not result.stdout.strip() and not result.stderr.strip()


def test_promtool_check_metrics_flags_a_counter_without_total() -> None:
    """Guards the two checks above: promtool's linter does complain."""
    body = b"# HELP bad_counter A counter.\n# TYPE bad_counter counter\nbad_counter 1\n"
    result = run_promtool("check", "metrics", stdin=body)
    assert result.returncode != 0
    assert b"_total" in result.stdout + result.stderr


# Kubernetes scrape wiring


def rendered(directory: Path) -> list[Obj]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: run scripts/install-ops-deps.sh"
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d is not None]


def collector_pod_labels() -> dict[str, str]:
    path = REPO / "deploy" / "kubernetes" / "collector-deployment.yaml"
    deployment: Obj = yaml.safe_load(path.read_text())
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def collector_metrics_port() -> int:
    config = yaml.safe_load(
        (REPO / "deploy" / "kubernetes" / "config" / "collector.yaml").read_text()
    )
    return int(str(config["metrics"]).rsplit(":", 1)[1])


def test_collector_metrics_service_is_valid_and_reaches_the_collector_metrics_port() -> None:
    (service,) = rendered(MONITORING / "service")
    kubernetes_validate.validate(service, kubernetes_validate.latest_version(), strict=True)
    assert service["kind"] == "Service"
    assert service["metadata"]["namespace"] == "sidecar-collector"
    assert service["spec"]["selector"].items() <= collector_pod_labels().items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == collector_metrics_port()
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port["port"])
    assert annotations["prometheus.io/path"] == "/metrics"


def test_servicemonitor_selects_the_metrics_service_by_label_and_port_name() -> None:
    docs = {d["kind"]: d for d in rendered(MONITORING / "prometheus-operator")}
    assert set(docs) == {"Service", "ServiceMonitor"}
    service, monitor = docs["Service"], docs["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert service["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    # The gRPC Service must not match: it would be scraped on its TLS ports.
    grpc = yaml.safe_load((REPO / "deploy" / "kubernetes" / "collector-service.yaml").read_text())
    assert (
        not monitor["spec"]["selector"]["matchLabels"].items() <= grpc["metadata"]["labels"].items()
    )
