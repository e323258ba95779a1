"""Qualitative analysis of a pretrained checkpoint on a retrieval evaluation set: what the report's
"Codebook usage", "Image-text matching", "Retrieval examples" and "Grad-CAM" sections show.

:func:`analyze_checkpoint` encodes the ``retrieval_eval`` shards once
(:func:`codis.tasks.retrieval.encode_eval_set`) and from that encoding derives

* codebook usage (:func:`codis.metrics.codebook_usage`) of the image and of the text features
  (:meth:`codis.model.CodisModel.codeword_assignments`); None for a mode without a codebook;
* the ITM AUC against random negatives (:func:`itm_auc`): whether the fusion encoder tells a
  caption's own image from another one, the clearest sign that it grounds captions at all;
* text-to-image retrieval examples: for ``examples`` captions, the ``top_k`` images by ITC
  similarity alone (no ITM re-ranking: the examples illustrate the joint embedding space that the
  codebook shapes, and cost no fusion pass). The query images are spread evenly over the set
  rather than picked by outcome, so hits and misses show up as often as they happen;
* word-level Grad-CAM figures (:func:`codis.report.gradcam.word_gradcam`, default fusion layer) of
  each example caption on its own image, for its words in a given vocabulary (the demo world's
  colours and shapes, say) or else its most image-specific words (:func:`image_specificity`:
  words that the other captions of the same image repeat, such as the names of what it shows).

The model reads images through :func:`codis.transforms.eval_transform`, as the evaluation loader
does; the pictures shown are the shards' original image bytes, copied unchanged. Everything lands
in ``output_dir``: ``analysis.json`` (paths relative to it), ``images/``, ``gradcam_*.png``.
:func:`read_analysis` turns that folder back into the fields of
:class:`codis.report.VariantResults`.

This module imports :mod:`codis.tasks.retrieval` (the report package otherwise does not): the
analysis reads and encodes the evaluation set exactly as the retrieval evaluation does.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image

from codis.data.loaders import IMAGE_MEMBERS, shard_urls
from codis.files import atomic_write_bytes, atomic_write_json
from codis.metrics import codebook_usage
from codis.model import CodisModel
from codis.report.gradcam import gradcam_figure, word_gradcam
from codis.report.inputs import Figure, RetrievalExample
from codis.tasks.retrieval import (EncodedEvalSet, RetrievalConfig, encode_eval_set,
                                   load_retrieval_model, prepare_model)
from codis.text import clean_caption
from codis.transforms import eval_transform

ANALYSIS_FILE = "analysis.json"
FORMAT = 2
READABLE_FORMATS = (1, 2)  # format 1 (before the ITM AUC) reads with itm_auc None
RANKING = "top-k by ITC similarity (no ITM re-ranking)"
ITM_NEGATIVES = "one random other image per caption"

# English words with nothing to localise, never chosen for a caption's Grad-CAM.
FUNCTION_WORDS = frozenset(
    "a an the and or of to in on at is are there with by its it this that one two three four "
    "left right above below next".split())


# ---- reading the shards --------------------------------------------------------------------------
def _raw_samples(urls: Sequence[str]) -> Iterable[dict[str, Any]]:
    """Undecoded samples in shard order (reading bytes is cheap; decoding every image is not)."""
    return wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.tarfile_to_samples())


def _image_member(sample: dict[str, Any]) -> tuple[str, bytes]:
    for name in IMAGE_MEMBERS:
        if name in sample:
            return name, sample[name]
    raise KeyError(f"sample {sample.get('__key__')} in {sample.get('__url__')}: no image member "
                   f"(one of {', '.join(IMAGE_MEMBERS)})")


def _eval_records(urls: Sequence[str]) -> dict[int, list[str]]:
    """``{image_index: raw captions}`` of every sample (the key is the record position, as
    :func:`codis.tasks.retrieval.encode_eval_set` orders them)."""
    return {int(s["__key__"]): json.loads(s["json"])["caption"] for s in _raw_samples(urls)}


def _image_bytes(urls: Sequence[str], wanted: set[int]) -> dict[int, tuple[str, bytes]]:
    """``{image_index: (member extension, bytes)}`` of the ``wanted`` images."""
    found = {}
    for sample in _raw_samples(urls):
        index = int(sample["__key__"])
        if index in wanted:
            found[index] = _image_member(sample)
    return found


# ---- ITM AUC --------------------------------------------------------------------------------------
def ranking_auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """The probability that a random positive scores above a random negative, ties counting half:
    the ROC AUC (Mann-Whitney U over all positive-negative pairs), in O(n log n)."""
    positive, negative = positive.detach().flatten().double(), negative.detach().flatten().double()
    if not positive.numel() or not negative.numel():
        raise ValueError(f"ranking_auc: needs positives and negatives, got {positive.numel()} "
                         f"and {negative.numel()}")
    if not (torch.isfinite(positive).all() and torch.isfinite(negative).all()):
        raise ValueError("ranking_auc: scores must be finite")
    ordered = negative.sort().values
    below = torch.searchsorted(ordered, positive, right=False)  # negatives < each positive
    not_above = torch.searchsorted(ordered, positive, right=True)  # negatives <= each positive
    return float((below + not_above).sum()) / (2 * positive.numel() * negative.numel())


@torch.no_grad()
def _match_log_odds(model: CodisModel, encoded: EncodedEvalSet, image_rows: torch.Tensor,
                    batch_size: int) -> torch.Tensor:
    """ITM log-odds of match of caption ``i`` with image ``image_rows[i]``, every caption."""
    device = next(model.parameters()).device
    scores = []
    for start in range(0, image_rows.numel(), batch_size):
        texts = slice(start, start + batch_size)
        rows = image_rows[texts].to(encoded.image_tokens.device)
        logits = model.itm_logits(encoded.image_tokens[rows].to(device),
                                  encoded.text_tokens[texts].to(device),
                                  encoded.text_mask[texts].to(device)).float()
        scores.append((logits[:, 1] - logits[:, 0]).cpu())
    return torch.cat(scores)


def itm_auc(model: CodisModel, encoded: EncodedEvalSet, *, batch_size: int = 256,
            seed: int = 0) -> float | None:
    """ROC AUC of the ITM match score (:meth:`codis.model.CodisModel.itm_logits`, as log-odds):
    every caption with its own image against every caption with a random other image (one per
    caption, drawn with ``seed``). 0.5: ITM does not tell them apart. None for a one-image set."""
    images = encoded.image_tokens.shape[0]
    if images < 2:
        return None
    own = encoded.text_to_image.cpu()
    generator = torch.Generator().manual_seed(seed)
    other = (own + torch.randint(1, images, own.shape, generator=generator)) % images
    return ranking_auc(_match_log_odds(model, encoded, own, batch_size),
                       _match_log_odds(model, encoded, other, batch_size))


# ---- choosing -----------------------------------------------------------------------------------
def query_rows(images: int, examples: int) -> list[int]:
    """``examples`` image rows spread evenly over ``images`` (all of them if there are fewer)."""
    count = min(examples, images)
    return [i * images // count for i in range(count)]


def image_specificity(captions_per_image: Iterable[Sequence[str]]) -> dict[str, float]:
    """``{word: score}`` over cleaned captions grouped by image: how much more often a caption holds
    the word when another caption of the same image does, P(in a caption | in another caption of
    its image) - P(in a caption). About 0 for a word any caption may use ("a", "picture"); high for
    a word that names what the image shows. Images with one caption tell nothing and are skipped."""
    captions = 0
    having: Counter[str] = Counter()  # captions that hold the word
    repeated: Counter[str] = Counter()  # of those, the share of their image's other captions that do too
    for group in captions_per_image:
        if len(group) < 2:
            continue
        word_sets = [set(caption.split()) for caption in group]
        captions += len(word_sets)
        for word, count in Counter(w for words in word_sets for w in words).items():
            having[word] += count
            repeated[word] += count * (count - 1) / (len(word_sets) - 1)
    return {word: repeated[word] / having[word] - having[word] / captions for word in having}


def gradcam_words(words: Sequence[str], count: int, scores: Mapping[str, float] | None = None,
                  ) -> list[str]:
    """Up to ``count`` distinct words of a cleaned caption for its Grad-CAM, never a function word:
    by ``scores`` (highest first, a missing word scores 0), ties in caption order."""
    scores = scores or {}
    distinct = [w for w in dict.fromkeys(words) if w not in FUNCTION_WORDS]
    return sorted(distinct, key=lambda w: -scores.get(w, 0.0))[:count]


def _check_count(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")


def _check_vocabulary(vocabulary: Any) -> None:
    if vocabulary is None:
        return
    if isinstance(vocabulary, str) or not isinstance(vocabulary, Collection) or not vocabulary:
        raise TypeError(f"gradcam_vocabulary: expected a non-empty collection of words, got {vocabulary!r}")
    for word in vocabulary:
        if not isinstance(word, str) or clean_caption(word) != word or " " in word or not word:
            raise ValueError(f"gradcam_vocabulary: {word!r} is not one lower-case word without "
                             "punctuation (as captions read after codis.text.clean_caption)")


# ---- the analysis -------------------------------------------------------------------------------
def analyze_checkpoint(checkpoint: str | Path, eval_shards: str | Path | list[str],
                       output_dir: str | Path, *, config: RetrievalConfig | None = None,
                       examples: int = 3, top_k: int = 5, gradcam_words: int = 3,
                       gradcam_vocabulary: Collection[str] | None = None,
                       gradcam_layer: int | None = None, device: str | torch.device | None = None,
                       progress: bool = False) -> dict[str, Any]:
    """Codebook usage, the ITM AUC against random negatives, ITC retrieval examples and Grad-CAM
    figures of a pretrained (or retrieval finetuned) checkpoint on ``retrieval_eval`` shards,
    written to ``output_dir``.

    ``config``: how the eval set is read and encoded (image size, max words, batches); default: the
    model's own image size, in this process. ``examples``: queries (one caption of each of that many
    images spread over the set; fewer if the set is smaller), each with its ``top_k`` images by ITC
    and a Grad-CAM figure of up to ``gradcam_words`` words on its own image (fusion layer
    ``gradcam_layer``, default :func:`codis.report.gradcam.default_layer`). The words: the
    caption's words in ``gradcam_vocabulary`` (e.g. a dataset's object and colour names) first, then
    its other words, each group in caption order; without a vocabulary, its most image-specific
    words (:func:`image_specificity` over the eval set's captions). ``device``: default the GPU if
    there is one.

    Returns :func:`read_analysis` of ``output_dir``: ``codebook`` (``{"image": usage, "text":
    usage}``, None without a codebook), ``itm_auc``, ``retrieval_examples`` and ``gradcam_figures``.
    """
    for name, value in (("examples", examples), ("top_k", top_k), ("gradcam_words", gradcam_words)):
        _check_count(name, value)
    _check_vocabulary(gradcam_vocabulary)
    if config is not None and not isinstance(config, RetrievalConfig):
        raise TypeError(f"config: expected a RetrievalConfig, got {type(config).__name__}")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint: no file at {checkpoint}")
    urls = shard_urls(eval_shards, ("retrieval_eval",))
    for url in urls:
        if not Path(url).is_file():
            raise FileNotFoundError(f"eval_shards: no shard at {url}")
    output_dir = Path(output_dir)

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_retrieval_model(checkpoint).to(device)
    if config is None:
        config = RetrievalConfig(image_size=model.config.vision.image_size, num_workers=0)
    prepare_model(model, dataclasses.replace(config, queue_size=None))
    if gradcam_layer is not None and not -len(model.text_encoder.fusion) <= gradcam_layer < len(
            model.text_encoder.fusion):
        raise ValueError(f"gradcam_layer: {gradcam_layer} is out of range for "
                         f"{len(model.text_encoder.fusion)} fusion layers")
    model.eval()

    records = _eval_records(urls)
    encoded = encode_eval_set(model, urls, config, progress=progress)
    image_index = sorted(records)  # row r of the encoding is the r-th image by record position
    if len(image_index) != encoded.image_feat.shape[0]:
        raise ValueError(f"eval_shards: read {len(image_index)} images, encoded "
                         f"{encoded.image_feat.shape[0]}")

    codebook = None
    if model.codebook is not None:
        codebook = {"image": codebook_usage(model.codeword_assignments(encoded.image_feat)),
                    "text": codebook_usage(model.codeword_assignments(encoded.text_feat))}
    auc = itm_auc(model, encoded, batch_size=config.rerank_batch_size)

    similarity = encoded.similarity().float().cpu()  # (images, texts)
    text_to_image = encoded.text_to_image.cpu()
    k = min(top_k, similarity.shape[0])
    chosen = []
    for row in query_rows(similarity.shape[0], examples):
        text = int((text_to_image == row).nonzero()[0])  # the image's first caption
        scores = similarity[:, text]
        top = scores.topk(k)
        chosen.append({"row": row, "text": text, "top": top.indices.tolist(),
                       "scores": top.values.tolist(),
                       "own_rank": 1 + int((scores > scores[row]).sum())})

    wanted = {image_index[r] for item in chosen for r in (item["row"], *item["top"])}
    pictures = _image_bytes(urls, wanted)
    files: dict[int, str] = {}
    for index in sorted(wanted):
        extension, data = pictures[index]
        files[index] = f"images/{index:09d}.{extension}"
        atomic_write_bytes(output_dir / files[index], data)

    if gradcam_vocabulary is None:
        word_scores = image_specificity([clean_caption(c, config.max_words) for c in captions]
                                        for captions in records.values())
    else:
        word_scores = dict.fromkeys(gradcam_vocabulary, 1.0)
    transform = eval_transform(model.config.vision.image_size)
    examples_out, figures_out = [], []
    for number, item in enumerate(chosen, start=1):
        own = image_index[item["row"]]
        query = clean_caption(records[own][0], config.max_words)
        examples_out.append({
            "query": query, "image_index": own, "text_row": item["text"],
            "images": [files[image_index[r]] for r in item["top"]],
            "image_indices": [image_index[r] for r in item["top"]],
            "correct": [r == item["row"] for r in item["top"]],
            "scores": item["scores"], "own_rank": item["own_rank"]})
        figures_out.append(_gradcam(model, transform, pictures[own][1], query, gradcam_words,
                                    word_scores, gradcam_layer, output_dir, f"gradcam_{number}.png",
                                    own))

    atomic_write_json(output_dir / ANALYSIS_FILE, {
        "format": FORMAT, "checkpoint": str(checkpoint), "mode": model.config.mode,
        "shards": urls, "images": len(image_index), "texts": int(text_to_image.numel()),
        "config": config.to_dict(), "ranking": RANKING.replace("top-k", f"top-{k}"), "top_k": k,
        "codebook": codebook, "itm_auc": auc, "itm_negatives": ITM_NEGATIVES,
        "gradcam_vocabulary": None if gradcam_vocabulary is None else sorted(gradcam_vocabulary),
        "retrieval_examples": examples_out, "gradcam_figures": figures_out})
    return read_analysis(output_dir)


def _gradcam(model: CodisModel, transform: Any, data: bytes, caption: str, count: int,
             word_scores: Mapping[str, float], layer: int | None, output_dir: Path, name: str,
             image_index: int) -> dict[str, Any]:
    """One Grad-CAM figure of ``caption`` on its own image, saved as ``output_dir/name``."""
    with Image.open(io.BytesIO(data)) as source:
        picture = source.convert("RGB")
    result = word_gradcam(model, transform(picture), caption, layer=layer)
    # Words the tokenizer cut off have no map; the caption's own words all do otherwise.
    kept = {i for i in result["word_ids"] if i is not None}
    words = gradcam_words([w for i, w in enumerate(result["words"]) if i in kept], count, word_scores)
    figure = gradcam_figure(picture, result, words)
    buffer = io.BytesIO()
    figure.save(buffer, format="PNG")
    atomic_write_bytes(output_dir / name, buffer.getvalue())
    return {"caption": (f"\"{caption}\" on its own image: Grad-CAM of "
                        f"{', '.join(repr(w) for w in words)} (fusion layer {result['layer']}, "
                        f"ITM match probability {result['itm_score']:.2f})"),
            "path": name, "query": caption, "words": words, "image_index": image_index,
            "layer": result["layer"], "itm_score": result["itm_score"]}


def read_analysis(output_dir: str | Path) -> dict[str, Any]:
    """The ``analysis.json`` of :func:`analyze_checkpoint` in ``output_dir`` as the
    :class:`codis.report.VariantResults` fields ``codebook``, ``itm_auc``, ``retrieval_examples``
    (:class:`~codis.report.RetrievalExample`) and ``gradcam_figures``
    (:class:`~codis.report.Figure`), with absolute paths."""
    folder = Path(output_dir).resolve()
    path = folder / ANALYSIS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"output_dir: no {ANALYSIS_FILE} in {folder}")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{path}: unknown analysis format {data.get('format')!r} "
                         f"(readable: {', '.join(map(str, READABLE_FORMATS))})")
    if data["format"] >= 2 and "itm_auc" not in data:
        raise ValueError(f"{path}: format {data['format']} without 'itm_auc'")
    return {
        "codebook": data["codebook"],
        "itm_auc": data.get("itm_auc"),
        "retrieval_examples": [RetrievalExample(query=e["query"],
                                                image_paths=[folder / p for p in e["images"]],
                                                correct=list(e["correct"]))
                               for e in data["retrieval_examples"]],
        "gradcam_figures": [Figure(caption=f["caption"], path=folder / f["path"])
                            for f in data["gradcam_figures"]],
    }
