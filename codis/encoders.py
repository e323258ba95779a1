"""The image encoder (timm ViT) and the text + fusion encoders (transformers BERT).

ALBEF splits one BERT into lower layers that read text only and upper layers that add
cross-attention to the image tokens; both share BERT's embeddings and its MLM head.
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import timm
import torch
from timm.layers import HybridEmbed
from timm.models.vision_transformer_hybrid import ConvStem
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertModel
from transformers.models.bert.modeling_bert import BertLayer, BertOnlyMLMHead

from codis import _compat  # noqa: F401  - before timm builds anything with torchvision
from codis.config import VISION_WEIGHT_SUFFIXES, ConfigError, TextConfig, VisionConfig
from codis.text import resolve_pretrained


class ChannelsLastConvStem(ConvStem):
    """timm's convolutional stem computed in channels-last memory, where oneDNN's convolutions and
    batch norm are faster (``benchmarks/conv_stem.py``); same parameters and state-dict keys."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images.contiguous(memory_format=torch.channels_last))


def build_image_encoder(config: VisionConfig) -> nn.Module:
    """A timm ViT without classifier; ``forward_features`` gives (B, 1 + patches, width) tokens.

    ``config.pretrained`` may be a timm hub tag (its architecture is used, position embeddings
    resampled to ``image_size`` by timm) or a local weights file for ``config.timm_model``.
    """
    size_args = dict(img_size=config.image_size, patch_size=config.patch_size,
                     embed_dim=config.width, depth=config.depth, num_heads=config.heads,
                     mlp_ratio=config.mlp_ratio, num_classes=0)
    pretrained = config.pretrained
    if config.stem == "conv":  # VisionConfig allows it only with local (conv-stem) weights
        layers = config.patch_size.bit_length() - 1
        stem = ChannelsLastConvStem(depth=layers, channels=config.width, stride=(2,) * layers)
        size_args.update(patch_size=1, embed_layer=partial(HybridEmbed, backbone=stem))
    if pretrained is None:
        return timm.create_model(config.timm_model, pretrained=False, **size_args)
    if pretrained.endswith(VISION_WEIGHT_SUFFIXES) or Path(pretrained).exists():
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"vision.pretrained: no weights file at {pretrained}")
        return timm.create_model(config.timm_model, pretrained=True,
                                 pretrained_cfg_overlay={"file": str(pretrained)}, **size_args)
    return timm.create_model(pretrained, pretrained=True, img_size=config.image_size, num_classes=0)


def set_image_size(visual_encoder: nn.Module, size: int) -> None:
    """Resize the ViT's input (timm resamples the position embeddings, as ALBEF's
    ``interpolate_pos_embed`` does between pretraining at 256 and finetuning at 384 px)."""
    if tuple(visual_encoder.patch_embed.img_size) != (size, size):
        visual_encoder.set_input_size(img_size=(size, size))


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 0/1 padding mask -> additive (B, 1, 1, L) mask accepted by every BERT attention
    backend: 0 where a key may be attended to, the dtype's minimum where it is padding."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def causal_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 0/1 padding mask -> additive (B, 1, L, L) mask: position i sees positions j <= i that
    are not padding. Passed explicitly because transformers' attention ignores ``is_causal``
    whenever a mask is given."""
    length = mask.shape[1]
    lower = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    allowed = lower[None, None] & mask[:, None, None, :].bool()
    return (~allowed).to(dtype) * torch.finfo(dtype).min


class TextFusionEncoder(nn.Module):
    """BERT embeddings + ``text_layers`` text-only layers, then ``fusion_layers`` layers that also
    cross-attend to image tokens, and the MLM head tied to the word embeddings."""

    def __init__(self, bert_config: BertConfig, text_layers: int, fusion_layers: int) -> None:
        super().__init__()
        text_config = copy.deepcopy(bert_config)
        text_config.num_hidden_layers = text_layers
        text_config.is_decoder = False
        text_config.add_cross_attention = False
        self.bert = BertModel(text_config, add_pooling_layer=False)
        # Copied from the built model so that the attention backend it chose (SDPA) carries over.
        fusion_config = copy.deepcopy(self.bert.config)
        fusion_config.num_hidden_layers = fusion_layers
        # transformers builds cross-attention only in decoder layers; their self-attention is made
        # bidirectional again below, as in ALBEF's fusion encoder.
        fusion_config.is_decoder = True
        fusion_config.add_cross_attention = True
        self.fusion = nn.ModuleList(BertLayer(fusion_config, layer_idx=i) for i in range(fusion_layers))
        for layer in self.fusion:
            layer.attention.self.is_causal = False
        self.mlm_head = BertOnlyMLMHead(bert_config)
        self.tie_mlm_head()
        self.hidden_size = bert_config.hidden_size
        self.vocab_size = bert_config.vocab_size

    @classmethod
    def from_config(cls, config: TextConfig, vocab_size: int) -> "TextFusionEncoder":
        """Randomly initialised (``config.pretrained`` is None) or loaded from a hub name / folder."""
        layers = config.text_layers + config.fusion_layers
        if config.pretrained is None:
            bert_config = BertConfig(vocab_size=vocab_size, hidden_size=config.hidden_size,
                                     num_hidden_layers=layers, num_attention_heads=config.heads,
                                     intermediate_size=config.intermediate_size,
                                     max_position_embeddings=max(64, config.max_length),
                                     initializer_range=config.init_std,
                                     hidden_dropout_prob=config.dropout,
                                     attention_probs_dropout_prob=config.dropout)
            encoder = cls(bert_config, config.text_layers, config.fusion_layers)
            encoder.apply(BertModel(bert_config, add_pooling_layer=False)._init_weights)
            encoder.tie_mlm_head()
            return encoder
        source = resolve_pretrained(config.pretrained)
        bert_config = BertConfig.from_pretrained(source)
        if bert_config.vocab_size != vocab_size:
            raise ConfigError(f"text.tokenizer: its vocabulary has {vocab_size} entries but "
                              f"{config.pretrained} was trained with {bert_config.vocab_size}")
        available = bert_config.num_hidden_layers
        bert_config.num_hidden_layers = layers
        encoder = cls(bert_config, config.text_layers, config.fusion_layers)
        pretrained = BertForMaskedLM.from_pretrained(source)
        encoder.load_bert_state(pretrained.state_dict(), config.text_layers)
        if available < layers:
            # Layers beyond the checkpoint's keep their random init; say so rather than hide it.
            import warnings
            warnings.warn(f"{config.pretrained} has {available} layers; {layers - available} "
                          f"fusion layers start from random weights", stacklevel=2)
        return encoder

    def load_bert_state(self, state: dict[str, torch.Tensor], text_layers: int) -> list[str]:
        """Load a ``BertForMaskedLM`` state dict: layers below ``text_layers`` into the text encoder,
        the rest into the fusion layers (their cross-attention stays freshly initialised).
        Returns the keys of ours that the checkpoint did not provide."""
        mapped = {}
        for key, value in state.items():
            if key.startswith("bert.encoder.layer."):
                index, rest = key[len("bert.encoder.layer."):].split(".", 1)
                index = int(index)
                if index < text_layers:
                    mapped[f"bert.encoder.layer.{index}.{rest}"] = value
                elif index - text_layers < len(self.fusion):
                    mapped[f"fusion.{index - text_layers}.{rest}"] = value
            elif key.startswith("bert.embeddings."):
                mapped[key] = value
            elif key.startswith("cls.predictions."):
                mapped["mlm_head.predictions." + key[len("cls.predictions."):]] = value
        result = self.load_state_dict(mapped, strict=False)
        self.tie_mlm_head()
        return list(result.missing_keys)

    def tie_mlm_head(self) -> None:
        """As in BERT: the MLM decoder reuses the word embeddings and the head's output bias."""
        predictions = self.mlm_head.predictions
        predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        predictions.decoder.bias = predictions.bias

    def architecture(self) -> dict:
        """The BERT config of the whole text + fusion stack, enough to rebuild it without weights."""
        config = copy.deepcopy(self.bert.config)
        config.num_hidden_layers = len(self.bert.encoder.layer) + len(self.fusion)
        config.is_decoder = False
        config.add_cross_attention = False
        return config.to_dict()

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text-only hidden states (B, L, H)."""
        # Given the 2-D padding mask, transformers asks whether it is all ones (to drop it), which
        # reads it back from the device on every call; a 4-D mask is used as it is.
        mask = additive_mask(attention_mask, self.bert.embeddings.word_embeddings.weight.dtype)
        return self.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state

    def fuse(self, text_hidden: torch.Tensor, attention_mask: torch.Tensor,
             image_hidden: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Fusion layers: text self-attention + cross-attention to image tokens -> (B, L, H)."""
        self_mask = additive_mask(attention_mask, text_hidden.dtype)
        cross_mask = None if image_mask is None else additive_mask(image_mask, text_hidden.dtype)
        hidden = text_hidden
        for layer in self.fusion:
            hidden = layer(hidden, self_mask, image_hidden, encoder_attention_mask=cross_mask)
        return hidden

    def mlm_logits(self, fused_hidden: torch.Tensor) -> torch.Tensor:
        return self.mlm_head(fused_hidden)
