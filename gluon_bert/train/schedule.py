"""Learning-rate schedules: pure functions of the step (so a resumed run repeats them)."""
from __future__ import annotations

import math

from ..config import SCHEDULES  # one list of schedules, checked with the other settings

__all__ = ['learning_rate', 'SCHEDULES']


def learning_rate(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0,
                  schedule: str = 'constant', final_ratio: float = 0.0) -> float:
    """Learning rate for update number `step` (0-based).

    Linear warmup from 0 over `warmup_steps`, then `schedule` from base_lr down to
    base_lr * final_ratio at `total_steps` ('constant' stays at base_lr: the book's choice).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f'unknown schedule {schedule!r}; choose from {", ".join(SCHEDULES)}')
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == 'constant':
        return base_lr
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    floor = base_lr * final_ratio
    if schedule == 'linear':
        return floor + (base_lr - floor) * (1.0 - progress)
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
