"""rollout.mode=server end to end: two server replicas as separate processes on 127.0.0.1, the trainer's
ServerRollout in front (load balancer, WorkerGroup surface), speculative generation equal to the
in-process engine, weight sync through the protocol, the stale-draft guard, dead replicas."""

import dataclasses

import pytest
import torch

from tests.conftest import toy_config
from tests.rollout.conftest import engine_for
from verl_mtp.models import MTPCausalLM, state_checksum
from verl_mtp.rollout import SamplingParams
from verl_mtp.rollout.client import LeastOutstanding, ReplicaClient, ReplicaError, ServerRollout
from verl_mtp.rollout.sglang import StaleDraftError, StaleDraftGuard

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [10], [11, 12], [13, 14, 15], [7, 7, 2]]
SPEC_ARGS = ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "2", "--context-length", "128"]
GREEDY = SamplingParams(n=2, temperature=0, max_new_tokens=20, stop_token_ids=[3])


@pytest.fixture(scope="module")
def rollout(folder, tmp_path_factory):
    group = ServerRollout.launch(folder, 2, lambda validate, seed: dataclasses.replace(GREEDY, seed=seed),
                                 server_args=SPEC_ARGS, startup_timeout=120, timeout=60,
                                 log_dir=str(tmp_path_factory.mktemp("servers")))
    yield group
    group.shutdown()
    assert all(p.proc.poll() is not None for p in group.processes)  # the servers it started are gone


def _served(group):
    return [ReplicaClient(u).request("GET", "/get_server_info")["generate_requests"] for u in group.urls]


def test_replicas_are_separate_localhost_processes(rollout):
    assert len(rollout) == 2 and len({p.proc.pid for p in rollout.processes}) == 2
    assert all(u.startswith("http://127.0.0.1:") for u in rollout.urls) and len(set(rollout.urls)) == 2


def test_shards_equal_the_in_process_engine(rollout, models):
    shards = [PROMPTS[0::2], PROMPTS[1::2]]
    before = _served(rollout)
    outs = rollout.call_shards("generate", shards, validate=False, seed=11)
    assert [b - a for a, b in zip(before, _served(rollout))] == [1, 1]  # the balancer used both replicas
    for shard, (samples, metrics) in zip(shards, outs):
        ref = engine_for(models[0]).generate(shard, GREEDY)
        assert samples == [(s.prompt_index, s.token_ids, s.logprobs, s.finish_reason) for s in ref.samples]
        own = ("rollout/tokens_per_s", "rollout/sync_checksum_verified")
        assert {k: v for k, v in metrics.items() if k not in own} == ref.stats.metrics()
        assert metrics["rollout/accept_length"] > 2.0 and metrics["rollout/tokens_per_s"] > 0
        assert metrics["rollout/sync_checksum_verified"] == 1.0  # our server reports checksums of what it holds
    assert [len(s) for s, _ in outs] == [len(shard) * GREEDY.n for shard in shards]


def test_weight_sync_through_the_protocol(rollout, models):
    baseline, _ = rollout.generate(PROMPTS, seed=1)
    torch.manual_seed(5)
    fresh = MTPCausalLM(toy_config()).state_dict()
    assert rollout.call("update_rollout_weights", fresh, 1) == [state_checksum(fresh.items())] * 2
    assert [ReplicaClient(u).request("GET", "/get_model_info")["weight_version"] for u in rollout.urls] == ["1", "1"]
    changed, _ = rollout.generate(PROMPTS, seed=1)
    assert [s[1] for s in changed] != [s[1] for s in baseline]
    good = models[0].state_dict()
    assert rollout.update_rollout_weights(good, 2) == state_checksum(good.items())
    assert rollout.generate(PROMPTS, seed=1)[0] == baseline


def test_stale_draft_guard_stops_the_run(rollout, models):
    """A sync that leaves target and draft disagreeing (here: MTP layers refit to another chain) collapses
    acceptance to ~1.0 on the next batch; the guard names the sync instead of letting rollout slow down."""
    guarded = ServerRollout(rollout.urls, lambda validate, seed: dataclasses.replace(GREEDY, n=4, seed=seed),
                            guard=StaleDraftGuard(), timeout=60)
    try:
        _, metrics = guarded.generate(PROMPTS)
        assert guarded.guard.baseline == pytest.approx(metrics["rollout/accept_length"]) and metrics[
            "rollout/accept_length"] > 2.0
        guarded.update_rollout_weights(models[1].state_dict(), 3)
        with pytest.raises(StaleDraftError, match="after weight sync v3.*not refreshed"):
            guarded.generate(PROMPTS)
        guarded.update_rollout_weights(models[0].state_dict(), 4)
        _, metrics = guarded.generate(PROMPTS)
        assert metrics["rollout/accept_length"] > 2.0
    finally:
        guarded.shutdown()  # it started no process: the module's replicas stay up


def test_a_dead_replica_gives_an_error_naming_it(folder, tmp_path):
    group = ServerRollout.launch(folder, 1, lambda validate, seed: GREEDY, startup_timeout=120, timeout=30,
                                 log_dir=str(tmp_path))
    try:
        (url,) = group.urls
        group.processes[0].proc.kill()
        group.processes[0].proc.wait(10)
        with pytest.raises(ReplicaError, match=f"rollout server {url} did not answer POST /generate.*still running"):
            group.generate(PROMPTS)
        with pytest.raises(ReplicaError, match=url):
            group.update_rollout_weights({"x": torch.zeros(1)}, 1)
    finally:
        group.shutdown()


def test_a_replica_that_cannot_start_says_why(tmp_path):
    with pytest.raises(ReplicaError, match=r"exited with code \d+ during startup(.|\n)*no config.json"):
        ServerRollout.launch(str(tmp_path / "missing"), 1, lambda validate, seed: GREEDY, startup_timeout=120,
                             log_dir=str(tmp_path / "servers"))


def test_least_outstanding_balancer():
    lb = LeastOutstanding(3)
    with lb.pick() as a, lb.pick() as b, lb.pick() as c:
        assert sorted([a, b, c]) == [0, 1, 2]  # all busy once before any gets a second request
        with lb.pick() as d:
            assert lb.outstanding[d] == 2
    assert lb.outstanding == [0, 0, 0]
    with lb.pick() as first:
        pass
    with lb.pick() as second:
        assert second != first  # ties rotate
