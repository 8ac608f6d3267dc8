"""Fault injection on the real trainer: worker death, NaN steps, a crash mid-save, misbehaving rewards,
and a SIGKILLed driver resumed to the same result."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from verl_mtp.config import load_config
from verl_mtp.trainer import checkpoint
from verl_mtp.trainer.ray_trainer import DAPOTrainer, NonFiniteLossError
from tests.trainer.conftest import fit_run, overrides

FIXED = ("actor_rollout_ref.model.mtp.speculative_num_steps=1",)  # auto depth follows timings: not replayable
VOLATILE = ("timing_s/", "rollout/tokens_per_s", "rollout/depth_rounds", "trainer/worker_restarts")


def _same_history(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if not k.startswith(VOLATILE)} == \
               {k: v for k, v in y.items() if not k.startswith(VOLATILE)}


class KillActorAtStep(DAPOTrainer):
    """Kills the actor worker's process right before step `kill_at` runs (once)."""

    kill_at = 3

    def train_step(self):
        if self.step + 1 == self.kill_at and not getattr(self, "killed", False):
            self.killed = True
            os.kill(self.actor.call_rank0("pid"), signal.SIGKILL)
        return super().train_step()


def test_dead_worker_is_recreated_and_the_run_matches_an_uninterrupted_one(ray_local, tmp_path):
    args = ("trainer.total_training_steps=4", "trainer.save_freq=1", *FIXED)
    reference = fit_run(DAPOTrainer(load_config(overrides(tmp_path / "ref", *args))))
    recovered = fit_run(KillActorAtStep(load_config(overrides(tmp_path / "kill", *args))))
    assert recovered[-1]["trainer/worker_restarts"] == 1.0
    _same_history(reference, recovered)


def test_worker_failures_beyond_the_limit_stop_the_run(ray_local, tmp_path):
    class KillEveryStep(DAPOTrainer):
        def train_step(self):
            os.kill(self.actor.call_rank0("pid"), signal.SIGKILL)
            return super().train_step()

    cfg = load_config(overrides(tmp_path, "trainer.total_training_steps=3", "trainer.max_worker_failures=1"))
    with pytest.raises(RuntimeError, match="trainer.max_worker_failures=1"):
        fit_run(KillEveryStep(cfg))


class NaNFromStep(DAPOTrainer):
    """Poisons the advantages from step `start` on: the loss and gradients become NaN in the worker."""

    start = 3

    def _advantages(self, batch):
        batch, metrics = super()._advantages(batch)
        if self.step + 1 >= self.start:
            batch = batch.with_(advantages=batch.advantages * float("nan"))
        return batch, metrics


def test_nan_steps_are_skipped_counted_and_stop_the_run_with_the_checkpoint_intact(ray_local, tmp_path):
    cfg = load_config(overrides(tmp_path, "trainer.total_training_steps=6", "trainer.save_freq=1",
                                "trainer.max_nan_steps=2", "trainer.logger=[jsonl]"))
    trainer = NaNFromStep(cfg)
    with pytest.raises(NonFiniteLossError, match="trainer.max_nan_steps=2"):
        fit_run(trainer)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["actor/nan_skipped_updates"] > 0 for r in rows] == [False, False, True, True]
    assert rows[-1]["trainer/nan_skipped_steps"] >= 2
    # the last checkpoint is step 2 (NaN steps are not saved) and holds the weights the NaN steps left alone
    last = checkpoint.latest(str(tmp_path / "ckpt"))
    assert last.endswith("global_step_2")
    weights = load_file(str(Path(last) / "actor" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_crash_in_the_middle_of_a_save_leaves_the_previous_checkpoint(ray_local, tmp_path):
    cfg = load_config(overrides(tmp_path, "trainer.total_training_steps=2", "trainer.save_freq=1", *FIXED))
    trainer = DAPOTrainer(cfg)
    try:
        trainer.fit()
        # a save that dies after writing the actor part but before the rename
        class Boom(Exception):
            pass

        real = trainer.actor.call

        def dying(method, *args):
            real(method, *args)
            raise Boom()

        trainer.actor.call = dying
        trainer.step = 3
        with pytest.raises(Boom):
            trainer.save_checkpoint()
    finally:
        trainer.shutdown()
    root = tmp_path / "ckpt"
    assert (root / ".global_step_3.tmp").exists() and not (root / "global_step_3").exists()
    assert checkpoint.latest(str(root)).endswith("global_step_2")
    resumed = DAPOTrainer(load_config(overrides(tmp_path, "trainer.total_training_steps=3", "trainer.save_freq=1",
                                                *FIXED)))
    history = fit_run(resumed)
    assert len(history) == 3 and resumed.step == 3


def test_failing_hanging_and_crashing_rewards_are_counted_and_the_run_goes_on(ray_local, tmp_path):
    cfg = load_config(overrides(tmp_path, "trainer.total_training_steps=2", "reward_model.reward_manager=naive",
                                "reward_model.overlong_buffer.enable=false", "reward_model.timeout_s=1",
                                "reward_model.failure_score=-2.0",
                                "custom_reward_function.path=tests/trainer/flaky_reward.py"))
    history = fit_run(DAPOTrainer(cfg))
    assert len(history) == 2
    failures = sum(h.get(f"reward/failures_{k}", 0) for h in history for k in ("exception", "timeout", "crash"))
    assert failures > 0
    assert min(h["critic/score/min"] for h in history) == -2.0


def _run_cli(tmp_path, steps, *extra):
    args = overrides(tmp_path, f"trainer.total_training_steps={steps}", "trainer.save_freq=1", *FIXED, *extra)
    return [sys.executable, "-m", "verl_mtp.trainer.main_dapo", *args]


def test_sigkilled_driver_resumes_to_the_same_weights(tmp_path):
    """A driver SIGKILLed with its Ray processes mid-run (dynamic sampling on, so its state is in the
    checkpoint too) resumes to what the uninterrupted run did: the same metrics at every step, the same
    weights bit for bit."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    sampling = ("algorithm.filter_groups.enable=true", "algorithm.filter_groups.metric=score")
    subprocess.run(_run_cli(tmp_path / "full", 3, *sampling), check=True, env=env, capture_output=True, timeout=300)
    proc = subprocess.Popen(_run_cli(tmp_path / "cut", 3, *sampling), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "cut" / "ckpt" / "global_step_2"  # step 1 saved whole: the restart resumes from it
    deadline = time.time() + 240
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    assert marker.exists()
    subprocess.run(_run_cli(tmp_path / "cut", 3, *sampling), check=True, env=env, capture_output=True, timeout=300)
    full = load_file(str(tmp_path / "full" / "ckpt" / "global_step_3" / "actor" / "model.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "ckpt" / "global_step_3" / "actor" / "model.safetensors"))
    assert all(torch.equal(full[k], cut[k]) for k in full)
    rows = lambda p: {r["step"]: r for r in map(json.loads, (p / "run" / "metrics.jsonl").read_text().splitlines())}  # noqa: E731
    a, b = rows(tmp_path / "full"), rows(tmp_path / "cut")
    volatile = ("timing_s/", "rollout/tokens_per_s", "rollout/depth_rounds", "perf/", "time")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert {k: v for k, v in b[step].items() if not k.startswith(volatile)} == \
            {k: v for k, v in a[step].items() if not k.startswith(volatile)}, step
