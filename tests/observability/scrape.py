"""Scrape the driver's exporter over HTTP and check it against the metrics the run logged.

For an end-to-end test of a real training run:

    port = free_port()
    cfg = load_config(overrides(tmp_path, "trainer.total_training_steps=3",
                                "trainer.prometheus.enable=true", f"trainer.prometheus.port={port}"))
    history, samples = watch_run(f"http://127.0.0.1:{port}/metrics", lambda: _fit(cfg))
    assert_scrape_matches(samples, history)
"""

from __future__ import annotations

import math
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (sample name, sorted labels) -> value


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def scrape(url: str, timeout: float = 5.0) -> Samples:
    """GET the exposition text and parse it with prometheus_client's own parser."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode("utf-8")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def watch_run(url: str, run: Callable[[], list[dict]], poll_s: float = 0.1) -> tuple[list[dict], Samples]:
    """Call `run` (a training run that serves `url` while it trains) in a thread while scraping `url`;
    returns what `run` returned and the last scrape taken after a step was logged (the exporter stops
    with the run, so this is the only way to see it)."""
    result: dict[str, object] = {}

    def target():
        try:
            result["history"] = run()
        except BaseException as err:  # re-raised in the caller's thread
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    last: Samples = {}
    while thread.is_alive():
        try:
            samples = scrape(url, timeout=2.0)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            samples = {}  # not serving yet, or already closed
        if samples.get(("verl_mtp_step", ()), 0) >= 1:
            last = samples
        time.sleep(poll_s)
    thread.join()
    if "error" in result:
        raise result["error"]
    assert last, f"no scrape of {url} saw a logged step"
    return result["history"], last


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))


def assert_scrape_matches(samples: Samples, history: Sequence[dict]) -> None:
    """The scraped values equal the driver's metrics for the step the scrape saw: gauges, per-depth
    and per-phase labels, counters (running totals and per-step sums) and the step-time histogram.
    `history` is the run's metrics per step, from step 1 (a run started from scratch)."""
    step = int(value(samples, "verl_mtp_step"))
    rows = [r for r in history if int(r["trainer/step"]) <= step]
    row = rows[-1]
    assert int(row["trainer/step"]) == step, f"history has no row for scraped step {step}"
    gauges = {"verl_mtp_reward_mean": "critic/score/mean", "verl_mtp_accuracy": "critic/acc/mean",
              "verl_mtp_rollout_tokens_per_second": "rollout/tokens_per_s",
              "verl_mtp_weight_version": "trainer/weight_version", "verl_mtp_step_seconds": "timing_s/step"}
    if "rollout/accept_length" in row:
        gauges["verl_mtp_rollout_accept_length"] = "rollout/accept_length"
    for name, key in gauges.items():
        assert _close(value(samples, name), row[key]), (name, value(samples, name), row[key])
    for key, v in row.items():
        if key.startswith("rollout/accept_rate_"):
            depth = key.rsplit("_", 1)[1]
            assert _close(value(samples, "verl_mtp_rollout_accept_rate", depth=depth), v), key
        elif key.startswith("timing_s/") and key != "timing_s/step":
            assert _close(value(samples, "verl_mtp_phase_seconds", phase=key.removeprefix("timing_s/")), v), key
        elif key.startswith("reward/failures_"):
            total = sum(r.get(key, 0.0) for r in rows)
            kind = key.removeprefix("reward/failures_")
            assert _close(value(samples, "verl_mtp_reward_failures_total", kind=kind), total), key
    for name, key in (("verl_mtp_worker_restarts_total", "trainer/worker_restarts"),
                      ("verl_mtp_nan_skipped_steps_total", "trainer/nan_skipped_steps")):
        assert _close(value(samples, name), row[key]), name
    assert value(samples, "verl_mtp_step_duration_seconds_count") == len([r for r in rows if "timing_s/step" in r])
