"""Colocated server mode on local Ray (hybrid_engine with rollout.mode=server): the actor ranks start the
rollout replicas as their own children, send the weights from their own processes, and the replicas sleep
(release their memory) while the actor trains and wake for the sync; the SGLang variant on GPUs."""

import itertools
import os

import pytest
import torch

from tests.conftest import toy_config, needs_sglang
from tests.trainer.conftest import overrides
from verl_mtp.config import load_config
from verl_mtp.models import MTPCausalLM
from verl_mtp.rollout.client import ReplicaClient
from verl_mtp.trainer.ray_trainer import DAPOTrainer

ARR = "actor_rollout_ref."
SERVER = ARR + "rollout.server."
WEIGHT_PATHS = ("/update_weights_from_tensor", "/update_weights_from_distributed")


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _expected_events(steps: int) -> list[str]:
    """Per replica: the initial sync (trunk, then draft carrying version 0), then each step generates,
    sleeps, wakes its weights, takes trunk and draft, wakes its KV cache."""
    events = ["update_weights:default", "update_weights:0"]
    for v in range(1, steps + 1):
        events += ["generate", "release:kv_cache,weights", "resume:weights", f"update_weights:{v - 1}",
                   f"update_weights:{v}", "resume:kv_cache"]
    return events


def test_dapo_with_replicas_hosted_and_fed_by_the_actor_ranks(ray_local, tmp_path, monkeypatch):
    driver_requests = []  # every HTTP call the driver (this process) makes to a replica
    request = ReplicaClient.request

    def recorded(self, method, path, body=None, timeout=None):
        driver_requests.append(path)
        return request(self, method, path, body, timeout)

    monkeypatch.setattr(ReplicaClient, "request", recorded)
    steps = 3
    cfg = load_config(overrides(
        tmp_path, f"trainer.total_training_steps={steps}", "trainer.n_gpus_per_node=2", f"{ARR}hybrid_engine=true",
        f"{ARR}rollout.mode=server", f"{ARR}rollout.name=native", f"{ARR}rollout.tensor_model_parallel_size=1",
        f"{SERVER}num_replicas=2", f"{SERVER}base_port=0"))
    trainer = DAPOTrainer(cfg)
    try:
        history = trainer.fit()
        assert [h["trainer/weight_version"] for h in history] == [1.0, 2.0, 3.0]
        assert "rollout/accept_length" in history[-1] and "timing_s/rollout_sleep" in history[-1]
        # two data-parallel actor ranks, each the parent of one replica: four separate processes
        actor_pids = trainer.actor.call("pid")
        server_pids = trainer.actor.call("rollout_server_pid")
        assert len({os.getpid(), *actor_pids, *server_pids}) == 5
        assert [_parent_pid(p) for p in server_pids] == actor_pids
        assert len(trainer.rollout) == 2 and not trainer.rollout.processes  # the driver started none
        # the weights came from the actor ranks: the driver never sent any, yet every replica took 4 syncs
        assert not set(WEIGHT_PATHS) & set(driver_requests) and "/generate" in driver_requests
        # what matters: each replica, fed by its own actor rank, holds exactly the actor's weights (rank 0
        # answers for the actor; the other ranks only join the gathers and hash nothing)
        answers = trainer.actor.call("weights_meta")
        (_, sent), rest = answers[0], answers[1:]
        assert sent is not None and rest == [None]
        for url in trainer.rollout.urls:
            client = ReplicaClient(url, timeout=30)
            model = client.request("GET", "/get_model_info")
            assert (model["weight_version"], model["weights_checksum"]) == (str(steps), sent)
            info = client.request("GET", "/get_server_info")
            assert info["weight_updates"] == 2 * (steps + 1) and info["memory_released"] == []
            assert (info["memory_releases"], info["memory_resumes"]) == (steps, 2 * steps)
            events = [e for e, _ in itertools.groupby(info["recent_events"])]  # one "generate" per run of them
            assert events == _expected_events(steps)
    finally:
        trainer.shutdown()
    assert not any(ReplicaClient(u).healthy(timeout=1) for u in trainer.rollout.urls)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in server_pids)  # stopped and reaped by their ranks


@pytest.mark.gpu
@needs_sglang
def test_gpu_dapo_with_sglang_hosted_by_the_actor_rank(ray_local, tmp_path):
    """One GPU shared by the actor and an SGLang replica it started: CUDA IPC weight sync of trunk and MTP
    layer, memory released and resumed around every update."""
    from verl_mtp.data.synthetic_math import iter_corpus_text
    from verl_mtp.data.tokenizer import train_tokenizer
    from verl_mtp.trainer.setup import load_tokenizer

    folder = tmp_path / "model"
    train_tokenizer(iter_corpus_text(20000, seed=0), str(folder))
    torch.manual_seed(0)
    vocab = len(load_tokenizer(str(folder)))
    MTPCausalLM(toy_config(vocab_size=vocab, num_nextn_predict_layers=1)).save_pretrained(folder)
    cfg = load_config(overrides(
        tmp_path, "trainer.total_training_steps=2", "trainer.device=cuda", "trainer.n_gpus_per_node=1",
        f"{ARR}model.path={folder}", f"{ARR}hybrid_engine=true", f"{ARR}rollout.mode=server",
        f"{ARR}rollout.name=sglang", f"{ARR}rollout.tensor_model_parallel_size=1", f"{ARR}rollout.dtype=float32",
        f"{ARR}model.mtp.speculative_num_steps=1", f"{SERVER}base_port=0"))
    trainer = DAPOTrainer(cfg)
    try:
        history = trainer.fit()
        assert [h["trainer/weight_version"] for h in history] == [1.0, 2.0]
        (url,) = trainer.rollout.urls
        assert ReplicaClient(url, timeout=60).request("GET", "/get_model_info")["weight_version"] == "2"
        (actor_pid,), (server_pid,) = trainer.actor.call("pid"), trainer.actor.call("rollout_server_pid")
        assert _parent_pid(server_pid) == actor_pid
    finally:
        trainer.shutdown()
    assert not ReplicaClient(url).healthy(timeout=1)
