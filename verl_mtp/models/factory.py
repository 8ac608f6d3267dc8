"""Turning the `actor_rollout_ref.model` config into concrete things every layer above needs: the
device, the tokenizer of the model folder and the policy model itself (trainer and workers alike)."""

from __future__ import annotations

import torch

from verl_mtp.models.config import ModelConfig
from verl_mtp.models.mtp_model import MTPCausalLM


def resolve_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def num_mtp_layers(model_cfg) -> int:
    return model_cfg.mtp.num_layers if model_cfg.mtp.enable else 0


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def build_policy_model(cfg, vocab_size: int, device: str, seed: int) -> MTPCausalLM:
    """The policy as configured: an HF/MiMo folder, or a fresh model from `model.scratch`."""
    m = cfg.actor_rollout_ref.model
    k = num_mtp_layers(m)
    if m.path:
        return MTPCausalLM.from_pretrained(m.path, num_mtp_layers=k, device=device)
    s = m.scratch
    config = ModelConfig(vocab_size=s.vocab_size or vocab_size, hidden_size=s.hidden_size,
                         intermediate_size=s.intermediate_size, num_hidden_layers=s.num_hidden_layers,
                         num_attention_heads=s.num_attention_heads, num_key_value_heads=s.num_key_value_heads,
                         max_position_embeddings=s.max_position_embeddings, rope_theta=s.rope_theta,
                         rms_norm_eps=s.rms_norm_eps, tie_word_embeddings=s.tie_word_embeddings,
                         num_nextn_predict_layers=k, n_routed_experts=s.n_routed_experts,
                         num_experts_per_tok=s.num_experts_per_tok, n_shared_experts=s.n_shared_experts,
                         moe_intermediate_size=s.moe_intermediate_size, router_aux_loss_coef=s.router_aux_loss_coef,
                         first_k_dense_replace=s.first_k_dense_replace, moe_in_mtp=s.moe_in_mtp,
                         norm_topk_prob=s.norm_topk_prob)
    torch.manual_seed(seed)  # every rank builds the same initial weights
    with torch.device(device):
        return MTPCausalLM(config)
