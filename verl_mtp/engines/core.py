"""The training core: what every stage that updates weights shares (SFT, DPO, the MTP warm start and the
RL torch engine), so that each stage file keeps only what is specific to it.

- `OptimConfig` -> `build_optimizer`: AdamW and a LambdaLR schedule (linear warmup, then constant,
  cosine or linear decay) from one config shape; each stage's defaults are values of that shape
  (SFT: betas (0.9, 0.95), no decay of norms and biases; DPO: AdamW's default betas; RL: verl's
  `actor.optim` keys).
- `clip_groups` / `clip_gradients` / `apply_update`: with a detached MTP loss the trunk and the MTP
  layers are clipped separately (under one joint norm a large MTP gradient would shrink the trunk's
  step, which detaching is meant to rule out); a non-finite norm skips the update and its schedule step.
- `save_checkpoint` / `find_checkpoint` / `load_checkpoint`: one atomic checkpoint folder (tensors as
  safetensors, optimizer + schedule + torch RNG, a JSON state) from which a resumed run continues
  bit for bit; `MetricsLog`, the metrics file that a resume continues as one run; `DeferredInterrupt`,
  Ctrl-C acted on at a step boundary, so the checkpoint written on the way out is consistent.
- `pad_batch`: right-padded input_ids / attention_mask / loss mask from token lists.
- `compute_dtype` / `autocast`: mixed precision by the one rule `device.native_dtype`; `fsdp_config_key`
  names the actor's or the reference's settings in messages.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from verl_mtp.algos.schedule import LR_STYLES, lr_lambda
from verl_mtp.device import native_dtype

MTP_PARAMS = ".mtp_layers."  # in a parameter's name: it belongs to an MTP layer


# ---- optimizer and LR schedule -------------------------------------------------------------------


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its LR schedule. `decay_vectors=False`: weight decay on matrices and embeddings only, not
    on norms and biases (those go to a second parameter group)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    decay_vectors: bool = True
    schedule: str = "constant"  # after linear warmup: constant | cosine | linear (to min_lr_ratio at total_steps)
    warmup_steps: int = 0
    total_steps: int = 1
    min_lr_ratio: float = 0.0
    clip_grad: float | None = None  # max gradient norm; 0 or None: no clipping (the norm is still reported)
    mtp_lr_scale: float = 1.0  # the MTP layers' lr over `lr` (`build_optimizer`'s `mtp` parameters)

    @classmethod
    def from_verl(cls, optim: dict, total_steps: int, mtp_lr_scale: float = 1.0) -> "OptimConfig":
        """From verl's `actor.optim` keys: a negative or missing lr_warmup_steps means
        lr_warmup_steps_ratio of the total."""
        warmup = optim.get("lr_warmup_steps")
        if warmup is None or warmup < 0:
            warmup = int(optim.get("lr_warmup_steps_ratio", 0.0) * total_steps)
        return cls(lr=optim["lr"], betas=tuple(optim.get("betas", (0.9, 0.999))),
                   weight_decay=optim.get("weight_decay", 0.0), schedule=optim.get("lr_scheduler_type", "constant"),
                   warmup_steps=warmup, total_steps=total_steps, min_lr_ratio=optim.get("min_lr_ratio", 0.0),
                   clip_grad=optim.get("clip_grad"), mtp_lr_scale=mtp_lr_scale)


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig, mtp: Iterable[torch.nn.Parameter] = ()
                    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `params`; those also in `mtp` (the MTP layers') step at `cfg.mtp_lr_scale` x the lr, in
    groups of their own (only when the scale is not 1, so the optimizer's layout, and a checkpoint of it,
    is otherwise the same as without it). The schedule scales every group's lr alike."""
    if cfg.schedule not in LR_STYLES:
        raise ValueError(f"unknown LR schedule {cfg.schedule!r}: choose one of {', '.join(LR_STYLES)}")
    params = list(params)
    scaled = {id(p) for p in mtp} if cfg.mtp_lr_scale != 1.0 else set()
    sets = [(1.0, [p for p in params if id(p) not in scaled])]
    if scaled:
        sets.append((cfg.mtp_lr_scale, [p for p in params if id(p) in scaled]))
    groups = []
    for scale, members in sets:
        split = [(members, cfg.weight_decay)] if cfg.decay_vectors else [
            ([p for p in members if p.dim() >= 2], cfg.weight_decay), ([p for p in members if p.dim() < 2], 0.0)]
        groups += [{"params": ps, "weight_decay": wd, "lr": cfg.lr * scale} for ps, wd in split if ps or not scaled]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    schedule = functools.partial(lr_lambda, warmup_steps=cfg.warmup_steps, total_steps=cfg.total_steps,
                                 style=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


# ---- gradient clipping and the update ------------------------------------------------------------


def clip_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], split: bool
                ) -> dict[str, list[torch.nn.Parameter]]:
    """{"all": every parameter}, or with `split` (a detached MTP loss) {"trunk": ..., "mtp": ...}."""
    named = list(named_params)
    if not split:
        return {"all": [p for _, p in named]}
    return {"trunk": [p for n, p in named if MTP_PARAMS not in n], "mtp": [p for n, p in named if MTP_PARAMS in n]}


def clip_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """Clip the gradients of `params` to `max_norm` (0 or None: no clipping); their norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf))


def clip_gradients(groups: dict[str, list[torch.nn.Parameter]],
                   clip: Callable[[list[torch.nn.Parameter]], float]) -> dict[str, float]:
    """Each group clipped on its own by `clip` (e.g. `functools.partial(clip_norm, max_norm=1.0)`); their
    norms before clipping."""
    return {name: clip(params) for name, params in groups.items()}


def norm_metrics(norms: dict[str, float], prefix: str) -> dict[str, float]:
    """`{prefix}/grad_norm` over all parameters and, when clipped in groups, `{prefix}/grad_norm_{group}`."""
    total = math.sqrt(sum(n * n for n in norms.values()))
    return {f"{prefix}/grad_norm": total, **({f"{prefix}/grad_norm_{k}": v for k, v in norms.items()}
                                            if len(norms) > 1 else {})}


def apply_update(optimizer: torch.optim.Optimizer, scheduler, norms: dict[str, float]) -> bool:
    """Step the optimizer and the schedule unless a gradient norm is not finite (the weights are never
    poisoned, and a skipped update does not count in the schedule, as in every RL engine), then zero the
    gradients. Returns whether the update was applied."""
    finite = all(math.isfinite(n) for n in norms.values())
    if finite:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return finite


# ---- checkpoints -----------------------------------------------------------------------------------


class CheckpointMismatch(ValueError):
    """A checkpoint's tensors do not fit the model they are loaded into."""


STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by name, each tensor once (tied embeddings appear under their first name only)."""
    return {n: p.detach() for n, p in module.named_parameters()}


def load_module_tensors(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path | str) -> None:
    own = dict(module.named_parameters())
    if set(own) != set(tensors) or any(own[n].shape != t.shape for n, t in tensors.items()):
        raise CheckpointMismatch(f"{where}: tensors do not match this model (was it written with other model "
                                 f"options?)")
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t)


def save_checkpoint(folder: Path, tensors: dict[str, dict[str, torch.Tensor]], optimizer, scheduler,
                    state: dict) -> None:
    """`folder` holds `{name}.safetensors` per entry of `tensors` (e.g. model, ema), optimizer.pt (AdamW,
    the schedule, the torch RNG) and trainer_state.json (`state`, JSON). Written into a temporary folder,
    then swapped in: a crash at any point leaves a whole checkpoint (`find_checkpoint` finds it)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, named in tensors.items():
        save_file({n: t.contiguous() for n, t in named.items()}, str(tmp / f"{name}.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / OPTIMIZER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(folder: Path) -> Path | None:
    """`folder`, or the previous checkpoint if a crash hit between the two renames of a save."""
    folder = Path(folder)
    for candidate in (folder, folder.with_name(f".{folder.name}.old")):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def read_state(folder: Path) -> dict:
    return json.loads((Path(folder) / STATE_FILE).read_text())


def read_tensors(folder: Path, name: str) -> dict[str, torch.Tensor] | None:
    """The `{name}.safetensors` of a checkpoint, None when it has none."""
    from safetensors.torch import load_file

    path = Path(folder) / f"{name}.safetensors"
    return load_file(str(path)) if path.is_file() else None


def load_checkpoint(folder: Path, optimizer, scheduler) -> dict:
    """Restore AdamW, the schedule and the torch RNG from `folder`; returns its state. The caller loads
    the tensors it saved (`read_tensors` + `load_module_tensors`)."""
    rest = torch.load(Path(folder) / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(rest["optimizer"])
    scheduler.load_state_dict(rest["scheduler"])
    torch.set_rng_state(rest["torch_rng"])
    return read_state(folder)


class DeferredInterrupt:
    """Ctrl-C is remembered and acted on at the next step boundary, so the checkpoint written on the way
    out is a consistent state (never half an optimizer update). A second Ctrl-C stops at once."""

    def __enter__(self) -> "DeferredInterrupt":
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class MetricsLog:
    """A stage's metrics JSONL: one object per logging event. On resume, lines past the checkpoint's step
    (written by the interrupted run after its last save) are dropped, so the file reads as one run."""

    def __init__(self, path: Path, keep_until_step: int):
        kept = []
        if keep_until_step > 0 and path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_until_step]
        path.write_text("".join(line + "\n" for line in kept))
        self.f = open(path, "a", buffering=1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (v if math.isfinite(v) else None) if isinstance(v, float) else v for k, v in metrics.items()}
        self.f.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")

    def close(self) -> None:
        self.f.close()


# ---- batches ---------------------------------------------------------------------------------------


def pad_batch(sequences: list[list[int]], masks: list[list[int]], pad_id: int, device=None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token lists and their per-token 0/1 masks -> right-padded (B, T) input_ids, attention_mask and the
    mask, long tensors on `device`."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, (seq, m) in enumerate(zip(sequences, masks)):
        n = len(seq)
        ids[row, :n] = torch.tensor(seq)
        attention[row, :n] = 1
        mask[row, :n] = torch.tensor(m)
    return ids.to(device), attention.to(device), mask.to(device)


# ---- mixed precision ---------------------------------------------------------------------------------


def compute_dtype(name: str, device: torch.device, key: str) -> torch.dtype | None:
    """The autocast dtype for a compute-dtype setting (`key`, e.g. actor_rollout_ref.actor.fsdp_config.dtype,
    named in the warning), or None for float32, the master dtype (no autocast). Every training path and the
    rollout's inference copy share the rule `device.native_dtype`: honoured where the device runs it
    natively, else fp32 with one warning."""
    dtype = native_dtype(name, device, key)
    return None if dtype == torch.float32 else dtype


def fsdp_config_key(frozen: bool) -> str:
    """Where an engine's fsdp_config sits in the config, for messages: a frozen engine (built without an
    optimizer) is the reference policy's."""
    return f"actor_rollout_ref.{'ref' if frozen else 'actor'}.fsdp_config."


def autocast(device: torch.device, dtype: torch.dtype | None):
    """`torch.autocast` to `dtype` on `device`'s type; disabled (a no-op) for None."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

