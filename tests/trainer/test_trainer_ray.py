"""End-to-end DAPO runs on local Ray: colocated and split modes, learning, exact resume, sync guard."""

import json

import pytest
from safetensors.torch import load_file

from verl_mtp.config import load_config
from verl_mtp.rollout.client import VERSION_CHECKED
from verl_mtp.trainer.ray_trainer import DAPOTrainer, WeightSyncError
from verl_mtp.workers.rollout_backends import ColocatedInProcess, RolloutContext
from tests.trainer.conftest import fit_run, overrides

SEVENS = "tests/trainer/sevens_reward.py"


def test_three_steps_colocated(ray_local, tmp_path):
    # a fixed depth: auto may decode plain throughout (no rollout/accept_* then), as its costs say
    history = fit_run(load_config(overrides(tmp_path, "trainer.total_training_steps=3", "trainer.test_freq=3",
                                         "data.val_batch_size=8", "trainer.log_val_generations=3",
                                         "actor_rollout_ref.model.mtp.speculative_num_steps=2")))
    assert len(history) == 3
    last = history[-1]
    for key in ("critic/score/mean", "critic/advantages/mean", "response_length/clip_ratio", "actor/pg_loss",
                "actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy", "actor/grad_norm", "actor/lr", "mtp/loss_1",
                "mtp/acc_1", "rollout/accept_length", "rollout/accept_rate_1", "rollout/tokens_per_s",
                "timing_s/gen", "timing_s/reward", "timing_s/old_log_prob", "timing_s/adv", "timing_s/update_actor",
                "timing_s/update_weights", "timing_s/step", "train/num_gen_batches", "val-core/synthetic_math/acc/mean@1",
                "rollout/sync_checksum_verified"):
        assert key in last, key
    assert last["trainer/weight_version"] == 3.0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    shown = [json.loads(line) for line in (tmp_path / "run" / "val_generations.jsonl").read_text().splitlines()]
    assert len(shown) == 3 and {r["step"] for r in shown} == {3} and len({r["input"] for r in shown}) == 3
    assert all(r["input"].strip() and isinstance(r["output"], str) for r in shown)


def test_split_mode_data_parallel_ref_dynamic_sampling_and_checkpoints(ray_local, tmp_path):
    cfg = load_config(overrides(
        tmp_path, "trainer.total_training_steps=2", "actor_rollout_ref.hybrid_engine=false",
        "trainer.n_gpus_per_node=2", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.actor.use_kl_loss=true", "algorithm.filter_groups.enable=true",
        "algorithm.filter_groups.metric=score", "trainer.save_freq=1", "trainer.max_actor_ckpt_to_keep=1"))
    history = fit_run(cfg)
    assert len(history) == 2 and "actor/kl_loss" in history[-1] and "timing_s/ref" in history[-1]
    assert all(h["train/num_gen_batches"] >= 1 for h in history)
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert sorted(p.name for p in ckpt.glob("global_step_*")) == ["global_step_2"]  # pruned to 1
    weights = load_file(str(ckpt / "global_step_2" / "actor" / "model.safetensors"))
    assert any(".mtp_layers.0." in k for k in weights)


def test_reward_rises_on_a_learnable_toy_reward(ray_local, tmp_path):
    history = fit_run(load_config(overrides(
        tmp_path, "trainer.total_training_steps=24", f"custom_reward_function.path={SEVENS}",
        "reward_model.reward_manager=naive", "reward_model.overlong_buffer.enable=false",
        "actor_rollout_ref.actor.optim.lr=3e-3", "actor_rollout_ref.rollout.n=8",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8")))
    scores = [h["critic/score/mean"] for h in history]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 0.05 and last > 2 * first, scores


class _FakeGroup:
    def __init__(self, pairs):
        self.pairs = pairs

    def call(self, method, *args):
        assert method == "sync_colocated"
        return self.pairs


def test_stale_rollout_weights_stop_the_run():
    trainer = object.__new__(DAPOTrainer)
    trainer.version = 0
    trainer.actor = _FakeGroup([("abc", "abc"), ("abc", "stale")])
    trainer.rollout = ColocatedInProcess(RolloutContext(None, trainer.actor, None, "", None, 0))
    with pytest.raises(WeightSyncError, match="rollout rank 1 holds checksum stale"):
        trainer._sync_weights()
    # an SGLang replica cannot hash its weights: a checked version passes, reported as not checksum-verified
    trainer.actor.pairs = [("abc", "abc"), ("abc", VERSION_CHECKED)]
    assert trainer._sync_weights() == 0.0
    trainer.actor.pairs = [("abc", "abc")] * 2
    assert trainer._sync_weights() == 1.0


def test_prometheus_exporter_serves_the_run(ray_local, tmp_path):
    from tests.observability.scrape import assert_scrape_matches, free_port, watch_run

    port = free_port()
    cfg = load_config(overrides(tmp_path, "trainer.total_training_steps=3", "trainer.prometheus.enable=true",
                                f"trainer.prometheus.port={port}"))
    history, samples = watch_run(f"http://127.0.0.1:{port}/metrics", lambda: fit_run(cfg))
    assert_scrape_matches(samples, history)


def test_server_mode_rollout_over_http_replicas(ray_local, tmp_path):
    history = fit_run(load_config(overrides(
        tmp_path, "trainer.total_training_steps=2", "actor_rollout_ref.rollout.mode=server",
        "actor_rollout_ref.hybrid_engine=false", "actor_rollout_ref.rollout.server.num_replicas=2",
        "actor_rollout_ref.rollout.server.base_port=0")))
    assert len(history) == 2 and history[-1]["trainer/weight_version"] == 2.0
    assert "rollout/accept_length" in history[-1]
