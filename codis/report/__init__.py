"""The reproduction report: this run's numbers beside the paper's, as Markdown and as one HTML file.

``build_report`` takes a ``ReportInputs`` (everything a finished run measured) and writes
``report.md`` (figures as PNG files in ``report_files/``), ``report.html`` (self-contained:
figures embedded as base64 PNG data URIs, inline CSS, no scripts) and ``report_artifact.md``
(the Markdown for a Prefect artifact: lighter figures inlined as data URIs, wide tables split).
A task, a metric or a figure that the run did not produce is shown as "not run", never left out,
so a partial run reads as one.

The package: ``inputs`` (what a report is built from, and its rows), ``charts`` (matplotlib),
``document`` (sections, Markdown and HTML), ``sections`` (what the report says), ``paper`` (the
paper's tables), ``analysis`` and ``gradcam`` (the qualitative analysis of a checkpoint),
``collect`` (a report from the files the stages wrote).
"""

from __future__ import annotations

from pathlib import Path

from codis.files import atomic_write_bytes, atomic_write_text
from codis.report.document import (NOT_RUN, narrow_tables, pictures, render_html,
                                   render_markdown)
from codis.report.inputs import (REPORT_ROWS, Figure, MachineInfo, ReportInputs, ReportRow,
                                 RetrievalExample, RunScale, StageTime, TrivialBaseline,
                                 VariantResults, check_report_inputs, trivial_baselines)
from codis.report.sections import report_sections

__all__ = [
    "NOT_RUN", "REPORT_ROWS", "Figure", "MachineInfo", "ReportInputs", "ReportRow",
    "RetrievalExample", "RunScale", "StageTime", "TrivialBaseline", "VariantResults",
    "build_report", "trivial_baselines",
]

FILES_DIR = "report_files"

ARTIFACT_IMAGE_WIDTH = 720
"""The widest picture in ``report_artifact.md``, in pixels (the demo's report stays well under
2 MB; Prefect shows pictures at most as wide as its panel anyway)."""

ARTIFACT_TABLE_WIDTH = 110
"""The widest table in ``report_artifact.md``, in characters (``document.table_width``). Prefect
renders a Markdown table without wrapping its cells and hides the scroll bar of one wider than
its panel; 110 characters are about 850 pixels at its 14 px font and cell padding."""


def build_report(results: ReportInputs, output_dir: str | Path) -> dict[str, Path]:
    """Write under ``output_dir``: ``report.md`` (+ its figures in ``report_files/``), the
    self-contained ``report.html``, and ``report_artifact.md``, the same report for a Prefect
    Markdown artifact (figures inlined as data URIs, scaled to ``ARTIFACT_IMAGE_WIDTH``; tables
    split to ``ARTIFACT_TABLE_WIDTH``). Returns ``{"markdown": path, "html": path, "artifact":
    path}``. ``results`` is checked whole before anything is written."""
    check_report_inputs(results)
    sections = report_sections(results)
    output_dir = Path(output_dir)
    files_dir = output_dir / FILES_DIR
    files_dir.mkdir(parents=True, exist_ok=True)
    for picture in pictures(sections):
        atomic_write_bytes(files_dir / picture.name, picture.png)
    markdown = output_dir / "report.md"
    atomic_write_text(markdown, render_markdown(sections, lambda p: f"{FILES_DIR}/{p.name}"))
    page = output_dir / "report.html"
    atomic_write_text(page, render_html(sections, f"CODIS reproduction report: {results.recipe}"))
    artifact = output_dir / "report_artifact.md"
    atomic_write_text(artifact, render_markdown(
        narrow_tables(sections, ARTIFACT_TABLE_WIDTH),
        lambda p: p.preview(ARTIFACT_IMAGE_WIDTH).data_uri()))
    return {"markdown": markdown, "html": page, "artifact": artifact}
