"""Plain-PyTorch training engine: one process per rank, DDP over gloo (CPU) or NCCL (GPU)."""

from __future__ import annotations

import dataclasses
import functools
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from verl_mtp.batch import Batch
from verl_mtp.device import named_dtype
from verl_mtp.engines.base import MicroBatchFn, TrainingEngine
from verl_mtp.engines.core import (OptimConfig, apply_update, autocast, build_optimizer, clip_gradients, clip_groups,
                                   clip_norm, compute_dtype, fsdp_config_key, norm_metrics)
from verl_mtp.engines.offload import StorageOffload
from verl_mtp.models import MTPCausalLM


def checkpoint_layers(model: MTPCausalLM) -> None:
    """Every decoder and MTP layer keeps only its inputs for backward and recomputes its activations
    there (torch.utils.checkpoint, non-reentrant; MTPCausalLM has no switch of its own). The forward is
    replaced on the instance, so module and parameter names stay unchanged."""
    for layer in (*model.model.layers, *model.model.mtp_layers):
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


class TorchEngine(TrainingEngine):
    """model: an MTPCausalLM already on its device. optim: the `actor.optim` config as a dict, or None
    for a frozen role (reference policy). num_mtp / mtp_detach decide what the forward computes.
    fsdp: the `actor.fsdp_config` dict; its `param_offload` (parameters and their grads) and
    `optimizer_offload` (AdamW moments) say what `offload` moves to CPU; `model_dtype` is the dtype of the
    weights AdamW updates (the master copy) and `dtype` the compute dtype of the forward and backward
    (torch.autocast), honoured where the device runs it natively (engines.core.compute_dtype: bf16 on a
    GPU or a CPU with AVX512-BF16/AMX), else one warning and fp32. gradient_checkpointing:
    `model.enable_gradient_checkpointing` (see `checkpoint_layers`)."""

    compute_dtype: torch.dtype | None = None  # autocast dtype of the forward and backward; None: the master dtype

    def __init__(self, model: MTPCausalLM, optim: dict | None = None, total_steps: int = 1,
                 num_mtp: int = 0, mtp_detach: bool = True, fsdp: dict | None = None,
                 gradient_checkpointing: bool = False, mtp_lr_scale: float = 1.0):
        self.module = model
        fsdp = fsdp or {}
        self.precision_keys = {k: fsdp[k] for k in ("model_dtype", "dtype") if k in fsdp}
        self.fsdp_key = fsdp_config_key(frozen=optim is None)  # names these settings in messages
        if gradient_checkpointing and optim is not None:
            checkpoint_layers(model)
        self.offload_params = bool(fsdp.get("param_offload"))
        self.offload_optimizer = bool(fsdp.get("optimizer_offload"))
        self.moved = StorageOffload()
        self.num_mtp = num_mtp
        self.mtp_detach = mtp_detach
        self.model = self._wrap(model, training=optim is not None)
        self.optimizer = self.scheduler = None
        self.clip_grad = None
        if optim is not None:
            config = OptimConfig.from_verl(optim, total_steps, mtp_lr_scale)
            self.optimizer, self.scheduler = build_optimizer(model.parameters(), config,
                                                             mtp=model.model.mtp_layers.parameters())
            self.clip_grad = config.clip_grad
        else:
            model.requires_grad_(False)

    def _mixed_precision(self, model: MTPCausalLM) -> torch.dtype | None:
        """Puts the master weights in `model_dtype` (as built when the key is absent); returns the autocast
        dtype from `dtype` (None: compute in the master dtype)."""
        key, keys = self.fsdp_key, self.precision_keys
        if "model_dtype" in keys:
            model.to(named_dtype(keys["model_dtype"], key + "model_dtype"))
        master = next(model.parameters())
        dtype = compute_dtype(keys.get("dtype", "float32"), master.device, key + "dtype")
        return None if dtype in (None, master.dtype) else dtype

    def _wrap(self, model: MTPCausalLM, training: bool) -> torch.nn.Module:
        """What runs the forward: DDP when training over several ranks, else the model itself; the master and
        compute dtypes are set here (an engine that shards the model does its own mixed precision)."""
        self.compute_dtype = self._mixed_precision(model)
        if not (training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return model
        # MTP layers sit idle when MTP training is off: then DDP must tolerate unused parameters
        idle = self.num_mtp < model.num_mtp_layers
        # no buffer broadcast: RoPE's inv_freq is a constant, and a collective in every forward would
        # make ranks with fewer micro-batches than the others wait for ever
        return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=idle, broadcast_buffers=False)

    def _forward(self, micro: Batch, mtp: bool = True):
        forward = functools.partial(self.model, micro.input_ids, attention_mask=micro.attention_mask,
                                    position_ids=micro.position_ids, num_mtp=self.num_mtp if mtp else 0,
                                    mtp_detach=self.mtp_detach)
        if self.compute_dtype is None:
            return forward()
        with autocast(micro.input_ids.device, self.compute_dtype):
            out = forward()
        # log-probs, entropies and the MTP loss are computed from fp32 logits, as in the fp32 path
        return dataclasses.replace(out, logits=out.logits.float(), mtp_logits=[m.float() for m in out.mtp_logits])

    def forward_backward(self, micro_batches: list[Batch], loss_fn: MicroBatchFn) -> list[dict[str, float]]:
        self.reload()
        self.model.train()
        metrics = []
        for i, micro in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # DDP all-reduces gradients once, on the last micro-batch
            sync = nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                loss, m = loss_fn(self._forward(micro, loss_fn.mtp), micro)
                loss.backward()
            metrics.append(m)
        return metrics

    def optimizer_step(self) -> dict[str, float]:
        """With a detached MTP loss the trunk and the MTP layers are clipped separately, so a large MTP
        gradient cannot shrink the policy's update either."""
        self.reload()
        groups = clip_groups(self.module.named_parameters(), split=bool(self.mtp_detach and self.num_mtp))
        norms = clip_gradients(groups, self._clip)
        apply_update(self.optimizer, self.scheduler, norms)
        return norm_metrics(norms, "actor")

    def _clip(self, params: list[torch.nn.Parameter]) -> float:
        return clip_norm(params, self.clip_grad)

    @torch.no_grad()
    def infer(self, micro_batches: list[Batch], fn: MicroBatchFn) -> list[Any]:
        self.reload()
        self.model.eval()
        return [fn(self._forward(m, fn.mtp), m) for m in micro_batches]

    def offload(self) -> None:
        """Parameters (with their grads) and/or the AdamW moments to pinned CPU memory, on CUDA only."""
        if self.moved.active or not next(self.module.parameters()).is_cuda:
            return
        params = list(self.module.parameters())
        if self.offload_params:
            self.moved.offload(params + [p.grad for p in params if p.grad is not None])
        if self.offload_optimizer and self.optimizer is not None:
            self.moved.offload(t for state in self.optimizer.state.values() for t in state.values()
                               if torch.is_tensor(t) and t.is_cuda)
        torch.cuda.empty_cache()

    def reload(self) -> None:
        self.moved.reload()

    def named_tensors(self):
        self.reload()
        return self.module.state_dict().items()

    def state_dict(self) -> dict[str, Any]:
        self.reload()
        state = {"model": self.module.state_dict()}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reload()
        self.module.load_state_dict(state["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])

    def save_hf(self, path: str) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return  # every rank calls it (the engine contract); the replicas hold the same weights: rank 0 writes
        self.reload()
        self.module.save_pretrained(path)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0] if self.scheduler else 0.0

    @property
    def num_mtp_layers(self) -> int:
        return self.module.num_mtp_layers
