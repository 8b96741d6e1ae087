"""Learning-rate schedules as pure functions of the optimizer step (so resuming needs only the step)."""
from __future__ import annotations

import math


def warmup_cosine_lr(step: int, *, lr: float, lr_min: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 0 to `lr` over `warmup_steps`, then cosine decay to `lr_min` at `total_steps`.

    `step` counts optimizer steps already taken (0 for the first update).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * progress))
