"""The sender hashes the weights it sends only where the receiver can report a checksum of what it holds
(our server); for SGLang, which answers VERSION_CHECKED, a full host-side hash per sync would buy nothing."""

from __future__ import annotations

import pytest

from verl_mtp.workers.rollout_backends import SplitServer


class RecordingActor:
    """A worker group that records the calls a backend makes and answers like an actor with one tensor."""

    def __init__(self):
        self.calls = []

    def call(self, method, *args):
        self.calls.append((method, args))
        hashed = args[-1]
        if method == "weights_meta":
            return [([("w", "float32", [2])], "abc" if hashed else None)]
        return [({"w": None}, "abc" if hashed else None)]


class RecordingServer:
    def __init__(self, mode):
        self.sync_mode = mode

    def call(self, method, *args, **kwargs):
        return ["version-checked + acceptance guard"]


@pytest.mark.parametrize("mode", ["tensor", "distributed"])
@pytest.mark.parametrize("name,hashed", [("sglang", False), ("native", True)])
def test_split_server_sync_hashes_only_for_a_server_that_reports_a_checksum(monkeypatch, mode, name, hashed):
    monkeypatch.setattr("verl_mtp.workers.rollout_backends.ray.put", lambda x: x)
    backend = SplitServer.__new__(SplitServer)  # its replicas are not needed to see what it asks the actor for
    backend.server, backend.hashed = RecordingServer(mode), name == "native"
    actor = RecordingActor()
    pairs = backend.sync_from(actor, version=3)
    assert [(m, a[-1]) for m, a in actor.calls] == [("get_weights" if mode == "tensor" else "weights_meta", hashed)]
    assert pairs[0][0] == ("abc" if hashed else None)


class RecordingGroup:
    def __init__(self):
        self.calls = []

    def call(self, method, *args):
        self.calls.append((method, args))


def test_training_expectation_reaches_in_process_engines_and_not_servers():
    from types import SimpleNamespace

    from verl_mtp.trainer.ray_trainer import DAPOTrainer
    from verl_mtp.workers.rollout_backends import ColocatedInProcess

    colocated = ColocatedInProcess.__new__(ColocatedInProcess)
    colocated.actor = RecordingGroup()
    server = SplitServer.__new__(SplitServer)
    server.server = RecordingGroup()
    metrics = {"mtp/expected_chain_accept_rate_1": 0.9, "mtp/expected_chain_accept_rate_2": 0.7, "actor/lr": 1.0}
    for steps, backend, calls in (("auto", colocated, [("set_acceptance_prior", ([0.9, 0.7],))]),
                                  ("auto", server, []), (2, colocated, [])):
        backend.generators.calls.clear()
        driver = SimpleNamespace(rollout=backend, cfg=SimpleNamespace(actor_rollout_ref=SimpleNamespace(
            model=SimpleNamespace(mtp=SimpleNamespace(speculative_num_steps=steps)))))
        DAPOTrainer._pass_acceptance_prior(driver, metrics)
        assert backend.generators.calls == calls


def test_colocated_payloads_follow_the_rollout_config():
    """SGLang: one flattened-bucket entry per tensor-parallel rank, each built by the actor rank on that
    rank's GPU; our CPU server: one base64 safetensors entry from the hosting rank. Buckets: verl's key."""
    from verl_mtp.config import load_config
    from verl_mtp.rollout.client import bucket_bytes, native_entry
    from verl_mtp.rollout.sglang import sglang_tensor_payload
    from verl_mtp.workers.rollout_backends import push_encoding

    from tests.rollout.test_sglang_launch import CLUSTER_RECIPE, recipe_overrides

    r = "actor_rollout_ref.rollout."
    sglang = load_config(recipe_overrides(CLUSTER_RECIPE) + [f"{r}update_weights_bucket_megabytes=64"],
                         config_name="ppo_megatron_trainer").actor_rollout_ref.rollout  # TP 4
    assert push_encoding(sglang) == (sglang_tensor_payload, "flattened_bucket", 4)
    assert bucket_bytes(sglang) == 64 << 20
    native = load_config([f"{r}tensor_model_parallel_size=2"]).actor_rollout_ref.rollout
    assert push_encoding(native) == (native_entry, "safetensors_base64", 1) and bucket_bytes(native) == 512 << 20
    with pytest.raises(ValueError, match="key 'actor_rollout_ref.rollout.update_weights_bucket_megabytes': "
                                         "expected an integer >= 1, got 0"):
        bucket_bytes(load_config([f"{r}update_weights_bucket_megabytes=0"]).actor_rollout_ref.rollout)
