"""Warm-start objectives for the MTP layers, computed from trunk features (see mtp_warmup_data).

Chain objectives (what the rollout engine drafts with): MTP layer i at position t reads h_i[t] and the
embedding of token t+i+1 and predicts token t+i+2, exactly as `MTPCausalLM.forward`, but starting from
stored trunk hidden states, so the trunk never runs. Per depth:

    ce    cross-entropy to a hard label: the trunk's greedy token at t+i+1 (`labels="trunk"`: what a
          greedy verifier accepts) or the corpus token t+i+2 (`labels="data"`)
    soft  KL(p || q) from the trunk's next-token distribution p at t+i+1 (top-k, renormalised) to the
          draft's q: EAGLE-style distillation of what the sampling verifier accepts (the gradient of RL's
          model.mtp.loss_type=soft_ce: KL and soft CE differ by p's entropy, a constant)
    tv    1 - sum_x min(p(x), q(x)) with the same p: one minus the draft's acceptance at T=1 (RL's tv)

Diffusion objective (seed 000): a block of L future tokens t+1..t+L is predicted from h_t in one pass.
Each block token is replaced by a learned mask embedding with probability 1 - alpha(s), s ~ U[eps, 1),
and the K MTP layers, stacked, denoise the block with bidirectional attention inside it; the loss is
the CE at masked positions, weighted by -alpha'(s) / (1 - alpha(s)) ("scheduler") or 1 ("ones").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from verl_mtp.models.moe import aux_loss_and_loads, moe_metrics
from verl_mtp.algos.mtp_loss import Warp, draft_losses, shift_left
from verl_mtp.models.mtp_model import padding_causal_mask, rope_cos_sin

OBJECTIVES = ("ce", "soft", "tv", "diffusion")
LABELS = ("trunk", "data")
ALPHA_SCHEDULES = ("linear", "kappa")
LOSS_WEIGHTS = ("scheduler", "ones")


# ---- chain MTP from stored hidden states -----------------------------------------------------------

def _inside(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, S) bool: real tokens of the window (not padding)."""
    ids = batch["input_ids"]
    return torch.arange(ids.shape[1], device=ids.device) < batch["lengths"][:, None]


def _valid_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, S) bool: inside the document and a training target."""
    return _inside(batch) & batch["loss_mask"].bool()


def _attention_inputs(model, batch):
    ids = batch["input_ids"]
    s = ids.shape[1]
    attention = (torch.arange(s, device=ids.device) < batch["lengths"][:, None]).long()
    positions = batch["offsets"][:, None] + torch.arange(s, device=ids.device)
    emb = model.model.embed_tokens(ids)
    cos, sin = rope_cos_sin(positions, model.model.inv_freq, emb.dtype)
    return emb, cos, sin, padding_causal_mask(attention)


def mtp_hidden(model, batch: dict[str, torch.Tensor], depths: int,
               records: list | None = None) -> list[torch.Tensor]:
    """Outputs h_1..h_depths (B, S, H) of the first `depths` MTP layers, from the stored h_0. MoE MTP
    layers append their routing records to `records` (for the load-balancing loss and metrics)."""
    emb, cos, sin, mask = _attention_inputs(model, batch)
    real = _inside(batch)  # every real token is routed, target or not: that is what rollout routes too
    return model.mtp_chain(batch["hidden_states"].to(emb.dtype), emb, cos, sin, mask, real, depths, records)


def depth_targets(batch: dict[str, torch.Tensor], i: int, labels: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid (B, S) bool, hard label (B, S)) of MTP depth i (0-based): it predicts token t+i+2."""
    valid = shift_left(_valid_tokens(batch), i + 2)
    label = shift_left(batch["next_tokens"], i + 1) if labels == "trunk" else shift_left(batch["input_ids"], i + 2)
    return valid, label


def soft_kl(logits: torch.Tensor, topk_logprobs: torch.Tensor, topk_indices: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q): p the target's top-k distribution renormalised, q = softmax(logits)."""
    logp = topk_logprobs.float().log_softmax(-1)
    logq = logits.float().log_softmax(-1).gather(-1, topk_indices.long())
    return (logp.exp() * (logp - logq)).sum(-1)


def topk_tv(logits: torch.Tensor, topk_logprobs: torch.Tensor, topk_indices: torch.Tensor) -> torch.Tensor:
    """Per-row 1 - sum min(p, q): p the target's top-k distribution renormalised, q = softmax(logits); the
    RL loss (algos.mtp_loss.draft_losses) on the top-k logits scattered over the vocabulary."""
    target = torch.full_like(logits, float("-inf"), dtype=torch.float32)
    target.scatter_(-1, topk_indices.long(), topk_logprobs.float())
    return draft_losses(logits, topk_indices[..., 0].long(), target, "tv", Warp())[0]


def chain_loss(model, batch: dict[str, torch.Tensor], depths: int, objective: str, labels: str
               ) -> tuple[torch.Tensor, list[dict[str, float]], dict[str, float]]:
    """Mean over depths of each depth's mean loss, plus the MoE load-balancing loss of MoE MTP layers;
    per depth {loss, accuracy, count} (accuracy: top-1 of the draft equals the hard label), and the
    moe/* metrics (empty for dense layers). LM-head logits are computed only where a target exists."""
    losses, metrics = [], []
    head = model.lm_head.weight
    records: list = []
    for i, h in enumerate(mtp_hidden(model, batch, depths, records)):
        valid, label = depth_targets(batch, i, labels)
        if not valid.any():
            metrics.append({"loss": math.nan, "accuracy": math.nan, "count": 0})
            continue
        logits = F.linear(h[valid], head)
        if objective == "tv":
            per_token = topk_tv(logits, shift_left(batch["topk_logprobs"], i + 1)[valid],
                                shift_left(batch["topk_indices"], i + 1)[valid])
        elif objective == "soft":
            per_token = soft_kl(logits, shift_left(batch["topk_logprobs"], i + 1)[valid],
                                shift_left(batch["topk_indices"], i + 1)[valid])
        else:
            per_token = F.cross_entropy(logits.float(), label[valid], reduction="none")
        loss = per_token.mean()
        losses.append(loss)
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == label[valid]).float().mean()
        metrics.append({"loss": float(loss.detach()), "accuracy": float(accuracy), "count": int(valid.sum())})
    total = torch.stack(losses).mean() if losses else batch["hidden_states"].new_zeros((), requires_grad=True)
    if not records:
        return total, metrics, {}
    aux, loads = aux_loss_and_loads(records, model.config.router_aux_loss_coef)
    return total + aux, metrics, moe_metrics(aux, loads)


# ---- discrete diffusion over a block of future tokens -----------------------------------------------

def alpha(s: torch.Tensor, schedule: str) -> torch.Tensor:
    """Probability that a block token stays unmasked at time s in [0, 1]: 1 at s=0, 0 at s=1.

    linear: 1 - s.   kappa: 1 - kappa(s) with kappa(s) = 1 - cos(pi s / 2), the cosine kappa schedule
    of the dLLM schedulers (masks fewer tokens early, more late)."""
    return 1 - s if schedule == "linear" else torch.cos(0.5 * math.pi * s)


def alpha_derivative(s: torch.Tensor, schedule: str) -> torch.Tensor:
    return -torch.ones_like(s) if schedule == "linear" else -0.5 * math.pi * torch.sin(0.5 * math.pi * s)


def loss_weight(s: torch.Tensor, schedule: str, kind: str) -> torch.Tensor:
    """MDLM's ELBO weight -alpha'(s) / (1 - alpha(s)) (1/s for linear), or ones."""
    if kind == "ones":
        return torch.ones_like(s)
    return -alpha_derivative(s, schedule) / (1 - alpha(s, schedule)).clamp(min=1e-6)


def diffusion_blocks(batch: dict[str, torch.Tensor], block_length: int, labels: str) -> dict[str, torch.Tensor]:
    """Anchors t with at least one block target, flattened to N rows:

    hidden (N, H) h_t;  tokens (N, L) labels of t+1..t+L (trunk greedy or corpus tokens);
    inside (N, L) block token inside the document;  target (N, L) ... and a training target;
    positions (N, L) absolute positions t+1..t+L (RoPE)."""
    ids = batch["input_ids"]
    s = ids.shape[1]
    inside_doc = torch.arange(s, device=ids.device) < batch["lengths"][:, None]
    trainable = _valid_tokens(batch)
    cols = range(block_length)
    if labels == "trunk":
        tokens = torch.stack([shift_left(batch["next_tokens"], j) for j in cols], -1)
    else:
        tokens = torch.stack([shift_left(ids, j + 1) for j in cols], -1)
    inside = torch.stack([shift_left(inside_doc, j + 1) for j in cols], -1)
    target = torch.stack([shift_left(trainable, j + 1) for j in cols], -1)
    positions = (batch["offsets"][:, None] + torch.arange(s, device=ids.device))[..., None] + 1 + torch.arange(
        block_length, device=ids.device)
    anchors = target.any(-1)
    return {"hidden": batch["hidden_states"][anchors], "tokens": tokens[anchors], "inside": inside[anchors],
            "target": target[anchors], "positions": positions[anchors]}


def diffusion_mask(target: torch.Tensor, s: torch.Tensor, schedule: str, generator: torch.Generator | None
                   ) -> torch.Tensor:
    """(N, L) bool: each target token masked independently with probability 1 - alpha(s_n)."""
    u = torch.rand(target.shape, generator=generator, device=target.device)
    return target & (u < (1 - alpha(s, schedule))[:, None])


def denoise(model, mask_embedding: torch.Tensor, blocks: dict[str, torch.Tensor], masked: torch.Tensor
            ) -> torch.Tensor:
    """(N, L, H) output of the K MTP layers stacked over each block. Block position 0 reads h_t, the
    others a zero hidden state (h_t at every position would make all-masked positions identical: attention
    over equal values cannot tell them apart); each reads its token's embedding, the mask embedding where
    masked. Attention is bidirectional inside the block and never reaches past the document's end."""
    emb = model.model.embed_tokens(blocks["tokens"])
    emb = torch.where(masked[..., None], mask_embedding.to(emb.dtype), emb)
    cos, sin = rope_cos_sin(blocks["positions"], model.model.inv_freq, emb.dtype)
    length = masked.shape[1]
    eye = torch.eye(length, dtype=torch.bool, device=masked.device)
    mask = (blocks["inside"][:, None, :] | eye)[:, None]
    h = torch.zeros_like(emb)
    h[:, 0] = blocks["hidden"].to(emb.dtype)
    for layer in model.model.mtp_layers:
        h = layer(h, emb, cos, sin, mask)
    return h


def diffusion_loss(model, mask_embedding: torch.Tensor, batch: dict[str, torch.Tensor], block_length: int,
                   labels: str, schedule: str, time_epsilon: float, weighting: str,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """One Monte-Carlo estimate of the masked-diffusion loss over all anchors of the batch.

    "scheduler": sum of w(s) * CE over masked tokens / number of block targets (the ELBO's normalisation);
    "ones": mean CE over masked tokens."""
    blocks = diffusion_blocks(batch, block_length, labels)
    n = len(blocks["tokens"])
    device = blocks["tokens"].device
    s = time_epsilon + (1 - time_epsilon) * torch.rand(n, generator=generator, device=device)
    masked = diffusion_mask(blocks["target"], s, schedule, generator)
    if not masked.any():
        zero = mask_embedding.sum() * 0.0  # keeps the graph: the step is a no-op, not an error
        return zero, {"loss": 0.0, "masked": 0}
    h = denoise(model, mask_embedding, blocks, masked)
    ce = F.cross_entropy(F.linear(h[masked], model.lm_head.weight).float(), blocks["tokens"][masked], reduction="none")
    w = loss_weight(s, schedule, weighting)[:, None].expand_as(masked)[masked]
    denom = blocks["target"].sum() if weighting == "scheduler" else masked.sum()
    loss = (w * ce).sum() / denom
    return loss, {"loss": float(loss.detach()), "masked": int(masked.sum())}


@torch.no_grad()
def diffusion_eval(model, mask_embedding: torch.Tensor, batch: dict[str, torch.Tensor], block_length: int,
                   labels: str) -> list[dict[str, float]]:
    """Per block position j: CE and accuracy with every target masked (one-step drafting of the block)."""
    blocks = diffusion_blocks(batch, block_length, labels)
    logits = F.linear(denoise(model, mask_embedding, blocks, blocks["target"]), model.lm_head.weight).float()
    out = []
    for j in range(block_length):
        sel = blocks["target"][:, j]
        if not sel.any():
            out.append({"loss": math.nan, "accuracy": math.nan, "count": 0})
            continue
        lj, tj = logits[sel, j], blocks["tokens"][sel, j]
        out.append({"loss": float(F.cross_entropy(lj, tj)), "accuracy": float((lj.argmax(-1) == tj).float().mean()),
                    "count": int(sel.sum())})
    return out
