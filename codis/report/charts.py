"""The report's charts, drawn by matplotlib (the ``report`` extra) and returned as Pillow images."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Literal

from PIL import Image

from codis.report.inputs import VariantResults

PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75))
"""Series colours, in order (matplotlib's default cycle)."""

LOSS_ORDER: tuple[str, ...] = ("loss", "ica", "itm", "mlm", "code")
"""The pretraining losses in the order the loss-curve panels show them; others follow by name."""


def chart(series: Mapping[str, Sequence[tuple[float, float]]], title: str,
          kind: Literal["line", "bar"] = "line", size: tuple[int, int] = (380, 250)) -> Image.Image:
    """A line or bar chart of named ``(x, y)`` series, ``size`` pixels, one colour per series."""
    if kind not in ("line", "bar"):
        raise ValueError(f"kind: must be 'line' or 'bar', got {kind!r}")
    try:  # imported here so that the report's data classes work without the report extra
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure as MplFigure
    except ImportError as error:
        raise ImportError("codis.report.charts needs matplotlib: pip install 'codis-pipeline[report]'"
                          ) from error

    # The object API with the Agg canvas: no pyplot state, no display backend.
    figure = MplFigure(figsize=(size[0] / 100, size[1] / 100), dpi=100)
    axes = figure.add_subplot()
    for i, (name, points) in enumerate(series.items()):
        colour = tuple(c / 255 for c in PALETTE[i % len(PALETTE)])
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


def image_grid(images: Sequence[Image.Image], columns: int = 3) -> Image.Image:
    """The images in rows of ``columns``, each in a cell the size of the largest."""
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images)
    rows = math.ceil(len(images) / columns)
    columns = min(columns, len(images))
    canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    for i, image in enumerate(images):
        canvas.paste(image, ((i % columns) * cell_w, (i // columns) * cell_h))
    return canvas


def _loss_order(name: str) -> tuple[int, str]:
    return (LOSS_ORDER.index(name), "") if name in LOSS_ORDER else (len(LOSS_ORDER), name)


def loss_curve_figure(variants: Mapping[str, VariantResults]) -> Image.Image | None:
    """One panel per loss name, one line per variant; None when no variant logged a loss."""
    names = sorted({name for v in variants.values() for _, losses in v.loss_curve for name in losses},
                   key=_loss_order)
    if not names:
        return None
    panels = []
    for name in names:
        series = {variant: [(step, losses[name]) for step, losses in v.loss_curve if name in losses]
                  for variant, v in variants.items()}
        panels.append(chart({k: s for k, s in series.items() if s}, name, "line"))
    return image_grid(panels)


def codebook_histogram(histogram: Sequence[int], title: str, label: str) -> Image.Image:
    """Samples per codeword, most used first (a bar per codeword)."""
    counts = sorted(histogram, reverse=True)
    return chart({label: [(i, float(c)) for i, c in enumerate(counts)]}, title, "bar")
