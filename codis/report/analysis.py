"""Qualitative analysis of a pretrained checkpoint on a retrieval evaluation set: what the report's
"Codebook usage", "Retrieval examples" and "Grad-CAM" sections show.

:func:`analyze_checkpoint` encodes the ``retrieval_eval`` shards once
(:func:`codis.tasks.retrieval.encode_eval_set`) and from that encoding derives

* codebook usage (:func:`codis.report.codebook_usage`) of the image and of the text features
  (:meth:`codis.model.CodisModel.codeword_assignments`); None for a mode without a codebook;
* text-to-image retrieval examples: for ``examples`` captions, the ``top_k`` images by ITC
  similarity alone (no ITM re-ranking: the examples illustrate the joint embedding space that the
  codebook shapes, and cost no fusion pass). The query images are spread evenly over the set
  rather than picked by outcome, so hits and misses show up as often as they happen;
* word-level Grad-CAM figures (:func:`codis.report.gradcam.word_gradcam`, default fusion layer) of each
  example caption on its own image, for its colour and shape words (the demo world's vocabulary;
  other words of the caption fill in where a caption names fewer).

The model reads images through :func:`codis.transforms.eval_transform`, as the evaluation loader
does; the pictures shown are the shards' original image bytes, copied unchanged. Everything lands
in ``output_dir``: ``analysis.json`` (paths relative to it), ``images/``, ``gradcam_*.png``.
:func:`read_analysis` turns that folder back into the fields of
:class:`codis.report.VariantResults`.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image

from codis.data.demo_world import COLORS, SHAPES
from codis.files import atomic_write_bytes, atomic_write_json
from codis.report.gradcam import gradcam_figure, word_gradcam
from codis.data.loaders import IMAGE_MEMBERS, shard_urls
from codis.model import CodisModel
from codis.report import Figure, RetrievalExample, codebook_usage
from codis.tasks.retrieval import (RetrievalConfig, encode_eval_set, load_retrieval_model,
                             prepare_model)
from codis.text import clean_caption
from codis.transforms import eval_transform

ANALYSIS_FILE = "analysis.json"
FORMAT = 1
RANKING = "top-k by ITC similarity (no ITM re-ranking)"

# The words a demo caption's Grad-CAM is most telling for: each names something visible at one
# place in the image (counts, sizes and relations do not).
COLOUR_SHAPE_WORDS: frozenset[str] = frozenset(
    [*COLORS, "grey", *SHAPES, *(s + ("es" if s.endswith("s") else "s") for s in SHAPES)])
# Words with nothing to localise, never chosen to fill up a caption's Grad-CAM words.
_FUNCTION_WORDS = frozenset(
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


# ---- choosing -----------------------------------------------------------------------------------
def query_rows(images: int, examples: int) -> list[int]:
    """``examples`` image rows spread evenly over ``images`` (all of them if there are fewer)."""
    count = min(examples, images)
    return [i * images // count for i in range(count)]


def gradcam_words(words: Sequence[str], count: int) -> list[str]:
    """Up to ``count`` distinct words of a cleaned caption for its Grad-CAM: colour and shape words
    first (in caption order), then other content words."""
    distinct = list(dict.fromkeys(words))
    first = [w for w in distinct if w in COLOUR_SHAPE_WORDS]
    rest = [w for w in distinct if w not in COLOUR_SHAPE_WORDS and w not in _FUNCTION_WORDS]
    return (first + rest)[:count]


def _check_count(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")


# ---- the analysis -------------------------------------------------------------------------------
def analyze_checkpoint(checkpoint: str | Path, eval_shards: str | Path | list[str],
                       output_dir: str | Path, *, config: RetrievalConfig | None = None,
                       examples: int = 3, top_k: int = 5, gradcam_words: int = 3,
                       gradcam_layer: int | None = None, device: str | torch.device | None = None,
                       progress: bool = False) -> dict[str, Any]:
    """Codebook usage, ITC retrieval examples and Grad-CAM figures of a pretrained (or retrieval
    finetuned) checkpoint on ``retrieval_eval`` shards, written to ``output_dir``.

    ``config``: how the eval set is read and encoded (image size, max words, batches); default: the
    model's own image size, in this process. ``examples``: queries (one caption of each of that many
    images spread over the set; fewer if the set is smaller), each with its ``top_k`` images by ITC
    and a Grad-CAM figure of up to ``gradcam_words`` words on its own image (fusion layer
    ``gradcam_layer``, default :func:`codis.report.gradcam.default_layer`). ``device``: default the GPU if
    there is one.

    Returns :func:`read_analysis` of ``output_dir``: ``codebook`` (``{"image": usage, "text":
    usage}``, None without a codebook), ``retrieval_examples`` and ``gradcam_figures``.
    """
    for name, value in (("examples", examples), ("top_k", top_k), ("gradcam_words", gradcam_words)):
        _check_count(name, value)
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
                                    gradcam_layer, output_dir, f"gradcam_{number}.png", own))

    atomic_write_json(output_dir / ANALYSIS_FILE, {
        "format": FORMAT, "checkpoint": str(checkpoint), "mode": model.config.mode,
        "shards": urls, "images": len(image_index), "texts": int(text_to_image.numel()),
        "config": config.to_dict(), "ranking": RANKING.replace("top-k", f"top-{k}"), "top_k": k,
        "codebook": codebook, "retrieval_examples": examples_out, "gradcam_figures": figures_out})
    return read_analysis(output_dir)


def _gradcam(model: CodisModel, transform: Any, data: bytes, caption: str, count: int,
             layer: int | None, output_dir: Path, name: str, image_index: int) -> dict[str, Any]:
    """One Grad-CAM figure of ``caption`` on its own image, saved as ``output_dir/name``."""
    with Image.open(io.BytesIO(data)) as source:
        picture = source.convert("RGB")
    result = word_gradcam(model, transform(picture), caption, layer=layer)
    # Words the tokenizer cut off have no map; the caption's own words all do otherwise.
    kept = {i for i in result["word_ids"] if i is not None}
    words = gradcam_words([w for i, w in enumerate(result["words"]) if i in kept], count)
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
    :class:`codis.report.VariantResults` fields ``codebook``, ``retrieval_examples``
    (:class:`~codis.report.RetrievalExample`) and ``gradcam_figures``
    (:class:`~codis.report.Figure`), with absolute paths."""
    folder = Path(output_dir).resolve()
    path = folder / ANALYSIS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"output_dir: no {ANALYSIS_FILE} in {folder}")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown analysis format {data.get('format')!r}")
    return {
        "codebook": data["codebook"],
        "retrieval_examples": [RetrievalExample(query=e["query"],
                                                image_paths=[folder / p for p in e["images"]],
                                                correct=list(e["correct"]))
                               for e in data["retrieval_examples"]],
        "gradcam_figures": [Figure(caption=f["caption"], path=folder / f["path"])
                            for f in data["gradcam_figures"]],
    }
