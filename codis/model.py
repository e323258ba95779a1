"""The pretraining model: CODIS and, as modes of the same system, ALBEF and the paper's ablations.

Student: ViT image encoder, BERT text encoder, BERT fusion encoder (cross-attention to image
tokens), 256-d projections, ITM head, MLM head and (CODIS) a codebook of K codewords.
Teachers: an exponential moving average of every encoder and projection, never trained by
gradient. Queues hold the teachers' features of earlier batches.

Loss = L_ica + L_itm + L_mlm (+ L_code), see :mod:`codis.losses`; ``config.mode`` chooses which
L_ica terms and whether / from which features L_code is computed. Where ALBEF's code and ours
differ (queue start, negatives across processes, how the temperature is learnt, tokenisation),
the config names the choice (:class:`codis.config.ModelConfig`).
"""

from __future__ import annotations

import copy
import math
import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from codis import losses
from codis.config import ConfigError, ModelConfig
from transformers import BertConfig

from codis.checkpoint import Checkpoint, config_differences, read_checkpoint, save_checkpoint
from codis.ema import MomentumTeachers
from codis.encoders import TextFusionEncoder, build_image_encoder
from codis.ot import transport_plan
from codis.queue import FeatureQueue, gather_from_all_ranks
from codis.text import mask_tokens, mlm_positions, text_tokenizer

@dataclasses.dataclass
class PairFeatures:
    """Student and teacher encodings of a batch of (image, text) pairs."""

    image_tokens: torch.Tensor  # (B, 1 + patches, width), student ViT
    image_feat: torch.Tensor  # (B, embed_dim), normalised
    text_tokens: torch.Tensor  # (B, L, width), student text encoder
    text_feat: torch.Tensor
    image_tokens_m: torch.Tensor  # teacher (momentum) versions, no gradient
    image_feat_m: torch.Tensor
    text_feat_m: torch.Tensor


@dataclasses.dataclass
class PretrainOutput:
    """Total loss and its named parts (detached), as returned by :meth:`CodisModel.forward`."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]


class CodisModel(nn.Module):
    """``text_architecture`` (a BERT config dict, as saved in checkpoints) builds the encoders with
    that shape and without fetching any pretrained weights: a checkpoint's weights replace them."""

    def __init__(self, config: ModelConfig, text_architecture: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = text_tokenizer(config.text)
        if text_architecture is None:
            self.visual_encoder = build_image_encoder(config.vision)
            self.text_encoder = TextFusionEncoder.from_config(config.text, len(self.tokenizer))
        else:
            self.visual_encoder = build_image_encoder(dataclasses.replace(config.vision, pretrained=None))
            self.text_encoder = TextFusionEncoder(BertConfig.from_dict(text_architecture),
                                                  config.text.text_layers, config.text.fusion_layers)
        vision_width = self.visual_encoder.embed_dim
        text_width = self.text_encoder.hidden_size
        if vision_width != text_width:
            raise ConfigError(f"vision.width: the fusion layers cross-attend to image tokens of width "
                              f"{vision_width}, but the text encoder is {text_width} wide")
        self.vision_proj = nn.Linear(vision_width, config.embed_dim)
        self.text_proj = nn.Linear(text_width, config.embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        if config.temperature_parameter == "raw":  # ALBEF's: a 0-d parameter named temp
            self.temp = nn.Parameter(torch.tensor(float(config.temperature)))
        else:
            # Adam moves a parameter by about lr per step whatever its gradient, which for a raw
            # temperature of 0.07 is a large relative jump (at the demo's lr 1e-3 it fell to 0.014
            # in 91 steps: docs/findings/tiny-preset.md, finding 9); in log space a step changes
            # it by ~0.1%.
            self.log_temp = nn.Parameter(torch.tensor(math.log(config.temperature)))
        self.codebook = None
        if config.codebook_features != "off":
            self.codebook = nn.Parameter(
                F.normalize(torch.randn(config.codebook.size, config.embed_dim), dim=-1))
        # Teachers start as exact copies and then only follow the students by EMA.
        self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        for teacher in self._teachers():
            teacher.requires_grad_(False)
        self.momentum_teachers = MomentumTeachers(self._teachers(), self._students())
        self.queue = FeatureQueue(config.queue_size, config.embed_dim, init=config.queue_init)

    @property
    def temperature(self) -> torch.Tensor:
        """The contrastive temperature tau (learnable, ALBEF: 0.07 clamped to [0.001, 0.5]), a
        0-d tensor that carries the gradient to the learnt parameter (``temp`` or ``log_temp``)."""
        if self.config.temperature_parameter == "raw":
            return self.temp
        return self.log_temp.exp()

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        """Clamp tau to [temperature_min, temperature_max] in place (ALBEF does so each forward)."""
        low, high = self.config.temperature_min, self.config.temperature_max
        if self.config.temperature_parameter == "raw":
            self.temp.clamp_(low, high)
        else:
            self.log_temp.clamp_(math.log(low), math.log(high))

    def decayed_scalars(self) -> list[nn.Parameter]:
        """The 0-d parameters that AdamW's weight decay applies to, although timm's grouping
        exempts every tensor of fewer than two dimensions: ALBEF's optimiser exempts only 1-d
        tensors and biases, so it decays its raw ``temp``; ``log_temp`` keeps no decay."""
        return [self.temp] if self.config.temperature_parameter == "raw" else []

    # ---- teachers -------------------------------------------------------------------------------
    def _students(self) -> list[nn.Module]:
        return [self.visual_encoder, self.vision_proj, self.text_encoder, self.text_proj]

    def _teachers(self) -> list[nn.Module]:
        return [self.visual_encoder_m, self.vision_proj_m, self.text_encoder_m, self.text_proj_m]

    def momentum_update(self) -> None:
        """teacher <- m * teacher + (1 - m) * student, for every encoder and projection."""
        self.momentum_teachers.update(self.config.momentum)

    # ---- inference API --------------------------------------------------------------------------
    def image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """ViT tokens (B, 1 + patches, width); token 0 is [CLS]."""
        return self.visual_encoder.forward_features(image)

    def text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_encoder.encode_text(input_ids, attention_mask)

    def image_embedding(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Normalised joint-space image features (B, embed_dim)."""
        return F.normalize(self.vision_proj(image_tokens[:, 0]), dim=-1)

    def text_embedding(self, text_tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_tokens[:, 0]), dim=-1)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised features, tokens) of a batch of images."""
        tokens = self.image_tokens(image)
        return self.image_embedding(tokens), tokens

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.text_tokens(input_ids, attention_mask)
        return self.text_embedding(tokens), tokens

    def itm_logits(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """ITM head on the fused [CLS] of each (image, text) pair -> (B, 2) logits."""
        fused = self.text_encoder.fuse(text_tokens, attention_mask, image_tokens)
        return self.itm_head(fused[:, 0])

    @torch.no_grad()
    def itm_score(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
        """Probability that each (image, text) pair matches, (B,)."""
        return self.itm_logits(image_tokens, text_tokens, attention_mask).softmax(-1)[:, 1]

    @torch.no_grad()
    def codeword_assignments(self, features: torch.Tensor) -> torch.Tensor:
        """Each feature's distribution over the K codewords, softmax(Z C / gamma), (N, K)."""
        if self.codebook is None:
            raise ValueError(f"mode {self.config.mode!r} has no codebook")
        logits = features @ F.normalize(self.codebook, dim=-1).T / self.config.codebook.temperature
        return logits.softmax(-1)

    # ---- pretraining ----------------------------------------------------------------------------
    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                alpha: float | None = None, sample_ids: torch.Tensor | None = None,
                hard_negatives: bool = True, *,
                mlm_inputs: tuple[torch.Tensor, ...] | None = None,
                itm_negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
                generator: torch.Generator | None = None) -> PretrainOutput:
        """One pretraining step's losses on a batch of matched (image, text) pairs.

        ``alpha`` is the distillation weight (the training loop ramps it up during the first
        epoch, as ALBEF does); ``sample_ids`` marks captions of the same image (finetuning);
        ``hard_negatives`` False draws the ITM negatives uniformly (see :meth:`itm_loss`).

        The step's random draws can be given, so that a replay (of ALBEF's code, of another run)
        needs no patching: ``mlm_inputs`` (masked_ids, labels) with labels -100 where a token is not
        masked, or (masked_ids, labels, positions) with positions = ``codis.text.mlm_positions(labels)``
        as the pretraining loader gives them; ``itm_negatives`` (negative_image_for_text,
        negative_text_for_image), batch indices as :func:`codis.losses.hard_negative_indices`
        returns them; ``generator`` draws whichever of the two is not given (the ITM negatives
        first, then the MLM mask, as ALBEF does) instead of the global generator. Dropout still
        draws from the global generator.

        With the positions given, the step reads nothing back from the device (no host sync)
        unless ``itm_negatives`` are given; without them, finding the masked tokens costs one.
        """
        config = self.config
        alpha = config.alpha if alpha is None else alpha
        if mlm_inputs is not None:
            mlm_inputs = tuple(t.to(input_ids.device) for t in mlm_inputs)
        _check_given_draws(input_ids, mlm_inputs, itm_negatives)
        self.clamp_temperature()

        f = self.pair_features(image, input_ids, attention_mask)
        loss_ica, ica_parts = self.contrastive_loss(f, alpha, sample_ids)
        loss_itm = self.itm_loss(f, attention_mask, sample_ids, hard_negatives,
                                 negatives=itm_negatives, generator=generator)
        loss_mlm, mlm_parts = self._mlm_loss(input_ids, attention_mask, f.image_tokens,
                                             f.image_tokens_m, alpha, mlm_inputs, generator)
        weights = config.loss_weights
        total = weights.ica * loss_ica + weights.itm * loss_itm + weights.mlm * loss_mlm
        parts = {"ica": loss_ica, "itm": loss_itm, "mlm": loss_mlm}
        parts.update({f"ica_{name}": value for name, value in ica_parts.items()})
        parts.update({f"mlm_{name}": value for name, value in mlm_parts.items()})
        if self.codebook is not None:
            loss_code, code_parts = self._code_loss(f.image_feat, f.text_feat, f.image_feat_m,
                                                    f.text_feat_m)
            total = total + weights.code * loss_code
            parts["code"] = loss_code
            parts.update({f"code_{name}": value for name, value in code_parts.items()})

        self.queue.enqueue(f.image_feat_m, f.text_feat_m, sample_ids)
        parts = {name: value.detach() for name, value in parts.items()}
        return PretrainOutput(loss=total, parts=parts)

    def pair_features(self, image: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> PairFeatures:
        """Student encodings, then one EMA step of the teachers and their encodings."""
        image_tokens = self.image_tokens(image)
        text_tokens = self.text_tokens(input_ids, attention_mask)
        with torch.no_grad():
            self.momentum_update()
            image_tokens_m = self.visual_encoder_m.forward_features(image)
            image_feat_m = F.normalize(self.vision_proj_m(image_tokens_m[:, 0]), dim=-1)
            text_feat_m = F.normalize(
                self.text_proj_m(self.text_encoder_m.encode_text(input_ids, attention_mask)[:, 0]),
                dim=-1)
        return PairFeatures(image_tokens, self.image_embedding(image_tokens), text_tokens,
                            self.text_embedding(text_tokens), image_tokens_m, image_feat_m,
                            text_feat_m)

    def contrastive_loss(self, f: PairFeatures, alpha: float, sample_ids: torch.Tensor | None = None,
                         intra_modal: bool | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_ica against this step's teacher features (of this rank, or of every rank with
        ``config.negatives`` "global") and the queues (which it does not update: call
        ``queue.enqueue`` once the step's losses are computed)."""
        with torch.no_grad():
            # "global": other ranks' teacher features of this step join the negatives, so that N
            # processes with B/N samples each compute what one process with B would.
            image_others, text_others, ids_others = _other_ranks(
                f.image_feat_m, f.text_feat_m, sample_ids, alone=self.config.negatives == "per_rank")
            image_queue, text_queue, id_queue = self.queue.contents()
        return losses.ica_loss(
            f.image_feat, f.text_feat, f.image_feat_m, f.text_feat_m,
            torch.cat([image_others, image_queue]), torch.cat([text_others, text_queue]),
            temperature=self.temperature, alpha=alpha,
            intra_modal=self.config.intra_modal if intra_modal is None else intra_modal,
            sample_ids=sample_ids,
            id_queue=None if sample_ids is None else torch.cat([ids_others, id_queue]),
            terms=self.config.ica_terms)

    def itm_loss(self, f: PairFeatures, attention_mask: torch.Tensor,
                 sample_ids: torch.Tensor | None = None, hard_negatives: bool = True, *,
                 negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """L_itm on the batch's positive pairs and one negative per image and per text (never a
        pair of the same sample id): a hard negative drawn from the contrastive similarities, or,
        with ``hard_negatives`` False, one drawn uniformly (equal similarities); ``negatives``
        (negative_image_for_text, negative_text_for_image) gives them instead."""
        batch = f.image_tokens.shape[0]
        if negatives is not None:
            negative_image, negative_text = (n.to(f.image_tokens.device) for n in negatives)
        else:
            with torch.no_grad():
                sim_i2t = f.image_feat @ f.text_feat_m.T / self.temperature
                sim_t2i = f.text_feat @ f.image_feat_m.T / self.temperature
                if not hard_negatives:
                    sim_i2t, sim_t2i = torch.zeros_like(sim_i2t), torch.zeros_like(sim_t2i)
            negative_image, negative_text = losses.hard_negative_indices(sim_i2t, sim_t2i, sample_ids,
                                                                         generator=generator)
        images = torch.cat([f.image_tokens, f.image_tokens[negative_image], f.image_tokens], dim=0)
        texts = torch.cat([f.text_tokens, f.text_tokens, f.text_tokens[negative_text]], dim=0)
        masks = torch.cat([attention_mask, attention_mask, attention_mask[negative_text]], dim=0)
        logits = self.itm_logits(images, texts, masks)
        labels = torch.zeros(3 * batch, dtype=torch.long, device=logits.device)
        labels[:batch] = 1  # the positive pairs come first
        return losses.itm_loss(logits, labels)

    def _mlm_loss(self, input_ids, attention_mask, image_tokens, image_tokens_m, alpha,
                  mlm_inputs=None, generator=None):
        if mlm_inputs is not None:
            masked_ids, labels, *positions = mlm_inputs
        else:
            masked_ids, labels = mask_tokens(input_ids, self.tokenizer, self.config.mlm_probability,
                                             generator=generator)
            positions = []
        positions = positions[0] if positions else mlm_positions(labels)  # else: one host sync
        # The MLM head (and its vocabulary-wide projection) runs on the masked tokens only.
        student = self.text_encoder
        fused = student.fuse(student.encode_text(masked_ids, attention_mask), attention_mask,
                             image_tokens)
        logits = student.mlm_logits(fused.flatten(0, 1).index_select(0, positions))
        with torch.no_grad():
            teacher = self.text_encoder_m
            fused_m = teacher.fuse(teacher.encode_text(masked_ids, attention_mask), attention_mask,
                                   image_tokens_m)
            logits_m = teacher.mlm_logits(fused_m.flatten(0, 1).index_select(0, positions))
        return losses.mlm_loss(logits, labels.reshape(-1).index_select(0, positions), logits_m, alpha)

    def _code_loss(self, image_feat, text_feat, image_feat_m, text_feat_m):
        if self.config.codebook_features == "teacher":
            image_target, text_target = image_feat_m, text_feat_m
        else:
            image_target, text_target = image_feat.detach(), text_feat.detach()
        with torch.no_grad():
            image_plan, text_plan = self._local_plans(image_target, text_target)
        return losses.code_loss(image_feat, text_feat, image_target, text_target, self.codebook,
                                image_plan, text_plan, temperature=self.config.codebook.temperature)

    def _local_plans(self, image_features: torch.Tensor, text_features: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the OT plans of the whole global batch's image and of its text
        features to the codewords, both problems solved in one batched call.

        The rows are scaled by the world size so that each rank's plan carries unit mass: the
        ranks' L_ot terms, averaged by DDP, then add up to the single-process <T, D>.
        """
        world, rank = _world()
        batch = image_features.shape[0]
        # (world * B, 2, D) -> (2, world * B, D): one all-gather for both modalities.
        everyone = gather_from_all_ranks(torch.stack([image_features, text_features], 1))
        cost = losses.codeword_distance(everyone.transpose(0, 1), self.codebook)
        # Rounding can put 1 - cos a hair below 0 for a feature on a codeword; OT needs cost >= 0.
        plans = transport_plan(cost.clamp_min(0), self.config.codebook.ot)
        local = plans[:, rank * batch:(rank + 1) * batch] * world
        return local[0], local[1]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _other_ranks(image_feat_m: torch.Tensor, text_feat_m: torch.Tensor,
                 sample_ids: torch.Tensor | None, alone: bool = False,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The current step's teacher features (and ids) of every other rank; empty when alone (a
    single process, or ``alone``)."""
    world, rank = _world()
    batch = image_feat_m.shape[0]
    ids = (sample_ids if sample_ids is not None
           else torch.full((batch,), -1, dtype=torch.long, device=image_feat_m.device))
    if world == 1 or alone:
        return image_feat_m[:0], text_feat_m[:0], ids[:0]
    gathered = (gather_from_all_ranks(t) for t in (image_feat_m, text_feat_m, ids.long()))
    return tuple(torch.cat([t[:rank * batch], t[(rank + 1) * batch:]]) for t in gathered)


def _check_given_draws(input_ids: torch.Tensor, mlm_inputs, itm_negatives) -> None:
    """The shapes of a forward's given MLM inputs and ITM negatives, named when wrong (checked on
    the host); the values of given MLM positions on the device, without a host sync; the values of
    given ITM negatives on the host (a sync: they serve replays, not the training loop)."""
    if mlm_inputs is not None:
        if len(mlm_inputs) not in (2, 3):
            raise ValueError("mlm_inputs: expected (masked_ids, labels) or (masked_ids, labels, "
                             "positions)")
        for name, tensor in zip(("masked_ids", "labels"), mlm_inputs):
            if tuple(tensor.shape) != tuple(input_ids.shape):
                raise ValueError(f"mlm_inputs: {name} must have the shape of input_ids "
                                 f"{tuple(input_ids.shape)}, got {tuple(tensor.shape)}")
        if len(mlm_inputs) == 3:
            labels, positions = mlm_inputs[1], mlm_inputs[2]
            if positions.dim() != 1 or positions.dtype != torch.long:
                raise ValueError(f"mlm_inputs: positions must be 1-D long indices "
                                 f"(codis.text.mlm_positions), got {tuple(positions.shape)} "
                                 f"{positions.dtype}")
            flat = labels.reshape(-1)
            if len(positions) > len(flat):
                raise ValueError(f"mlm_inputs: {len(positions)} positions for {len(flat)} tokens")
            # As many, all masked and ascending: exactly mlm_positions(labels).
            masked = flat != -100
            valid = ((masked.sum() == len(positions))
                     & masked[positions.clamp(0, len(flat) - 1)].all()
                     & (positions[1:] > positions[:-1]).all())
            torch._assert_async(valid, "mlm_inputs: positions must be codis.text.mlm_positions(labels)")
    if itm_negatives is not None:
        batch = input_ids.shape[0]
        if len(itm_negatives) != 2:
            raise ValueError("itm_negatives: expected (negative_image_for_text, "
                             "negative_text_for_image)")
        for name, tensor in zip(("negative_image_for_text", "negative_text_for_image"),
                                itm_negatives):
            if tuple(tensor.shape) != (batch,) or tensor.dtype != torch.long:
                raise ValueError(f"itm_negatives: {name} must be ({batch},) long batch indices, "
                                 f"got {tuple(tensor.shape)} {tensor.dtype}")
            if batch and not bool(((tensor >= 0) & (tensor < batch)).all()):
                raise ValueError(f"itm_negatives: {name} holds indices outside [0, {batch})")


# ---- checkpoints ---------------------------------------------------------------------------------
def save_model(model: CodisModel, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write config + weights (students, teachers, queues, codebook) atomically to ``path``
    (a ``"pretrain"`` :mod:`codis.checkpoint`)."""
    return save_checkpoint(path, Checkpoint(
        kind="pretrain", model_config=model.config.to_dict(),
        text_architecture=model.text_encoder.architecture(), state_dict=model.state_dict(),
        extra=extra or {}))


def load_model(path: str | Path, config: ModelConfig | None = None,
               map_location: str | torch.device = "cpu", kinds: tuple[str, ...] = ("pretrain",),
               ) -> CodisModel:
    """Rebuild a model from :func:`save_model`'s file (or, with ``kinds``, from another checkpoint
    holding a whole CodisModel, such as a finetuned retrieval one). With ``config``, the checkpoint
    must have been written by a model of that architecture; a mismatch names every differing field."""
    checkpoint = read_checkpoint(path, kinds, map_location)
    saved = ModelConfig.from_dict(checkpoint.model_config)
    if config is not None:
        differences = config_differences(saved.to_dict(), config.to_dict())
        if differences:
            raise ConfigError(f"{path} was saved with a different configuration: "
                              + "; ".join(differences))
    model = CodisModel(saved, text_architecture=checkpoint.text_architecture)
    model.load_state_dict(checkpoint.state_dict)
    return model
