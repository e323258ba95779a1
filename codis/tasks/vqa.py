"""Visual question answering as ALBEF does it (``model_vqa.py``): answers are generated, not classified.

The pretrained image, text and fusion encoders read (image, question) and give the fused question
states (B, L, H). An answer decoder - a BERT stack whose self-attention is causal and whose
cross-attention reads the question states - scores answer token sequences "[CLS] answer [SEP]".
As in ALBEF it starts as a copy of the pretrained fusion layers (their cross-attention to image
tokens becomes cross-attention to question states, of the same width), the word / position
embeddings and the MLM head (now the LM head).

Training (ALBEF's ``forward(train=True)``): each question's fused states are repeated once per
distinct annotator answer, the decoder's negative log-likelihood of each answer (summed over its
tokens) is weighted by the answer's share of the annotators (``answer_weights``), summed per
question and averaged over the batch. With ``distill`` a momentum teacher (EMA copies of every
encoder and the decoder, ``torch._foreach_lerp_``) gives soft next-token targets mixed in with
weight alpha (ramped up over the first epoch).

Inference (ALBEF's ``rank_answer``): the decoder scores the first token of every answer of the
answer list, keeps the ``k_test`` answers whose first token is most likely, computes the full
log-likelihood of those k answers and returns the best. (ALBEF adds the first-token log-probability
once more to that sum; here the score is the plain sequence log-likelihood.)

Metric (:func:`codis.metrics.vqa_accuracy`): by default the official VQA evaluation's accuracy (the
mean over the leave-one-annotator-out subsets of min(matches / 3, 1), answers normalised only where
the annotators disagree), averaged over questions (percent); ``metric="min3"`` is the lenient
min(matches / 3, 1). The paper's VQA numbers are the evaluation server's on test-dev / test-std:
evaluating a split without answers writes the server's result file instead of scoring it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
import webdataset as wds
from torch import Tensor, nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer, BertOnlyMLMHead

from codis.config import ConfigError, ModelConfig
from codis.ema import MomentumTeachers
from codis.losses import answer_loss
from codis.encoders import (TextFusionEncoder, additive_mask, build_image_encoder, causal_mask,
                           set_image_size)
from codis.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from codis.files import atomic_write_json
from codis.metrics import VQA_METRICS, vqa_accuracy
from codis.data.loaders import ExampleCache, SkipCounter, shard_urls, vqa_loader
from codis.model import CodisModel, PretrainOutput, load_model
from codis.data.manifest import MANIFEST, read_json
from codis.tasks.base import TaskConfig, check_config, preset_config, training_loader
from codis.text import text_tokenizer, tokenize
from codis.tasks.evaluation import predict_all
from codis.train import (MetricsCallback, OptimConfig, Runtime, TrainConfig, distillation_alpha, fit,
                         init_runtime, seed_everything)

TASK = "vqa"

# ---- configuration -------------------------------------------------------------------------------

@dataclass(frozen=True)
class VQAConfig(TaskConfig):
    """VQA finetuning and evaluation settings; defaults are ALBEF's VQA.yaml: 384 px, batch 32 per
    GPU, 8 epochs, cosine from 2e-5 to 1e-6 after a warm-up from 1e-5 over 400 steps, distillation
    alpha 0.4 ramped over the first epoch.

    ``image_size`` None keeps the pretrained model's resolution. ``k_test`` answers are re-ranked
    by full likelihood after the first-token shortlist. ``max_answer_length`` counts [CLS] and
    [SEP] (an answer always ends with [SEP], whether or not the tokenizer appends it to questions).
    ``hflip``: ALBEF flips training images; data whose questions say left / right should not.
    ``max_length`` (the ``vqa`` preset: ALBEF's 25) cuts questions at training and at evaluation;
    ALBEF does not cut test questions, which differs only for questions of more than 24 word
    pieces (both keep ``max_words`` = 30 words).
    """

    epochs: int = 8
    warmup_steps: int = 400
    alpha_warmup: bool = True
    k_test: int = 128
    max_answer_length: int = 10

    task: ClassVar[str] = "vqa"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_int("k_test", 1)
        self.check_int("max_answer_length", 3)


PRESETS: dict[str, VQAConfig] = {
    "vqa": VQAConfig(max_length=25),
    # The CPU demo: the pretrained (tiny) model's image size, the demo world's short answer list,
    # no flips (its questions ask about left and right), a learning rate for a short run from small
    # weights, and no distillation: over a few hundred steps an EMA teacher (momentum 0.995, a lag of
    # ~200 steps) is still close to the untrained decoder, and mixing it in slows learning.
    "demo": VQAConfig(image_size=None, k_test=16, max_answer_length=6, distill=False, hflip=False,
                      batch_size=16, epochs=8, lr=1e-3, warmup_lr=1e-4, warmup_steps=20,
                      min_lr=1e-5, num_workers=0),
}


def config(preset: str = "vqa", **changes: Any) -> VQAConfig:
    """A preset (``vqa``: ALBEF's VQA.yaml; ``demo``: the CPU demo) with fields replaced."""
    return preset_config(PRESETS, TASK, preset, changes)


# ---- the model -----------------------------------------------------------------------------------

class AnswerDecoder(nn.Module):
    """BERT embeddings, layers with causal self-attention and cross-attention to the question
    states, and an LM head tied to the word embeddings. Shaped like ``encoder``'s fusion stack;
    :meth:`load_from_fusion` copies the pretrained weights in."""

    def __init__(self, encoder: TextFusionEncoder) -> None:
        super().__init__()
        # The fusion layers' config: cross-attention, and the attention backend transformers chose.
        config = copy.deepcopy(encoder.fusion[0].attention.self.config)
        config.is_decoder = True
        config.add_cross_attention = True
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config, layer_idx=i) for i in range(len(encoder.fusion)))
        for layer in self.layers:
            layer.attention.self.is_causal = True
        self.lm_head = BertOnlyMLMHead(config)
        self.tie_lm_head()

    def tie_lm_head(self) -> None:
        predictions = self.lm_head.predictions
        predictions.decoder.weight = self.embeddings.word_embeddings.weight
        predictions.decoder.bias = predictions.bias

    @torch.no_grad()
    def load_from_fusion(self, encoder: TextFusionEncoder) -> None:
        """ALBEF's initialisation: the decoder's layers from the fusion layers, its embeddings from
        the text embeddings and its LM head from the MLM head."""
        self.embeddings.load_state_dict(encoder.bert.embeddings.state_dict())
        for mine, theirs in zip(self.layers, encoder.fusion, strict=True):
            mine.load_state_dict(theirs.state_dict())
        self.lm_head.load_state_dict(encoder.mlm_head.state_dict())
        self.tie_lm_head()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, question_states: Tensor,
                question_mask: Tensor) -> Tensor:
        """Next-token logits (N, L, V) of answer token sequences given question states (N, Lq, H)."""
        hidden = self.embeddings(input_ids=input_ids)
        self_mask = causal_mask(attention_mask, hidden.dtype)
        cross_mask = additive_mask(question_mask, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, self_mask, question_states, encoder_attention_mask=cross_mask)
        return self.lm_head(hidden)


Decoder = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def sequence_log_likelihood(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """log p(tokens 1.. | token 0, question) of each sequence, (N,): position t predicts token t+1;
    padding is not scored."""
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    token = log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (token * attention_mask[:, 1:].to(token.dtype)).sum(1)


@torch.no_grad()
def rank_answers(decoder: Decoder, question_states: Tensor, question_mask: Tensor,
                 answer_ids: Tensor, answer_mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """ALBEF's ``rank_answer`` for a batch of Q questions and an answer list of N token sequences
    (all starting with the same start token): shortlist the ``k`` answers whose first token is most
    likely, score them by full log-likelihood. Returns the shortlisted answer indices (Q, k) and
    their log-likelihoods (Q, k), best first (ties: earlier in the answer list first)."""
    questions, candidates = question_states.shape[0], answer_ids.shape[0]
    if answer_ids.shape[1] < 2:
        raise ValueError("answer_ids: answers need a start token and at least one more token")
    if bool((answer_ids[:, 0] != answer_ids[0, 0]).any()):
        raise ValueError("answer_ids: every answer must begin with the same start token ([CLS])")
    k = min(k, candidates)
    start = answer_ids[:1, :1].expand(questions, 1)
    first_logits = decoder(start, torch.ones_like(start), question_states, question_mask)[:, 0]
    first = F.log_softmax(first_logits.float(), dim=-1)[:, answer_ids[:, 1]]  # (Q, N)
    shortlist = first.argsort(dim=1, descending=True, stable=True)[:, :k]  # (Q, k)
    ids = answer_ids[shortlist].flatten(0, 1)
    mask = answer_mask[shortlist].flatten(0, 1)
    logits = decoder(ids, mask, question_states.repeat_interleave(k, dim=0),
                     question_mask.repeat_interleave(k, dim=0))
    scores = sequence_log_likelihood(logits, ids, mask).view(questions, k)
    order = scores.argsort(dim=1, descending=True, stable=True)
    return shortlist.gather(1, order), scores.gather(1, order)


class VQAModel(nn.Module):
    """Image encoder + text / fusion encoder (question) + answer decoder, and with ``teachers`` their
    EMA copies for ALBEF's distillation. ``model_config`` describes the encoders (its image size is
    the one the model runs at) and ``text_architecture`` their BERT shape, as in checkpoints."""

    def __init__(self, model_config: ModelConfig, text_architecture: dict[str, Any],
                 config: VQAConfig, teachers: bool | None = None) -> None:
        super().__init__()
        self.model_config = model_config
        self.config = config
        self.tokenizer = text_tokenizer(model_config.text)
        self.visual_encoder = build_image_encoder(dataclasses.replace(model_config.vision,
                                                                      pretrained=None))
        self.text_encoder = TextFusionEncoder(BertConfig.from_dict(text_architecture),
                                              model_config.text.text_layers,
                                              model_config.text.fusion_layers)
        # The question encoder's own MLM head is never used; a trainable parameter without a
        # gradient would stall DDP. (Its decoder weight is the word embedding, which stays trainable.)
        head = self.text_encoder.mlm_head.predictions
        head.transform.requires_grad_(False)
        head.bias.requires_grad_(False)
        self.decoder = AnswerDecoder(self.text_encoder)
        self.decoder.load_from_fusion(self.text_encoder)
        self.has_teachers = config.distill if teachers is None else teachers
        if self.has_teachers:
            self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
            self.text_encoder_m = copy.deepcopy(self.text_encoder)
            self.decoder_m = copy.deepcopy(self.decoder)
            for teacher in self._teachers():
                teacher.requires_grad_(False)
            self.momentum_teachers = MomentumTeachers(self._teachers(), self._students())

    @property
    def image_size(self) -> int:
        return self.model_config.vision.image_size

    def _students(self) -> list[nn.Module]:
        return [self.visual_encoder, self.text_encoder, self.decoder]

    def _teachers(self) -> list[nn.Module]:
        return [self.visual_encoder_m, self.text_encoder_m, self.decoder_m]

    @classmethod
    def from_pretrained(cls, pretrained: CodisModel, config: VQAConfig) -> "VQAModel":
        """Encoders (and teachers) from a pretrained model, the decoders from its fusion layers; the
        ViT's position embeddings resampled to ``config.image_size``."""
        vision = pretrained.config.vision
        size = vision.image_size if config.image_size is None else config.image_size
        if size % vision.patch_size:
            raise ConfigError(f"vqa.image_size: {size} is not a multiple of the pretrained ViT's patch "
                              f"size {vision.patch_size}")
        model_config = pretrained.config.replace(
            vision=dataclasses.replace(vision, image_size=size, pretrained=None))
        model = cls(model_config, pretrained.text_encoder.architecture(), config)
        pairs = [(model.visual_encoder, model.text_encoder, model.decoder,
                  pretrained.visual_encoder, pretrained.text_encoder)]
        if model.has_teachers:
            pairs.append((model.visual_encoder_m, model.text_encoder_m, model.decoder_m,
                          pretrained.visual_encoder_m, pretrained.text_encoder_m))
        for visual, text, decoder, source_visual, source_text in pairs:
            set_image_size(source_visual, size)
            visual.load_state_dict(source_visual.state_dict())
            text.load_state_dict(source_text.state_dict())
            decoder.load_from_fusion(source_text)
        return model

    def momentum_update(self) -> None:
        """teacher <- m * teacher + (1 - m) * student (ALBEF's ``_momentum_update``)."""
        self.momentum_teachers.update(self.config.momentum)

    def encode_question(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Fused question states (B, L, H): the question's text encoding cross-attending to the image."""
        image_tokens = self.visual_encoder.forward_features(image)
        text = self.text_encoder.encode_text(input_ids, attention_mask)
        return self.text_encoder.fuse(text, attention_mask, image_tokens)

    def forward(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor, answer_ids: Tensor,
                answer_mask: Tensor, answer_counts: Tensor, answer_weights: Tensor,
                alpha: float = 0.0) -> PretrainOutput:
        """The training loss of a batch: B questions, their answers flattened ("[CLS] answer [SEP]"
        rows of ``answer_ids``), ``answer_counts[b]`` answers for question b, one weight each."""
        if int(answer_counts.sum()) != answer_ids.shape[0]:
            raise ValueError(f"answer_counts sum to {int(answer_counts.sum())} but there are "
                             f"{answer_ids.shape[0]} answers")
        states = self.encode_question(image, input_ids, attention_mask)
        states = states.repeat_interleave(answer_counts, dim=0)
        question_mask = attention_mask.repeat_interleave(answer_counts, dim=0)
        logits = self.decoder(answer_ids, answer_mask, states, question_mask)
        teacher_logits = None
        if self.has_teachers:
            with torch.no_grad():
                self.momentum_update()
                if alpha > 0:
                    image_m = self.visual_encoder_m.forward_features(image)
                    text_m = self.text_encoder_m.encode_text(input_ids, attention_mask)
                    states_m = self.text_encoder_m.fuse(text_m, attention_mask, image_m)
                    teacher_logits = self.decoder_m(
                        answer_ids, answer_mask, states_m.repeat_interleave(answer_counts, dim=0),
                        question_mask)
        loss, parts = answer_loss(logits, answer_ids, answer_mask, answer_weights, image.shape[0],
                                  teacher_logits, alpha if teacher_logits is not None else 0.0)
        return PretrainOutput(loss=loss, parts={k: v.detach() for k, v in parts.items()})

    @torch.no_grad()
    def answer(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor, answer_ids: Tensor,
               answer_mask: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """Ranked answer-list indices (B, k) and their log-likelihoods for a batch of questions."""
        states = self.encode_question(image, input_ids, attention_mask)
        return rank_answers(self.decoder, states, attention_mask, answer_ids, answer_mask,
                            self.config.k_test if k is None else k)


# ---- checkpoints ---------------------------------------------------------------------------------

def save_vqa_model(model: VQAModel, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """The task checkpoint (students only: the teachers serve training alone), written atomically."""
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith(("visual_encoder_m.", "text_encoder_m.", "decoder_m."))}
    return save_checkpoint(path, Checkpoint(
        kind=TASK, model_config=model.model_config.to_dict(), task_config=model.config.to_dict(),
        text_architecture=model.text_encoder.architecture(), state_dict=state, extra=extra or {}))


def load_vqa_model(path: str | Path, map_location: str | torch.device = "cpu") -> VQAModel:
    """A finetuned VQA model (eval mode) from :func:`finetune`'s ``model.pt``."""
    checkpoint = read_checkpoint(path, (TASK,), map_location)
    model = VQAModel(ModelConfig.from_dict(checkpoint.model_config), checkpoint.text_architecture,
                     VQAConfig.from_dict(checkpoint.task_config), teachers=False)
    model.load_state_dict(checkpoint.state_dict)
    return model.eval()


# ---- finetuning ----------------------------------------------------------------------------------

def _answer_batch(batch: dict, tokenizer, max_length: int, device: torch.device,
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flatten a loader batch's answers: token ids / mask (N, L), answers per question (B,), weights (N,)."""
    answers = [a for group in batch["answers"] for a in group]
    if not answers:
        raise ValueError("train_shards: a training batch holds no answers (test questions have none; "
                         "finetune on a split with annotator answers)")
    ids, mask = tokenize(tokenizer, answers, max_length, end_with_sep=True)
    counts = torch.tensor([len(group) for group in batch["answers"]], dtype=torch.long)
    weights = torch.tensor([w for group in batch["answer_weights"] for w in group], dtype=torch.float32)
    return ids.to(device), mask.to(device), counts.to(device), weights.to(device)


def finetune(pretrained: str | Path, train_shards: str | Path | list[str], output_dir: str | Path,
             config: VQAConfig, *, train: TrainConfig, optim: OptimConfig,
             callback: MetricsCallback | None = None, progress: bool = True, resume: bool = True,
             stop_after: int | None = None) -> Path:
    """Finetune a pretrained checkpoint for VQA on ``train_shards`` (write_shards kind "vqa");
    returns ``output_dir/model.pt``. The loop, resume, DDP and checkpoints are
    :func:`codis.train.fit`'s."""
    check_config(config, VQAConfig)
    pretrained = Path(pretrained)
    if not pretrained.is_file():
        raise FileNotFoundError(f"pretrained: no checkpoint at {pretrained}")
    urls = shard_urls(train_shards, ("vqa",))

    runtime = init_runtime()
    output_dir = Path(output_dir)
    seed_everything(train.seed + runtime.rank)
    model = VQAModel.from_pretrained(load_model(pretrained), config).to(runtime.device)
    skips, cache = SkipCounter(), ExampleCache()

    def open_epoch(epoch: int):
        return training_loader(urls, "vqa", config, train, tokenizer=model.tokenizer,
                               image_size=model.image_size,
                               max_length=config.text_max_length(model.model_config), epoch=epoch,
                               skips=skips, cache=cache)

    def step_loss(trained: nn.Module, batch: dict, step: int) -> PretrainOutput:
        alpha = distillation_alpha(step, config.alpha, train.alpha_warmup_steps) if config.distill else 0.0
        answers = _answer_batch(batch, model.tokenizer, config.max_answer_length, runtime.device)
        output = trained(batch["image"], batch["input_ids"], batch["attention_mask"], *answers,
                         alpha=alpha)
        output.parts["alpha"] = torch.tensor(alpha)
        return output

    run_config = {"task": TASK, "task_config": config.to_dict(), "train": dataclasses.asdict(train),
                  "optim": dataclasses.asdict(optim), "pretrained": str(pretrained),
                  "shards": list(urls)}
    step = fit(model, step_loss, open_epoch, run_config=run_config, train=train, optim=optim,
               output_dir=output_dir, runtime=runtime, callback=callback, progress=progress,
               resume=resume, stop_after=stop_after, desc="vqa", skipped=lambda: skips.count)
    final = output_dir / "model.pt"
    if runtime.is_main and step >= train.steps:
        save_vqa_model(model, final, extra={"step": step, "pretrained": str(pretrained)})
    if runtime.world_size > 1:
        dist.barrier()
    return final


# ---- evaluation and prediction -------------------------------------------------------------------

def load_answer_list(shards: str | Path | list[str] | None = None,
                     answer_list: str | Path | Sequence[str] | None = None) -> list[str]:
    """The candidate answers: ``answer_list`` (a JSON list file, as ALBEF's answer_list.json, or the
    list itself), else the file named by ``source["answer_list"]`` in the shards' manifest (a path
    relative to the shards folder or absolute; pass ``source={"answer_list": ...}`` to write_shards)."""
    origin = "answer_list"
    if answer_list is None:
        manifest = Path(shards) / MANIFEST if isinstance(shards, (str, Path)) else None
        if manifest is None or not manifest.is_file():
            raise ValueError("answer_list: not given, and the shards are not a write_shards folder whose "
                             "manifest could name one")
        source = json.loads(manifest.read_text(encoding="utf-8")).get("source", {})
        if not source.get("answer_list"):
            raise ValueError(f"answer_list: not given, and {manifest} names none (source.answer_list)")
        answer_list = Path(shards) / source["answer_list"]  # an absolute path replaces the folder
        origin = f"{manifest}: source.answer_list"
    if isinstance(answer_list, (str, Path)):
        path = Path(answer_list)
        if not path.is_file():
            raise FileNotFoundError(f"{origin}: no answer list at {path}")
        answers = read_json(path)
        origin = str(path)
    else:
        answers = list(answer_list)
    if not isinstance(answers, list) or not answers or not all(
            isinstance(a, str) and a.strip() for a in answers):
        raise ValueError(f"{origin}: expected a non-empty list of non-empty answer strings")
    return answers


def read_annotator_answers(shards: str | Path | list[str]) -> dict[Any, list[str] | None]:
    """question_id -> the raw annotator answers stored in VQA shards (None for test questions).

    The loader's batches carry only distinct answers and their shares, which cannot give back the
    annotator counts the metric needs, so the records are read once more (no image is decoded)."""
    return _read_questions(shards)[0]


def _read_questions(shards: str | Path | list[str],
                    ) -> tuple[dict[Any, list[str] | None], dict[Any, str]]:
    """:func:`read_annotator_answers`, and the ``answer_type`` of the records that carry one (the
    official annotations' "yes/no", "number", "other")."""
    urls = shard_urls(shards, ("vqa",))
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(),
                                wds.map(lambda sample: json.loads(sample["json"])))
    found: dict[Any, list[str] | None] = {}
    answer_types: dict[Any, str] = {}
    for record in pipeline:
        answer = record.get("answer")
        found[record["question_id"]] = [answer] if isinstance(answer, str) else answer
        if isinstance(record.get("answer_type"), str):
            answer_types[record["question_id"]] = record["answer_type"]
    return found, answer_types


def _resolve_config(model: VQAModel, config: VQAConfig | None) -> VQAConfig:
    if config is None:
        return model.config
    check_config(config, VQAConfig)
    if config.image_size is not None and config.image_size != model.image_size:
        raise ConfigError(f"vqa.image_size: the checkpoint was finetuned at {model.image_size} px, "
                          f"not {config.image_size} (pass image_size=None or {model.image_size})")
    return config


def _predict(checkpoint: str | Path, shards: str | Path | list[str], config: VQAConfig | None,
             answer_list: str | Path | Sequence[str] | None, *, batch_size: int, progress: bool,
             device: str | torch.device | None) -> tuple[dict[Any, str], Runtime]:
    """{question_id: answer} of every question in ``shards`` by the finetuned ``checkpoint``, on
    every rank (each rank answers its share of the questions and the answers are gathered,
    :mod:`codis.tasks.evaluation`), and the runtime it ran in."""
    answers = load_answer_list(shards, answer_list)
    runtime = init_runtime(device)
    model = load_vqa_model(checkpoint).to(runtime.device)
    config = _resolve_config(model, config)
    device = runtime.device
    model.eval()
    answer_ids, answer_mask = tokenize(model.tokenizer, answers, config.max_answer_length,
                                       end_with_sep=True)
    answer_ids, answer_mask = answer_ids.to(device), answer_mask.to(device)
    loader = vqa_loader(shard_urls(shards, ("vqa",)), image_size=model.image_size,
                        batch_size=batch_size, tokenizer=model.tokenizer,
                        max_words=config.max_words,
                        max_length=config.text_max_length(model.model_config),
                        num_workers=config.num_workers,
                        rank=runtime.rank, world_size=runtime.world_size)

    def best_answers(batch: dict) -> Iterable[tuple[Any, str]]:
        ranked, _ = model.answer(batch["image"].to(device), batch["input_ids"].to(device),
                                 batch["attention_mask"].to(device), answer_ids, answer_mask,
                                 config.k_test)
        ids = batch["question_id"]
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return zip(ids, [answers[best] for best in ranked[:, 0].tolist()])

    return predict_all(loader, best_answers, runtime, precision=config.eval_precision,
                       progress=progress, desc="vqa eval"), runtime


def write_result_file(predictions: Mapping[Any, str], output: str | Path) -> Path:
    """The VQA evaluation server's result file, ``[{"question_id": int, "answer": str}, ...]``,
    written atomically; ids that are digit strings become integers, as the server expects."""
    def server_id(question_id: Any) -> Any:
        digits = isinstance(question_id, str) and question_id.isdecimal()
        return int(question_id) if digits else question_id

    return atomic_write_json(output, [{"question_id": server_id(q), "answer": a}
                                      for q, a in predictions.items()])


def predict(checkpoint: str | Path, shards: str | Path | list[str], config: VQAConfig | None = None,
            *, answer_list: str | Path | Sequence[str] | None = None, output: str | Path | None = None,
            batch_size: int = 16, progress: bool = True,
            device: str | torch.device | None = None) -> dict[Any, str]:
    """{question_id: answer} for every question in ``shards``; with ``output`` also written as the
    VQA result file (:func:`write_result_file`, for the test-dev / test-std server).
    Under ``torchrun`` every rank calls it: each answers its share, all return every answer, and
    rank 0 writes ``output``. ``config.eval_precision`` "auto": bf16 autocast on GPUs, fp32 on the CPU."""
    predictions, runtime = _predict(checkpoint, shards, config, answer_list, batch_size=batch_size,
                                    progress=progress, device=device)
    if output is not None and runtime.is_main:
        write_result_file(predictions, output)
    return predictions


def evaluate(checkpoint: str | Path, shards: str | Path | list[str], config: VQAConfig | None = None,
             *, answer_list: str | Path | Sequence[str] | None = None,
             question_types: str | Path | Mapping[str, str] | None = None, metric: str = "official",
             result_file: str | Path | None = None, batch_size: int = 16, progress: bool = True,
             device: str | torch.device | None = None) -> dict[str, float]:
    """VQA accuracy (percent) of a finetuned checkpoint on VQA shards, by ``metric``
    (:func:`codis.metrics.vqa_accuracy`: ``official``, the evaluation server's, or ``min3``).

    Returns ``accuracy``; with ``question_types`` (question_id -> type, e.g. the demo world's
    meta/vqa_question_types.json) ``accuracy_<type>`` per type; for records that carry the official
    annotations' ``answer_type``, ``accuracy_answer_<type>`` per answer type ("yes/no" ->
    ``yes_no``, ``number``, ``other``). ``result_file``: also write the predictions as the
    evaluation server's result file.

    A split without answers (VQA test-dev / test-std, as ALBEF's test files) cannot be scored
    here: the predictions go to ``result_file`` (required then) for the evaluation server, and the
    only metric returned is ``questions``, the number answered.

    ``config`` None uses the checkpoint's (k_test, answer length). Deterministic: eval mode, shard
    order, no augmentation. Under ``torchrun`` every rank calls it, answers its share of the
    questions and returns the metrics of all; rank 0 writes ``result_file``.
    ``config.eval_precision`` "auto": bf16 autocast on GPUs, fp32 on the CPU."""
    if metric not in VQA_METRICS:
        raise ValueError(f"metric: expected one of {', '.join(VQA_METRICS)}, got {metric!r}")
    annotated, answer_types = _read_questions(shards)
    missing = [q for q, given in annotated.items() if not given]
    unanswered = bool(annotated) and len(missing) == len(annotated)
    if missing and not unanswered:
        raise ValueError(f"shards: {len(missing)} of {len(annotated)} questions have no annotator "
                         f"answers (first: {missing[0]!r}); evaluate a split that is answered "
                         "throughout, or one without answers (test-dev) for a result file")
    if unanswered and result_file is None:
        raise ValueError("result_file: the shards' questions have no annotator answers (a test "
                         "split): pass result_file to write the evaluation server's result file")
    types = None if unanswered else _question_types(question_types, annotated)
    predictions, runtime = _predict(checkpoint, shards, config, answer_list, batch_size=batch_size,
                                    progress=progress, device=device)
    if result_file is not None and runtime.is_main:
        write_result_file(predictions, result_file)
    if unanswered:
        return {"questions": len(predictions)}
    scores = {q: vqa_accuracy(predictions[q], annotated[q], metric=metric) for q in predictions}
    groups: dict[str, list[float]] = {}
    for q, score in scores.items():
        if types is not None:
            groups.setdefault(f"accuracy_{types[str(q)]}", []).append(score)
        if q in answer_types:
            groups.setdefault(f"accuracy_answer_{_metric_word(answer_types[q])}", []).append(score)
    return {"accuracy": 100.0 * sum(scores.values()) / len(scores),
            **{key: 100.0 * sum(group) / len(group) for key, group in sorted(groups.items())}}


def _metric_word(name: str) -> str:
    """An answer type as part of a metric name: "yes/no" -> "yes_no"."""
    return "".join(c if c.isalnum() else "_" for c in name)


def _question_types(question_types: str | Path | Mapping[str, str] | None,
                    annotated: Mapping[Any, Any]) -> dict[str, str] | None:
    if question_types is None:
        return None
    if isinstance(question_types, (str, Path)):
        path = Path(question_types)
        if not path.is_file():
            raise FileNotFoundError(f"question_types: no file at {path}")
        question_types = read_json(path)
        if not isinstance(question_types, dict):
            raise ValueError(f"{path}: question_types: expected a JSON mapping of question ids to "
                             f"types, got a {type(question_types).__name__}")
    types = {str(q): t for q, t in dict(question_types).items()}
    unknown = [q for q in annotated if str(q) not in types]
    if unknown:
        raise ValueError(f"question_types: no type for {len(unknown)} question(s), first {unknown[0]!r}")
    return types
