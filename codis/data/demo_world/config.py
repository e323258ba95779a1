"""The sizes and seed of a demo world: :class:`DemoWorldConfig`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from codis.config import check, check_int

_MAX_COUNT = 10**6
CAPTIONS_PER_RETRIEVAL_IMAGE = 5  # as in COCO and Flickr30K
# The split names of each split-dict field, in the order the generator writes them.
SPLITS: dict[str, tuple[str, ...]] = {
    "retrieval_images": ("train", "val", "test"),
    "vqa_images": ("train", "val", "test"),
    "nlvr_pairs": ("train", "dev", "test"),
    "ve_images": ("train", "dev", "test"),
    "classification_images": ("train", "val"),
}


def _splits(**counts: int) -> Callable[[], dict[str, int]]:
    return lambda: dict(counts)


def _check_count(value: Any, field_name: str, low: int, high: int) -> None:
    check_int(value, field_name, low)
    check(value <= high, field_name, f"must be at most {high}, got {value!r}")


@dataclass(frozen=True)
class DemoWorldConfig:
    """Sizes of the demo world. Split dicts map split names to image (NLVR²: pair) counts.

    ``dead_urls`` url rows point to missing files and ``non_image_urls`` rows to a text file named
    ``.jpg``, so the download stage's failure handling runs. ``jpeg_quality`` is fixed so files are
    byte-identical between runs.
    """

    seed: int = 0
    image_size: int = 64
    pretrain_images: int = 2000
    captions_per_pretrain_image: int = 2
    retrieval_images: dict[str, int] = field(default_factory=_splits(train=500, val=100, test=100),
                                             hash=False)
    vqa_images: dict[str, int] = field(default_factory=_splits(train=300, val=100, test=100), hash=False)
    questions_per_image: int = 3
    nlvr_pairs: dict[str, int] = field(default_factory=_splits(train=500, dev=100, test=100), hash=False)
    ve_images: dict[str, int] = field(default_factory=_splits(train=300, dev=100, test=100), hash=False)
    hypotheses_per_image: int = 3
    # Labelled images for the image encoder's supervised initialisation (codis.train.vision_init), the
    # demo's stand-in for ImageNet: which shapes and which colours each scene holds.
    classification_images: dict[str, int] = field(default_factory=_splits(train=300, val=100), hash=False)
    dead_urls: int = 3
    non_image_urls: int = 2
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        for name, low, high in (("seed", 0, 2**63 - 1), ("image_size", 32, 1024),
                                ("pretrain_images", 1, _MAX_COUNT), ("captions_per_pretrain_image", 1, 5),
                                ("questions_per_image", 1, 5), ("hypotheses_per_image", 1, 6),
                                ("dead_urls", 0, 1000), ("non_image_urls", 0, 1000),
                                ("jpeg_quality", 1, 95)):
            _check_count(getattr(self, name), f"demo_world.{name}", low, high)
        for name, splits in SPLITS.items():
            value = getattr(self, name)
            check(isinstance(value, Mapping) and set(value) == set(splits), f"demo_world.{name}",
                  f"must map exactly {', '.join(splits)} to counts, got {value!r}")
            for split in splits:
                _check_count(value[split], f"demo_world.{name}[{split!r}]", 1, _MAX_COUNT)
            # A private copy in split order: the caller's dict may change later.
            object.__setattr__(self, name, {split: value[split] for split in splits})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
