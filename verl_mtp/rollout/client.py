"""The trainer's side of server-mode rollout: a least-outstanding load balancer over rollout replicas (our
server or SGLang, reached through replica.ReplicaClient) and `ServerRollout`, which the driver uses in
place of a rollout worker group (`call_shards("generate", ...)`, `call("update_rollout_weights", ...)`).

It speaks only the SGLang protocol (protocol.py), in the dialect of the version each replica reports
(sglang.SGLANG_VERSIONS), so the same code runs against `python -m verl_mtp.rollout.server` on a laptop
and against `sglang.launch_server` on a cluster.

What a sync proves: our server answers the exact checksum of what it holds (computed on the server).
SGLang cannot hash its weights, and its models (Qwen2 / MiMo) do not implement /get_weights_by_name, so
there a sync is "version-checked + acceptance guard": every replica must report the new weight_version,
and the stale-draft guard judges the next batch's accept length. `push_weights` then answers
VERSION_CHECKED instead of a checksum, never the sender's own checksum back.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Callable

from verl_mtp.rollout.engine import SpecStats
from verl_mtp.rollout.protocol import TENSOR_LOAD_FORMAT, encode_tensors, sample_from_json
from verl_mtp.rollout.replica import (DEFAULT_TIMEOUT_S, ReplicaClient, ReplicaError, ReplicaUnreachable,  # noqa: F401
                                      ServerProcess, launch_replicas, native_server_args, native_server_command)
from verl_mtp.rollout.sampling import SamplingParams, rollout_sampling_params
from verl_mtp.rollout.sglang import (DEFAULT_SGLANG_VERSION, SGLangVersion, StaleDraftGuard, SyncCall,
                                     check_model_folder, check_sglang_support, installed_sglang_version,
                                     launch_sglang_replicas, sglang_version, weight_sync_plan, weight_update_group)

log = logging.getLogger(__name__)

# what push_weights reports for a replica that cannot report a checksum of its weights (SGLang)
VERSION_CHECKED = "version-checked + acceptance guard"


class LeastOutstanding:
    """Picks the replica with the fewest requests in flight, round-robin among ties, so concurrent shards
    spread out and a replica busy with a long batch gets the next one last."""

    def __init__(self, n: int):
        self.outstanding = [0] * n
        self._next = 0
        self._lock = threading.Lock()

    @contextmanager
    def pick(self):
        with self._lock:
            n = len(self.outstanding)
            order = [(self._next + k) % n for k in range(n)]
            index = min(order, key=lambda i: self.outstanding[i])
            self._next = (index + 1) % n
            self.outstanding[index] += 1
        try:
            yield index
        finally:
            with self._lock:
                self.outstanding[index] -= 1


# ---- the rollout group --------------------------------------------------------------------------------


def server_sync_mode(rollout) -> str:
    """rollout.server.sync_mode, or by rollout.name: tensor for our server, distributed for SGLang (whose
    tensor path carries CUDA IPC handles, which only a process on the same GPUs can send)."""
    return rollout.server.sync_mode or ("distributed" if rollout.name == "sglang" else "tensor")


def server_launcher(cfg) -> str:
    """rollout.server.launcher, or ray when the cluster has more than one node (split server mode)."""
    return cfg.actor_rollout_ref.rollout.server.launcher or ("ray" if cfg.trainer.nnodes > 1 else "local")


def colocated_servers(cfg) -> bool:
    """hybrid_engine with rollout.mode=server: the actor workers start the replicas on their own devices
    and push weights to them; the replicas sleep while the actor trains."""
    return cfg.actor_rollout_ref.hybrid_engine and cfg.actor_rollout_ref.rollout.mode == "server"


def colocated_replica_groups(placements: list[tuple[str, list[str]]], tp: int) -> list[tuple[int, list[str]]]:
    """Colocated server mode: which actor ranks start a replica, on which devices. `placements` holds each
    rank's (node IP, device ids); every `tp` consecutive ranks form one replica's tensor-parallel group,
    started by its first rank on the group's devices. -> [(leader rank, device ids of the group)]."""
    if len(placements) % tp:
        raise ValueError(f"{len(placements)} actor ranks do not split into rollout tensor-parallel groups of {tp}")
    groups = []
    for first in range(0, len(placements), tp):
        members = placements[first:first + tp]
        nodes = sorted({node for node, _ in members})
        if len(nodes) > 1:
            raise ValueError(f"colocated rollout replica {first // tp}: actor ranks {first}..{first + tp - 1} are on "
                             f"nodes {nodes}; a replica's tensor-parallel group must be on one node")
        groups.append((first, [d for _, devices in members for d in devices]))
    return groups


def weight_update_group_for(cfg, master_address: str, master_port: int) -> dict:
    """init_group of the distributed sync for this config: an SGLang replica has one group rank per
    tensor-parallel rank and receives with NCCL; our server is one CPU process and receives with gloo."""
    r = cfg.actor_rollout_ref.rollout
    sglang = r.name == "sglang"
    return weight_update_group(master_address, master_port, r.server.num_replicas,
                               r.tensor_model_parallel_size if sglang else 1, backend="nccl" if sglang else "gloo")


class ServerRollout:
    """Rollout replicas behind HTTP, shaped like a rollout WorkerGroup for the driver.

    sampling_params(validate, seed) -> SamplingParams, as PolicyWorker.sampling_params.
    sync_mode, encode, load_format, bucket_bytes, broadcast, init_group, join_group: how weights travel
    (see push_weights); the defaults are our CPU server's tensor transport, one update call per part.
    guard: judges the first training batch after each sync (None = off).
    """

    def __init__(self, urls: list[str], sampling_params: Callable[[bool, int | None], SamplingParams], *,
                 processes: list[ServerProcess] = (), timeout: float = DEFAULT_TIMEOUT_S,
                 sync_mode: str = "tensor", encode: Callable | None = None,
                 load_format: str | None = TENSOR_LOAD_FORMAT, bucket_bytes: int | None = None,
                 broadcast: Callable | None = None, init_group: dict | None = None,
                 join_group: Callable | None = None, guard: StaleDraftGuard | None = None):
        if not urls:
            raise ValueError("ServerRollout needs at least one replica URL")
        self.clients = [ReplicaClient(u, timeout) for u in urls]
        self.sampling_params = sampling_params
        self.processes = list(processes)
        self.sync = dict(mode=sync_mode, encode=encode or encode_native, load_format=load_format,
                         bucket_bytes=bucket_bytes, broadcast=broadcast, join_group=join_group)
        self.init_group = init_group  # distributed mode: sent with the first sync only
        self.guard = guard
        self._protocol: SGLangVersion | None = None
        self._seed_warned = False
        self.balancer = LeastOutstanding(len(urls))
        self._pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(urls)), thread_name_prefix="rollout-client")

    @classmethod
    def launch(cls, model_path: str, num_replicas: int, sampling_params, *, server_args=(), host: str = "127.0.0.1",
               base_port: int = 0, log_dir: str | None = None, startup_timeout: float = 300.0, **kwargs):
        """Start `num_replicas` native servers (ports base_port + i, or free ones when 0) and connect."""
        folder = log_dir or tempfile.mkdtemp(prefix="verl_mtp_rollout_")
        ports = [base_port + i if base_port else 0 for i in range(num_replicas)]
        commands = [native_server_command(model_path, host, port, os.path.join(folder, f"replica{i}.port"), server_args)
                    for i, port in enumerate(ports)]
        processes = launch_replicas(commands, host, ports, folder, startup_timeout)
        return cls([p.url for p in processes], sampling_params, processes=processes, **kwargs)

    @classmethod
    def from_config(cls, cfg, model_path: str, eos_token_id: int | None, log_dir: str | None = None, **kwargs):
        """rollout.mode=server: start actor_rollout_ref.rollout.server.num_replicas replicas of
        rollout.name (native: our CPU server; sglang: SGLang on tensor_model_parallel_size GPUs each) and
        connect. Launcher "local": subprocesses of this machine (sglang: this node's GPUs); "ray": one Ray
        actor per replica on the node holding its resources (see ray_launch). The guard is on whenever the
        rollout speculates. With sync_mode distributed pass init_group= (weight_update_group_for),
        join_group= and broadcast= (see push_weights)."""
        r = cfg.actor_rollout_ref.rollout
        if r.name not in ("native", "sglang"):
            raise ValueError(f"key 'actor_rollout_ref.rollout.name': server mode serves native or sglang, "
                             f"not {r.name!r}")
        sampling = _sampling_for(cfg, eos_token_id)
        kwargs.setdefault("guard", _guard_for(cfg))
        kwargs["sync_mode"] = server_sync_mode(r)
        if kwargs["sync_mode"] == "tensor":  # a distributed sync gathers the model once per update call: unbucketed
            kwargs.setdefault("bucket_bytes", bucket_bytes(r))
        if r.name == "sglang":  # refused before anything starts, then again with the version that answers
            check_sglang_support(cfg, installed_sglang_version() or DEFAULT_SGLANG_VERSION)
            check_model_folder(cfg, model_path)
            kwargs["load_format"] = None
        if server_launcher(cfg) == "ray":
            from verl_mtp.rollout.ray_launch import launch_replicas_on_ray

            processes = launch_replicas_on_ray(cfg, model_path, log_dir=log_dir)
        elif r.name == "native":
            return cls.launch(model_path, r.server.num_replicas, sampling, server_args=native_server_args(cfg),
                              host=r.server.host, base_port=r.server.base_port, log_dir=log_dir, **kwargs)
        else:
            processes = launch_sglang_replicas(cfg, r.server.num_replicas, host=r.server.host,
                                               base_port=r.server.base_port, model_path=model_path, log_dir=log_dir)
        rollout = cls([p.url for p in processes], sampling, processes=processes, **kwargs)
        if r.name == "sglang":
            try:
                check_sglang_support(cfg, rollout.protocol.version)
            except BaseException:
                rollout.shutdown()
                raise
        return rollout

    @classmethod
    def connect(cls, cfg, urls: list[str], eos_token_id: int | None, **kwargs):
        """Replicas that are already running, e.g. the ones the actor workers started (colocated server
        mode): sampling from the config, the guard on whenever the rollout speculates. SGLang replicas
        are checked against the config with the version they report."""
        kwargs.setdefault("guard", _guard_for(cfg))
        rollout = cls(urls, _sampling_for(cfg, eos_token_id), **kwargs)
        if cfg.actor_rollout_ref.rollout.name == "sglang":
            check_sglang_support(cfg, rollout.protocol.version)
        return rollout

    @property
    def urls(self) -> list[str]:
        return [c.url for c in self.clients]

    @property
    def sync_mode(self) -> str:
        return self.sync["mode"]

    @property
    def protocol(self) -> SGLangVersion:
        """The SGLang version the replicas speak (asked once, on first use)."""
        if self._protocol is None:
            self._protocol = detect_protocol(self.clients)
        return self._protocol

    def __len__(self) -> int:
        return len(self.clients)

    # ---- the WorkerGroup surface the driver uses ---------------------------------------------------

    def call_shards(self, method: str, shards: list, *args, **kwargs) -> list:
        if method != "generate":
            raise AttributeError(f"ServerRollout.call_shards supports 'generate' only, not {method!r}")
        return self._generate_many(shards, *args, **kwargs)

    def call(self, method: str, *args, **kwargs) -> list:
        """One result per replica, as WorkerGroup.call gives one per worker."""
        if method != "update_rollout_weights":
            raise AttributeError(f"ServerRollout.call supports 'update_rollout_weights' only, not {method!r}")
        return self._sync(*_resolve_refs(args), **kwargs)

    # ---- PolicyWorker's rollout methods ---------------------------------------------------------------

    def generate(self, prompts: list[list[int]], validate: bool = False, seed: int | None = None):
        """-> ([(prompt_index, token_ids, logprobs, finish_reason)], metrics), like PolicyWorker.generate."""
        return self._generate_many([prompts], validate, seed)[0]

    def update_rollout_weights(self, named_tensors: dict, version: int) -> str:
        """-> the checksum all replicas hold (VERSION_CHECKED for SGLang); they must agree."""
        held = self._sync(named_tensors, version)
        for client, checksum in zip(self.clients, held):
            if checksum != held[0]:
                raise ReplicaError(f"rollout server {client.url} holds checksum {checksum[:12]} after sync "
                                   f"v{version}, {self.clients[0].url} holds {held[0][:12]}")
        return held[0]

    def release_memory(self, tags) -> None:
        """Every replica frees the memory regions `tags` (SGLang's memory saver) for the colocated trainer."""
        self._on_all("/release_memory_occupation", {"tags": list(tags)})

    def resume_memory(self, tags) -> None:
        self._on_all("/resume_memory_occupation", {"tags": list(tags)})

    def weights_synced(self, version) -> None:
        """Weights of `version` are in (whoever sent them): the guard judges the next training batch."""
        if self.guard is not None:
            self.guard.after_sync(version)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for p in self.processes:
            p.stop()

    # ---- internals -------------------------------------------------------------------------------------

    def _generate_many(self, shards: list, validate: bool = False, seed: int | None = None) -> list:
        params = self.sampling_params(validate, seed)
        if params.seed is not None and not self._seed_warned and not self.protocol_info().get(
                "enable_deterministic_inference", True):
            self._seed_warned = True  # SGLang reads sampling_seed only in deterministic mode
            log.warning("rollout: sampling_seed %s is ignored by these SGLang replicas (launched without "
                        "--enable-deterministic-inference; set rollout.engine_kwargs.sglang."
                        "enable_deterministic_inference=true for seeded sampling)", params.seed)
        outs = list(self._pool.map(lambda shard: self._generate_shard(shard, params), shards))
        if self.guard is not None and not validate:  # validation decodes differently: its own regime
            total = SpecStats()
            for _, stats, _ in outs:
                total.merge(stats)
            self.guard.observe(total)
        verified = float(self.protocol_info().get("engine") == "verl_mtp")  # only our server hashes its weights
        return [(samples, {**metrics, "rollout/sync_checksum_verified": verified}) for samples, _, metrics in outs]

    def _generate_shard(self, prompts: list[list[int]], params: SamplingParams):
        stats, samples = SpecStats(), []
        start = time.perf_counter()
        if prompts:
            with self.balancer.pick() as index:
                items = self.clients[index].generate(prompts, params)
            for k, item in enumerate(items):  # SGLang orders samples prompt-major: n of prompt 0, then 1, ...
                tokens, logprobs, finish, sample_stats = sample_from_json(item)
                samples.append((k // params.n, tokens, logprobs, finish))
                if sample_stats is not None:
                    stats.merge(sample_stats)
        metrics = stats.metrics()
        metrics["rollout/tokens_per_s"] = sum(len(s[1]) for s in samples) / max(time.perf_counter() - start, 1e-9)
        return samples, stats, metrics

    def protocol_info(self) -> dict:
        """The first replica's /server_info (SGLang: its ServerArgs and version), as its client cached it."""
        return self.clients[0].server_info()

    def _sync(self, named_tensors: dict, version) -> list[str]:
        held = push_weights(self.clients, named_tensors, version, init_group=self.init_group,
                            protocol=self.protocol, **self.sync)
        self.init_group = None
        self.weights_synced(version)
        return held

    def _on_all(self, path: str, body: dict) -> list:
        """POST to every replica at once; the first failure raises, naming its replica."""
        return list(self._pool.map(lambda client: client.request("POST", path, body), self.clients))


def _sampling_for(cfg, eos_token_id: int | None):
    r = cfg.actor_rollout_ref.rollout
    return functools.partial(rollout_sampling_params, r, cfg.data.max_response_length, eos_token_id)


def _guard_for(cfg) -> StaleDraftGuard | None:
    mtp = cfg.actor_rollout_ref.model.mtp
    return StaleDraftGuard() if mtp.enable and mtp.enable_rollout else None


def bucket_bytes(rollout) -> int:
    """rollout.update_weights_bucket_megabytes (verl's key) in bytes: the most tensor bytes one update call
    of a tensor sync carries."""
    megabytes = rollout.update_weights_bucket_megabytes
    if not isinstance(megabytes, int) or isinstance(megabytes, bool) or megabytes < 1:
        raise ValueError(f"key 'actor_rollout_ref.rollout.update_weights_bucket_megabytes': expected an integer "
                         f">= 1, got {megabytes!r}")
    return megabytes << 20


def encode_native(named) -> list[str]:
    """serialized_named_tensors for our CPU server: one rank, base64 safetensors."""
    return [encode_tensors(named)]


def native_entry(bucket) -> tuple[str, None]:
    """One actor rank's entry for our CPU server (replica_payloads' encoder): the data itself, nothing to
    keep alive."""
    return encode_tensors(bucket), None


def detect_protocol(clients: list[ReplicaClient]) -> SGLangVersion:
    """The SGLang version every replica reports in GET /server_info ("version", asked once per replica
    client); they must agree."""
    versions = {c.url: str(c.server_info().get("version")) for c in clients}
    if len(set(versions.values())) > 1:
        raise ReplicaError(f"rollout replicas run different SGLang versions: {versions}")
    (version,) = set(versions.values())
    try:
        return sglang_version(version)
    except ValueError as e:
        raise ReplicaError(f"rollout server {clients[0].url}: {e}") from None


def push_weights(clients: list[ReplicaClient], named_tensors: dict, version, *, mode: str = "tensor",
                 encode: Callable = encode_native, load_format: str | None = TENSOR_LOAD_FORMAT,
                 bucket_bytes: int | None = None, broadcast: Callable | None = None, init_group: dict | None = None,
                 join_group: Callable | None = None, protocol: SGLangVersion | None = None) -> list[str]:
    """Trunk, then MTP tensors to every replica (sglang.weight_sync_plan, in the dialect of `protocol`,
    asked from the replicas when not given); -> what each replica holds: its weights' checksum when it
    reports one (our server), else VERSION_CHECKED (SGLang: the new weight_version was checked).

    mode "tensor": the tensors travel in the requests, one per bucket of at most `bucket_bytes`, each
    serialized by `encode(bucket)` right before it is sent (colocated SGLang: replica_payloads, in the
    actor ranks that own the tensors). mode "distributed": `broadcast(names)`
    sends them over the weight group that `init_group` describes and `join_group()` joins as rank 0
    (split); `named_tensors` then only needs dtypes and shapes. The sender's checksum is not an argument:
    what a replica answers is never the sender's own checksum echoed back.
    """
    protocol = protocol or detect_protocol(clients)
    plan = weight_sync_plan(list(named_tensors.items()), version, mode, encode=encode, load_format=load_format,
                            init_group=init_group, bucket_bytes=bucket_bytes, protocol=protocol)
    infos = run_plan(clients, plan, broadcast, join_group)
    held = []
    for client, info in zip(clients, infos):
        if str(info.get("weight_version")) != str(version):
            raise ReplicaError(f"rollout server {client.url}: weight sync v{version} ended with weight_version "
                               f"{info.get('weight_version')!r}")
        held.append(info.get("weights_checksum") or VERSION_CHECKED)
    return held


def run_plan(clients: list[ReplicaClient], plan: list[SyncCall], broadcast: Callable | None = None,
             join_group: Callable | None = None) -> list:
    """Send each call of the plan to every replica at once and wait for all before the next call. While a
    call is in flight the trainer's side runs next to it: `join_group()` for the group's init call,
    `broadcast(names)` for a call listing tensors (the replicas wait to receive them). The first failure
    ends the sync with its own message, without waiting for parties blocked on the failed one. A call's
    payload (a bucket's serialized tensors) is built just before it is sent. Returns the replicas'
    answers to the last call."""
    for call in plan:  # checked first: replicas would otherwise wait for a trainer that never comes
        if call.broadcast and broadcast is None:
            raise ValueError(f"{call.path} needs the trainer to broadcast tensors; pass broadcast=")
        if call.joins_group and join_group is None:
            raise ValueError(f"{call.path} needs the trainer to join the weight group; pass join_group=")
        if call.per_replica and len(call.per_replica) != len(clients):
            raise ValueError(f"{call.path} has bodies for {len(call.per_replica)} replicas, not {len(clients)}")
    answers: list = []
    pool = ThreadPoolExecutor(max_workers=len(clients) + 1, thread_name_prefix="weight-sync")
    try:
        for call in plan:
            call = call.resolved()
            futures = [pool.submit(c.request, call.method, call.path, call.body_for(i)) for i, c in enumerate(clients)]
            trainer = [pool.submit(join_group)] if call.joins_group else \
                [pool.submit(broadcast, list(call.broadcast))] if call.broadcast else []
            done, _ = wait(futures + trainer, return_when=FIRST_EXCEPTION)
            for f in done:
                f.result()  # raises the first failure
            answers = [f.result() for f in futures]
            for client, answer in zip(clients, answers):
                if isinstance(answer, dict) and answer.get("success") is False:
                    raise ReplicaError(f"rollout server {client.url}: {call.path} failed: {answer.get('message')}")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return answers


def _resolve_refs(args: tuple) -> tuple:
    """The driver passes weights as a Ray object ref (ray.put) to worker groups; resolve it here too."""
    if not any(type(a).__name__ == "ObjectRef" for a in args):
        return args
    import ray

    return tuple(ray.get(a) if type(a).__name__ == "ObjectRef" else a for a in args)
