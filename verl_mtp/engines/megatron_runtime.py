"""Megatron-core plumbing for the megatron engine: the import guard, the CPU workarounds, process
groups, and building a `GPTModel` (+ MTP block) from our `ModelConfig`.

Everything that touches megatron's global state lives here, so `megatron_engine.py` reads as the
engine and `megatron_convert.py` stays pure tensor code. megatron-core is imported lazily: importing
`verl_mtp` (or this module) never imports megatron.

CPU workarounds (all in `apply_cpu_workarounds`, applied only when CUDA is absent):
  1. megatron allocates many buffers with ``device=torch.cuda.current_device()``; on a CPU-only
     torch that call raises, so it is made to answer ``"cpu"``; and ``torch.cuda.synchronize``, which
     dist_checkpointing's file writer calls unconditionally, does nothing.
  2. pipeline parallel: megatron's 1F1B schedule counts tokens in a ``torch.zeros(device="cuda")``, so
     the schedules module gets a ``torch`` whose ``zeros`` puts "cuda" on the CPU; and building a GPTModel
     with PP > 1 calls ``Tensor.cuda()`` on the stages' word embeddings, which returns the tensor itself
     while the model is built.
  3. ``model_parallel_cuda_manual_seed`` forks CUDA RNG states; on CPU the RNG tracker is created
     with ``initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)`` instead, whose
     ``fork()`` is a no-op context (dropout is 0 in RL fine-tuning, so no RNG stream is needed).

Context parallel: the TE spec brings TransformerEngine's CP attention (ring exchange of keys and
values, GPU). The local spec's `DotProductAttention` refuses CP, so there `core_attention` is
`AllGatherCPAttention` (`cp_attention_class`): keys and values are all-gathered over the CP group in
sequence order and each rank attends with its own queries; exact, and it runs on CPU over gloo.

MoE (`ModelConfig.n_routed_experts > 0`): `moe_transformer_kwargs` maps our fields to megatron's, the
decoder is built from per-layer specs (dense for the first `first_k_dense_replace` layers), and
`RouterTap` gives the engine each router's input and choice so that it computes *our* load-balancing
loss (`models.moe.load_balance`): megatron's own aux loss is off, so one definition is trained by both
backends and PolicyActor adds it like any other term. On CPU: megatron's alltoall dispatcher creates
CUDA streams, so the allgather one is used; and megatron-core 0.16's router GEMM reads
`te_general_gemm`, which is undefined without transformer_engine (`_patch_router_gemm`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from verl_mtp.config.validate import megatron_refusal
from verl_mtp.models import ModelConfig
from verl_mtp.models.moe import aux_loss_and_loads, load_balance, mtp_routing_mask
from verl_mtp.net import free_port

INSTALL_HINT = ("actor_rollout_ref.actor.strategy=megatron needs megatron-core: "
                "pip install 'verl_mtp[megatron]' (or pip install 'megatron-core>=0.12')")


def require_megatron():
    """Import megatron.core or fail with one line saying what to install."""
    try:
        import megatron.core  # noqa: F401
        from megatron.core import parallel_state
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return parallel_state


@dataclass(frozen=True)
class ParallelSizes:
    """The `actor.megatron` keys this engine reads (verl names)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False  # only with TP > 1 and the TE spec (torch norms refuse it)
    use_distributed_optimizer: bool = False
    param_offload: bool = False
    grad_offload: bool = False
    optimizer_offload: bool = False
    seed: int = 42

    @classmethod
    def from_config(cls, megatron: dict | None) -> "ParallelSizes":
        megatron = megatron or {}
        refused = megatron_refusal(megatron)  # also refused at the start of a run (config.validate.check_runnable)
        if refused:
            key, value, why = refused
            raise ValueError(f"actor_rollout_ref.actor.megatron.{key}={value!r}: {why}")
        return cls(**{k: v for k, v in megatron.items() if k in cls.__dataclass_fields__})

    @property
    def model_parallel(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size


# ---------------------------------------------------------------- CPU workarounds


def cuda_available() -> bool:
    return torch.cuda.is_available()


def apply_cpu_workarounds() -> None:
    """Make megatron-core run on a CPU-only torch (see the module docstring). Idempotent."""
    if cuda_available() or getattr(torch.cuda.current_device, "_verl_mtp_cpu", False):
        return

    def current_device() -> str:
        return "cpu"

    current_device._verl_mtp_cpu = True
    torch.cuda.current_device = current_device
    # dist_checkpointing's writer (FileSystemWriterAsync.preload_tensors) waits for CUDA before writing
    torch.cuda.synchronize = lambda device=None: None
    # forward_backward_pipelining_without_interleaving counts tokens in torch.zeros(..., device="cuda")
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _CpuZerosTorch()


class _CpuZerosTorch:
    """`torch` as megatron's pipeline schedules module sees it on a CPU-only build: the same module,
    except that `zeros(device="cuda")` (which could only raise there) allocates on the CPU."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


@contextlib.contextmanager
def _tensor_cuda_stays_on_cpu():
    """While a GPTModel is built on a CPU-only torch: `Tensor.cuda()` returns the tensor itself. With PP > 1
    `LanguageModule.setup_embeddings_and_output_layer` moves the word embeddings of the first and last
    stage (tied output layer, MTP layers) with `.cuda()` before all-reducing them over the two stages."""
    if cuda_available():
        yield
        return
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda


def seed_rng_tracker(seed: int) -> None:
    """Megatron's model-parallel RNG: CUDA seeds on GPU, the no-op tracker on CPU."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    if cuda_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


# ---------------------------------------------------------------- process groups


def init_parallel(sizes: ParallelSizes) -> None:
    """Megatron's TP/PP/CP/DP groups over the already-initialised default group; a single process
    gets a world of one (megatron needs a default group even then). Reused when already set up
    with the same sizes, e.g. the actor and the reference policy in one process."""
    parallel_state = require_megatron()
    apply_cpu_workarounds()
    if not dist.is_initialized():
        backend = "nccl" if cuda_available() else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
    want = (sizes.tensor_model_parallel_size, sizes.pipeline_model_parallel_size, sizes.context_parallel_size)
    if parallel_state.model_parallel_is_initialized():
        have = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size(),
                parallel_state.get_context_parallel_world_size())
        if have == want:
            return
        parallel_state.destroy_model_parallel()
    world = dist.get_world_size()
    if world % sizes.model_parallel:
        raise ValueError(f"actor_rollout_ref.actor.megatron: tp*pp*cp = {sizes.model_parallel} does not divide "
                         f"the {world} ranks")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=want[0], pipeline_model_parallel_size=want[1],
                                             context_parallel_size=want[2])
    seed_rng_tracker(sizes.seed)


# ---------------------------------------------------------------- model


def use_transformer_engine() -> bool:
    """The TE layer spec on GPU when transformer_engine imports; the local spec otherwise."""
    if not cuda_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _linear_biases(cfg: ModelConfig) -> dict[str, bool]:
    """Megatron has two switches: `add_qkv_bias` (QKV only) and `add_bias_linear` (every linear)."""
    if not cfg.o_bias and not cfg.mlp_bias:
        return {"add_bias_linear": False, "add_qkv_bias": cfg.qkv_bias}
    if cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias:
        return {"add_bias_linear": True, "add_qkv_bias": True}
    raise ValueError(f"megatron cannot express biases qkv={cfg.qkv_bias} o={cfg.o_bias} mlp={cfg.mlp_bias}: "
                     "it has bias on QKV only, or on every linear layer")


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Megatron shards the vocabulary evenly over TP ranks; the pad rows are sliced off the logits."""
    return -(-vocab_size // tp) * tp


def transformer_config(cfg: ModelConfig, sizes: ParallelSizes, params_dtype: torch.dtype = torch.float32,
                       overrides: dict[str, Any] | None = None):
    """A TransformerConfig for a Qwen2/Llama/MiMo decoder: RMSNorm, SwiGLU, RoPE, GQA, no dropout."""
    from megatron.core.transformer import TransformerConfig

    te = use_transformer_engine()
    kwargs = dict(
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim, normalization="RMSNorm", layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, **_linear_biases(cfg),
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=cfg.initializer_range,
        tensor_model_parallel_size=sizes.tensor_model_parallel_size,
        pipeline_model_parallel_size=sizes.pipeline_model_parallel_size,
        context_parallel_size=sizes.context_parallel_size,
        sequence_parallel=sizes.sequence_parallel and te and sizes.tensor_model_parallel_size > 1,
        params_dtype=params_dtype, pipeline_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # our ModelConfig has K layers; 0 means "no MTP block" to megatron, which spells that None
        mtp_num_layers=cfg.num_nextn_predict_layers or None,
        # the fused kernels need CUDA (and TE / apex); the reference path is exact and runs anywhere
        bias_activation_fusion=te, masked_softmax_fusion=te, bias_dropout_fusion=te, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
        # weights are then overwritten from our checkpoint, but megatron marks TP-sharded parameters
        # (`tensor_model_parallel`, read by grad-norm code) only while initialising them
        use_cpu_initialization=not cuda_available(), perform_initialization=True,
        # micro-batches differ in length, so PP stages must exchange shapes first
        variable_seq_lengths=sizes.pipeline_model_parallel_size > 1,
        cpu_offloading=False,
        **moe_transformer_kwargs(cfg),
    )
    kwargs.update(overrides or {})
    return TransformerConfig(**kwargs)


def moe_transformer_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Our MoE fields as TransformerConfig keys. Megatron's load-balancing loss stays off (the engine adds
    ours through `RouterTap`); routing is in float32 like `models.moe.MoE.route`."""
    if not cfg.is_moe:  # alltoall: the only dispatcher that accepts variable lengths (PP), unused without MoE
        return {"moe_token_dispatcher_type": "alltoall"}
    if cfg.num_experts_per_tok == 1 and cfg.norm_topk_prob:
        raise ValueError("megatron cannot route top-1 with norm_topk_prob=true (the weight would be a constant 1 "
                         "with no router gradient); set norm_topk_prob=false")
    return dict(
        num_moe_experts=cfg.n_routed_experts, moe_router_topk=cfg.num_experts_per_tok,
        moe_ffn_hidden_size=cfg.moe_intermediate_size,
        moe_shared_expert_intermediate_size=cfg.n_shared_experts * cfg.moe_intermediate_size or None,
        moe_layer_freq=[int(cfg.trunk_layer_is_moe(i)) for i in range(cfg.num_hidden_layers)],
        # top-k of the logits then softmax over those k == renormalised top-k of the full softmax
        moe_router_pre_softmax=not cfg.norm_topk_prob, moe_router_dtype="fp32",
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_grouped_gemm=False,  # SequentialMLP: one MLP per expert, the names `megatron_convert` maps
        moe_token_dispatcher_type="alltoall" if cuda_available() else "allgather",
    )


def _patch_router_gemm() -> None:
    """megatron-core 0.16 `RouterGatingLinearFunction` tests `te_general_gemm is not None`, a name bound
    only when transformer_engine imports; without TE, bind it to None so the torch GEMM runs."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


@functools.cache
def cp_attention_class() -> type:
    """The local spec's core attention under context parallel (defined lazily: megatron loads on use)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from verl_mtp.engines import context_parallel as cp

    class AllGatherCPAttention(DotProductAttention):
        """Context parallel by all-gather (TE's `cp_comm_type="all_gather"` without its fused kernel):
        this rank's queries (S/cp of them) attend to the keys and values of the whole sequence, gathered
        over the CP group in sequence order. The engine's attention mask carries the queries' true
        positions (`context_parallel.causal_mask`). The gather's backward sums the other ranks'
        gradients for this rank's keys and values."""

        def __init__(self, config, *args, **kwargs):
            local = copy.copy(config)  # the parent refuses CP > 1; per rank this is plain attention
            local.context_parallel_size = 1
            super().__init__(local, *args, **kwargs)
            self.cp_group = parallel_state.get_context_parallel_group()

        def forward(self, query, key, value, attention_mask, **kwargs):
            key, value = (cp.gather(t, self.cp_group, dim=0) for t in (key, value))
            return super().forward(query, key, value, attention_mask, **kwargs)

    return AllGatherCPAttention


def layer_spec(te: bool, num_experts: int | None = None, context_parallel: bool = False):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if te:
        return specs.get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, moe_grouped_gemm=False)
    spec = specs.get_gpt_layer_local_spec(num_experts=num_experts, normalization="RMSNorm")
    if context_parallel:
        spec = copy.deepcopy(spec)
        spec.submodules.self_attention.submodules.core_attention = cp_attention_class()
    return spec


def build_gpt_model(cfg: ModelConfig, config, vocab_size: int):
    """The megatron policy for this pipeline stage: trunk layers, and the MTP block on the last stage."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec

    te = use_transformer_engine()
    cp = config.context_parallel_size > 1
    spec = layer_spec(te, context_parallel=cp)
    if cfg.is_moe:  # a spec per layer (dense below first_k_dense_replace), sliced to this pipeline stage
        _patch_router_gemm()
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=te, normalization="RMSNorm")
    mtp_spec = None
    if config.mtp_num_layers:
        mtp_layer = layer_spec(te, cfg.n_routed_experts if cfg.mtp_layers_are_moe else None, context_parallel=cp)
        mtp_spec = get_gpt_mtp_block_spec(config, mtp_layer, use_transformer_engine=te)
    pre, post = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    with _tensor_cuda_stays_on_cpu():
        return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab_size,
                        max_sequence_length=cfg.max_position_embeddings, pre_process=pre, post_process=post,
                        share_embeddings_and_output_weights=cfg.tie_word_embeddings, position_embedding_type="rope",
                        rotary_base=cfg.rope_theta, mtp_block_spec=mtp_spec)


def layer_offset(config) -> int:
    """Global index of this pipeline stage's first trunk layer."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    params = inspect.signature(get_transformer_layer_offset).parameters
    return get_transformer_layer_offset(config) if len(params) else get_transformer_layer_offset()


class RouterTap:
    """Forward hooks on every MoE router of a GPTModel: each call's input (S, B, H) and top-k choice
    (S*B, E) are kept until `collect`, which turns them into `MTPOutput.aux_loss` / `.moe_stats` exactly
    as our model computes them. Router logits are recomputed from the input (an (E, H) GEMM), which also
    carries the loss's gradient to the router and the layers below.

        out = engine forward ...                      # routers record
        out.aux_loss, out.moe_stats = tap.collect(valid)
    """

    def __init__(self, gpt, cfg: ModelConfig):
        from megatron.core.transformer.moe.router import TopKRouter

        self.cfg = cfg
        self.calls: list[tuple[int | None, torch.nn.Module, torch.Tensor, torch.Tensor]] = []
        for name, module in gpt.named_modules():
            if isinstance(module, TopKRouter):
                mtp = re.match(r"mtp\.layers\.(\d+)\.", name)
                module.register_forward_hook(functools.partial(self._record, int(mtp.group(1)) if mtp else None))

    def _record(self, mtp_depth: int | None, router, args, output) -> None:
        self.calls.append((mtp_depth, router, args[0], output[1]))

    def collect(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """valid: (B, S) bool in the layout the GPTModel ran on. Forgets the recorded calls."""
        calls, self.calls = self.calls, []
        if not calls:
            return torch.zeros((), device=valid.device), None
        records = []
        for depth, router, hidden, chosen in calls:
            mask = valid if depth is None else mtp_routing_mask(valid, depth)
            if hidden.shape[0] * hidden.shape[1] != mask.numel():
                raise NotImplementedError("megatron engine: MoE load balancing with sequence/context parallel "
                                          "(routers see a slice of the tokens) is not supported")
            probs = F.linear(hidden.reshape(-1, hidden.shape[-1]).float(), router.weight.float()).softmax(-1)
            records.append(load_balance(probs, chosen, mask.t().reshape(-1), self.cfg.num_experts_per_tok))
        return aux_loss_and_loads(records, self.cfg.router_aux_loss_coef)
