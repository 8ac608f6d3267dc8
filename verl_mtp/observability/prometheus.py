"""Prometheus exporter in the driver: each step's metric dict as gauges, counters and a histogram.

Enable with `trainer.prometheus.enable=true` (or verl's `actor_rollout_ref.rollout.prometheus.enable=true`)
and scrape `http://{host}:{port}/metrics`. The exporter binds to 127.0.0.1 unless a host is configured.
Every name below is prefixed with `verl_mtp_`; docs/observability.md lists them and
examples/monitoring/grafana_dashboard.json charts them.

    exporter = PrometheusExporter(port=0)          # 0: any free port, see exporter.port
    exporter.update(metrics, step)                 # once per step, from the Tracker
    exporter.close()
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

NAMESPACE = "verl_mtp"
DEFAULT_HOST = "127.0.0.1"
# one CPU toy step takes seconds, one cluster step minutes: buckets span both
STEP_SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)


@dataclass(frozen=True)
class Rule:
    """How metric keys matching `pattern` (a full match) become one Prometheus metric.

    kind: "gauge" (set to the value), "step_counter" (advanced by the value: an amount for this step)
    or "total_counter" (the value is already a running total: advanced by its increase).
    label: name of the label that receives the pattern's captured group, if any.
    per_step: label values missing from a step's metrics are dropped, so a gauge never shows a
    depth or phase that the current step did not have.
    """

    pattern: str
    kind: str
    name: str
    help: str
    label: str | None = None
    per_step: bool = False


RULES = (
    # training
    Rule(r"critic/score/mean", "gauge", "reward_mean", "Mean score from the reward function this step"),
    Rule(r"critic/rewards/mean", "gauge", "shaped_reward_mean",
         "Mean summed token-level reward after overlong and KL shaping"),
    Rule(r"critic/acc/mean", "gauge", "accuracy", "Fraction of this step's responses graded correct"),
    Rule(r"actor/pg_loss", "gauge", "policy_loss", "PPO-clip policy loss"),
    Rule(r"actor/kl_loss", "gauge", "kl_loss", "KL loss to the reference policy"),
    Rule(r"actor/entropy", "gauge", "entropy", "Mean token entropy of the policy on responses"),
    Rule(r"actor/grad_norm", "gauge", "grad_norm", "Gradient norm before clipping"),
    Rule(r"actor/lr", "gauge", "learning_rate", "Actor learning rate"),
    Rule(r"mtp/loss", "gauge", "mtp_loss", "Scaled MTP loss added to the policy loss"),
    Rule(r"mtp/loss_(\d+)", "gauge", "mtp_head_loss", "MTP loss (model.mtp.loss_type) of the head at this depth",
         "depth"),
    Rule(r"mtp/acc_(\d+)", "gauge", "mtp_head_accuracy",
         "Top-1 accuracy of the MTP head at this depth on response tokens", "depth"),
    Rule(r"mtp/expected_accept_rate_(\d+)", "gauge", "mtp_expected_accept_rate",
         "Exact acceptance probability sum min(p, q) of the draft at this depth given the tokens before it, "
         "from the training forward", "depth"),
    Rule(r"mtp/expected_chain_accept_rate_(\d+)", "gauge", "mtp_expected_chain_accept_rate",
         "Expected P(drafts 1..depth all kept), from the training forward: the prediction of "
         "rollout_accept_rate", "depth"),
    Rule(r"mtp/expected_accept_length", "gauge", "mtp_expected_accept_length",
         "Expected tokens per verify pass of the configured draft chain, from the training forward"),
    Rule(r"response_length/(mean|max|min)", "gauge", "response_length_tokens", "Response length in tokens", "stat"),
    Rule(r"response_length/clip_ratio", "gauge", "response_clip_ratio",
         "Fraction of responses cut at data.max_response_length"),
    Rule(r"train/num_gen_batches", "gauge", "gen_batches", "Generation batches drawn this step (dynamic sampling)"),
    Rule(r"trainer/epoch", "gauge", "epoch", "Current epoch"),
    Rule(r"trainer/weight_version", "gauge", "weight_version",
         "Weight version last synced to the rollout and verified by checksum"),
    Rule(r"val-core/acc", "gauge", "val_accuracy_overall", "Validation accuracy over all data sources (latest)"),
    Rule(r"val-core/(.+)/acc/mean@\d+", "gauge", "val_accuracy", "Validation accuracy per data source (latest)",
         "data_source"),
    # rollout
    Rule(r"rollout/accept_length", "gauge", "rollout_accept_length",
         "Tokens emitted per target verify pass; 1.0 means speculation gains nothing"),
    Rule(r"rollout/accept_rate_(\d+)", "gauge", "rollout_accept_rate",
         "Fraction of verify passes that kept the draft at this depth (and so every one before it)", "depth"),
    Rule(r"rollout/depth_rounds_(\d+)", "gauge", "rollout_depth_rounds",
         "Decode rounds of this step that drafted this many tokens (adaptive depth)", "depth", per_step=True),
    Rule(r"rollout/tokens_per_s", "gauge", "rollout_tokens_per_second",
         "Generated tokens per second, summed over rollout workers"),
    Rule(r"rollout/generated_tokens", "step_counter", "rollout_generated_tokens", "Tokens generated by the rollout"),
    # timing (timing_s/step also feeds the step_duration_seconds histogram)
    Rule(r"timing_s/step", "gauge", "step_seconds", "Wall time of the last training step"),
    Rule(r"timing_s/(\w+)", "gauge", "phase_seconds", "Seconds spent in each phase of the last step", "phase",
         per_step=True),
    # reliability
    Rule(r"reward/failures_(\w+)", "step_counter", "reward_failures",
         "Reward calls that failed, scored as failures (exception, timeout, crash)", "kind"),
    Rule(r"trainer/worker_restarts", "total_counter", "worker_restarts",
         "Workers recreated from the last checkpoint"),
    Rule(r"trainer/nan_skipped_steps", "total_counter", "nan_skipped_steps",
         "Updates skipped because the loss or gradients were not finite"),
)
_COMPILED = tuple((re.compile(rule.pattern), rule) for rule in RULES)
_STEP_KEY = "trainer/step"  # the `step` argument already gives it
_STEP_TIME_KEY = "timing_s/step"


def match_rule(key: str) -> tuple[Rule, str | None] | None:
    """The first rule whose pattern matches `key` in full, and the captured label value (or None)."""
    for pattern, rule in _COMPILED:
        found = pattern.fullmatch(key)
        if found:
            return rule, (found.group(1) if rule.label else None)
    return None


class PrometheusExporter:
    """Serves the latest step's metrics over HTTP from its own registry (never the global one, so
    several exporters, e.g. in tests, do not collide)."""

    def __init__(self, host: str = DEFAULT_HOST, port: int = 0, *, project: str | None = None,
                 experiment: str | None = None, total_steps: int | None = None):
        self.registry = CollectorRegistry()
        self.families: dict[str, Gauge | Counter] = {}  # made on first use: a metric never logged is absent, not 0
        self.other = Gauge("metric", "Any other logged metric, by its logger key", ["key"], namespace=NAMESPACE,
                           registry=self.registry)
        self.step = Gauge("step", "Last training step logged", namespace=NAMESPACE, registry=self.registry)
        self.total_steps = Gauge("total_steps", "Training steps planned for this run", namespace=NAMESPACE,
                                 registry=self.registry)
        self.last_update = Gauge("last_step_timestamp_seconds", "Unix time of the last logged step",
                                 namespace=NAMESPACE, registry=self.registry)
        self.step_duration = Histogram("step_duration_seconds", "Wall time of training steps",
                                       namespace=NAMESPACE, buckets=STEP_SECONDS_BUCKETS, registry=self.registry)
        run = Info("run", "Project and experiment of this run", namespace=NAMESPACE, registry=self.registry)
        run.info({"project": project or "", "experiment": experiment or ""})
        if total_steps is not None:
            self.total_steps.set(total_steps)
        self._totals: dict[tuple[str, str | None], float] = {}  # last running total seen per total_counter
        self._children: dict[str, set[str]] = {}  # label values of each per_step gauge at the last update
        self.host = host
        self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)

    @property
    def port(self) -> int:
        """The bound port (the chosen one when constructed with port 0)."""
        return self.server.server_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def update(self, metrics: Mapping[str, float], step: int) -> None:
        self.step.set(step)
        self.last_update.set(time.time())
        seen: dict[str, set[str]] = {}  # label values set now, per per_step gauge
        for key, value in metrics.items():
            if key != _STEP_KEY:
                self._record(key, float(value), seen)
        for name, labels in seen.items():
            for stale in self._children.get(name, set()) - labels:
                self.families[name].remove(stale)
            self._children[name] = labels

    def _record(self, key: str, value: float, seen: dict[str, set[str]]) -> None:
        if key == _STEP_TIME_KEY and math.isfinite(value):
            self.step_duration.observe(value)
        found = match_rule(key)
        if found is None:
            self.other.labels(key=key).set(value)
            return
        rule, label = found
        family = self._family(rule)
        child = family.labels(**{rule.label: label}) if rule.label else family
        if rule.kind == "gauge":
            child.set(value)  # NaN included: a NaN loss must show on the dashboard
            if rule.per_step:
                seen.setdefault(rule.name, set()).add(label)
        elif rule.kind == "step_counter":
            if math.isfinite(value) and value > 0:
                child.inc(value)
        else:
            self._advance_total(child, (rule.name, label), value)

    def _family(self, rule: Rule) -> Gauge | Counter:
        if rule.name not in self.families:
            make = Gauge if rule.kind == "gauge" else Counter
            labels = [rule.label] if rule.label else []
            self.families[rule.name] = make(rule.name, rule.help, labels, namespace=NAMESPACE, registry=self.registry)
        return self.families[rule.name]

    def _advance_total(self, counter: Counter, ident: tuple[str, str | None], total: float) -> None:
        """A Prometheus counter only goes up: add the running total's increase since the last update.
        The first total seen (e.g. restored from a checkpoint) is added whole; a total lower than the
        last (restored from an older checkpoint) becomes the new baseline."""
        if not math.isfinite(total):
            return
        increase = total - self._totals.get(ident, 0.0)
        if increase > 0:
            counter.inc(increase)
        self._totals[ident] = total

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


# config sections that enable the exporter, in order of precedence
CONFIG_SECTIONS = ("trainer.prometheus", "actor_rollout_ref.rollout.prometheus")


def exporter_from_config(cfg, total_steps: int | None = None) -> PrometheusExporter | None:
    """The exporter the config asks for, or None.

    Either `trainer.prometheus.enable` or verl's `actor_rollout_ref.rollout.prometheus.enable` turns it
    on; host and port come from the section that enabled it, and `trainer.prometheus` wins when both
    do. Host defaults to 127.0.0.1; port 0 picks a free port.
    """
    for section_key in CONFIG_SECTIONS:
        section = _select(cfg, section_key)
        if section is None or not _get(section, "enable", False):
            continue
        host = _get(section, "host", None) or DEFAULT_HOST
        port = int(_get(section, "port", 0))
        trainer = _select(cfg, "trainer")
        try:
            exporter = PrometheusExporter(host, port, project=_get(trainer, "project_name", None),
                                          experiment=_get(trainer, "experiment_name", None), total_steps=total_steps)
        except OSError as err:
            raise RuntimeError(f"{section_key}.port={port}: cannot listen on {host}:{port} ({err.strerror or err}); "
                               f"choose another port, or 0 for any free one") from err
        print(f"prometheus exporter ({section_key}): {exporter.url}", file=sys.stderr, flush=True)
        return exporter
    return None


def _get(node, name: str, default):
    if node is None:
        return default
    if isinstance(node, Mapping):
        return node.get(name, default)
    return getattr(node, name, default)


def _select(cfg, dotted: str):
    node = cfg
    for name in dotted.split("."):
        node = _get(node, name, None)
    return node
