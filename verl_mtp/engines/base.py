"""The one training-engine interface. Workers and the driver never branch on the backend: they hold
a `TrainingEngine` and a backend-agnostic `PolicyActor` (engines/actor.py) that computes losses."""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from verl_mtp.batch import Batch
from verl_mtp.models import MTPCausalLM, MTPOutput


def _no_targets(micro: Batch) -> dict[str, torch.Tensor]:
    return {}


@dataclass(frozen=True)
class MicroBatchFn:
    """What an engine computes from each micro-batch's forward, in two stages, so that an engine that
    splits every sequence over ranks (megatron context parallel) runs the heavy stage where the logits
    are and exchanges only per-token values:

        targets(micro) -> {name: (B, S)}              per-position inputs of per_token (split like the sequence)
        per_token(out, targets) -> {name: (B, T, ...)} per-position values of a forward over T positions;
                                                       position-wise: value t reads only out[:, t], targets[:, t]
        reduce(values, out, micro) -> result          from the values of all S positions, in order

    `out` in `reduce` is this rank's forward: read only its sequence-level fields (aux_loss, moe_stats)
    there, since under context parallel its logits cover a part of the positions. For
    `forward_backward`, the result is (loss to backpropagate, metrics)."""

    per_token: Callable[[MTPOutput, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    reduce: Callable[[dict[str, torch.Tensor], MTPOutput, Batch], Any]
    targets: Callable[[Batch], dict[str, torch.Tensor]] = _no_targets
    mtp: bool = True  # the forward runs the engine's MTP depths; a log-prob pass needs only the trunk

    def __call__(self, out: MTPOutput, micro: Batch) -> Any:
        """Both stages on a forward over the whole sequence."""
        return self.reduce(self.per_token(out, self.targets(micro)), out, micro)


class TrainingEngine(ABC):
    """Owns the model (possibly sharded), its optimizer and LR schedule."""

    @abstractmethod
    def forward_backward(self, micro_batches: list[Batch], loss_fn: MicroBatchFn) -> list[dict[str, float]]:
        """Forward and backward every micro-batch, accumulating gradients; metrics per micro-batch."""

    @abstractmethod
    def optimizer_step(self) -> dict[str, float]:
        """Clip, step, advance the LR schedule and zero grads; returns the grad norms before clipping:
        `actor/grad_norm` (all parameters) and, when the trunk and the detached MTP layers are clipped
        separately, `actor/grad_norm_trunk` and `actor/grad_norm_mtp`. A non-finite norm skips the
        update (grads are dropped, the LR schedule does not advance) and is returned as is, for the
        caller to count. The torch and FSDP2 engines do this with the training core (engines/core.py)."""

    @abstractmethod
    def infer(self, micro_batches: list[Batch], fn: MicroBatchFn) -> list[Any]:
        """No-grad forward of each micro-batch; what `fn` made of each."""

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
        """An HF/MiMo folder (config.json + safetensors) of the current weights. Every rank calls it (a
        sharded engine gathers collectively); rank 0 of the default process group writes."""

    @abstractmethod
    def offload(self) -> None:
        """Between phases (a colocated rollout generating): move what the backend's offload keys ask
        for to CPU, freeing accelerator memory. Idempotent; a no-op on a CPU device."""

    @abstractmethod
    def reload(self) -> None:
        """Undo `offload` (the next forward does it too); the state is exactly as before."""

    @contextmanager
    def offloaded(self):
        """`with engine.offloaded(): rollout.generate(...)`"""
        self.offload()
        try:
            yield
        finally:
            self.reload()

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

    @property
    def data_parallel_group(self) -> dist.ProcessGroup | None:
        """The ranks holding different data (None: the whole world)."""
        return None

    def data_parallel_sum(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (on the CPU) summed over the data-parallel ranks; every one of them must call it."""
        if self.data_parallel_size == 1:
            return x
        group = self.data_parallel_group
        y = x.to("cuda" if dist.get_backend(group) == "nccl" else "cpu")
        dist.all_reduce(y, group=group)
        return y.cpu()


# actor.strategy -> "module:Class"; imported lazily so that megatron loads only when chosen
ENGINES = {
    "torch": "verl_mtp.engines.torch_engine:TorchEngine",
    "fsdp": "verl_mtp.engines.fsdp_engine:FSDPEngine",  # as verl today: FSDP means FSDP2 here
    "fsdp2": "verl_mtp.engines.fsdp_engine:FSDPEngine",
    "megatron": "verl_mtp.engines.megatron_engine:MegatronEngine",
}


def write_hf(config, named_tensors, path: str) -> None:
    """Rank 0 writes an HF/MiMo folder of full tensors that every rank iterates (gathering them is a
    collective for sharded engines); the others only take part in the gathers."""
    writer = not dist.is_initialized() or dist.get_rank() == 0
    tensors = {n: t.cpu() for n, t in named_tensors if writer}
    if not writer:
        return
    with torch.device("meta"):
        shell = MTPCausalLM(config)
    shell.load_state_dict(tensors, assign=True)
    shell.save_pretrained(path)


def build_engine(strategy: str, **kwargs) -> TrainingEngine:
    """Backend-specific settings (e.g. `megatron=` parallel sizes) go only to engines that take them."""
    if strategy not in ENGINES:
        raise ValueError(f"actor_rollout_ref.actor.strategy={strategy!r}: choose one of {sorted(ENGINES)}")
    module, name = ENGINES[strategy].split(":")
    cls = getattr(importlib.import_module(module), name)
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})
