import os

# Nothing may reach a model hub from the tests; the tokenizers and weights used are all local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import codis  # noqa: E402,F401  - the torchvision compat shim runs before any test imports timm
