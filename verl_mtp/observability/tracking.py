"""Where each step's metrics go: the sinks named in `trainer.logger` (console, jsonl, tensorboard)
and, when enabled, the Prometheus exporter. The driver only does

    tracker = Tracker.from_config(cfg, total_steps, start_step)
    tracker.log(metrics, step)        # every step
    tracker.log_generations(samples, step)   # after a validation, when trainer.log_val_generations > 0
    tracker.close()
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence

import numpy as np

from verl_mtp.observability.prometheus import PrometheusExporter, exporter_from_config

LOGGERS = ("console", "jsonl", "tensorboard")
METRICS_FILE = "metrics.jsonl"
GENERATIONS_FILE = "val_generations.jsonl"
Generation = tuple[str, str, float]  # (input text, output text, score)


def pick_generations(inputs: Sequence[str], outputs: Sequence[str], scores: Sequence[float], n: int,
                     seed: int = 42) -> list[Generation]:
    """`trainer.log_val_generations`: n validation samples, the same ones at every validation of a run
    (as verl picks them: ordered by input text, then a fixed-seed shuffle), so a table shows how the
    answers to the same prompts change over training."""
    if n <= 0:
        return []
    rows = sorted(zip(inputs, outputs, (float(s) for s in scores)), key=lambda r: r[0])
    order = np.random.RandomState(seed).permutation(len(rows))
    return [rows[i] for i in order[:n]]


def format_duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ConsoleSink:
    """One compact line per step (with its own ETA, so plain log files show progress too), plus a
    progress bar over the total steps on a terminal."""

    LABELS = {"critic/score/mean": "score", "critic/acc/mean": "acc", "actor/pg_loss": "pg_loss",
              "mtp/loss": "mtp_loss", "rollout/accept_length": "accept_len",
              # observed beside predicted: the rollout's acceptance and the training forward's expectation
              "mtp/expected_accept_length": "exp_accept_len", "rollout/accept_rate_1": "accept_1",
              "mtp/expected_accept_rate_1": "exp_accept_1", "rollout/tokens_per_s": "tok/s",
              "response_length/mean": "resp_len", "val-core/acc": "val_acc", "timing_s/step": "step_s"}
    # running totals shown only once they are non-zero: they mean something went wrong
    ALARMS = {"trainer/worker_restarts": "restarts", "trainer/nan_skipped_steps": "nan_skipped"}

    def __init__(self, total_steps: int, start_step: int = 0, file=None):
        from tqdm import tqdm

        self.total_steps = total_steps
        self.start_step = start_step
        self.started = time.monotonic()
        self.file = file or sys.stdout
        # disable=None: no bar when stderr is not a terminal (Ray job logs); the lines still carry the ETA
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
                        dynamic_ncols=True, disable=None)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        now = time.monotonic()
        if step <= self.start_step:  # validation before the first step: not part of the step rate
            self.started = now
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{label}={metrics[k]:.4g}" for k, label in self.LABELS.items() if k in metrics]
        parts += [f"{label}={metrics[k]:.0f}" for k, label in self.ALARMS.items() if metrics.get(k, 0) > 0]
        done = step - self.start_step
        if done > 0 and step < self.total_steps:
            parts.append(f"eta={format_duration((now - self.started) / done * (self.total_steps - step))}")
        self.bar.write(" ".join(parts), file=self.file)
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


class JsonlSink:
    """`metrics.jsonl` in the run folder: one object per step with `step`, `time` and every metric.
    Non-finite values are written as null (JSON has no NaN), so a NaN loss stays visible."""

    def __init__(self, run_dir: str):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.f = open(self.path, "a", buffering=1)
        if self.f.tell() and not _ends_with_newline(self.path):  # a killed run cut its last line
            self.f.write("\n")  # so the resumed run's first row is not glued to it

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        row = {"step": step, "time": time.time()}
        for k, v in metrics.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else None
        self.f.write(json.dumps(row) + "\n")  # line buffered: a reader sees whole lines (but the last may be cut)

    def log_generations(self, samples: Sequence[Generation], step: int) -> None:
        """`val_generations.jsonl` beside the metrics: one object per sample."""
        with open(os.path.join(os.path.dirname(self.path), GENERATIONS_FILE), "a") as f:
            for text_in, text_out, score in samples:
                f.write(json.dumps({"step": step, "input": text_in, "output": text_out, "score": score}) + "\n")

    def close(self) -> None:
        self.f.close()


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def tensorboard_dir(project: str, experiment: str) -> str:
    """`$TENSORBOARD_DIR` when set, else `tensorboard_log/{project}/{experiment}` (verl's layout)."""
    return os.environ.get("TENSORBOARD_DIR") or os.path.join("tensorboard_log", project, experiment)


# TensorBoard's Custom Scalars tab: the rollout's observed acceptance and training's expectation in one chart
COMPARISONS = {"speculation: observed vs expected from training": {
    "accept length": ["Multiline", [r"rollout/accept_length$", r"mtp/expected_accept_length$"]],
    "acceptance per depth: P(drafts 1..k kept)": ["Multiline", [r"rollout/accept_rate_\d+$",
                                                               r"mtp/expected_chain_accept_rate_\d+$"]],
}}


class TensorBoardSink:
    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir)
        self.writer.add_custom_scalars(COMPARISONS)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, float(v), step)
        self.writer.flush()

    def log_generations(self, samples: Sequence[Generation], step: int) -> None:
        """One markdown table per validation under the text tab, `val/generations`."""
        cell = lambda text: str(text).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
        rows = [f"| {cell(i)} | {cell(o)} | {score:.3g} |" for i, o, score in samples]
        self.writer.add_text("val/generations", "\n".join(["| input | output | score |", "|---|---|---|", *rows]),
                             step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Tracker:
    def __init__(self, loggers, run_dir: str, project: str, experiment: str, total_steps: int, start_step: int = 0,
                 exporter: PrometheusExporter | None = None):
        if isinstance(loggers, str):  # trainer.logger=console
            loggers = [loggers]
        self.sinks = []
        self.exporter = exporter
        try:
            for name in loggers:
                if name == "console":
                    self.sinks.append(ConsoleSink(total_steps, start_step))
                elif name == "jsonl":
                    self.sinks.append(JsonlSink(run_dir))
                elif name == "tensorboard":
                    self.sinks.append(TensorBoardSink(tensorboard_dir(project, experiment)))
                else:
                    raise ValueError(f"trainer.logger: {name!r} is not available ({' | '.join(LOGGERS)})")
        except BaseException:
            self.close()  # do not leave the exporter's port bound
            raise

    @classmethod
    def from_config(cls, cfg, total_steps: int, start_step: int = 0) -> Tracker:
        """Sinks from `trainer.logger` (jsonl into `trainer.log_dir`) and the exporter from
        `trainer.prometheus` / `actor_rollout_ref.rollout.prometheus`."""
        t = cfg.trainer
        exporter = exporter_from_config(cfg, total_steps)
        return cls(t.logger, t.log_dir, t.project_name, t.experiment_name, total_steps, start_step, exporter)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)
        if self.exporter is not None:
            self.exporter.update(metrics, step)

    def log_generations(self, samples: Sequence[Generation], step: int) -> None:
        """Validation samples to the sinks that keep text (jsonl, tensorboard); the console and the
        exporter show numbers only."""
        for sink in self.sinks:
            if samples and hasattr(sink, "log_generations"):
                sink.log_generations(samples, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        if self.exporter is not None:
            self.exporter.close()
