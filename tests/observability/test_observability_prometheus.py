"""The exporter served on a free localhost port, scraped over HTTP and parsed with prometheus_client's parser."""

import math
import socket

import pytest
from omegaconf import OmegaConf

from tests.observability.conftest import step_metrics
from tests.observability.scrape import assert_scrape_matches, free_port, scrape, value
from verl_mtp.config import load_config
from verl_mtp.observability.prometheus import PrometheusExporter, exporter_from_config, match_rule


@pytest.fixture
def exporter():
    exp = PrometheusExporter(port=0, project="proj", experiment="exp", total_steps=10)
    yield exp
    exp.close()


def test_scraped_values_match_what_was_logged(exporter):
    history = [step_metrics(1), step_metrics(2, sources=("math", "gsm8k"))]
    for row in history:
        exporter.update(row, int(row["trainer/step"]))
    assert exporter.host == "127.0.0.1" and exporter.server.server_address[0] == "127.0.0.1"
    samples = scrape(exporter.url)
    assert_scrape_matches(samples, history)
    last = history[-1]
    assert value(samples, "verl_mtp_step") == 2
    assert value(samples, "verl_mtp_total_steps") == 10
    assert value(samples, "verl_mtp_run_info", project="proj", experiment="exp") == 1
    assert value(samples, "verl_mtp_policy_loss") == last["actor/pg_loss"]
    assert value(samples, "verl_mtp_shaped_reward_mean") == last["critic/rewards/mean"]
    assert value(samples, "verl_mtp_mtp_head_accuracy", depth="2") == last["mtp/acc_2"]
    assert value(samples, "verl_mtp_mtp_head_loss", depth="1") == last["mtp/loss_1"]
    assert value(samples, "verl_mtp_rollout_depth_rounds", depth="2") == last["rollout/depth_rounds_2"]
    assert value(samples, "verl_mtp_response_length_tokens", stat="max") == last["response_length/max"]
    assert value(samples, "verl_mtp_val_accuracy", data_source="gsm8k") == last["val-core/gsm8k/acc/mean@1"]
    assert value(samples, "verl_mtp_val_accuracy_overall") == last["val-core/acc"]
    assert value(samples, "verl_mtp_phase_seconds", phase="testing") == 3.0
    assert ("verl_mtp_phase_seconds", (("phase", "step"),)) not in samples  # the total is step_seconds
    # keys without a named metric are still served, by key
    assert value(samples, "verl_mtp_metric", key="rollout/draft_tokens") == 50.0
    assert ("verl_mtp_metric", (("key", "trainer/step"),)) not in samples
    # the step-time histogram: two observations of 5 s
    assert value(samples, "verl_mtp_step_duration_seconds_count") == 2
    assert value(samples, "verl_mtp_step_duration_seconds_sum") == 10.0
    assert value(samples, "verl_mtp_step_duration_seconds_bucket", le="5.0") == 2
    assert value(samples, "verl_mtp_step_duration_seconds_bucket", le="2.0") == 0
    assert value(samples, "verl_mtp_last_step_timestamp_seconds") > 1e9


def test_counters_only_go_up(exporter):
    """Per-step amounts add up; running totals advance by their increases. A total that goes down
    (restored from an older checkpoint) moves the baseline without lowering the counter; NaN is ignored."""
    scrapes = []
    totals = [(0, 0), (1, 2), (1, 2), (3, 1), (float("nan"), 4)]  # (nan_skipped_steps, worker_restarts)
    for step, (nan_steps, restarts) in enumerate(totals, start=1):
        exporter.update(step_metrics(step, **{"trainer/nan_skipped_steps": nan_steps,
                                              "trainer/worker_restarts": restarts,
                                              "reward/failures_crash": float(step % 2),
                                              "rollout/generated_tokens": 100.0}), step)
        scrapes.append(scrape(exporter.url))
    nan_skipped = [value(s, "verl_mtp_nan_skipped_steps_total") for s in scrapes]
    restarts = [value(s, "verl_mtp_worker_restarts_total") for s in scrapes]
    crashes = [value(s, "verl_mtp_reward_failures_total", kind="crash") for s in scrapes]
    timeouts = [value(s, "verl_mtp_reward_failures_total", kind="timeout") for s in scrapes]
    tokens = [value(s, "verl_mtp_rollout_generated_tokens_total") for s in scrapes]
    assert nan_skipped == [0, 1, 1, 3, 3]
    assert restarts == [0, 2, 2, 2, 5]  # 1 -> 4 after the drop: 3 more restarts
    assert crashes == [1, 1, 2, 2, 3]
    assert timeouts == [1, 2, 3, 4, 5]
    assert tokens == [100, 200, 300, 400, 500]
    for series in (nan_skipped, restarts, crashes, timeouts, tokens):
        assert series == sorted(series)


def test_per_step_labels_drop_what_the_step_did_not_have(exporter):
    """Adaptive depth: a depth not drafted this step must not keep its old round count; the last
    validation result, though, stays until the next validation."""
    exporter.update(step_metrics(1, depths=3, sources=("math",)), 1)
    exporter.update(step_metrics(2, depths=2), 2)
    samples = scrape(exporter.url)
    rounds = {dict(labels)["depth"] for name, labels in samples if name == "verl_mtp_rollout_depth_rounds"}
    phases = {dict(labels)["phase"] for name, labels in samples if name == "verl_mtp_phase_seconds"}
    assert rounds == {"2"}
    assert "testing" not in phases and "gen" in phases
    assert value(samples, "verl_mtp_val_accuracy", data_source="math") == pytest.approx(0.11)


def test_metrics_never_logged_are_absent_and_nan_is_served(exporter):
    exporter.update({"actor/pg_loss": float("nan")}, 1)
    samples = scrape(exporter.url)
    names = {name for name, _ in samples}
    assert "verl_mtp_kl_loss" not in names and "verl_mtp_rollout_accept_length" not in names
    assert math.isnan(value(samples, "verl_mtp_policy_loss"))


@pytest.mark.parametrize("key, name, label", [
    ("mtp/loss", "mtp_loss", None), ("mtp/loss_3", "mtp_head_loss", "3"), ("timing_s/step", "step_seconds", None),
    ("timing_s/update_actor", "phase_seconds", "update_actor"), ("val-core/acc", "val_accuracy_overall", None),
    ("val-core/my/data/acc/mean@4", "val_accuracy", "my/data"), ("val/rollout/accept_length", None, None),
    ("mtp/expected_accept_rate_2", "mtp_expected_accept_rate", "2"),
    ("mtp/expected_chain_accept_rate_2", "mtp_expected_chain_accept_rate", "2"),
    ("mtp/expected_accept_length", "mtp_expected_accept_length", None),
])
def test_rule_matching(key, name, label):
    found = match_rule(key)
    assert (found[0].name, found[1]) == (name, label) if name else found is None


def test_close_frees_the_port():
    exp = PrometheusExporter(port=0)
    port = exp.port
    exp.update(step_metrics(1), 1)
    exp.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def _cfg(trainer=None, rollout=None):
    return OmegaConf.create({"trainer": {"project_name": "p", "experiment_name": "e", "prometheus": trainer or {}},
                             "actor_rollout_ref": {"rollout": {"prometheus": rollout or {}}}})


def test_config_trainer_keys_win_over_verl_rollout_keys():
    ours, verls = free_port(), free_port()
    exp = exporter_from_config(load_config([
        "trainer.prometheus.enable=true", f"trainer.prometheus.port={ours}",
        "actor_rollout_ref.rollout.prometheus.enable=true", f"actor_rollout_ref.rollout.prometheus.port={verls}"]))
    try:
        assert (exp.host, exp.port) == ("127.0.0.1", ours)
    finally:
        exp.close()


def test_config_verl_rollout_keys_alone_enable_it():
    port = free_port()
    exp = exporter_from_config(load_config(["actor_rollout_ref.rollout.prometheus.enable=true",
                                            f"actor_rollout_ref.rollout.prometheus.port={port}"]), total_steps=7)
    try:
        assert (exp.host, exp.port) == ("127.0.0.1", port)
        samples = scrape(exp.url)
        assert value(samples, "verl_mtp_total_steps") == 7
        assert value(samples, "verl_mtp_run_info", project="verl_mtp", experiment="cpu_quickstart") == 1
    finally:
        exp.close()


def test_config_disabled_and_host_default():
    assert exporter_from_config(load_config([])) is None
    exp = exporter_from_config(_cfg(rollout={"enable": True, "port": free_port()}))  # no host key at all
    try:
        assert exp.host == "127.0.0.1"
    finally:
        exp.close()


def test_port_in_use_fails_naming_the_key():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match=rf"trainer\.prometheus\.port={port}: cannot listen"):
            exporter_from_config(_cfg(trainer={"enable": True, "port": port}))
