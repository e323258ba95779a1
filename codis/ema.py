"""The exponential moving average that keeps ALBEF's momentum teachers (its ``_momentum_update``)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


@torch.no_grad()
def momentum_update(teachers: Iterable[nn.Module], students: Iterable[nn.Module],
                    momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, parameter by parameter, for modules paired in
    order (one fused kernel per dtype and device)."""
    teacher = [p for module in teachers for p in module.parameters()]
    student = [p for module in students for p in module.parameters()]
    if len(teacher) != len(student):
        raise ValueError(f"teachers have {len(teacher)} parameters, students {len(student)}")
    torch._foreach_lerp_(teacher, student, 1.0 - momentum)
