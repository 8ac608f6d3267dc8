"""DAPO on local Ray with strategy=megatron over gloo: tensor, context and pipeline parallel through the whole
trainer.

Every weight sync and checkpoint gathers the shards collectively (a gather called on rank 0 alone waits
for its peers forever), each rank saves its own optimizer shard, and a driver that dies after step 1's
checkpoint, restarted with resume_mode=auto, ends where the uninterrupted run does (checked at pp2): same
metrics at every step, same weights bit for bit. K=2 MTP layers are trained (detached, scaled) throughout."""

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("megatron.core")

from verl_mtp.config import load_config  # noqa: E402
from verl_mtp.trainer.ray_trainer import DAPOTrainer  # noqa: E402
from tests.trainer.conftest import fit_run, overrides  # noqa: E402

ACTOR = "actor_rollout_ref.actor."
COMMON = ("trainer.save_freq=1", f"{ACTOR}strategy=megatron", "actor_rollout_ref.model.mtp.num_layers=2",
          "actor_rollout_ref.model.mtp.speculative_num_steps=1",
          "actor_rollout_ref.model.mtp.mtp_loss_scaling_factor=0.3")
VOLATILE = ("timing_s/", "rollout/tokens_per_s", "rollout/depth_rounds")


class DriverDies(RuntimeError):
    pass


class DiesAfterFirstCheckpoint(DAPOTrainer):
    """The driver dies as step 2 begins, its step-1 checkpoint written (fit_run then releases its workers)."""

    def train_step(self):
        if self.step == 1:
            raise DriverDies
        return super().train_step()


def _weights(run, step):
    return load_file(str(run / "ckpt" / f"global_step_{step}" / "actor" / "model.safetensors"))


LAYOUTS = {
    # split mode (rank 0's get_weights feeds the rollout worker, both ranks gather); megatron's dist_checkpointing
    "tp2": ("trainer.n_gpus_per_node=2", "actor_rollout_ref.hybrid_engine=false",
            f"{ACTOR}megatron.tensor_model_parallel_size=2", f"{ACTOR}megatron.use_dist_checkpointing=true"),
    # colocated (each rank's rollout copy is refreshed from the gathered weights); per-rank optimizer files
    "cp2": ("trainer.n_gpus_per_node=2", f"{ACTOR}megatron.context_parallel_size=2"),
    # colocated, megatron's 1F1B schedule: the trunk over two stages, the MTP layers on the last
    "pp2": ("trainer.n_gpus_per_node=2", f"{ACTOR}megatron.pipeline_model_parallel_size=2"),
}


def _assert_each_rank_saved_its_shards(actor, layout):
    if layout == "tp2":  # dist_checkpointing: every rank wrote its own shard files
        assert {p.name[:3] for p in (actor / "dist_ckpt").glob("*.distcp")} == {"__0", "__1"}
        assert not list(actor.glob("optimizer_rank*.pt"))
        return
    files = sorted(actor.glob("optimizer_rank*.pt"))
    shards = [torch.load(f, weights_only=True)["optimizer"]["state"] for f in files]
    if layout == "pp2":  # each stage steps its own layers: the first has no MTP layers, the last holds them
        assert 0 < len(shards[0]) < len(shards[1])
        return
    # the CP ranks' Adam moments are replicas (gradients all-reduced over the CP group); megatron numbers TP
    # ranks first, so rank r's CP peer is r + TP
    tp = len(files) // 2
    for r in range(tp):
        pairs = zip(shards[r].values(), shards[r + tp].values())
        assert all(torch.equal(a["exp_avg"], b["exp_avg"]) for a, b in pairs)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_megatron_trains_saves_on_every_rank_and_a_killed_driver_resumes_exactly(ray_local, tmp_path, layout):
    args = (*COMMON, *LAYOUTS[layout])
    full = fit_run(load_config(overrides(tmp_path / "a", "trainer.total_training_steps=2", *args)))
    assert all(h["mtp/loss_1"] > 0 and h["mtp/loss_2"] > 0 for h in full)
    # the kill and resume run once, at pp2 (per-rank optimizer files, cp2's format too); tp2's dist_checkpointing
    # shards are checked here and reloaded (at tp2 -> tp1) by test_megatron_engine's dist-checkpoint test
    if layout != "pp2":
        _assert_each_rank_saved_its_shards(tmp_path / "a" / "ckpt" / "global_step_1" / "actor", layout)
        return
    with pytest.raises(DriverDies):
        fit_run(DiesAfterFirstCheckpoint(load_config(overrides(tmp_path / "b", "trainer.total_training_steps=2",
                                                               *args))))
    _assert_each_rank_saved_its_shards(tmp_path / "b" / "ckpt" / "global_step_1" / "actor", layout)
    resumed = fit_run(load_config(overrides(tmp_path / "b", "trainer.total_training_steps=2", *args)))
    assert len(resumed) == 2  # step 1 from the checkpoint, step 2 trained after the restart
    for a, b in zip(full, resumed):
        assert {k: v for k, v in b.items() if not k.startswith(VOLATILE)} == \
               {k: v for k, v in a.items() if not k.startswith(VOLATILE)}
    wa, wb = _weights(tmp_path / "a", 2), _weights(tmp_path / "b", 2)
    assert any(".mtp_layers.1." in k for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
