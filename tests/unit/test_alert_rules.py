"""deploy/prometheus-alerts.yml: loaded by Prometheus's config and mounted by compose; every rule well formed,
and every metric (and label) it reads one the services export."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus-alerts.yml"


def _exported() -> dict[str, set[str]]:
    """Every flockwatch sample name the services export (counters with `_total`) → its label names."""
    import flockwatch.common.telemetry  # noqa: F401 - registers the metrics

    collectors = REGISTRY._names_to_collectors  # noqa: SLF001 - names include each counter's `_total`
    return {
        name: set(getattr(metric, "_labelnames", ()))
        for name, metric in collectors.items()
        if name.startswith("flockwatch")
    }


def test_every_alert_is_well_formed_and_reads_exported_metrics() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    exported = _exported()
    alerts = [rule for group in groups for rule in group["rules"]]
    assert len(alerts) >= 8 and len({a["alert"] for a in alerts}) == len(alerts)
    for alert in alerts:
        assert alert["labels"]["severity"] in {"warning", "critical"} and alert["annotations"]["summary"]
        used = re.findall(r"\b(flockwatch_[a-z_]+)(?:\{([^}]*)\})?", alert["expr"])
        assert used, alert["alert"]
        for name, selector in used:
            assert name in exported, f"{alert['alert']}: {name} is not exported"
            for label in re.findall(r"(\w+)\s*(?:=~|!=|=)", selector):
                assert label in exported[name], f"{alert['alert']}: {name} has no label {label}"
        for label in re.findall(r"\$labels\.(\w+)", str(alert["annotations"])):
            assert any(label in exported[name] for name, _ in used), f"{alert['alert']}: no label {label}"


def test_prometheus_loads_the_rules_and_compose_mounts_them() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert (
        "./deploy/prometheus-alerts.yml:/etc/prometheus/alerts.yml:ro" in compose["services"]["prometheus"]["volumes"]
    )
