"""MiMo for transformers' `trust_remote_code` loading: a Qwen2 trunk plus K multi-token-prediction layers.

verl_mtp:hf_mimo -- written by verl_mtp and copied into every model folder it saves. Only torch and
transformers are imported, so the folder loads without verl_mtp installed:

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    out = model(input_ids, return_mtp_logits=True)  # out.logits, out.mtp_logits[i]

MTP layer i (0-based) at position t reads the hidden state h_i[t] and the embedding of token t+i+1:

    x = input_proj(cat(hidden_layernorm(h_i[t]), token_layernorm(embed(tok[t+i+1]))))
    h_{i+1}[t] = final_layernorm(decoder_block(x))    # causal self-attention over the sequence
    mtp_logits[i][t] = lm_head(h_{i+1}[t])             # predicts tok[t+i+2]

h_0 is the trunk's last hidden state after its final norm (what the LM head reads). The last i+1 positions
of layer i read a zero embedding: their tokens are not in the sequence. The MTP path is a full-sequence
forward (no KV cache); generation with `generate()` runs the trunk only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2ForCausalLM,
    Qwen2Model,
    Qwen2PreTrainedModel,
    Qwen2RMSNorm,
)

from .configuration_mimo import MiMoConfig


def _with_bias(linear: nn.Linear, bias: bool) -> nn.Linear:
    if (linear.bias is not None) == bias:
        return linear
    return nn.Linear(linear.in_features, linear.out_features, bias=bias)


def _match_biases(block: Qwen2DecoderLayer, config: MiMoConfig) -> None:
    """Qwen2's blocks have biases on q/k/v only; the config may say otherwise (a Llama-born model)."""
    attn, mlp = block.self_attn, block.mlp
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attn, name, _with_bias(getattr(attn, name), config.qkv_bias))
    attn.o_proj = _with_bias(attn.o_proj, config.o_bias)
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(mlp, name, _with_bias(getattr(mlp, name), config.mlp_bias))


def _shift_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """x[:, t] <- x[:, t+n]; the last n positions are zero."""
    return torch.cat([x[:, n:], torch.zeros_like(x[:, :n])], dim=1)


def _causal_mask(attention_mask: torch.Tensor | None, batch: int, length: int, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """(B, 1, T, T) additive mask: causal, padded keys hidden. Every query sees itself, so a padded row
    stays finite. Eager and SDPA attention (transformers' defaults) read a 4-D mask."""
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None].expand(batch, -1, -1)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


class MiMoMTPLayer(Qwen2DecoderLayer):
    """A decoder block fed by the projection of the normed hidden state and the normed token embedding."""

    def __init__(self, config: MiMoConfig):
        # no KV cache runs through an MTP layer; the index only picks the attention type (full everywhere)
        super().__init__(config, layer_idx=0)
        _match_biases(self, config)
        self.token_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hidden_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.input_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.final_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, token_embeds: torch.Tensor, attention_mask: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = self.input_proj(torch.cat([self.hidden_layernorm(hidden), self.token_layernorm(token_embeds)], dim=-1))
        out = super().forward(x, attention_mask=attention_mask, position_embeddings=position_embeddings)
        return self.final_layernorm(out[0] if isinstance(out, tuple) else out)  # older transformers: a tuple


class MiMoModel(Qwen2Model):
    config_class = MiMoConfig

    def __init__(self, config: MiMoConfig):
        if getattr(config, "n_routed_experts", 0):
            raise ValueError(f"modeling_mimo.py runs dense MiMo models; this config has "
                             f"n_routed_experts={config.n_routed_experts} (mixture of experts)")
        super().__init__(config)
        for layer in self.layers:
            _match_biases(layer, config)
        self.mtp_layers = nn.ModuleList(MiMoMTPLayer(config) for _ in range(config.num_nextn_predict_layers))
        self.post_init()

    def mtp_hidden_states(self, hidden: torch.Tensor, token_embeds: torch.Tensor,
                          attention_mask: torch.Tensor | None = None,
                          position_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """h_1..h_K over whole sequences from h_0 = `hidden` (the trunk's normed last hidden state) and
        the input token embeddings `token_embeds`, both (B, T, H)."""
        batch, length = hidden.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(length, device=hidden.device)[None].expand(batch, -1)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        mask = _causal_mask(attention_mask, batch, length, hidden.dtype, hidden.device)
        outs = []
        for i, layer in enumerate(self.mtp_layers):
            hidden = layer(hidden, _shift_left(token_embeds, i + 1), mask, position_embeddings)
            outs.append(hidden)
        return outs


@dataclass
class MiMoCausalLMOutput(CausalLMOutputWithPast):
    mtp_logits: tuple[torch.FloatTensor, ...] | None = None  # K x (B, T, V); [i][:, t] predicts token t+i+2


class MiMoForCausalLM(Qwen2ForCausalLM):
    config_class = MiMoConfig

    def __init__(self, config: MiMoConfig):
        Qwen2PreTrainedModel.__init__(self, config)  # Qwen2ForCausalLM's own __init__ builds a Qwen2Model
        self.model = MiMoModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                return_mtp_logits: bool = False, **kwargs):
        """Qwen2's forward; with `return_mtp_logits=True` a full-sequence forward (no cache) that also
        returns `mtp_logits`, one (B, T, V) tensor per MTP layer."""
        if not return_mtp_logits:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, labels=labels, **kwargs)
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        hidden = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state
        logits = self.lm_head(hidden)
        mtp = self.model.mtp_hidden_states(hidden, inputs_embeds, attention_mask, position_ids)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return MiMoCausalLMOutput(loss=loss, logits=logits, mtp_logits=tuple(self.lm_head(h) for h in mtp))


__all__ = ["MiMoForCausalLM", "MiMoModel"]
