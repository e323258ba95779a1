"""The exponential moving average that keeps ALBEF's momentum teachers (its ``_momentum_update``)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def paired_parameters(teachers: Iterable[nn.Module], students: Iterable[nn.Module],
                      ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The parameters of ``teachers`` and of ``students``, modules paired in order. Raises
    ValueError when their counts differ."""
    teacher = [p for module in teachers for p in module.parameters()]
    student = [p for module in students for p in module.parameters()]
    if len(teacher) != len(student):
        raise ValueError(f"teachers have {len(teacher)} parameters, students {len(student)}")
    return teacher, student


@torch.no_grad()
def momentum_update(teacher: list[torch.Tensor], student: list[torch.Tensor],
                    momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, tensor by tensor (one fused kernel per dtype
    and device); pass the lists of :func:`paired_parameters`."""
    torch._foreach_lerp_(teacher, student, 1.0 - momentum)


class MomentumTeachers:
    """Momentum updates of a model's teacher modules from its student modules.

    The parameters are listed at the first update and kept: walking a model's modules for them
    would cost host time at every training step, where the update is one fused kernel. So a model
    replaces no teacher or student parameter after its first update (resizing the ViT's position
    embeddings, :func:`codis.encoders.set_image_size`, happens when a task builds its model).
    """

    def __init__(self, teachers: list[nn.Module], students: list[nn.Module]) -> None:
        self.teachers = teachers
        self.students = students
        self._parameters: tuple[list[nn.Parameter], list[nn.Parameter]] | None = None

    def update(self, momentum: float) -> None:
        """teacher <- m * teacher + (1 - m) * student for every paired parameter."""
        if self._parameters is None:
            self._parameters = paired_parameters(self.teachers, self.students)
        momentum_update(*self._parameters, momentum)
