"""The report's sections, in the order the report shows them (``report_sections``)."""

from __future__ import annotations

import math
import re

from PIL import Image, ImageDraw, ImageFont

from codis.config import MODES, ModelConfig
from codis.report import paper
from codis.report.charts import codebook_histogram, image_grid, loss_curve_figure
from codis.report.document import NOT_RUN, Block, Heading, Picture, Section, Table
from codis.report.inputs import (REPORT_ROWS, ReportInputs, ReportRow, RetrievalExample, RunScale,
                                 TrivialBaseline)
from codis.tasks import TASKS

NOISE_ERRORS = 2.0
"""How many standard errors from a value are still noise (about a 95 % interval)."""

ORCHESTRATION = "orchestration (Prefect, MLflow, store checks)"
"""The wall-time row of the run's time outside its stages."""


def report_sections(inputs: ReportInputs) -> list[Section]:
    """The whole report of ``inputs`` (checked by ``codis.report.inputs.check_report_inputs``)."""
    return [_intro(inputs), _summary(inputs), _direction(inputs), _beside(inputs),
            _ablation(inputs), _losses(inputs), _codebook(inputs), _itm_auc(inputs),
            _retrieval_examples(inputs), _gradcam(inputs), _paper_tables(), _environment(inputs)]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "x"


def _sign(delta: float) -> str:
    return "+" if delta > 0 else ("-" if delta < 0 else "=")


def _clock(seconds: float) -> str:
    whole = abs(int(round(seconds)))
    sign = "-" if seconds < 0 and whole else ""
    return f"{sign}{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def standard_error(percent: float, items: int) -> float:
    """The standard error, in percentage points, of a proportion of ``percent`` measured over
    ``items`` independent items (binomial). Scores that average partial credit (VQA accuracy)
    vary no more than a proportion of the same mean, so it bounds theirs too."""
    p = min(max(percent / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / items)


def _scale_note(scale: RunScale) -> str:
    """What the run changed of its recipe, as a sentence; "" for the recipe as written."""
    if not scale.changed:
        return ""
    changes = []
    if scale.steps_scale != 1.0:
        changes.append(f"every training step count x {scale.steps_scale:g}")
    if scale.overrides:
        changes.append(f"recipe overrides: {', '.join(scale.overrides)}")
    how = ("was scaled down" if scale.steps_scale < 1.0 else
           "was scaled up" if scale.steps_scale > 1.0 else "changed its recipe")
    return (f"this run {how}: {'; '.join(changes)}. Its numbers are not those of the recipe as "
            "written.")


def _intro(inputs: ReportInputs) -> Section:
    scale = _scale_note(inputs.scale)
    caveat = ("the demo world is a generated toy dataset and the model runs at a tiny preset, so "
              "the absolute numbers below are not comparable with the paper's (MSCOCO, Flickr30K, "
              "VQA v2, NLVR2 and SNLI-VE at ViT-B/16 + BERT-base scale). What is comparable is the "
              "direction: whether CODIS beats ALBEF on a task, as it does in the paper.")
    return Section(f"CODIS reproduction report: recipe {inputs.recipe}", [
        f"Measured numbers: {inputs.dataset}, '{inputs.split}' split, model preset "
        f"'{inputs.preset}', variants: {', '.join(inputs.variants) or 'none'}.",
        f"Read this first: {scale} {caveat[0].upper()}{caveat[1:]}" if scale
        else f"Read this first: {caveat}",
    ], level=1)


def _baseline_cell(inputs: ReportInputs, row: ReportRow, metric: str) -> str:
    found = [_fmt(b.metrics[metric]) for b in inputs.baselines.get(row.key, []) if metric in b.metrics]
    return " / ".join(found) if found else NOT_RUN


def _rows(inputs: ReportInputs) -> list[ReportRow]:
    """The report's rows, without optional ones that no variant has results for."""
    return [row for row in REPORT_ROWS
            if not row.optional or any(row.key in v.metrics for v in inputs.variants.values())]


def _measured(inputs: ReportInputs, variant: str, key: str, metric: str) -> str:
    metrics = inputs.variants[variant].metrics
    if key not in metrics:
        return NOT_RUN
    return _fmt(metrics[key][metric]) if metric in metrics[key] else "not reported"


def _summary(inputs: ReportInputs) -> Section:
    headers = ["Task", "Metric (%)", *inputs.variants, "Trivial baseline"]
    rows = []
    for row in _rows(inputs):
        for metric in row.metrics:
            rows.append([row.title, metric,
                         *(_measured(inputs, v, row.key, metric) for v in inputs.variants),
                         _baseline_cell(inputs, row, metric)])
    return Section("Summary: this run", [
        f"Every task on the demo '{inputs.split}' split (percent). \"{NOT_RUN}\" marks a task "
        "this run did not evaluate. Zero-shot rows score the pretrained model as it is; every "
        "other row finetunes it on the task's train split first (each task's protocol, and the "
        "paper's, are under \"The paper's numbers beside this run's\"). Trivial baselines, "
        "named in the task tables, need no model.", Table(headers, rows, keys=2)])


def _scored(baselines: list[TrivialBaseline], metric: str) -> list[TrivialBaseline]:
    """The baselines of ``metric`` whose item count is known."""
    return [b for b in baselines if metric in b.metrics and metric in b.items]


def _at_chance(value: float, baselines: list[TrivialBaseline], metric: str) -> bool:
    """Whether ``value`` is within noise of a trivial baseline: within ``NOISE_ERRORS`` standard
    errors of a proportion at the baseline's value over its items."""
    return any(abs(value - b.metrics[metric])
               <= NOISE_ERRORS * standard_error(b.metrics[metric], b.items[metric])
               for b in baselines)


def _verdict(codis: float, albef: float, paper_signs: list[str], baselines: list[TrivialBaseline],
             metric: str) -> str:
    """How this run's CODIS - ALBEF compares with the paper's signs. With an item count (the
    baselines'), noise comes first: "at chance (both)" when both values are within noise of a
    trivial baseline, "within noise" when the difference is within ``NOISE_ERRORS`` standard
    errors of a difference of two proportions over those items. Without one, the sign decides."""
    delta = codis - albef
    if baselines:
        items = baselines[0].items[metric]
        if _at_chance(codis, baselines, metric) and _at_chance(albef, baselines, metric):
            return "at chance (both)"
        if abs(delta) <= NOISE_ERRORS * math.hypot(standard_error(codis, items),
                                                   standard_error(albef, items)):
            return "within noise"
    if not paper_signs:
        return "no paper value"
    if all(s == _sign(delta) for s in paper_signs):
        return "agrees"
    if any(s == _sign(delta) for s in paper_signs):
        return "partly"
    return "disagrees"


def _paper_deltas(row: ReportRow, metric: str) -> tuple[str, list[str]]:
    """The paper's CODIS - ALBEF of ``metric`` per paper reference of ``row`` ("-" where it has
    none) and their signs; ("-", []) where the paper does not report the metric."""
    cells, signs = [], []
    for ref in row.paper_refs:
        try:
            albef, codis = ref.value(paper.ALBEF, metric), ref.value(paper.CODIS, metric)
        except KeyError:  # e.g. r_mean, which the paper does not report
            continue
        if albef is None or codis is None:
            cells.append("-")
        else:
            cells.append(f"{codis - albef:+.2f}")
            signs.append(_sign(codis - albef))
    return (" / ".join(cells) if signs else "-"), signs


def _direction(inputs: ReportInputs) -> Section:
    where = "; ".join(dict.fromkeys(
        f"{' / '.join(ref.label for ref in row.paper_refs)} ({TASKS[row.task].title})"
        for row in _rows(inputs)))
    blocks: list[Block] = [
        "CODIS - ALBEF per metric, in the paper and in this run. Paper delta: one per dataset or "
        f"split, {where}. "
        f"Verdict: \"at chance (both)\" when both variants are within {NOISE_ERRORS:g} standard "
        "errors of a trivial baseline (a binomial proportion at the baseline over the evaluated "
        f"items), \"within noise\" when the difference is within {NOISE_ERRORS:g} standard errors, "
        "else \"agrees\" when this run's sign matches every paper sign (\"partly\": some)."]
    have = [v for v in ("codis", "albef") if v in inputs.variants]
    if len(have) < 2:
        missing = sorted({"codis", "albef"} - set(have))
        blocks.append(f"CODIS vs ALBEF: {NOT_RUN} (no results for variant {', '.join(missing)}).")
    rows, unassessed = [], False
    for row in _rows(inputs):
        for metric in row.metrics:
            paper_cell, paper_signs = _paper_deltas(row, metric)
            ours = [inputs.variants[v].metrics.get(row.key, {}).get(metric) for v in ("codis", "albef")
                    if v in inputs.variants]
            if len(have) == 2 and all(x is not None for x in ours):
                codis, albef = ours
                baselines = _scored(inputs.baselines.get(row.key, []), metric)
                unassessed = unassessed or not baselines
                measured = f"{_fmt(albef)} -> {_fmt(codis)} ({codis - albef:+.2f})"
                verdict = _verdict(codis, albef, paper_signs, baselines, metric)
            else:
                measured, verdict = NOT_RUN, NOT_RUN
            rows.append([row.title, metric, paper_cell, measured, verdict])
    blocks.append(Table(["Task", "Metric", "Paper delta", "This run: albef -> codis", "Verdict"],
                        rows, keys=2))
    if unassessed:
        blocks.append("Rows without a trivial baseline's item count (a demo world manifest gives "
                      "them) are judged by their sign alone: their noise is not assessed.")
    return Section("CODIS vs ALBEF: direction, paper and this run", blocks)


def _beside(inputs: ReportInputs) -> Section:
    blocks: list[Block] = [
        "The paper's ALBEF 4M and CODIS rows next to this run's numbers on the same metric. Paper: "
        "real benchmarks, 4M pretraining images, base-size model. This run: "
        f"{inputs.dataset}, preset '{inputs.preset}'. Compare directions, not values."]
    for row in _rows(inputs):
        rows = []
        for ref in row.paper_refs:
            for method in (paper.ALBEF, paper.CODIS):
                cells = []
                for metric in row.metrics:
                    try:
                        cells.append(ref.table.format(ref.value(method, metric)))
                    except KeyError:
                        cells.append("-")
                rows.append(["paper", method, ref.label, *cells])
        for variant in inputs.variants:
            rows.append(["this run", variant, f"demo {inputs.split}",
                         *(_measured(inputs, variant, row.key, m) for m in row.metrics)])
        for baseline in inputs.baselines.get(row.key, []):
            rows.append(["trivial", baseline.name, f"demo {baseline.split}",
                         *(_fmt(baseline.metrics[m]) if m in baseline.metrics else "-"
                           for m in row.metrics)])
        protocol = (f"the paper's: {row.paper_protocol}." if row.paper_protocol
                    else "the paper's is the same.")
        blocks += [Heading(row.title), f"Protocol: {row.protocol}; {protocol}",
                   Table(["Source", "Model", "Data", *row.metrics], rows, keys=3)]
    return Section("The paper's numbers beside this run's", blocks)


def _ablation(inputs: ReportInputs) -> Section:
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
    return Section("Objective ablation (zero-shot retrieval)", [
        "The paper's objective rows and the project mode that reproduces each; this run's rows "
        "are its variants of those modes.",
        Table(["Source", "Objectives", "Mode", *metrics], rows, keys=3)])


def _losses(inputs: ReportInputs) -> Section:
    figure = loss_curve_figure(inputs.variants)
    if figure is None:
        return Section("Pretraining loss curves", [f"Pretraining losses: {NOT_RUN}."])
    missing = [v for v, r in inputs.variants.items() if not r.loss_curve]
    blocks: list[Block] = [
        "Training loss per logged step, one panel per loss term, one line per variant.",
        Picture.from_image(figure, "loss_curves.png", "pretraining loss curves")]
    if missing:
        blocks.append(f"No loss curve ({NOT_RUN}): {', '.join(missing)}.")
    return Section("Pretraining loss curves", blocks)


def _has_codebook(variant: str) -> bool:
    """Whether a variant named after a mode has a codebook (an unknown name: assume it does)."""
    return variant not in MODES or ModelConfig(mode=variant).codebook_features != "off"


def _codebook(inputs: ReportInputs) -> Section:
    blocks: list[Block] = [
        "Codeword usage on the evaluation features: used = distinct argmax codewords, entropy = "
        "entropy of the mean assignment / log K (1 = all codewords equally used), perplexity = "
        "the effective number of codewords."]
    rows, pictures = [], []
    for variant, results in inputs.variants.items():
        if results.codebook is None:
            note = NOT_RUN if _has_codebook(variant) else "no codebook in this mode"
            rows.append([variant, "-", note, "-", "-", "-", "-"])
            continue
        histograms = []
        for source, usage in results.codebook.items():
            rows.append([variant, source, str(usage["codewords"]), str(usage["samples"]),
                         str(usage["used"]), f"{usage['entropy']:.3f}", f"{usage['perplexity']:.1f}"])
            histograms.append(codebook_histogram(
                usage["histogram"], f"{variant} / {source}: samples per codeword, sorted", source))
        if histograms:
            pictures.append(Picture.from_image(image_grid(histograms), f"codebook_{_slug(variant)}.png",
                                               f"codebook usage histograms of {variant}"))
    blocks.append(Table(["Variant", "Features", "Codewords (K)", "Samples", "Used",
                         "Entropy (norm.)", "Perplexity"], rows))
    return Section("Codebook usage", blocks + pictures)


def _itm_auc(inputs: ReportInputs) -> Section:
    rows = [[variant, NOT_RUN if results.itm_auc is None else f"{results.itm_auc:.3f}"]
            for variant, results in inputs.variants.items()]
    return Section("Image-text matching against random negatives", [
        "How well the fusion encoder grounds captions: the ROC AUC of the ITM match score of each "
        "evaluation caption with its own image against the same captions with a random other image "
        "(codis.report.analysis). 0.5: it cannot tell them apart; 1: its own image always scores "
        "higher.", Table(["Variant", "ITM AUC"], rows)])


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


def _retrieval_examples(inputs: ReportInputs) -> Section:
    blocks: list[Block] = [
        "Text-to-image retrieval on the demo test split: each query's top-k images by ITC "
        "similarity (no ITM re-ranking), best first; a green frame is the query's own image, red a wrong one."]
    for variant, results in inputs.variants.items():
        if not results.retrieval_examples:
            blocks.append(f"{variant}: {NOT_RUN}.")
            continue
        for i, example in enumerate(results.retrieval_examples):
            hit = "hit@1" if example.correct and example.correct[0] else "miss@1"
            blocks.append(f"{variant}, query {i + 1} ({hit}): \"{example.query}\"")
            blocks.append(Picture.from_image(_thumbnail_strip(example),
                                             f"retrieval_{_slug(variant)}_{i + 1}.png",
                                             f"top images for {example.query}"))
    return Section("Retrieval examples", blocks)


def _gradcam(inputs: ReportInputs) -> Section:
    blocks: list[Block] = [
        "Word-level Grad-CAM on the fusion encoder's cross-attention (codis.report.gradcam, as the "
        "paper's and ALBEF's qualitative figures): where each word of the caption looks."]
    for variant, results in inputs.variants.items():
        if not results.gradcam_figures:
            blocks.append(f"{variant}: {NOT_RUN}.")
            continue
        for i, figure in enumerate(results.gradcam_figures):
            with Image.open(figure.path) as source:
                picture = Picture.from_image(source.convert("RGB"),
                                             f"gradcam_{_slug(variant)}_{i + 1}.png", figure.caption)
            blocks += [f"{variant}: {figure.caption}", picture]
    return Section("Grad-CAM", blocks)


def _paper_table(table: paper.PaperTable) -> list[Table]:
    """A paper table as one table per column group (the retrieval tables: MSCOCO, then
    Flickr30K), its name in the first header; as one table where several groups fit six columns
    (the understanding table)."""
    if len(table.groups) > 1 and len(table.columns) <= 6:
        headers = ["Method", *(f"{group} {metric}" for group, metric in table.columns)]
        return [Table(headers, [[row.method, *(table.format(v) for v in row.values)]
                                for row in table.rows])]
    return [Table([f"Method ({group})", *(metric for g, metric in table.columns if g == group)],
                  [[row.method, *(table.format(v) for v in table.group(row.method, group).values())]
                   for row in table.rows])
            for group in table.groups]


def _paper_tables() -> Section:
    blocks: list[Block] = [
        "As published (percent; \"-\": not reported). \"CODIS\" is the paper's \"Ours\"."]
    for table in paper.TABLES:
        blocks += [Heading(table.title)]
        if table.note:
            blocks.append(table.note)
        blocks += _paper_table(table)
    return Section("The paper's tables", blocks)


def _wall_times(inputs: ReportInputs) -> list[Block]:
    """Every stage in order, then the run's time outside them, so that the table sums to the
    run's wall time (without ``run_seconds``: to the stages' sum)."""
    if not inputs.wall_times and inputs.run_seconds is None:
        return [f"Wall times: {NOT_RUN}."]
    # Rounded first, so that the rows add up to the total as printed.
    rows, ran = [], 0.0
    for stage in inputs.wall_times:
        seconds = round(stage.seconds_this_run, 1)
        ran += seconds
        note = f"reused (took {_clock(stage.seconds)} when computed)" if stage.reused else ""
        rows.append([stage.label, f"{seconds:.1f}", _clock(seconds), note])
    if inputs.run_seconds is None:
        total, what = ran, "the stages' sum (the run's was not measured)"
    else:
        total, what = round(inputs.run_seconds, 1), "the run's wall time up to the report"
        rest = total - ran
        label = ORCHESTRATION if rest >= 0 else "overlap (stages ran at the same time)"
        rows.append([label, f"{rest:.1f}", _clock(rest), ""])
    rows.append(["total", f"{total:.1f}", _clock(total), what])
    return ["Every stage of the run, in order. A reused stage was found done in the store and "
            "took no time in this run.", Table(["Stage", "Seconds", "h:mm:ss", "Note"], rows)]


def _environment(inputs: ReportInputs) -> Section:
    machine, scale = inputs.machine, inputs.scale
    recipe = f"{inputs.recipe} ({scale.recipe_file})" if scale.recipe_file else inputs.recipe
    info = Table(["Item", "Value"], [
        ["recipe", recipe], ["training step counts", f"x {scale.steps_scale:g}"],
        *([["recipe override", override] for override in scale.overrides]
          or [["recipe overrides", "none"]]),
        ["processes that pretrained", str(scale.world_size)],
        ["platform", machine.platform], ["CPUs", str(machine.cpu_count)],
        ["Python", machine.python_version], ["torch", machine.torch_version], ["device", machine.device]])
    return Section("Machine and wall times", [info, *_wall_times(inputs)])
