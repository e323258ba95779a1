"""Evaluation metrics, as pure functions of predictions and references.

VQA accuracy as the official VQA evaluation computes it, ALBEF's retrieval recall (``itm_eval``)
and its chance level, classification accuracy (NLVR², SNLI-VE) and codebook usage.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import torch

RECALL_AT = (1, 5, 10)


# ---- VQA -----------------------------------------------------------------------------------------
# The official VQA evaluation (GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py,
# master a013f00, 2021), reproduced to the letter, quirks included.
VQA_METRICS = ("official", "min3")
"""``vqa_accuracy``'s metrics: ``official`` (the evaluation server's, the default) and ``min3``."""

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
_DIGIT_COMMA = re.compile(r"\d,\d")
# Master's pattern starts with "(?!<=\d)", a look-behind mistyped as a look-ahead that never fires
# before a period, so only "a period not followed by a digit" remains: "2." loses its period.
_PERIOD = re.compile(r"\.(?!\d)")
# Master calls periodStrip.sub("", text, re.UNICODE): the flag (32) lands in ``count``.
_PERIODS_REMOVED = 32
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# Master's hand-written table, unchanged: answers are lower-cased before the lookup, so its
# capitalised keys ("Im", "Ive", "Id've", "I'dve") never match; "somebody'd" maps to "somebodyd"
# (backwards), "let's" and "she's" to themselves, and "shes", "somethings", "yallll" ... are absent.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}


def _clean_whitespace(answer: str) -> str:
    """What master does to every answer: newlines and tabs become spaces, the ends are stripped
    (inner runs of spaces and other whitespace such as "\\r" stay)."""
    if not isinstance(answer, str):
        raise TypeError(f"answer: expected a string, got {type(answer).__name__}")
    return answer.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    """Master's ``processPunctuation``: a mark is deleted where it touches a space (a space
    character, tested on the input) or anywhere once the text holds a digit-comma-digit, else it
    becomes a space ("t-shirt" -> "t shirt"); then up to 32 periods not followed by a digit go."""
    remove = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        out = out.replace(mark, "" if remove or f"{mark} " in text or f" {mark}" in text else " ")
    return _PERIOD.sub("", out, count=_PERIODS_REMOVED)


def _process_digit_article(text: str) -> str:
    """Master's ``processDigitArticle``: lower-case, split on any whitespace, number words to
    digits, articles dropped, contractions looked up, words joined by single spaces."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """An answer as the official VQA evaluation normalises it when the annotators disagree:
    whitespace cleaned, punctuation removed or turned into spaces, periods dropped unless a digit
    follows, lower-cased, number words -> digits ("two" -> "2", "none" -> "0"), articles removed,
    the official table's contractions restored ("dont" -> "don't")."""
    return _process_digit_article(_process_punctuation(_clean_whitespace(text)))


def vqa_accuracy(predicted: str, annotator_answers: Sequence[str], *,
                 metric: str = "official") -> float:
    """VQA accuracy of one predicted answer in [0, 1].

    ``official`` (the evaluation server's; master's ``vqaEval.py``): the mean over the n subsets
    of n - 1 annotators of min(#matches in the subset / 3, 1), so 1 / 2 / 3 matching annotators
    of 10 give 0.3 / 0.6 / 0.9 and a single annotator always 0. The answers (annotators' and
    predicted) are compared after :func:`normalize_answer` only when the annotators gave more than
    one distinct answer; when they are unanimous only the whitespace is cleaned, so "two" does not
    match ten "2"s and "Yes" does not match ten "yes"s. Each list entry counts as one annotator.

    ``min3``: min(#annotators who gave the answer / 3, 1), every answer normalised - the formula
    the VQA paper states and many codebases compute. Never lower than ``official`` (3 of 10 give
    1.0, not 0.9; one annotator 1/3, not 0), so its numbers do not compare with the server's.
    """
    if metric not in VQA_METRICS:
        raise ValueError(f"metric: expected one of {', '.join(VQA_METRICS)}, got {metric!r}")
    if isinstance(annotator_answers, str) or not annotator_answers:
        raise ValueError("annotator_answers: expected a non-empty list of answers")
    if metric == "min3":
        guess = normalize_answer(predicted)
        matches = sum(normalize_answer(answer) == guess for answer in annotator_answers)
        return min(matches / 3.0, 1.0)
    guess = _clean_whitespace(predicted)
    answers = [_clean_whitespace(answer) for answer in annotator_answers]
    if len(set(answers)) > 1:
        guess = normalize_answer(guess)
        answers = [normalize_answer(answer) for answer in answers]
    matches = sum(answer == guess for answer in answers)
    total = len(answers)
    # Leaving out one of the `matches` annotators who agree leaves matches - 1, any other leaves all.
    return (matches * min((matches - 1) / 3.0, 1.0)
            + (total - matches) * min(matches / 3.0, 1.0)) / total


# ---- retrieval -----------------------------------------------------------------------------------
def retrieval_metrics(score_i2t: torch.Tensor, score_t2i: torch.Tensor,
                      text_to_image: torch.Tensor) -> dict[str, float]:
    """ALBEF's ``itm_eval``: recall at 1, 5 and 10, in percent.

    Text retrieval (an image queries the captions): the rank of the best-ranked of its captions;
    image retrieval (a caption queries the images): the rank of its image. A query counts at k if
    that rank is below k. An image without captions is a text-retrieval query that always misses
    (ALBEF's rank 1e20), and counts in the denominator.

    Ties, a deliberate difference: a rank is the number of wrong candidates scoring at least as
    high as the best right one, so a tie counts against the query and constant scores earn
    nothing. ALBEF ranks by ``np.argsort(score)[::-1]``, which leaves ties to numpy's unstable
    sort and so to the order of the data (2 images x 1 caption, all scores 0: ALBEF 50% R@1, here
    0%). Counted here, a metric is a function of the scores alone, the same for any order of the
    set and never higher than ALBEF's. Without ties both agree exactly; ITM logits do not tie, but
    the -100 given to pairs outside the top ``k_test`` do when ``k_test`` < 10.
    """
    score_i2t, score_t2i = torch.as_tensor(score_i2t), torch.as_tensor(score_t2i)
    text_to_image = torch.as_tensor(text_to_image)
    if score_i2t.dim() != 2:
        raise ValueError(f"score_i2t: expected (images, texts), got shape {tuple(score_i2t.shape)}")
    n_img, n_txt = score_i2t.shape
    if not n_img or not n_txt:
        raise ValueError(f"score_i2t: need at least one image and one caption, got shape "
                         f"{(n_img, n_txt)}")
    if tuple(score_t2i.shape) != (n_txt, n_img):
        raise ValueError(f"score_t2i: expected shape {(n_txt, n_img)} (texts, images), "
                         f"got {tuple(score_t2i.shape)}")
    if tuple(text_to_image.shape) != (n_txt,) or text_to_image.is_floating_point():
        raise ValueError(f"text_to_image: expected {n_txt} integer image rows, got "
                         f"{tuple(text_to_image.shape)} {text_to_image.dtype}")
    if int(text_to_image.min()) < 0 or int(text_to_image.max()) >= n_img:
        raise ValueError(f"text_to_image: image rows must lie in [0, {n_img}), got "
                         f"[{int(text_to_image.min())}, {int(text_to_image.max())}]")
    for name, score in (("score_i2t", score_i2t), ("score_t2i", score_t2i)):
        if torch.isnan(score).any():
            raise ValueError(f"{name}: contains NaN")
    text_to_image = text_to_image.long().cpu()
    score_i2t, score_t2i = score_i2t.double().cpu(), score_t2i.double().cpu()
    positive = torch.zeros(n_img, n_txt, dtype=torch.bool)
    positive[text_to_image, torch.arange(n_txt)] = True

    best_right = score_i2t.masked_fill(~positive, -math.inf).max(dim=1, keepdim=True).values
    txt_rank = (score_i2t.masked_fill(positive, -math.inf) >= best_right).sum(dim=1)
    txt_rank[~positive.any(dim=1)] = torch.iinfo(torch.long).max  # no caption: never found
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
