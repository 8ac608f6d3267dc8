"""Metric sinks selected by `trainer.logger`: console, jsonl, tensorboard."""

from __future__ import annotations

import json
import math
import os
import sys
import time


class ConsoleSink:
    """One compact line per step, plus a progress bar with ETA over the total steps."""

    LABELS = {"critic/score/mean": "score", "critic/acc/mean": "acc", "actor/pg_loss": "pg_loss",
              "mtp/loss": "mtp_loss", "rollout/accept_length": "accept_len", "rollout/tokens_per_s": "tok/s",
              "response_length/mean": "resp_len", "val-core/acc": "val_acc", "timing_s/step": "step_s"}

    def __init__(self, total_steps: int, start_step: int = 0):
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
                        dynamic_ncols=True, disable=None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        text = " ".join(f"{label}={metrics[k]:.4g}" for k, label in self.LABELS.items() if k in metrics)
        self.bar.write(f"step {step}: {text}")
        if "timing_s/step" in metrics:
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class JsonlSink:
    def __init__(self, run_dir: str):
        os.makedirs(run_dir, exist_ok=True)
        self.f = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, "time": time.time(), **{k: v for k, v in metrics.items() if math.isfinite(v)}}
        self.f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self.f.close()


class TensorBoardSink:
    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Tracker:
    def __init__(self, loggers, run_dir: str, project: str, experiment: str, total_steps: int, start_step: int = 0):
        self.sinks = []
        for name in loggers:
            if name == "console":
                self.sinks.append(ConsoleSink(total_steps, start_step))
            elif name == "jsonl":
                self.sinks.append(JsonlSink(run_dir))
            elif name == "tensorboard":
                tb_dir = os.environ.get("TENSORBOARD_DIR") or os.path.join("tensorboard_log", project, experiment)
                self.sinks.append(TensorBoardSink(tb_dir))
            else:
                raise ValueError(f"trainer.logger: {name!r} is not available (console | jsonl | tensorboard)")

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
