"""The evaluation harness the four tasks share: one process, or every rank of a ``torchrun`` job.

VQA, NLVR² and SNLI-VE split their evaluation set by sample: each rank reads the share that the
task loaders give it for ``rank`` / ``world_size`` (:func:`codis.data.loaders.task_loader`: sample
i of shard s goes to rank (s + i) mod world_size), so every sample is evaluated on exactly one
rank, the same one in every run, and no rank decodes another's images. :func:`predict_all` runs
the rank's batches, keys each prediction by its sample id and gathers the predictions of all ranks
once; every rank then computes the metric on the whole set, so all ranks return the same metrics.

Retrieval cannot split its set this way: a query's ITC candidates come from all images and
captions. As ALBEF's ``evaluation()``, every rank encodes the whole set and runs its own block of
the re-ranking passes (:func:`rank_block`), and the score matrices are combined with
:func:`combine_rows`.

Only rank 0 shows progress and writes files (``runtime.is_main``). Precision "auto" (the default
of every task's evaluation) runs under bf16 autocast on CUDA and in fp32 on the CPU
(:func:`codis.train.autocast`).
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Iterable, TypeVar

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from codis.train import Runtime, autocast

Batch = TypeVar("Batch")
Predict = Callable[[Any], Iterable[tuple[Hashable, Any]]]


def progress_bar(iterable: Iterable[Batch], runtime: Runtime, *, progress: bool, desc: str,
                 unit: str = "batch") -> Iterable[Batch]:
    """``iterable`` with a progress bar on rank 0 when ``progress`` is set."""
    return tqdm(iterable, desc=desc, unit=unit, disable=not (progress and runtime.is_main),
                dynamic_ncols=True)


@torch.no_grad()
def predict_all(batches: Iterable[Any], predict: Predict, runtime: Runtime, *,
                precision: str = "auto", progress: bool = True, desc: str = "eval",
                ) -> dict[Hashable, Any]:
    """``{sample id: prediction}`` of every rank: ``predict(batch)`` yields (sample id, prediction)
    pairs for this rank's ``batches`` and runs under :func:`codis.train.autocast`; the results are
    gathered once (:func:`gather_by_id`). The caller puts the model in eval mode."""
    found: dict[Hashable, Any] = {}
    for batch in progress_bar(batches, runtime, progress=progress, desc=desc):
        with autocast(precision, runtime.device):
            pairs = list(predict(batch))
        for sample_id, prediction in pairs:
            _add_once(found, sample_id, prediction)
    return gather_by_id(found, runtime)


def gather_by_id(predictions: dict[Hashable, Any], runtime: Runtime) -> dict[Hashable, Any]:
    """The union of every rank's ``{sample id: prediction}`` (one ``all_gather_object``), on every
    rank, in rank order. An id on two ranks raises ValueError naming it."""
    if runtime.world_size == 1:
        return predictions
    parts: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(parts, predictions)
    merged: dict[Hashable, Any] = {}
    for part in parts:
        for sample_id, prediction in part.items():
            _add_once(merged, sample_id, prediction)
    return merged


def _add_once(found: dict[Hashable, Any], sample_id: Hashable, prediction: Any) -> None:
    if sample_id in found:
        raise ValueError(f"shards: sample id {sample_id!r} occurs twice; evaluation ids must be "
                         "unique (evaluate shards of one write_shards run)")
    found[sample_id] = prediction


def rank_block(count: int, runtime: Runtime) -> range:
    """This rank's contiguous block of ``range(count)``: the blocks of all ranks partition it and
    differ in length by at most one (lower ranks take the longer ones)."""
    base, extra = divmod(count, runtime.world_size)
    start = runtime.rank * base + min(runtime.rank, extra)
    return range(start, start + base + (runtime.rank < extra))


def combine_rows(matrix: torch.Tensor, rows: range, runtime: Runtime) -> torch.Tensor:
    """The matrix of which each rank computed its block of ``rows``, on every rank: the rows this
    rank did not compute are zeroed and the ranks' matrices summed, in place. Exact, since every
    entry has one non-zero part."""
    if runtime.world_size == 1:
        return matrix
    matrix[:rows.start] = 0
    matrix[rows.stop:] = 0
    dist.all_reduce(matrix, op=dist.ReduceOp.SUM)
    return matrix
