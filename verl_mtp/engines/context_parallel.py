"""Context parallel (CP) data layout, as megatron users know it: a sequence padded to a multiple of
2*cp is cut into 2*cp chunks and CP rank r keeps chunks r and 2*cp-1-r ("zigzag"). With a causal
mask the early chunks are cheap and the late ones expensive, so pairing chunk r with its mirror gives
every rank the same attention work.

    x = pad_to_multiple(x, 2 * cp)                 # (B, S') with S' % (2*cp) == 0
    local = split(x, cp, rank)                      # (B, S'/cp): chunks rank and 2*cp-1-rank
    x == merge([split(x, cp, r) for r in range(cp)])
    gather(local, group)                            # merge of every rank's piece, differentiable

Everything here is pure tensor code except `gather`, the one collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def padded_length(length: int, cp: int, multiple: int = 1) -> int:
    """The smallest length >= `length` whose 2*cp chunks (none when cp = 1) are each a multiple of
    `multiple` (sequence parallel splits every rank's part over the TP ranks)."""
    unit = (2 * cp if cp > 1 else 1) * multiple
    return -(-length // unit) * unit


def pad_to(x: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    """Zero-pad `dim` at the end up to `length`."""
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, missing]
    return F.pad(x, pad)


def split(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's piece of `dim` (length a multiple of 2*cp): chunks rank and 2*cp-1-rank, in that order."""
    if cp == 1:
        return x
    chunks = x.chunk(2 * cp, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], dim=dim)


def merge(pieces: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of `split`: every rank's piece (rank order) -> the sequence in order."""
    cp = len(pieces)
    if cp == 1:
        return pieces[0]
    halves = [piece.chunk(2, dim=dim) for piece in pieces]
    ordered = [halves[r][0] for r in range(cp)] + [halves[r][1] for r in reversed(range(cp))]
    return torch.cat(ordered, dim=dim)


def positions(length: int, cp: int, rank: int) -> torch.Tensor:
    """(length / cp,) the sequence positions this rank holds (`length` a multiple of 2*cp)."""
    return split(torch.arange(length), cp, rank, dim=0)


def causal_mask(length: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """(1, 1, length / cp, length) bool, True = masked: this rank's queries against the whole sequence
    in order (what its attention sees once keys and values are gathered)."""
    q = positions(length, cp, rank).to(device)
    k = torch.arange(length, device=device)
    return (k[None, :] > q[:, None])[None, None]


class _Gather(torch.autograd.Function):
    """All-gather pieces in sequence order. Backward: every rank's gradient for the whole sequence
    is summed (all-reduce) and each rank keeps its own piece's share, the adjoint of the gather."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        pieces = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, local.contiguous(), group=group)
        return merge(pieces, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return split(grad, dist.get_world_size(ctx.group), dist.get_rank(ctx.group), ctx.dim), None, None


def gather(local: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """The whole sequence from every CP rank's piece, differentiable.

    When every rank computes the same loss from the gathered tensor (the engine's per-token values),
    each rank's gradient comes out cp times its share; megatron's DDP divides the CP-summed
    gradients by cp (it averages over data x context parallel ranks), which gives the exact gradient."""
    if dist.get_world_size(group) == 1:
        return local
    return _Gather.apply(local, group, dim)
