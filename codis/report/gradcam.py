"""Word-level Grad-CAM of the fusion encoder's cross-attention (the paper's qualitative figure).

As in ALBEF's visualisation: take the cross-attention map of one fusion layer (text tokens
attending to image patches), the gradient of the ITM "match" logit with respect to that map, and
``cam = relu(grad * attention)`` averaged over heads. Each text token's row, without the image
[CLS] column, is reshaped to the patch grid and upsampled onto the image.

Getting the attention map: transformers computes the probabilities inside its attention
interface, and the default SDPA backend never materialises them. For the one chosen layer the
cross-attention module is pointed at a shallow copy of its config with ``_attn_implementation =
"eager"``, whose attention function returns the probabilities; a forward hook captures them as
part of the autograd graph. Both are undone on exit, and gradients are taken with
``torch.autograd.grad`` with respect to that map only, so no parameter's ``.grad`` is touched.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from codis.model import CodisModel
from codis.text import clean_caption
from codis.transforms import MEAN, STD


@contextlib.contextmanager
def _captured_cross_attention(attention: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Run ``attention`` (a BertCrossAttention) eagerly and capture its probabilities."""
    captured: dict[str, torch.Tensor] = {}
    original_config = attention.config
    # A private copy: the config object is shared by every layer of the fusion encoder.
    eager_config = copy.copy(original_config)
    eager_config._attn_implementation = "eager"

    def hook(module: nn.Module, inputs: Any, output: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        captured["probabilities"] = output[1]

    attention.config = eager_config
    handle = attention.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
        attention.config = original_config


def default_layer(fusion_layers: int) -> int:
    """ALBEF's layer: the third of six fusion layers (its ``block_num=8`` of 12 BERT layers), or
    the last but one of a shorter fusion encoder.

    Not the last: the ITM head reads only the last layer's [CLS] output, and in the last layer a
    token's cross-attention reaches nothing else, so every word's gradient there is zero.
    """
    return max(0, min(2, fusion_layers - 2))


def word_gradcam(model: CodisModel, image: torch.Tensor, text: str,
                 layer: int | None = None) -> dict[str, Any]:
    """Grad-CAM of every text token of ``text`` over ``image``.

    ``image`` is one image as the model reads it, (3, H, W) normalised by
    :func:`codis.transforms.eval_transform`; ``text`` is cleaned (ALBEF's ``pre_caption``) and
    tokenised as in training; ``layer`` indexes the fusion layers (negative from the end;
    default :func:`default_layer`). On the last fusion layer only [CLS] has a gradient, so the
    word maps there are all zero (a warning says so; a one-layer fusion encoder has no other).

    Returns ``tokens`` (T word pieces, with [CLS], and [SEP] if the model's tokenizer appends it),
    ``word_ids`` (each token's index in ``words`` or None), ``words`` (the cleaned caption's
    words), ``maps`` (T, H, W) in [0, 1] on the CPU, each token's map min-max scaled (all zero
    where the gradient is), ``itm_score`` (the match probability) and ``layer`` (as a
    non-negative index). The model is left in the train/eval mode it came in and without
    parameter gradients.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected a (3, H, W) tensor, got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    size = model.config.vision.image_size
    if tuple(image.shape[1:]) != (size, size):
        raise ValueError(f"image: the model reads {size}x{size} images, got "
                         f"{image.shape[1]}x{image.shape[2]} (use codis.transforms.eval_transform)")
    fusion = model.text_encoder.fusion
    if layer is None:
        layer = default_layer(len(fusion))
    if not -len(fusion) <= layer < len(fusion):
        raise ValueError(f"layer: {layer} is out of range for {len(fusion)} fusion layers")
    caption = clean_caption(text, max_words=model.config.text.max_length)
    if not caption:
        raise ValueError(f"text: {text!r} has no words after cleaning")
    layer = layer % len(fusion)
    if layer == len(fusion) - 1:
        warnings.warn(f"word_gradcam: fusion layer {layer} is the last one; only [CLS] has a "
                      f"gradient there, so every word's map is zero", stacklevel=2)

    encoded = model.tokenizer([caption], truncation=True, max_length=model.config.text.max_length,
                              return_tensors="pt")
    word_ids = encoded.word_ids(0)
    tokens = model.tokenizer.convert_ids_to_tokens(encoded["input_ids"][0].tolist())
    device = next(model.parameters()).device
    input_ids = encoded["input_ids"].to(device)
    attention_mask = encoded["attention_mask"].to(device)

    was_training = model.training
    model.eval()  # no dropout on the attention map, deterministic maps
    try:
        with torch.no_grad():
            image_tokens = model.image_tokens(image[None].to(device))
            text_tokens = model.text_tokens(input_ids, attention_mask)
        # Leaves of our own, so that the map is in a graph even if every parameter is frozen.
        image_tokens.requires_grad_(True)
        text_tokens.requires_grad_(True)
        with torch.enable_grad(), _captured_cross_attention(fusion[layer].crossattention.self) as captured:
            logits = model.itm_logits(image_tokens, text_tokens, attention_mask)
            probabilities = captured["probabilities"]  # (1, heads, T, 1 + patches)
            (gradient,) = torch.autograd.grad(logits[0, 1], probabilities)
        itm_score = logits.detach().softmax(-1)[0, 1].item()
    finally:
        model.train(was_training)

    cam = (gradient * probabilities.detach()).clamp(min=0).mean(dim=1)[0, :, 1:]  # (T, patches)
    grid = size // model.config.vision.patch_size
    cam = cam.reshape(-1, 1, grid, grid).float()
    maps = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - low
    maps = torch.where(span > 0, (maps - low) / span.clamp(min=1e-12), torch.zeros_like(maps))
    return {"tokens": tokens, "word_ids": word_ids, "words": caption.split(" "),
            "maps": maps.cpu(), "itm_score": itm_score, "layer": layer}


def word_map(result: dict[str, Any], word: str) -> torch.Tensor:
    """The (H, W) map of ``word`` (its first occurrence): the mean over its word pieces, rescaled
    to [0, 1]."""
    words = result["words"]
    if word not in words:
        raise ValueError(f"words: {word!r} is not a word of the caption ({' '.join(words)})")
    index = words.index(word)
    pieces = [i for i, w in enumerate(result["word_ids"]) if w == index]
    if not pieces:  # cut off by the tokenizer's max_length
        raise ValueError(f"words: {word!r} was truncated away by the tokenizer")
    heat = result["maps"][pieces].mean(0)
    span = heat.max() - heat.min()
    return (heat - heat.min()) / span if span > 0 else torch.zeros_like(heat)


def _display_image(image: torch.Tensor | Image.Image, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) float RGB in [0, 1] of a PIL image or a normalised (3, H, W) tensor."""
    if isinstance(image, Image.Image):
        pixels = np.asarray(image.convert("RGB").resize(size[::-1], Image.BICUBIC), dtype=np.float32) / 255
        return pixels
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError("image: expected a PIL image or a normalised (3, H, W) tensor")
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    pixels = (image.detach().cpu().float() * std + mean).clamp(0, 1)
    pixels = F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False)[0]
    return pixels.permute(1, 2, 0).numpy()


def _heat_colours(heat: np.ndarray) -> np.ndarray:
    """A jet-like colour map (blue -> cyan -> yellow -> red) of values in [0, 1], (H, W, 3)."""
    red = np.clip(1.5 - np.abs(4 * heat - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * heat - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * heat - 1), 0, 1)
    return np.stack([red, green, blue], axis=-1)


def gradcam_figure(image: torch.Tensor | Image.Image, result: dict[str, Any],
                   words: Sequence[str] | None = None, panel_size: int = 160,
                   alpha: float = 0.5) -> Image.Image:
    """A row of panels: the image, then one heat-map overlay per word (default: every word).

    ``image`` is the tensor given to :func:`word_gradcam` or the original PIL image; panels are
    ``panel_size`` pixels square, each word's map blended over the image with weight ``alpha``.
    """
    chosen = list(result["words"]) if words is None else list(words)
    if not chosen:
        raise ValueError("words: choose at least one word")
    heats = [word_map(result, word) for word in chosen]  # checks every word before drawing
    size = (panel_size, panel_size)
    base = _display_image(image, size)
    panels = [base]
    for heat in heats:
        heat = F.interpolate(heat[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        panels.append((1 - alpha) * base + alpha * _heat_colours(heat.numpy()))

    font = ImageFont.load_default()
    label_height, margin = 22, 6
    width = len(panels) * panel_size + (len(panels) + 1) * margin
    canvas = Image.new("RGB", (width, panel_size + 2 * label_height + 2 * margin), "white")
    draw = ImageDraw.Draw(canvas)
    caption = " ".join(result["words"])
    draw.text((margin, margin), caption if len(caption) < width // 6 else caption[: width // 6 - 3] + "...",
              fill="black", font=font)
    for i, (panel, label) in enumerate(zip(panels, ["image", *chosen])):
        x = margin + i * (panel_size + margin)
        y = margin + label_height
        canvas.paste(Image.fromarray((np.clip(panel, 0, 1) * 255).astype(np.uint8)), (x, y))
        draw.text((x + 2, y + panel_size + 4), f"\"{label}\"" if i else label, fill="black",
                  font=font)
    return canvas
