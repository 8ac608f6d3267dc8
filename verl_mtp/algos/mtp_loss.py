"""The MTP loss: cross-entropy of each MTP depth against the tokens it predicts, under a loss mask.

In three position-wise steps so that a backend that splits sequences over ranks (context parallel)
can run the middle one on its own positions and exchange only per-token values:

    targets, masks = mtp_targets(input_ids, loss_mask, depths, attention_mask)    # per depth (B, T)
    ce, hit = mtp_token_losses(mtp_logits[i], targets[i], masks[i])                # per depth (B, T)
    loss, metrics = reduce_mtp_loss(ces, hits, masks, scaling_factor, token_count)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shift_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """x[:, t] <- x[:, t+n]; the last n positions are zero (nothing to predict there)."""
    return torch.cat([x[:, n:], torch.zeros_like(x[:, :n])], dim=1)


def mtp_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor, depths: int,
                attention_mask: torch.Tensor | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per depth i: the token depth i predicts at each position t (t+i+2) and a bool mask of the
    positions that count: the target is a training target (`loss_mask`) and, with `attention_mask`,
    the source position t is a real token (a left-padded prompt shorter than the depth leaves padding
    garbage there)."""
    targets, masks = [], []
    for i in range(depths):
        mask = shift_left(loss_mask, i + 2).bool()
        if attention_mask is not None:
            mask = mask & attention_mask.bool()
        targets.append(shift_left(input_ids, i + 2))
        masks.append(mask)
    return targets, masks


def mtp_token_losses(logits: torch.Tensor, target: torch.Tensor,
                     mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, V) logits of one depth -> (B, T) float32 cross-entropy and top-1 hit, both 0 off `mask`.
    Only the masked positions are computed."""
    picked = logits[mask].float()
    ce = F.cross_entropy(picked, target[mask], reduction="none")
    hit = (picked.detach().argmax(-1) == target[mask]).float()
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    return zeros.masked_scatter(mask, ce), zeros.masked_scatter(mask, hit)


def reduce_mtp_loss(ces: list[torch.Tensor], hits: list[torch.Tensor], masks: list[torch.Tensor],
                    scaling_factor: float = 1.0, token_count: float | None = None
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """Scaled mean over depths of the summed CE / the depth's number of targets (or `token_count`, so
    that micro-batches of one mini-batch add up to the mini-batch mean); metrics `mtp/loss_{k}` and
    `mtp/acc_{k}` with k = i + 1 (depth 1 predicts two tokens ahead)."""
    losses, metrics = [], {}
    for i, (ce, hit, mask) in enumerate(zip(ces, hits, masks)):
        n = mask.sum().clamp(min=1).to(ce.dtype)
        denom = n if token_count is None else max(float(token_count), 1.0)
        losses.append(ce.sum() / denom)
        metrics[f"mtp/loss_{i + 1}"] = float(ce.detach().sum() / n)
        metrics[f"mtp/acc_{i + 1}"] = float(hit.sum() / n)
    return scaling_factor * torch.stack(losses).mean(), metrics


def compute_mtp_loss(mtp_logits: list[torch.Tensor], input_ids: torch.Tensor, loss_mask: torch.Tensor,
                     scaling_factor: float = 1.0, token_count: float | None = None,
                     attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Scaled mean over depths of the masked CE; per-depth loss and top-1 accuracy as metrics.

    mtp_logits[i]: (B, T, V); at position t it predicts token t+i+2 of `input_ids` (B, T).
    loss_mask:     (B, T) 1 where a token is a training target (e.g. response tokens only).
    token_count:   divide each depth's summed CE by this instead of its own number of targets.
    attention_mask: (B, T) 1 on real tokens; a target whose source position is padding is skipped.
    """
    if not mtp_logits:
        return input_ids.new_zeros((), dtype=torch.float32), {}
    targets, masks = mtp_targets(input_ids, loss_mask, len(mtp_logits), attention_mask)
    parts = [mtp_token_losses(*args) for args in zip(mtp_logits, targets, masks)]
    return reduce_mtp_loss([ce for ce, _ in parts], [hit for _, hit in parts], masks, scaling_factor, token_count)
