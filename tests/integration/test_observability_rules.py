"""deploy/observability against a running Kiln: every alert rule and dashboard query parses as PromQL, and every
metric they name is one the services really expose (scraped from a `kiln up` stack with every service on)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import promql_parser
import pytest
import yaml

from kiln_local.stack import Stack, StackConfig, free_port

ROOT = Path(__file__).resolve().parents[2] / "deploy" / "observability"
ALERTS = ROOT / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "grafana" / "kiln.json"
FROM_PROMETHEUS = {"up"}  # made by Prometheus itself for every target
SEVERITIES = {"warning", "critical"}
_TYPE = re.compile(r"^# TYPE (\S+) (counter|gauge|histogram|summary|untyped|info)$", re.MULTILINE)


def metric_names(expr: str) -> set[str]:
    """Every metric a PromQL expression reads (parsed, so a syntax error fails here)."""
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"].replace("$__rate_interval", "5m") for p in panels for t in p.get("targets", [])]


def exposed(text: str) -> set[str]:
    """What a /metrics page offers, as the names a query uses (a counter's _total, a histogram's series)."""
    names = set()
    for name, kind in _TYPE.findall(text):
        if kind == "counter":
            names |= {name, f"{name}_total"}
        elif kind in ("histogram", "summary"):
            names |= {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


def test_the_rules_and_the_dashboard_are_well_formed() -> None:
    rules = alert_rules()
    assert len(rules) >= 6 and len({r["alert"] for r in rules}) == len(rules)
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES and rule["annotations"]["summary"], rule["alert"]
        assert metric_names(rule["expr"]), rule["alert"]
    wanted = {"KilnWriterLagGrowing", "KilnNoRunnerForQueuedJobs", "KilnRunnerHeartbeatStale", "KilnDeadLetters",
              "KilnNotifierCuttingClientsOff"}
    assert wanted <= {r["alert"] for r in rules}
    assert next(r for r in rules if r["alert"] == "KilnWriterLagGrowing")["for"] == "5m"
    queries = dashboard_queries()
    assert len(queries) >= 20 and all(metric_names(q) for q in queries)
    with pytest.raises(Exception):  # noqa: B017, PT011 - the parser's own error type; what matters: it refuses
        metric_names("sum(rate(kiln_api_requests_total[5m])")


def test_every_metric_they_name_is_exposed_by_a_running_kiln(tmp_path: Path) -> None:
    cfg = StackConfig(data_dir=tmp_path / "kiln", api_port=free_port(), notifier_port=free_port(),
                      nats_port=free_port(), metrics_port=free_port(), clearml="offline")
    with Stack(cfg) as stack:
        urls = stack.metrics_urls()
        assert set(urls) == {"api", "notifier", "metrics-writer", "clearml-forwarder", "runner-0"}
        offered: set[str] = set()
        for name, url in urls.items():
            for _ in range(100):
                try:
                    text = httpx.get(url, timeout=2).text
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            else:
                raise AssertionError(f"{name}: {url} does not answer")
            offered |= exposed(text)
    named = set().union(*(metric_names(r["expr"]) for r in alert_rules()),
                        *(metric_names(q) for q in dashboard_queries()))
    assert named - offered - FROM_PROMETHEUS == set()
    docs = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    documented = set(re.findall(r"^\| `(kiln_\w+)`", docs, re.MULTILINE))
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for n in named if n.startswith("kiln_")}
    assert used - documented == set()  # docs/operations.md explains every metric a rule or panel reads
