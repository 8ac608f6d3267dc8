"""One rank of the policy. Thin: it builds an engine / rollout engine and delegates to them.

role: "actor_rollout" (colocated: trains, and generates with its own rollout copy of the weights),
"actor" (trains only; split mode), "rollout" (generates only; split mode) or "ref" (frozen reference).
In colocated server mode an "actor" rank may also host a rollout server on its node's devices
(start_rollout_server) and push the weights to it itself (push_rollout_weights).
The driver calls the weight exports (get_weights, weights_meta, broadcast_weights, push_rollout_weights,
save_checkpoint) on EVERY actor rank: a sharded engine gathers its tensors with collectives that each
rank of its groups must join. Rank 0's result is the one used; the others return what is cheap.
The class is plain Python; worker groups wrap it with `ray.remote`.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Callable

import torch
from omegaconf import OmegaConf

from verl_mtp.batch import Batch
from verl_mtp.engines.actor import PolicyActor
from verl_mtp.engines.base import build_engine
from verl_mtp.models import MTPCausalLM, state_checksum
from verl_mtp.models.factory import build_policy_model, load_tokenizer, num_mtp_layers, resolve_device
from verl_mtp.rollout import NativeEngine, SamplingParams
from verl_mtp.net import free_port
from verl_mtp.rollout.sampling import rollout_sampling_params


DIST_CHECKPOINT = "dist_ckpt"  # megatron.use_dist_checkpointing: the actor's model + optimizer shards


def optimizer_file(rank: int) -> str:
    return f"optimizer_rank{rank}.pt"


def address() -> tuple[str, int]:
    import ray

    return ray.util.get_node_ip_address(), free_port()


class PolicyWorker:
    def __init__(self, cfg: dict, role: str, rank: int = 0, world_size: int = 1, master: tuple[str, int] | None = None,
                 tokenizer_dir: str | None = None, total_steps: int = 1):
        self.cfg = OmegaConf.create(cfg)
        self.role, self.rank, self.world_size = role, rank, world_size
        arr = self.cfg.actor_rollout_ref
        self.device = resolve_device(self.cfg.trainer.device)
        torch.set_num_threads(max(1, int(os.environ.get("VERL_MTP_THREADS", "1"))))
        if world_size > 1 and role in ("actor", "actor_rollout", "ref"):
            backend = "nccl" if self.device == "cuda" else "gloo"
            torch.distributed.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}",
                                                 rank=rank, world_size=world_size)
        self.tokenizer = load_tokenizer(tokenizer_dir, arr.model.trust_remote_code)
        model = build_policy_model(self.cfg, len(self.tokenizer), self.device, self.cfg.trainer.seed)
        self.actor = self.rollout = None
        self.weight_group = self.weight_group_backend = None  # rank 0 of the replicas' weight group (split sync)
        self.server_host = self.server_client = None  # the colocated replica this rank started, if any
        self.payload_group = None  # (ranks, group): the actor ranks that build one replica's payloads
        # colocated: the rollout holds its own copy, taken before an engine shards `model` in place (fsdp2)
        rollout_model = copy.deepcopy(model) if role == "actor_rollout" else model
        if role in ("actor", "actor_rollout", "ref"):
            mtp = arr.model.mtp
            train_mtp = role != "ref" and mtp.enable and mtp.enable_train
            optim = OmegaConf.to_container(arr.actor.optim) if role != "ref" else None
            parallel = OmegaConf.to_container(arr.ref.megatron if role == "ref" else arr.actor.megatron, resolve=True)
            engine = build_engine(arr.actor.strategy, model=model, optim=optim, total_steps=total_steps,
                                  num_mtp=num_mtp_layers(arr.model) if train_mtp else 0,
                                  mtp_detach=mtp.detach_encoder, mtp_lr_scale=mtp.lr_scale, megatron=parallel,
                                  gradient_checkpointing=arr.model.enable_gradient_checkpointing,
                                  fsdp=OmegaConf.to_container((arr.ref if role == "ref" else arr.actor).fsdp_config))
            self.actor = PolicyActor(engine, arr, temperature=arr.rollout.temperature,
                                     max_response_length=self.cfg.data.max_response_length, seed=self.cfg.trainer.seed)
        if role in ("rollout", "actor_rollout"):
            # colocated: refreshed (and verified) from the actor after every update
            mtp = arr.model.mtp
            self.speculative = mtp.speculative_num_steps if (mtp.enable and mtp.enable_rollout) else 0
            self.rollout = NativeEngine(rollout_model, self.tokenizer, max_batch_size=arr.rollout.max_batch_size,
                                        max_seq_len=self.cfg.data.max_prompt_length + self.cfg.data.max_response_length,
                                        speculative=self.speculative, dtype=arr.rollout.dtype)

    # ---- rollout -------------------------------------------------------------------------

    def sampling_params(self, validate: bool = False, seed: int | None = None) -> SamplingParams:
        return rollout_sampling_params(self.cfg.actor_rollout_ref.rollout, self.cfg.data.max_response_length,
                                       self.tokenizer.eos_token_id, validate, seed)

    def generate(self, prompts: list[list[int]], validate: bool = False, seed: int | None = None):
        """-> (token ids, logprobs, finish reasons) per sample, prompt-major, and engine metrics."""
        # colocated: the trainer's offload keys free its accelerator memory for the rollout meanwhile
        with self.actor.engine.offloaded() if self.actor else contextlib.nullcontext():
            out = self.rollout.generate(prompts, self.sampling_params(validate, seed))
        metrics = out.stats.metrics()
        metrics["rollout/tokens_per_s"] = out.tokens_per_s
        for depth, rounds in out.depth_histogram.items():
            metrics[f"rollout/depth_rounds_{depth}"] = float(rounds)
        samples = [(s.prompt_index, s.token_ids, s.logprobs, s.finish_reason) for s in out.samples]
        return samples, metrics

    def update_rollout_weights(self, named_tensors: dict[str, torch.Tensor], version: int) -> str:
        return self.rollout.update_weights(named_tensors.items(), version)

    def sync_colocated(self, version: int) -> tuple[str, str]:
        """Hand the actor's weights to this process's rollout engine; (sent, held) checksums."""
        named = [(n, t.detach()) for n, t in self.actor.engine.named_tensors()]
        return state_checksum(named), self.rollout.update_weights(named, version)

    def set_acceptance_prior(self, chain_rates: list[float]) -> None:
        self.rollout.set_acceptance_prior(chain_rates)

    def rollout_checksum(self) -> str:
        return self.rollout.weights_checksum()

    # ---- actor ---------------------------------------------------------------------------

    def compute_log_probs(self, batch: Batch) -> torch.Tensor:
        # as verl: the reference's pass is sized by the ref section, the actor's (old log-probs) by the rollout's
        s = self.cfg.actor_rollout_ref["ref" if self.role == "ref" else "rollout"]
        return self.actor.compute_log_probs(batch.to(self.device), s.log_prob_micro_batch_size_per_gpu,
                                            dynamic=s.log_prob_use_dynamic_bsz,
                                            max_tokens=s.log_prob_max_token_len_per_gpu)[0].cpu()

    def update_policy(self, batch: Batch, mini_batch_rows: int, step: int = 0) -> dict[str, float]:
        return self.actor.update_policy(batch.to(self.device), mini_batch_rows, step)

    def _full_tensors(self, keep: bool) -> list[tuple[str, torch.Tensor]] | None:
        """Every rank walks the engine's full tensors (a sharded engine gathers each with a collective its
        groups must join); -> them, detached, where `keep`, else None once the gathers are joined, so
        ranks whose result is unused neither hold nor copy nor hash the whole model."""
        tensors = self.actor.engine.named_tensors()
        if not keep:
            for _ in tensors:
                pass
            return None
        return [(n, t.detach()) for n, t in tensors]

    def get_weights(self, hashed: bool = True) -> tuple[dict[str, torch.Tensor] | None, str | None]:
        """Every rank gathers; rank 0 returns the full tensors and their checksum (None unless `hashed`: a
        receiver that cannot report one, SGLang, is not worth a host-side hash per sync), the others
        (None, None), so the driver receives one copy whatever the world size."""
        named = self._full_tensors(keep=self.rank == 0)
        if named is None:
            return None, None
        named = {n: t.cpu() for n, t in named}
        return named, state_checksum(named.items()) if hashed else None

    # ---- split weight sync over a process group (rollout.server.sync_mode=distributed) --------------

    def weights_meta(self, hashed: bool = True) -> tuple[list[tuple[str, str, list[int]]], str | None] | None:
        """(name, dtype, shape) of every tensor a sync sends, and their checksum (if `hashed`): what the
        driver needs to plan a broadcast sync without pulling the tensors through itself. Rank 0 answers
        (its result is the one used); the others join the engine's gathers and answer None."""
        named = self._full_tensors(keep=self.rank == 0)
        if named is None:
            return None
        meta = [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in named]
        return meta, state_checksum(named) if hashed else None

    def weight_broadcast_address(self) -> tuple[str, int]:
        """This node's IP and a free port: rank 0 of the weight group hosts its rendezvous here."""
        return address()

    def init_weight_broadcast(self, master_address: str, master_port: int, world_size: int, group_name: str,
                              backend: str, timeout: float = 600.0) -> None:
        """Join the rollout replicas' weight group as rank 0 (the replicas join through their
        /init_weights_update_group at the same time). A side group: the data-parallel group is untouched."""
        from verl_mtp.rollout.weight_group import join_weight_group, leave_weight_group

        if self.weight_group is not None:
            leave_weight_group(self.weight_group)
            self.weight_group = None
        self.weight_group = join_weight_group(master_address, master_port, 0, world_size, group_name, backend,
                                              timeout)
        self.weight_group_backend = backend

    def broadcast_weights(self, names: list[str]) -> int:
        """Every rank gathers the tensors; rank 0 (the weight group's sender) sends the named ones, in this
        order, to every replica of the weight group; -> how many it sent."""
        from verl_mtp.rollout.weight_group import broadcast_tensors

        named = self._full_tensors(keep=self.rank == 0)
        if named is None:
            return 0
        named = dict(named)
        if self.weight_group is None:
            raise RuntimeError("broadcast_weights before init_weight_broadcast: no weight group to send over")
        broadcast_tensors(self.weight_group, [named[n] for n in names], self.weight_group_backend)
        return len(names)

    # ---- colocated server mode: replicas started by the actor ranks, on their devices --------------

    def placement(self) -> tuple[str, list[str]]:
        """(node IP, device ids Ray gave this rank): what decides which ranks share a replica."""
        import ray

        return ray.util.get_node_ip_address(), [str(d) for d in ray.get_gpu_ids()]

    def start_rollout_server(self, command: list[str], host: str, port: int, log_dir: str, devices: list[str],
                             startup_timeout: float = 1800.0) -> str:
        """Start one replica as this process's child, on `devices` (its tensor-parallel group's GPUs, made
        visible to the server; none on CPU), wait for /health; -> its URL."""
        from verl_mtp.rollout.client import ReplicaClient
        from verl_mtp.rollout.ray_launch import ReplicaHost

        self.server_host = ReplicaHost()
        env = {"CUDA_VISIBLE_DEVICES": ",".join(devices)} if devices else None
        url = self.server_host.start(command, host, port, log_dir, startup_timeout, env)
        self.server_client = ReplicaClient(url)
        return url

    def rollout_server_pid(self) -> int | None:
        return self.server_host.server_pid() if self.server_host is not None else None

    def stop_rollout_server(self) -> None:
        if self.server_host is not None:
            self.server_host.stop()
        self.server_host = self.server_client = None

    def push_rollout_weights(self, version: int, encode: Callable, load_format: str | None, ranks: int,
                             bucket_bytes: int | None = None, hashed: bool = True) -> tuple[str | None, str] | None:
        """Every rank: gather the full tensors (a collective for sharded engines). The sync goes in buckets of
        at most `bucket_bytes` (sglang.update_buckets); a replica's serialized_named_tensors has one entry
        per rank of its group of `ranks` consecutive actor ranks, each built by that rank from its own
        tensors (SGLang: CUDA IPC handles on the rank's GPU, opened by the SGLang TP rank on that GPU) and
        gathered to the group's first rank, which hosts the replica and sends the sync plan
        (weight_sync_plan) from this process (replica_payloads). With ranks=1 (our CPU server, one entry)
        the hosting rank alone encodes. Then the trainer's offload keys free the device for generation
        again. `encode`, `load_format`, `ranks`: the replica's serialization (rollout_backends.push_encoding).
        -> (sent, held) checksums on hosting ranks (sent only when `hashed`), else None."""
        from verl_mtp.rollout.client import push_weights
        from verl_mtp.rollout.replica_payloads import ReplicaPayloads, replica_group
        from verl_mtp.rollout.sglang import update_buckets

        if self.payload_group is None or self.payload_group[0] != ranks:  # created collectively, once
            self.payload_group = (ranks, replica_group(self.rank, self.world_size, ranks))
        group = self.payload_group[1]
        named = self._full_tensors(keep=self.server_client is not None or group is not None)
        result = None
        if named is not None:
            payloads = ReplicaPayloads(encode, group)
            buckets = update_buckets(named, bucket_bytes)  # what the hosting rank's plan sends, call by call
            if self.server_client is None:
                payloads.follow(buckets)
            else:
                sent = state_checksum(named) if hashed else None
                try:
                    (held,) = push_weights([self.server_client], dict(named), version, encode=payloads.entries,
                                           load_format=load_format, bucket_bytes=bucket_bytes)
                except BaseException as error:
                    payloads.finish(len(buckets), error)
                    raise
                payloads.finish(len(buckets))
                result = (sent, held)
        del named
        self.actor.engine.offload()
        return result

    def _dist_checkpointing(self) -> bool:
        actor = self.cfg.actor_rollout_ref.actor
        return actor.strategy == "megatron" and actor.megatron.use_dist_checkpointing

    def save_checkpoint(self, folder: str) -> None:
        """Every rank: an HF/MiMo folder (weights, config, tokenizer) gathered collectively and written by
        rank 0, and this rank's own optimizer and LR-schedule state (its shard, under model parallelism);
        with megatron.use_dist_checkpointing, the model and optimizer shards in megatron's dist_checkpointing
        format instead (`dist_ckpt/`, which a run at another TP/PP/CP size can resume from)."""
        os.makedirs(folder, exist_ok=True)
        self.actor.engine.save_hf(folder)
        if self.rank == 0:
            self.tokenizer.save_pretrained(folder)
        if self._dist_checkpointing():
            self.actor.engine.save_checkpoint(os.path.join(folder, DIST_CHECKPOINT))
            return
        state = {k: v for k, v in self.actor.engine.state_dict().items() if k != "model"}
        torch.save(state, os.path.join(folder, optimizer_file(self.rank)))

    def load_checkpoint(self, folder: str) -> None:
        """Every rank: the HF weights and its own optimizer shard (or its shards of `dist_ckpt/`)."""
        if self._dist_checkpointing():
            self.actor.engine.load_checkpoint(os.path.join(folder, DIST_CHECKPOINT))
            return
        path = os.path.join(folder, optimizer_file(self.rank))
        if not os.path.isfile(path):
            saved_dist = os.path.isdir(os.path.join(folder, DIST_CHECKPOINT))
            raise FileNotFoundError(f"{path}: no optimizer state for actor rank {self.rank} of {self.world_size} " + (
                "(the checkpoint was saved with actor_rollout_ref.actor.megatron.use_dist_checkpointing=true: set it)"
                if saved_dist else "(was the checkpoint saved with fewer actor ranks?)"))
        named = MTPCausalLM.from_pretrained(folder).state_dict()
        # weights_only: a checkpoint is data, never code
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.actor.engine.load_state_dict({"model": named, **state})

    def data_parallel_rank(self) -> int:
        return self.actor.engine.data_parallel_rank

    def pid(self) -> int:
        return os.getpid()
