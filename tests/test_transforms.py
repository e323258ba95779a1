"""ALBEF's image transforms: the augmentation op list and the crop scale."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from codis.train import DataConfig
from codis.config import ConfigError
from codis.transforms import (ALBEF_AUGMENTATIONS, MEAN, STD, CaptionSafeRandAugment,
                              eval_transform, normalize_on_device, pretrain_transform,
                              train_transform)

HUE_CHANGING = {"Color", "Contrast", "Posterize", "Solarize"}


def _augmenter(transform: T.Compose) -> T.RandAugment:
    [augmenter] = [step for step in transform.transforms if isinstance(step, T.RandAugment)]
    return augmenter


@pytest.mark.parametrize("build", [pretrain_transform, train_transform])
def test_training_transforms_draw_only_albef_ops(build):
    augmenter = _augmenter(build(64, hflip=False))
    assert isinstance(augmenter, CaptionSafeRandAugment)
    space = augmenter._augmentation_space(augmenter.num_magnitude_bins, (64, 64))
    assert set(space) == set(ALBEF_AUGMENTATIONS)
    assert not HUE_CHANGING & set(space)
    # torchvision's full list has them: the restriction is what keeps caption colours true
    assert HUE_CHANGING <= set(T.RandAugment()._augmentation_space(31, (64, 64)))


def test_the_op_table_is_built_once_per_image_size_and_draws_what_torchvision_draws(monkeypatch):
    built = []
    torchvision_space = T.RandAugment._augmentation_space

    def counted(self, num_bins, image_size):
        built.append(tuple(image_size))
        return torchvision_space(self, num_bins, image_size)

    class Rebuilt(T.RandAugment):  # the restriction without the cache
        def _augmentation_space(self, num_bins, image_size):
            space = torchvision_space(self, num_bins, image_size)
            return {name: space[name] for name in ALBEF_AUGMENTATIONS}

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)) for size in (64, 48)] * 20
    torch.manual_seed(0)
    expected = [np.asarray(Rebuilt(num_ops=2, magnitude=7)(image)) for image in images]
    monkeypatch.setattr(T.RandAugment, "_augmentation_space", counted)
    augmenter = CaptionSafeRandAugment(num_ops=2, magnitude=7)
    torch.manual_seed(0)
    drawn = [np.asarray(augmenter(image)) for image in images]
    assert built == [(64, 64), (48, 48)]
    assert all(np.array_equal(a, b) for a, b in zip(drawn, expected))
    assert sum(not np.array_equal(a, np.asarray(image)) for a, image in zip(drawn, images)) > 20


def test_saturated_colours_survive_augmentation():
    # A red square on green: Solarize or Color would turn the square cyan/grey in some draws.
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:] = (20, 200, 20)
    pixels[16:48, 16:48] = (230, 30, 30)
    image = Image.fromarray(pixels)
    augmenter = CaptionSafeRandAugment(num_ops=2, magnitude=7)
    torch.manual_seed(0)
    for _ in range(200):
        out = np.asarray(augmenter(image), np.int32)
        bright = out.max(axis=2) > 60  # geometric ops fill with black
        red = out[..., 0] > out[..., 1] + 60
        green = out[..., 1] > out[..., 0] + 60
        assert np.all(red | green | ~bright)
        assert red.sum() > 200


def test_crop_min_scale_is_checked_and_used():
    with pytest.raises(ValueError, match="crop_min_scale"):
        pretrain_transform(64, crop_min_scale=0.0)
    crop = pretrain_transform(64, crop_min_scale=0.8).transforms[0]
    assert isinstance(crop, T.RandomResizedCrop) and crop.scale == (0.8, 1.0)
    assert pretrain_transform(64).transforms[0].scale == (0.2, 1.0)  # ALBEF
    with pytest.raises(ConfigError, match="data.crop_min_scale"):
        DataConfig(shards=("x",), crop_min_scale=1.5)


def test_eval_transform_is_deterministic_resize():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8))
    a, b = eval_transform(32)(image), eval_transform(32)(image)
    assert a.shape == (3, 32, 32) and torch.equal(a, b)


def test_normalize_on_device_matches_to_tensor_and_normalize():
    # Every byte value in every channel, and a training transform's output: uint8 then normalised
    # must give what ToTensor + Normalize at the end of the same transform gave.
    every_value = np.stack([np.arange(256, dtype=np.uint8).reshape(16, 16)] * 3, axis=-1)
    reference = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    torch.testing.assert_close(normalize_on_device(T.PILToTensor()(Image.fromarray(every_value))),
                               reference(Image.fromarray(every_value)), rtol=0, atol=1e-6)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), np.uint8))
    transform = pretrain_transform(32)
    assert isinstance(transform.transforms[-1], T.PILToTensor)
    torch.manual_seed(3)
    pixels = transform(image)
    torch.manual_seed(3)
    floats = T.Compose([*transform.transforms[:-1], reference])(image)
    assert pixels.dtype == torch.uint8
    torch.testing.assert_close(normalize_on_device(pixels[None]), floats[None], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="expected uint8"):
        normalize_on_device(floats)

