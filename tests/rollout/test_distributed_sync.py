"""The split weight path of our server for real: /init_weights_update_group and
/update_weights_from_distributed over HTTP, two server processes joining a gloo group with this test
process as the trainer (rank 0), which broadcasts the tensors; bad bodies refused naming the field."""

import dataclasses

import pytest
import torch

from tests.conftest import toy_config
from verl_mtp.models import MTPCausalLM, state_checksum
from verl_mtp.rollout import NativeEngine, SamplingParams
from verl_mtp.rollout.client import ReplicaClient, ReplicaError, ServerRollout, run_plan
from verl_mtp.net import free_port
from verl_mtp.rollout.server import RolloutServer
from verl_mtp.rollout.sglang import WEIGHT_GROUP_NAME, SyncCall, weight_update_group
from verl_mtp.rollout.weight_group import broadcast_tensors, join_weight_group, leave_weight_group

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [10], [11, 12]]
GREEDY = SamplingParams(temperature=0, max_new_tokens=12)


class Trainer:
    """Rank 0 of the weight group in this process: the actor's part in a training run."""

    def __init__(self, named):
        self.named, self.group, self.sent = dict(named), None, []

    def join(self, group: dict) -> None:
        if self.group is not None:
            leave_weight_group(self.group)
        self.group = join_weight_group(group["master_address"], group["master_port"], 0, group["world_size"],
                                       WEIGHT_GROUP_NAME, group["backend"], timeout=60)

    def broadcast(self, names) -> None:
        broadcast_tensors(self.group, [self.named[n] for n in names], "gloo")
        self.sent += names

    def leave(self) -> None:
        if self.group is not None:
            leave_weight_group(self.group)


# ---- bad bodies: refused at once, naming the field, nothing changed -----------------------------------


@pytest.fixture(scope="module")
def served():
    torch.manual_seed(0)
    engine = NativeEngine(MTPCausalLM(toy_config()), max_batch_size=8, max_seq_len=64)
    server = RolloutServer(engine, "toy", port=0).start()
    yield ReplicaClient(server.url, timeout=30)
    server.shutdown()


INIT = {"master_address": "127.0.0.1", "master_port": 29999, "rank_offset": 1, "world_size": 3,
        "group_name": "g", "backend": "gloo"}
UPDATE = {"names": ["lm_head.weight"], "dtypes": ["float32"], "shapes": [[64, 32]], "group_name": "g"}


@pytest.mark.parametrize("path, body, needle", [
    ("init", {}, "field 'master_address' is required"),
    ("init", {**INIT, "master_port": "29999"}, "field 'master_port' must be int, got '29999'"),
    ("init", {**INIT, "master_port": 70000}, "field 'master_port' is not a usable address"),
    ("init", {**INIT, "world_size": True}, "field 'world_size' must be int"),
    ("init", {**INIT, "rank_offset": 0}, "field 'rank_offset' must be in 1..world_size-1 (rank 0 is the trainer)"),
    ("init", {**INIT, "rank_offset": 3}, "field 'rank_offset' must be in 1..world_size-1"),
    ("init", {**INIT, "backend": "nccl"}, "field 'backend' must be one of gloo on this CPU server, got 'nccl'"),
    ("update", {}, "field 'names' is required"),
    ("update", {**UPDATE, "names": "lm_head.weight"}, "field 'names' must be list"),
    ("update", {**UPDATE, "names": [3]}, "field 'names' must list tensor names"),
    ("update", {**UPDATE, "dtypes": []}, "field 'dtypes' has 0 entries for 1 names"),
    ("update", {**UPDATE, "shapes": [[64, 32], [1]]}, "field 'shapes' has 2 entries for 1 names"),
    ("update", {**UPDATE, "dtypes": ["float99"]}, "field 'dtypes': 'float99' is not a torch dtype name"),
    ("update", {**UPDATE, "shapes": [[64, -1]]}, "field 'shapes': [64, -1] is not a list of sizes"),
    ("update", UPDATE, "field 'group_name': no weight group 'g'; POST /init_weights_update_group first"),
])
def test_bad_bodies_name_the_field(served, path, body, needle):
    endpoint = {"init": "/init_weights_update_group", "update": "/update_weights_from_distributed"}[path]
    checksum = served.request("GET", "/get_model_info")["weights_checksum"]
    served.request("POST", "/begin_weight_update", {})  # SGLang 0.5.23: updates only inside a session
    with pytest.raises(ReplicaError, match="HTTP 400") as info:
        served.request("POST", endpoint, body)
    served.request("POST", "/end_weight_update", {})
    assert f"{endpoint[1:]}: {needle}" in str(info.value)
    assert served.request("GET", "/get_model_info")["weights_checksum"] == checksum
    assert served.request("GET", "/get_server_info")["weight_update_groups"] == {}


# ---- real transfer: two server processes, gloo broadcast from this process ----------------------------


def test_weights_travel_by_broadcast_to_both_replicas(folder, models, tmp_path):
    torch.manual_seed(5)
    fresh = MTPCausalLM(toy_config()).state_dict()
    trainer = Trainer(fresh.items())
    group = weight_update_group("127.0.0.1", free_port(), num_replicas=2, ranks_per_replica=1, backend="gloo")
    rollout = ServerRollout.launch(folder, 2, lambda validate, seed: dataclasses.replace(GREEDY, seed=seed),
                                   startup_timeout=120, timeout=60, sync_mode="distributed", init_group=group,
                                   log_dir=str(tmp_path),
                                   join_group=lambda: trainer.join(group), broadcast=trainer.broadcast)
    try:
        baseline, _ = rollout.generate(PROMPTS)
        # only dtypes and shapes reach the driver side of the plan: the tensors go over the group
        meta = {n: torch.empty_like(t, device="meta") for n, t in fresh.items()}
        sent = state_checksum(fresh.items())
        # the checksums are the servers' own (computed from what they hold), not `sent` echoed back
        assert rollout.call("update_rollout_weights", meta, 1) == [sent, sent]
        assert sorted(trainer.sent) == sorted(fresh) and rollout.init_group is None  # init with the first sync only
        for rank, url in enumerate(rollout.urls, start=1):
            client = ReplicaClient(url)
            info = client.request("GET", "/get_server_info")
            assert info["weight_update_groups"] == {WEIGHT_GROUP_NAME: {"rank": rank, "world_size": 3,
                                                                        "backend": "gloo"}}
            assert info["tensors_received_by_broadcast"] == len(fresh)
            model_info = client.request("GET", "/get_model_info")
            assert (model_info["weight_version"], model_info["weights_checksum"]) == ("1", sent)
        changed, _ = rollout.generate(PROMPTS)
        assert [s[1] for s in changed] != [s[1] for s in baseline]

        # the next sync reuses the group; back to the original weights, back to the original output
        trainer.named = dict(models[0].state_dict())
        assert rollout.update_rollout_weights(trainer.named, 2) == state_checksum(trainer.named.items())
        assert rollout.generate(PROMPTS)[0] == baseline

        # a refused tensor is still received (the group stays in step), and nothing is applied
        trainer.named["model.nope"] = torch.zeros(2)
        bad = SyncCall("POST", "/update_weights_from_distributed",
                       {"names": ["lm_head.weight", "model.nope"], "dtypes": ["float32", "float32"],
                        "shapes": [list(fresh["lm_head.weight"].shape), [2]], "weight_version": "3"},
                       broadcast=("lm_head.weight", "model.nope"))
        session = [SyncCall("POST", "/begin_weight_update", {}), bad, SyncCall("POST", "/end_weight_update", {})]
        with pytest.raises(ReplicaError, match="unknown tensor 'model.nope'"):
            run_plan(rollout.clients, session, trainer.broadcast)
        run_plan(rollout.clients, session[2:])
        del trainer.named["model.nope"]
        assert rollout.update_rollout_weights(trainer.named, 4) == state_checksum(trainer.named.items())
        assert [ReplicaClient(u).request("GET", "/get_model_info")["weight_version"] for u in rollout.urls] == ["4"] * 2

        # a second init (a restarted trainer) replaces the group
        rollout.init_group = group = weight_update_group("127.0.0.1", free_port(), 2, 1, backend="gloo")
        trainer.named = dict(fresh)
        assert rollout.update_rollout_weights(meta, 5) == sent
        assert ReplicaClient(rollout.urls[1]).request("GET", "/get_server_info")["weight_update_groups"][
            WEIGHT_GROUP_NAME]["rank"] == 2
    finally:
        rollout.shutdown()
        trainer.leave()
