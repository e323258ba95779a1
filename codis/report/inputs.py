"""What the report is built from: the measured results of each variant, the trivial baselines, the
machine, and the rows the report shows (one per report key of :data:`codis.tasks.TASKS`)."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from codis.report import paper
from codis.tasks import TASKS

RETRIEVAL_METRICS: tuple[str, ...] = (*paper.RETRIEVAL_METRICS, "r_mean")


# ---------------------------------------------------------------------------------- report rows


@dataclass(frozen=True)
class PaperReference:
    """Where the paper reports a row: a column group of one of its tables, shown as ``label``.
    ``metric``: the paper's column when it differs from ours (the paper reports VQA accuracy as
    ``test_dev`` / ``test_std``); None means the same name as ours."""

    table: paper.PaperTable
    group: str
    label: str
    metric: str | None = None

    def column(self, metric: str) -> str:
        return self.metric if self.metric is not None else metric

    def value(self, method: str, metric: str) -> float | None:
        """The paper's value of ``method`` for our ``metric``; KeyError where the paper has no
        such column (e.g. r_mean, which it does not report)."""
        return self.table.value(method, self.group, self.column(metric))


@dataclass(frozen=True)
class ReportRow:
    """One row group of the report: a task's report key (the key in ``VariantResults.metrics``),
    its title, its metrics (percent) and where the paper reports it. ``protocol``: how this run
    gets the row's numbers; ``paper_protocol``: how the paper got its numbers where that differs,
    "" where it is the same."""

    key: str
    task: str
    title: str
    metrics: tuple[str, ...]
    paper_refs: tuple[PaperReference, ...]
    protocol: str
    paper_protocol: str = ""
    optional: bool = False
    """Shown only when a variant has results for it (a protocol that recipes add on purpose)."""


_FINETUNED = "finetuned on the task's train split, then scored on its evaluation split"

# What the report shows for each report key of codis.tasks.TASKS: the setting that tells apart the
# keys of one task (None for a task with one key), the metrics, the paper's columns, and the
# protocols: this run's, and the paper's where it differs (the ALBEF code and issues show that the
# Flickr30K "zero-shot" rows are transfer from COCO finetuning, and how VQA was trained and scored).
_SHOWN: dict[str, tuple[str | None, tuple[str, ...], tuple[PaperReference, ...], str, str]] = {
    "retrieval_zero_shot": ("zero-shot", RETRIEVAL_METRICS, (
        PaperReference(paper.ZERO_SHOT_RETRIEVAL, "coco", "MSCOCO 5K"),),
        "zero-shot: the pretrained model, no finetuning",
        "the same on MSCOCO (its ALBEF row is CODIS's re-run); its Flickr30K \"zero-shot\" rows "
        "are another protocol, the COCO-finetuned model on Flickr30K (the transfer row, when a "
        "recipe has a task with transfer_from)"),
    "retrieval_transfer": ("finetuned on another dataset", RETRIEVAL_METRICS, (
        PaperReference(paper.ZERO_SHOT_RETRIEVAL, "flickr", "Flickr30K 1K"),),
        "transfer: the model finetuned on another dataset's train split (transfer_from), scored "
        "on this dataset's test split without finetuning on it",
        "the same: the paper's Flickr30K \"zero-shot\" rows are the COCO-finetuned model "
        "(ALBEF's maintainers, salesforce/ALBEF issues #3, #29, #89)"),
    "retrieval_finetuned": ("finetuned", RETRIEVAL_METRICS, (
        PaperReference(paper.FINETUNED_RETRIEVAL, "coco", "MSCOCO 5K"),
        PaperReference(paper.FINETUNED_RETRIEVAL, "flickr", "Flickr30K 1K")),
        _FINETUNED, "finetuned on each dataset's train split; ALBEF scores the checkpoint with "
        "the best val score, this run the last one"),
    "vqa": (None, ("accuracy",), (
        PaperReference(paper.UNDERSTANDING, "vqa", "test-dev", "test_dev"),
        PaperReference(paper.UNDERSTANDING, "vqa", "test-std", "test_std")),
        _FINETUNED, "trained on VQA train + val + Visual Genome QA, scored by the VQA evaluation "
        "server on test-dev / test-std"),
    "nlvr": (None, ("accuracy",), (
        PaperReference(paper.UNDERSTANDING, "nlvr", "dev", "dev"),
        PaperReference(paper.UNDERSTANDING, "nlvr", "test-P", "test_p")),
        _FINETUNED, ""),
    "ve": (None, ("accuracy",), (
        PaperReference(paper.UNDERSTANDING, "ve", "val", "val"),
        PaperReference(paper.UNDERSTANDING, "ve", "test", "test")),
        _FINETUNED, ""),
}


_OPTIONAL = frozenset({"retrieval_transfer"})


def _report_rows() -> tuple[ReportRow, ...]:
    rows = []
    for task in TASKS.values():
        for key in task.report_keys:
            if key not in _SHOWN:
                raise KeyError(f"codis.tasks.TASKS[{task.name!r}].report_keys: {key!r} has no entry "
                               "in codis.report.inputs (its metrics and paper columns)")
            setting, metrics, refs, protocol, paper_protocol = _SHOWN[key]
            title = f"{task.title} ({setting})" if setting else task.title
            rows.append(ReportRow(key, task.name, title, metrics, refs, protocol, paper_protocol,
                                  optional=key in _OPTIONAL))
    return tuple(rows)


REPORT_ROWS: tuple[ReportRow, ...] = _report_rows()
"""The report's rows, in the order of :data:`codis.tasks.TASKS` (the paper's order);
``VariantResults.metrics`` and ``ReportInputs.baselines`` use their keys."""

REPORT_KEYS: tuple[str, ...] = tuple(row.key for row in REPORT_ROWS)


# ---------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class RetrievalExample:
    """One text query and the images the model ranked highest for it (best first);
    ``correct[i]`` says whether ``image_paths[i]`` is the query's own image."""

    query: str
    image_paths: Sequence[Path]
    correct: Sequence[bool]


@dataclass(frozen=True)
class Figure:
    """A picture file (PNG, JPEG, ...) and its caption, e.g. a :func:`codis.report.gradcam.gradcam_figure`."""

    caption: str
    path: Path


@dataclass
class VariantResults:
    """What one pretrained model variant (a :data:`codis.config.MODES` entry) produced.

    ``loss_curve``: pretraining ``(step, {loss name: value})`` records, e.g. ``{"loss": 9.1,
    "ica": 3.2, "itm": 0.6, "mlm": 5.1, "code": 0.2}``. ``metrics``: ``{report key: {metric:
    percent}}`` with the keys of :data:`REPORT_ROWS` (retrieval: txt_r1 ... img_r10, r_mean; vqa,
    nlvr, ve: accuracy); a task missing here was not run. ``codebook``: ``{feature source, e.g.
    "image" / "text": codis.metrics.codebook_usage(...)}`` or None (no codebook, or not measured).
    ``itm_auc``: the ITM AUC against random negatives (0 to 1) of :mod:`codis.report.analysis`,
    or None (not measured). The last four fields are what :func:`codis.report.analysis.read_analysis`
    returns.
    """

    loss_curve: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    codebook: dict[str, dict[str, Any]] | None = None
    retrieval_examples: list[RetrievalExample] = field(default_factory=list)
    gradcam_figures: list[Figure] = field(default_factory=list)
    itm_auc: float | None = None


@dataclass(frozen=True)
class TrivialBaseline:
    """A data-only reference score: ``name`` (e.g. "chance", "majority answer"), the ``split`` it
    was computed on, and its metrics (percent, same keys as the task's). ``items``: how many
    items each metric is a proportion of, where known (the split's questions or examples; for
    retrieval the queries: images for txt_r*, captions for img_r*), which sets how far from the
    baseline a score is still noise."""

    name: str
    split: str
    metrics: dict[str, float]
    items: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class MachineInfo:
    """Where the run happened."""

    platform: str
    cpu_count: int
    torch_version: str
    device: str
    python_version: str = platform.python_version()

    @classmethod
    def current(cls, device: str | torch.device = "cpu") -> "MachineInfo":
        """This machine, with the device the run used (``"cpu"``, ``"cuda:0"``, ...)."""
        name = str(device)
        if str(device).startswith("cuda") and torch.cuda.is_available():
            name = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
        return cls(platform=platform.platform(), cpu_count=os.cpu_count() or 0,
                   torch_version=torch.__version__, device=name)


@dataclass(frozen=True)
class StageTime:
    """One stage of the run, a row of the report's wall-time table: its ``label`` (e.g.
    "pretrain[codis]"), the ``seconds`` it took when it was computed, and whether this run
    ``reused`` it (found it done in the store, so it took no time in this run)."""

    label: str
    seconds: float
    reused: bool = False

    @property
    def seconds_this_run(self) -> float:
        return 0.0 if self.reused else self.seconds


@dataclass(frozen=True)
class RunScale:
    """How the run departs from its recipe: ``steps_scale`` multiplies every training step count
    (``--steps-scale``), ``overrides`` are its ``dotted.path=value`` changes (``--set``).
    ``world_size``: the processes that pretrained; ``recipe_file``: the recipe's file, if known."""

    steps_scale: float = 1.0
    overrides: Sequence[str] = ()
    world_size: int = 1
    recipe_file: str | None = None

    @property
    def changed(self) -> bool:
        """Whether the run is not the recipe as written."""
        return self.steps_scale != 1.0 or bool(self.overrides)


@dataclass
class ReportInputs:
    """Everything ``codis.report.build_report`` needs.

    ``variants``: ``{name: VariantResults}``; the names "codis" and "albef" are compared with the
    paper's CODIS and ALBEF rows, names of other modes (``albef_intra``, ``codis_cross``,
    ``codis_student``) with the paper's objective ablation. ``baselines``: ``{report key: [trivial
    baselines]}`` (see ``trivial_baselines`` for the demo world's manifest). ``recipe``: the
    recipe's name. ``wall_times``: every stage of the run, in stage order; ``run_seconds``: the
    run's wall time up to the report (None: not measured; the table then totals its stages).
    ``scale``: how the run departs from its recipe. ``dataset`` / ``preset`` / ``split`` describe
    what the measured numbers are on.
    """

    variants: dict[str, VariantResults]
    recipe: str
    machine: MachineInfo
    baselines: dict[str, list[TrivialBaseline]] = field(default_factory=dict)
    wall_times: Sequence[StageTime] = ()
    run_seconds: float | None = None
    scale: RunScale = RunScale()
    dataset: str = "the demo world (a generated toy dataset)"
    preset: str = "tiny"
    split: str = "test"


def _retrieval_items(retrieval: dict[str, Any]) -> dict[str, int]:
    """The queries behind each recall: an image per text-retrieval query (txt_r*), a caption per
    image-retrieval query (img_r*). r_mean mixes both; it gets the images, the fewer of the two,
    so that its noise is not understated."""
    if "images" not in retrieval or "captions" not in retrieval:
        return {}
    images, captions = int(retrieval["images"]), int(retrieval["captions"])
    return {metric: captions if metric.startswith("img_") else images for metric in RETRIEVAL_METRICS}


def _items(count: Any, metric: str) -> dict[str, int]:
    return {} if count is None else {metric: int(count)}


def trivial_baselines(manifest: dict[str, Any]) -> dict[str, list[TrivialBaseline]]:
    """The demo world manifest's ``baselines`` (``codis.data.demo_world.generate_demo_world``) as
    ``ReportInputs.baselines``: chance retrieval, the majority / question-type-prior VQA answer, and
    the majority NLVR2 / SNLI-VE label, each with the split's item counts where the manifest has
    them."""
    if "baselines" not in manifest:
        raise ValueError("manifest: has no 'baselines' (not a demo world manifest?)")
    found = manifest["baselines"]
    out: dict[str, list[TrivialBaseline]] = {}
    if "retrieval_test" in found:
        retrieval = found["retrieval_test"]
        chance = {k: float(v) for k, v in retrieval.items() if k in RETRIEVAL_METRICS}
        items = {k: n for k, n in _retrieval_items(retrieval).items() if k in chance}
        for key in ("retrieval_zero_shot", "retrieval_finetuned"):
            out[key] = [TrivialBaseline("chance (random ranking)", "test", chance, items)]
    if "vqa_val" in found:
        vqa = found["vqa_val"]
        items = _items(vqa.get("questions"), "accuracy")
        out["vqa"] = [TrivialBaseline(f"majority answer ({vqa['majority_answer']!r})", "val",
                                      {"accuracy": float(vqa["majority_accuracy"])}, items),
                      TrivialBaseline("question-type prior", "val",
                                      {"accuracy": float(vqa["question_type_prior_accuracy"])}, items)]
    for task in ("nlvr", "ve"):
        test = found.get(task, {}).get("test")
        if test is not None:
            out[task] = [TrivialBaseline(f"majority label ({test['majority_label']})", "test",
                                         {"accuracy": float(test["accuracy"])},
                                         _items(test.get("rows"), "accuracy"))]
    return out


def _seconds(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


_CODEBOOK_FIELDS = frozenset({"codewords", "samples", "used", "entropy", "perplexity", "histogram"})


def check_report_inputs(inputs: ReportInputs) -> None:
    """Every problem with ``inputs`` as an error naming the field, before anything is drawn."""
    if not isinstance(inputs, ReportInputs):
        raise TypeError(f"results: expected ReportInputs, got {type(inputs).__name__}")
    if not isinstance(inputs.machine, MachineInfo):
        raise TypeError("results.machine: expected a MachineInfo (MachineInfo.current(device))")
    known = ", ".join(REPORT_KEYS)
    for key in inputs.baselines:
        if key not in REPORT_KEYS:
            raise ValueError(f"results.baselines[{key!r}]: unknown report key (known: {known})")
    for i, stage in enumerate(inputs.wall_times):
        if not isinstance(stage, StageTime):
            raise TypeError(f"results.wall_times[{i}]: expected a StageTime, got {type(stage).__name__}")
        if not _seconds(stage.seconds):
            raise ValueError(f"results.wall_times[{i}] ({stage.label}): seconds must be a finite "
                             f"number >= 0, got {stage.seconds!r}")
    if inputs.run_seconds is not None and not _seconds(inputs.run_seconds):
        raise ValueError(f"results.run_seconds: must be None or a finite number >= 0, "
                         f"got {inputs.run_seconds!r}")
    scale = inputs.scale
    if not isinstance(scale, RunScale):
        raise TypeError(f"results.scale: expected a RunScale, got {type(scale).__name__}")
    if not (isinstance(scale.steps_scale, (int, float)) and scale.steps_scale > 0):
        raise ValueError(f"results.scale.steps_scale: must be a number > 0, got {scale.steps_scale!r}")
    if not (isinstance(scale.world_size, int) and scale.world_size >= 1):
        raise ValueError(f"results.scale.world_size: must be an integer >= 1, got {scale.world_size!r}")
    for key, baselines in inputs.baselines.items():
        for i, baseline in enumerate(baselines):
            for metric, count in baseline.items.items():
                if not (isinstance(count, int) and count >= 1):
                    raise ValueError(f"results.baselines[{key!r}][{i}].items[{metric!r}]: must be "
                                     f"an item count >= 1, got {count!r}")
    for name, variant in inputs.variants.items():
        where = f"results.variants[{name!r}]"
        if not isinstance(variant, VariantResults):
            raise TypeError(f"{where}: expected VariantResults, got {type(variant).__name__}")
        for key, metrics in variant.metrics.items():
            if key not in REPORT_KEYS:
                raise ValueError(f"{where}.metrics[{key!r}]: unknown report key (known: {known})")
            for metric, value in metrics.items():
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"{where}.metrics[{key!r}][{metric!r}]: not a finite number: {value!r}")
        for i, record in enumerate(variant.loss_curve):
            if (not isinstance(record, (tuple, list)) or len(record) != 2
                    or not isinstance(record[1], dict)):
                raise ValueError(f"{where}.loss_curve[{i}]: expected (step, {{name: value}}), got {record!r}")
        for source, usage in (variant.codebook or {}).items():
            missing = _CODEBOOK_FIELDS - set(usage)
            if missing:
                raise ValueError(f"{where}.codebook[{source!r}]: missing {', '.join(sorted(missing))} "
                                 "(use codis.metrics.codebook_usage())")
        if variant.itm_auc is not None and not (isinstance(variant.itm_auc, (int, float))
                                                and 0.0 <= variant.itm_auc <= 1.0):
            raise ValueError(f"{where}.itm_auc: must be None or a number in [0, 1], got {variant.itm_auc!r}")
        for i, example in enumerate(variant.retrieval_examples):
            if len(example.image_paths) != len(example.correct) or not example.image_paths:
                raise ValueError(f"{where}.retrieval_examples[{i}]: needs as many 'correct' flags "
                                 f"as image_paths, at least one")
            for j, path in enumerate(example.image_paths):
                if not Path(path).is_file():
                    raise FileNotFoundError(f"{where}.retrieval_examples[{i}].image_paths[{j}]: "
                                            f"no file at {path}")
        for i, figure in enumerate(variant.gradcam_figures):
            if not Path(figure.path).is_file():
                raise FileNotFoundError(f"{where}.gradcam_figures[{i}]: no file at {figure.path}")
