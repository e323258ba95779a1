"""The report's sections, in the order the report shows them (:func:`report_sections`)."""

from __future__ import annotations

import re

from PIL import Image, ImageDraw, ImageFont

from codis.config import MODES, ModelConfig
from codis.report import paper
from codis.report.charts import codebook_histogram, image_grid, loss_curve_figure
from codis.report.document import NOT_RUN, Block, Heading, Picture, Section, Table
from codis.report.inputs import REPORT_ROWS, ReportInputs, ReportRow, RetrievalExample


def report_sections(inputs: ReportInputs) -> list[Section]:
    """The whole report of ``inputs`` (checked by :func:`codis.report.inputs.check_report_inputs`)."""
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
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _intro(inputs: ReportInputs) -> Section:
    return Section(f"CODIS reproduction report: recipe {inputs.recipe}", [
        f"Measured numbers: {inputs.dataset}, '{inputs.split}' split, model preset "
        f"'{inputs.preset}', variants: {', '.join(inputs.variants) or 'none'}.",
        "Read this first: the demo world is a generated toy dataset and the model runs at a tiny "
        "preset, so the absolute numbers below are not comparable with the paper's (MSCOCO, "
        "Flickr30K, VQA v2, NLVR2 and SNLI-VE at ViT-B/16 + BERT-base scale). What is comparable "
        "is the direction: whether CODIS beats ALBEF on a task, as it does in the paper.",
    ], level=1)


def _baseline_cell(inputs: ReportInputs, row: ReportRow, metric: str) -> str:
    found = [f"{_fmt(b.metrics[metric])} ({b.name}, {b.split})"
             for b in inputs.baselines.get(row.key, []) if metric in b.metrics]
    return "; ".join(found) if found else NOT_RUN


def _measured(inputs: ReportInputs, variant: str, key: str, metric: str) -> str:
    metrics = inputs.variants[variant].metrics
    if key not in metrics:
        return NOT_RUN
    return _fmt(metrics[key][metric]) if metric in metrics[key] else "not reported"


def _summary(inputs: ReportInputs) -> Section:
    headers = ["Task", "Metric (%)", *inputs.variants, "Trivial baseline"]
    rows = []
    for row in REPORT_ROWS:
        for metric in row.metrics:
            rows.append([row.title, metric,
                         *(_measured(inputs, v, row.key, metric) for v in inputs.variants),
                         _baseline_cell(inputs, row, metric)])
    return Section("Summary: this run", [
        f"Every task on the demo '{inputs.split}' split (percent). \"{NOT_RUN}\" marks a task "
        "this run did not evaluate.", Table(headers, rows)])


def _direction(inputs: ReportInputs) -> Section:
    blocks: list[Block] = [
        "Sign of CODIS - ALBEF per metric: in the paper (one sign per dataset / split) and in "
        "this run. \"agrees\" when this run's sign matches every paper sign."]
    have = [v for v in ("codis", "albef") if v in inputs.variants]
    if len(have) < 2:
        missing = sorted({"codis", "albef"} - set(have))
        blocks.append(f"CODIS vs ALBEF: {NOT_RUN} (no results for variant {', '.join(missing)}).")
    rows = []
    for row in REPORT_ROWS:
        for metric in row.metrics:
            paper_parts, paper_signs = [], []
            for ref in row.paper_refs:
                try:
                    albef = ref.value(paper.ALBEF, metric)
                    codis = ref.value(paper.CODIS, metric)
                except KeyError:  # e.g. r_mean, which the paper does not report
                    continue
                if albef is not None and codis is not None:
                    paper_parts.append(f"{ref.label}: {ref.table.format(albef)} -> "
                                       f"{ref.table.format(codis)} ({codis - albef:+.2f})")
                    paper_signs.append(_sign(codis - albef))
            ours = [inputs.variants[v].metrics.get(row.key, {}).get(metric) for v in ("codis", "albef")
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
            rows.append([row.title, metric, "; ".join(paper_parts) or "-", measured, verdict])
    blocks.append(Table(["Task", "Metric", "Paper: ALBEF 4M -> CODIS", "This run: albef -> codis",
                         "Direction"], rows))
    return Section("CODIS vs ALBEF: direction, paper and this run", blocks)


def _beside(inputs: ReportInputs) -> Section:
    blocks: list[Block] = [
        "The paper's ALBEF 4M and CODIS rows next to this run's numbers on the same metric. Paper: "
        "real benchmarks, 4M pretraining images, base-size model. This run: "
        f"{inputs.dataset}, preset '{inputs.preset}'. Compare directions, not values."]
    for row in REPORT_ROWS:
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
        blocks += [Heading(row.title), Table(["Source", "Model", "Data", *row.metrics], rows)]
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
        "are its variants of those modes.", Table(["Source", "Objectives", "Mode", *metrics], rows)])


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


def _paper_tables() -> Section:
    blocks: list[Block] = [
        "As published (percent; \"-\": not reported). \"CODIS\" is the paper's \"Ours\"."]
    for table in paper.TABLES:
        headers = ["Method", *(f"{group} {metric}" for group, metric in table.columns)]
        rows = [[row.method, *(table.format(v) for v in row.values)] for row in table.rows]
        blocks += [Heading(table.title)]
        if table.note:
            blocks.append(table.note)
        blocks.append(Table(headers, rows))
    return Section("The paper's tables", blocks)


def _environment(inputs: ReportInputs) -> Section:
    machine = inputs.machine
    info = Table(["Item", "Value"], [
        ["recipe", inputs.recipe], ["platform", machine.platform], ["CPUs", str(machine.cpu_count)],
        ["Python", machine.python_version], ["torch", machine.torch_version], ["device", machine.device]])
    if inputs.wall_times:
        rows = [[stage, f"{seconds:.1f}", _clock(seconds)] for stage, seconds in inputs.wall_times.items()]
        total = sum(inputs.wall_times.values())
        rows.append(["total", f"{total:.1f}", _clock(total)])
        times: str | Table = Table(["Stage", "Seconds", "h:mm:ss"], rows)
    else:
        times = f"Wall times: {NOT_RUN}."
    return Section("Machine and wall times", [info, times])
