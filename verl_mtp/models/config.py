"""Model configuration: one dataclass that maps to and from HF ``config.json`` (Qwen2, Llama, MiMo)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Architectures whose folders we read as our trunk. MiMo is Qwen2 plus `num_nextn_predict_layers`.
_QKV_BIAS_BY_TYPE = {"qwen2": True, "mimo": True, "llama": False, "mistral": False}


@dataclass
class ModelConfig:
    """A Qwen2/Llama-architecture decoder with K MiMo-style MTP layers."""

    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True  # Qwen2/MiMo: bias on q/k/v; Llama: `attention_bias` on q/k/v/o
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 2  # K, MiMo's name for the number of MTP layers
    # Mixture of experts, DeepSeek style (HF names of DeepSeek-V3 / Qwen2-MoE); 0 routed experts = dense
    n_routed_experts: int = 0
    num_experts_per_tok: int = 2  # top-k routed experts per token
    n_shared_experts: int = 0  # always-on experts, run as one SwiGLU of n_shared * moe_intermediate_size
    moe_intermediate_size: int | None = None  # per expert; None: intermediate_size
    router_aux_loss_coef: float = 0.001  # per MoE layer; see `models.moe.load_balance` for the loss
    first_k_dense_replace: int = 0  # trunk layers [0, k) keep the dense FFN of intermediate_size
    moe_in_mtp: bool = True  # MTP layers use MoE too (DeepSeek-V3); False: dense MTP layers
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    source_model_type: str = "mimo"  # what the folder we came from was; we always save as MiMo
    extra: dict[str, Any] = field(default_factory=dict)  # unknown HF keys, written back unchanged
    # a MiMo folder's own modeling code, {"auto_map": ..., "files": {name: text}}, that every save copies
    # (see models.checkpoint); empty: the folder gets verl_mtp's own
    remote_code: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        checks = {
            "num_attention_heads": self.num_attention_heads % self.num_key_value_heads == 0,
            "head_dim": self.head_dim % 2 == 0,
            "num_nextn_predict_layers": self.num_nextn_predict_layers >= 0,
            "vocab_size": self.vocab_size > 0,
        }
        self.n_routed_experts = self.n_routed_experts or 0  # DeepSeek folders write null for "dense"
        self.n_shared_experts = self.n_shared_experts or 0
        if self.n_routed_experts:
            self.moe_intermediate_size = self.moe_intermediate_size or self.intermediate_size
            checks.update({
                "n_routed_experts": self.n_routed_experts > 0,
                "num_experts_per_tok": 1 <= self.num_experts_per_tok <= self.n_routed_experts,
                "n_shared_experts": self.n_shared_experts >= 0,
                "moe_intermediate_size": self.moe_intermediate_size > 0,
                "router_aux_loss_coef": self.router_aux_loss_coef >= 0,
                "first_k_dense_replace": 0 <= self.first_k_dense_replace <= self.num_hidden_layers,
                "mlp_bias": not self.mlp_bias,  # experts have no biases (DeepSeek, megatron's dispatcher)
            })
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"model config '{key}' is invalid: {getattr(self, key)!r}")

    @property
    def num_mtp_layers(self) -> int:
        return self.num_nextn_predict_layers

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    def trunk_layer_is_moe(self, layer: int) -> bool:
        return self.is_moe and layer >= self.first_k_dense_replace

    @property
    def mtp_layers_are_moe(self) -> bool:
        return self.is_moe and self.moe_in_mtp

    def moe_hf_dict(self) -> dict[str, Any]:
        """The MoE keys of config.json; empty for a dense model, whose config.json stays as it was."""
        if not self.is_moe:
            return {}
        return {"n_routed_experts": self.n_routed_experts, "num_experts_per_tok": self.num_experts_per_tok,
                "n_shared_experts": self.n_shared_experts, "moe_intermediate_size": self.moe_intermediate_size,
                "router_aux_loss_coef": self.router_aux_loss_coef, "first_k_dense_replace": self.first_k_dense_replace,
                "moe_in_mtp": self.moe_in_mtp, "norm_topk_prob": self.norm_topk_prob}

    # ---- HF config.json <-> ModelConfig ----------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        model_type = d.get("model_type", "qwen2")
        if model_type not in _QKV_BIAS_BY_TYPE:
            raise ValueError(
                f"config.json 'model_type' is {model_type!r}; supported: {sorted(_QKV_BIAS_BY_TYPE)}"
            )
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"config.json 'rope_scaling' type {rope_type!r} is not supported (only default RoPE)")
        attention_bias = d.get("attention_bias", False)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: d[k] for k in known if k in d and k not in ("extra", "qkv_bias", "o_bias")}
        kwargs["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        # our own folders say it outright; HF folders imply it by architecture
        kwargs["qkv_bias"] = d.get("qkv_bias", _QKV_BIAS_BY_TYPE[model_type] or attention_bias)
        kwargs["o_bias"] = d.get("o_bias", model_type in ("llama", "mistral") and attention_bias)
        kwargs.setdefault("num_nextn_predict_layers", 0)
        kwargs["source_model_type"] = model_type
        passthrough = ("architectures", "auto_map", "model_type", "torch_dtype", "dtype", "rope_parameters",
                       "rope_scaling", "attention_bias", "transformers_version", "num_nextn_predict_layers")
        kwargs["extra"] = {k: v for k, v in d.items() if k not in known and k not in passthrough}
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """A MiMo config.json that transformers' Qwen2 classes also read (they ignore the MTP keys)."""
        d = dict(self.extra)
        d.update({
            "architectures": ["MiMoForCausalLM"],
            "model_type": "mimo",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "attention_bias": self.qkv_bias,
            "qkv_bias": self.qkv_bias,
            "o_bias": self.o_bias,
            "mlp_bias": self.mlp_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
            "use_sliding_window": False,
        })
        d.update(self.moe_hf_dict())
        return d


def tiny_config(vocab_size: int = 512, **overrides: Any) -> ModelConfig:
    """The embedded default: a ~1M-parameter model that trains in minutes on a laptop CPU."""
    return ModelConfig(vocab_size=vocab_size, **overrides)
