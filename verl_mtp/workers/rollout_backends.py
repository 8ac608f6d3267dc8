"""The rollout as the driver sees it: one `RolloutBackend` per topology, chosen once from the config.

    colocated          hybrid_engine, rollout.mode=engine: every actor rank generates with its own
                       in-process engine (role "actor_rollout"); the sync is a local copy on each rank
    split              rollout.mode=engine: a separate group of rollout workers; the actor's weights
                       travel through the Ray object store
    server             rollout.mode=server: HTTP replicas (ours or SGLang) started by the driver; the
                       weights travel in the request (tensor) or over a weight group (distributed)
    colocated_server   hybrid_engine, rollout.mode=server: the actor ranks start the replicas on their own
                       devices and push the weights from their own processes; the replicas sleep
                       (release memory) while the actor trains

Every backend returns samples as (prompt index, token ids, log-probs, finish reason), prompt-major, and
a sync as one (sent, held) checksum pair per rollout rank: the driver compares them. The module lives in
workers/ because two backends are Ray worker groups of PolicyWorker.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import ray
import torch

from verl_mtp.models.factory import build_policy_model
from verl_mtp.rollout.client import (ServerRollout, bucket_bytes, colocated_replica_groups, native_entry,
                                     server_launcher, server_sync_mode, weight_update_group_for)
from verl_mtp.rollout.protocol import TENSOR_LOAD_FORMAT
from verl_mtp.rollout.replica import ReplicaError
from verl_mtp.rollout.sglang import FLATTENED_BUCKET, SLEEP_TAGS, WEIGHT_GROUP_NAME, sglang_tensor_payload
from verl_mtp.workers.group import WorkerGroup, mean_metrics

Samples = list[tuple[int, list[int], list[float], str]]


@dataclass
class RolloutContext:
    """What a backend may take from the driver when it starts: the config, the actor's ranks (started
    with the backend's `actor_role`), how to start more policy workers (role, count), the run folder
    (replica logs, the model folder our server loads) and the tokenizer's facts."""

    cfg: object
    actor: WorkerGroup
    policy_group: Callable[[str, int], WorkerGroup]
    run_dir: str
    eos_token_id: int | None
    vocab_size: int


class RolloutBackend(ABC):
    """Built once by the driver as `backend(RolloutContext(...))` after the actor's group is up."""

    actor_role = "actor"  # the role the actor's ranks play next to this backend
    starts_empty = False  # replicas start from dummy weights: sync before the first generate
    sleeps = False  # sleep() frees the rollout's memory for the actor's passes
    takes_prior = False  # its generators are our in-process engines (set_acceptance_prior)

    @property
    @abstractmethod
    def generators(self):
        """The workers or replicas that generate: `len()` and `call_shards("generate", shards, ...)`."""

    def __len__(self) -> int:
        return len(self.generators)

    def generate(self, prompts: list[list[int]], validate: bool, seed: int) -> tuple[Samples, dict[str, float]]:
        """Prompts round-robin over the generators; -> samples sorted by prompt index, and the
        generators' metrics averaged (throughput summed)."""
        workers = len(self)
        shards = [list(range(w, len(prompts), workers)) for w in range(workers)]
        outs = self.generators.call_shards("generate", [[prompts[i] for i in s] for s in shards],
                                           validate=validate, seed=seed)
        rows = [(shard[pi], toks, lps, fin) for shard, (samples, _) in zip(shards, outs)
                for pi, toks, lps, fin in samples]
        rows.sort(key=lambda r: r[0])
        metrics = mean_metrics([m for _, m in outs])
        metrics["rollout/tokens_per_s"] = sum(m["rollout/tokens_per_s"] for _, m in outs)
        return rows, metrics

    @abstractmethod
    def sync_from(self, actor: WorkerGroup, version: int) -> list[tuple[str, str]]:
        """Trunk and MTP tensors of the actor to the rollout as `version`; -> (sent, held) checksums per
        rollout rank. Every actor rank takes part (a sharded engine gathers its tensors collectively)."""

    def set_acceptance_prior(self, chain_rates: list[float]) -> None:
        """Training's expected P(drafts 1..k kept) per depth for the weights just synced: adaptive depth
        starts from it. Our in-process engines take it; a server replica's controller learns only from the
        acceptance it observes."""
        if self.takes_prior:
            self.generators.call("set_acceptance_prior", chain_rates)

    def sleep(self) -> None:
        """Free the rollout's memory while the actor trains (when `sleeps`)."""

    def wake(self) -> None:
        """Take back what `sleep` freed (a sync does it too)."""

    def shutdown(self) -> None:
        """Stop what this backend started (the actor's group belongs to the driver)."""

    @classmethod
    def ray_cpus(cls, cfg) -> int:
        """Logical CPUs a local Ray needs for this backend beyond the policy, ref and reward workers."""
        return 0


def _send_through_object_store(actor: WorkerGroup, receivers, version: int, hashed: bool = True
                               ) -> list[tuple[str, str]]:
    """Every actor rank gathers; rank 0's tensors go into the object store once, each receiver reads them."""
    weights, sent = actor.call("get_weights", hashed)[0]
    held = receivers.call("update_rollout_weights", ray.put(weights), version)
    return [(sent, h) for h in held]


class ColocatedInProcess(RolloutBackend):
    actor_role = "actor_rollout"
    takes_prior = True

    def __init__(self, ctx: RolloutContext):
        self.actor = ctx.actor

    @property
    def generators(self):
        return self.actor

    def sync_from(self, actor: WorkerGroup, version: int) -> list[tuple[str, str]]:
        return actor.call("sync_colocated", version)


class SplitInProcess(RolloutBackend):
    takes_prior = True

    def __init__(self, ctx: RolloutContext):
        world = ctx.cfg.trainer.nnodes * ctx.cfg.trainer.n_gpus_per_node
        tp = ctx.cfg.actor_rollout_ref.rollout.tensor_model_parallel_size
        self.group = ctx.policy_group("rollout", max(1, world // tp))

    @property
    def generators(self):
        return self.group

    def sync_from(self, actor: WorkerGroup, version: int) -> list[tuple[str, str]]:
        return _send_through_object_store(actor, self.group, version)

    def shutdown(self) -> None:
        self.group.shutdown()

    @classmethod
    def ray_cpus(cls, cfg) -> int:
        return cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node


class _Servers(RolloutBackend):
    """Replicas behind HTTP (a ServerRollout)."""

    server: ServerRollout
    hashed: bool  # the sender hashes what it sends only for our server: SGLang cannot report what it holds

    @property
    def generators(self):
        return self.server

    @property
    def urls(self) -> list[str]:
        return self.server.urls

    @property
    def processes(self) -> list:
        return self.server.processes

    def shutdown(self) -> None:
        self.server.shutdown()


def rollout_model_path(ctx: RolloutContext) -> str:
    """What replicas load: model.path, or for our server the actor's architecture (MTP layer count
    included) written once, its weights arriving with the first sync."""
    cfg = ctx.cfg
    if cfg.actor_rollout_ref.rollout.name != "native":
        return cfg.actor_rollout_ref.model.path
    model_path = os.path.join(ctx.run_dir, "rollout_model")
    build_policy_model(cfg, ctx.vocab_size, "cpu", cfg.trainer.seed).save_pretrained(model_path)
    return model_path


class SplitServer(_Servers):
    """HTTP rollout servers speaking SGLang's protocol: ours (rollout.name=native) or SGLang's. With
    rollout.server.sync_mode=distributed the actor's rank 0 joins the replicas' weight group as rank 0
    (with the first sync) and broadcasts the tensors to them itself."""

    starts_empty = True

    def __init__(self, ctx: RolloutContext):
        cfg, actor = ctx.cfg, ctx.actor
        self.hashed = cfg.actor_rollout_ref.rollout.name == "native"
        hooks = {}
        if server_sync_mode(cfg.actor_rollout_ref.rollout) == "distributed":
            host, port = actor.call_rank0("weight_broadcast_address")
            group = weight_update_group_for(cfg, host, port)
            # broadcast: every actor rank gathers the tensors (a collective when sharded), rank 0 sends
            hooks = dict(init_group=group, broadcast=lambda names: actor.call("broadcast_weights", names),
                         join_group=lambda: actor.call_rank0(
                             "init_weight_broadcast", host, port, group["world_size"], WEIGHT_GROUP_NAME,
                             group["backend"], float(cfg.actor_rollout_ref.nccl_timeout)))
        self.server = ServerRollout.from_config(cfg, rollout_model_path(ctx), ctx.eos_token_id,
                                                log_dir=os.path.join(ctx.run_dir, "rollout_servers"), **hooks)

    def sync_from(self, actor: WorkerGroup, version: int) -> list[tuple[str, str]]:
        if self.server.sync_mode != "distributed":
            return _send_through_object_store(actor, self.server, version, self.hashed)
        # the actor's rank 0 broadcasts the tensors; the driver plans the sync from dtypes and shapes only
        meta, sent = actor.call("weights_meta", self.hashed)[0]
        shapes = {n: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for n, dtype, shape in meta}
        held = self.server.call("update_rollout_weights", shapes, version)
        return [(sent, h) for h in held]

    @classmethod
    def ray_cpus(cls, cfg) -> int:
        """The Ray launcher holds one CPU bundle per replica; local subprocesses hold none."""
        return cfg.actor_rollout_ref.rollout.server.num_replicas if server_launcher(cfg) == "ray" else 0


def push_encoding(rollout_cfg) -> tuple[Callable, str | None, int]:
    """How actor ranks serialize tensors for their colocated replica: (encode(bucket) -> (entry,
    keep-alive), the load_format to name, how many actor ranks build a replica's entries). SGLang: one
    entry per tensor-parallel rank, each a FlattenedTensorBucket of CUDA IPC handles built on that rank's
    GPU by the actor rank sharing it; our CPU server: one entry, base64 safetensors, from the hosting rank."""
    if rollout_cfg.name == "sglang":
        return sglang_tensor_payload, FLATTENED_BUCKET, rollout_cfg.tensor_model_parallel_size
    return native_entry, TENSOR_LOAD_FORMAT, 1


class ColocatedServer(_Servers):
    """hybrid_engine with rollout.mode=server: the first of every rollout.tensor_model_parallel_size
    consecutive actor ranks (on one node) starts a replica on the group's devices, as its own child
    process; no Ray resources beyond the actor's. The driver reaches the replicas over HTTP for generate
    and sleep/wake; the weights go from those ranks (PolicyWorker.push_rollout_weights)."""

    starts_empty = True

    def __init__(self, ctx: RolloutContext):
        from verl_mtp.rollout.ray_launch import replica_commands

        self.actor = ctx.actor
        r = ctx.cfg.actor_rollout_ref.rollout
        self.hashed = r.name == "native"
        self.sleeps = bool(r.free_cache_engine)
        self.encoding = push_encoding(r)
        self.bucket_bytes = bucket_bytes(r)
        self.released: set[str] = set()  # memory the replicas gave the actor (SGLang tags)
        log_dir = os.path.join(ctx.run_dir, "rollout_servers")
        commands, ports, _ = replica_commands(ctx.cfg, rollout_model_path(ctx), log_dir)
        groups = colocated_replica_groups(self.actor.call("placement"), r.tensor_model_parallel_size)
        pending = [self.actor.workers[rank].start_rollout_server.remote(
                       command, r.server.host, port, os.path.join(log_dir, f"replica{i}"), devices)
                   for i, ((rank, devices), command, port) in enumerate(zip(groups, commands, ports, strict=True))]
        try:
            urls = ray.get(pending)
        except BaseException as error:
            self._stop_replicas()
            if isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, ReplicaError):
                raise error.cause from None  # the replica's own message (with its log), not a Ray traceback
            raise
        self.server = ServerRollout.connect(ctx.cfg, urls, ctx.eos_token_id)

    def sync_from(self, actor: WorkerGroup, version: int) -> list[tuple[str, str]]:
        """The replicas take their weights memory back, the ranks hosting them send the tensors from their
        own process (the driver never holds them), then the KV cache comes back."""
        self._wake(("weights",))
        pairs = [p for p in actor.call("push_rollout_weights", version, *self.encoding, self.bucket_bytes, self.hashed)
                 if p is not None]
        self.server.weights_synced(version)
        self._wake(("kv_cache",))
        return pairs

    def sleep(self) -> None:
        """With rollout.free_cache_engine: after generation the replicas free their weights and KV cache so
        the actor's passes have the devices; the next sync wakes them."""
        if self.sleeps:
            self.server.release_memory(SLEEP_TAGS)
            self.released = set(SLEEP_TAGS)

    def wake(self) -> None:
        self._wake(SLEEP_TAGS)

    def _wake(self, tags: tuple[str, ...]) -> None:
        tags = [t for t in tags if t in self.released]
        if tags:
            self.server.resume_memory(tags)
            self.released -= set(tags)

    def shutdown(self) -> None:
        self._stop_replicas()
        super().shutdown()

    def _stop_replicas(self) -> None:
        """Ask every actor rank to stop the replica it hosts (killing the rank would orphan the server)."""
        for ref in [w.stop_rollout_server.remote() for w in self.actor.workers]:
            try:
                ray.get(ref, timeout=60)
            except ray.exceptions.RayError:
                pass  # that rank is already gone


BACKENDS: dict[str, type[RolloutBackend]] = {
    "colocated": ColocatedInProcess, "split": SplitInProcess, "server": SplitServer,
    "colocated_server": ColocatedServer,
}


def backend_name(cfg) -> str:
    """The topology of actor_rollout_ref.{hybrid_engine, rollout.mode}: a key of BACKENDS."""
    arr = cfg.actor_rollout_ref
    server = arr.rollout.mode == "server"
    if arr.hybrid_engine:
        return "colocated_server" if server else "colocated"
    return "server" if server else "split"


def rollout_backend(cfg) -> type[RolloutBackend]:
    return BACKENDS[backend_name(cfg)]
