"""Per-iteration schedules: linear warm-up then cosine, as in the GMML / DINO reference code."""

from __future__ import annotations

import math


def cosine_schedule(
    step: int,
    total_steps: int,
    base: float,
    final: float,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> float:
    """Value at ``step`` of a linear warm-up (``warmup_start`` -> ``base`` over ``warmup_steps``)
    followed by a cosine from ``base`` to ``final`` at ``total_steps``.

    The reference (``utils.cosine_scheduler`` in the GMML/DINO code) precomputes this array per
    iteration; computing it on demand gives the same values and resumes from any step.
    """
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))
