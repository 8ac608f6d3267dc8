"""The one training-engine interface. Workers and the driver never branch on the backend: they hold
a `TrainingEngine` and a backend-agnostic `PolicyActor` (engines/actor.py) that computes losses."""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from verl_mtp.batch import Batch
from verl_mtp.models import MTPOutput

# loss_fn(model_output, micro_batch) -> (loss to backpropagate, metrics)
LossFn = Callable[[MTPOutput, Batch], "tuple[torch.Tensor, dict[str, float]]"]


class TrainingEngine(ABC):
    """Owns the model (possibly sharded), its optimizer and LR schedule."""

    @abstractmethod
    def forward_backward(self, micro_batches: list[Batch], loss_fn: LossFn) -> list[dict[str, float]]:
        """Forward and backward every micro-batch, accumulating gradients; metrics per micro-batch."""

    @abstractmethod
    def optimizer_step(self) -> float:
        """Clip, step, advance the LR schedule and zero grads; returns the grad norm. A non-finite
        norm skips the update (grads are dropped) and is returned as is, for the caller to count."""

    @abstractmethod
    def infer(self, micro_batches: list[Batch], fn: Callable[[MTPOutput, Batch], Any]) -> list[Any]:
        """No-grad forward of each micro-batch, mapped through `fn`."""

    @abstractmethod
    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full (unsharded) tensors in HF/MiMo names: what a weight sync sends."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer and scheduler state for an exact resume."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def save_hf(self, path: str) -> None:
        """An HF/MiMo folder (config.json + safetensors) of the current weights."""

    @property
    @abstractmethod
    def lr(self) -> float: ...

    @property
    @abstractmethod
    def num_mtp_layers(self) -> int: ...

    @property
    def data_parallel_rank(self) -> int:
        """Which data shard this rank gets (ranks of one model-parallel group share a shard)."""
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def data_parallel_size(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# actor.strategy -> "module:Class"; imported lazily so that megatron loads only when chosen
ENGINES = {
    "torch": "verl_mtp.engines.torch_engine:TorchEngine",
    "fsdp": "verl_mtp.engines.torch_engine:TorchEngine",
    "fsdp2": "verl_mtp.engines.torch_engine:TorchEngine",
    "megatron": "verl_mtp.engines.megatron_engine:MegatronEngine",
}


def build_engine(strategy: str, **kwargs) -> TrainingEngine:
    """Backend-specific settings (e.g. `megatron=` parallel sizes) go only to engines that take them."""
    if strategy not in ENGINES:
        raise ValueError(f"actor_rollout_ref.actor.strategy={strategy!r}: choose one of {sorted(ENGINES)}")
    module, name = ENGINES[strategy].split(":")
    cls = getattr(importlib.import_module(module), name)
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})
