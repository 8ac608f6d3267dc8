"""Server mode on local Ray with the split weight path: the actor's rank 0 broadcasts over a gloo group
that two native replicas joined, the replicas started by the Ray launcher (one Ray actor per replica);
and the launcher itself (URLs, processes, placement), with the SGLang variant on GPUs."""

import os

import pytest
import ray
import torch

from tests.conftest import toy_config, needs_sglang
from tests.trainer.conftest import overrides
from verl_mtp.config import load_config
from verl_mtp.models import MTPCausalLM
from verl_mtp.rollout.client import ReplicaClient, ReplicaError
from verl_mtp.rollout.sglang import WEIGHT_GROUP_NAME
from verl_mtp.trainer.ray_trainer import DAPOTrainer

SERVER = "actor_rollout_ref.rollout.server."


def test_dapo_with_weights_broadcast_over_gloo_to_ray_launched_replicas(ray_local, tmp_path):
    cfg = load_config(overrides(
        tmp_path, "trainer.total_training_steps=2", "actor_rollout_ref.rollout.mode=server",
        "actor_rollout_ref.hybrid_engine=false", "actor_rollout_ref.rollout.name=native",
        f"{SERVER}sync_mode=distributed", f"{SERVER}num_replicas=2",
        f"{SERVER}base_port=0", f"{SERVER}launcher=ray"))
    trainer = DAPOTrainer(cfg)
    try:
        history = trainer.fit()
        assert len(history) == 2 and history[-1]["trainer/weight_version"] == 2.0
        assert "rollout/accept_length" in history[-1]
        meta, sent = trainer.actor.call_rank0("weights_meta")  # the actor's weights after the last update
        actor_pid = trainer.actor.call_rank0("pid")
        server_pids = [ray.get(p.host.server_pid.remote()) for p in trainer.rollout.processes]
        assert len({actor_pid, os.getpid(), *server_pids}) == 4  # trainer rank 0 and two replicas: own processes
        for rank, url in enumerate(trainer.rollout.urls, start=1):
            client = ReplicaClient(url, timeout=30)
            model = client.request("GET", "/get_model_info")
            assert (model["weight_version"], model["weights_checksum"]) == ("2", sent)
            info = client.request("GET", "/get_server_info")
            assert info["weight_update_groups"] == {WEIGHT_GROUP_NAME: {"rank": rank, "world_size": 3,
                                                                        "backend": "gloo"}}
            # the initial sync and one per step, each trunk then draft, every tensor through the group
            assert info["weight_updates"] == 3 * 2 and info["tensors_received_by_broadcast"] == 3 * len(meta)
    finally:
        trainer.shutdown()
    assert not any(ReplicaClient(u).healthy(timeout=1) for u in trainer.rollout.urls)


# ---- the Ray launcher ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("toy")
    MTPCausalLM(toy_config()).save_pretrained(path)
    return str(path)


def test_ray_launcher_one_actor_per_replica_reachable_by_node_ip(ray_local, toy_folder, tmp_path):
    from verl_mtp.rollout.ray_launch import launch_replicas_on_ray

    cfg = load_config(["actor_rollout_ref.rollout.mode=server", "actor_rollout_ref.hybrid_engine=false",
                       f"{SERVER}num_replicas=2", f"{SERVER}base_port=0", f"{SERVER}host=0.0.0.0",
                       f"{SERVER}launcher=ray"])
    replicas = launch_replicas_on_ray(cfg, toy_folder, log_dir=str(tmp_path / "logs"), startup_timeout=120)
    try:
        node_ip = ray.util.get_node_ip_address()
        urls = [r.url for r in replicas]
        assert all(u.startswith(f"http://{node_ip}:") for u in urls) and len(set(urls)) == 2  # not 0.0.0.0
        assert all(ReplicaClient(u).request("GET", "/get_model_info")["model_path"] == toy_folder for u in urls)
        pids = [ray.get(r.host.server_pid.remote()) for r in replicas]
        assert len(set(pids)) == 2 and all(os.path.exists(f"/proc/{pid}") for pid in pids)
        assert [ray.get(r.host.node_ip.remote()) for r in replicas] == [node_ip] * 2
        assert all((tmp_path / "logs" / f"replica{i}" / "replica0.log").exists() for i in range(2))
        # each replica holds its own single-bundle placement group: one CPU, no GPU for our server
        tables = [ray.util.placement_group_table(r.pg) for r in replicas]
        assert [t["bundles"] for t in tables] == [{0: {"CPU": 1.0}}] * 2
        assert all(t["strategy"] == "STRICT_PACK" and t["state"] == "CREATED" for t in tables)
    finally:
        for r in replicas:
            r.stop()
    assert not any(ReplicaClient(u).healthy(timeout=1) for u in urls)


def test_ray_launcher_asks_for_tp_gpus_per_replica_and_says_when_none_come(ray_local, tmp_path):
    """SGLang replicas need tensor_model_parallel_size GPUs of one node; a cluster without them fails
    with the bundle named, not with a hang."""
    from verl_mtp.rollout.ray_launch import launch_replicas_on_ray, replica_commands

    cfg = load_config(["trainer.device=cuda", "trainer.n_gpus_per_node=2", "actor_rollout_ref.rollout.name=sglang",
                       "actor_rollout_ref.rollout.mode=server", "actor_rollout_ref.hybrid_engine=false",
                       "actor_rollout_ref.model.path=/models/m",
                       "actor_rollout_ref.rollout.tensor_model_parallel_size=2", f"{SERVER}num_replicas=2",
                       "actor_rollout_ref.model.mtp.speculative_num_steps=2",
                       f"{SERVER}base_port=0"])
    commands, ports, gpus = replica_commands(cfg, "/models/m", str(tmp_path))
    assert gpus == 2 and ports == [0, 0]
    assert all(c[1:3] == ["-m", "sglang.launch_server"] and "--port" not in c for c in commands)  # picked on the node
    assert all(c[c.index("--base-gpu-id") + 1] == "0" and c[c.index("--tp-size") + 1] == "2" for c in commands)
    if ray.cluster_resources().get("GPU", 0) >= 2:
        pytest.skip("this machine has the GPUs: see the gpu test")
    with pytest.raises(ReplicaError, match=r"rollout replica 0: no node offered \{'CPU': 1, 'GPU': 2\} within 2s"):
        launch_replicas_on_ray(cfg, "/models/m", log_dir=str(tmp_path), placement_timeout=2)
    assert not [pg for pg in ray.util.placement_group_table().values() if pg["state"] == "PENDING"]


@pytest.mark.gpu
@needs_sglang
def test_gpu_ray_launcher_starts_sglang_on_the_node_of_its_gpus(ray_local, tmp_path):
    from verl_mtp.rollout import SamplingParams
    from verl_mtp.rollout.ray_launch import launch_replicas_on_ray

    torch.manual_seed(0)
    MTPCausalLM(toy_config(vocab_size=256, num_nextn_predict_layers=1)).save_pretrained(tmp_path / "model")
    arr = "actor_rollout_ref."
    cfg = load_config(["trainer.device=cuda", "trainer.n_gpus_per_node=1", f"{arr}rollout.name=sglang",
                       f"{arr}rollout.mode=server", f"{arr}rollout.tensor_model_parallel_size=1",
                       f"{arr}hybrid_engine=false", f"{arr}model.path={tmp_path / 'model'}",
                       f"{arr}rollout.load_format=auto",
                       "actor_rollout_ref.model.mtp.speculative_num_steps=1", f"{SERVER}host=0.0.0.0",
                       f"{SERVER}base_port=0"])
    (replica,) = launch_replicas_on_ray(cfg, str(tmp_path / "model"), log_dir=str(tmp_path / "logs"),
                                        startup_timeout=900)
    try:
        assert replica.url.startswith(f"http://{ray.get(replica.host.node_ip.remote())}:")
        items = ReplicaClient(replica.url, timeout=300).generate([[1, 2, 3]], SamplingParams(temperature=0,
                                                                                            max_new_tokens=8))
        assert "spec_verify_ct" in items[0]["meta_info"]
    finally:
        replica.stop()
