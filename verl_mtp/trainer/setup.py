"""Turning a config into concrete things: device, tokenizer, policy model, datasets."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from verl_mtp.models import MTPCausalLM, ModelConfig


def resolve_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def num_mtp_layers(model_cfg) -> int:
    return model_cfg.mtp.num_layers if model_cfg.mtp.enable else 0


def tokenizer_path(cfg, run_dir: str) -> str:
    m = cfg.actor_rollout_ref.model
    return m.tokenizer_path or m.path or os.path.join(run_dir, "tokenizer")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def ensure_synthetic_task(cfg, run_dir: str) -> tuple[list[str], list[str]]:
    """`data.train_files: null` means the synthetic math task: written once into the run folder,
    with a tokenizer trained on it when none is configured."""
    from verl_mtp.data.synthetic_math import iter_corpus_text, write_rl_dataset
    from verl_mtp.data.tokenizer import train_tokenizer

    data_dir = Path(run_dir) / "data"
    if not (data_dir / "train.parquet").exists():
        write_rl_dataset(str(data_dir), n_train=4096, n_test=256, seed=cfg.data.seed or 0)
    tok_dir = tokenizer_path(cfg, run_dir)
    if not Path(tok_dir, "tokenizer.json").exists() and not cfg.actor_rollout_ref.model.path:
        train_tokenizer(iter_corpus_text(20000, seed=0), tok_dir)
    return [str(data_dir / "train.parquet")], [str(data_dir / "test.parquet")]


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
