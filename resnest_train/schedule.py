"""The learning rate as a pure function of the global step: linear warmup from 0, then cosine to min_lr.

Both phases update every iteration (the ResNeSt recipe, arXiv 2004.08955; "Bag of Tricks", arXiv
1812.01187). Resuming needs only the step, nothing else.
"""

from __future__ import annotations

import math


def learning_rate(step: int, *, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """lr for the update at `step` (0-based): warmup reaches peak_lr at step == warmup_steps, and the
    cosine reaches min_lr at the last step (total_steps - 1)."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
