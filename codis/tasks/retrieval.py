"""Image-text retrieval: ALBEF's finetuning and ITC-then-ITM evaluation (the paper's Tables 1-2).

Finetuning (ALBEF's ``Retrieval.py``): the pretrained :class:`codis.model.CodisModel` keeps its
encoders, teachers and queue and is trained on L_ica + L_itm, where captions of the same image are
all positives of that image (``sample_ids``) and the ITM hard negatives are never a caption of the
same image. The model's mode is kept: CODIS modes keep their intra-modal i2i / t2t terms. MLM and
the codebook objective are pretraining-only. The finetuned model is the CodisModel itself, saved
as a task checkpoint (task ``"retrieval"``).

Evaluation (ALBEF's ``evaluation()`` and ``itm_eval``): every image and every caption is encoded
once; the ITC similarity matrix picks, for each image, its ``k_test`` most similar captions and,
for each caption, its ``k_test`` most similar images; only these candidates are scored by the ITM
head (the match logit, as ALBEF), every other pair gets -100. Recall@1/5/10 follow from the two
score matrices. The re-ranking is batched: the candidate pairs of many queries share one pass
through the fusion encoder, which computes what pairs share (an image's cross-attention keys and
values, a text's first self-attention) once per pass and the last layer on [CLS] alone
(:func:`shared_match_logits`). :func:`rerank_per_query` is the one-query-per-pass loop of ALBEF,
kept as the reference that the batched version must rank like.

Ties in the metrics count against the query, on purpose (see :func:`retrieval_metrics`: ALBEF's
argsort leaves them to the sort algorithm); an image without captions is a miss, as in ALBEF.
Under ``torchrun`` every rank encodes the whole set and re-ranks its block of the passes; the
score matrices are then combined on every rank, and all ranks return the same metrics
(:mod:`codis.tasks.evaluation`, as ALBEF's ``evaluation()``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from codis.config import ConfigError, check_int
from codis.encoders import additive_mask, set_image_size
from codis.checkpoint import Checkpoint, save_checkpoint
from codis.metrics import retrieval_metrics
from codis.data.loaders import ExampleCache, SkipCounter, retrieval_eval_loader, shard_urls
from codis.model import CodisModel, PretrainOutput, load_model
from codis.queue import FeatureQueue
from codis.tasks.base import TaskConfig, check_config, preset_config, training_loader
from codis.text import tokenize
from codis.tasks.evaluation import combine_rows, progress_bar, rank_block
from codis.train import (MetricsCallback, OptimConfig, Runtime, TrainConfig, autocast,
                         distillation_alpha, fit, init_runtime, seed_everything)

TASK = "retrieval"
NOT_A_CANDIDATE = -100.0
"""Score of a pair outside both top-k candidate lists (ALBEF's fill value)."""


# ---- configuration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetrievalConfig(TaskConfig):
    """Retrieval finetuning and evaluation settings (ALBEF's Retrieval_coco / _flickr.yaml).

    The shared fields are :class:`~codis.tasks.base.TaskConfig`'s: 384 px, batch 32, 5 epochs,
    AdamW lr 1e-5 (weight decay 0.02) without warm-up and a cosine to 1e-6, distillation alpha 0.4
    ramped over the first epoch; ``momentum`` None keeps the pretrained model's teacher momentum.
    ``k_test``: candidates re-scored by ITM per query. ``queue_size``: the ITC queue used while finetuning;
    ``None`` keeps the pretrained model's (a queue of the same size keeps its contents, as ALBEF
    loads them; another size starts anew, as the model's ``queue_init`` says). ``image_batch_size`` / ``text_batch_size``: encoding
    batches; ``rerank_batch_size``: image-text pairs per fusion pass when re-ranking (all ``k_test``
    candidates of a query always share a pass).
    """

    lr: float = 1e-5
    warmup_lr: float = 1e-5
    warmup_steps: int = 0
    alpha_warmup: bool = True
    momentum: float | None = None
    k_test: int = 256
    queue_size: int | None = 65536
    image_batch_size: int = 64
    text_batch_size: int = 256
    rerank_batch_size: int = 1024

    task: ClassVar[str] = "retrieval"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_int("image_size", 1)  # retrieval always sets its resolution
        for name in ("k_test", "image_batch_size", "text_batch_size", "rerank_batch_size"):
            self.check_int(name, 1)
        if self.queue_size is not None:
            self.check_int("queue_size", 1)


PRESETS: dict[str, RetrievalConfig] = {
    # Captions cut at 30 tokens, as ALBEF's evaluation does (its training cuts them at 30 words).
    "coco": RetrievalConfig(max_length=30),
    # ALBEF's Retrieval_flickr.yaml: Retrieval_coco.yaml with k_test 128 and 10 epochs, not 5.
    "flickr": RetrievalConfig(k_test=128, epochs=10, max_length=30),
    # The tiny model's 64 px, k_test 16 for a 100-image test set, the model's own queue, no flips
    # (the demo captions use left and right), lr 1e-4 (a tiny model from scratch learns nothing at
    # 1e-5 in a CPU budget), batch 16.
    "demo": RetrievalConfig(image_size=64, batch_size=16, lr=1e-4, warmup_lr=1e-4, min_lr=1e-5,
                            k_test=16, queue_size=None, hflip=False, rerank_batch_size=512,
                            num_workers=0, shuffle_buffer=200),
}


def config(preset: str = "coco", **changes: Any) -> RetrievalConfig:
    """A preset (``coco``: ALBEF's Retrieval_coco.yaml; ``flickr``: Retrieval_flickr.yaml, the
    same with k_test 128 and 10 epochs; ``demo``: the tiny CPU model) with fields replaced."""
    return preset_config(PRESETS, TASK, preset, changes)


def image_key(image_id: int | str) -> int:
    """A non-negative 63-bit integer for an annotation's ``image_id`` (an int or a string such as
    COCO's file names), the same in every process and run without a pass over the data first.
    Two distinct images collide with probability about n^2 / 2^64 (2e-8 for 600K images)."""
    digest = hashlib.blake2b(str(image_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def image_keys(image_ids: torch.Tensor | list, device: torch.device | str | None = None,
               ) -> torch.Tensor:
    """:func:`image_key` of a batch's ``image_id`` field (a long tensor or a list), (B,) long."""
    values = image_ids.tolist() if isinstance(image_ids, torch.Tensor) else list(image_ids)
    return torch.tensor([image_key(v) for v in values], dtype=torch.long, device=device)


class RetrievalObjective(nn.Module):
    """ALBEF's retrieval finetuning loss, L_ica + L_itm with same-image captions as positives.

    A module of its own so that the training loop's DDP wrapper sees one ``forward`` per step.
    Parameters that this loss never reaches (codebook, MLM transform and bias) are frozen: DDP
    would otherwise wait for their gradients, and the optimiser would decay them for nothing.
    """

    def __init__(self, model: CodisModel) -> None:
        super().__init__()
        self.model = model
        unused = list(model.text_encoder.mlm_head.predictions.transform.parameters())
        unused.append(model.text_encoder.mlm_head.predictions.bias)
        if model.codebook is not None:
            unused.append(model.codebook)
        for parameter in unused:
            parameter.requires_grad_(False)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_ids: torch.Tensor, alpha: float) -> PretrainOutput:
        model = self.model
        with torch.no_grad():
            model.clamp_temperature()
        features = model.pair_features(image, input_ids, attention_mask)
        loss_ica, ica_parts = model.contrastive_loss(features, alpha, sample_ids=image_ids,
                                                     intra_modal=model.config.intra_modal)
        loss_itm = model.itm_loss(features, attention_mask, sample_ids=image_ids)
        model.queue.enqueue(features.image_feat_m, features.text_feat_m, image_ids)
        parts = {"ica": loss_ica, "itm": loss_itm}
        parts.update({f"ica_{name}": value for name, value in ica_parts.items()})
        return PretrainOutput(loss=loss_ica + loss_itm,
                              parts={name: value.detach() for name, value in parts.items()})


def prepare_model(model: CodisModel, config: RetrievalConfig) -> CodisModel:
    """Adapt a pretrained model to the task's image size (ViT position embeddings resampled by
    timm, students and teachers alike, as ALBEF's ``interpolate_pos_embed``) and queue size; the
    model's config records both. Raises ConfigError before changing anything."""
    vision = model.config.vision
    if config.image_size % vision.patch_size:
        raise ConfigError(f"retrieval.image_size: {config.image_size} is not a multiple of the "
                          f"model's patch size {vision.patch_size}")
    if config.image_size != vision.image_size:
        for encoder in (model.visual_encoder, model.visual_encoder_m):
            set_image_size(encoder, config.image_size)
        model.config = model.config.replace(
            vision=dataclasses.replace(vision, image_size=config.image_size))
    if config.momentum is not None:
        model.config = model.config.replace(momentum=config.momentum)
    if config.queue_size is not None and config.queue_size != model.config.queue_size:
        device = model.queue.image.device
        model.queue = FeatureQueue(config.queue_size, model.config.embed_dim,
                                   init=model.config.queue_init).to(device)
        model.config = model.config.replace(queue_size=config.queue_size)
    return model


def finetune(pretrained: str | Path, train_shards: str | Path | list[str], output_dir: str | Path,
             config: RetrievalConfig, *, train: TrainConfig, optim: OptimConfig,
             callback: MetricsCallback | None = None, progress: bool = True, resume: bool = True,
             stop_after: int | None = None) -> Path:
    """Finetune a pretrained CodisModel checkpoint (or a retrieval-finetuned one, as ALBEF starts
    Flickr30K from its COCO model) on ``retrieval_train`` shards; returns ``output_dir/model.pt``
    (written once ``train.steps`` are done).

    The shared loop :func:`codis.train.fit` does the optimisation, checkpoints and resume;
    ``stop_after`` ends this call after that many steps (a resumable slice)."""
    check_config(config, RetrievalConfig)
    urls = shard_urls(train_shards, ("retrieval_train",))
    runtime = init_runtime()
    run_dir = Path(output_dir)
    seed_everything(train.seed + runtime.rank)
    model = prepare_model(load_retrieval_model(pretrained), config).to(runtime.device)
    objective = RetrievalObjective(model)
    skips, cache = SkipCounter(), ExampleCache()

    def open_epoch(epoch: int):
        return training_loader(urls, "retrieval_train", config, train, tokenizer=model.tokenizer,
                               image_size=config.image_size,
                               max_length=config.text_max_length(model.config), epoch=epoch,
                               skips=skips, cache=cache)

    def step_loss(trained: nn.Module, batch: dict, step: int) -> PretrainOutput:
        alpha = distillation_alpha(step, config.alpha, train.alpha_warmup_steps) if config.distill else 0.0
        ids = image_keys(batch["image_id"], device=batch["image"].device)
        output = trained(batch["image"], batch["input_ids"], batch["attention_mask"], ids, alpha)
        output.parts.update(alpha=torch.tensor(alpha), temperature=model.temperature.detach())
        return output

    shards = ([str(s) for s in train_shards] if isinstance(train_shards, (list, tuple))
              else str(train_shards))
    run_config = {"task": TASK, "retrieval": config.to_dict(), "train": dataclasses.asdict(train),
                  "optim": dataclasses.asdict(optim), "pretrained": str(pretrained),
                  "shards": shards}
    step = fit(objective, step_loss, open_epoch, run_config=run_config, train=train, optim=optim,
               output_dir=run_dir, runtime=runtime, callback=callback, progress=progress,
               resume=resume, stop_after=stop_after, desc="retrieval", skipped=lambda: skips.count)
    final = run_dir / "model.pt"
    if runtime.is_main and step >= train.steps:
        save_retrieval_model(model, final, config,
                             extra={"step": step, "pretrained": str(pretrained)})
    if runtime.world_size > 1:
        dist.barrier()
    return final


def save_retrieval_model(model: CodisModel, path: str | Path, config: RetrievalConfig,
                         extra: dict[str, Any] | None = None) -> Path:
    """Write a retrieval task checkpoint (the finetuned CodisModel) atomically."""
    return save_checkpoint(path, Checkpoint(
        kind=TASK, model_config=model.config.to_dict(), task_config=config.to_dict(),
        text_architecture=model.text_encoder.architecture(), state_dict=model.state_dict(),
        extra=extra or {}))


def load_retrieval_model(path: str | Path, map_location: str | torch.device = "cpu") -> CodisModel:
    """A retrieval task checkpoint or a pretrained one (zero-shot), as a CodisModel in eval mode.
    A checkpoint of another task raises ValueError naming both kinds."""
    return load_model(path, map_location=map_location, kinds=("pretrain", TASK)).eval()


# ---- evaluation: encoding ------------------------------------------------------------------------
@dataclass
class EncodedEvalSet:
    """Every image and caption of an evaluation set, encoded once by the student encoders."""

    image_feat: torch.Tensor  # (N_img, D) normalised
    image_tokens: torch.Tensor  # (N_img, 1 + patches, width)
    text_feat: torch.Tensor  # (N_txt, D) normalised
    text_tokens: torch.Tensor  # (N_txt, L, width)
    text_mask: torch.Tensor  # (N_txt, L)
    text_to_image: torch.Tensor  # (N_txt,) row of each caption's image

    def similarity(self) -> torch.Tensor:
        """ITC similarities (N_img, N_txt)."""
        return self.image_feat @ self.text_feat.T


@torch.no_grad()
def encode_images(model: CodisModel, batches: Iterable[torch.Tensor], precision: str = "fp32",
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, tokens) of image batches, concatenated in order."""
    device = next(model.parameters()).device
    features, tokens = [], []
    for images in batches:
        with autocast(precision, device):
            feat, tok = model.encode_image(images.to(device))
        features.append(feat.float())
        tokens.append(tok.float())
    return torch.cat(features), torch.cat(tokens)


@torch.no_grad()
def encode_texts(model: CodisModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 batch_size: int, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """(features, tokens) of tokenised captions, encoded ``batch_size`` at a time."""
    device = next(model.parameters()).device
    features, tokens = [], []
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start:start + batch_size].to(device)
        mask = attention_mask[start:start + batch_size].to(device)
        with autocast(precision, device):
            feat, tok = model.encode_text(ids, mask)
        features.append(feat.float())
        tokens.append(tok.float())
    return torch.cat(features), torch.cat(tokens)


@torch.no_grad()
def encode_eval_set(model: CodisModel, shards: str | Path | list[str], config: RetrievalConfig,
                    *, batch_size: int | None = None, progress: bool = False) -> EncodedEvalSet:
    """Read ``retrieval_eval`` shards and encode them; images are ordered by ``image_index``
    (the record position), captions by image and then as listed, whatever the reading order."""
    urls = shard_urls(shards, ("retrieval_eval",))
    loader = retrieval_eval_loader(urls, image_size=config.image_size,
                                   batch_size=batch_size or config.image_batch_size,
                                   max_words=config.max_words, num_workers=config.num_workers)
    indices: list[int] = []
    captions: list[list[str]] = []

    def image_batches() -> Iterable[torch.Tensor]:
        for batch in tqdm(loader, desc="encode images", unit="batch", disable=not progress):
            indices.extend(batch["image_index"].tolist())
            captions.extend(batch["caption"])
            yield batch["image"]

    image_feat, image_tokens = encode_images(model, image_batches(), config.eval_precision)
    if len(set(indices)) != len(indices):
        raise ValueError(f"shards {shards}: an image_index occurs twice; the evaluation shards "
                         "must come from one write_shards run (keys are record positions)")
    order = sorted(range(len(indices)), key=indices.__getitem__)
    rows = torch.tensor(order, device=image_feat.device)
    image_feat, image_tokens = image_feat[rows], image_tokens[rows]
    texts, text_to_image = [], []
    for row, position in enumerate(order):
        texts += captions[position]
        text_to_image += [row] * len(captions[position])
    input_ids, mask = tokenize(model.tokenizer, texts, config.text_max_length(model.config))
    text_feat, text_tokens = encode_texts(model, input_ids, mask, config.text_batch_size,
                                          config.eval_precision)
    return EncodedEvalSet(image_feat, image_tokens, text_feat, text_tokens,
                          mask.to(text_tokens.device), torch.tensor(text_to_image))


# ---- evaluation: ITM re-ranking ------------------------------------------------------------------
def _match_logits(model: CodisModel, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                  text_mask: torch.Tensor) -> torch.Tensor:
    """ALBEF's re-ranking score: the ITM head's "match" logit of each fused pair."""
    return model.itm_logits(image_tokens, text_tokens, text_mask)[:, 1].float()


def _split_heads(x: torch.Tensor, attention: nn.Module) -> torch.Tensor:
    """(B, L, width) -> (B, heads, L, head_size), as BERT's attention modules lay them out."""
    return x.view(*x.shape[:2], attention.num_attention_heads,
                  attention.attention_head_size).transpose(1, 2)


def _attend(attention: nn.Module, queries: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """A BERT attention module's scaled dot-product step for ``queries`` (B, Lq, width) against
    keys and values already split into heads; (B, Lq, width) before the output projection."""
    query = _split_heads(attention.query(queries), attention)
    mixed = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                           scale=attention.scaling)
    return mixed.transpose(1, 2).reshape(*queries.shape[:2], -1)


def shared_match_logits(model: CodisModel, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                        text_mask: torch.Tensor, image_rows: torch.Tensor, text_rows: torch.Tensor,
                        ) -> torch.Tensor:
    """The match logits of the pairs (image ``image_rows[j]``, text ``text_rows[j]``), as
    :meth:`CodisModel.itm_logits` computes them, without repeating work that pairs share or
    computing what the ITM head never reads.

    Re-ranking pairs one image with k texts and one text with k images, so most pairs share an
    operand: the cross-attention keys and values of each distinct image are computed once per
    fusion layer (on ViT-B at 384 px they are about 70% of the fusion encoder's work), and the
    first fusion layer's self-attention, which sees the text alone, once per distinct text. The
    ITM head reads only [CLS], so the last layer runs its queries, cross-attention and MLP on
    [CLS] alone. The projections, output blocks and MLPs are the BERT layers' own modules; only
    the attention step is written out here (:func:`_attend`), since the library's forward
    computes keys, values and queries of the same tokens together.
    """
    layers = model.text_encoder.fusion
    images, image_of_pair = torch.unique(image_rows, return_inverse=True)
    texts, text_of_pair = torch.unique(text_rows, return_inverse=True)
    image_hidden = image_tokens[images]
    hidden = text_tokens[texts]  # per distinct text until the first cross-attention
    mask = additive_mask(text_mask[texts], hidden.dtype)
    for index, layer in enumerate(layers):
        attention = layer.attention.self
        queries = hidden[:, :1] if index == len(layers) - 1 else hidden
        key = _split_heads(attention.key(hidden), attention)
        value = _split_heads(attention.value(hidden), attention)
        hidden = layer.attention.output(_attend(attention, queries, key, value, mask), queries)
        if index == 0:
            hidden, mask = hidden[text_of_pair], mask[text_of_pair]
        cross = layer.crossattention.self
        key = _split_heads(cross.key(image_hidden), cross)[image_of_pair]
        value = _split_heads(cross.value(image_hidden), cross)[image_of_pair]
        hidden = layer.crossattention.output(_attend(cross, hidden, key, value), hidden)
        hidden = layer.feed_forward_chunk(hidden)
    return model.itm_head(hidden[:, 0])[:, 1].float()


def _check_rerank_inputs(encoded: EncodedEvalSet, similarity: torch.Tensor, k_test: int) -> None:
    shape = (encoded.image_feat.shape[0], encoded.text_feat.shape[0])
    if tuple(similarity.shape) != shape:
        raise ValueError(f"similarity: expected shape {shape} (images, texts), "
                         f"got {tuple(similarity.shape)}")
    if not isinstance(k_test, int) or isinstance(k_test, bool) or k_test < 1:
        raise ValueError(f"k_test: must be an integer >= 1, got {k_test!r}")


@torch.no_grad()
def rerank(model: CodisModel, encoded: EncodedEvalSet, similarity: torch.Tensor, *, k_test: int,
           batch_size: int = 1024, share_work: bool = True, precision: str = "fp32",
           progress: bool = False, runtime: Runtime | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Score each query's ``k_test`` ITC candidates with the ITM head, many queries per pass.

    A pass holds the candidates of ``max(1, batch_size // k)`` queries: their image and text
    tokens are gathered into one (queries x k)-pair batch for the fusion encoder, which with
    ``share_work`` (:func:`shared_match_logits`) computes what pairs share only once. Returns
    (score_i2t (N_img, N_txt), score_t2i (N_txt, N_img)), -100 outside the candidates.

    With a ``runtime`` of several processes (each holding the same ``encoded`` and
    ``similarity``), each rank runs its block of the passes and every rank returns the combined
    matrices; a pass is the same on any number of processes, so are the scores.
    """
    _check_rerank_inputs(encoded, similarity, k_test)
    runtime = runtime or Runtime(device=similarity.device)
    model.eval()
    image_tokens, text_tokens, text_mask = (encoded.image_tokens, encoded.text_tokens,
                                            encoded.text_mask)
    scores = []
    for direction, sims in (("i2t", similarity), ("t2i", similarity.T)):
        queries, candidates = sims.shape
        k = min(k_test, candidates)
        top = sims.topk(k, dim=1).indices
        score = torch.full((queries, candidates), NOT_A_CANDIDATE, device=sims.device)
        per_pass = max(1, batch_size // k)
        passes = rank_block(math.ceil(queries / per_pass), runtime)
        rows = range(min(passes.start * per_pass, queries), min(passes.stop * per_pass, queries))
        for start in progress_bar(range(rows.start, rows.stop, per_pass), runtime,
                                  progress=progress, desc=f"rerank {direction}", unit="pass"):
            chunk = top[start:start + per_pass]  # (Q, k)
            query_rows = torch.arange(start, start + chunk.shape[0], device=chunk.device)
            query_rows = query_rows.repeat_interleave(k)
            flat = chunk.reshape(-1)
            image_rows, text_rows = (query_rows, flat) if direction == "i2t" else (flat, query_rows)
            with autocast(precision, image_tokens.device):
                if share_work:
                    logits = shared_match_logits(model, image_tokens, text_tokens, text_mask,
                                                 image_rows, text_rows)
                else:
                    logits = _match_logits(model, image_tokens[image_rows],
                                           text_tokens[text_rows], text_mask[text_rows])
            score[start:start + chunk.shape[0]].scatter_(1, chunk, logits.view(chunk.shape))
        scores.append(combine_rows(score, rows, runtime))
    return scores[0], scores[1]


@torch.no_grad()
def rerank_per_query(model: CodisModel, encoded: EncodedEvalSet, similarity: torch.Tensor, *,
                     k_test: int, precision: str = "fp32", progress: bool = False,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference loop of ALBEF's ``evaluation()``: one query and its k candidates per fusion
    pass. Same result as :func:`rerank`, many times slower."""
    _check_rerank_inputs(encoded, similarity, k_test)
    model.eval()
    n_img, n_txt = similarity.shape
    score_i2t = torch.full((n_img, n_txt), NOT_A_CANDIDATE, device=similarity.device)
    k = min(k_test, n_txt)
    for i in tqdm(range(n_img), desc="rerank i2t", disable=not progress):
        top = similarity[i].topk(k).indices
        with autocast(precision, similarity.device):
            score_i2t[i, top] = _match_logits(
                model, encoded.image_tokens[i].unsqueeze(0).repeat(k, 1, 1),
                encoded.text_tokens[top], encoded.text_mask[top])
    score_t2i = torch.full((n_txt, n_img), NOT_A_CANDIDATE, device=similarity.device)
    k = min(k_test, n_img)
    for t in tqdm(range(n_txt), desc="rerank t2i", disable=not progress):
        top = similarity[:, t].topk(k).indices
        with autocast(precision, similarity.device):
            score_t2i[t, top] = _match_logits(
                model, encoded.image_tokens[top],
                encoded.text_tokens[t].unsqueeze(0).repeat(k, 1, 1),
                encoded.text_mask[t].unsqueeze(0).repeat(k, 1))
    return score_i2t, score_t2i


# ---- evaluation: metrics -------------------------------------------------------------------------
# ---- evaluation: entry points --------------------------------------------------------------------
@torch.no_grad()
def evaluate_model(model: CodisModel, shards: str | Path | list[str], config: RetrievalConfig, *,
                   batch_size: int | None = None, progress: bool = True) -> dict[str, float]:
    """Recall metrics of an in-memory model on ``retrieval_eval`` shards (see :func:`evaluate`).
    The model is put in eval mode and, if ``config.image_size`` differs from its own, its
    position embeddings are resampled (zero-shot evaluation at a new resolution, as ALBEF).
    Under ``torchrun`` every rank calls it with the same model and gets the same metrics."""
    check_config(config, RetrievalConfig)
    if batch_size is not None:
        check_int(batch_size, "retrieval.batch_size", 1)
    runtime = init_runtime(next(model.parameters()).device)
    prepare_model(model, dataclasses.replace(config, queue_size=None))
    model.eval()
    encoded = encode_eval_set(model, shards, config, batch_size=batch_size,
                              progress=progress and runtime.is_main)
    score_i2t, score_t2i = rerank(model, encoded, encoded.similarity(), k_test=config.k_test,
                                  batch_size=config.rerank_batch_size, precision=config.eval_precision,
                                  progress=progress, runtime=runtime)
    return retrieval_metrics(score_i2t, score_t2i, encoded.text_to_image)


def evaluate(checkpoint: str | Path, shards: str | Path | list[str], config: RetrievalConfig, *,
             batch_size: int | None = None, progress: bool = True,
             device: str | torch.device | None = None) -> dict[str, float]:
    """ALBEF's retrieval evaluation of a pretrained (zero-shot) or retrieval-finetuned checkpoint
    on ``retrieval_eval`` shards: txt_r1/5/10, img_r1/5/10, txt_r_mean, img_r_mean, r_mean (%).

    Deterministic: eval mode, the eval transform, and images in record order. Runs on ``device``
    (default: this rank's GPU if there is one); under ``torchrun`` on every rank, which split the
    re-ranking and all return the metrics."""
    check_config(config, RetrievalConfig)
    model = load_retrieval_model(checkpoint).to(init_runtime(device).device)
    return evaluate_model(model, shards, config, batch_size=batch_size, progress=progress)
