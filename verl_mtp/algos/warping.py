"""Logit warping as the rollout's sampler applies it (temperature, top-k, top-p), as a pure function.

It lives in algos/ because both sides need the same warp: the rollout engine samples and accepts drafts
with it, and the MTP loss and the expected-acceptance metrics (algos.mtp_loss) compare the policy's and
the draft's distributions warped exactly as the rollout compares them."""

from __future__ import annotations

import torch


def warp_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0) -> torch.Tensor:
    """(..., V) logits -> probabilities after temperature, top-k (<= 0: off) and top-p. Temperature 0 is
    greedy: one-hot at the argmax. Differentiable inside the kept set (the truncation masks are constants)."""
    logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.detach().sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p; the first token always stays
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs
