"""Colocated tensor sync to a replica with tensor-parallel size 2, on CPU: two actor ranks (real
PolicyWorkers, gloo) feed one replica, each building its own entry of serialized_named_tensors from its own
tensors, gathered to the rank that hosts the replica (a recording fake SGLang), bucket by bucket.

The entries here are our CPU server's (base64 safetensors, `native_entry`), so the test can open them and
see whose tensors each holds; SGLang's CUDA-IPC entries are the same structure (`sglang_tensor_payload`,
tests/rollout/test_sglang_launch.py, GPU only)."""

from __future__ import annotations

import json
import multiprocessing
import os
import traceback

import pytest
import torch
from safetensors.torch import load_file, save_file

from verl_mtp.net import free_port
from verl_mtp.rollout.client import native_entry
from verl_mtp.rollout.protocol import TENSOR_LOAD_FORMAT, decode_tensors

BUCKET_BYTES = 128 << 10  # the toy policy (~0.8 MB) goes in ~8 buckets
UPDATE = "/update_weights_from_tensor"


def _failing_on_second_bucket(bucket):
    _failing_on_second_bucket.calls += 1
    if _failing_on_second_bucket.calls == 2:
        raise MemoryError("no room for bucket 2")
    return native_entry(bucket)


def _rank_main(rank: int, port: int, tokenizer_dir: str, out: str) -> None:
    """One actor rank: four syncs of version 1..4 (ok, replica fails mid-way, rank 1 fails to encode, ok)."""
    import threading

    from tests.rollout.test_sglang_sync import FakeSGLang
    from verl_mtp.config import load_config, to_dict
    from verl_mtp.rollout.client import ReplicaClient
    from verl_mtp.workers.policy_worker import PolicyWorker

    report = {"outcomes": []}
    try:
        worker = PolicyWorker(to_dict(load_config(["trainer.device=cpu"])), "actor", rank, 2, ("127.0.0.1", port),
                              tokenizer_dir)
        with torch.no_grad():  # each rank's tensors differ, so the test can tell whose an entry holds
            for p in worker.actor.engine.module.parameters():
                p.add_(rank)
        save_file({n: t.clone() for n, t in worker.actor.engine.named_tensors()},
                  os.path.join(out, f"rank{rank}.safetensors"))
        fake = None
        if rank == 0:  # the replica's leader: it hosts the replica (here a fake SGLang 0.5.23)
            fake = FakeSGLang(threading.Event(), threading.Event())
            worker.server_client = ReplicaClient(fake.url, timeout=30)
        _failing_on_second_bucket.calls = 0
        for version, encode in enumerate([native_entry, native_entry,
                                          _failing_on_second_bucket if rank == 1 else native_entry,
                                          native_entry], start=1):
            if fake is not None:
                fake.fail_path, fake.fail_after = (UPDATE, 1) if version == 2 else (None, 0)
                start = len(fake.calls)
            try:
                result = worker.push_rollout_weights(version, encode, TENSOR_LOAD_FORMAT, 2, BUCKET_BYTES,
                                                     hashed=False)
                report["outcomes"].append(["ok", result])
            except Exception as e:
                report["outcomes"].append([type(e).__name__, str(e)])
            if fake is not None and version == 1:
                report["updates"] = [body for path, body in fake.calls[start:] if path == UPDATE]
                report["paths"] = [path for path, _ in fake.calls[start:]]
    except BaseException:
        report["crash"] = traceback.format_exc()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


@pytest.fixture(scope="module")
def synced(tmp_path_factory):
    from verl_mtp.data.synthetic_math import iter_corpus_text
    from verl_mtp.data.tokenizer import train_tokenizer

    out = str(tmp_path_factory.mktemp("tp_payloads"))
    tokenizer_dir = train_tokenizer(iter_corpus_text(300, seed=0), os.path.join(out, "tok"))
    ctx, port = multiprocessing.get_context("spawn"), free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, tokenizer_dir, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"actor ranks {hung} still blocked (in a collective another rank never entered?)"
    reports = []
    for r in range(2):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            reports.append(json.load(f))
        assert "crash" not in reports[r], reports[r]["crash"]
    tensors = [load_file(os.path.join(out, f"rank{r}.safetensors")) for r in range(2)]
    return reports, tensors


def test_each_update_carries_one_entry_per_tp_rank_built_from_that_ranks_own_tensors(synced):
    (leader, member), tensors = synced
    assert leader["outcomes"][0] == ["ok", [None, "version-checked + acceptance guard"]]
    assert member["outcomes"][0] == ["ok", None]
    updates = leader["updates"]
    assert len(updates) > 2 and all(u["load_format"] == TENSOR_LOAD_FORMAT for u in updates)
    sent = []
    for body in updates:
        entries = body["serialized_named_tensors"]
        assert len(entries) == 2  # one per SGLang TP rank, in rank order
        opened = [dict(decode_tensors(e)) for e in entries]
        assert sorted(opened[0]) == sorted(opened[1])  # the same bucket from both ranks
        for rank in range(2):
            for name, t in opened[rank].items():
                assert torch.equal(t, tensors[rank][name]), (rank, name)
        nbytes = sum(t.numel() * t.element_size() for t in opened[0].values())
        assert nbytes <= BUCKET_BYTES or len(opened[0]) == 1  # bounded, unless one tensor is bigger alone
        sent += list(opened[0])
    assert sorted(sent) == sorted(tensors[0]) and len(sent) == len(set(sent))  # everything, once
    assert [u["weight_version"] for u in updates] == [None] * (len(updates) - 1) + ["1"]
    assert leader["paths"][-1] == "/model_info"


def test_a_failure_on_either_side_ends_the_sync_on_every_rank_and_the_next_sync_works(synced):
    (leader, member), _ = synced
    # the replica refused the second bucket: the leader reports it, the member is released with it
    assert leader["outcomes"][1][0] == "ReplicaError" and "HTTP 400: boom" in leader["outcomes"][1][1]
    assert member["outcomes"][1][0] == "ReplicaError"
    assert "leader rank 0 failed at bucket 1" in member["outcomes"][1][1] and "boom" in member["outcomes"][1][1]
    # rank 1 could not serialize its second bucket: it still joined the gather, and both ranks say so
    assert leader["outcomes"][2][0] == "ReplicaError"
    assert "actor rank 1 could not serialize its tensors: MemoryError: no room for bucket 2" in leader["outcomes"][2][1]
    assert member["outcomes"][2] == ["ReplicaError", "colocated sync: this rank could not serialize bucket 1: "
                                                     "MemoryError: no room for bucket 2"]
    # every collective was entered by every rank: the group is still in step for the next sync
    assert leader["outcomes"][3] == ["ok", [None, "version-checked + acceptance guard"]]
    assert member["outcomes"][3] == ["ok", None]


# ---- the CUDA path (GPU image, two GPUs): SGLang's own classes, CUDA IPC handles --------------------------


def _open_on_scheduler_rank(entry: str):
    """What SGLang's scheduler rank does with its entry (its own process, all GPUs visible)."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    monkey_patch_torch_reductions()
    data = MultiprocessingSerializer.deserialize(entry)
    tensors = FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"], metadata=data["metadata"])
    # plain lists back: with the reductions patched, this process cannot pickle a CPU tensor
    return [(name, str(torch.cuda.get_device_properties(t.device).uuid), t.float().cpu().tolist()) for name, t in
            tensors.reconstruct_tensors()]


def _gpu_rank_main(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from verl_mtp.rollout.replica_payloads import ReplicaPayloads, replica_group
    from verl_mtp.rollout.sglang import sglang_tensor_payload, update_buckets

    report = {}
    try:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        # CPU tensors, as Megatron's TP/PP gather leaves them, different on each rank
        named = [(f"model.layers.{i}.w", torch.full((256,), float(10 * rank + i))) for i in range(6)]
        named.append(("model.mtp_layers.0.w", torch.full((8,), rank - 1.0, dtype=torch.bfloat16)))
        buckets = update_buckets(named, 2048)  # two 1 KiB tensors per bucket
        payloads = ReplicaPayloads(sglang_tensor_payload, replica_group(rank, 2, 2))
        if rank == 0:
            ctx = multiprocessing.get_context("spawn")
            opened = []
            with ctx.Pool(1) as pool:
                for bucket in buckets:
                    entries = payloads.entries(bucket)
                    opened.append([pool.apply(_open_on_scheduler_rank, (e,)) for e in entries])
            payloads.finish(len(buckets))
            uuids = [str(torch.cuda.get_device_properties(r).uuid) for r in range(2)]
            report["opened"] = [[[[name, uuid == uuids[r], values] for name, uuid, values in entry]
                                 for r, entry in enumerate(per_update)] for per_update in opened]
        else:
            report["followed"] = payloads.follow(buckets)
        dist.destroy_process_group()
    except BaseException:
        report["crash"] = traceback.format_exc()
    with open(os.path.join(out, f"gpu_rank{rank}.json"), "w") as f:
        json.dump(report, f)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_each_scheduler_rank_opens_its_own_entry_on_its_own_gpu(tmp_path):
    """TP 2 on two GPUs: rank r's CPU tensors go to GPU r as one FlattenedTensorBucket per update; the
    gathered list holds entry r at index r, and a separate process (SGLang's scheduler rank) opens it with
    SGLang's classes on GPU r (by UUID), values intact, while the ranks keep the buckets alive."""
    pytest.importorskip("sglang")
    ctx, port = multiprocessing.get_context("spawn"), free_port()
    procs = [ctx.Process(target=_gpu_rank_main, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert not any(p.is_alive() for p in procs), "a rank is still blocked in a collective"
    reports = [json.loads((tmp_path / f"gpu_rank{r}.json").read_text()) for r in range(2)]
    assert all("crash" not in r for r in reports), [r.get("crash") for r in reports]
    leader, member = reports
    assert [len(per_update) for per_update in leader["opened"]] == [2, 2, 2, 2] and member["followed"] == 4
    expected = [{f"model.layers.{i}.w": [float(10 * r + i)] * 256 for i in range(6)}
                | {"model.mtp_layers.0.w": [r - 1.0] * 8} for r in range(2)]
    got = [{}, {}]
    for per_update in leader["opened"]:
        for rank, entry in enumerate(per_update):  # entry r: rank r's tensors, opened on rank r's GPU
            for name, on_own_gpu, values in entry:
                assert on_own_gpu, (rank, name)
                got[rank][name] = values
    assert got == expected
