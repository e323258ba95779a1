"""The reproduction report: this run's numbers beside the paper's, as Markdown and as one HTML file.

:func:`build_report` takes a :class:`ReportInputs` (everything a finished run measured) and writes
``report.md`` (figures as PNG files in ``report_files/``) and ``report.html`` (self-contained:
figures embedded as base64 PNG data URIs, inline CSS, no scripts). A task, a metric or a figure
that the run did not produce is shown as "not run", never left out, so a partial run reads as one.

:func:`codebook_usage` summarises codeword assignments (how many codewords are used, how evenly).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, ImageDraw, ImageFont

from codis.report import paper
from codis.config import MODES, ModelConfig
from codis.files import atomic_write_bytes, atomic_write_text
from codis.metrics import codebook_usage

NOT_RUN = "not run"

PlotBackend = Literal["auto", "matplotlib", "pillow"]


# ---------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class TaskSpec:
    """A downstream task as the report lists it: its key in ``VariantResults.metrics``, its
    title, its metrics (percent), and where the paper reports it: ``(table, group, metric, label)``
    with ``metric=None`` meaning "the same name as ours"."""

    key: str
    title: str
    metrics: tuple[str, ...]
    paper_refs: tuple[tuple[paper.PaperTable, str, str | None, str], ...]

    def paper_metric(self, ref: tuple[paper.PaperTable, str, str | None, str], metric: str) -> str:
        return ref[2] if ref[2] is not None else metric


_RETRIEVAL_METRICS = (*paper.RETRIEVAL_METRICS, "r_mean")

TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("retrieval_zero_shot", "Zero-shot image-text retrieval", _RETRIEVAL_METRICS,
             ((paper.ZERO_SHOT_RETRIEVAL, "coco", None, "MSCOCO 5K"),
              (paper.ZERO_SHOT_RETRIEVAL, "flickr", None, "Flickr30K 1K"))),
    TaskSpec("retrieval_finetuned", "Finetuned image-text retrieval", _RETRIEVAL_METRICS,
             ((paper.FINETUNED_RETRIEVAL, "coco", None, "MSCOCO 5K"),
              (paper.FINETUNED_RETRIEVAL, "flickr", None, "Flickr30K 1K"))),
    TaskSpec("vqa", "VQA", ("accuracy",),
             ((paper.UNDERSTANDING, "vqa", "test_dev", "test-dev"),
              (paper.UNDERSTANDING, "vqa", "test_std", "test-std"))),
    TaskSpec("nlvr", "NLVR2", ("accuracy",),
             ((paper.UNDERSTANDING, "nlvr", "dev", "dev"),
              (paper.UNDERSTANDING, "nlvr", "test_p", "test-P"))),
    TaskSpec("ve", "SNLI-VE", ("accuracy",),
             ((paper.UNDERSTANDING, "ve", "val", "val"),
              (paper.UNDERSTANDING, "ve", "test", "test"))),
)
"""The tasks of the paper, in its order; ``ReportInputs`` metrics use these keys."""

_TASK_KEYS = tuple(task.key for task in TASKS)


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
    "ica": 3.2, "itm": 0.6, "mlm": 5.1, "code": 0.2}``. ``metrics``: ``{task key: {metric:
    percent}}`` with the keys of :data:`TASKS` (retrieval: txt_r1 ... img_r10, r_mean; vqa, nlvr,
    ve: accuracy); a task missing here was not run. ``codebook``: ``{feature source, e.g.
    "image" / "text": codebook_usage(...)}`` or None (no codebook, or not measured).
    """

    loss_curve: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    codebook: dict[str, dict[str, Any]] | None = None
    retrieval_examples: list[RetrievalExample] = field(default_factory=list)
    gradcam_figures: list[Figure] = field(default_factory=list)


@dataclass(frozen=True)
class TrivialBaseline:
    """A data-only reference score: ``name`` (e.g. "chance", "majority answer"), the ``split`` it
    was computed on, and its metrics (percent, same keys as the task's)."""

    name: str
    split: str
    metrics: dict[str, float]


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


@dataclass
class ReportInputs:
    """Everything :func:`build_report` needs.

    ``variants``: ``{name: VariantResults}``; the names "codis" and "albef" are compared with the
    paper's CODIS and ALBEF rows, names of other modes (``albef_intra``, ``codis_cross``,
    ``codis_student``) with the paper's objective ablation. ``baselines``: ``{task key: [trivial
    baselines]}`` (see :func:`trivial_baselines` for the demo world's manifest). ``recipe``: the
    recipe's name. ``wall_times``: ``{stage: seconds}`` in stage order. ``dataset`` / ``preset`` /
    ``split`` describe what the measured numbers are on.
    """

    variants: dict[str, VariantResults]
    recipe: str
    machine: MachineInfo
    baselines: dict[str, list[TrivialBaseline]] = field(default_factory=dict)
    wall_times: dict[str, float] = field(default_factory=dict)
    dataset: str = "the demo world (a generated toy dataset)"
    preset: str = "tiny"
    split: str = "test"


def trivial_baselines(manifest: dict[str, Any]) -> dict[str, list[TrivialBaseline]]:
    """The demo world manifest's ``baselines`` (:func:`codis.data.demo_world.generate_demo_world`) as
    ``ReportInputs.baselines``: chance retrieval, the majority / question-type-prior VQA answer, and
    the majority NLVR2 / SNLI-VE label."""
    if "baselines" not in manifest:
        raise ValueError("manifest: has no 'baselines' (not a demo world manifest?)")
    found = manifest["baselines"]
    out: dict[str, list[TrivialBaseline]] = {}
    if "retrieval_test" in found:
        chance = {k: float(v) for k, v in found["retrieval_test"].items() if k in _RETRIEVAL_METRICS}
        for key in ("retrieval_zero_shot", "retrieval_finetuned"):
            out[key] = [TrivialBaseline("chance (random ranking)", "test", chance)]
    if "vqa_val" in found:
        vqa = found["vqa_val"]
        out["vqa"] = [TrivialBaseline(f"majority answer ({vqa['majority_answer']!r})", "val",
                                      {"accuracy": float(vqa["majority_accuracy"])}),
                      TrivialBaseline("question-type prior", "val",
                                      {"accuracy": float(vqa["question_type_prior_accuracy"])})]
    for task in ("nlvr", "ve"):
        test = found.get(task, {}).get("test")
        if test is not None:
            out[task] = [TrivialBaseline(f"majority label ({test['majority_label']})", "test",
                                         {"accuracy": float(test["accuracy"])})]
    return out


# ---------------------------------------------------------------------------------- codebook


# ---------------------------------------------------------------------------------- charts

_PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
            (140, 86, 75))


def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: PlotBackend) -> str:
    if backend not in ("auto", "matplotlib", "pillow"):
        raise ValueError(f"plot_backend: must be 'auto', 'matplotlib' or 'pillow', got {backend!r}")
    if backend == "auto":
        return "matplotlib" if _matplotlib_available() else "pillow"
    return backend


def _matplotlib_chart(series: dict[str, list[tuple[float, float]]], title: str, kind: str,
                      size: tuple[int, int]) -> Image.Image:
    # The object API with the Agg canvas: no pyplot state, no display backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    figure = MplFigure(figsize=(size[0] / 100, size[1] / 100), dpi=100)
    axes = figure.add_subplot()
    for i, (name, points) in enumerate(series.items()):
        colour = tuple(c / 255 for c in _PALETTE[i % len(_PALETTE)])
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        if kind == "bar":
            axes.bar(xs, ys, width=1.0, color=colour, label=name)
        else:
            axes.plot(xs, ys, color=colour, label=name, linewidth=1.2)
    axes.set_title(title, fontsize=9)
    axes.tick_params(labelsize=7)
    axes.grid(alpha=0.3)
    if len(series) > 1:
        axes.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer, metadata={"Software": None})
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _pillow_chart(series: dict[str, list[tuple[float, float]]], title: str, kind: str,
                  size: tuple[int, int]) -> Image.Image:
    """A plain line / bar chart: axes box, min and max labels, one colour per series."""
    width, height = size
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    left, right, top, bottom = 48, width - 10, 22, height - 24
    draw.text((left, 4), title, fill="black", font=font)
    draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    points = [p for values in series.values() for p in values]
    if not points:
        draw.text((left + 8, top + 8), "no data", fill="black", font=font)
        return canvas
    x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
    y_low, y_high = min(p[1] for p in points), max(p[1] for p in points)
    x_first, x_last = x_low, x_high  # labels show the data's range, not the bars' padding
    if kind == "bar":
        y_low, x_low, x_high = min(0.0, y_low), x_low - 0.5, x_high + 0.5
    x_span, y_span = (x_high - x_low) or 1.0, (y_high - y_low) or 1.0

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_low) / x_span * (right - left),
                bottom - (y - y_low) / y_span * (bottom - top))

    for i, (name, values) in enumerate(series.items()):
        colour = _PALETTE[i % len(_PALETTE)]
        if kind == "bar":
            for x, y in values:
                x0, y0 = at(x - 0.45, y)
                x1, y1 = at(x + 0.45, y_low)
                draw.rectangle((x0, y0, max(x0, x1), y1), fill=colour)
        elif len(values) == 1:
            x, y = at(*values[0])
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        else:
            draw.line([at(x, y) for x, y in values], fill=colour, width=2)
        if len(series) > 1:
            draw.text((right - 90, top + 4 + 12 * i), name, fill=colour, font=font)
    draw.text((2, top), f"{y_high:.3g}", fill="black", font=font)
    draw.text((2, bottom - 10), f"{y_low:.3g}", fill="black", font=font)
    draw.text((left, bottom + 6), f"{x_first:.6g}", fill="black", font=font)
    draw.text((right - 40, bottom + 6), f"{x_last:.6g}", fill="black", font=font)
    return canvas


def chart(series: dict[str, list[tuple[float, float]]], title: str, kind: Literal["line", "bar"] = "line",
          backend: PlotBackend = "auto", size: tuple[int, int] = (380, 250)) -> Image.Image:
    """A line or bar chart of named ``(x, y)`` series, drawn by matplotlib (Agg) when it is
    importable (``backend="auto"``) or else by Pillow."""
    if kind not in ("line", "bar"):
        raise ValueError(f"kind: must be 'line' or 'bar', got {kind!r}")
    draw = _matplotlib_chart if _resolve_backend(backend) == "matplotlib" else _pillow_chart
    return draw(series, title, kind, size)


def _grid(images: Sequence[Image.Image], columns: int = 3) -> Image.Image:
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images)
    rows = math.ceil(len(images) / columns)
    columns = min(columns, len(images))
    canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    for i, image in enumerate(images):
        canvas.paste(image, ((i % columns) * cell_w, (i // columns) * cell_h))
    return canvas


def _loss_order(name: str) -> tuple[int, str]:
    main = ("loss", "ica", "itm", "mlm", "code")
    return (main.index(name), "") if name in main else (len(main), name)


def loss_curve_figure(variants: dict[str, VariantResults], backend: PlotBackend = "auto",
                      ) -> Image.Image | None:
    """One panel per loss name, one line per variant; None when no variant logged a loss."""
    names = sorted({name for v in variants.values() for _, losses in v.loss_curve for name in losses},
                   key=_loss_order)
    if not names:
        return None
    panels = []
    for name in names:
        series = {variant: [(step, losses[name]) for step, losses in v.loss_curve if name in losses]
                  for variant, v in variants.items()}
        panels.append(chart({k: s for k, s in series.items() if s}, name, "line", backend))
    return _grid(panels)


# ---------------------------------------------------------------------------------- document model


@dataclass
class _Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class _Picture:
    png: bytes
    name: str  # file name under report_files/
    alt: str


@dataclass
class _Heading:
    text: str


_Block = str | _Table | _Picture | _Heading  # a str is a paragraph


@dataclass
class _Section:
    title: str
    blocks: list[_Block]
    level: int = 2


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "x"


def _sign(delta: float) -> str:
    return "+" if delta > 0 else ("-" if delta < 0 else "=")


# ---------------------------------------------------------------------------------- sections


def _intro(inputs: ReportInputs) -> _Section:
    return _Section(f"CODIS reproduction report: recipe {inputs.recipe}", [
        f"Measured numbers: {inputs.dataset}, '{inputs.split}' split, model preset "
        f"'{inputs.preset}', variants: {', '.join(inputs.variants) or 'none'}.",
        "Read this first: the demo world is a generated toy dataset and the model runs at a tiny "
        "preset, so the absolute numbers below are not comparable with the paper's (MSCOCO, "
        "Flickr30K, VQA v2, NLVR2 and SNLI-VE at ViT-B/16 + BERT-base scale). What is comparable "
        "is the direction: whether CODIS beats ALBEF on a task, as it does in the paper.",
    ], level=1)


def _baseline_cell(inputs: ReportInputs, task: TaskSpec, metric: str) -> str:
    found = [f"{_fmt(b.metrics[metric])} ({b.name}, {b.split})"
             for b in inputs.baselines.get(task.key, []) if metric in b.metrics]
    return "; ".join(found) if found else NOT_RUN


def _measured(inputs: ReportInputs, variant: str, task: str, metric: str) -> str:
    metrics = inputs.variants[variant].metrics
    if task not in metrics:
        return NOT_RUN
    return _fmt(metrics[task][metric]) if metric in metrics[task] else "not reported"


def _summary(inputs: ReportInputs) -> _Section:
    headers = ["Task", "Metric (%)", *inputs.variants, "Trivial baseline"]
    rows = []
    for task in TASKS:
        for metric in task.metrics:
            rows.append([task.title, metric,
                         *(_measured(inputs, v, task.key, metric) for v in inputs.variants),
                         _baseline_cell(inputs, task, metric)])
    return _Section("Summary: this run", [
        f"Every task on the demo '{inputs.split}' split (percent). \"{NOT_RUN}\" marks a task "
        "this run did not evaluate.", _Table(headers, rows)])


def _direction(inputs: ReportInputs) -> _Section:
    blocks: list[_Block] = [
        "Sign of CODIS - ALBEF per metric: in the paper (one sign per dataset / split) and in "
        "this run. \"agrees\" when this run's sign matches every paper sign."]
    have = [v for v in ("codis", "albef") if v in inputs.variants]
    if len(have) < 2:
        missing = sorted({"codis", "albef"} - set(have))
        blocks.append(f"CODIS vs ALBEF: {NOT_RUN} (no results for variant {', '.join(missing)}).")
    rows = []
    for task in TASKS:
        for metric in task.metrics:
            paper_parts, paper_signs = [], []
            for ref in task.paper_refs:
                table, group, _, label = ref
                try:
                    albef = table.value(paper.ALBEF, group, task.paper_metric(ref, metric))
                    codis = table.value(paper.CODIS, group, task.paper_metric(ref, metric))
                except KeyError:  # e.g. r_mean, which the paper does not report
                    continue
                if albef is not None and codis is not None:
                    paper_parts.append(f"{label}: {table.format(albef)} -> {table.format(codis)} "
                                       f"({codis - albef:+.2f})")
                    paper_signs.append(_sign(codis - albef))
            ours = [inputs.variants[v].metrics.get(task.key, {}).get(metric) for v in ("codis", "albef")
                    if v in inputs.variants]
            if len(have) == 2 and all(x is not None for x in ours):
                delta = ours[0] - ours[1]
                measured = f"{_fmt(ours[1])} -> {_fmt(ours[0])} ({delta:+.2f})"
                if not paper_signs:
                    verdict = "no paper value"
                elif all(s == _sign(delta) for s in paper_signs):
                    verdict = "agrees"
                elif any(s == _sign(delta) for s in paper_signs):
                    verdict = "partly"
                else:
                    verdict = "disagrees"
            else:
                measured, verdict = NOT_RUN, NOT_RUN
            rows.append([task.title, metric, "; ".join(paper_parts) or "-", measured, verdict])
    blocks.append(_Table(["Task", "Metric", "Paper: ALBEF 4M -> CODIS", "This run: albef -> codis",
                          "Direction"], rows))
    return _Section("CODIS vs ALBEF: direction, paper and this run", blocks)


def _beside(inputs: ReportInputs) -> _Section:
    blocks: list[_Block] = [
        "The paper's ALBEF 4M and CODIS rows next to this run's numbers on the same metric. Paper: "
        "real benchmarks, 4M pretraining images, base-size model. This run: "
        f"{inputs.dataset}, preset '{inputs.preset}'. Compare directions, not values."]
    for task in TASKS:
        rows = []
        for ref in task.paper_refs:
            table, group, _, label = ref
            for method in (paper.ALBEF, paper.CODIS):
                cells = []
                for metric in task.metrics:
                    try:
                        cells.append(table.format(table.value(method, group, task.paper_metric(ref, metric))))
                    except KeyError:
                        cells.append("-")
                rows.append(["paper", method, label, *cells])
        for variant in inputs.variants:
            rows.append(["this run", variant, f"demo {inputs.split}",
                         *(_measured(inputs, variant, task.key, m) for m in task.metrics)])
        for baseline in inputs.baselines.get(task.key, []):
            rows.append(["trivial", baseline.name, f"demo {baseline.split}",
                         *(_fmt(baseline.metrics[m]) if m in baseline.metrics else "-"
                           for m in task.metrics)])
        blocks += [_Heading(task.title), _Table(["Source", "Model", "Data", *task.metrics], rows)]
    return _Section("The paper's numbers beside this run's", blocks)


def _ablation(inputs: ReportInputs) -> _Section:
    table = paper.ABLATION_OBJECTIVES
    metrics = paper.RETRIEVAL_METRICS
    rows = []
    for row in table.rows:
        rows.append(["paper, MSCOCO 5K", row.method, str(row.mode),
                     *(table.format(v) for v in table.group(row.method, "coco").values())])
    for row in table.rows:
        if row.mode in inputs.variants:
            rows.append([f"this run, demo {inputs.split}", row.method, str(row.mode),
                         *(_measured(inputs, row.mode, "retrieval_zero_shot", m) for m in metrics)])
        else:
            rows.append([f"this run, demo {inputs.split}", row.method, str(row.mode),
                         *([NOT_RUN] * len(metrics))])
    return _Section("Objective ablation (zero-shot retrieval)", [
        "The paper's objective rows and the project mode that reproduces each; this run's rows "
        "are its variants of those modes.", _Table(["Source", "Objectives", "Mode", *metrics], rows)])


def _losses(inputs: ReportInputs, backend: PlotBackend) -> _Section:
    figure = loss_curve_figure(inputs.variants, backend)
    if figure is None:
        return _Section("Pretraining loss curves", [f"Pretraining losses: {NOT_RUN}."])
    missing = [v for v, r in inputs.variants.items() if not r.loss_curve]
    blocks: list[_Block] = [
        "Training loss per logged step, one panel per loss term, one line per variant.",
        _Picture(_png_bytes(figure), "loss_curves.png", "pretraining loss curves")]
    if missing:
        blocks.append(f"No loss curve ({NOT_RUN}): {', '.join(missing)}.")
    return _Section("Pretraining loss curves", blocks)


def _codebook(inputs: ReportInputs, backend: PlotBackend) -> _Section:
    blocks: list[_Block] = [
        "Codeword usage on the evaluation features: used = distinct argmax codewords, entropy = "
        "entropy of the mean assignment / log K (1 = all codewords equally used), perplexity = "
        "the effective number of codewords."]
    rows, pictures = [], []
    for variant, results in inputs.variants.items():
        histograms = []
        if results.codebook is None:
            has_codebook = variant not in MODES or ModelConfig(mode=variant).codebook_features != "off"
            note = NOT_RUN if has_codebook else "no codebook in this mode"
            rows.append([variant, "-", note, "-", "-", "-", "-"])
            continue
        for source, usage in results.codebook.items():
            rows.append([variant, source, str(usage["codewords"]), str(usage["samples"]),
                         str(usage["used"]), f"{usage['entropy']:.3f}", f"{usage['perplexity']:.1f}"])
            counts = sorted(usage["histogram"], reverse=True)
            histograms.append(chart({source: [(i, float(c)) for i, c in enumerate(counts)]},
                                    f"{variant} / {source}: samples per codeword, sorted", "bar",
                                    backend))
        if histograms:
            pictures.append(_Picture(_png_bytes(_grid(histograms)), f"codebook_{_slug(variant)}.png",
                                     f"codebook usage histograms of {variant}"))
    blocks.append(_Table(["Variant", "Features", "Codewords (K)", "Samples", "Used",
                          "Entropy (norm.)", "Perplexity"], rows))
    return _Section("Codebook usage", blocks + pictures)


def _thumbnail_strip(example: RetrievalExample, size: int = 96) -> Image.Image:
    """The retrieved images side by side, framed green (correct) or red, with their rank."""
    font = ImageFont.load_default()
    border, label = 4, 14
    strip = Image.new("RGB", (len(example.image_paths) * (size + 2 * border + 4), size + 2 * border + label),
                      "white")
    draw = ImageDraw.Draw(strip)
    for rank, (path, correct) in enumerate(zip(example.image_paths, example.correct), start=1):
        with Image.open(path) as source:
            thumb = source.convert("RGB").resize((size, size), Image.BICUBIC)
        x = (rank - 1) * (size + 2 * border + 4)
        draw.rectangle((x, 0, x + size + 2 * border - 1, size + 2 * border - 1),
                       fill=(40, 160, 60) if correct else (200, 40, 40))
        strip.paste(thumb, (x + border, border))
        draw.text((x + border, size + 2 * border + 1), f"#{rank} {'match' if correct else 'wrong'}",
                  fill="black", font=font)
    return strip


def _retrieval_examples(inputs: ReportInputs) -> _Section:
    blocks: list[_Block] = [
        "Text-to-image retrieval on the demo test split: each query's top-k images by ITC "
        "similarity (no ITM re-ranking), best first; a green frame is the query's own image, red a wrong one."]
    for variant, results in inputs.variants.items():
        if not results.retrieval_examples:
            blocks.append(f"{variant}: {NOT_RUN}.")
            continue
        for i, example in enumerate(results.retrieval_examples):
            hit = "hit@1" if example.correct and example.correct[0] else "miss@1"
            blocks.append(f"{variant}, query {i + 1} ({hit}): \"{example.query}\"")
            blocks.append(_Picture(_png_bytes(_thumbnail_strip(example)),
                                   f"retrieval_{_slug(variant)}_{i + 1}.png",
                                   f"top images for {example.query}"))
    return _Section("Retrieval examples", blocks)


def _gradcam(inputs: ReportInputs) -> _Section:
    blocks: list[_Block] = [
        "Word-level Grad-CAM on the fusion encoder's cross-attention (codis.report.gradcam, as the "
        "paper's and ALBEF's qualitative figures): where each word of the caption looks."]
    for variant, results in inputs.variants.items():
        if not results.gradcam_figures:
            blocks.append(f"{variant}: {NOT_RUN}.")
            continue
        for i, figure in enumerate(results.gradcam_figures):
            with Image.open(figure.path) as source:
                png = _png_bytes(source.convert("RGB"))
            blocks += [f"{variant}: {figure.caption}",
                       _Picture(png, f"gradcam_{_slug(variant)}_{i + 1}.png", figure.caption)]
    return _Section("Grad-CAM", blocks)


def _paper_tables() -> _Section:
    blocks: list[_Block] = [
        "As published (percent; \"-\": not reported). \"CODIS\" is the paper's \"Ours\"."]
    for table in paper.TABLES:
        headers = ["Method", *(f"{group} {metric}" for group, metric in table.columns)]
        rows = [[row.method, *(table.format(v) for v in row.values)] for row in table.rows]
        blocks += [_Heading(table.title)]
        if table.note:
            blocks.append(table.note)
        blocks.append(_Table(headers, rows))
    return _Section("The paper's tables", blocks)


def _environment(inputs: ReportInputs) -> _Section:
    machine = inputs.machine
    info = _Table(["Item", "Value"], [
        ["recipe", inputs.recipe], ["platform", machine.platform], ["CPUs", str(machine.cpu_count)],
        ["Python", machine.python_version], ["torch", machine.torch_version], ["device", machine.device]])
    if inputs.wall_times:
        rows = [[stage, f"{seconds:.1f}", _clock(seconds)] for stage, seconds in inputs.wall_times.items()]
        total = sum(inputs.wall_times.values())
        rows.append(["total", f"{total:.1f}", _clock(total)])
        times: str | _Table = _Table(["Stage", "Seconds", "h:mm:ss"], rows)
    else:
        times = f"Wall times: {NOT_RUN}."
    return _Section("Machine and wall times", [info, times])


def _clock(seconds: float) -> str:
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


# ---------------------------------------------------------------------------------- rendering


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _render_markdown(sections: Sequence[_Section], files_dir: str) -> str:
    out: list[str] = []
    for section in sections:
        out += ["#" * section.level + " " + section.title, ""]
        for block in section.blocks:
            if isinstance(block, _Table):
                out.append("| " + " | ".join(_md_cell(h) for h in block.headers) + " |")
                out.append("|" + "---|" * len(block.headers))
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            elif isinstance(block, _Picture):
                out.append(f"![{block.alt}]({files_dir}/{block.name})")
            elif isinstance(block, _Heading):
                out.append("#" * (section.level + 1) + " " + block.text)
            else:
                out.append(block)
            out.append("")
    return "\n".join(out)


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1150px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #bbb; }
h3 { font-size: 1.02em; margin: 1.2em 0 .3em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .85em; }
th, td { border: 1px solid #ccc; padding: .25em .55em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
td.not-run { color: #a33; font-style: italic; }
img { max-width: 100%; display: block; margin: .4em 0 1em; }
"""


def _render_html(sections: Sequence[_Section], title: str) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"]
    for section in sections:
        level = section.level
        parts.append(f"<h{level}>{html.escape(section.title)}</h{level}>")
        for block in section.blocks:
            if isinstance(block, _Table):
                parts.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
                             + "</tr></thead><tbody>")
                for row in block.rows:
                    cells = "".join(
                        f'<td class="not-run">{html.escape(c)}</td>' if c == NOT_RUN
                        else f"<td>{html.escape(c)}</td>" for c in row)
                    parts.append(f"<tr>{cells}</tr>")
                parts.append("</tbody></table>")
            elif isinstance(block, _Picture):
                data = base64.b64encode(block.png).decode("ascii")
                parts.append(f'<img alt="{html.escape(block.alt)}" src="data:image/png;base64,{data}">')
            elif isinstance(block, _Heading):
                parts.append(f"<h{level + 1}>{html.escape(block.text)}</h{level + 1}>")
            else:
                parts.append(f"<p>{html.escape(block)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------- entry


def _check_inputs(inputs: ReportInputs) -> None:
    """Every problem with ``inputs`` as an error naming the field, before anything is drawn."""
    if not isinstance(inputs, ReportInputs):
        raise TypeError(f"results: expected ReportInputs, got {type(inputs).__name__}")
    if not isinstance(inputs.machine, MachineInfo):
        raise TypeError("results.machine: expected a MachineInfo (MachineInfo.current(device))")
    for task in inputs.baselines:
        if task not in _TASK_KEYS:
            raise ValueError(f"results.baselines[{task!r}]: unknown task (known: {', '.join(_TASK_KEYS)})")
    for stage, seconds in inputs.wall_times.items():
        if not isinstance(seconds, (int, float)) or seconds < 0:
            raise ValueError(f"results.wall_times[{stage!r}]: must be seconds >= 0, got {seconds!r}")
    for name, variant in inputs.variants.items():
        where = f"results.variants[{name!r}]"
        if not isinstance(variant, VariantResults):
            raise TypeError(f"{where}: expected VariantResults, got {type(variant).__name__}")
        for task, metrics in variant.metrics.items():
            if task not in _TASK_KEYS:
                raise ValueError(f"{where}.metrics[{task!r}]: unknown task (known: {', '.join(_TASK_KEYS)})")
            for metric, value in metrics.items():
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"{where}.metrics[{task!r}][{metric!r}]: not a finite number: {value!r}")
        for i, record in enumerate(variant.loss_curve):
            if (not isinstance(record, (tuple, list)) or len(record) != 2
                    or not isinstance(record[1], dict)):
                raise ValueError(f"{where}.loss_curve[{i}]: expected (step, {{name: value}}), got {record!r}")
        for source, usage in (variant.codebook or {}).items():
            missing = {"codewords", "samples", "used", "entropy", "perplexity", "histogram"} - set(usage)
            if missing:
                raise ValueError(f"{where}.codebook[{source!r}]: missing {', '.join(sorted(missing))} "
                                 "(use codebook_usage())")
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


def build_report(results: ReportInputs, output_dir: Path, plot_backend: PlotBackend = "auto",
                 ) -> dict[str, Path]:
    """Write ``report.md`` (+ its figures in ``report_files/``) and the self-contained
    ``report.html`` under ``output_dir``; returns ``{"markdown": path, "html": path}``."""
    _check_inputs(results)
    _resolve_backend(plot_backend)
    output_dir = Path(output_dir)
    sections = [_intro(results), _summary(results), _direction(results), _beside(results),
                _ablation(results), _losses(results, plot_backend), _codebook(results, plot_backend),
                _retrieval_examples(results), _gradcam(results), _paper_tables(),
                _environment(results)]

    files_dir = output_dir / "report_files"
    files_dir.mkdir(parents=True, exist_ok=True)
    for section in sections:
        for block in section.blocks:
            if isinstance(block, _Picture):
                atomic_write_bytes(files_dir / block.name, block.png)
    markdown = output_dir / "report.md"
    atomic_write_text(markdown, _render_markdown(sections, files_dir.name))
    page = output_dir / "report.html"
    atomic_write_text(page, _render_html(sections, f"CODIS reproduction report: {results.recipe}"))
    return {"markdown": markdown, "html": page}
