"""Megatron-core training engine: the policy as a megatron `GPTModel` with its MTP block, behind the
same `TrainingEngine` interface as the torch backend.

Division of labour: megatron runs the model (TP/PP, its DDP and optimizer, its pipeline schedule);
our `PolicyActor` computes every loss. So the forward returns an `MTPOutput` with full-vocabulary
logits (gathered over TP) for the trunk and for each MTP depth, and megatron's own MTP loss path
(`MTPLossAutoScaler` inside `GPTModel.forward(labels=...)`) is not used: the trunk, the MTP layers
and the shared output layer are called one by one (`_model_forward`).

Batches arrive as [left pads | prompt | response | right pads]. Megatron's RoPE uses positions
0..S-1 of the sequence dimension, so each row is rotated to start at its first real token; with
right padding only, the plain causal mask never lets a real token see a pad, and positions equal our
`position_ids`. Under context parallel the rotated rows are padded to a multiple of 2*cp and each CP
rank runs its two "zigzag" chunks (`context_parallel.py`). `SequenceLayout` does both and their
inverse: the caller's `MicroBatchFn` computes per-token values on this rank's positions, which are
gathered over the CP group and rotated back, so the losses see the original layout, whole.

Ranks of one model-parallel (TP x PP x CP) group must be given the same micro-batches: the driver
shards batches over `data_parallel_size` ranks, not over the world (see docs/megatron.md).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from verl_mtp.algos import lr_lambda
from verl_mtp.batch import Batch
from verl_mtp.engines import context_parallel as cp
from verl_mtp.engines import megatron_convert as convert
from verl_mtp.engines import megatron_runtime as rt
from verl_mtp.engines.base import MicroBatchFn, TrainingEngine, write_hf
from verl_mtp.engines.offload import StorageOffload
from verl_mtp.models import MTPCausalLM, MTPOutput, ModelConfig


def left_align(tokens: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each row so its real tokens start at column 0; -> (rotated tokens, per-row shift)."""
    shift = (attention_mask.long().cumsum(-1) == 0).sum(-1)  # leading pads per row
    cols = torch.arange(tokens.shape[1], device=tokens.device)
    index = (cols[None, :] + shift[:, None]) % tokens.shape[1]
    aligned_mask = attention_mask.gather(1, index)
    if (aligned_mask[:, 1:] > aligned_mask[:, :-1]).any():
        raise ValueError("megatron engine: each row's real tokens must be contiguous (left-padded prompt, "
                         "right-padded response)")
    return tokens.gather(1, index), shift


def restore_layout(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Inverse of `left_align` for a (B, T, ...) output."""
    t = x.shape[1]
    cols = torch.arange(t, device=x.device)
    index = (cols[None, :] - shift[:, None]) % t
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))


@dataclass(frozen=True)
class SequenceLayout:
    """Where the positions of one micro-batch sit on this rank: rows rotated left by `shift`, padded
    to `padded` columns, and under context parallel only chunks `rank` and 2*cp-1-`rank`."""

    shift: torch.Tensor  # (B,) leading pads per row
    length: int  # S, the micro-batch's columns
    padded: int
    cp: int
    rank: int
    group: Any  # the CP process group

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) in the caller's layout -> (B, padded / cp, ...) as this rank runs it."""
        return cp.split(cp.pad_to(restore_layout(x, -self.shift), self.padded), self.cp, self.rank)

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `local`, gathering every CP rank's piece (differentiable)."""
        return restore_layout(cp.gather(x, self.group)[:, : self.length], self.shift)

    @property
    def positions(self) -> torch.Tensor:
        """(padded / cp,) the sequence positions this rank runs."""
        return cp.positions(self.padded, self.cp, self.rank)


class MegatronEngine(TrainingEngine):
    """model: our MTPCausalLM holding the initial weights (converted into the GPTModel, then not kept).
    optim: the `actor.optim` config as a dict, or None for a frozen role (reference policy).
    num_mtp / mtp_detach: how many MTP depths the forward computes, and whether the MTP path sees the
    trunk as constants (`detach_encoder`). megatron: the `actor.megatron` config as a dict (parallel
    sizes, offload flags, `override_transformer_config`); None means one rank, no offload."""

    def __init__(self, model: MTPCausalLM, optim: dict | None = None, total_steps: int = 1, num_mtp: int = 0,
                 mtp_detach: bool = True, megatron: dict | None = None, mtp_lr_scale: float = 1.0):
        self.sizes = rt.ParallelSizes.from_config(megatron)
        self.moved = StorageOffload()  # what `offload` moved to CPU
        self.grads_pending = False  # gradients accumulated since the last optimizer step
        if self.sizes.context_parallel_size > 1 and model.config.is_moe:
            raise NotImplementedError(f"actor_rollout_ref.actor.megatron.context_parallel_size="
                                      f"{self.sizes.context_parallel_size} with an MoE model is not supported (the "
                                      "load-balancing loss needs every token a router sees)")
        rt.init_parallel(self.sizes)
        from megatron.core import parallel_state

        self.ps = parallel_state
        self.hf_config: ModelConfig = model.config
        self.num_mtp, self.mtp_detach = num_mtp, mtp_detach
        self.te = rt.use_transformer_engine()
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.vocab_padded = rt.padded_vocab_size(self.hf_config.vocab_size, self.tp)
        overrides = {k: v for k, v in ((megatron or {}).get("override_transformer_config") or {}).items()
                     if v is not None and (self.te or k != "attention_backend")}
        self.config = rt.transformer_config(self.hf_config, self.sizes, overrides=overrides)
        self.gpt = rt.build_gpt_model(self.hf_config, self.config, self.vocab_padded)
        # MoE: our load-balancing loss and expert loads from the routers' inputs (megatron's aux loss is off)
        self.router_tap = rt.RouterTap(self.gpt, self.hf_config) if self.hf_config.is_moe else None
        if self.router_tap and self.sizes.pipeline_model_parallel_size > 1:
            raise NotImplementedError("actor_rollout_ref.actor.megatron.pipeline_model_parallel_size > 1 with an MoE "
                                      "model is not supported yet (earlier stages' load-balancing losses)")
        self.load_hf(model.state_dict())
        if rt.cuda_available():
            self.gpt.cuda()
        self.device = torch.device("cuda" if rt.cuda_available() else "cpu")
        if self.gpt.mtp_process:  # MTP layers beyond num_mtp sit idle: keep them out of DDP and the optimizer
            self.gpt.mtp.layers[num_mtp:].requires_grad_(False)
        self.cp = parallel_state.get_context_parallel_world_size()
        self.cp_rank = parallel_state.get_context_parallel_rank()
        self.optimizer = None
        self.model = self.gpt
        if optim is not None:
            self._build_training(optim, total_steps, mtp_lr_scale)
        else:
            self.gpt.requires_grad_(False)

    # ---- setup -----------------------------------------------------------------------------

    def _build_training(self, optim: dict, total_steps: int, mtp_lr_scale: float) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        # the distributed optimizer makes DDP reduce-scatter: each rank's main_grad is then summed only in the
        # shard that rank's optimizer steps, so the CPU optimizer (whole main_grads) needs the all-reduce
        distributed = self.sizes.use_distributed_optimizer and rt.cuda_available()
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=distributed)
        self.model = DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=self.gpt)
        self.clip_grad = optim["clip_grad"]
        # megatron's optimizers allocate on "cuda" unconditionally, so CPU gets plain AdamW (see class)
        # the MTP layers' parameter groups carry lr_mult = mtp_lr_scale (megatron's own group field), which
        # `_set_lr` applies on both paths
        self.optimizer = (_megatron_optimizer(optim, self.config, self.sizes, self.model, mtp_lr_scale)
                          if rt.cuda_available() else
                          _AdamWOverMainGrads(self.gpt, optim, self.ps.get_model_parallel_group(), mtp_lr_scale))
        warmup = optim["lr_warmup_steps"]
        if warmup is None or warmup < 0:
            warmup = int(optim["lr_warmup_steps_ratio"] * total_steps)
        self.schedule = functools.partial(lr_lambda, warmup_steps=warmup, total_steps=total_steps,
                                          style=optim["lr_scheduler_type"], min_lr_ratio=optim["min_lr_ratio"])
        self.base_lr = optim["lr"]
        self.steps = 0
        self._set_lr()

    def _set_lr(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * self.schedule(self.steps) * group.get("lr_mult", 1.0)

    # ---- forward ---------------------------------------------------------------------------

    def _layout(self, micro: Batch) -> SequenceLayout:
        mask = micro.attention_mask.to(self.device)
        sequence_parallel = self.config.sequence_parallel and self.tp > 1
        return SequenceLayout(shift=left_align(mask, mask)[1], length=mask.shape[1],
                              padded=cp.padded_length(mask.shape[1], self.cp, self.tp if sequence_parallel else 1),
                              cp=self.cp, rank=self.cp_rank, group=self.ps.get_context_parallel_group())

    def _model_forward(self, micro: Batch, layout: SequenceLayout, mtp: bool = True) -> MTPOutput | torch.Tensor:
        """This stage's part of the forward over this rank's positions of `layout`: an MTPOutput (B, T, ...)
        on the last pipeline stage, hidden states (T, B, H) for the next stage otherwise."""
        gpt = self.gpt
        tokens = layout.local(micro.input_ids.to(self.device))
        positions = layout.positions.to(self.device).expand_as(tokens)
        embedded = gpt.embedding(input_ids=tokens, position_ids=positions) if gpt.pre_process else None
        # megatron slices RoPE per CP rank through a pinned CUDA index, so the full table is split here
        rope = (gpt.rotary_pos_emb(layout.padded) if self.cp == 1
                else cp.split(gpt.rotary_pos_emb.get_emb(layout.padded), self.cp, self.cp_rank, dim=0))
        # True = masked; passed explicitly because megatron's default mask is built on "cuda". TE's CP
        # attention masks causally by itself; the local spec's (AllGatherCPAttention) reads the positions here.
        causal = None if self.te and self.cp > 1 else cp.causal_mask(layout.padded, self.cp, self.cp_rank, self.device)
        hidden = gpt.decoder(hidden_states=embedded, attention_mask=causal, rotary_pos_emb=rope)
        if not gpt.post_process:
            return hidden
        head = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
        logits = self._logits(hidden, head)
        mtp_logits = []
        if self.num_mtp and mtp:  # a log-prob pass (MicroBatchFn.mtp False) runs the trunk only
            detach = self.mtp_detach
            mtp_head = (head if head is not None else gpt.output_layer.weight).detach() if detach else head

            def embed(input_ids, position_ids):
                out = gpt.embedding(input_ids=input_ids, position_ids=position_ids)
                return out.detach() if detach else out

            h, ids, pos = (hidden.detach() if detach else hidden), tokens, positions
            for layer in gpt.mtp.layers[: self.num_mtp]:
                # megatron rolls ids/positions one step per depth (across CP ranks' chunk boundaries);
                # >= 0.17 also returns a padding mask
                h, ids, pos = layer(input_ids=ids, position_ids=pos, hidden_states=h, attention_mask=causal,
                                    rotary_pos_emb=rope, embedding=embed)[:3]
                mtp_logits.append(self._logits(h, mtp_head))
        out = MTPOutput(logits=logits, mtp_logits=mtp_logits, hidden_states=hidden.transpose(0, 1))
        if self.router_tap is not None:  # real tokens in the layout the routers saw
            out.aux_loss, out.moe_stats = self.router_tap.collect(layout.local(micro.attention_mask.to(self.device))
                                                                  .bool())
        return out

    def _apply(self, fn: MicroBatchFn, out: MTPOutput, micro: Batch, layout: SequenceLayout) -> Any:
        """`fn`'s per-token stage on this rank's positions, its reduction on the whole sequence."""
        targets = {k: layout.local(v.to(self.device)) for k, v in fn.targets(micro).items()}
        values = {k: layout.whole(v) for k, v in fn.per_token(out, targets).items()}
        return fn.reduce(values, out, micro)

    def _logits(self, hidden: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """(S, B, H) -> (B, S, V): full vocabulary (gathered over TP), padding rows dropped."""
        logits, _ = self.gpt.output_layer(hidden, weight=weight, runtime_gather_output=True)
        return logits.transpose(0, 1)[..., : self.hf_config.vocab_size]

    def _run(self, micro_batches: list[Batch], fn: MicroBatchFn, forward_only: bool) -> list[Any]:
        """Forward (and backward) every micro-batch; what `fn` returned, on every rank. Training: fn
        returns (loss, metrics) and the metrics are collected."""
        self.reload()
        self._check_same_batches(micro_batches)
        if self.ps.get_pipeline_model_parallel_world_size() > 1:
            return self._run_pipelined(micro_batches, fn, forward_only)
        collected = []
        for micro in micro_batches:
            layout = self._layout(micro)
            result = self._apply(fn, self._model_forward(micro, layout, fn.mtp), micro, layout)
            if not forward_only:
                loss, result = result
                loss.backward()  # megatron's DDP accumulates into its grad buffers; no reduce yet
            collected.append(result)
        if not forward_only:
            from megatron.core.distributed import finalize_model_grads

            finalize_model_grads([self.model])  # data-parallel reduce (+ tied/SP grads) once per mini-batch
            self.grads_pending = True
        return collected

    def _run_pipelined(self, micro_batches: list[Batch], fn: MicroBatchFn, forward_only: bool) -> list[Any]:
        """megatron's 1F1B schedule (on CPU with megatron_runtime's workarounds); the last stage's results
        are broadcast to the other stages."""
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        n = len(micro_batches)
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = getattr(self.model, "no_sync", None)

        def step_fn(data_iterator, _model):
            micro = next(data_iterator)
            layout = self._layout(micro)
            out = self._model_forward(micro, layout, fn.mtp)
            if not isinstance(out, MTPOutput):  # an earlier stage: hidden states for the next one
                return out, None

            def loss_func(_logits, non_loss_data=False):
                if forward_only:
                    return self._apply(fn, out, micro, layout)
                loss, metrics = self._apply(fn, out, micro, layout)
                # megatron divides by the number of micro-batches (our losses are already each micro-batch's
                # share of the mini-batch loss) and multiplies by the CP size (our CP gather's backward
                # already sums the CP ranks' identical losses): undo both
                return loss * n / self.cp, metrics

            # the schedule reads `.device` of what the step returns (forward-only: after loss_func), so the
            # last stage hands it a tensor and loss_func reads the whole MTPOutput from here
            return out.logits, loss_func

        first = self._layout(micro_batches[0])
        collected = get_forward_backward_func()(
            forward_step_func=step_fn, data_iterator=iter(micro_batches), model=[self.model], num_microbatches=n,
            seq_length=first.padded // self.cp, micro_batch_size=len(micro_batches[0]), forward_only=forward_only,
            collect_non_loss_data=forward_only)
        if not forward_only:
            self.grads_pending = True
        box = [list(collected)]
        dist.broadcast_object_list(box, src=self.ps.get_pipeline_model_parallel_last_rank(),
                                   group=self.ps.get_pipeline_model_parallel_group())
        return box[0]

    def _check_same_batches(self, micro_batches: list[Batch]) -> None:
        """Every rank of a model-parallel group must run the same micro-batches; a driver that shards
        over the world instead of over data-parallel ranks would train on garbage, so say it."""
        if self.sizes.model_parallel == 1:
            return
        ids = torch.cat([m.input_ids.reshape(-1) for m in micro_batches]).double()
        weights = torch.arange(1, ids.numel() + 1, dtype=torch.float64)
        stats = torch.stack([(ids * weights).sum(), torch.tensor(float(ids.numel()))]).to(self.device)
        low, high = stats.clone(), stats.clone()
        for group in (self.ps.get_model_parallel_group(), self.ps.get_context_parallel_group()):
            dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
            dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
        if not torch.equal(low, high):
            raise RuntimeError("megatron engine: ranks of one tensor/pipeline/context-parallel group got different "
                               "micro-batches; shard batches over data-parallel ranks (engine.data_parallel_rank)")

    # ---- TrainingEngine --------------------------------------------------------------------

    def forward_backward(self, micro_batches: list[Batch], loss_fn: MicroBatchFn) -> list[dict[str, float]]:
        self.model.train()
        return self._run(micro_batches, loss_fn, forward_only=False)

    def optimizer_step(self) -> dict[str, float]:
        """Clip, step and schedule like the torch engine: with a detached MTP loss the trunk and the MTP
        layers are clipped separately. Norms cover TP/PP/DP shards without counting replicas twice."""
        self.reload()
        opt = self.optimizer
        found_inf = opt.prepare_grads()  # main grads (DDP buffers) -> the optimizer's params
        groups = self._clip_groups()
        norms = {name: math.nan if found_inf else _grad_norm(grads, self.device) for name, grads in groups.items()}
        total = math.sqrt(sum(n * n for n in norms.values()))
        if math.isfinite(total):
            if self.clip_grad:
                for name, grads in groups.items():
                    _clip(grads, self.clip_grad, norms[name])
            opt.step_with_ready_grads()
            self.steps += 1
            self._set_lr()
        opt.zero_grad()
        self.model.zero_grad_buffer()
        self.grads_pending = False
        return {"actor/grad_norm": total, **({f"actor/grad_norm_{k}": v for k, v in norms.items()}
                                            if len(norms) > 1 else {})}

    def _clip_groups(self) -> dict[str, list[tuple[Any, list[torch.Tensor]]]]:
        """The optimizer's gradients to count in each clipping group, per (sub-)optimizer with its
        process group for the norm: trunk and MTP layers when MTP is detached, else one group."""
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
        from megatron.core.transformer.module import param_is_not_shared

        split = self.mtp_detach and self.num_mtp
        mtp = {id(p) for n, p in self.gpt.named_parameters() if n.startswith("mtp.")}
        groups = {"trunk": [], "mtp": []} if split else {"all": []}
        for sub in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            owner = _model_params_of(sub)
            picked = {name: [] for name in groups}
            for p in sub.get_parameters():
                if p.grad is None or not param_is_not_shared(p) or not param_is_not_tensor_parallel_duplicate(p):
                    continue
                name = ("mtp" if id(owner.get(id(p), p)) in mtp else "trunk") if split else "all"
                picked[name].append(p.grad)
            for name, grads in picked.items():
                groups[name].append((sub.get_grad_stats_parallel_group(), grads))
        return groups

    @torch.no_grad()
    def infer(self, micro_batches: list[Batch], fn: MicroBatchFn) -> list[Any]:
        self.model.eval()
        return self._run(micro_batches, fn, forward_only=True)

    # ---- offload ---------------------------------------------------------------------------

    def offload(self) -> None:
        """On GPU, per the `megatron` keys: `param_offload` moves the parameters, `grad_offload` megatron
        DDP's gradient buffers (`main_grad`) to pinned CPU memory. Gradients are copied only when some
        are pending (mid-accumulation); after an optimizer step they are zero and just freed. (The
        optimizer states have megatron's own `optimizer_offload`.)"""
        if self.moved.active or not rt.cuda_available():
            return
        if self.sizes.param_offload:
            self.moved.offload(self.gpt.parameters())
        if self.sizes.grad_offload and self.optimizer is not None:
            buffers = self.model.buffers + getattr(self.model, "expert_parallel_buffers", [])
            self.moved.offload((b.grad_data for b in buffers), keep=self.grads_pending)
        torch.cuda.empty_cache()

    def reload(self) -> None:
        self.moved.reload()

    # ---- weights ---------------------------------------------------------------------------

    def _megatron_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.gpt.state_dict().items() if not k.endswith("_extra_state")}

    def load_hf(self, hf: dict[str, torch.Tensor]) -> None:
        """Copy HF/MiMo-named tensors into this rank's shards."""
        self.reload()
        offset = rt.layer_offset(self.config)
        local = convert.to_megatron(hf, self.hf_config, self.tp, self.ps.get_tensor_model_parallel_rank(),
                                    self.vocab_padded, range(offset, offset + len(self.gpt.decoder.layers)),
                                    fused_norms=self.te)
        own = self._megatron_tensors()
        missing = sorted(set(own) - set(local))
        if missing:
            raise KeyError(f"megatron engine: no source tensor for {missing[:3]} (of {len(missing)})")
        with torch.no_grad():
            for name, t in own.items():
                if t.shape != local[name].shape:
                    raise ValueError(f"megatron engine: '{name}' is {tuple(t.shape)}, "
                                     f"converted {tuple(local[name].shape)}")
                t.copy_(local[name])

    def _gather_hf(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's megatron-named shards -> full HF/MiMo tensors, on every rank."""
        tp_group = self.ps.get_tensor_model_parallel_group()
        shards = [tensors]
        if self.tp > 1:
            shards = [dict() for _ in range(self.tp)]
            dist.all_gather_object(shards, {k: v.cpu() for k, v in tensors.items()}, group=tp_group)
        hf = convert.to_hf(shards, self.hf_config, rt.layer_offset(self.config))
        if self.ps.get_pipeline_model_parallel_world_size() > 1:
            stages = [dict() for _ in range(self.ps.get_pipeline_model_parallel_world_size())]
            dist.all_gather_object(stages, {k: v.cpu() for k, v in hf.items()},
                                   group=self.ps.get_pipeline_model_parallel_group())
            hf = {k: v for stage in stages for k, v in stage.items()}
        return hf

    def named_tensors(self):
        self.reload()
        return self._gather_hf({k: v.detach() for k, v in self._megatron_tensors().items()}).items()

    def named_grads(self) -> dict[str, torch.Tensor]:
        """Accumulated gradients (after the data-parallel reduction) in HF/MiMo names; for tests and
        debugging. A parameter that got no gradient reads as zeros."""
        grads = {}
        for name, p in self.gpt.named_parameters():
            g = getattr(p, "main_grad", None)
            grads[name] = (g if g is not None else torch.zeros_like(p)).detach().float().clone()  # buffers get zeroed
        own = self._megatron_tensors()
        return self._gather_hf({k: grads.get(k, torch.zeros_like(v)) for k, v in own.items()})

    @property
    def model_parallel_sizes(self) -> dict[str, int]:
        """The model-parallel sizes this rank's optimizer shard belongs to."""
        return {"tensor_model_parallel_size": self.tp,
                "pipeline_model_parallel_size": self.ps.get_pipeline_model_parallel_world_size(),
                "context_parallel_size": self.cp}

    def state_dict(self) -> dict[str, Any]:
        """Full weights in HF names and this rank's optimizer shard (only valid at the same layout)."""
        self.reload()
        state = {"model": dict(self.named_tensors())}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
            state["scheduler"] = {"steps": self.steps, "layout": self.model_parallel_sizes}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.optimizer is not None:
            saved = state["scheduler"].get("layout", self.model_parallel_sizes)
            for key, size in self.model_parallel_sizes.items():
                if saved[key] != size:
                    raise ValueError(f"actor_rollout_ref.actor.megatron.{key}={size}, but the checkpoint's optimizer "
                                     f"shards were saved at {saved[key]}: per-rank optimizer files cannot be "
                                     f"resharded; resume with {key}={saved[key]}, or save with "
                                     "megatron.use_dist_checkpointing=true")
        self.load_hf(state["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.steps = state["scheduler"]["steps"]
            self._set_lr()

    # ---- sharded checkpoints (megatron.use_dist_checkpointing) -----------------------------

    def _sharded_state(self, loading: bool) -> dict[str, Any]:
        # the replicas' group (TE layers, and the last stage's copy of the word embeddings under PP, ask for it)
        model = self.gpt.sharded_state_dict(
            metadata={"dp_cp_group": self.ps.get_data_parallel_group(with_context_parallel=True)})
        if self.optimizer is None:
            return {"model": model}
        return {"model": model, "optimizer": self.optimizer.sharded_state_dict(model, is_loading=loading),
                "scheduler": {"steps": self.steps}}

    def save_checkpoint(self, folder: str) -> None:
        """Every rank: megatron's dist_checkpointing writes each rank's model and optimizer shards
        (replicas once) with their global offsets, so `load_checkpoint` can read them at any TP/PP/CP."""
        from megatron.core import dist_checkpointing

        self.reload()
        os.makedirs(folder, exist_ok=True)
        dist_checkpointing.save(self._sharded_state(loading=False), folder)

    def load_checkpoint(self, folder: str) -> None:
        """Every rank: this rank's shards of a `save_checkpoint` folder, model and optimizer, resharded to
        this layout."""
        from megatron.core import dist_checkpointing

        if not os.path.isfile(os.path.join(folder, "metadata.json")):
            raise FileNotFoundError(f"{folder}: no megatron dist checkpoint here (was it saved without "
                                    "actor_rollout_ref.actor.megatron.use_dist_checkpointing=true?)")
        self.reload()
        state = dist_checkpointing.load(self._sharded_state(loading=True), folder)
        missing = [k for k in self.gpt.load_state_dict(state["model"], strict=False).missing_keys
                   if not k.endswith("_extra_state")]
        if missing:
            raise KeyError(f"{folder}: no tensor for {missing[:3]} (of {len(missing)})")
        if self.optimizer is not None:
            if isinstance(self.optimizer, _AdamWOverMainGrads):
                self.optimizer.load_sharded_state_dict(state["optimizer"], state["scheduler"]["steps"])
            else:  # megatron's optimizer reads back what its sharded_state_dict described
                self.optimizer.load_state_dict(state["optimizer"])
            self.steps = state["scheduler"]["steps"]
            self._set_lr()

    def save_hf(self, path: str) -> None:
        write_hf(self.hf_config, self.named_tensors(), path)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else 0.0

    @property
    def num_mtp_layers(self) -> int:
        return self.hf_config.num_nextn_predict_layers

    @property
    def data_parallel_rank(self) -> int:
        """Which data shard this rank must be given (ranks of one model-parallel group share it)."""
        return self.ps.get_data_parallel_rank()

    @property
    def data_parallel_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    @property
    def data_parallel_group(self):
        """Without the CP ranks: each of them sees the whole sequences of its data shard."""
        return self.ps.get_data_parallel_group()


def _megatron_optimizer(optim: dict, model_config, sizes: rt.ParallelSizes, model, mtp_lr_scale: float = 1.0):
    """GPU: megatron's optimizer (distributed optimizer, optional CPU offload of its states). Weight
    decay on every parameter, like the torch engine's AdamW: megatron's default skips biases and norms;
    0.12-0.13 take `no_weight_decay_cond`, later versions `config_overrides` (where an empty dict,
    unlike None, means "no overrides"). The MTP layers' groups get lr_mult = mtp_lr_scale (0.12-0.13:
    `scale_lr_cond` / `lr_mult`; later: a `ParamKey` override)."""
    import inspect

    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    beta1, beta2 = optim["betas"]
    config = OptimizerConfig(
        optimizer="adam", lr=optim["lr"], weight_decay=optim["weight_decay"], adam_beta1=beta1, adam_beta2=beta2,
        clip_grad=optim["clip_grad"] or 0.0, params_dtype=model_config.params_dtype, bf16=model_config.bf16,
        fp16=model_config.fp16, use_distributed_optimizer=sizes.use_distributed_optimizer,
        optimizer_cpu_offload=sizes.optimizer_offload,
        optimizer_offload_fraction=1.0 if sizes.optimizer_offload else 0.0)
    scaled = mtp_lr_scale != 1.0
    if "config_overrides" in inspect.signature(get_megatron_optimizer).parameters:
        from megatron.core.optimizer.optimizer_config import ParamKey

        overrides = {ParamKey(name=("mtp.*", "module.mtp.*")): {"lr_mult": mtp_lr_scale}} if scaled else {}
        return get_megatron_optimizer(config, [model], config_overrides=overrides)
    is_mtp = (lambda name, param: name.startswith(("mtp.", "module.mtp."))) if scaled else None
    return get_megatron_optimizer(config, [model], no_weight_decay_cond=lambda name, param: False,
                                  scale_lr_cond=is_mtp, lr_mult=mtp_lr_scale)


def _model_params_of(sub) -> dict[int, torch.nn.Parameter]:
    """id(optimizer parameter) -> the model parameter it stands for. megatron's mixed-precision and
    distributed optimizers step fp32 copies or shards of the model's parameters, linked back as
    `model_param.main_param`, or (the distributed optimizer's fp32 shards) by position in its groups.
    Parameters not listed are model parameters themselves."""
    owner = {}
    for models, shards in zip(getattr(sub, "model_fp32_groups", []), getattr(sub, "shard_fp32_groups", [])):
        owner.update({id(shard): model for model, shard in zip(models, shards)})
    for group in getattr(sub, "model_float16_groups", None) or getattr(sub, "float16_groups", []):
        owner.update({id(p.main_param): p for p in group if getattr(p, "main_param", None) is not None})
    return owner


def _grad_norm(parts: list[tuple[Any, list[torch.Tensor]]], device: torch.device) -> float:
    """L2 norm of gradients spread over ranks: each part's local sum of squares is summed over its group."""
    total = 0.0
    for group, grads in parts:
        squares = torch.zeros((), dtype=torch.float64, device=device)
        for g in grads:
            squares += g.double().pow(2).sum()
        dist.all_reduce(squares, group=group)
        total += float(squares)
    return math.sqrt(total)


def _clip(parts: list[tuple[Any, list[torch.Tensor]]], max_norm: float, norm: float) -> None:
    """Scale the gradients by max_norm / norm when that is < 1 (torch's clip_grad_norm_ rule)."""
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for _, grads in parts:
            for g in grads:
                g.mul_(coef)


class _AdamWOverMainGrads:
    """CPU stand-in for megatron's FP32 optimizer, with the subset of its interface the engine uses.
    megatron's DDP accumulates gradients in `param.main_grad`; they are handed to torch's AdamW. Norms
    are summed over the model-parallel group, each tensor-parallel shard once."""

    def __init__(self, gpt, optim: dict, model_parallel_group, mtp_lr_scale: float = 1.0):
        named = [(n, p) for n, p in gpt.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        groups = [{"params": self.params}]
        if mtp_lr_scale != 1.0:  # megatron's layout: the MTP layers in a group with lr_mult (see `_set_lr`)
            groups = [{"params": [p for n, p in named if not n.startswith("mtp.")]},
                      {"params": [p for n, p in named if n.startswith("mtp.")], "lr_mult": mtp_lr_scale}]
        self.optimizer = torch.optim.AdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]),
                                           weight_decay=optim["weight_decay"])
        self.group = model_parallel_group
        self.param_groups = self.optimizer.param_groups

    def get_parameters(self) -> list[torch.nn.Parameter]:
        return self.params

    def prepare_grads(self) -> bool:
        for p in self.params:
            p.grad = p.main_grad.to(p.dtype)
        return False

    def get_grad_stats_parallel_group(self):
        return self.group

    def step_with_ready_grads(self) -> bool:
        self.optimizer.step()
        return True

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def sharded_state_dict(self, model_sharded: dict, is_loading: bool = False) -> dict:
        """AdamW's moments as dist_checkpointing tensors sharded like their parameters (megatron's own
        FP32Optimizer does the same). AdamW keeps a per-parameter `step`, the engine's step count, which
        travels as the scheduler's instead. Loading: zero moments give the structure to read into."""
        from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                               optim_state_to_sharding_state)

        if is_loading:
            for p in self.params:
                self.optimizer.state[p] = {"step": torch.zeros(()), "exp_avg": torch.zeros_like(p),
                                           "exp_avg_sq": torch.zeros_like(p)}
        state = self.optimizer.state_dict()
        optim_state_to_sharding_state(state, get_param_id_to_sharded_param_map(model_sharded, self.params),
                                      exclude_keys=("step",))
        return state

    def load_sharded_state_dict(self, state: dict, steps: int) -> None:
        for moments in state["state"].values():
            moments["step"] = torch.tensor(float(steps))
        self.optimizer.load_state_dict(state)
