"""CODIS (Duan et al., CVPR 2022) and its ALBEF baseline: model, losses, data and training."""

from codis import _compat  # noqa: F401  - must run before timm / torchvision are imported
from codis.config import ConfigError, ModelConfig, preset

__all__ = ["ConfigError", "ModelConfig", "preset"]
__version__ = "0.1.0"
