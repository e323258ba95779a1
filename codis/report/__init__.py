"""The reproduction report: this run's numbers beside the paper's, as Markdown and as one HTML file.

:func:`build_report` takes a :class:`ReportInputs` (everything a finished run measured) and writes
``report.md`` (figures as PNG files in ``report_files/``) and ``report.html`` (self-contained:
figures embedded as base64 PNG data URIs, inline CSS, no scripts). A task, a metric or a figure
that the run did not produce is shown as "not run", never left out, so a partial run reads as one.

The package: :mod:`~codis.report.inputs` (what a report is built from, and its rows),
:mod:`~codis.report.charts` (matplotlib), :mod:`~codis.report.document` (sections, Markdown and
HTML), :mod:`~codis.report.sections` (what the report says), :mod:`~codis.report.paper` (the
paper's tables), :mod:`~codis.report.analysis` and :mod:`~codis.report.gradcam` (the qualitative
analysis of a checkpoint).
"""

from __future__ import annotations

from pathlib import Path

from codis.files import atomic_write_bytes, atomic_write_text
from codis.report.document import NOT_RUN, pictures, render_html, render_markdown
from codis.report.inputs import (REPORT_ROWS, Figure, MachineInfo, ReportInputs, ReportRow,
                                 RetrievalExample, TrivialBaseline, VariantResults,
                                 check_report_inputs, trivial_baselines)
from codis.report.sections import report_sections

__all__ = [
    "NOT_RUN", "REPORT_ROWS", "Figure", "MachineInfo", "ReportInputs", "ReportRow",
    "RetrievalExample", "TrivialBaseline", "VariantResults", "build_report", "trivial_baselines",
]

FILES_DIR = "report_files"


def build_report(results: ReportInputs, output_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md`` (+ its figures in ``report_files/``) and the self-contained
    ``report.html`` under ``output_dir``; returns ``{"markdown": path, "html": path}``.
    ``results`` is checked whole before anything is written."""
    check_report_inputs(results)
    sections = report_sections(results)
    output_dir = Path(output_dir)
    files_dir = output_dir / FILES_DIR
    files_dir.mkdir(parents=True, exist_ok=True)
    for picture in pictures(sections):
        atomic_write_bytes(files_dir / picture.name, picture.png)
    markdown = output_dir / "report.md"
    atomic_write_text(markdown, render_markdown(sections, FILES_DIR))
    page = output_dir / "report.html"
    atomic_write_text(page, render_html(sections, f"CODIS reproduction report: {results.recipe}"))
    return {"markdown": markdown, "html": page}
