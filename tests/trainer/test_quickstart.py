"""`verl-mtp quickstart` end to end with tiny stage lengths: every stage runs, the report is written,
and a second invocation resumes (skips finished stages) instead of redoing them."""

import json
import os
import time

import pytest

from verl_mtp.trainer import quickstart

FAST = ["--sft-steps", "12", "--rl-steps", "2", "--eval-limit", "8",
        "trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.save_freq=2",
        "data.train_batch_size=4", "data.gen_batch_size=4", "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
        "algorithm.filter_groups.enable=false", "data.max_response_length=32",
        "reward_model.overlong_buffer.len=8"]


@pytest.mark.parametrize("argv,needle", [
    (["--rl-steps", "0"], "--rl-steps must be >= 1"),
    (["--eval-limit", "0"], "--eval-limit must be >= 1"),
    (["noequals"], "RL override 'noequals' is not KEY=VALUE"),
    (["actor_rollout_ref.actor.optim.lrx=1"], "unknown config key 'actor_rollout_ref.actor.optim.lrx'"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, argv, needle):
    with pytest.raises(SystemExit) as e:
        quickstart.main(["--out", str(tmp_path / "run"), *argv])
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # nothing started


def test_whole_pipeline_then_resume(ray_local, tmp_path, capsys):
    run = tmp_path / "qs"
    assert quickstart.main(["--out", str(run), *FAST]) == 0
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert set(summary["models"]) == {"sft", "rl", "rl_control"}
    for result in summary["models"].values():
        assert 0.0 <= result["acc/greedy"] <= 1.0 and result["accept_length/sampled"] >= 1.0
        assert result["tokens_per_s/plain"] > 0
    for png in summary["plots"].values():
        assert (run / "report" / png).stat().st_size > 1000
    for name in ("rl", "rl_control"):
        rows = [json.loads(line) for line in (run / name / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "timing_s/step" in r]
        assert len(steps) == 2 and all("rollout/accept_length" in r for r in steps)
        assert any("mtp/loss" in r for r in steps) == (name == "rl")  # the control does not train the heads
        assert list((run / name / "tensorboard").glob("events.out.tfevents.*"))  # inside the run folder
    assert "wall time" in (run / "report" / "summary.md").read_text()
    assert "TENSORBOARD_DIR" not in os.environ  # restored for whatever runs next in this process
    capsys.readouterr()

    start = time.perf_counter()
    assert quickstart.main(["--out", str(run), *FAST]) == 0  # every stage is done: only the eval reruns
    out = capsys.readouterr().out
    assert "stage 1/6" not in out and "stage 3/6" not in out and "stage 4/6" not in out
    assert "stage 6/6" in out and time.perf_counter() - start < 60
