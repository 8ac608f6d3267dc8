"""Qwen2/Llama-architecture decoder with K MiMo-style multi-token-prediction layers.

MTP layer i (0-based) at position t reads ``h_i[t]`` and the embedding of token ``t+i+1``:

    x = input_proj(cat(hidden_layernorm(h_i[t]), token_layernorm(embed(tok[t+i+1]))))
    h_{i+1}[t] = final_layernorm(decoder_block(x))           # causal attention within layer i
    mtp_logits[i][t] = lm_head(h_{i+1}[t])                    # predicts tok[t+i+2]

``h_0`` is the trunk's last hidden state (after its final norm, i.e. what the LM head reads).
The same layer code serves three paths: a full teacher-forced forward (training, scoring), and
chunked cached forwards for the trunk and each MTP layer (the rollout engine). The cache is
indexed by absolute position, so rolling back after a rejected draft is just a shorter length.

The FFN of a block is a SwiGLU MLP, or with `n_routed_experts > 0` a DeepSeek-style MoE (see
`models.moe`) in trunk layers >= `first_k_dense_replace` and, if `moe_in_mtp`, in the MTP layers. The
full forward then also returns the load-balancing loss and per-layer expert loads; routing is per
token, so the cached paths need nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from verl_mtp.algos.mtp_loss import shift_left
from verl_mtp.models.config import ModelConfig
from verl_mtp.models.moe import MoE, Routing, SwiGLU, aux_loss_and_loads, mtp_routing_mask


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """(B, T) positions -> cos, sin of shape (B, 1, T, D) for broadcasting over heads."""
    freqs = position_ids[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """Preallocated K/V for every attention layer (trunk first, then MTP layers) and `num_slots` rows.

    A row is a sequence slot of the rollout engine. Entries are addressed by absolute position; what a
    sequence "has" is decided by the caller's lengths, so stale entries past a length are harmless:
    causal masking by position keeps any query from reading them, and later writes overwrite them.
    """

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        # K and V in one tensor, so a chunk's keys and values are written with one op (rollout.fast_model)
        self.kv = torch.zeros((2, num_layers, num_slots, num_kv_heads, max_len, head_dim), dtype=dtype, device=device)
        self.k, self.v = self.kv[0], self.kv[1]
        self.max_len = max_len

    def view(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, length: int,
             block: slice | None = None) -> "CacheView":
        if length > self.max_len:
            raise ValueError(f"KV cache overflow: position {length - 1} >= max_len {self.max_len}")
        return CacheView(self, layer, slots, positions, length, block)


def slot_block(slots: torch.Tensor) -> slice | None:
    """`slots` as a slice when they are consecutive ascending rows (the engine's common case), else None."""
    first, n = int(slots[0]), slots.numel()
    if int(slots[-1]) - first != n - 1 or (n > 1 and not bool((slots.diff() == 1).all())):
        return None
    return slice(first, first + n)


@dataclass
class CacheView:
    """One layer's cache as seen by one chunked forward: which rows, at which positions."""

    cache: KVCache
    layer: int
    slots: torch.Tensor  # (B,) cache rows
    positions: torch.Tensor  # (B, T) absolute positions of the chunk's tokens
    length: int  # 1 + the largest position: keys are read for positions < length
    block: slice | None = None  # `slots` as a slice, when they are consecutive (see `slot_block`)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the chunk's (B, Hkv, T, D) keys/values, return (B, Hkv, L, D) for positions < L."""
        ck, cv = self.cache.k[self.layer], self.cache.v[self.layer]
        rows = self.slots[:, None]
        ck[rows, :, self.positions] = k.transpose(1, 2)
        cv[rows, :, self.positions] = v.transpose(1, 2)
        # consecutive rows are read as a view; a gather would copy every row's whole K/V in every layer
        read = self.block if self.block is not None else self.slots
        return ck[read, :, : self.length], cv[read, :, : self.length]


def cached_causal_mask(positions: torch.Tensor, length: int | None = None) -> tuple[torch.Tensor, int]:
    """(B, T) query positions -> ((B, 1, T, L) mask of key position <= query position, L).

    L defaults to 1 + the largest position. A caller whose chunk pads rows with a scratch position past
    every real one passes the real L, so no layer reads keys up to the scratch; the padded queries then
    see every key read, which keeps their rows finite."""
    length = int(positions.max()) + 1 if length is None else length
    kpos = torch.arange(length, device=positions.device)
    return (kpos[None, None, :] <= positions[:, :, None])[:, None], length


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of a short query chunk over cached keys: q (B, H, T, D), k/v (B, Hkv, L, D), bool mask
    (B, 1, T, L). The H/Hkv query heads that share a KV head become one (G*T)-row matrix, so K and V are
    read once per group and never repeated per head. On CPU this is 3-3.5x faster than SDPA for
    verify chunks at batch 64 (T=3) and ~1.2x for one-token decode there; SDPA stays faster for small
    batches and long chunks (see `Attention.forward`)."""
    b, h, t, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    g = h // hkv
    scores = torch.matmul(q.reshape(b, hkv, g * t, d), k.transpose(-1, -2)).view(b, hkv, g, t, length)
    scores = scores.mul_(d ** -0.5).masked_fill_(~mask[:, :, None], float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).view(b, hkv, g * t, length), v).view(b, h, t, d)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A chunk's queries (B, H, T, D) over cached keys/values (B, Hkv, L, D): `grouped_attention` for the
    decode, draft and verify chunks of a large batch, SDPA otherwise."""
    b, h, t, _ = q.shape
    if t <= 16 and b * t >= 24:
        return grouped_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=h != k.shape[1])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask, kv: CacheView | None = None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k, v = kv.update(k, v)
        if kv is not None:
            out = cached_attention(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                 enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def feed_forward(cfg: ModelConfig, moe: bool) -> nn.Module:
    if not moe:
        return SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
    return MoE(cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
               cfg.n_shared_experts, cfg.norm_topk_prob)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool = False):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = feed_forward(cfg, moe)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv: CacheView | None = None, routing: Routing | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, routing) if isinstance(self.mlp, MoE) else self.mlp(h))


class MTPLayer(DecoderLayer):
    """MiMo's MTP layer: a decoder block fed by the projection of two normed inputs."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, moe=cfg.mtp_layers_are_moe)
        self.token_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, hidden, token_emb, cos, sin, mask, kv: CacheView | None = None, routing: Routing | None = None):
        x = self.input_proj(torch.cat([self.hidden_layernorm(hidden), self.token_layernorm(token_emb)], dim=-1))
        return self.final_layernorm(super().forward(x, cos, sin, mask, kv, routing))


class MTPBackbone(nn.Module):
    """The `model.` namespace of the checkpoint: embeddings, trunk layers, final norm, MTP layers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, cfg.trunk_layer_is_moe(i))
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mtp_layers = nn.ModuleList(MTPLayer(cfg) for _ in range(cfg.num_nextn_predict_layers))
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)


@dataclass
class MTPOutput:
    logits: torch.Tensor  # (B, T, V) next-token logits of the trunk
    mtp_logits: list[torch.Tensor]  # K x (B, T, V); entry i at position t predicts token t+i+2
    hidden_states: torch.Tensor  # (B, T, H) trunk output after the final norm
    # MoE only (0 and None when dense), over the L MoE layers that ran, trunk first, then MTP layers:
    aux_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))  # coef * sum of their balance losses
    moe_stats: torch.Tensor | None = None  # (L, E) each layer's expert load fractions (see models.moe)


def padding_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 1/0 mask -> (B, 1, T, T) bool: causal and not padding. Every query may see itself, so
    padded rows stay finite (a fully masked row would make SDPA return NaN and poison masked sums)."""
    t = attention_mask.shape[1]
    idx = torch.arange(t, device=attention_mask.device)
    causal = idx[None, :] <= idx[:, None]
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    return (allowed | torch.eye(t, dtype=torch.bool, device=attention_mask.device))[:, None]


class MTPCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = MTPBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def num_mtp_layers(self) -> int:
        return len(self.model.mtp_layers)

    # ---- full (teacher-forced) forward ----------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, num_mtp: int | None = None,
                mtp_detach: bool = False) -> MTPOutput:
        """Trunk logits and `num_mtp` (default all) MTP logits.

        mtp_detach: the MTP path sees the trunk hidden states, token embeddings and LM head weight as
        constants, so an MTP loss trains only `model.mtp_layers.*` (verl's `detach_encoder`).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        emb = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.model.inv_freq, emb.dtype)
        mask = padding_causal_mask(attention_mask)
        valid = attention_mask.bool()
        routing = Routing(valid) if self.config.is_moe else None
        hidden = emb
        for layer in self.model.layers:
            hidden = layer(hidden, cos, sin, mask, routing=routing)
        hidden = self.model.norm(hidden)
        logits = self.lm_head(hidden)

        head_weight = self.lm_head.weight.detach() if mtp_detach else self.lm_head.weight
        h, tok_emb = (hidden.detach(), emb.detach()) if mtp_detach else (hidden, emb)
        depths = self.num_mtp_layers if num_mtp is None else num_mtp
        records = routing.records if routing else None
        mtp_logits = [F.linear(h_i, head_weight) for h_i in self.mtp_chain(h, tok_emb, cos, sin, mask, valid, depths,
                                                                           records)]
        out = MTPOutput(logits=logits, mtp_logits=mtp_logits, hidden_states=hidden, aux_loss=hidden.new_zeros(()))
        if routing and routing.records:
            out.aux_loss, out.moe_stats = aux_loss_and_loads(routing.records, self.config.router_aux_loss_coef)
        return out

    def mtp_chain(self, hidden, tok_emb, cos, sin, mask, valid, depths: int, records: list | None = None
                  ) -> list[torch.Tensor]:
        """h_1..h_depths of the first `depths` MTP layers over whole sequences, from h_0 = `hidden`
        (the trunk's normed last hidden state) and the token embeddings `tok_emb`. With `records` (a
        list), MoE MTP layers route the tokens of `valid` and append their routing records there."""
        outs = []
        for i, layer in enumerate(self.model.mtp_layers[:depths]):
            routing = Routing(mtp_routing_mask(valid, i), records) if records is not None else None
            hidden = layer(hidden, shift_left(tok_emb, i + 1), cos, sin, mask, routing=routing)
            outs.append(hidden)
        return outs

    # ---- chunked cached forwards (rollout engine) -----------------------------------------

    def allocate_cache(self, num_slots: int, max_len: int, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> KVCache:
        p = self.lm_head.weight
        cfg = self.config
        return KVCache(cfg.num_hidden_layers + cfg.num_nextn_predict_layers, num_slots, cfg.num_key_value_heads,
                       max_len, cfg.head_dim, dtype or p.dtype, device or p.device)

    def trunk_step(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                   slots: torch.Tensor) -> torch.Tensor:
        """Run the trunk on a (B, T) chunk at absolute `positions`; returns normed hidden (B, T, H)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.model.inv_freq, x.dtype)
        mask, length = cached_causal_mask(positions)
        block = slot_block(slots)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache.view(i, slots, positions, length, block))
        return self.model.norm(x)

    def mtp_step(self, layer_idx: int, hidden: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor,
                 cache: KVCache, slots: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """MTP layer `layer_idx` on a chunk: hidden h_i at `positions` with tokens at positions+i+1.
        `length`: keys read (see `cached_causal_mask`), for chunks padded with a scratch position."""
        emb = self.model.embed_tokens(token_ids)
        cos, sin = rope_cos_sin(positions, self.model.inv_freq, emb.dtype)
        mask, length = cached_causal_mask(positions, length)
        view = cache.view(self.config.num_hidden_layers + layer_idx, slots, positions, length, slot_block(slots))
        return self.model.mtp_layers[layer_idx](hidden, emb, cos, sin, mask, view)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    # ---- checkpoints ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, num_mtp_layers: int | None = None, dtype: torch.dtype = torch.float32,
                        init_mtp_from: str = "random", device: str | torch.device = "cpu") -> "MTPCausalLM":
        from verl_mtp.models.checkpoint import load_pretrained

        return load_pretrained(cls, path, num_mtp_layers=num_mtp_layers, dtype=dtype,
                               init_mtp_from=init_mtp_from, device=device)

    def save_pretrained(self, path) -> None:
        from verl_mtp.models.checkpoint import save_pretrained

        save_pretrained(self, path)

    def num_parameters(self, trunk_only: bool = False, active: bool = False) -> int:
        """Distinct parameters; `active`: those one token uses, i.e. top-k of each MoE layer's routed experts."""
        seen, total, cfg = set(), 0.0, self.config
        for name, p in self.named_parameters():
            if id(p) in seen or (trunk_only and ".mtp_layers." in name):
                continue
            seen.add(id(p))
            routed = active and ".mlp.experts." in name
            total += p.numel() * (cfg.num_experts_per_tok / cfg.n_routed_experts if routed else 1)
        return round(total)
