"""Learning-rate multiplier for ``torch.optim.lr_scheduler.LambdaLR``::

    LambdaLR(optimizer, functools.partial(lr_lambda, warmup_steps=10, total_steps=500, style="cosine"))
"""

from __future__ import annotations

import math

LR_STYLES = ("constant", "cosine", "linear")


def lr_lambda(
    step: int, warmup_steps: int, total_steps: int, style: str = "constant", min_lr_ratio: float = 0.0
) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based).

    Warmup is linear, ``(step + 1) / warmup_steps``: the first update already uses a nonzero
    lr, because an lr of 0 would throw away a whole RL step of generation. After warmup,
    ``constant`` stays at 1; ``cosine`` and ``linear`` decay to ``min_lr_ratio`` at ``total_steps``
    and stay there.
    """
    if style not in LR_STYLES:
        raise ValueError(f"unknown lr schedule style {style!r}; known: {', '.join(LR_STYLES)}")
    if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"need warmup_steps >= 0 and 0 <= min_lr_ratio <= 1, got {warmup_steps}, {min_lr_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if style == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if style == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
