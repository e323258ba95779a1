"""Memory queues of teacher (momentum) features, as in MoCo / ALBEF, safe under torch.distributed."""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def gather_from_all_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank in rank order (no gradient); itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


class FeatureQueue(nn.Module):
    """Ring buffers of normalised image and text teacher features and their sample ids.

    Unlike ALBEF, the size need not be a multiple of the global batch: writes wrap around the end.
    ``init`` "empty": until the first ``size`` samples have arrived only the filled part is
    returned, so that no random placeholder vectors act as negatives early in training. "random":
    ALBEF's start, every entry a random unit vector (sample id -1) and the whole queue in use from
    the first step; the pointer starts at 0 either way.
    """

    def __init__(self, size: int, dim: int, init: Literal["random", "empty"] = "empty") -> None:
        super().__init__()
        if init not in ("random", "empty"):
            raise ValueError(f"init must be 'random' or 'empty', got {init!r}")
        self.size = size
        self.register_buffer("image", torch.zeros(size, dim))
        self.register_buffer("text", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        if init == "random":
            # Drawn as ALBEF draws its (dim, size) queues, so one seed gives the same features.
            for queue in (self.image, self.text):
                queue.copy_(F.normalize(torch.randn(dim, size), dim=0).T)
            self.filled.fill_(size)
        # The ``filled`` buffer as a Python int, so that each step slices the queue without
        # reading a tensor back from the device; the buffer is what checkpoints keep.
        self._filled = size if init == "random" else 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not self.filled.is_meta:
            self._filled = int(self.filled)

    def contents(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image, text, ids) of the filled entries, detached copies."""
        count = self._filled
        return (self.image[:count].clone(), self.text[:count].clone(), self.ids[:count].clone())

    @torch.no_grad()
    def enqueue(self, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Append this step's features from every rank, overwriting the oldest entries."""
        if ids is None:
            ids = torch.full((image.shape[0],), -1, dtype=torch.long, device=image.device)
        image, text, ids = (gather_from_all_ranks(t) for t in (image, text, ids.long()))
        count = image.shape[0]
        if count > self.size:  # only the newest entries fit
            image, text, ids = image[-self.size:], text[-self.size:], ids[-self.size:]
            count = self.size
        slots = (self.pointer + torch.arange(count, device=self.image.device)) % self.size
        self.image[slots] = image.to(self.image.dtype)
        self.text[slots] = text.to(self.text.dtype)
        self.ids[slots] = ids
        self.pointer.copy_((self.pointer + count) % self.size)
        self._filled = min(self._filled + count, self.size)
        self.filled.fill_(self._filled)
