"""A toy language to train small MTP models on in seconds: a sparse random Markov chain.

Each token has a few likely successors, so a trained trunk is confident but not deterministic and
trained MTP heads draft well: the rollout engine's tests and benchmarks need exactly that regime.
"""

from __future__ import annotations

import torch

from verl_mtp.algos.mtp_loss import compute_mtp_loss


def markov_transitions(vocab_size: int, branching: int = 2, seed: int = 0, peak: float = 0.85) -> torch.Tensor:
    """(V, V) row-stochastic matrix: `branching` successors per token, the first with mass `peak`."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.zeros(vocab_size, vocab_size)
    for tok in range(vocab_size):
        succ = torch.randperm(vocab_size, generator=g)[:branching]
        probs[tok, succ[0]] = peak
        probs[tok, succ[1:]] = (1 - peak) / max(branching - 1, 1)
    return probs


def swap_peaks(transitions: torch.Tensor) -> torch.Tensor:
    """The same successors with their two largest probabilities exchanged: a confidently wrong chain."""
    out = transitions.clone()
    top = transitions.topk(2, dim=-1).indices
    rows = torch.arange(transitions.shape[0])
    out[rows, top[:, 0]], out[rows, top[:, 1]] = transitions[rows, top[:, 1]], transitions[rows, top[:, 0]]
    return out


def markov_batch(transitions: torch.Tensor, batch_size: int, seq_len: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randint(0, transitions.shape[0], (batch_size,), generator=g)
    rows = [x]
    for _ in range(seq_len - 1):
        x = torch.multinomial(transitions[x], 1, generator=g).squeeze(-1)
        rows.append(x)
    return torch.stack(rows, dim=1)


def fit_markov(model, steps: int = 300, batch_size: int = 32, seq_len: int = 48, lr: float = 3e-3,
               seed: int = 0, mtp_scale: float = 1.0, transitions: torch.Tensor | None = None,
               mtp_only: bool = False):
    """Train trunk and MTP layers on the chain, or only the MTP layers on a frozen trunk (`mtp_only`)."""
    transitions = markov_transitions(model.config.vocab_size, seed=seed) if transitions is None else transitions
    g = torch.Generator().manual_seed(seed)
    params = model.model.mtp_layers.parameters() if mtp_only else model.parameters()
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        ids = markov_batch(transitions, batch_size, seq_len, g)
        out = model(ids, mtp_detach=mtp_only)
        mtp, _ = compute_mtp_loss(out.mtp_logits, ids, torch.ones_like(ids), scaling_factor=mtp_scale)
        if not mtp_only:
            mtp = mtp + torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        mtp.backward()
        opt.step()
    return model.eval(), transitions
