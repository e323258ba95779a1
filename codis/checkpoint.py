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

import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from codis.files import atomic_torch_save

FORMAT = 2
KINDS: dict[str, str] = {
    "pretrain": "a pretrained model", "retrieval": "a model finetuned for retrieval",
    "vqa": "a model finetuned on VQA", "nlvr": "a model finetuned on NLVR²",
    "nlvr_ta": "a model after NLVR²'s text-assignment step", "ve": "a model finetuned on SNLI-VE",
}
"""The kinds of checkpoint, with what each holds (for error messages)."""
_FIELDS = ("kind", "model_config", "task_config", "text_architecture", "state_dict")
# The fields of codis.train.engine's resumable training state, which is no model checkpoint.
TRAINING_STATE_KEYS = frozenset({"step", "model", "optimizer", "rng"})
_RECREATE = ("re-create it with this version: re-run the stage that wrote it (the flows re-run it "
             "by themselves, its code changed), or `codis pretrain` / `codis finetune` with the same "
             "config")


class CheckpointError(ValueError):
    """A file is not the model checkpoint that was expected; the message names the file, what it
    holds and what was expected."""


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

    Tensors are memory-mapped, so peeking at the kind of a large file stays cheap. Anything else
    raises :class:`CheckpointError` naming the file, what it holds and what was expected: a file
    that is no torch file (a safetensors weights file, text), one that needs code to unpickle,
    a training-state file (``checkpoints/step-*.pt``), a file of an older format (with how to
    re-create it), one lacking a field of this layout, or a checkpoint of another kind."""
    path = Path(path)
    wanted = tuple(kinds) if kinds is not None else None
    expected = _expected(wanted)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {expected})")

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}; expected {expected}")

    if not zipfile.is_zipfile(path):
        raise refuse(f"not a torch checkpoint file ({_sniff(path)})")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:  # weights_only refuses globals: code would run
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        raise refuse("a torch file whose objects need code to load, not a codis checkpoint"
                     + (f" (it holds a {found.group(1)})" if found else "")) from None
    except Exception as error:  # a damaged archive
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise refuse(f"an unreadable torch file ({type(error).__name__}: {first})") from None
    if not isinstance(payload, dict):
        raise refuse(f"a torch file holding a {type(payload).__name__}, not a codis checkpoint")
    if TRAINING_STATE_KEYS <= set(payload) and "kind" not in payload:
        raise refuse(f"a training-state file (step {payload.get('step')!r}: weights, optimiser and "
                     "RNG states to resume a run), not a model checkpoint; the model a finished "
                     "run writes is model.pt beside its checkpoints/ folder")
    if "format" not in payload:
        raise refuse(f"a torch file without a codis checkpoint's 'format' and 'kind' fields (keys: "
                     f"{', '.join(sorted(map(str, payload))[:8]) or 'none'})")
    if payload["format"] != FORMAT:
        raise refuse(f"checkpoint format {payload['format']!r} was written by an older codis "
                     f"(this one reads format {FORMAT}); {_RECREATE}")
    missing = [name for name in _FIELDS if name not in payload]
    if missing:
        raise refuse(f"a format-{FORMAT} file without the field(s) {', '.join(missing)} of a codis "
                     "checkpoint")
    kind = payload["kind"]
    if kind not in KINDS:
        raise refuse(f"a checkpoint of unknown kind {kind!r} (known: {', '.join(KINDS)})")
    if wanted is not None and kind not in wanted:
        raise CheckpointError(f"{path}: a {kind!r} checkpoint; expected "
                              f"{' or '.join(repr(k) for k in wanted)} (it holds {KINDS[kind]}; "
                              f"this needs {' or '.join(KINDS.get(k, k) for k in wanted)})")
    return Checkpoint(kind=kind, model_config=payload["model_config"],
                      text_architecture=payload["text_architecture"],
                      state_dict=payload["state_dict"], task_config=payload["task_config"],
                      extra=payload.get("extra") or {})


def _expected(kinds: tuple[str, ...] | None) -> str:
    if kinds is None:
        return "a codis model checkpoint (model.pt)"
    return (f"a {' or '.join(map(repr, kinds))} checkpoint "
            f"({' or '.join(KINDS.get(k, k) for k in kinds)})")


def _sniff(path: Path) -> str:
    """What a file that is not a torch archive looks like, for the error message."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0:
        return "a safetensors weights file, such as the vision_init stage's vision.safetensors"
    if head.startswith(b"\x80"):
        return "a pickle (or a legacy torch file), not the zip archive torch.save writes"
    if not head:
        return "an empty file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of another format"
    return "a text file"


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
