"""The MTP loss: cross-entropy of each MTP depth against the tokens it predicts, under a loss mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_mtp_loss(mtp_logits: list[torch.Tensor], input_ids: torch.Tensor, loss_mask: torch.Tensor,
                     scaling_factor: float = 1.0, token_count: float | None = None,
                     attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Scaled mean over depths of the masked CE; per-depth loss and top-1 accuracy as metrics.

    mtp_logits[i]: (B, T, V); at position t it predicts token t+i+2 of `input_ids` (B, T).
    loss_mask:     (B, T) 1 where a token is a training target (e.g. response tokens only).
    token_count:   divide each depth's summed CE by this instead of its own number of targets, so that
                   micro-batches of one mini-batch add up to the mini-batch mean (gradient accumulation).
    attention_mask: (B, T) 1 on real tokens; a target whose source position t is padding is skipped
                   (a left-padded prompt shorter than the depth: its hidden state is padding garbage).
    Metrics `mtp/loss_{k}` and `mtp/acc_{k}` use k = i + 1 (depth 1 predicts two tokens ahead).
    """
    if not mtp_logits:
        return input_ids.new_zeros((), dtype=torch.float32), {}
    losses, metrics = [], {}
    for i, logits in enumerate(mtp_logits):
        shift = i + 2
        target = input_ids[:, shift:]
        mask = loss_mask[:, shift:].to(logits.dtype)
        if attention_mask is not None:
            mask = mask * attention_mask[:, : mask.shape[1]].to(logits.dtype)
        pred = logits[:, : target.shape[1]]
        ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]).float(), target.reshape(-1), reduction="none")
        ce = ce.view_as(mask) * mask
        n = mask.sum()
        denom = n.clamp(min=1) if token_count is None else max(float(token_count), 1.0)
        losses.append(ce.sum() / denom)
        with torch.no_grad():
            correct = (pred.argmax(-1) == target).to(mask.dtype) * mask
            metrics[f"mtp/loss_{i + 1}"] = float(ce.sum() / n.clamp(min=1))
            metrics[f"mtp/acc_{i + 1}"] = float(correct.sum() / n.clamp(min=1))
    return scaling_factor * torch.stack(losses).mean(), metrics
