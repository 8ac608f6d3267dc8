"""Weight-sync sequencing (colocated tensor path and split process-group path) against a recording fake
SGLang backend on 127.0.0.1, and the stale-draft guard. The real group transport is tested in
test_distributed_sync.py."""

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from verl_mtp.rollout.client import (VERSION_CHECKED, ReplicaClient, ReplicaError, ServerRollout, push_weights,
                                    run_plan)
from verl_mtp.rollout.engine import SpecStats
from verl_mtp.rollout.sampling import SamplingParams
from verl_mtp.rollout.sglang import (SGLANG_VERSIONS, StaleDraftError, StaleDraftGuard, update_buckets,
                                     weight_sync_plan, weight_update_group)

NAMED = [("model.embed_tokens.weight", torch.ones(4, 2)), ("model.layers.0.mlp.up_proj.weight", torch.ones(3, 2)),
         ("model.mtp_layers.0.input_proj.weight", torch.ones(2, 4, dtype=torch.bfloat16)),
         ("lm_head.weight", torch.ones(4, 2))]
TRUNK = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
MTP = ["model.mtp_layers.0.input_proj.weight"]
ORDER = ["/pause_generation", "/begin_weight_update", "/update_weights_from_tensor", "/update_weights_from_tensor",
         "/end_weight_update", "/flush_cache", "/continue_generation", "/model_info"]  # SGLang 0.5.23
# SGLang 0.5.6: no session, and the version recorded after the updates (it drops it while paused)
ORDER_0_5_6 = ["/pause_generation", "/update_weights_from_tensor", "/update_weights_from_tensor",
               "/update_weight_version", "/flush_cache", "/continue_generation", "/model_info"]


def names_of(named):
    return [n for n, _ in named]


# ---- the plan ------------------------------------------------------------------------------------


def test_tensor_plan_pauses_sends_trunk_then_draft_then_flushes():
    encoded = []
    plan = weight_sync_plan(NAMED, 5, "tensor", encode=lambda part: encoded.append(names_of(part)) or ["blob"],
                            load_format="fmt")
    assert [c.path for c in plan] == ORDER and plan[0].body == {"mode": "abort"} and plan[-1].method == "GET"
    assert all(c.body is not None for c in plan if c.method == "POST")  # SGLang declares a body on each
    assert encoded == []  # a bucket is serialized only when its call is sent
    trunk, draft = plan[2].resolved().body, plan[3].resolved().body
    assert encoded == [TRUNK, MTP]
    # the version moves only with the last part, so a half-synced replica never claims the new version
    assert trunk["weight_version"] is None and draft["weight_version"] == "5"
    for body in (trunk, draft):
        assert body["serialized_named_tensors"] == ["blob"] and body["load_format"] == "fmt"
        assert body["flush_cache"] is False and body["selector"] == "all"
    assert all(not c.broadcast for c in plan)


def test_buckets_bound_the_bytes_of_each_update_and_never_mix_trunk_and_draft():
    named = [(f"model.layers.{i}.w", torch.zeros(256 // 4)) for i in range(5)]  # 256 bytes each
    named += [("model.mtp_layers.0.a", torch.zeros(64)), ("model.mtp_layers.0.b", torch.zeros(1000))]
    buckets = [names_of(b) for b in update_buckets(named, 600)]
    assert buckets == [["model.layers.0.w", "model.layers.1.w"], ["model.layers.2.w", "model.layers.3.w"],
                       ["model.layers.4.w"], ["model.mtp_layers.0.a"], ["model.mtp_layers.0.b"]]  # 4000 B alone
    assert [names_of(b) for b in update_buckets(named)] == [names_of(named[:5]), names_of(named[5:])]
    plan = weight_sync_plan(named, 3, "tensor", encode=lambda b: [",".join(names_of(b))], bucket_bytes=600)
    updates = [c.resolved().body for c in plan if c.path == "/update_weights_from_tensor"]
    assert [u["serialized_named_tensors"] for u in updates] == [[",".join(b)] for b in buckets]
    assert [u["weight_version"] for u in updates] == [None] * 4 + ["3"]  # only the last one


def test_plan_speaks_each_versions_dialect():
    old = weight_sync_plan(NAMED, 5, "tensor", encode=lambda part: ["blob"], protocol=SGLANG_VERSIONS["0.5.6"])
    assert [c.path for c in old] == ORDER_0_5_6 and "selector" not in old[1].resolved().body
    assert old[3].body == {"new_version": "5", "abort_all_requests": False}
    post2 = weight_sync_plan(NAMED, 5, "tensor", encode=lambda part: ["blob"],
                             protocol=SGLANG_VERSIONS["0.5.6.post2"])
    assert [c.path for c in post2] == [p for p in ORDER_0_5_6 if p != "/update_weight_version"]


def test_plan_of_a_model_without_mtp_layers_has_one_update_with_the_version():
    plan = weight_sync_plan(NAMED[:2], 1, "tensor", encode=lambda part: ["blob"])
    updates = [c for c in plan if c.path.startswith("/update")]
    assert len(updates) == 1 and updates[0].resolved().body["weight_version"] == "1"


def test_distributed_plan_initialises_the_group_once_and_lists_what_to_broadcast():
    group = weight_update_group("10.0.0.1", 29600, num_replicas=2, ranks_per_replica=2)
    assert group["world_size"] == 5 and group["rank_offsets"] == [1, 3] and group["backend"] == "nccl"
    first = weight_sync_plan(NAMED, 2, "distributed", init_group=group)
    init = first[0]
    assert init.path == "/init_weights_update_group" and init.joins_group
    assert init.body == {"group_name": "weight_update_group", "backend": "nccl", "master_address": "10.0.0.1",
                         "master_port": 29600, "world_size": 5}
    # each replica joins at its own rank: the trainer is 0, replica i's TP ranks start at 1 + i * tp
    assert [init.body_for(i)["rank_offset"] for i in range(2)] == [1, 3]
    assert [c.path for c in first[1:]] == [p.replace("tensor", "distributed") for p in ORDER]
    trunk, draft = first[3], first[4]
    assert trunk.body["names"] == TRUNK and list(trunk.broadcast) == TRUNK and draft.body["names"] == MTP
    assert draft.body["dtypes"] == ["bfloat16"] and draft.body["shapes"] == [[2, 4]]
    assert trunk.body["group_name"] == "weight_update_group" and draft.body["weight_version"] == "2"
    assert weight_sync_plan(NAMED, 3, "distributed")[0].path == "/pause_generation"
    # our CPU server receives with gloo; meta tensors are enough to plan (only dtypes and shapes are read)
    meta = [(n, torch.empty_like(t, device="meta")) for n, t in NAMED]
    cpu = weight_sync_plan(meta, 1, "distributed", init_group=weight_update_group("h", 1, 1, 1, backend="gloo"))
    assert cpu[0].body["backend"] == "gloo" and cpu[0].body_for(0)["rank_offset"] == 1
    assert cpu[4].body == draft.body | {"weight_version": "1"}


def test_plan_argument_errors():
    with pytest.raises(ValueError, match="sync mode"):
        weight_sync_plan(NAMED, 1, "ipc")
    with pytest.raises(ValueError, match="encoder"):
        weight_sync_plan(NAMED, 1, "tensor")


# ---- executing it against a fake SGLang ---------------------------------------------------------------


class FakeSGLang:
    """Records every call; answers like SGLang (no weights checksum). /update_weights_from_distributed
    blocks, as SGLang's does, until the trainer's broadcast has happened. `fail_path` answers 400 once
    `fail_after` calls of it went through."""

    def __init__(self, arrived: threading.Event, broadcast_done: threading.Event, fail_path: str | None = None,
                 fail_after: int = 0, port: int = 0):
        self.calls, self.version, self.fail_path, self.fail_after = [], "default", fail_path, fail_after
        self.reported = "0.5.23"
        self.arrived, self.broadcast_done = arrived, broadcast_done
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self._answer()

            def do_POST(self):
                self._answer()

            def _answer(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, payload = fake.handle(self.path, json.loads(raw) if raw else None)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def handle(self, path, body):
        self.calls.append((path, body))
        if path == self.fail_path:  # after `fail_after` calls of that path went through
            if self.fail_after == 0:
                return 400, {"success": False, "message": "boom"}
            self.fail_after -= 1
        if path == "/update_weights_from_distributed":
            self.arrived.set()
            if not self.broadcast_done.wait(5):
                return 400, {"success": False, "message": "no broadcast arrived"}
        if body and body.get("weight_version"):
            self.version = body["weight_version"]
        if path == "/model_info":
            return 200, {"model_path": "fake", "weight_version": self.version}
        if path == "/server_info":  # SGLang's: its ServerArgs fields and its version
            return 200, {"version": self.reported, "enable_deterministic_inference": False}
        return 200, {"success": True, "message": "ok"}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def fakes():
    started = []

    def make(n=2, **kw):
        arrived = [threading.Event() for _ in range(n)]
        done = threading.Event()
        started.extend(FakeSGLang(a, done, **kw) for a in arrived)
        return started[-n:], arrived, done

    yield make
    for f in started:
        f.close()


def test_colocated_sync_reaches_every_replica_in_order(fakes):
    replicas, _, _ = fakes()
    clients = [ReplicaClient(f.url, timeout=10) for f in replicas]
    held = push_weights(clients, dict(NAMED), 5, encode=lambda part: ["blob"], load_format=None)
    # SGLang reports no checksum: the version check stands in, and says so (never the sender's echoed back)
    assert held == [VERSION_CHECKED] * 2
    for fake in replicas:
        assert [p for p, _ in fake.calls] == ["/server_info", *ORDER] and fake.version == "5"  # version first


def test_split_sync_broadcasts_while_every_replica_waits(fakes):
    replicas, arrived, done = fakes()
    broadcasts, joined = [], []

    def broadcast(names):
        # both replicas must already be inside their update call, as NCCL needs every receiver posted
        assert all(a.wait(5) for a in arrived)
        broadcasts.append(names)
        done.set()

    plan = weight_sync_plan(NAMED, 7, "distributed", init_group=weight_update_group("127.0.0.1", 29600, 2, 1))
    clients = [ReplicaClient(f.url, timeout=10) for f in replicas]
    answers = run_plan(clients, plan, broadcast, join_group=lambda: joined.append(True))
    assert broadcasts == [TRUNK, MTP] and joined == [True] and [a["weight_version"] for a in answers] == ["7", "7"]
    assert [p for p, _ in replicas[0].calls][:2] == ["/init_weights_update_group", "/pause_generation"]
    assert [f.calls[0][1]["rank_offset"] for f in replicas] == [1, 2]
    with pytest.raises(ValueError, match="broadcast="):
        run_plan(clients, plan, join_group=lambda: None)
    with pytest.raises(ValueError, match="join_group="):
        run_plan(clients, plan, broadcast)
    with pytest.raises(ValueError, match="bodies for 2 replicas, not 1"):
        run_plan(clients[:1], plan, broadcast, join_group=lambda: None)


def test_a_replica_refusing_the_group_ends_the_sync_while_the_trainer_still_waits(fakes):
    """The trainer's join blocks until every rank arrives; a replica that refuses must not leave the
    driver waiting for that (up to the group timeout): its error ends the sync at once."""
    replicas, _, _ = fakes(1, fail_path="/init_weights_update_group")
    release = threading.Event()
    plan = weight_sync_plan(NAMED, 1, "distributed", init_group=weight_update_group("127.0.0.1", 29600, 1, 1))
    try:
        with pytest.raises(ReplicaError, match="/init_weights_update_group .*HTTP 400: boom"):
            run_plan([ReplicaClient(replicas[0].url, timeout=10)], plan, lambda names: None,
                     join_group=lambda: release.wait(30))
    finally:
        release.set()
    assert [p for p, _ in replicas[0].calls] == ["/init_weights_update_group"]


def test_a_failed_step_names_the_replica_and_the_call(fakes):
    replicas, _, _ = fakes(1, fail_path="/update_weights_from_tensor")
    with pytest.raises(ReplicaError, match=f"{replicas[0].url}: POST /update_weights_from_tensor .*HTTP 400: boom"):
        push_weights([ReplicaClient(replicas[0].url, timeout=10)], dict(NAMED), 1, encode=lambda part: ["blob"])
    assert "/continue_generation" not in [p for p, _ in replicas[0].calls]  # stopped at the failure


def test_an_untested_sglang_version_is_refused_in_one_line(fakes):
    replicas, _, _ = fakes(1)
    replicas[0].reported = "0.5.10"
    with pytest.raises(ReplicaError, match=r"SGLang 0.5.10 is not a supported version \(tested: 0.5.6, "
                                           r"0.5.6.post2, 0.5.23\)"):
        push_weights([ReplicaClient(replicas[0].url, timeout=10)], dict(NAMED), 1, encode=lambda part: ["blob"])
    assert [p for p, _ in replicas[0].calls] == ["/server_info"]  # nothing was sent


def test_a_replica_left_on_the_old_version_is_an_error(fakes):
    replicas, _, _ = fakes(1)
    plan = [c for c in weight_sync_plan(NAMED, 9, "tensor", encode=lambda part: ["blob"])
            if c.path != "/update_weights_from_tensor"]
    answers = run_plan([ReplicaClient(replicas[0].url)], plan)
    assert answers[0]["weight_version"] == "default"
    with pytest.raises(ReplicaError, match="weight sync v9 ended with weight_version 'default'"):
        push_weights([ReplicaClient(replicas[0].url)], {}, 9, encode=lambda part: ["blob"])


# ---- the stale-draft guard -------------------------------------------------------------------------------


def stats(accept_length: float, passes: int = 64, depth: int = 2) -> SpecStats:
    accepted = round((accept_length - 1) * passes)
    return SpecStats(verify_passes=passes, generated=accepted + passes, drafted=depth * passes, accepted=accepted)


def test_guard_raises_when_acceptance_collapses_right_after_a_sync():
    guard = StaleDraftGuard()
    for length in (2.6, 2.4):
        guard.observe(stats(length))
    guard.after_sync(12)
    with pytest.raises(StaleDraftError, match=r"v12: accept length \(passes that drafted\) fell to 1\.05 "
                                              r"from a running 2\.5.*not refreshed"):
        guard.observe(stats(1.05))


def test_guard_tolerates_drift_and_judges_only_batches_after_a_sync():
    guard = StaleDraftGuard()
    guard.observe(stats(2.5))
    for version, length in enumerate((2.2, 1.9, 1.7, 1.6)):  # a draft slowly falling behind is not staleness
        guard.after_sync(version)
        guard.observe(stats(length))
    guard.observe(stats(1.0))  # no sync just happened: not judged (e.g. a second DAPO generation round)
    guard.after_sync(9)
    guard.observe(stats(1.0, passes=8))  # too few verify passes to judge
    guard.observe(stats(1.0, depth=0))  # speculation off (adaptive depth 0): nothing to judge
    assert guard.armed_version == 9


def test_guard_judges_the_passes_that_drafted_not_rounds_adaptive_depth_left_plain():
    guard = StaleDraftGuard()
    guard.observe(stats(1.8))
    guard.after_sync(1)
    # the failure seen in a loaded full-suite run: auto depth drafted in 64 of 320 passes, and kept 59 of
    # those 64 drafts; the overall accept length (1.18) looks collapsed, the draft is fine
    healthy = SpecStats(verify_passes=320, generated=379, drafted=64, accepted=59, accepted_per_depth=[59],
                        passes_per_depth=[64])
    assert healthy.accept_length < 1.2 and healthy.drafting_accept_length == pytest.approx(1 + 59 / 64)
    guard.observe(healthy)
    assert guard.armed_version is None
    guard.after_sync(2)
    stale = SpecStats(verify_passes=320, generated=322, drafted=64, accepted=2, accepted_per_depth=[2],
                      passes_per_depth=[64])
    with pytest.raises(StaleDraftError, match="v2: accept length \\(passes that drafted\\) fell to 1.03"):
        guard.observe(stale)


def test_guard_needs_a_baseline_worth_protecting():
    guard = StaleDraftGuard()
    guard.after_sync(1)
    guard.observe(stats(1.0))  # first batch: no baseline yet
    guard.observe(stats(1.1))
    guard.after_sync(2)
    guard.observe(stats(1.0))  # baseline ~1.05 < min_baseline: speculation never paid, nothing to lose


def test_connect_refuses_what_the_replicas_version_cannot_do(fakes):
    """Split-mode MTP rollout on SGLang 0.5.6 would leave the draft stale: refused before any sync."""
    from tests.rollout.test_sglang_launch import CLUSTER_RECIPE, recipe_overrides
    from verl_mtp.config import load_config

    replicas, _, _ = fakes(1)
    replicas[0].reported = "0.5.6"
    split = ["actor_rollout_ref.hybrid_engine=False", "actor_rollout_ref.rollout.server.sync_mode=distributed"]
    cfg = load_config(recipe_overrides(CLUSTER_RECIPE) + split, config_name="ppo_megatron_trainer")
    with pytest.raises(ValueError, match="key 'actor_rollout_ref.rollout.server.sync_mode': distributed sync on "
                                         "SGLang 0.5.6 updates the target only"):
        ServerRollout.connect(cfg, [replicas[0].url], eos_token_id=2)
    assert [p for p, _ in replicas[0].calls] == ["/server_info"]


def test_server_info_is_asked_once_per_replica_until_it_stops_answering(fakes):
    """The version (detect_protocol, every replica) and the first replica's ServerArgs (protocol_info) come
    from one /server_info per replica, however many syncs and generations follow."""
    replicas, _, _ = fakes(2)
    rollout = ServerRollout([f.url for f in replicas], lambda validate, seed: SamplingParams(seed=seed),
                            encode=lambda bucket: ["blob"], load_format=None)
    try:
        for version in (1, 2):
            rollout.generate([], seed=3)
            assert rollout.update_rollout_weights(dict(NAMED), version) == VERSION_CHECKED
    finally:
        rollout.shutdown()
    assert [[p for p, _ in f.calls].count("/server_info") for f in replicas] == [1, 1]
    # a replica that stopped answering may come back as another launch: its client asks again
    client, port = rollout.clients[0], replicas[0].httpd.server_address[1]
    replicas[0].close()
    with pytest.raises(ReplicaError, match="is the replica still running"):
        client.request("GET", "/health", timeout=2)
    (relaunched,), _, _ = fakes(1, port=port)
    relaunched.reported = "0.5.6"
    assert client.server_info()["version"] == "0.5.6"


def test_a_seed_sglang_would_ignore_is_warned_about_once(fakes, caplog):
    """SGLang reads sampling_seed only with --enable-deterministic-inference."""
    replicas, _, _ = fakes(1)
    rollout = ServerRollout([replicas[0].url], lambda validate, seed: SamplingParams(seed=seed))
    try:
        with caplog.at_level(logging.WARNING, logger="verl_mtp.rollout.client"):
            rollout.generate([], seed=3)
            rollout.generate([], seed=4)
            rollout.generate([])
    finally:
        rollout.shutdown()
    warnings = [r.getMessage() for r in caplog.records if "sampling_seed" in r.getMessage()]
    assert len(warnings) == 1 and "enable_deterministic_inference=true" in warnings[0]


def test_both_versions_counter_names_are_read():
    """0.5.23 renamed the counters; reading only the old names made accept length 1.0 and disarmed the guard."""
    from verl_mtp.rollout.protocol import ProtocolError, spec_stats_from_meta

    old = spec_stats_from_meta({"spec_verify_ct": 10, "spec_accept_token_num": 12, "spec_draft_token_num": 30})
    new = spec_stats_from_meta({"spec_verify_ct": 10, "spec_num_correct_drafts": 12, "spec_num_proposed_drafts": 30})
    assert old == new and new.accept_length == pytest.approx(2.2) and new.drafted == 30
    with pytest.raises(ProtocolError, match="spec_verify_ct without accepted/proposed draft counters"):
        spec_stats_from_meta({"id": "r1", "spec_verify_ct": 10, "spec_accept_rate": 0.4})
    assert spec_stats_from_meta({"id": "r1"}) is None  # no speculation
