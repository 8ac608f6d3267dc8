"""Rollout replicas on a Ray cluster: one Ray actor per replica, placed on the node that holds the
replica's resources, starts the server there as its own subprocess and waits for /health.

Each replica gets its own placement group with one bundle, STRICT_PACK: {"CPU": 1, "GPU": tp} for SGLang
(tensor_model_parallel_size GPUs of one node), {"CPU": 1} for our CPU server. One bundle, not tp bundles
of one GPU each, because an actor holds the GPUs of one bundle and Ray exposes to it (CUDA_VISIBLE_DEVICES,
inherited by the server) exactly the GPUs it holds; SGLang then starts at base GPU 0 of what it sees.
The returned URL names the node's IP when the server binds all interfaces (0.0.0.0), so the driver on
another node can reach it. Imported only when rollout.server.launcher resolves to ray.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from verl_mtp.net import free_port
from verl_mtp.rollout.replica import ReplicaError, launch_replicas, native_server_args, native_server_command
from verl_mtp.rollout.sglang import launch_command, sglang_server_args

WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class ReplicaHost:
    """One replica's server process on this node: a Ray actor of the ray launcher, or held by the actor
    worker that hosts a colocated replica (PolicyWorker.start_rollout_server)."""

    def __init__(self):
        self.process = None

    def start(self, command: list[str], host: str, port: int, log_dir: str, startup_timeout: float,
              env: dict[str, str] | None = None) -> str:
        """Run `command` (its interpreter replaced by this node's; `env` added to this process's), wait for
        /health; -> the replica URL. Also used in-process by an actor worker hosting a colocated replica."""
        if not port and "--port-file" not in command:  # SGLang takes no port file: pick a free port here
            port = free_port()
            command = [*command, "--port", str(port)]
        (self.process,) = launch_replicas([[sys.executable, *command[1:]]], host, [port], log_dir, startup_timeout,
                                          env)
        if host in WILDCARD_HOSTS:
            return self.process.url.replace(f"//{host}:", f"//{ray.util.get_node_ip_address()}:", 1)
        return self.process.url

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def server_pid(self) -> int:
        return self.process.proc.pid

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()


@dataclass
class RayServerProcess:
    """A replica started by a ReplicaHost; `stop` ends the server, the actor and its placement group."""

    url: str
    host: object  # the ReplicaHost actor handle
    pg: object

    def stop(self, timeout: float = 30.0) -> None:
        try:
            ray.get(self.host.stop.remote(), timeout=timeout)
        except (ray.exceptions.RayError, TimeoutError):
            pass  # the actor (and with it, normally, the server) is already gone
        ray.kill(self.host, no_restart=True)
        remove_placement_group(self.pg)


def replica_commands(cfg, model_path: str, log_dir: str) -> tuple[list[list[str]], list[int], int]:
    """-> (command, port and GPUs of each replica). Ports are base_port + i (0: free ones)."""
    r = cfg.actor_rollout_ref.rollout
    n, host, base = r.server.num_replicas, r.server.host, r.server.base_port
    ports = [base + i if base else 0 for i in range(n)]
    if r.name == "native":
        commands = [native_server_command(model_path, host, port, os.path.join(log_dir, f"replica{i}", "port"),
                                          native_server_args(cfg)) for i, port in enumerate(ports)]
        return commands, ports, 0
    args = [sglang_server_args(cfg, model_path=model_path, host=host, port=port, base_gpu_id=0) for port in ports]
    # port 0: the replica host picks a free port on its node and appends --port
    commands = [launch_command({k: v for k, v in a.items() if not (k == "port" and v == 0)}) for a in args]
    return commands, ports, r.tensor_model_parallel_size


def launch_replicas_on_ray(cfg, model_path: str, log_dir: str | None = None, startup_timeout: float = 1800.0,
                           placement_timeout: float = 300.0) -> list[RayServerProcess]:
    """Start rollout.server.num_replicas replicas of rollout.name, each on the node Ray places its bundle
    on; replica i logs to log_dir/replica{i}/ on that node. On failure every started replica is stopped."""
    folder = log_dir or tempfile.mkdtemp(prefix="verl_mtp_rollout_")
    commands, ports, gpus = replica_commands(cfg, model_path, folder)
    host = cfg.actor_rollout_ref.rollout.server.host
    bundle = {"CPU": 1, "GPU": gpus} if gpus else {"CPU": 1}
    started: list[RayServerProcess] = []
    try:
        pending = []
        for i, (command, port) in enumerate(zip(commands, ports)):
            pg = placement_group([dict(bundle)], strategy="STRICT_PACK")
            try:
                ray.get(pg.ready(), timeout=placement_timeout)
            except ray.exceptions.GetTimeoutError:
                remove_placement_group(pg)
                raise ReplicaError(f"rollout replica {i}: no node offered {bundle} within {placement_timeout:.0f}s "
                                   "(the replicas' GPUs come on top of the actor's)") from None
            actor = ray.remote(ReplicaHost).options(
                num_cpus=1, num_gpus=gpus, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)).remote()
            started.append(RayServerProcess("", actor, pg))
            pending.append(actor.start.remote(command, host, port, os.path.join(folder, f"replica{i}"),
                                              startup_timeout))
        for replica, ref in zip(started, pending):
            try:
                replica.url = ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # the server's own message, not a Ray traceback
                raise e.cause if isinstance(e.cause, ReplicaError) else e from None
    except BaseException:
        for replica in started:
            replica.stop()
        raise
    return started
