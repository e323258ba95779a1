"""The one model-checkpoint file format: pretraining, every task and the NLVR² TA step.

A checkpoint is a ``torch.save`` of plain data (strings, numbers, dicts, lists, tensors), so it is
read with ``weights_only=True``: loading a file never runs code from it. Its layout::

    {"format": 2, "kind": "pretrain" | "retrieval" | "vqa" | "nlvr" | "nlvr_ta" | "ve",
     "model_config": ModelConfig.to_dict(), "task_config": the task config's dict or None,
     "text_architecture": the BERT config dict, "state_dict": {...}, "extra": {...}}

Training state (optimiser, RNG, data position) is not here: :mod:`codis.train.engine` keeps it in
``checkpoints/step-*.pt`` beside the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from codis.files import atomic_torch_save

FORMAT = 2
KINDS = ("pretrain", "retrieval", "vqa", "nlvr", "nlvr_ta", "ve")
_RECREATE = ("re-create it with this version: re-run the stage that wrote it (the flows re-run it "
             "by themselves, its code changed), or `codis pretrain` / `codis finetune` with the same "
             "config")


@dataclass
class Checkpoint:
    """A model checkpoint in memory: what :func:`save_checkpoint` writes and :func:`read_checkpoint`
    returns."""

    kind: str
    model_config: dict[str, Any]
    text_architecture: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    task_config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: must be one of {', '.join(KINDS)}, got {self.kind!r}")


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (a reader never sees half a file)."""
    payload = {"format": FORMAT, "kind": checkpoint.kind, "model_config": checkpoint.model_config,
               "task_config": checkpoint.task_config,
               "text_architecture": checkpoint.text_architecture,
               "state_dict": checkpoint.state_dict, "extra": checkpoint.extra}
    return atomic_torch_save(payload, path)


def read_checkpoint(path: str | Path, kinds: Iterable[str] | None = None,
                    map_location: str | torch.device = "cpu") -> Checkpoint:
    """The checkpoint at ``path``; with ``kinds``, one of another kind is refused naming both.

    Tensors are memory-mapped, so peeking at the kind of a large file stays cheap. A file of an
    older format is refused with how to re-create it; a file that is no checkpoint of this package
    raises ValueError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as error:  # pickle, zip or unsafe-global errors: not a file of ours
        raise ValueError(f"{path}: not a codis checkpoint ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else 'unreadable'})") from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise ValueError(f"{path}: not a codis checkpoint")
    if payload["format"] != FORMAT:
        raise ValueError(f"{path}: checkpoint format {payload['format']!r} was written by an older "
                         f"codis (this one reads format {FORMAT}); {_RECREATE}")
    checkpoint = Checkpoint(kind=payload["kind"], model_config=payload["model_config"],
                            text_architecture=payload["text_architecture"],
                            state_dict=payload["state_dict"], task_config=payload["task_config"],
                            extra=payload.get("extra") or {})
    wanted = tuple(kinds) if kinds is not None else None
    if wanted is not None and checkpoint.kind not in wanted:
        raise ValueError(f"{path}: a {checkpoint.kind!r} checkpoint; expected "
                         f"{' or '.join(repr(k) for k in wanted)}")
    return checkpoint


def config_differences(saved: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    """``"<field>: checkpoint <a>, requested <b>"`` for each (nested) field where two config dicts
    differ, in field order."""
    differences = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differences += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            differences.append(f"{prefix}{key}: checkpoint {a!r}, requested {b!r}")
    return differences
