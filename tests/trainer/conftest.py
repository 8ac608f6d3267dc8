import pytest
import ray


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for all trainer tests (each trainer creates and removes its own workers)."""
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def fit_run(trainer):
    """Run a DAPOTrainer (or build one from a config) to the end, and always release its workers."""
    if not hasattr(trainer, "fit"):
        from verl_mtp.trainer.ray_trainer import DAPOTrainer

        trainer = DAPOTrainer(trainer)
    try:
        return trainer.fit()
    finally:
        trainer.shutdown()


def overrides(tmp_path, *extra):
    """A tiny, fast CPU run in tmp_path."""
    return [f"trainer.log_dir={tmp_path}/run", f"trainer.default_local_dir={tmp_path}/ckpt",
            "trainer.logger=[jsonl]", "trainer.val_before_train=false", "trainer.test_freq=-1",
            "trainer.save_freq=-1", "data.train_batch_size=4", "data.max_response_length=24",
            "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4", "reward_model.num_workers=1", *extra]
