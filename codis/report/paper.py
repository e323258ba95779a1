"""The CODIS paper's result tables (Duan et al., CVPR 2022), transcribed as data.

Source: the tables as reproduced in a presentation of the paper (the project's seed notes); the
slides give no table numbers, so each table is named after its content. Values are percent; a
"-" in the paper is ``None``. The paper's "Ours" row is called ``CODIS`` here, and citation
numbers are dropped from the method names ("ALBEF 4M [25]" -> "ALBEF 4M"). The zero-shot table
spells ViLT "VILT"; it is normalised to "ViLT" so both retrieval tables name it alike.

Column keys follow the project's metric names: a column is ``(group, metric)``, e.g.
``("coco", "txt_r1")``, ``("vqa", "test_dev")``, ``("nlvr", "test_p")``, ``("ve", "val")``.
The data lives in this module so that nothing reads the seed files at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

ALBEF = "ALBEF 4M"
CODIS = "CODIS"

RETRIEVAL_METRICS: tuple[str, ...] = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")


@dataclass(frozen=True)
class PaperRow:
    """One method's values, in the order of its table's ``columns``. ``mode`` names the
    :data:`codis.config.MODES` entry that reproduces the row, where one does."""

    method: str
    values: tuple[float | None, ...]
    mode: str | None = None


@dataclass(frozen=True)
class PaperTable:
    """A table of the paper: ``columns`` are ``(group, metric)`` pairs, ``rows`` one per method."""

    title: str
    columns: tuple[tuple[str, str], ...]
    rows: tuple[PaperRow, ...]
    decimals: int = 2
    note: str = ""

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row.values) != len(self.columns):
                raise ValueError(f"paper table {self.title!r}, row {row.method!r}: "
                                 f"{len(row.values)} values for {len(self.columns)} columns")
        methods = [row.method for row in self.rows]
        if len(set(methods)) != len(methods):
            raise ValueError(f"paper table {self.title!r}: duplicate method names")

    def format(self, value: float | None) -> str:
        """A value as the paper prints it (``decimals`` places; "-" where not reported)."""
        return "-" if value is None else f"{value:.{self.decimals}f}"

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(row.method for row in self.rows)

    @property
    def groups(self) -> tuple[str, ...]:
        """Column groups in table order, each once."""
        return tuple(dict.fromkeys(group for group, _ in self.columns))

    def row(self, method: str) -> PaperRow:
        for row in self.rows:
            if row.method == method:
                return row
        raise KeyError(f"paper table {self.title!r} has no method {method!r} "
                       f"(methods: {', '.join(self.methods)})")

    def value(self, method: str, group: str, metric: str) -> float | None:
        try:
            index = self.columns.index((group, metric))
        except ValueError:
            raise KeyError(f"paper table {self.title!r} has no column {group}.{metric}") from None
        return self.row(method).values[index]

    def group(self, method: str, group: str) -> dict[str, float | None]:
        """``{metric: value}`` of one column group, e.g. ``group("CODIS", "coco")``."""
        values = self.row(method).values
        out = {metric: values[i] for i, (g, metric) in enumerate(self.columns) if g == group}
        if not out:
            raise KeyError(f"paper table {self.title!r} has no column group {group!r}")
        return out


def _retrieval_columns(*groups: str) -> tuple[tuple[str, str], ...]:
    return tuple((group, metric) for group in groups for metric in RETRIEVAL_METRICS)


_ = None  # the paper's "-"

ZERO_SHOT_RETRIEVAL = PaperTable(
    title="Zero-shot image-text retrieval on MSCOCO (5K test) and Flickr30K (1K test; "
          "ALBEF, CODIS: COCO-finetuned)",
    columns=_retrieval_columns("coco", "flickr"),
    decimals=1,
    rows=(
        PaperRow("ImageBERT", (44.0, 71.2, 80.4, 32.3, 59.0, 70.2, 70.7, 90.2, 94.0, 54.3, 79.6, 87.5)),
        PaperRow("Unicoder-VL", (_, _, _, _, _, _, 64.3, 85.8, 92.3, 48.4, 76.0, 85.2)),
        PaperRow("UNITER", (_, _, _, _, _, _, 80.7, 95.7, 98.0, 66.2, 88.4, 92.9)),
        PaperRow("ViLT", (56.5, 82.6, 89.6, 40.4, 70.0, 81.1, 73.2, 93.6, 96.5, 55.0, 82.5, 89.8)),
        PaperRow("CLIP", (58.4, 81.5, 88.1, 37.8, 62.4, 72.2, 88.0, 98.7, 99.4, 68.7, 90.6, 95.2)),
        PaperRow("ALIGN", (58.6, 83.0, 89.7, 45.6, 69.8, 78.6, 88.6, 98.7, 99.7, 75.7, 93.8, 96.8)),
        PaperRow(ALBEF, (68.6, 89.5, 94.7, 50.1, 76.4, 84.5, 90.5, 98.8, 99.7, 76.8, 93.7, 96.7),
                 mode="albef"),
        PaperRow(CODIS, (71.5, 91.1, 95.5, 53.9, 79.5, 87.1, 91.7, 99.3, 99.8, 79.7, 94.8, 97.3),
                 mode="codis"),
    ),
)
"""Zero-shot retrieval: txt_r* is text retrieval (image -> text), img_r* image retrieval.

Two protocols share the table: the MSCOCO columns score pretrained models (the ALBEF row there is
CODIS's own re-run: ALBEF reports no zero-shot MSCOCO), while the Flickr30K columns of ALBEF and,
by the same code, CODIS are their COCO-finetuned models evaluated on Flickr30K (ALBEF's
maintainers, salesforce/ALBEF issues #3, #29, #89). The report compares each column with the run
of the same protocol (``retrieval_zero_shot``: MSCOCO; ``retrieval_transfer``: Flickr30K)."""

FINETUNED_RETRIEVAL = PaperTable(
    title="Finetuned image-text retrieval on MSCOCO (5K test) and Flickr30K (1K test)",
    columns=_retrieval_columns("coco", "flickr"),
    decimals=1,
    rows=(
        PaperRow("ImageBERT", (66.4, 89.8, 94.4, 50.5, 78.7, 87.1, 87.0, 97.6, 99.2, 73.1, 92.6, 96.0)),
        PaperRow("UNITER", (65.7, 88.6, 93.8, 52.9, 79.9, 88.0, 87.3, 98.0, 99.2, 75.6, 94.1, 96.8)),
        PaperRow("VILLA", (_, _, _, _, _, _, 87.9, 97.5, 98.8, 76.3, 94.2, 96.8)),
        PaperRow("OSCAR", (70.0, 91.1, 95.5, 54.0, 80.8, 88.5, _, _, _, _, _, _)),
        PaperRow("ViLT", (61.5, 86.3, 92.7, 42.7, 72.9, 83.1, 83.5, 96.7, 98.6, 64.4, 88.7, 93.8)),
        PaperRow("UNIMO", (_, _, _, _, _, _, 89.7, 98.4, 99.1, 74.6, 93.4, 96.0)),
        PaperRow("SOHO", (66.4, 88.2, 93.8, 50.6, 78.0, 86.7, 86.5, 98.1, 99.3, 72.5, 92.7, 96.1)),
        PaperRow(ALBEF, (73.1, 91.4, 96.0, 56.8, 81.5, 89.2, 94.3, 99.4, 99.8, 82.8, 96.7, 98.4),
                 mode="albef"),
        PaperRow(CODIS, (75.3, 92.6, 96.6, 58.7, 82.8, 89.7, 95.1, 99.4, 99.9, 83.3, 96.1, 97.8),
                 mode="codis"),
    ),
)
"""Retrieval after finetuning on each dataset's training split."""

UNDERSTANDING = PaperTable(
    title="VQA (test-dev / test-std), NLVR2 (dev / test-P) and SNLI-VE (val / test) accuracy",
    columns=(("vqa", "test_dev"), ("vqa", "test_std"), ("nlvr", "dev"), ("nlvr", "test_p"),
             ("ve", "val"), ("ve", "test")),
    rows=(
        PaperRow("VisualBERT", (70.80, 71.00, 67.40, 67.00, _, _)),
        PaperRow("LXMERT", (72.42, 72.54, 74.90, 74.50, _, _)),
        PaperRow("12-in-1", (73.15, _, _, 78.87, _, 76.95)),
        PaperRow("UNITER", (72.70, 72.91, 77.18, 77.85, 78.59, 78.28)),
        PaperRow("ViLT", (70.94, _, 75.24, 76.21, _, _)),
        PaperRow("OSCAR", (73.16, 73.44, 78.07, 78.36, _, _)),
        PaperRow("VILLA", (73.59, 73.67, 78.39, 79.30, 79.47, 79.03)),
        PaperRow(ALBEF, (74.54, 74.70, 80.24, 80.50, 80.14, 80.30), mode="albef"),
        PaperRow(CODIS, (74.86, 74.97, 80.50, 80.84, 80.47, 80.40), mode="codis"),
    ),
)
"""The vision-language understanding tasks, each finetuned from the pretrained model."""

ABLATION_OBJECTIVES = PaperTable(
    title="Ablation of the objectives: zero-shot retrieval on MSCOCO (5K) and Flickr30K (1K)",
    # The slide's header says "Text Retrieval" twice under Flickr30K; the second group is image
    # retrieval (its numbers are below the first group's, as image retrieval always is here).
    columns=_retrieval_columns("coco", "flickr"),
    rows=(
        PaperRow("a: MLM+ITM+ITC (cross align)",
                 (68.60, 89.50, 94.70, 50.10, 76.40, 84.50, 84.90, 97.20, 99.00, 68.18, 88.58, 93.02),
                 mode="albef"),
        PaperRow("b: MLM+ITM+ITC (intra + cross)",
                 (69.86, 89.48, 94.42, 50.52, 77.02, 85.17, 85.80, 96.80, 98.10, 69.70, 89.60, 93.48),
                 mode="albef_intra"),
        PaperRow("a + codebook (teacher feature)",
                 (70.74, 89.54, 94.88, 51.39, 77.86, 85.60, 86.00, 97.00, 98.20, 70.18, 90.66, 94.44),
                 mode="codis_cross"),
        PaperRow("b + codebook (student feature)",
                 (71.12, 89.62, 94.78, 51.40, 77.42, 85.53, 86.30, 96.90, 98.30, 70.34, 90.00, 93.84),
                 mode="codis_student"),
        PaperRow("b + codebook (teacher feature)",
                 (71.10, 90.60, 95.10, 52.10, 78.00, 85.90, 86.70, 97.30, 98.70, 71.40, 90.82, 94.62),
                 mode="codis"),
    ),
    note="The source's header says Text Retrieval twice under Flickr30K; the second group is "
         "image retrieval.",
)
"""The objective rows that :data:`codis.config.MODES` reproduce (row ``mode``)."""

ABLATION_CODEBOOK = PaperTable(
    title="Ablation of the codebook: loss weight and number of codewords",
    columns=tuple(("retrieval", metric) for metric in RETRIEVAL_METRICS),
    rows=(
        PaperRow("ALBEF", (55.70, 81.92, 88.78, 41.08, 69.01, 78.86), mode="albef"),
        PaperRow("0.5x codebook", (58.66, 83.9, 90.64, 43.74, 72.10, 81.58)),
        PaperRow("2.0x codebook", (59.02, 84.46, 91.06, 43.62, 71.69, 81.12)),
        PaperRow("3K codewords", (58.96, 84.28, 90.98, 44.66, 72.31, 81.68)),
        PaperRow("500 codewords", (55.52, 81.68, 89.28, 41.53, 68.75, 78.43)),
        PaperRow(CODIS, (59.38, 84.04, 91.20, 44.71, 72.63, 81.69), mode="codis"),
    ),
    note="The source names the columns TR@k / IR@k but not the dataset or setting; "
         "its 0.5x codebook TR@5 is printed as 83.9.",
)
"""Codebook ablation ("0.5x / 2.0x codebook" scale the codebook loss weight,
:attr:`codis.config.LossWeights.code`). The dataset is not named where the table was taken from."""

TABLES: tuple[PaperTable, ...] = (ZERO_SHOT_RETRIEVAL, FINETUNED_RETRIEVAL, UNDERSTANDING,
                                  ABLATION_OBJECTIVES, ABLATION_CODEBOOK)
"""Every transcribed table, in the paper's order."""
