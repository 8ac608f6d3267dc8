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
`position_ids`. Outputs are rotated back, so callers see the original layout.

Ranks of one model-parallel (TP x PP x CP) group must be given the same micro-batches: the driver
shards batches over `data_parallel_size` ranks, not over the world (see docs/megatron.md).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist

from verl_mtp.algos import lr_lambda
from verl_mtp.batch import Batch
from verl_mtp.engines import megatron_convert as convert
from verl_mtp.engines import megatron_runtime as rt
from verl_mtp.engines.base import LossFn, TrainingEngine
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


class MegatronEngine(TrainingEngine):
    """model: our MTPCausalLM holding the initial weights (converted into the GPTModel, then not kept).
    optim: the `actor.optim` config as a dict, or None for a frozen role (reference policy).
    num_mtp / mtp_detach: how many MTP depths the forward computes, and whether the MTP path sees the
    trunk as constants (`detach_encoder`). megatron: the `actor.megatron` config as a dict (parallel
    sizes, offload flags, `override_transformer_config`); None means one rank, no offload."""

    def __init__(self, model: MTPCausalLM, optim: dict | None = None, total_steps: int = 1, num_mtp: int = 0,
                 mtp_detach: bool = True, megatron: dict | None = None):
        self.sizes = rt.ParallelSizes.from_config(megatron)
        if self.sizes.context_parallel_size > 1:
            raise NotImplementedError("actor_rollout_ref.actor.megatron.context_parallel_size > 1 is not supported "
                                      "by the megatron engine yet (it would need the sequence split per CP rank)")
        if self.sizes.param_offload or self.sizes.grad_offload:
            warnings.warn("actor_rollout_ref.actor.megatron.param_offload/grad_offload are not implemented by the "
                          "megatron engine yet and are ignored (optimizer_offload is)", stacklevel=2)
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
        self.optimizer = None
        self.model = self.gpt
        if optim is not None:
            self._build_training(optim, total_steps)
        else:
            self.gpt.requires_grad_(False)

    # ---- setup -----------------------------------------------------------------------------

    def _build_training(self, optim: dict, total_steps: int) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=self.sizes.use_distributed_optimizer)
        self.model = DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=self.gpt)
        self.clip_grad = optim["clip_grad"]
        # megatron's optimizers allocate on "cuda" unconditionally, so CPU gets plain AdamW (see class)
        self.optimizer = (_megatron_optimizer(optim, self.config, self.sizes, self.model) if rt.cuda_available()
                          else _AdamWOverMainGrads(self.gpt, optim, self.ps.get_model_parallel_group()))
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
            group["lr"] = self.base_lr * self.schedule(self.steps)

    # ---- forward ---------------------------------------------------------------------------

    def _model_forward(self, micro: Batch) -> MTPOutput | torch.Tensor:
        """This stage's part of the forward: an MTPOutput on the last pipeline stage, hidden states
        (S, B, H) for the next stage otherwise."""
        gpt = self.gpt
        tokens, shift = left_align(micro.input_ids.to(self.device), micro.attention_mask.to(self.device))
        positions = torch.arange(tokens.shape[1], device=self.device).expand_as(tokens)
        embedded = gpt.embedding(input_ids=tokens, position_ids=positions) if gpt.pre_process else None
        rope = gpt.rotary_pos_emb(tokens.shape[1])
        # causal only (True = masked); passed explicitly because megatron's default mask is built on "cuda"
        causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool, device=self.device).triu(1)[None, None]
        hidden = gpt.decoder(hidden_states=embedded, attention_mask=causal, rotary_pos_emb=rope)
        if not gpt.post_process:
            return hidden
        head = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
        logits = self._logits(hidden, head)
        mtp_logits = []
        if self.num_mtp:
            detach = self.mtp_detach
            mtp_head = (head if head is not None else gpt.output_layer.weight).detach() if detach else head

            def embed(input_ids, position_ids):
                out = gpt.embedding(input_ids=input_ids, position_ids=position_ids)
                return out.detach() if detach else out

            h, ids, pos = (hidden.detach() if detach else hidden), tokens, positions
            for layer in gpt.mtp.layers[: self.num_mtp]:
                # megatron rolls ids/positions one step per depth; >= 0.17 also returns a padding mask
                h, ids, pos = layer(input_ids=ids, position_ids=pos, hidden_states=h, attention_mask=causal,
                                    rotary_pos_emb=rope, embedding=embed)[:3]
                mtp_logits.append(self._logits(h, mtp_head))
        restore = lambda x: restore_layout(x, shift)  # noqa: E731
        out = MTPOutput(logits=restore(logits), mtp_logits=[restore(x) for x in mtp_logits],
                        hidden_states=restore(hidden.transpose(0, 1)))
        if self.router_tap is not None:  # real tokens in the rotated layout the routers saw
            mask = micro.attention_mask.to(self.device)
            out.aux_loss, out.moe_stats = self.router_tap.collect(left_align(mask, mask)[0].bool())
        return out

    def _logits(self, hidden: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """(S, B, H) -> (B, S, V): full vocabulary (gathered over TP), padding rows dropped."""
        logits, _ = self.gpt.output_layer(hidden, weight=weight, runtime_gather_output=True)
        return logits.transpose(0, 1)[..., : self.hf_config.vocab_size]

    def _run(self, micro_batches: list[Batch], consume: Callable, forward_only: bool) -> list[Any]:
        """Forward (and backward) every micro-batch; what `consume(output, micro)` returned, on every rank.
        Training: consume returns (loss, metrics) and the metrics are collected."""
        self._check_same_batches(micro_batches)
        if self.ps.get_pipeline_model_parallel_world_size() > 1:
            return self._run_pipelined(micro_batches, consume, forward_only)
        collected = []
        for micro in micro_batches:
            result = consume(self._model_forward(micro), micro)
            if not forward_only:
                loss, result = result
                loss.backward()  # megatron's DDP accumulates into its grad buffers; no reduce yet
            collected.append(result)
        if not forward_only:
            from megatron.core.distributed import finalize_model_grads

            finalize_model_grads([self.model])  # data-parallel reduce (+ tied/SP grads) once per mini-batch
        return collected

    def _run_pipelined(self, micro_batches: list[Batch], consume: Callable, forward_only: bool) -> list[Any]:
        """GPU only (megatron's pipeline schedules allocate on "cuda"): megatron's 1F1B schedule; the
        last stage's results are broadcast to the other stages."""
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        n = len(micro_batches)
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = getattr(self.model, "no_sync", None)

        def step_fn(data_iterator, _model):
            micro = next(data_iterator)

            def loss_func(out, non_loss_data=False):
                if forward_only:
                    return consume(out, micro)
                loss, metrics = consume(out, micro)
                # megatron divides by the number of micro-batches; our losses are already each
                # micro-batch's share of the mini-batch loss, so undo that
                return loss * n, metrics

            return self._model_forward(micro), loss_func

        first = micro_batches[0]
        collected = get_forward_backward_func()(
            forward_step_func=step_fn, data_iterator=iter(micro_batches), model=[self.model], num_microbatches=n,
            seq_length=first.input_ids.shape[1], micro_batch_size=len(first), forward_only=forward_only,
            collect_non_loss_data=forward_only)
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
        group = self.ps.get_model_parallel_group()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
        if not torch.equal(low, high):
            raise RuntimeError("megatron engine: ranks of one tensor/pipeline/context-parallel group got different "
                               "micro-batches; shard batches over data-parallel ranks (engine.data_parallel_rank)")

    # ---- TrainingEngine --------------------------------------------------------------------

    def forward_backward(self, micro_batches: list[Batch], loss_fn: LossFn) -> list[dict[str, float]]:
        self.model.train()
        return self._run(micro_batches, loss_fn, forward_only=False)

    def optimizer_step(self) -> float:
        """Clip, step and schedule like the torch engine. The norm covers TP/PP/DP shards without
        counting replicated tensors twice."""
        opt = self.optimizer
        found_inf = opt.prepare_grads()  # main grads (DDP buffers) -> the optimizer's params
        norm = math.nan if found_inf else float(opt.get_grad_norm() or 0.0)
        if math.isfinite(norm):
            if self.clip_grad:
                _clip_to_total_norm(opt, self.clip_grad, norm)
            opt.step_with_ready_grads()
            self.steps += 1
            self._set_lr()
        opt.zero_grad()
        self.model.zero_grad_buffer()
        return norm

    @torch.no_grad()
    def infer(self, micro_batches: list[Batch], fn: Callable) -> list[Any]:
        self.model.eval()
        return self._run(micro_batches, fn, forward_only=True)

    # ---- weights ---------------------------------------------------------------------------

    def _megatron_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.gpt.state_dict().items() if not k.endswith("_extra_state")}

    def load_hf(self, hf: dict[str, torch.Tensor]) -> None:
        """Copy HF/MiMo-named tensors into this rank's shards."""
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

    def state_dict(self) -> dict[str, Any]:
        state = {"model": dict(self.named_tensors())}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
            state["scheduler"] = {"steps": self.steps}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_hf(state["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.steps = state["scheduler"]["steps"]
            self._set_lr()

    def save_hf(self, path: str) -> None:
        hf = dict(self.named_tensors())
        if dist.get_rank() != 0:
            return
        with torch.device("meta"):
            shell = MTPCausalLM(self.hf_config)
        shell.load_state_dict(hf, assign=True)
        shell.save_pretrained(path)

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


def _megatron_optimizer(optim: dict, model_config, sizes: rt.ParallelSizes, model):
    """GPU: megatron's optimizer (distributed optimizer, optional CPU offload of its states). Weight
    decay on every parameter, like the torch engine's AdamW: megatron's default skips biases and norms;
    0.12-0.13 take `no_weight_decay_cond`, later versions `config_overrides` (where an empty dict,
    unlike None, means "no overrides")."""
    import inspect

    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    beta1, beta2 = optim["betas"]
    config = OptimizerConfig(
        optimizer="adam", lr=optim["lr"], weight_decay=optim["weight_decay"], adam_beta1=beta1, adam_beta2=beta2,
        clip_grad=optim["clip_grad"] or 0.0, params_dtype=model_config.params_dtype, bf16=model_config.bf16,
        fp16=model_config.fp16, use_distributed_optimizer=sizes.use_distributed_optimizer,
        optimizer_cpu_offload=sizes.optimizer_offload,
        optimizer_offload_fraction=1.0 if sizes.optimizer_offload else 0.0)
    if "config_overrides" in inspect.signature(get_megatron_optimizer).parameters:
        return get_megatron_optimizer(config, [model], config_overrides={})
    return get_megatron_optimizer(config, [model], no_weight_decay_cond=lambda name, param: False)


def _clip_to_total_norm(opt, max_norm: float, norm: float) -> None:
    """Scale every gradient by max_norm / norm when that is < 1 (torch's clip_grad_norm_ rule)."""
    coef = max_norm / (norm + 1e-6)
    if coef >= 1.0:
        return
    for sub in getattr(opt, "chained_optimizers", [opt]):
        for p in sub.get_parameters():
            if p.grad is not None:
                p.grad.mul_(coef)


class _AdamWOverMainGrads:
    """CPU stand-in for megatron's FP32 optimizer, with the subset of its interface the engine uses.
    megatron's DDP accumulates gradients in `param.main_grad`; they are handed to torch's AdamW, and the
    global norm sums each tensor-parallel shard once (replicated norms/biases only on TP rank 0)."""

    def __init__(self, gpt, optim: dict, model_parallel_group):
        self.params = [p for p in gpt.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=optim["lr"], betas=tuple(optim["betas"]),
                                           weight_decay=optim["weight_decay"])
        self.group = model_parallel_group
        self.param_groups = self.optimizer.param_groups

    def get_parameters(self) -> list[torch.nn.Parameter]:
        return self.params

    def prepare_grads(self) -> bool:
        for p in self.params:
            p.grad = p.main_grad.to(p.dtype)
        return False

    def get_grad_norm(self) -> float:
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        squares = torch.zeros((), dtype=torch.float64)
        for p in self.params:
            if param_is_not_tensor_parallel_duplicate(p):
                squares += p.grad.double().pow(2).sum()
        dist.all_reduce(squares, group=self.group)
        return float(squares.sqrt())

    def step_with_ready_grads(self) -> bool:
        self.optimizer.step()
        return True

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
