"""Evaluation metrics, as pure functions of predictions and references.

VQA accuracy with the VQA evaluation's answer normalisation, ALBEF's retrieval recall (``itm_eval``)
and its chance level, classification accuracy (NLVR², SNLI-VE) and codebook usage.
"""

from __future__ import annotations

import math
import re
from itertools import combinations
from typing import Any, Sequence

import torch

RECALL_AT = (1, 5, 10)


# ---- VQA -----------------------------------------------------------------------------------------
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit (so "2.5" keeps its own)
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't "
    "haven't he'd he'd've he'll he's how'd how'll how's i'd i'd've i'll i'm i've isn't it'd it'd've "
    "it'll it's let's ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock "
    "oughtn't shan't she'd she'd've she'll she's should've shouldn't shouldn't've somebody'd "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
    "something'd've something'll something's that's there'd there'd've there're there's they'd "
    "they'd've they'll they're they've wasn't we'd we'd've we'll we're we've weren't what'll what're "
    "what's what've when's where'd where's where've who'd who'd've who'll who're who's who've why'll "
    "why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've "
    "you'll you're you've").split()
# Dropping the apostrophes of these gives ordinary words, which must stay as they are.
_PLAIN_WORDS = frozenset({"its", "well", "were", "wed", "hell", "shell", "ill", "id", "shed", "lets",
                          "whore", "wholl"})


def _contractions() -> dict[str, str]:
    """Every spelling of each contraction with some of its apostrophes left out -> the contraction
    ("dont", "couldnt've", "couldn'tve" -> "couldn't've"), as the VQA evaluation maps them."""
    table: dict[str, str] = {}
    for word in _CONTRACTED:
        marks = [i for i, char in enumerate(word) if char == "'"]
        for count in range(1, len(marks) + 1):
            for dropped in combinations(marks, count):
                variant = "".join(c for i, c in enumerate(word) if i not in dropped)
                if variant not in _PLAIN_WORDS:
                    table.setdefault(variant, word)
    return table


_CONTRACTIONS = _contractions()


def normalize_answer(text: str) -> str:
    """The VQA evaluation's answer normalisation: lower-case; punctuation removed where it touches a
    space or in numbers like "1,000", else turned into a space ("t-shirt" -> "t shirt"); periods
    dropped unless a digit follows; number words -> digits ("two" -> "2", "none" -> "0"); articles
    removed; contractions written without apostrophes get them back ("dont" -> "don't").

    Unlike the official script (which normalises only when the annotators disagree) every answer is
    normalised, so "Two" and "2" always match."""
    if not isinstance(text, str):
        raise TypeError(f"answer: expected a string, got {type(text).__name__}")
    original = " ".join(text.lower().split())
    remove_all = _DIGIT_COMMA.search(original) is not None
    cleaned = original
    for mark in _PUNCTUATION:
        touches_space = f"{mark} " in original or f" {mark}" in original
        cleaned = cleaned.replace(mark, "" if touches_space or remove_all else " ")
    cleaned = _PERIOD.sub("", cleaned)
    words = [_NUMBER_WORDS.get(word, word) for word in cleaned.split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(predicted: str, annotator_answers: Sequence[str], *, official: bool = False) -> float:
    """VQA accuracy of one answer in [0, 1]: min(#annotators who gave it / 3, 1) after
    :func:`normalize_answer`. ``official``: the evaluation server's variant, the mean over the n
    subsets of n - 1 annotators of min(#matches in the subset / 3, 1)."""
    if isinstance(annotator_answers, str) or not annotator_answers:
        raise ValueError("annotator_answers: expected a non-empty list of answers")
    guess = normalize_answer(predicted)
    matches = sum(normalize_answer(answer) == guess for answer in annotator_answers)
    if not official:
        return min(matches / 3.0, 1.0)
    total = len(annotator_answers)
    # Leaving out one of the `matches` annotators who agree leaves matches - 1, any other leaves all.
    return (matches * min((matches - 1) / 3.0, 1.0)
            + (total - matches) * min(matches / 3.0, 1.0)) / total


# ---- retrieval -----------------------------------------------------------------------------------
def retrieval_metrics(score_i2t: torch.Tensor, score_t2i: torch.Tensor,
                      text_to_image: torch.Tensor) -> dict[str, float]:
    """ALBEF's ``itm_eval``: recall at 1, 5 and 10, in percent.

    Text retrieval (an image queries the captions): the rank of the best-ranked of its captions;
    image retrieval (a caption queries the images): the rank of its image. A query counts at k if
    that rank is below k. Ties count against the query: a rank is the number of wrong candidates
    scoring at least as high as the best right one, so constant scores earn nothing (ALBEF's
    argsort leaves ties to the sort; without ties both agree).
    """
    score_i2t, score_t2i = torch.as_tensor(score_i2t), torch.as_tensor(score_t2i)
    text_to_image = torch.as_tensor(text_to_image)
    if score_i2t.dim() != 2:
        raise ValueError(f"score_i2t: expected (images, texts), got shape {tuple(score_i2t.shape)}")
    n_img, n_txt = score_i2t.shape
    if tuple(score_t2i.shape) != (n_txt, n_img):
        raise ValueError(f"score_t2i: expected shape {(n_txt, n_img)} (texts, images), "
                         f"got {tuple(score_t2i.shape)}")
    if tuple(text_to_image.shape) != (n_txt,) or text_to_image.is_floating_point():
        raise ValueError(f"text_to_image: expected {n_txt} integer image rows, got "
                         f"{tuple(text_to_image.shape)} {text_to_image.dtype}")
    if n_txt and (int(text_to_image.min()) < 0 or int(text_to_image.max()) >= n_img):
        raise ValueError(f"text_to_image: image rows must lie in [0, {n_img}), got "
                         f"[{int(text_to_image.min())}, {int(text_to_image.max())}]")
    for name, score in (("score_i2t", score_i2t), ("score_t2i", score_t2i)):
        if torch.isnan(score).any():
            raise ValueError(f"{name}: contains NaN")
    text_to_image = text_to_image.long().cpu()
    score_i2t, score_t2i = score_i2t.double().cpu(), score_t2i.double().cpu()
    positive = torch.zeros(n_img, n_txt, dtype=torch.bool)
    positive[text_to_image, torch.arange(n_txt)] = True
    captionless = (~positive.any(dim=1)).nonzero().flatten()
    if len(captionless):
        raise ValueError(f"text_to_image: image {int(captionless[0])} has no caption")

    best_right = score_i2t.masked_fill(~positive, -math.inf).max(dim=1, keepdim=True).values
    txt_rank = (score_i2t.masked_fill(positive, -math.inf) >= best_right).sum(dim=1)
    right = score_t2i.gather(1, text_to_image[:, None])
    img_rank = (score_t2i >= right).sum(dim=1) - 1  # minus the right image itself

    metrics = {}
    for name, rank in (("txt", txt_rank), ("img", img_rank)):
        for k in RECALL_AT:
            metrics[f"{name}_r{k}"] = 100.0 * float((rank < k).double().mean())
        metrics[f"{name}_r_mean"] = sum(metrics[f"{name}_r{k}"] for k in RECALL_AT) / len(RECALL_AT)
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    return metrics


def retrieval_chance(images: int, captions_per_image: int = 5) -> dict[str, float]:
    """The expected :func:`retrieval_metrics` of a random ranking of ``images`` images with
    ``captions_per_image`` captions each (COCO and Flickr30K: 5), in percent."""
    for name, value in (("images", images), ("captions_per_image", captions_per_image)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
    captions = images * captions_per_image
    metrics: dict[str, float] = {}
    for k in RECALL_AT:
        # Text retrieval hits when any of the image's captions is among the k drawn from all
        # captions; image retrieval when its one image is among the k drawn.
        miss = (math.comb(captions - captions_per_image, k) / math.comb(captions, k)
                if k <= captions else 0.0)
        metrics[f"txt_r{k}"] = 100.0 * (1.0 - miss)
        metrics[f"img_r{k}"] = 100.0 * min(1.0, k / images)
    for name in ("txt", "img"):
        metrics[f"{name}_r_mean"] = sum(metrics[f"{name}_r{k}"] for k in RECALL_AT) / len(RECALL_AT)
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    return metrics


# ---- classification ------------------------------------------------------------------------------
def accuracy(predictions: torch.Tensor | Sequence[int], labels: torch.Tensor | Sequence[int]) -> float:
    """Percentage of predicted class ids equal to the labels (ALBEF's NLVR² / SNLI-VE ``acc`` x 100)."""
    predictions, labels = torch.as_tensor(predictions), torch.as_tensor(labels)
    if predictions.dim() != 1 or predictions.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} "
                         "must be 1-D and of equal length")
    if predictions.numel() == 0:
        raise ValueError("accuracy of no examples is undefined")
    return 100.0 * float((predictions == labels).double().mean())


# ---- codebook ------------------------------------------------------------------------------------
def codebook_usage(assignments: torch.Tensor) -> dict[str, Any]:
    """Usage of K codewords by N samples from their assignment distributions (N, K).

    ``used``: distinct argmax codewords; ``entropy``: entropy of the mean assignment divided by
    log K (0: everything on one codeword, 1: spread evenly); ``perplexity``: exp of that entropy
    unnormalised (the effective number of codewords); ``histogram``: argmax counts per codeword.
    """
    if not isinstance(assignments, torch.Tensor) or assignments.ndim != 2:
        got = (tuple(assignments.shape) if isinstance(assignments, torch.Tensor)
               else type(assignments).__name__)
        raise ValueError(f"assignments: expected an (N, K) tensor, got {got}")
    samples, codewords = assignments.shape
    if samples < 1 or codewords < 2:
        raise ValueError(f"assignments: need N >= 1 samples and K >= 2 codewords, "
                         f"got ({samples}, {codewords})")
    values = assignments.detach().double().cpu()
    if not torch.isfinite(values).all() or (values < 0).any():
        raise ValueError("assignments: entries must be finite and non-negative")
    if not torch.allclose(values.sum(1), torch.ones(samples, dtype=torch.float64), atol=1e-4):
        raise ValueError("assignments: every row must sum to 1 (a distribution over codewords)")
    histogram = torch.bincount(values.argmax(1), minlength=codewords)
    entropy = torch.special.entr(values.mean(0)).sum().item()
    return {"codewords": codewords, "samples": samples, "used": int((histogram > 0).sum()),
            "entropy": entropy / math.log(codewords), "perplexity": math.exp(entropy),
            "histogram": histogram.tolist()}
