"""Counting what a training step asks of the host: ATen ops dispatched and host-device syncs.

A sync is a call that makes the host wait for the device's result: reading a tensor's value
(``item``, ``bool``, ``int``, ``float``, ``tolist``, ``numpy``), an op whose output shape depends on
the data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``), or a device-to-host
copy. On the CPU nothing waits, but the same calls are made, so counting them on the CPU finds
every site a GPU step would stall at. On CUDA, :func:`count_syncs` also turns on
``torch.cuda.set_sync_debug_mode("warn")`` and counts what the CUDA runtime reports.

Used by the step-efficiency tests and by ``benchmarks/pretrain_throughput.py`` and
``benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_TORCH_ROOT = str(Path(torch.__file__).parent)
_THIS_FILE = str(Path(__file__))

# Ops whose result the host must wait for, whatever their arguments.
_SYNCING_OPS = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique",
                "_unique", "_unique2", "unique_consecutive", "unique_dim", "equal", "is_nonzero",
                "item"}
# Ops that sync only when one of their indices is a boolean mask.
_MASK_INDEXED_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


@dataclass
class SyncReport:
    """What :func:`count_syncs` saw: ``count`` syncs at ``sites`` ("file:line op" -> count, the
    innermost frame outside torch), and ``ops`` ATen ops dispatched."""

    count: int = 0
    ops: int = 0
    sites: Counter = field(default_factory=Counter)

    def add(self, what: str) -> None:
        self.count += 1
        self.sites[f"{_caller()} {what}"] += 1


def _caller() -> str:
    """The innermost Python frame outside torch and this module, as "path:line"."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not (filename.startswith(_TORCH_ROOT) or filename == _THIS_FILE):
            return f"{_short(filename)}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _short(filename: str) -> str:
    path = Path(filename)
    for anchor in ("site-packages", "codis-pipeline"):
        if anchor in path.parts:
            return "/".join(path.parts[path.parts.index(anchor) + 1:])
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _has_mask_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return isinstance(indices, (list, tuple)) and any(
        isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices)


class _Counting(TorchDispatchMode):
    def __init__(self, report: SyncReport, cuda_warnings: bool) -> None:
        super().__init__()
        self.report, self.cuda_warnings = report, cuda_warnings

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.report.ops += 1
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _SYNCING_OPS or (name in _MASK_INDEXED_OPS and _has_mask_index(args)):
            self.report.add(name)
        elif name in ("_to_copy", "copy_") and _device_to_host(func, args, kwargs):
            self.report.add(f"{name} to cpu")
        elif self.cuda_warnings:
            # An op that the lists above miss but the CUDA runtime reports (counted once: the
            # runtime also warns about the ops already counted).
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = func(*args, **kwargs)
            if any("synchroniz" in str(w.message).lower() for w in caught):
                self.report.add(f"{name} cuda")
            return result
        return func(*args, **kwargs)


def _device_to_host(func, args: tuple, kwargs: dict) -> bool:
    source = args[1] if func.overloadpacket.__name__ == "copy_" else args[0]
    if not isinstance(source, torch.Tensor) or source.device.type == "cpu":
        return False
    target = args[0] if func.overloadpacket.__name__ == "copy_" else kwargs.get("device")
    target_device = target.device if isinstance(target, torch.Tensor) else target
    return target_device is not None and torch.device(target_device).type == "cpu"


@contextmanager
def count_syncs(cuda_debug_mode: bool = True) -> Iterator[SyncReport]:
    """Count the ATen ops and host-device syncs issued inside the block.

    ``Tensor.tolist`` and ``Tensor.numpy`` do not dispatch an op on the CPU, so they are counted
    where they are called. On CUDA (``cuda_debug_mode``) an op that the runtime reports as
    synchronising but these rules miss is counted too, as "<site> <op> cuda"."""
    report = SyncReport()
    patched = {}

    def counted(name: str):
        original = getattr(torch.Tensor, name)
        patched[name] = original

        def wrapper(tensor, *args, **kwargs):
            report.add(name)
            return original(tensor, *args, **kwargs)
        return wrapper

    for name in ("tolist", "numpy"):
        setattr(torch.Tensor, name, counted(name))
    debug = cuda_debug_mode and torch.cuda.is_available() and torch.cuda.is_initialized()
    previous_mode = torch.cuda.get_sync_debug_mode() if debug else None
    try:
        with warnings.catch_warnings():
            if debug:
                # The runtime's sync warnings are counted per op above; not shown to the user.
                warnings.filterwarnings("ignore", message=".*synchroniz.*")
                torch.cuda.set_sync_debug_mode("warn")
            with _Counting(report, cuda_warnings=debug):
                yield report
    finally:
        if debug:
            torch.cuda.set_sync_debug_mode(previous_mode)
        for name, original in patched.items():
            setattr(torch.Tensor, name, original)
