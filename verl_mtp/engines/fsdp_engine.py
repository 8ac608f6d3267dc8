"""FSDP2 training engine (`torch.distributed.fsdp.fully_shard`): parameters, gradients and AdamW
moments sharded over the data-parallel ranks; selected by `actor.strategy=fsdp2` (and `fsdp`).

One FSDP unit per trunk decoder layer and per MTP layer, plus the root (embeddings, final norm, LM
head: tied weights stay in one unit). Everything else is the torch engine's: the forward, the
micro-batch loop, the separate trunk / detached-MTP clipping (`clip_grad_norm_` on DTensors), the LR
schedule. What this engine adds:

- `fsdp_config.fsdp_size`: -1 (or the world size) shards over every rank; a divisor d of the world
  builds a 2-D mesh (world/d replicas x d shards, HSDP); anything else is refused.
- Mixed precision: `fsdp_config.dtype` for the all-gathered parameters and the compute, `model_dtype`
  for the sharded master weights and AdamW, gradients reduced in fp32. The compute dtype follows the
  training core's rule (`engines.core.compute_dtype`, as the torch engine): honoured where the device
  runs it natively (a GPU, or a CPU with AVX512-BF16/AMX), else one warning naming the key and fp32.
- `model.enable_gradient_checkpointing` as in the torch engine (`checkpoint_layers`), applied before
  sharding so that each layer's FSDP hooks wrap its recomputed forward.
- `param_offload` on CUDA: `CPUOffloadPolicy` (sharded parameters, gradients and the optimizer step
  live on the CPU); `optimizer_offload`: the AdamW moments leave the GPU between phases.
- Weights out: `named_tensors` gathers one full tensor at a time (`full_tensor()`), a collective every
  rank enters in the same order; checkpoints are `torch.distributed.checkpoint` folders in which each
  rank writes and reads its own shards (`save_checkpoint` / `load_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map_only

from verl_mtp.batch import Batch
from verl_mtp.device import named_dtype
from verl_mtp.engines.base import MicroBatchFn, write_hf
from verl_mtp.engines.core import compute_dtype
from verl_mtp.engines.torch_engine import TorchEngine
from verl_mtp.models import MTPCausalLM
from verl_mtp.net import free_port


def ensure_process_group(device: torch.device) -> None:
    """A world of one when no group is set up (one process, e.g. the tests or a single-rank run)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def data_parallel_mesh(fsdp_size: int, device_type: str, key: str) -> DeviceMesh:
    """1-D over all ranks, or 2-D (replicate x shard) when fsdp_size is a proper divisor of the world (`key`:
    the fsdp_config's, named in the error)."""
    world = dist.get_world_size()
    if fsdp_size in (-1, world):
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    if fsdp_size < 1 or world % fsdp_size:
        raise ValueError(f"{key}fsdp_size={fsdp_size}: must be -1 (all ranks) or divide the {world} ranks")
    return init_device_mesh(device_type, (world // fsdp_size, fsdp_size), mesh_dim_names=("replicate", "shard"))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def param_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the parameters this rank holds, bytes of the whole model), each parameter once."""
    params = {id(p): p for p in model.parameters()}.values()
    local = sum(_local(p).numel() * p.element_size() for p in params)
    return local, sum(p.numel() * p.element_size() for p in params)


class FSDPEngine(TorchEngine):
    """Arguments as the torch engine's, plus: fsdp: the `actor.fsdp_config` dict (see the module
    docstring); mixed_precision: compute in `fsdp_config.dtype` (True), in the master dtype (False), or
    where the device runs that dtype natively (None, the training core's rule)."""

    def __init__(self, model: MTPCausalLM, optim: dict | None = None, total_steps: int = 1, num_mtp: int = 0,
                 mtp_detach: bool = True, fsdp: dict | None = None, gradient_checkpointing: bool = False,
                 mixed_precision: bool | None = None, mtp_lr_scale: float = 1.0):
        self.fsdp = {"fsdp_size": -1, "reshard_after_forward": True, "dtype": "float32", "model_dtype": "fp32",
                     **(fsdp or {})}
        self.device = next(model.parameters()).device
        self.mixed_precision = mixed_precision
        self.bytes_logged = False
        super().__init__(model, optim, total_steps, num_mtp, mtp_detach, fsdp, gradient_checkpointing, mtp_lr_scale)

    def _wrap(self, model: MTPCausalLM, training: bool) -> torch.nn.Module:
        model.to(named_dtype(self.fsdp["model_dtype"], self.fsdp_key + "model_dtype"))
        if self.mixed_precision is None:  # compute None: the master dtype
            compute = compute_dtype(self.fsdp["dtype"], self.device, self.fsdp_key + "dtype")
        else:
            compute = named_dtype(self.fsdp["dtype"], self.fsdp_key + "dtype") if self.mixed_precision else None
        ensure_process_group(self.device)
        mesh = data_parallel_mesh(self.fsdp["fsdp_size"], self.device.type, self.fsdp_key)
        offload = self.offload_params and self.device.type == "cuda"
        shard = functools.partial(fully_shard, mesh=mesh, reshard_after_forward=self.fsdp["reshard_after_forward"],
                                  mp_policy=MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32),
                                  offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
        for layer in (*model.model.layers, *model.model.mtp_layers):
            shard(layer)
        return shard(model)

    # ---- training --------------------------------------------------------------------------

    def forward_backward(self, micro_batches: list[Batch], loss_fn: MicroBatchFn) -> list[dict[str, float]]:
        """Every rank runs as many forwards and backwards as the busiest one (each all-gathers and
        reduce-scatters): a rank with fewer micro-batches repeats its first one with its loss times zero."""
        missing = self._missing(len(micro_batches))  # before any forward: a collective of its own
        metrics = super().forward_backward(micro_batches, loss_fn)
        if missing:
            idle = dataclasses.replace(loss_fn, reduce=lambda values, out, micro: (
                loss_fn.reduce(values, out, micro)[0] * 0.0, {}))
            super().forward_backward([micro_batches[0]] * missing, idle)
        return metrics

    def _missing(self, count: int) -> int:
        """How many fewer micro-batches this rank has than the rank with the most."""
        most = torch.tensor([count], device=self._comm_device())
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return int(most) - count

    def _comm_device(self) -> torch.device:
        return torch.device("cuda") if self.device.type == "cuda" else torch.device("cpu")

    def optimizer_step(self) -> dict[str, float]:
        """The torch engine's step; the first one also reports the parameter bytes this rank holds
        (`actor/param_bytes_local`) against the whole model's (`actor/param_bytes_total`)."""
        metrics = super().optimizer_step()
        if not self.bytes_logged:
            metrics["actor/param_bytes_local"], metrics["actor/param_bytes_total"] = map(float,
                                                                                         param_bytes(self.module))
            self.bytes_logged = True
        return metrics

    def _clip(self, params: list[torch.nn.Parameter]) -> float:
        if not params:
            return 0.0
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # over the shards: a DTensor
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        torch.nn.utils.clip_grads_with_norm_(params, self.clip_grad or float("inf"), norm)
        return float(norm)

    @torch.no_grad()
    def infer(self, micro_batches: list[Batch], fn: MicroBatchFn) -> list[Any]:
        padded = micro_batches + [micro_batches[0]] * self._missing(len(micro_batches))
        return super().infer(padded, fn)[: len(micro_batches)]

    # ---- offload ---------------------------------------------------------------------------

    def offload(self) -> None:
        """On CUDA: the unsharded parameters are freed (`reshard`); with `optimizer_offload` the AdamW
        moments go to pinned CPU memory. (`param_offload` keeps the shards on the CPU all along.)"""
        if self.moved.active or self.device.type != "cuda":
            return
        self.model.reshard()
        if self.offload_optimizer and self.optimizer is not None:
            self.moved.offload(_local(t) for state in self.optimizer.state.values() for t in state.values()
                               if torch.is_tensor(t) and _local(t).is_cuda)
        torch.cuda.empty_cache()

    # ---- weights and checkpoints -----------------------------------------------------------

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full tensors, gathered one at a time as the caller iterates: every rank must iterate all."""
        self.reload()
        for name, t in self.module.state_dict().items():
            if isinstance(t, DTensor):
                t = t.to(self._comm_device()).full_tensor()  # CPU-offloaded shards gather on the device
            yield name, t.detach()

    def _sharded_state(self) -> dict[str, Any]:
        """Model and AdamW state as this rank's DTensor shards (AdamW's initialised if it has not stepped)."""
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.module)}
        model, optimizer = get_state_dict(self.module, self.optimizer)
        return {"model": model, "optimizer": optimizer, "scheduler": self.scheduler.state_dict()}

    def state_dict(self) -> dict[str, Any]:
        """This rank's shards as plain tensors (what a per-rank `torch.save` file holds and a
        weights-only load reads back), plus the LR schedule; `load_state_dict` re-wraps them."""
        self.reload()
        return tree_map_only(DTensor, lambda t: t.to_local().detach().clone(), self._sharded_state())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """`state_dict`'s shards (same world size and fsdp_size), or, for the model, full tensors (an HF
        folder's): every rank keeps its own shard of those."""
        self.reload()
        like = self._sharded_state()
        full = all(t.shape == like["model"][k].shape for k, t in state["model"].items() if k in like["model"])
        model = state["model"] if full else _as_shards(state["model"], like["model"])
        # a tied LM head is absent from an HF folder: it is the embedding
        strict = not self.module.config.tie_word_embeddings
        set_model_state_dict(self.module, model, options=StateDictOptions(full_state_dict=full, strict=strict))
        if self.optimizer is not None:
            set_optimizer_state_dict(self.module, self.optimizer, _as_shards(state["optimizer"], like["optimizer"]))
            self.scheduler.load_state_dict(state["scheduler"])

    def save_checkpoint(self, folder: str) -> None:
        """Every rank: a `torch.distributed.checkpoint` folder, each rank writing its own shards."""
        self.reload()
        dcp.save(self._sharded_state(), checkpoint_id=folder)

    def load_checkpoint(self, folder: str) -> None:
        """Every rank: read its shards of `save_checkpoint`'s folder (DCP reshards to this mesh)."""
        self.reload()
        state = self._sharded_state()
        dcp.load(state, checkpoint_id=folder)
        set_model_state_dict(self.module, state["model"])
        if self.optimizer is not None:
            set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])

    def save_hf(self, path: str) -> None:
        write_hf(self.module.config, self.named_tensors(), path)


def _as_shards(state: Any, like: Any) -> Any:
    """Plain local tensors of `state` as DTensors laid out like the matching entries of `like`."""
    if isinstance(like, DTensor):
        local = state.to_local() if isinstance(state, DTensor) else state
        return DTensor.from_local(local.to(like.device), like.device_mesh, like.placements, shape=like.shape,
                                  stride=like.stride())
    if isinstance(state, dict):
        return {k: _as_shards(v, like[k]) if k in like else v for k, v in state.items()}
    if isinstance(state, list):
        return [_as_shards(v, w) for v, w in zip(state, like)] if len(state) == len(like) else state
    return state
