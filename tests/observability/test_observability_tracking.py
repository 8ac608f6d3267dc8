"""Tracker sinks: TensorBoard events read back with tensorboard's own reader, the JSONL file, the console."""

import io
import json
import math
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.observability.conftest import step_metrics
from tests.observability.scrape import free_port, scrape, value
from verl_mtp.config import load_config
from verl_mtp.observability.tracking import ConsoleSink, Tracker, format_duration, pick_generations, tensorboard_dir


def _scalars(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return events


def test_tensorboard_events_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_DIR", str(tmp_path / "tb"))
    tracker = Tracker(["tensorboard"], str(tmp_path / "run"), "proj", "exp", total_steps=3)
    rows = {step: step_metrics(step, sources=("math",) if step == 3 else ()) for step in (1, 2, 3)}
    for step, row in rows.items():
        tracker.log(row, step)
    tracker.close()
    events = _scalars(tmp_path / "tb")
    tags = set(events.Tags()["scalars"])
    assert {"critic/score/mean", "rollout/accept_rate_2", "mtp/acc_1", "timing_s/update_weights",
            "val-core/math/acc/mean@1"} <= tags
    for key in ("critic/score/mean", "rollout/accept_length", "trainer/weight_version"):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [1, 2, 3]
        assert [e.value for e in logged] == pytest.approx([rows[s][key] for s in (1, 2, 3)])
    assert [e.step for e in events.Scalars("val-core/acc")] == [3]
    assert not (tmp_path / "run").exists()  # no jsonl sink asked for


def test_tensorboard_charts_observed_beside_expected_acceptance(tmp_path, monkeypatch):
    """The Custom Scalars layout puts each rollout series and training's expectation in one chart, and
    its patterns match the keys actually logged."""
    import re

    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    monkeypatch.setenv("TENSORBOARD_DIR", str(tmp_path / "tb"))
    tracker = Tracker(["tensorboard"], str(tmp_path / "run"), "proj", "exp", total_steps=1)
    tracker.log(step_metrics(1), 1)
    tracker.close()
    layout = layout_pb2.Layout()
    layout.ParseFromString(_scalars(tmp_path / "tb").Tensors(metadata.CONFIG_SUMMARY_TAG)[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert set(charts) == {"accept length", "acceptance per depth: P(drafts 1..k kept)"}
    for observed, expected in charts.values():
        assert [k for k in step_metrics(1) if re.match(observed, k)][0].startswith("rollout/")
        assert [k for k in step_metrics(1) if re.match(expected, k)][0].startswith("mtp/expected_")


def test_tensorboard_default_dir_is_per_project_and_experiment(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tensorboard_dir("proj", "exp") == "tensorboard_log/proj/exp"
    tracker = Tracker(["tensorboard"], "run", "proj", "exp", total_steps=1)
    tracker.log({"critic/acc/mean": 0.5, "actor/pg_loss": float("nan")}, 1)
    tracker.close()
    events = _scalars(tmp_path / "tensorboard_log" / "proj" / "exp")
    assert events.Scalars("critic/acc/mean")[0].value == 0.5
    assert math.isnan(events.Scalars("actor/pg_loss")[0].value)  # a NaN loss is logged, not dropped


def test_jsonl_round_trip_and_append_on_resume(tmp_path):
    run = tmp_path / "run"
    first = Tracker(["jsonl"], str(run), "p", "e", total_steps=3)
    first.log(step_metrics(1), 1)
    first.log(step_metrics(2, **{"actor/pg_loss": float("inf")}), 2)
    first.close()
    resumed = Tracker(["jsonl"], str(run), "p", "e", total_steps=3, start_step=2)
    resumed.log(step_metrics(3), 3)
    resumed.close()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["time"] > 1e9 for r in rows)
    expected = step_metrics(1)
    assert {k: v for k, v in rows[0].items() if k not in ("step", "time")} == expected
    assert rows[1]["actor/pg_loss"] is None  # JSON has no inf/NaN: null keeps it visible


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_console_line_eta_alarms_and_progress_bar(monkeypatch):
    bar = _Terminal()
    monkeypatch.setattr(sys, "stderr", bar)
    lines = io.StringIO()
    sink = ConsoleSink(total_steps=4, start_step=0, file=lines)
    sink.log({"val-core/acc": 0.25}, 0)  # validation before training
    sink.log(step_metrics(1), 1)
    sink.log(step_metrics(2, **{"trainer/nan_skipped_steps": 2.0}), 2)
    sink.log(step_metrics(4), 4)
    sink.close()
    out = lines.getvalue().splitlines()
    assert out[0] == "step 0/4 val_acc=0.25"
    assert out[1].startswith("step 1/4 score=-0.95 acc=0.02 pg_loss=0.01 mtp_loss=0.299 accept_len=1.2 "
                             "exp_accept_len=2.025 accept_1=0.8 exp_accept_1=0.82 tok/s=121 ")
    assert out[1].split()[-1].startswith("eta=") and "nan_skipped" not in out[1]
    assert "nan_skipped=2" in out[2]
    assert "eta=" not in out[3]  # the last step
    assert sink.bar.n == 4 and "4/4" in bar.getvalue()


def test_format_duration():
    assert [format_duration(s) for s in (4.4, 185, 7620)] == ["4s", "3m05s", "2h07m"]


def test_unknown_logger_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="trainer.logger: 'wandb' is not available"):
        Tracker(["jsonl", "wandb"], str(tmp_path), "p", "e", total_steps=1)


def test_from_config_wires_sinks_and_exporter(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_DIR", str(tmp_path / "tb"))
    port = free_port()
    cfg = load_config([f"trainer.log_dir={tmp_path}/run", "trainer.logger=[jsonl,tensorboard]",
                       "trainer.prometheus.enable=true", f"trainer.prometheus.port={port}",
                       "trainer.experiment_name=wired"])
    tracker = Tracker.from_config(cfg, total_steps=5, start_step=0)
    try:
        tracker.log(step_metrics(1), 1)
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
        assert value(samples, "verl_mtp_step") == 1 and value(samples, "verl_mtp_total_steps") == 5
        assert value(samples, "verl_mtp_run_info", project="verl_mtp", experiment="wired") == 1
    finally:
        tracker.close()
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    assert _scalars(tmp_path / "tb").Scalars("critic/acc/mean")[0].step == 1


def test_a_bad_logger_does_not_leave_the_exporter_bound(tmp_path):
    port = free_port()
    cfg = load_config([f"trainer.log_dir={tmp_path}/run", "trainer.logger=[console]",
                       "trainer.prometheus.enable=true", f"trainer.prometheus.port={port}"])
    cfg.trainer.logger = ["console", "wandb"]  # past validation (which rejects it too), the tracker must not leak
    with pytest.raises(ValueError, match="wandb"):
        Tracker.from_config(cfg, total_steps=1)
    Tracker.from_config(load_config(["trainer.logger=[]", "trainer.prometheus.enable=true",
                                     f"trainer.prometheus.port={port}"]), total_steps=1).close()


def test_val_generations_are_the_same_prompts_every_time():
    inputs = [f"q{i}" for i in range(10)]
    picked = pick_generations(inputs, [f"a{i}" for i in range(10)], list(range(10)), 4)
    assert len(picked) == 4 and len({i for i, _, _ in picked}) == 4
    assert all(o == "a" + i[1:] and s == float(i[1:]) for i, o, s in picked)  # rows stay together
    shuffled = list(reversed(range(10)))  # the order the samples arrive in does not matter
    again = pick_generations([inputs[i] for i in shuffled], [f"b{i}" for i in shuffled], shuffled, 4)
    assert [i for i, _, _ in again] == [i for i, _, _ in picked]
    assert pick_generations(inputs, inputs, [0.0] * 10, 0) == []
    assert len(pick_generations(inputs[:3], inputs[:3], [0.0] * 3, 10)) == 3


def test_val_generations_reach_jsonl_and_tensorboard_text(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_DIR", str(tmp_path / "tb"))
    tracker = Tracker(["console", "jsonl", "tensorboard"], str(tmp_path / "run"), "p", "e", total_steps=2)
    samples = [("1+1=", "2 | done\nok", 1.0), ("2+2=", "5", -1.0)]
    tracker.log({"val-core/acc": 0.5}, 0)
    tracker.log_generations(samples, 0)
    tracker.log_generations([], 1)  # nothing picked: nothing written
    tracker.close()
    rows = [json.loads(line) for line in (tmp_path / "run" / "val_generations.jsonl").read_text().splitlines()]
    assert rows == [{"step": 0, "input": i, "output": o, "score": s} for i, o, s in samples]
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    [text] = events.Tensors("val/generations/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert "| 1+1= | 2 \\| done<br>ok | 1 |" in table and "| 2+2= | 5 | -1 |" in table
