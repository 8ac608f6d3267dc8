"""Masked reductions, loss aggregation and log-prob / entropy from logits.

Shapes: B sequences, T response positions, V vocabulary. Masks are 0/1 (bool, int or float).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is set.

    Uses ``where`` rather than ``x * mask``: padding may hold inf/nan (e.g. -inf log-probs),
    and ``inf * 0`` would leak nan into the result.
    """
    kept = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over masked positions; 0 where nothing is masked (an empty micro-batch must
    not turn a metric into nan)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def _count(count: int | float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # At least float32: bf16 cannot represent a count like 100001 exactly.
    dtype = torch.promote_types(like.dtype, torch.float32)
    return torch.as_tensor(count, dtype=dtype, device=like.device).clamp(min=1)


def agg_loss(
    loss_mat: torch.Tensor,  # (B, T) per-token loss
    loss_mask: torch.Tensor,  # (B, T) 1 on response tokens
    loss_agg_mode: str,
    global_token_count: int | torch.Tensor | None = None,
    global_seq_count: int | torch.Tensor | None = None,
    horizon: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar (verl's ``actor.loss_agg_mode``).

    - ``token-mean``: sum over all tokens / number of tokens (DAPO).
    - ``seq-mean-token-sum``: per-sequence sum, mean over the sequences that have response tokens.
    - ``seq-mean-token-mean``: per-sequence mean, mean over those sequences (original GRPO).
    - ``seq-mean-token-sum-norm``: sum over all tokens of all sequences / ``horizon``, a constant
      (Dr.GRPO; verl's ``loss_scale_factor``, by default the maximum response length). Sequences
      are summed, not averaged, as in verl. Without ``horizon`` it is ``loss_mask.shape[-1]``,
      which is constant only when every batch is padded to the same width.

    A sequence without response tokens (all masked) adds nothing and is not counted, as in verl.

    Gradient accumulation: pass the mini-batch's token count (``token-mean``) or the number of
    its sequences with response tokens (``seq-mean-*``) as ``global_token_count`` /
    ``global_seq_count`` and *sum* the micro-batch losses; the total then equals the loss of the
    whole mini-batch (``seq-mean-token-sum-norm`` needs no count: it is a plain sum). The count a
    mode does not use is ignored, so callers may always pass both.
    """
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}; known: {', '.join(LOSS_AGG_MODES)}")
    if loss_agg_mode == "token-mean":
        tokens = loss_mask.sum() if global_token_count is None else global_token_count
        return masked_sum(loss_mat, loss_mask) / _count(tokens, loss_mat)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return masked_sum(loss_mat, loss_mask) / _count(horizon or loss_mask.shape[-1], loss_mat)
    seq_loss = masked_sum(loss_mat, loss_mask, dim=-1)  # (B,), 0 for a row without response tokens
    if loss_agg_mode == "seq-mean-token-mean":
        seq_loss = seq_loss / loss_mask.sum(-1).clamp(min=1)
    seqs = (loss_mask.sum(-1) > 0).sum() if global_seq_count is None else global_seq_count
    return seq_loss.sum() / _count(seqs, loss_mat)


@dataclass(frozen=True)
class LossAggregation:
    """``agg_loss`` with its settings bound: what a policy loss calls to reduce its (B, T) loss."""

    mode: str = "token-mean"
    global_token_count: float | None = None
    global_seq_count: float | None = None
    horizon: int | None = None  # seq-mean-token-sum-norm's constant

    def __call__(self, loss_mat: torch.Tensor, loss_mask: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """``mode`` overrides the configured one (GSPO always averages per sequence)."""
        return agg_loss(loss_mat, loss_mask, mode or self.mode, self.global_token_count, self.global_seq_count,
                        self.horizon)


def logprobs_from_logits(
    logits: torch.Tensor,  # (..., V)
    labels: torch.Tensor,  # (...) token ids
) -> torch.Tensor:
    """(...) log p(label): ``logit[label] - logsumexp(logits)``.

    Cheaper than ``log_softmax(...).gather(...)``: autograd keeps only the logits and a
    (...) result instead of a second (..., V) tensor. Computed in float32 because a bf16
    logsumexp loses the low digits that importance ratios depend on.
    """
    logits = logits.float()
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(...) entropy of softmax(logits) over the last dim, in float32.

    Masked vocabulary entries (logit -inf, probability 0) contribute 0 instead of 0 * -inf = nan,
    in the value and in the gradient.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
