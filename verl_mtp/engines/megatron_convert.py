"""Weight conversion between our HF/MiMo names and megatron-core's GPTModel layout, both ways.

Pure tensor code (no megatron import), so it is testable anywhere. What differs:

  HF / MiMo (ours)                                   megatron-core GPTModel
  model.embed_tokens.weight              (V, H)      embedding.word_embeddings.weight   vocab-sharded, padded
  lm_head.weight                         (V, H)      output_layer.weight                vocab-sharded, padded
  model.norm.weight                                  decoder.final_layernorm.weight
  model.layers.{i}.self_attn.{q,k,v}_proj            decoder.layers.{i}.self_attention.linear_qkv  fused, per KV group
  model.layers.{i}.self_attn.o_proj                  ...self_attention.linear_proj      row-parallel (dim 1)
  model.layers.{i}.mlp.{gate,up}_proj                ...mlp.linear_fc1                  fused [gate; up] per TP rank
  model.layers.{i}.mlp.down_proj                     ...mlp.linear_fc2                  row-parallel (dim 1)
  model.layers.{i}.input_layernorm                   ...input_layernorm     (TE spec: linear_qkv.layer_norm_weight)
  model.layers.{i}.post_attention_layernorm          ...pre_mlp_layernorm   (TE spec: linear_fc1.layer_norm_weight)
  model.mtp_layers.{k}.token_layernorm               mtp.layers.{k}.enorm
  model.mtp_layers.{k}.hidden_layernorm              mtp.layers.{k}.hnorm
  model.mtp_layers.{k}.input_proj  (H, 2H)           mtp.layers.{k}.eh_proj (H, 2H)     column-parallel, halves swapped
  model.mtp_layers.{k}.final_layernorm               mtp.layers.{k}.final_layernorm
  model.mtp_layers.{k}.{self_attn,mlp,*_layernorm}   mtp.layers.{k}.transformer_layer.*

MoE blocks (`mlp.gate.weight` present), in trunk or MTP layers:
  ...mlp.gate.weight                     (E, H)      ...mlp.router.weight               replicated
  ...mlp.experts.{j}.{gate,up}_proj                  ...mlp.experts.local_experts.{j}.linear_fc1  fused as above
  ...mlp.experts.{j}.down_proj                       ...mlp.experts.local_experts.{j}.linear_fc2
  ...mlp.shared_experts.{gate,up,down}_proj          ...mlp.shared_experts.linear_fc1 / linear_fc2
  ...post_attention_layernorm                        ...pre_mlp_layernorm   (own module in both specs)
Experts are split over TP ranks like a dense MLP (megatron's expert-TP size defaults to the TP size);
expert parallelism and grouped-GEMM names (`experts.linear_fc1.weight{j}`) are not produced.

The swapped halves: MiMo's input_proj reads cat(hidden_layernorm(h), token_layernorm(emb)); megatron's
eh_proj reads cat(enorm(emb), hnorm(h)). So eh_proj.weight = cat(input_proj.weight[:, H:], [:, :H]).

Fused QKV: megatron orders rows by KV group g: [q heads of g; k_g; v_g], and TP ranks own whole
groups. Gated MLP: each TP rank's fc1 shard is [gate shard; up shard], so the full fc1 interleaves.

`to_megatron` gives one TP rank's shard of one pipeline stage; `to_hf` joins the TP shards of one stage.
"""

from __future__ import annotations

import re

import torch

from verl_mtp.models import ModelConfig

Tensors = dict[str, torch.Tensor]


# ---------------------------------------------------------------- fused QKV and gated MLP


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig, tp: int, rank: int) -> torch.Tensor:
    """(Hq*D, ...), (G*D, ...), (G*D, ...) -> this rank's fused rows, ordered by KV group."""
    groups, d = cfg.num_key_value_heads, cfg.head_dim
    per_group = cfg.num_attention_heads // groups
    rest = q.shape[1:]
    fused = torch.cat([q.reshape(groups, per_group * d, *rest), k.reshape(groups, d, *rest),
                       v.reshape(groups, d, *rest)], dim=1)
    return fused.chunk(tp, dim=0)[rank].reshape(-1, *rest)


def split_qkv(shards: list[torch.Tensor], cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv` over all TP ranks' shards."""
    groups, d = cfg.num_key_value_heads, cfg.head_dim
    per_group = cfg.num_attention_heads // groups
    fused = torch.cat(shards, dim=0)
    rest = fused.shape[1:]
    fused = fused.reshape(groups, (per_group + 2) * d, *rest)
    q, k, v = fused.split([per_group * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)


def split_gate_up(shards: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    halves = [s.chunk(2, dim=0) for s in shards]
    return torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])]) if rows > w.shape[0] else w


# ---------------------------------------------------------------- layer blocks


def _norm_names(fused_norms: bool, moe: bool) -> tuple[str, str]:
    """Where the two pre-norms of a transformer layer live: own modules (local spec) or fused into the
    following linear (TE spec). An MoE block's pre-MLP norm is its own module in both specs."""
    in_norm = "self_attention.linear_qkv.layer_norm_weight" if fused_norms else "input_layernorm.weight"
    mlp_norm = "mlp.linear_fc1.layer_norm_weight" if fused_norms and not moe else "pre_mlp_layernorm.weight"
    return in_norm, mlp_norm


def _swiglu_to_megatron(hf: Tensors, src: str, dst: str, tp: int, rank: int) -> Tensors:
    """gate/up/down_proj weights under `src` -> this rank's linear_fc1 / linear_fc2 under `dst`."""
    return {dst + "linear_fc1.weight": fuse_gate_up(hf[src + "gate_proj.weight"], hf[src + "up_proj.weight"], tp, rank),
            dst + "linear_fc2.weight": hf[src + "down_proj.weight"].chunk(tp, dim=1)[rank]}


def _swiglu_to_hf(shards: list[Tensors], src: str, dst: str) -> Tensors:
    gate, up = split_gate_up([s[src + "linear_fc1.weight"] for s in shards])
    return {dst + "gate_proj.weight": gate, dst + "up_proj.weight": up,
            dst + "down_proj.weight": torch.cat([s[src + "linear_fc2.weight"] for s in shards], dim=1)}


def _moe_to_megatron(hf: Tensors, src: str, dst: str, cfg: ModelConfig, tp: int, rank: int) -> Tensors:
    """An MoE FFN: HF prefix `src` ("model.layers.3.mlp.") -> megatron prefix `dst` ("decoder.layers.3.mlp.")."""
    out = {dst + "router.weight": hf[src + "gate.weight"]}
    for j in range(cfg.n_routed_experts):
        out.update(_swiglu_to_megatron(hf, f"{src}experts.{j}.", f"{dst}experts.local_experts.{j}.", tp, rank))
    if cfg.n_shared_experts:
        out.update(_swiglu_to_megatron(hf, src + "shared_experts.", dst + "shared_experts.", tp, rank))
    return out


def _moe_to_hf(shards: list[Tensors], src: str, dst: str, cfg: ModelConfig) -> Tensors:
    out = {dst + "gate.weight": shards[0][src + "router.weight"]}
    for j in range(cfg.n_routed_experts):
        out.update(_swiglu_to_hf(shards, f"{src}experts.local_experts.{j}.", f"{dst}experts.{j}."))
    if cfg.n_shared_experts:
        out.update(_swiglu_to_hf(shards, src + "shared_experts.", dst + "shared_experts."))
    return out


def _layer_to_megatron(hf: Tensors, src: str, dst: str, cfg: ModelConfig, tp: int, rank: int,
                       fused_norms: bool) -> Tensors:
    """One decoder block: HF prefix `src` ("model.layers.3.") -> megatron prefix `dst`."""
    attn, mlp = src + "self_attn.", src + "mlp."
    moe = mlp + "gate.weight" in hf
    in_norm, mlp_norm = _norm_names(fused_norms, moe)
    out = {
        dst + in_norm: hf[src + "input_layernorm.weight"],
        dst + mlp_norm: hf[src + "post_attention_layernorm.weight"],
        dst + "self_attention.linear_qkv.weight": fuse_qkv(hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"],
                                                           hf[attn + "v_proj.weight"], cfg, tp, rank),
        dst + "self_attention.linear_proj.weight": hf[attn + "o_proj.weight"].chunk(tp, dim=1)[rank],
    }
    out.update(_moe_to_megatron(hf, mlp, dst + "mlp.", cfg, tp, rank) if moe
               else _swiglu_to_megatron(hf, mlp, dst + "mlp.", tp, rank))
    if cfg.qkv_bias:
        out[dst + "self_attention.linear_qkv.bias"] = fuse_qkv(hf[attn + "q_proj.bias"], hf[attn + "k_proj.bias"],
                                                               hf[attn + "v_proj.bias"], cfg, tp, rank)
    if cfg.o_bias:  # row-parallel biases are added once, after the reduce: every rank holds all of it
        out[dst + "self_attention.linear_proj.bias"] = hf[attn + "o_proj.bias"]
    if cfg.mlp_bias:
        out[dst + "mlp.linear_fc1.bias"] = fuse_gate_up(hf[mlp + "gate_proj.bias"], hf[mlp + "up_proj.bias"], tp, rank)
        out[dst + "mlp.linear_fc2.bias"] = hf[mlp + "down_proj.bias"]
    return out


def _layer_to_hf(shards: list[Tensors], src: str, dst: str, cfg: ModelConfig) -> Tensors:
    """Inverse of `_layer_to_megatron`: megatron prefix `src` in every TP shard -> HF prefix `dst`."""
    first = shards[0]
    fused_norms = src + "input_layernorm.weight" not in first
    moe = src + "mlp.router.weight" in first
    in_norm, mlp_norm = _norm_names(fused_norms, moe)
    attn, mlp = dst + "self_attn.", dst + "mlp."
    gather = lambda name: [s[src + name] for s in shards]  # noqa: E731
    q, k, v = split_qkv(gather("self_attention.linear_qkv.weight"), cfg)
    out = {
        dst + "input_layernorm.weight": first[src + in_norm],
        dst + "post_attention_layernorm.weight": first[src + mlp_norm],
        attn + "q_proj.weight": q, attn + "k_proj.weight": k, attn + "v_proj.weight": v,
        attn + "o_proj.weight": torch.cat(gather("self_attention.linear_proj.weight"), dim=1),
    }
    out.update(_moe_to_hf(shards, src + "mlp.", mlp, cfg) if moe else _swiglu_to_hf(shards, src + "mlp.", mlp))
    if cfg.qkv_bias:
        out[attn + "q_proj.bias"], out[attn + "k_proj.bias"], out[attn + "v_proj.bias"] = split_qkv(
            gather("self_attention.linear_qkv.bias"), cfg)
    if cfg.o_bias:
        out[attn + "o_proj.bias"] = first[src + "self_attention.linear_proj.bias"]
    if cfg.mlp_bias:
        out[mlp + "gate_proj.bias"], out[mlp + "up_proj.bias"] = split_gate_up(gather("mlp.linear_fc1.bias"))
        out[mlp + "down_proj.bias"] = first[src + "mlp.linear_fc2.bias"]
    return out


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    """(H, 2H): [a | b] -> [b | a]; its own inverse. MiMo's input_proj <-> megatron's eh_proj columns."""
    a, b = w.chunk(2, dim=1)
    return torch.cat([b, a], dim=1)


# ---------------------------------------------------------------- whole model


def to_megatron(hf: Tensors, cfg: ModelConfig, tp: int = 1, rank: int = 0, vocab_padded: int | None = None,
                layers: range | None = None, fused_norms: bool = False) -> Tensors:
    """HF/MiMo tensors -> megatron names for TP rank `rank` of `tp`.

    layers: the global trunk layers this pipeline stage holds (default all); they are renamed to the
    stage's local indices. Embedding, output layer, final norm and MTP keys are always produced; the
    caller keeps those its stage's GPTModel has (`load_into` does that)."""
    vocab_padded = vocab_padded or cfg.vocab_size
    layers = range(cfg.num_hidden_layers) if layers is None else layers
    embed = _pad_rows(hf["model.embed_tokens.weight"], vocab_padded).chunk(tp, dim=0)[rank]
    out = {"embedding.word_embeddings.weight": embed, "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    # tied: the last pipeline stage holds its own copy of the embedding as output layer (PP > 1)
    out["output_layer.weight"] = (embed if cfg.tie_word_embeddings else
                                  _pad_rows(hf["lm_head.weight"], vocab_padded).chunk(tp, dim=0)[rank])
    for local, i in enumerate(layers):
        out.update(_layer_to_megatron(hf, f"model.layers.{i}.", f"decoder.layers.{local}.", cfg, tp, rank, fused_norms))
    for k in range(cfg.num_nextn_predict_layers):
        src, dst = f"model.mtp_layers.{k}.", f"mtp.layers.{k}."
        out.update(_layer_to_megatron(hf, src, dst + "transformer_layer.", cfg, tp, rank, fused_norms))
        out[dst + "enorm.weight"] = hf[src + "token_layernorm.weight"]
        out[dst + "hnorm.weight"] = hf[src + "hidden_layernorm.weight"]
        out[dst + "eh_proj.weight"] = _swap_halves(hf[src + "input_proj.weight"]).chunk(tp, dim=0)[rank]
        out[dst + "final_layernorm.weight"] = hf[src + "final_layernorm.weight"]
    return out


def to_hf(shards: list[Tensors], cfg: ModelConfig, layer_offset: int = 0) -> Tensors:
    """Megatron tensors of one pipeline stage, one dict per TP rank (in rank order) -> HF/MiMo names.
    Only what the stage holds is returned; `layer_offset` is the global index of its first layer."""
    first = shards[0]
    out: Tensors = {}
    if "embedding.word_embeddings.weight" in first:
        embed = torch.cat([s["embedding.word_embeddings.weight"] for s in shards])[: cfg.vocab_size]
        out["model.embed_tokens.weight"] = embed
        if cfg.tie_word_embeddings:
            out["lm_head.weight"] = embed
    if "output_layer.weight" in first:
        out["lm_head.weight"] = torch.cat([s["output_layer.weight"] for s in shards])[: cfg.vocab_size]
    if "decoder.final_layernorm.weight" in first:
        out["model.norm.weight"] = first["decoder.final_layernorm.weight"]
    local_layers = sorted({int(m.group(1)) for key in first if (m := re.match(r"decoder\.layers\.(\d+)\.", key))})
    for j in local_layers:
        out.update(_layer_to_hf(shards, f"decoder.layers.{j}.", f"model.layers.{layer_offset + j}.", cfg))
    mtp_layers = sorted({int(m.group(1)) for key in first if (m := re.match(r"mtp\.layers\.(\d+)\.", key))})
    for k in mtp_layers:
        src, dst = f"mtp.layers.{k}.", f"model.mtp_layers.{k}."
        out.update(_layer_to_hf(shards, src + "transformer_layer.", dst, cfg))
        out[dst + "token_layernorm.weight"] = first[src + "enorm.weight"]
        out[dst + "hidden_layernorm.weight"] = first[src + "hnorm.weight"]
        out[dst + "input_proj.weight"] = _swap_halves(torch.cat([s[src + "eh_proj.weight"] for s in shards]))
        out[dst + "final_layernorm.weight"] = first[src + "final_layernorm.weight"]
    return out
