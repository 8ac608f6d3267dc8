"""DAPO on local Ray with strategy=fsdp2 at 2 actor ranks (gloo): the sharded engine through the whole
trainer (colocated rollout synced from gathered weights, checkpoints of per-rank shards), and a killed
run resumed from its checkpoint reproduces the uninterrupted one."""

import torch
from safetensors.torch import load_file

from verl_mtp.config import load_config
from tests.trainer.conftest import fit_run, overrides

FSDP2 = ("actor_rollout_ref.actor.strategy=fsdp2", "trainer.n_gpus_per_node=2", "trainer.save_freq=1",
         "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
         "actor_rollout_ref.model.mtp.speculative_num_steps=1",
         "actor_rollout_ref.model.enable_gradient_checkpointing=true")


def test_fsdp2_two_ranks_train_checkpoint_and_resume_exactly(ray_local, tmp_path):
    full = fit_run(load_config(overrides(tmp_path / "a", "trainer.total_training_steps=2", *FSDP2)))
    fit_run(load_config(overrides(tmp_path / "b", "trainer.total_training_steps=1", *FSDP2)))
    saved = tmp_path / "b" / "ckpt" / "global_step_1" / "actor"
    assert sorted(p.name for p in saved.glob("optimizer_rank*.pt")) == ["optimizer_rank0.pt", "optimizer_rank1.pt"]
    resumed = fit_run(load_config(overrides(tmp_path / "b", "trainer.total_training_steps=2", *FSDP2)))
    assert len(resumed) == 2  # step 1 restored from the checkpoint, step 2 trained after the resume
    assert full[0]["actor/param_bytes_local"] * 2 == full[0]["actor/param_bytes_total"]
    volatile = ("timing_s/", "rollout/tokens_per_s", "rollout/depth_rounds")
    for a, b in zip(full, resumed):
        for k, v in a.items():
            if not k.startswith(volatile):
                assert b[k] == v, k
    wa, wb = (load_file(str(tmp_path / run / "ckpt" / "global_step_2" / "actor" / "model.safetensors"))
              for run in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
