"""The rollout engine's inference copy of an MTPCausalLM: the same cached forwards as the model's
`trunk_step` / `mtp_step` / `lm_logits`, with fewer and larger kernels per layer.

Per dense layer a decode step runs: RMSNorm (one fused op), one QKV GEMM, rotary embedding on q and k
together in place (a precomputed cos/sin table, rotate-half as one index), one K+V cache write, the
attention, the output projection, RMSNorm, one gate+up GEMM, SiLU * up, the down projection. The model's
modules run ~40 ops per layer for the same arithmetic.

The fused tensors (QKV, gate+up) and every tensor in another dtype than the model's are derived copies of
the model's parameters, which stay the canonical weights (the weight-sync checksum is over them). A copy
that could go stale is never used: `refresh()` derives all of them in one call, and `stale()` compares
each parameter's storage and in-place version counter with what the copies were derived from, so a
weight update by any route (the engine's `update_weights`, an optimizer step on a shared model,
`load_state_dict`) is seen before the next generation. Tensors of the model's own dtype that need no
fusing (embeddings, norms, LM head, MoE experts) are used as they are, never copied.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from verl_mtp.device import native_dtype
from verl_mtp.models.mtp_model import KVCache, MTPCausalLM, cached_attention, cached_causal_mask, slot_block


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.detach().to(dtype)  # no copy when already `dtype`


def _cat(tensors, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.cat([t.detach() for t in tensors]).to(dtype)


class _Block:
    """One decoder block's weights for inference: fused where it saves kernels."""

    def __init__(self, layer, dtype: torch.dtype):
        attn, mlp = layer.self_attn, layer.mlp
        self.ln1, self.ln2 = _cast(layer.input_layernorm.weight, dtype), _cast(layer.post_attention_layernorm.weight, dtype)
        self.w_qkv = _cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], dtype)
        self.b_qkv = _cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias], dtype)
        self.w_o, self.b_o = _cast(attn.o_proj.weight, dtype), _cast(attn.o_proj.bias, dtype)
        self.moe = None
        if hasattr(mlp, "gate_proj"):  # SwiGLU
            self.w_gu = _cat([mlp.gate_proj.weight, mlp.up_proj.weight], dtype)
            self.b_gu = _cat([mlp.gate_proj.bias, mlp.up_proj.bias], dtype)
            self.w_down, self.b_down = _cast(mlp.down_proj.weight, dtype), _cast(mlp.down_proj.bias, dtype)
        else:  # MoE: routing per token needs nothing from the cache; run the module (a copy if cast)
            self.moe = mlp if next(mlp.parameters()).dtype == dtype else copy.deepcopy(mlp).to(dtype)


class _MTPBlock(_Block):
    def __init__(self, layer, dtype: torch.dtype):
        super().__init__(layer, dtype)
        self.ln_hidden, self.ln_token = _cast(layer.hidden_layernorm.weight, dtype), _cast(layer.token_layernorm.weight, dtype)
        self.w_in = _cast(layer.input_proj.weight, dtype)
        self.ln_final = _cast(layer.final_layernorm.weight, dtype)


def inference_dtype(name: str | torch.dtype | None, device: torch.device, default: torch.dtype,
                    key: str = "rollout.dtype") -> torch.dtype:
    """The dtype the engine computes in for a setting (`key` is named in messages): None keeps `default`
    (the model's); otherwise training's rule, `device.native_dtype` (bf16 where the device runs it
    natively, fp16 on CUDA, else float32 with one warning line naming the key)."""
    return default if name is None else native_dtype(name, device, key)


class FastModel:
    """Cached chunk forwards over `model`'s weights in `dtype` (see the module doc)."""

    def __init__(self, model: MTPCausalLM, dtype: torch.dtype, max_len: int):
        self.model, self.dtype, self.max_len = model, dtype, max_len
        cfg = model.config
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.hidden_size, self.eps, self.num_trunk = cfg.hidden_size, cfg.rms_norm_eps, cfg.num_hidden_layers
        device = model.lm_head.weight.device
        # rotary tables, computed as `rope_cos_sin` does; rotate_half(x) = x[..., perm] * sign
        freqs = torch.arange(max_len, device=device).float()[:, None] * model.model.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        half = self.head_dim // 2
        sign = torch.cat([-torch.ones(half, device=device), torch.ones(half, device=device)])
        self.cos, self.sin = emb.cos().to(dtype), (emb.sin() * sign).to(dtype)
        self.perm = torch.cat([torch.arange(half, self.head_dim), torch.arange(half)]).to(device)
        self.refresh()

    def refresh(self) -> None:
        """Derive every inference tensor from the model's parameters, all in this one call."""
        with torch.no_grad():
            m, dtype = self.model.model, self.dtype
            self.embed = _cast(m.embed_tokens.weight, dtype)
            self.blocks = [_Block(layer, dtype) for layer in m.layers]
            self.mtp_blocks = [_MTPBlock(layer, dtype) for layer in m.mtp_layers]
            self.norm = _cast(m.norm.weight, dtype)
            self.lm_head = _cast(self.model.lm_head.weight, dtype)
        self._stamp = self._fingerprint()

    def stale(self) -> bool:
        return self._fingerprint() != self._stamp

    def _fingerprint(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self.model.parameters())

    def allocate_cache(self, num_slots: int) -> KVCache:
        return self.model.allocate_cache(num_slots, self.max_len, dtype=self.dtype)

    # ---- the cached forwards --------------------------------------------------------------

    def trunk_step(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                   slots: torch.Tensor) -> torch.Tensor:
        """`MTPCausalLM.trunk_step`: the trunk on a (B, T) chunk; normed hidden states (B, T, H)."""
        x = F.embedding(input_ids, self.embed)
        ctx = self._context(positions, slots, None)
        for i, block in enumerate(self.blocks):
            x = self._block(block, x, cache, i, ctx)
        return self._norm(x, self.norm)

    def mtp_step(self, layer_idx: int, hidden: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor,
                 cache: KVCache, slots: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """`MTPCausalLM.mtp_step`: MTP layer `layer_idx` on a chunk."""
        block = self.mtp_blocks[layer_idx]
        emb = F.embedding(token_ids, self.embed)
        x = F.linear(torch.cat([self._norm(hidden, block.ln_hidden), self._norm(emb, block.ln_token)], dim=-1), block.w_in)
        x = self._block(block, x, cache, self.num_trunk + layer_idx, self._context(positions, slots, length))
        return self._norm(x, block.ln_final)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits whatever the inference dtype (sampling and log-probs are computed in float32)."""
        return F.linear(hidden, self.lm_head).float()

    # ---- internals -----------------------------------------------------------------------

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.hidden_size,), weight, self.eps)

    def _context(self, positions, slots, length):
        """What every layer of one chunk forward shares: rotary rows, mask, cache rows."""
        mask, length = cached_causal_mask(positions, length)
        if length > self.max_len:
            raise ValueError(f"KV cache overflow: position {length - 1} >= max_len {self.max_len}")
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # (B, T, 1, D)
        block = slot_block(slots)
        return cos, sin, mask, length, slots[:, None], positions, block if block is not None else slots

    def _block(self, blk: _Block, x: torch.Tensor, cache: KVCache, layer: int, ctx) -> torch.Tensor:
        cos, sin, mask, length, rows, positions, read = ctx
        b, t, _ = x.shape
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = F.linear(self._norm(x, blk.ln1), blk.w_qkv, blk.b_qkv).view(b, t, h + 2 * hkv, d)
        qk = qkv[:, :, : h + hkv]
        rotated = qk[..., self.perm].mul_(sin)
        qk.mul_(cos).add_(rotated)  # rope on q and k: x * cos + rotate_half(x) * sin
        kv = cache.kv[:, layer]  # (2, slots, Hkv, L, D)
        kv[:, rows, :, positions] = qkv[:, :, h:].view(b, t, 2, hkv, d)  # indexed as (B, T, 2, Hkv, D)
        k, v = kv[0, read, :, :length], kv[1, read, :, :length]
        out = cached_attention(qk[:, :, :h].transpose(1, 2), k, v, mask)
        x = x + F.linear(out.transpose(1, 2).reshape(b, t, h * d), blk.w_o, blk.b_o)
        y = self._norm(x, blk.ln2)
        if blk.moe is not None:
            return x + blk.moe(y, None)
        gate, up = F.linear(y, blk.w_gu, blk.b_gu).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate).mul_(up), blk.w_down, blk.b_down)
