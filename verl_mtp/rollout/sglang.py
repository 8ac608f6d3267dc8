"""SGLang rollout: supported versions, server arguments from our config, the weight-sync call sequence per
version, the stale-draft guard.

Pure functions and small classes; `sglang` itself is imported only inside `sglang_tensor_payload`, which
runs on the GPU image. The same sequence drives our own CPU server (rollout.mode=server), which emulates
the protocol of one of these versions (as strictly), so everything except the CUDA transport is exercised
by the CPU tests; tests/rollout/sglang_contract checks every request against the real SGLang packages.

Supported SGLang versions (SGLANG_VERSIONS; docs/cluster.md has the table): 0.5.6, 0.5.6.post2, 0.5.23.
The client reads the version from GET /server_info and speaks that version's protocol; any other version
is refused with one line. Weight sync, per replica, in this order (`weight_sync_plan`):
  1. POST /pause_generation {"mode": "abort"}        no sample may span two weight versions
  2. POST /begin_weight_update {"selector": "all"}   0.5.23 only: updates outside a session answer 400
  3. POST /update_weights_from_*  trunk tensors      flush_cache=false, no weight_version yet
  4. POST /update_weights_from_*  MTP tensors        the draft; the last update carries weight_version, so
                                                     the version only advances once trunk *and* draft are in
  (tensor sync: 3 and 4 one call per bucket of at most rollout.update_weights_bucket_megabytes)
  5. POST /end_weight_update {}                      0.5.23 only
  6. POST /update_weight_version {"new_version"}     0.5.6 only: it drops weight_version while paused
  7. POST /flush_cache {}                            cached prefixes were computed by the old weights
  8. POST /continue_generation {}                    SGLang declares a body here (422 without one)
  9. GET  /model_info                                weight_version (and, on our server, weights_checksum)
"_tensor" when colocated (SGLang: one FlattenedTensorBucket of CUDA IPC handles per tensor-parallel rank,
built by the actor rank on that rank's GPU, see replica_payloads; our CPU server: base64 safetensors);
"_distributed" when split (the trainer broadcasts each listed tensor over the weight group while the call
is in flight; NCCL for SGLang, gloo for our CPU server). A distributed sync first sends POST /init_weights_update_group
once, while the trainer joins the same group as rank 0. On 0.5.23 updates carry `selector: "all"` (target
and draft runners); 0.5.6's tensor path loads the draft runner and then the target, its distributed path
the target only, so split-mode speculation needs 0.5.23 (`check_sglang_support` refuses it otherwise).

Colocated server mode (hybrid_engine with rollout.mode=server) shares the devices with training, so around
the actor's passes (rollout.free_cache_engine) every replica is put to sleep and woken in this order:
  POST /release_memory_occupation {"tags": ["kv_cache", "weights"]}    after generation, before training
  POST /resume_memory_occupation  {"tags": ["weights"]}                 before the sync writes the weights
  (the sync above)
  POST /resume_memory_occupation  {"tags": ["kv_cache"]}                after it, before generating
so the KV cache is never allocated while the actor's tensors and the replica's weights are both resident.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from verl_mtp.rollout.engine import SpecStats
from verl_mtp.rollout.replica import launch_replicas

MTP_MARK = ".mtp_layers."
SYNC_MODES = ("tensor", "distributed")
# SGLang's memory-saver regions (release/resume_memory_occupation "tags"; cuda_graph only in newer SGLang);
# colocated training frees the two big ones and leaves the captured graphs in place
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")
SLEEP_TAGS = ("kv_cache", "weights")
WEIGHT_GROUP_NAME = "weight_update_group"  # SGLang's default group_name
FLATTENED_BUCKET = "flattened_bucket"  # load_format of a FlattenedTensorBucket payload (all pinned versions)


# ---- supported versions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SGLangVersion:
    """What one tested SGLang release needs from a weight sync, read in its source (http_server.py,
    io_struct.py, tokenizer_communicator_mixin.py, scheduler weight updater, tokenizer_manager.py)."""

    version: str
    update_session: bool  # update_weights_from_* only between /begin_weight_update and /end_weight_update
    selector: bool  # update bodies name the runners that load them: target | draft | all
    records_version_when_paused: bool  # False: an update's weight_version is dropped while generation is paused
    distributed_refreshes_draft: bool  # update_weights_from_distributed also loads the draft (MTP) model
    spec_counters: tuple[str, str]  # meta_info names of (accepted drafts, proposed drafts)


OLD_COUNTERS = ("spec_accept_token_num", "spec_draft_token_num")
NEW_COUNTERS = ("spec_num_correct_drafts", "spec_num_proposed_drafts")
SGLANG_VERSIONS = {v.version: v for v in (
    SGLangVersion("0.5.6", False, False, False, False, OLD_COUNTERS),
    SGLangVersion("0.5.6.post2", False, False, True, False, OLD_COUNTERS),
    SGLangVersion("0.5.23", True, True, True, True, NEW_COUNTERS),
)}
DEFAULT_SGLANG_VERSION = "0.5.23"  # pyproject's sglang extra and docker/Dockerfile install this one
MTP_DRAFT_LAYERS = 1  # SGLang's MTP drafts (models/mimo_mtp.py) load every model.mtp_layers.<i> into one layer


def sglang_version(version: str) -> SGLangVersion:
    """The protocol of a tested version; any other is refused (its protocol is unknown)."""
    if version not in SGLANG_VERSIONS:
        raise ValueError(f"SGLang {version} is not a supported version (tested: {', '.join(SGLANG_VERSIONS)}); "
                         f"install one of them, e.g. pip install 'sglang[all]=={DEFAULT_SGLANG_VERSION}'")
    return SGLANG_VERSIONS[version]


def check_sglang_support(cfg, version: str) -> None:
    """Refuse, in one line naming the key and the version, a run this SGLang version would silently degrade."""
    arr = cfg.actor_rollout_ref
    r, mtp = arr.rollout, arr.model.mtp
    proto = sglang_version(version)
    if not (mtp.enable and mtp.enable_rollout):
        return
    if mtp.num_layers > MTP_DRAFT_LAYERS:
        raise ValueError(f"key 'actor_rollout_ref.model.mtp.num_layers': SGLang {version} drafts with "
                         f"{MTP_DRAFT_LAYERS} MTP layer (every model.mtp_layers.<i> lands on it), got "
                         f"{mtp.num_layers}; train K=1 for SGLang rollout or use rollout.name=native")
    distributed = (r.server.sync_mode or "distributed") == "distributed" and not (
        arr.hybrid_engine and r.mode == "server")
    if distributed and not proto.distributed_refreshes_draft:
        raise ValueError(f"key 'actor_rollout_ref.rollout.server.sync_mode': distributed sync on SGLang {version} "
                         "updates the target only and leaves the draft model with its launch weights; use SGLang "
                         "0.5.23 (selector=all) or colocated tensor sync (hybrid_engine=True)")


def check_model_folder(cfg, model_path: str) -> None:
    """SGLang reads the model's config through transformers' AutoConfig, which knows no `mimo`: a folder
    that brings its own code (`auto_map`, as every MiMo folder we save does) needs trust_remote_code, or
    every replica fails to start. Refused here in one line instead."""
    import json
    import os

    config = os.path.join(model_path, "config.json")
    if not os.path.isfile(config) or cfg.actor_rollout_ref.model.trust_remote_code:
        return
    with open(config, encoding="utf-8") as f:
        hf = json.load(f)
    if "auto_map" in hf:
        raise ValueError(f"key 'actor_rollout_ref.model.trust_remote_code': {model_path} is a "
                         f"{hf.get('model_type', '?')!r} folder with its own modeling code (auto_map), which SGLang "
                         "loads only with trust_remote_code=True")


def installed_sglang_version() -> str | None:
    """The SGLang this machine would launch (None when not installed); read without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang")
    except PackageNotFoundError:
        return None


# ---- server arguments ---------------------------------------------------------------------------


def sglang_server_args(cfg, *, model_path: str | None = None, host: str = "127.0.0.1", port: int = 30000,
                       base_gpu_id: int = 0) -> dict[str, Any]:
    """`sglang.srt.server_args.ServerArgs` keyword arguments for one rollout replica (tp_size GPUs from
    base_gpu_id). Keys of rollout.engine_kwargs.sglang are passed through last, so they win."""
    arr = cfg.actor_rollout_ref
    r, mtp = arr.rollout, arr.model.mtp
    sleeps = arr.hybrid_engine and r.free_cache_engine  # colocated: releases its memory while the actor trains
    args: dict[str, Any] = {
        "model_path": model_path or arr.model.path,
        "host": host,
        "port": port,
        "tp_size": r.tensor_model_parallel_size,
        "base_gpu_id": base_gpu_id,
        "mem_fraction_static": r.gpu_memory_utilization,
        "dtype": r.dtype,
        "load_format": r.load_format,  # "dummy": the real weights arrive by the first sync
        "context_length": r.max_model_len or cfg.data.max_prompt_length + cfg.data.max_response_length,
        "max_running_requests": r.max_num_seqs,
        "chunked_prefill_size": r.max_num_batched_tokens if r.enable_chunked_prefill else -1,
        "disable_radix_cache": not r.enable_prefix_caching,
        "disable_cuda_graph": r.enforce_eager,
        "trust_remote_code": arr.model.trust_remote_code,
        "random_seed": cfg.trainer.seed,
        "skip_tokenizer_init": True,  # the trainer sends token ids and reads token ids
        "enable_metrics": r.prometheus.enable,
        # SGLang samples with a request's sampling_seed only in deterministic mode; without it seeded
        # (validation) requests are silently unseeded, so a seeded run asks for the mode explicitly via
        # engine_kwargs.sglang.enable_deterministic_inference (ServerRollout warns when a seed is ignored)
        # colocated: the trainer needs the GPU back between rollouts (release/resume memory occupation)
        "enable_memory_saver": sleeps,
        "enable_weights_cpu_backup": sleeps,
    }
    if mtp.enable and mtp.enable_rollout:
        args.update(speculative_args(mtp))
    extra = r.engine_kwargs.get("sglang") or {}
    # plain lists and dicts, so server_cli_args renders them as SGLang values, not ListConfig reprs
    args.update(OmegaConf.to_container(extra, resolve=True) if isinstance(extra, DictConfig) else dict(extra))
    return args


def speculative_args(mtp) -> dict[str, Any]:
    """model.mtp.speculative_* -> SGLang's speculative flags; errors name our config key."""
    key = "actor_rollout_ref.model.mtp."
    steps, topk = mtp.speculative_num_steps, mtp.speculative_eagle_topk
    if steps == "auto" or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"key '{key}speculative_num_steps': SGLang needs a fixed depth >= 1, got {steps!r} "
                         "('auto' is the native engine's adaptive depth)")
    draft_tokens = mtp.speculative_num_draft_tokens
    if draft_tokens is None:
        if topk != 1:
            raise ValueError(f"key '{key}speculative_num_draft_tokens': must be set when speculative_eagle_topk > 1 "
                             "(a tree's verified token count is a choice)")
        draft_tokens = steps + 1  # a chain of `steps` drafts verifies steps + 1 tokens
    return {
        "speculative_algorithm": mtp.speculative_algorithm,
        "speculative_num_steps": steps,
        "speculative_eagle_topk": topk,
        "speculative_num_draft_tokens": draft_tokens,
        # keep a CPU copy of the draft (MTP) weights across memory release/resume, or the draft wakes up
        # with the weights it had at launch while the target gets every update: the stale-draft failure
        "enable_draft_weights_cpu_backup": True,
    }


def server_cli_args(args: dict[str, Any]) -> list[str]:
    """ServerArgs kwargs -> `sglang.launch_server` flags: True -> bare flag; False and None -> omitted; a
    list -> one value per item (SGLang's nargs="+" flags); a dict -> JSON (its JSON-valued flags)."""
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        elif isinstance(value, dict):
            out += [flag, json.dumps(value)]
        elif value is not None and value is not False:
            out += [flag, str(value)]
    return out


def launch_command(args: dict[str, Any], python: str = sys.executable) -> list[str]:
    return [python, "-m", "sglang.launch_server", *server_cli_args(args)]


def replica_layout(cfg, num_replicas: int, base_port: int) -> list[tuple[int, int]]:
    """(port, base_gpu_id) of each replica on one node: tp_size consecutive GPUs each."""
    tp, gpus = cfg.actor_rollout_ref.rollout.tensor_model_parallel_size, cfg.trainer.n_gpus_per_node
    if num_replicas * tp > gpus:
        raise ValueError(f"{num_replicas} SGLang replicas x tensor_model_parallel_size {tp} need more than the "
                         f"{gpus} GPUs of a node (trainer.n_gpus_per_node); launch them per node")
    return [(base_port + i, i * tp) for i in range(num_replicas)]


def launch_sglang_replicas(cfg, num_replicas: int, *, host: str = "127.0.0.1", base_port: int = 30000,
                           model_path: str | None = None, log_dir: str | None = None,
                           startup_timeout: float = 1800.0):
    """Start this node's SGLang replicas and wait for /health; -> replica.ServerProcess list. On a cluster,
    run it once per node (e.g. from one Ray actor per node, host = that node's IP) and hand all URLs to
    client.ServerRollout."""
    layout = replica_layout(cfg, num_replicas, base_port)
    commands = [launch_command(sglang_server_args(cfg, model_path=model_path, host=host, port=port, base_gpu_id=gpu))
                for port, gpu in layout]
    return launch_replicas(commands, host, [port for port, _ in layout], log_dir, startup_timeout)


# ---- weight sync sequencing ------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncCall:
    """One HTTP call of a weight sync, sent to every replica at once. `per_replica` holds body fields that
    differ between replicas (one dict per replica, e.g. each replica's rank_offset). `payload` builds the
    body fields that carry tensors only when the call is sent (`resolved`), so one bucket's serialization
    exists at a time. While the call is in flight the trainer joins the weight group (`joins_group`) or
    broadcasts the listed tensors over it (`broadcast`); distributed mode only."""

    method: str
    path: str
    body: dict | None = None
    broadcast: tuple[str, ...] = ()
    per_replica: tuple[dict, ...] = ()
    joins_group: bool = False
    payload: Callable[[], dict] | None = None

    def body_for(self, replica: int) -> dict | None:
        return {**self.body, **self.per_replica[replica]} if self.per_replica else self.body

    def resolved(self) -> "SyncCall":
        """This call with its payload fields built into the body (run_plan does it right before sending)."""
        if self.payload is None:
            return self
        return dataclasses.replace(self, body={**self.payload(), **self.body}, payload=None)


def weight_update_group(master_address: str, master_port: int, num_replicas: int, ranks_per_replica: int,
                        backend: str = "nccl") -> dict:
    """init_group of a distributed sync: the trainer is rank 0, replica i's tensor-parallel ranks start at
    rank_offset 1 + i * ranks_per_replica. backend: nccl for SGLang on GPUs, gloo for our CPU server."""
    return {"master_address": master_address, "master_port": master_port, "backend": backend,
            "world_size": 1 + num_replicas * ranks_per_replica,
            "rank_offsets": [1 + i * ranks_per_replica for i in range(num_replicas)]}


def split_trunk_and_mtp(named_tensors) -> tuple[list, list]:
    named = list(named_tensors)
    return [(n, t) for n, t in named if MTP_MARK not in n], [(n, t) for n, t in named if MTP_MARK in n]


def update_buckets(named_tensors, bucket_bytes: int | None = None) -> list[list]:
    """The tensors of one sync, grouped into the update calls that carry them, in sending order: the trunk's,
    then the MTP layers' (never mixed), each cut into consecutive buckets of at most `bucket_bytes` (a
    larger tensor travels alone); None: one bucket per part. Every rank of a replica's group derives the
    same buckets from the same (name, dtype, shape) list, so their per-bucket payloads line up."""
    buckets = []
    for part in split_trunk_and_mtp(named_tensors):
        bucket, size = [], 0
        for name, t in part:
            nbytes = t.numel() * t.element_size()
            if bucket and bucket_bytes is not None and size + nbytes > bucket_bytes:
                buckets.append(bucket)
                bucket, size = [], 0
            bucket.append((name, t))
            size += nbytes
        if bucket:
            buckets.append(bucket)
    return buckets


def weight_sync_plan(named_tensors, version, mode: str, *, encode: Callable | None = None,
                     load_format: str | None = None, init_group: dict | None = None,
                     group_name: str = WEIGHT_GROUP_NAME, bucket_bytes: int | None = None,
                     protocol: SGLangVersion = SGLANG_VERSIONS[DEFAULT_SGLANG_VERSION]) -> list[SyncCall]:
    """The ordered calls of one sync for `protocol`'s SGLang version (see the module docstring); one update
    call per bucket of `update_buckets(named_tensors, bucket_bytes)`.

    mode "tensor": `encode(bucket) -> serialized_named_tensors` (one entry per tensor-parallel rank), called
    when the bucket's call is sent (SyncCall.payload).
    mode "distributed": tensors travel over the weight group; `init_group` (weight_update_group: address,
    port, world_size, backend, one rank_offset per replica) is sent first when given, i.e. on the first
    sync only. Only dtypes and shapes of the tensors are read in this mode (meta tensors will do).
    """
    if mode not in SYNC_MODES:
        raise ValueError(f"sync mode must be one of {SYNC_MODES}, got {mode!r}")
    if mode == "tensor" and encode is None:
        raise ValueError("tensor sync needs an encoder for serialized_named_tensors")
    parts = update_buckets(named_tensors, bucket_bytes)
    plan = [_init_call(init_group, group_name)] if init_group and mode == "distributed" else []
    plan.append(SyncCall("POST", "/pause_generation", {"mode": "abort"}))
    if protocol.update_session:
        plan.append(SyncCall("POST", "/begin_weight_update", {"selector": "all"}))
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        common = {"flush_cache": False, "weight_version": str(version) if last else None}
        if protocol.selector:
            common["selector"] = "all"  # never target-only: the draft must follow
        if mode == "tensor":
            plan.append(SyncCall("POST", "/update_weights_from_tensor", {"load_format": load_format, **common},
                                 payload=functools.partial(_serialized, encode, part)))
        else:
            body = {"names": [n for n, _ in part], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in part],
                    "shapes": [list(t.shape) for _, t in part], "group_name": group_name, **common}
            plan.append(SyncCall("POST", "/update_weights_from_distributed", body, tuple(body["names"])))
    if protocol.update_session:
        plan.append(SyncCall("POST", "/end_weight_update", {}))
    if not protocol.records_version_when_paused:
        plan.append(SyncCall("POST", "/update_weight_version", {"new_version": str(version),
                                                                "abort_all_requests": False}))
    plan += [SyncCall("POST", "/flush_cache", {}), SyncCall("POST", "/continue_generation", {}),
             SyncCall("GET", "/model_info")]
    return plan


def _serialized(encode: Callable, bucket: list) -> dict:
    return {"serialized_named_tensors": encode(bucket)}


def _init_call(init_group: dict, group_name: str) -> SyncCall:
    group = {"group_name": group_name, "backend": "nccl", **init_group}
    offsets = group.pop("rank_offsets", None)
    per_replica = tuple({"rank_offset": o} for o in offsets) if offsets is not None else ()
    return SyncCall("POST", "/init_weights_update_group", group, per_replica=per_replica, joins_group=True)


def sglang_tensor_payload(bucket, device=None):
    """One tensor-parallel rank's entry of serialized_named_tensors (load_format FLATTENED_BUCKET), built in
    the actor rank that sits on that SGLang rank's GPU; -> (entry, the flat tensor it points to). GPU image
    only. The caller keeps the flat tensor alive until the replica answered the update: the entry holds
    only a CUDA IPC handle to it.

    The bucket's tensors are put on `device` (this rank's GPU, default the current one; Megatron's TP/PP
    gather leaves CPU tensors, which no IPC handle can name), flattened into SGLang's FlattenedTensorBucket
    (one handle per bucket) and serialized by its MultiprocessingSerializer after its
    monkey_patch_torch_reductions(), so the handle names the GPU by UUID and the scheduler rank opens it
    under its own CUDA_VISIBLE_DEVICES order. (device="cpu" builds the same structure with shared-memory
    handles and no patch: what the CPU contract test opens with each release's own classes.)
    """
    import torch
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    flat = FlattenedTensorBucket(named_tensors=[(n, t.detach().to(device)) for n, t in bucket])
    if device.type == "cuda":  # the patch rewrites CUDA handles only (it breaks CPU tensors' reduction)
        monkey_patch_torch_reductions()
        torch.cuda.current_stream(device).synchronize()  # the copies must land before a receiver maps them
    entry = {"flattened_tensor": flat.get_flattened_tensor(), "metadata": flat.get_metadata()}
    return MultiprocessingSerializer.serialize(entry, output_str=True), flat.get_flattened_tensor()


# ---- stale-draft guard -----------------------------------------------------------------------------


class StaleDraftError(RuntimeError):
    pass


@dataclass
class StaleDraftGuard:
    """After each weight sync, the next batch's accept length must not collapse towards 1.0 while the
    running baseline was well above it: that is what a draft left behind by the sync looks like (the
    target moved, the draft did not), and it turns speculation into a net loss without any error.

    Judged on the passes that drafted (`SpecStats.drafting_accept_length`): adaptive depth may run
    most rounds at depth 0 when speculation does not pay at that moment (e.g. a loaded machine), which
    lowers the overall accept length without any staleness.
    Collapse: length - 1 < collapse_ratio * (baseline - 1), with baseline >= min_baseline (below it
    speculation barely pays, and an untrained draft sampled at T=1 already reaches ~1.3 by chance).
    Batches without speculation, or with fewer than min_verify_passes drafting passes, are not judged.
    Feed it batches of one regime (the training batches): greedy validation accepts differently.
    """

    min_baseline: float = 1.5
    collapse_ratio: float = 0.25
    min_verify_passes: int = 16
    ema: float = 0.5
    baseline: float | None = None
    armed_version: Any = None  # set by after_sync, cleared once the next batch is judged

    def after_sync(self, version) -> None:
        self.armed_version = version

    def observe(self, stats: SpecStats) -> None:
        if stats.drafted == 0 or stats.drafting_passes < self.min_verify_passes:
            return
        length = stats.drafting_accept_length
        if self.armed_version is not None and self.baseline is not None and self.baseline >= self.min_baseline \
                and length - 1 < self.collapse_ratio * (self.baseline - 1):
            raise StaleDraftError(
                f"stale draft after weight sync v{self.armed_version}: accept length (passes that drafted) fell to "
                f"{length:.2f} from a running {self.baseline:.2f}. Drafts are almost never accepted, the signature "
                "of MTP/draft weights that were not refreshed: check that the sync carries the model.mtp_layers.* "
                "tensors, that the server applied them (SGLang 0.5.23: selector=all; SGLang 0.5.6: distributed sync does "
                "not reach the draft; colocated MTP rollout needs --enable-draft-weights-cpu-backup), and that "
                "the actor trains the MTP layers.")
        self.armed_version = None
        self.baseline = length if self.baseline is None else (1 - self.ema) * self.baseline + self.ema * length
