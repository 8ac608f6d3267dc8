"""The MTP loss of each depth against what it predicts, under a loss mask, and the draft's expected acceptance.

Index convention (models/mtp_model.py): MTP depth i (0-based, reported as k = i + 1) at position t
predicts token t+i+2. The policy's own distribution over that token is its next-token distribution at
position t+i+1, from the same forward pass. Loss types (`actor_rollout_ref.model.mtp.loss_type`):

    ce       cross-entropy to the token itself (hard label)
    soft_ce  cross-entropy to the detached policy distribution p, warped as the rollout samples
             (temperature, top-k, top-p); the draft side is log_softmax(logits / temperature)
    tv       1 - sum_x min(p(x), q(x)), q the draft's distribution warped the same way

With p and q warped as the rollout warps them, the lossless rule accepts a draft token drawn from q with
probability sum_x min(p, q) = 1 - TV(p, q); its mean over the masked positions is reported for every
loss type as `mtp/expected_accept_rate_{k}`. A greedy rollout (temperature 0) accepts iff the argmaxes
agree; its one-hot q has no gradient, so soft_ce and tv train q = softmax(logits) against the one-hot p.

In three position-wise steps so that a backend that splits sequences over ranks (context parallel)
can run the middle one on its own positions and exchange only per-token values:

    targets, masks = mtp_targets(input_ids, loss_mask, depths, attention_mask)             # per depth (B, T)
    loss, hit, accept = mtp_token_losses(mtp_logits[i], targets[i], masks[i], ...)          # per depth (B, T)
    loss, metrics = reduce_mtp_loss(losses, hits, masks, scaling_factor, token_count, accepts, chain_depth)

(soft_ce, tv and the acceptance read the policy logits at t+i+1, so the middle step needs that position
too: see `policy_rows`.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from verl_mtp.algos.warping import warp_probs

MTP_LOSS_TYPES = ("ce", "soft_ce", "tv")


@dataclass(frozen=True)
class Warp:
    """How the rollout warps logits before sampling and accepting (SamplingParams' three fields)."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = -1
    top_p: float = 1.0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return warp_probs(logits, self.temperature, self.top_k, self.top_p)

    def trainable(self) -> "Warp":
        """The warp of the draft side of a loss: greedy's one-hot has no gradient, so T=1 there."""
        return self if self.temperature > 0 else Warp(1.0, self.top_k, self.top_p)


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


def policy_rows(policy_logits: torch.Tensor, mask: torch.Tensor, depth_index: int) -> torch.Tensor:
    """(B, T, V) next-token logits of the policy -> (N, V): for each position t of `mask` (row-major,
    as `x[mask]` orders them), the row at t + depth_index + 1, which predicts the same token as MTP depth
    `depth_index` at t. `mask` is False in the last depth_index + 2 positions (see `mtp_targets`)."""
    rows, cols = mask.nonzero(as_tuple=True)
    return policy_logits[rows, cols + depth_index + 1]


def draft_losses(draft_logits: torch.Tensor, target: torch.Tensor, policy_logits: torch.Tensor | None = None,
                 loss_type: str = "ce", warp: Warp = Warp()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row (N,): the draft's loss and, given the policy's logits (N, V) for the same token, the
    expected acceptance sum_x min(p, q) of the rollout's warp (None without them). The policy side is
    always detached: the loss moves the draft towards the policy, never the reverse."""
    if loss_type not in MTP_LOSS_TYPES:
        raise ValueError(f"MTP loss_type must be one of {MTP_LOSS_TYPES}, got {loss_type!r}")
    if loss_type != "ce" and policy_logits is None:
        raise ValueError(f"MTP loss_type={loss_type!r} needs the policy's logits at the target position")
    draft_logits = draft_logits.float()
    accept = expected_accept(policy_logits, draft_logits, warp) if policy_logits is not None else None
    if loss_type == "ce":
        return F.cross_entropy(draft_logits, target, reduction="none"), accept
    p = warp.probs(policy_logits.detach())
    if loss_type == "soft_ce":
        log_q = (draft_logits / warp.trainable().temperature).log_softmax(-1)
        return -(p * log_q).sum(-1), accept
    return 1.0 - torch.minimum(p, warp.trainable().probs(draft_logits)).sum(-1), accept


@torch.no_grad()
def expected_accept(policy_logits: torch.Tensor, draft_logits: torch.Tensor, warp: Warp = Warp(),
                    elements: int = 1 << 26) -> torch.Tensor:
    """(N, V) each -> (N,) sum_x min(p(x), q(x)) of the warped distributions, in row chunks of about
    `elements` values, so a metric never holds more than a few (chunk, V) copies (V = 152k: ~440 rows)."""
    rows = max(1, elements // policy_logits.shape[-1])
    return torch.cat([torch.minimum(warp.probs(p), warp.probs(q)).sum(-1)
                      for p, q in zip(policy_logits.split(rows), draft_logits.split(rows))])


def mtp_token_losses(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     policy_logits: torch.Tensor | None = None, depth_index: int = 0, loss_type: str = "ce",
                     warp: Warp = Warp()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(B, T, V) logits of MTP depth `depth_index` -> (B, T) float32 loss, top-1 hit and expected
    acceptance (None without `policy_logits`, the (B, T, V) trunk logits of the same forward), all 0 off
    `mask`. Only the masked positions are computed."""
    picked = logits[mask]
    rows = policy_rows(policy_logits, mask, depth_index) if policy_logits is not None else None
    loss, accept = draft_losses(picked, target[mask], rows, loss_type, warp)
    hit = (picked.detach().argmax(-1) == target[mask]).float()
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    scatter = lambda v: zeros.masked_scatter(mask, v)  # noqa: E731
    return scatter(loss), scatter(hit), (scatter(accept) if accept is not None else None)


def expected_acceptance(accepts: list[torch.Tensor], masks: list[torch.Tensor],
                        chain_depth: int | None = None) -> dict[str, float]:
    """Per depth k: `mtp/expected_accept_rate_{k}`, the mean of a_k(t) = sum min(p, q) over its
    positions (the acceptance of draft k given what precedes it), and `mtp/expected_chain_accept_rate_{k}`,
    mean_t prod_{j <= k} a_j(t): P(drafts 1..k all kept), what the rollout reports as
    `rollout/accept_rate_{k}` (a verify pass keeps draft k only if drafts 1..k-1 were kept). Then
    `mtp/expected_accept_length` of a draft chain of `chain_depth` (default: every depth given):

        1 + sum_{k <= D} mean_t prod_{j <= k} a_j(t)

    one bonus token plus P(first k kept) summed over k; depths past those given (the rollout reusing its
    last MTP layer) are not in the training forward and not counted. The product is taken per position
    (an easy position is easy at every depth) over the positions where every depth up to k has a target.
    a_j(t) for j > 1 sees the real tokens t+1..t+j-1, an approximation of the draft chain, which
    conditions on its own kept drafts; for depth 1 both are the same."""
    metrics, reach, together = {}, None, None
    depth = len(accepts) if chain_depth is None else min(chain_depth, len(accepts))
    length = 1.0
    for i, (accept, mask) in enumerate(zip(accepts, masks)):
        metrics[f"mtp/expected_accept_rate_{i + 1}"] = float(accept.sum() / mask.sum().clamp(min=1))
        reach = accept if reach is None else reach * accept
        together = mask if together is None else together & mask
        chain = float((reach * together).sum() / together.sum().clamp(min=1))
        metrics[f"mtp/expected_chain_accept_rate_{i + 1}"] = chain
        if i < depth:
            length += chain
    metrics["mtp/expected_accept_length"] = length
    return metrics


def reduce_mtp_loss(losses: list[torch.Tensor], hits: list[torch.Tensor], masks: list[torch.Tensor],
                    scaling_factor: float = 1.0, token_count: float | None = None,
                    accepts: list[torch.Tensor] | None = None, chain_depth: int | None = None
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """Scaled mean over depths of the summed loss / the depth's number of targets (or `token_count`, so
    that micro-batches of one mini-batch add up to the mini-batch mean); metrics `mtp/loss_{k}` and
    `mtp/acc_{k}` with k = i + 1 (depth 1 predicts two tokens ahead), and with `accepts` the expected
    acceptance (see `expected_acceptance`)."""
    parts, metrics = [], {}
    for i, (loss, hit, mask) in enumerate(zip(losses, hits, masks)):
        n = mask.sum().clamp(min=1).to(loss.dtype)
        denom = n if token_count is None else max(float(token_count), 1.0)
        parts.append(loss.sum() / denom)
        metrics[f"mtp/loss_{i + 1}"] = float(loss.detach().sum() / n)
        metrics[f"mtp/acc_{i + 1}"] = float(hit.sum() / n)
    if accepts is not None:
        metrics.update(expected_acceptance(accepts, masks, chain_depth))
    return scaling_factor * torch.stack(parts).mean(), metrics


def compute_mtp_loss(mtp_logits: list[torch.Tensor], input_ids: torch.Tensor, loss_mask: torch.Tensor,
                     scaling_factor: float = 1.0, token_count: float | None = None,
                     attention_mask: torch.Tensor | None = None, policy_logits: torch.Tensor | None = None,
                     loss_type: str = "ce", warp: Warp = Warp(), chain_depth: int | None = None
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """Scaled mean over depths of the masked per-token loss; per-depth loss and top-1 accuracy as
    metrics, and with `policy_logits` the expected acceptance.

    mtp_logits[i]: (B, T, V); at position t it predicts token t+i+2 of `input_ids` (B, T).
    loss_mask:     (B, T) 1 where a token is a training target (e.g. response tokens only).
    token_count:   divide each depth's summed loss by this instead of its own number of targets.
    attention_mask: (B, T) 1 on real tokens; a target whose source position is padding is skipped.
    policy_logits: (B, T, V) the trunk's next-token logits of the same forward (soft_ce / tv targets).
    """
    if not mtp_logits:
        return input_ids.new_zeros((), dtype=torch.float32), {}
    targets, masks = mtp_targets(input_ids, loss_mask, len(mtp_logits), attention_mask)
    parts = [mtp_token_losses(logits, target, mask, policy_logits, i, loss_type, warp)
             for i, (logits, target, mask) in enumerate(zip(mtp_logits, targets, masks))]
    accepts = [a for _, _, a in parts] if policy_logits is not None else None
    return reduce_mtp_loss([loss for loss, _, _ in parts], [hit for _, hit, _ in parts], masks, scaling_factor,
                           token_count, accepts, chain_depth)
