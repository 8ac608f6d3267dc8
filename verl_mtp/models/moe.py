"""DeepSeek-style mixture-of-experts FFN: shared experts plus top-k routed experts, and its load balance.

    probs   = softmax(gate(x))                        # (N, E) router, no bias, computed in float32
    w, idx  = topk(probs, k)                          # renormalised to sum to 1 if norm_topk_prob
    y       = shared_experts(x) + sum_j w_j * experts[idx_j](x)

Every expert is a SwiGLU MLP of `moe_intermediate_size`; the shared experts run as one SwiGLU of
`n_shared_experts * moe_intermediate_size` (DeepSeek-V3's layout, so their weights load as they are).

Load balance (Switch / DeepSeek "expert-level balance loss"), per MoE layer, over the valid tokens:

    balance_loss = E * sum_i f_i * P_i,   f_i = (top-k assignments to expert i) / (k * tokens)
                                          P_i = mean router probability of expert i

It is 1.0 when routing is uniform and up to E / k when every token goes to the same k experts. The
model's `aux_loss` is `router_aux_loss_coef * sum over MoE layers` (DeepSeek and megatron add one such
term per layer), so each router's gradient does not depend on how many other MoE layers ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN of Qwen2/Llama, and every expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class RoutingRecord:
    """One MoE layer's routing over the valid tokens of one forward."""

    balance_loss: torch.Tensor  # scalar E * sum_i f_i P_i (differentiable through P)
    load: torch.Tensor  # (E,) f_i: fraction of the top-k assignments that went to expert i (sums to 1)


@dataclass
class Routing:
    """Passed down a full forward so MoE layers report their routing; the cached (rollout) paths pass
    None and skip the bookkeeping."""

    valid: torch.Tensor  # (B, T) bool: the tokens that count (padding does not)
    records: list[RoutingRecord] = field(default_factory=list)  # appended to by each MoE layer, in order


def mtp_routing_mask(valid: torch.Tensor, depth: int) -> torch.Tensor:
    """(B, T) real-token mask -> where MTP layer `depth` (0-based) routes real inputs: at t it reads the
    hidden state at t and the token at t+depth+1, so both must be real."""
    ahead = torch.cat([valid[:, depth + 1:], torch.zeros_like(valid[:, :depth + 1])], dim=1)
    return valid & ahead


def load_balance(probs: torch.Tensor, chosen: torch.Tensor, valid: torch.Tensor, top_k: int) -> RoutingRecord:
    """probs (N, E) router softmax; chosen (N, E) bool, the top-k experts of each token; valid (N,) bool.
    Shared by our model and by the megatron engine's router taps, so both backends train the same loss."""
    weight = valid.to(probs.dtype)[:, None]
    tokens = weight.sum().clamp(min=1.0)
    load = (chosen.to(probs.dtype) * weight).sum(0) / (tokens * top_k)
    mean_prob = (probs * weight).sum(0) / tokens
    return RoutingRecord(balance_loss=probs.shape[-1] * (load * mean_prob).sum(), load=load.detach())


def aux_loss_and_loads(records: list[RoutingRecord], coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`MTPOutput.aux_loss` (coef * sum of the layers' balance losses) and `.moe_stats` ((L, E) loads) from
    the records of one forward, one per MoE layer that ran."""
    return coef * torch.stack([r.balance_loss for r in records]).sum(), torch.stack([r.load for r in records])


class MoE(nn.Module):
    """Parameter names as in DeepSeek-V3 / Qwen2-MoE folders: `gate.weight` (E, H),
    `experts.{j}.{gate,up,down}_proj.weight`, `shared_experts.{gate,up,down}_proj.weight`."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 num_shared: int = 0, norm_topk_prob: bool = True):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(hidden_size, intermediate_size) for _ in range(num_experts))
        self.shared_experts = SwiGLU(hidden_size, num_shared * intermediate_size) if num_shared else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, H) -> router probs (N, E) float32, top-k weights (N, k) and expert indices (N, k).
        float32 routing (also under autocast): the rollout engine and the trainer must pick the same
        experts for a token."""
        with torch.autocast(x.device.type, enabled=False):
            probs = F.linear(x.float(), self.gate.weight.float()).softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights, experts

    def forward(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs, weights, experts = self.route(flat)
        out = self._dispatch(flat, weights, experts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        if routing is not None:
            chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, experts, True)
            routing.records.append(load_balance(probs, chosen, routing.valid.reshape(-1), self.top_k))
        return out.view(shape)

    def _dispatch(self, flat: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Sort the (token, expert) assignments by expert, run each expert once on its contiguous block
        of gathered tokens, and add the weighted outputs back per token. Every expert runs, even on no
        tokens, so each parameter is in the graph every step (DDP needs no `find_unused_parameters`,
        and idle experts get zero gradients, not None)."""
        assignment_expert = experts.reshape(-1)
        order = assignment_expert.argsort(stable=True)
        counts = torch.bincount(assignment_expert, minlength=self.num_experts).tolist()
        token = order // self.top_k
        blocks = flat[token].split(counts)
        out = torch.cat([expert(block) for expert, block in zip(self.experts, blocks)])
        out = out * weights.reshape(-1)[order, None].to(out.dtype)
        return out.new_zeros(flat.shape).index_add_(0, token, out)


def moe_metrics(aux_loss: torch.Tensor, loads: torch.Tensor) -> dict[str, float]:
    """Metrics of one forward from `MTPOutput.aux_loss` and `.moe_stats` ((L, E) loads of the L MoE layers
    that ran):
      moe/aux_loss         the coefficient-scaled load-balancing loss that was trained on
      moe/expert_load_{i}  fraction of routed assignments that went to expert i, averaged over layers
                           (1/E each when balanced)
      moe/balance          max_i load_i / mean_i load_i per layer, averaged over layers: 1.0 when
                           balanced, E/k when every token picks the same k experts"""
    per_layer = loads.float()
    metrics = {"moe/aux_loss": float(aux_loss.detach())}
    metrics.update({f"moe/expert_load_{i}": float(v) for i, v in enumerate(per_layer.mean(0))})
    metrics["moe/balance"] = float((per_layer.max(-1).values / per_layer.mean(-1)).mean())
    return metrics
