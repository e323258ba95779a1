"""Scores that need no model, for the manifest: what a model must beat to have learnt anything.

Scored with the evaluation's own metrics (:mod:`codis.metrics`), in percent.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence

from codis.data.demo_world.config import CAPTIONS_PER_RETRIEVAL_IMAGE
from codis.data.demo_world.questions import VQA_QUESTION_TYPES
from codis.metrics import retrieval_chance, vqa_accuracy


def _best_constant(rows: Sequence[dict], answer_list: Sequence[str]) -> tuple[str, float]:
    """The single answer with the highest mean VQA accuracy on ``rows`` (ties: first in sort order)."""
    scores = {a: sum(vqa_accuracy(a, r["answer"]) for r in rows) for a in answer_list}
    best = min(scores, key=lambda a: (-scores[a], a))
    return best, 100.0 * scores[best] / len(rows)


def _vqa_baselines(rows: Sequence[dict], types: Mapping[str, str], answer_list: Sequence[str]) -> dict:
    """The best single answer overall, and the best per question type (a text-only model's prior)."""
    answer, accuracy = _best_constant(rows, answer_list)
    per_type: dict[str, Any] = {}
    total = 0.0
    for question_type in VQA_QUESTION_TYPES:
        subset = [r for r in rows if types[str(r["question_id"])] == question_type]
        if not subset:
            continue
        guess, score = _best_constant(subset, answer_list)
        per_type[question_type] = {"answer": guess, "accuracy": score, "questions": len(subset)}
        total += score * len(subset)
    return {"split": "val", "questions": len(rows), "majority_answer": answer,
            "majority_accuracy": accuracy, "question_type_prior": per_type,
            "question_type_prior_accuracy": total / len(rows)}


def _majority_label(rows: Sequence[dict]) -> dict[str, Any]:
    """The most frequent label (ties: first in sort order) and its accuracy."""
    counts = Counter(r["label"] for r in rows)
    label = min(counts, key=lambda lab: (-counts[lab], lab))
    return {"majority_label": label, "accuracy": 100.0 * counts[label] / len(rows), "rows": len(rows)}


def trivial_baselines(retrieval_test_images: int, vqa_val: Sequence[dict], question_types: Mapping[str, str],
                      answer_list: Sequence[str], nlvr: Mapping[str, Sequence[dict]],
                      ve: Mapping[str, Sequence[dict]]) -> dict[str, Any]:
    """The manifest's ``baselines``: chance retrieval on the test images, the VQA answer priors on
    val, and the NLVR² / SNLI-VE majority labels on dev and test."""
    per_image = CAPTIONS_PER_RETRIEVAL_IMAGE
    return {
        "units": "percent",
        "retrieval_test": {"images": retrieval_test_images, "captions": per_image * retrieval_test_images,
                           **retrieval_chance(retrieval_test_images, per_image)},
        "vqa_val": _vqa_baselines(vqa_val, question_types, answer_list),
        "nlvr": {s: _majority_label(nlvr[s]) for s in ("dev", "test")},
        "ve": {s: _majority_label(ve[s]) for s in ("dev", "test")},
    }
