"""examples/monitoring: the Grafana dashboard and the alert rules query only metrics the exporter serves,
and the scrape config targets the exporter's default address."""

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.observability.conftest import step_metrics
from tests.observability.scrape import scrape
from verl_mtp.config.schema import TrainerConfig
from verl_mtp.observability.prometheus import DEFAULT_HOST, PrometheusExporter

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "monitoring"
NAME = re.compile(r"\bverl_mtp_[a-z_]+")


@pytest.fixture(scope="module")
def served_names() -> set[str]:
    """Every sample name the exporter serves once a full step (validation included) was logged."""
    exporter = PrometheusExporter(port=0)
    try:
        exporter.update(step_metrics(1, sources=("math",), **{"rollout/generated_tokens": 10.0,
                                                              "actor/kl_loss": 0.01}), 1)
        return {name for name, _ in scrape(exporter.url)}
    finally:
        exporter.close()


def _dashboard_targets(panels):
    for panel in panels:
        yield from panel.get("targets", [])
        yield from _dashboard_targets(panel.get("panels", []))


def test_dashboard_queries_served_metrics(served_names):
    dashboard = json.loads((EXAMPLES / "grafana_dashboard.json").read_text())
    exprs = [t["expr"] for t in _dashboard_targets(dashboard["panels"])]
    used = {name for expr in exprs for name in NAME.findall(expr)}
    assert used - served_names == set()
    for wanted in ("verl_mtp_reward_mean", "verl_mtp_accuracy", "verl_mtp_rollout_accept_length",
                   "verl_mtp_rollout_accept_rate", "verl_mtp_rollout_tokens_per_second", "verl_mtp_phase_seconds",
                   "verl_mtp_weight_version", "verl_mtp_reward_failures_total", "verl_mtp_worker_restarts_total",
                   "verl_mtp_nan_skipped_steps_total", "verl_mtp_val_accuracy",
                   "verl_mtp_step_duration_seconds_bucket", "verl_mtp_mtp_expected_accept_length",
                   "verl_mtp_mtp_expected_chain_accept_rate"):
        assert wanted in used, wanted
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "job", "instance"}


def test_alert_rules_query_served_metrics(served_names):
    rules = yaml.safe_load((EXAMPLES / "alerts.yml").read_text())["groups"][0]["rules"]
    used = {name for rule in rules for name in NAME.findall(rule["expr"])}
    assert used and used - served_names == set()


def test_scrape_config_targets_the_default_exporter_address():
    config = yaml.safe_load((EXAMPLES / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == [f"{DEFAULT_HOST}:{TrainerConfig().prometheus.port}"]
    assert job["metrics_path"] == "/metrics"
    assert (EXAMPLES / config["rule_files"][0]).exists()
