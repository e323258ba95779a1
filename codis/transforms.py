"""ALBEF's image transforms: pretraining, finetuning (train) and evaluation.

The training transforms end in ``PILToTensor``: uint8 images, a quarter of float32's bytes between
loader workers, the training process and the device, where :func:`codis.train.fit` makes them
normalised floats (:func:`normalize_on_device`, one kernel). The evaluation transform ends in
``ToTensor`` + ``Normalize`` (the CLIP statistics that ALBEF uses) and gives model-ready floats:
its images are read by code that does not go through ``fit`` (the evaluation loops, Grad-CAM, the
retrieval analysis, the vision initialisation's held-out scoring), and an evaluation step's model
work dwarfs the copy.

ALBEF's own ``RandomAugment(2, 7, isPIL=True, augs=[...])`` picks two ops at magnitude 7 from a
list that leaves out every op that changes hues (Color, Contrast, Posterize, Solarize, Invert):
captions name colours. :class:`CaptionSafeRandAugment` is torchvision's ``RandAugment`` restricted
to that list; the full torchvision list would turn "a red square" into a pair whose square is cyan
after Solarize.

Horizontal flips: ALBEF flips in pretraining and finetuning even though captions such as "the dog
on the left of the car" (and NLVR2 sentences about the left/right image) then describe the mirror
image. On real web captions such relations are rare enough to ignore; on data where they carry the
signal (the demo world's captions are built from left/right relations) a flip turns correct pairs
into wrong ones, so a recipe passes ``hflip=False`` there.
"""

from __future__ import annotations

import torch
from torchvision import transforms as T

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

_BICUBIC = T.InterpolationMode.BICUBIC


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"image_size: must be a positive integer, got {size!r}")


# ALBEF's RandomAugment op list (its names match torchvision's).
ALBEF_AUGMENTATIONS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX",
                       "ShearY", "TranslateX", "TranslateY", "Rotate")


class CaptionSafeRandAugment(T.RandAugment):
    """``RandAugment`` drawing only from :data:`ALBEF_AUGMENTATIONS` (no hue-changing ops)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        # torchvision rebuilds its magnitude table (ten tensors) for every image; the images of
        # a loader share a size, so one table per size serves them all.
        self._spaces: dict[tuple[int, tuple[int, int]], dict] = {}

    def _augmentation_space(self, num_bins: int, image_size: tuple[int, int]) -> dict:
        key = (num_bins, tuple(image_size))
        if key not in self._spaces:
            space = super()._augmentation_space(num_bins, image_size)
            self._spaces[key] = {name: space[name] for name in ALBEF_AUGMENTATIONS}
        return self._spaces[key]


def _augmenting(size: int, min_scale: float, hflip: bool) -> T.Compose:
    _check_size(size)
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"crop_min_scale: must be in (0, 1], got {min_scale!r}")
    steps: list = [T.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=_BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [CaptionSafeRandAugment(num_ops=2, magnitude=7), T.PILToTensor()]
    return T.Compose(steps)


def pretrain_transform(size: int, hflip: bool = True, crop_min_scale: float = 0.2) -> T.Compose:
    """Pretraining: random resized crop (scale 0.2-1, bicubic), flip, RandAugment(2, 7); uint8.

    ``crop_min_scale``: ALBEF's 0.2 suits web photos; where captions name positions and every
    object (the demo world), small crops cut described objects out and make true pairs false."""
    return _augmenting(size, crop_min_scale, hflip)


def train_transform(size: int, hflip: bool = True, augment: bool = True) -> T.Compose:
    """Finetuning: random resized crop (scale 0.5-1, bicubic), flip, RandAugment(2, 7); uint8.
    With ``augment`` False: the evaluation resize, as uint8 (``hflip`` unused)."""
    if not augment:
        return T.Compose([_resize(size), T.PILToTensor()])
    return _augmenting(size, 0.5, hflip)


def eval_transform(size: int) -> T.Compose:
    """Evaluation: bicubic resize to ``size`` x ``size`` (no crop, aspect not kept, as ALBEF), normalise."""
    return T.Compose([_resize(size), T.ToTensor(), T.Normalize(MEAN, STD)])


def _resize(size: int) -> T.Resize:
    _check_size(size)
    return T.Resize((size, size), interpolation=_BICUBIC)


def normalize_on_device(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., 3, H, W) of a training transform -> float32 normalised with
    :data:`MEAN` / :data:`STD` (``ToTensor`` + ``Normalize``'s result within 3e-7), computed where
    ``images`` are: one multiply-add, whose two per-channel constants are copied with
    ``non_blocking`` (no stream synchronisation on CUDA)."""
    if images.dtype != torch.uint8 or images.ndim < 3 or images.shape[-3] != 3:
        raise ValueError(f"images: expected uint8 (..., 3, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")
    scale = torch.tensor([1.0 / (255.0 * s) for s in STD]).view(3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(MEAN, STD)]).view(3, 1, 1)
    return torch.addcmul(shift.to(images.device, non_blocking=True), images,
                         scale.to(images.device, non_blocking=True))
