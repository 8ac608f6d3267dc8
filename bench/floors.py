"""Floors: the arithmetic a step cannot avoid at fp32 on this machine, timed alone.

A framework's speed-up over another is bounded by (the other's time) / (the floor): whatever a
decoder or trainer does besides these matrix multiplies and cache reads can only add time. The
benchmarks print these bounds next to their targets.
"""

from __future__ import annotations

import math
import time

import torch

from verl_mtp.models import MTPCausalLM


def best_of(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def decode_floor_seconds(model: MTPCausalLM, batch: int, context: int, repeats: int = 50) -> dict[str, float]:
    """Seconds per plain decode step that no fp32 decoder of this model avoids on this machine, best of
    `repeats`: "gemm", every nn.Linear of the trunk and the LM head on a (batch, in_features) input;
    "attention", one unmasked SDPA per trunk layer for a single query against `context` cached keys
    (reading the KV cache is memory-bound). (a)'s step time over their sum bounds what (b)/(a) can reach."""
    cfg = model.config
    linears = [m for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    linears.append(model.lm_head)
    inputs = [torch.randn(batch, m.in_features) for m in linears]
    q = torch.randn(batch, cfg.num_attention_heads, 1, cfg.head_dim)
    kv = [torch.randn(batch, cfg.num_key_value_heads, context, cfg.head_dim) for _ in range(2 * len(model.model.layers))]
    gqa = cfg.num_attention_heads != cfg.num_key_value_heads

    def gemm():
        for m, x in zip(linears, inputs):
            m(x)

    def attention():
        for i in range(0, len(kv), 2):
            torch.nn.functional.scaled_dot_product_attention(q, kv[i], kv[i + 1], enable_gqa=gqa)

    with torch.no_grad():
        return {"gemm": best_of(gemm, repeats), "attention": best_of(attention, repeats)}


def update_floor_seconds(model: MTPCausalLM, rows: int, length: int, repeats: int = 3) -> float:
    """One forward and backward of the trunk over `rows` unpadded sequences of `length` tokens with a
    token log-likelihood loss: the least a policy-gradient update of that batch costs (no MTP layers,
    no padding, no optimizer step), best of `repeats`."""
    ids = torch.randint(0, model.config.vocab_size, (rows, length))

    def step():
        logits = model(ids).logits
        logits.log_softmax(-1).gather(-1, ids[..., None]).mean().backward()
        model.zero_grad(set_to_none=True)

    model.train()
    return best_of(step, repeats)
