"""Make timm importable on a CPU-only torch next to a CUDA-built torchvision wheel.

torchvision 0.28.0 is the only release pinned to torch 2.13.0, and its wheel on PyPI is built for
CUDA: on the CPU torch its C++ ops fail to register, and importing it raises
``RuntimeError: operator torchvision::nms does not exist`` when its Python side declares fake
kernels for them. Declaring the two op schemas first lets torchvision (and so timm) import; the ops
themselves stay unavailable, which we never need (images are decoded with Pillow). Where
torchvision's own library loads (GPU machines, matching CPU wheels) this does nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_MISSING_SCHEMAS = {
    "torchvision::nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "torchvision::qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _load_torchvision_ops() -> bool:
    """Load torchvision's compiled ops the way torchvision itself does; False where they cannot load."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision: nothing to prepare
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    for library in sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd")):
        try:
            torch.ops.load_library(str(library))
        except (OSError, RuntimeError):
            return False
        return True
    return False


def ensure_torchvision_importable() -> None:
    if "torchvision" in sys.modules or _load_torchvision_ops():
        return
    for name, schema in _MISSING_SCHEMAS.items():
        try:
            torch.library.define(name, schema)
        except RuntimeError:  # defined already (a second call)
            pass


ensure_torchvision_importable()
