"""`verl-mtp report`: PNGs that decode at 800x450 and a markdown summary, from a finished run, a run
in progress (cut last line) and a resumed run (repeated steps, a cut line in the middle)."""

import json
import math

import pytest
from PIL import Image

from tests.observability.conftest import step_metrics
from verl_mtp.observability.report import PLOTS, main, plot_runs, read_metrics, step_time_breakdown, write_report
from verl_mtp.observability.tracking import JsonlSink

SIZE = (800, 450)


def _write_run(run_dir, steps=25, test_freq=10, **kw):
    """A metrics.jsonl written by the real sink."""
    sink = JsonlSink(str(run_dir))
    for step in range(1, steps + 1):
        validated = step % test_freq == 0
        sink.log(step_metrics(step, sources=("math", "gsm8k") if validated else (), **kw), step)
    sink.close()
    return run_dir / "metrics.jsonl"


def _assert_png(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == SIZE


def test_report_of_a_run_in_progress(tmp_path):
    log = _write_run(tmp_path / "run")
    with open(log, "a") as f:
        f.write('{"step": 26, "time": 1700000000.0, "critic/score/me')  # the writer is mid-line
    report = write_report(str(tmp_path / "run"))
    out = tmp_path / "run" / "report"
    assert report == str(out / "report.md")
    text = (out / "report.md").read_text()
    for name in PLOTS:
        _assert_png(out / name)
        assert f"]({name})" in text
    assert "steps logged: 25 (step 1 to 25)" in text
    assert "unreadable lines skipped: 1" in text
    assert "| accept rate, depth 2 | `rollout/accept_rate_2` | 0.4 (step 1) | 0.4 (step 25) |" in text
    assert "| reward (score mean) | `critic/score/mean` | -0.95 (step 1) | 0.25 (step 25) | 0.25 (step 25) |" in text
    assert "| validation accuracy, gsm8k | `val-core/gsm8k/acc/mean@1` | 0.3 (step 10) | 0.4 (step 20) |" in text
    assert "- reward failures: crash 0, exception 0, timeout 25" in text
    assert "| update_actor | 2 | 40.0% |" in text


def test_resumed_run_keeps_the_later_row_of_a_repeated_step(tmp_path):
    run = tmp_path / "run"
    _write_run(run, steps=3)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "critic/sc')  # killed mid-line, then resumed from step 2: the sink starts a new line
    sink = JsonlSink(str(run))
    sink.log(step_metrics(3, **{"critic/score/mean": 0.5, "actor/pg_loss": float("nan")}), 3)
    sink.close()
    rows, skipped = read_metrics(str(run))
    assert [r["step"] for r in rows] == [1, 2, 3] and skipped == 1
    assert rows[2]["critic/score/mean"] == 0.5 and math.isnan(rows[2]["actor/pg_loss"])
    text = open(write_report(str(run / "metrics.jsonl"), str(tmp_path / "out"))).read()
    assert "non-finite values logged for: `actor/pg_loss`" in text


def test_run_without_speculation_has_no_acceptance_plot(tmp_path):
    run = tmp_path / "run"
    sink = JsonlSink(str(run))
    for step in (1, 2):
        row = step_metrics(step, depths=0)
        del row["rollout/accept_length"]
        sink.log(row, step)
    sink.close()
    text = open(write_report(str(run))).read()
    assert not (run / "report" / "acceptance.png").exists()
    assert "- acceptance: not logged by this run" in text
    _assert_png(run / "report" / "step_time.png")  # two steps: an area; one step would be bars


def test_step_time_breakdown_adds_up():
    rows = [{"step": 1, **step_metrics(1)}, {"step": 2, **step_metrics(2, sources=("math",), **{"timing_s/step": 6.0})}]
    steps, parts = step_time_breakdown(rows)
    assert steps == [1, 2]
    assert list(parts) == ["gen", "reward", "old_log_prob", "adv", "update_actor", "update_weights", "other",
                           "testing"]  # no "ref": this run never timed it
    assert parts["other"] == pytest.approx([0.49, 1.49])
    assert parts["testing"] == [0.0, 3.0]
    for i, total in enumerate((5.0, 6.0)):
        assert sum(v[i] for k, v in parts.items() if k != "testing") == pytest.approx(total)


def test_plot_runs_overlays_runs(tmp_path):
    on = read_metrics(str(_write_run(tmp_path / "on", steps=30)))[0]
    off = read_metrics(str(_write_run(tmp_path / "off", steps=12, **{"rollout/accept_length": 1.1})))[0]
    path = plot_runs({"mtp train on": on, "mtp train off": off}, "rollout/accept_length", str(tmp_path / "a.png"))
    _assert_png(path)
    assert plot_runs({"on": on}, "no/such_key", str(tmp_path / "b.png")) is None
    assert not (tmp_path / "b.png").exists()


def test_cli(tmp_path, capsys):
    _write_run(tmp_path / "mtp_on")
    _write_run(tmp_path / "mtp_off", steps=5)
    assert main([str(tmp_path / "mtp_on"), "--out", str(tmp_path / "out"), "--compare", str(tmp_path / "mtp_off")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "report.md")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Comparison: mtp_on vs mtp_off" in text
    _assert_png(tmp_path / "out" / "compare_rollout_accept_length.png")
    assert "](compare_rollout_accept_length.png)" in text
    assert main([str(tmp_path / "missing")]) == 2
    assert "no metrics log" in capsys.readouterr().err


def test_rows_are_plain_json(tmp_path):
    """The report reads what any tool can read: one JSON object per line."""
    log = _write_run(tmp_path / "run", steps=2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


def test_acceptance_plot_draws_the_expected_beside_the_observed(tmp_path, monkeypatch):
    from verl_mtp.observability import report

    drawn = []
    monkeypatch.setattr(report, "_save", lambda fig, path: drawn.append(
        sorted(ax.get_legend_handles_labels()[1] for ax in fig.axes)) or path)
    rows = [{"step": s, "rollout/accept_length": 2.0, "mtp/expected_accept_length": 2.1, "rollout/accept_rate_1": 0.6,
             "mtp/expected_chain_accept_rate_1": 0.62, "mtp/acc_1": 0.7} for s in range(1, 4)]
    assert report.plot_acceptance(rows, str(tmp_path / "a.png"))
    assert drawn == [[["accept length", "expected"], ["accept rate d1", "expected d1", "mtp acc d1"]]]
