import base64
import dataclasses
import io
import math
import re

import pytest
import torch
from PIL import Image

from codis.metrics import codebook_usage
from codis.report import (ARTIFACT_IMAGE_WIDTH, ARTIFACT_TABLE_WIDTH, NOT_RUN, REPORT_ROWS, Figure,
                          MachineInfo, RetrievalExample, RunScale, StageTime,
                          TrivialBaseline, build_report, paper, trivial_baselines)
from codis.report.charts import chart
from codis.report.document import Section, Table, narrow_tables, table_width
from codis.report.sections import ORCHESTRATION, standard_error
from codis.tasks import TASKS

# ---------------------------------------------------------------------------------- paper tables


def test_paper_spot_values_as_printed():
    assert paper.ZERO_SHOT_RETRIEVAL.value(paper.CODIS, "coco", "txt_r1") == 71.5
    assert paper.ZERO_SHOT_RETRIEVAL.value(paper.ALBEF, "flickr", "img_r10") == 96.7
    assert paper.ZERO_SHOT_RETRIEVAL.value("Unicoder-VL", "coco", "txt_r1") is None
    assert paper.FINETUNED_RETRIEVAL.value(paper.CODIS, "coco", "img_r1") == 58.7
    assert paper.FINETUNED_RETRIEVAL.value("OSCAR", "flickr", "txt_r5") is None
    assert paper.UNDERSTANDING.value(paper.CODIS, "vqa", "test_std") == 74.97
    assert paper.UNDERSTANDING.value(paper.ALBEF, "nlvr", "test_p") == 80.50
    assert paper.UNDERSTANDING.value("12-in-1", "ve", "test") == 76.95
    assert paper.UNDERSTANDING.value("12-in-1", "ve", "val") is None
    assert paper.ABLATION_OBJECTIVES.value("b + codebook (student feature)", "flickr", "img_r1") == 70.34
    assert paper.ABLATION_CODEBOOK.value("500 codewords", "retrieval", "txt_r10") == 89.28
    assert paper.ABLATION_CODEBOOK.group(paper.CODIS, "retrieval")["img_r5"] == 72.63
    # printed with the paper's decimals
    assert paper.UNDERSTANDING.format(paper.UNDERSTANDING.value(paper.ALBEF, "vqa", "test_std")) == "74.70"
    assert paper.ZERO_SHOT_RETRIEVAL.format(paper.ZERO_SHOT_RETRIEVAL.value(paper.CODIS, "coco", "txt_r1")) == "71.5"
    assert paper.UNDERSTANDING.format(None) == "-"


def test_paper_tables_are_complete_and_in_range():
    for table in paper.TABLES:
        assert table.rows and table.columns
        for row in table.rows:
            assert len(row.values) == len(table.columns), (table.title, row.method)
            for value in row.values:
                assert value is None or 0.0 < value <= 100.0, (table.title, row.method, value)
        # R@1 <= R@5 <= R@10 wherever all three are reported
        for group in table.groups:
            for row in table.rows:
                values = table.group(row.method, group)
                for side in ("txt", "img"):
                    recalls = [values.get(f"{side}_r{k}") for k in (1, 5, 10)]
                    if all(r is not None for r in recalls):
                        assert recalls == sorted(recalls), (table.title, row.method, group, side)


def test_paper_main_tables_hold_albef_and_codis_and_codis_wins_zero_shot_r1():
    for table in (paper.ZERO_SHOT_RETRIEVAL, paper.FINETUNED_RETRIEVAL, paper.UNDERSTANDING):
        assert {paper.ALBEF, paper.CODIS} <= set(table.methods)
    for group in ("coco", "flickr"):
        for metric in ("txt_r1", "img_r1"):
            assert (paper.ZERO_SHOT_RETRIEVAL.value(paper.CODIS, group, metric)
                    > paper.ZERO_SHOT_RETRIEVAL.value(paper.ALBEF, group, metric))


def test_paper_ablation_rows_name_every_mode_once():
    from codis.config import MODES
    modes = [row.mode for row in paper.ABLATION_OBJECTIVES.rows]
    assert sorted(modes) == sorted(MODES)


def test_paper_table_errors_name_the_missing_thing():
    with pytest.raises(KeyError, match="no method"):
        paper.UNDERSTANDING.row("BLIP")
    with pytest.raises(KeyError, match="no column"):
        paper.UNDERSTANDING.value(paper.CODIS, "vqa", "accuracy")
    with pytest.raises(ValueError, match="values for"):
        paper.PaperTable("t", (("a", "b"),), (paper.PaperRow("m", (1.0, 2.0)),))


# ---------------------------------------------------------------------------------- codebook usage


def test_codebook_usage_all_on_one_codeword():
    assignments = torch.zeros(10, 8)
    assignments[:, 3] = 1.0
    usage = codebook_usage(assignments)
    assert usage["used"] == 1
    assert usage["entropy"] == pytest.approx(0.0, abs=1e-12)
    assert usage["perplexity"] == pytest.approx(1.0)
    assert usage["histogram"] == [0, 0, 0, 10, 0, 0, 0, 0]
    assert (usage["codewords"], usage["samples"]) == (8, 10)


def test_codebook_usage_uniform_over_codewords():
    assignments = torch.eye(8).repeat(3, 1)  # every codeword the argmax of 3 samples
    usage = codebook_usage(assignments)
    assert usage["used"] == 8
    assert usage["entropy"] == pytest.approx(1.0)
    assert usage["perplexity"] == pytest.approx(8.0)
    assert usage["histogram"] == [3] * 8


def test_codebook_usage_half_of_the_codewords():
    # two codewords of four, equally: entropy log 2 / log 4 = 0.5, perplexity 2
    assignments = torch.tensor([[0.9, 0.1, 0, 0], [0.1, 0.9, 0, 0]])
    usage = codebook_usage(assignments)
    assert usage["used"] == 2
    assert usage["entropy"] == pytest.approx(0.5)
    assert usage["perplexity"] == pytest.approx(2.0)


def test_codebook_usage_rejects_bad_input():
    with pytest.raises(ValueError, match="assignments"):
        codebook_usage(torch.ones(4))
    with pytest.raises(ValueError, match="sum to 1"):
        codebook_usage(torch.ones(3, 4))
    with pytest.raises(ValueError, match="non-negative"):
        codebook_usage(torch.tensor([[1.5, -0.5]]))


# ---------------------------------------------------------------------------------- the report


def _section(markdown: str, title: str) -> str:
    """The body of the section of ``markdown`` whose heading starts with ``title``."""
    return re.split(r"^#{1,2} " + re.escape(title) + ".*$", markdown, maxsplit=1, flags=re.M)[1] \
        .split("\n## ")[0]


def _table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row in ``text`` (header and separator rows left out)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def test_build_report_writes_self_contained_html_and_markdown(tmp_path, report_inputs):
    inputs = report_inputs()
    paths = build_report(inputs, tmp_path / "out")
    assert set(paths) == {"markdown", "html", "artifact"}
    assert all(path.is_file() for path in paths.values())
    page = paths["html"].read_text()
    markdown = paths["markdown"].read_text()

    # self-contained: nothing fetched from anywhere
    for forbidden in ("http://", "https://", 'src="file', "<script", "<link"):
        assert forbidden not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    # loss curves + codebook histograms (one per variant with a codebook) + 2 retrieval strips + Grad-CAM
    assert len(sources) == 5
    # markdown points at PNG files that exist
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(linked) == 5 and all((paths["markdown"].parent / p).is_file() for p in linked)

    for text in (page, markdown):
        for row in REPORT_ROWS:  # an optional row (transfer) only where a variant has results
            assert (row.title in text) != row.optional, row.key
        for variant in ("codis", "albef"):
            assert variant in text
        # the paper's CODIS numbers, beside ours
        assert "71.5" in text and "74.70" in text and "74.86" in text and "80.84" in text and "59.38" in text
        assert "41.30" in text and "57.90" in text
        assert NOT_RUN in text
        assert "not comparable" in text
        assert "majority answer" in text and "chance" in text


def test_report_marks_missing_pieces_not_run(tmp_path, report_inputs):
    inputs = report_inputs()
    markdown = build_report(inputs, tmp_path / "out")["markdown"].read_text()
    summary = markdown.split("## Summary")[1].split("\n## ")[0]
    ve_row = next(line for line in summary.splitlines() if line.startswith("| SNLI-VE"))
    # neither variant ran SNLI-VE; the trivial baseline is there
    assert ve_row.count(NOT_RUN) == 2 and "33.40" in ve_row
    finetuned = [line for line in summary.splitlines()
                 if line.startswith("| Image-text retrieval (finetuned)")]
    assert len(finetuned) == 7 and all(line.split("|")[4].strip() == NOT_RUN for line in finetuned)
    # albef has no codebook by construction of its mode, and no Grad-CAM figure
    assert "no codebook in this mode" in markdown
    gradcam = markdown.split("## Grad-CAM")[1].split("\n## ")[0]
    assert f"albef: {NOT_RUN}" in gradcam


# ---------------------------------------------------------------------------------- CODIS vs ALBEF


def _verdicts(markdown: str) -> dict[tuple[str, str], str]:
    """``{(task title, metric): verdict}`` of the report's CODIS vs ALBEF table."""
    rows = _table_rows(_section(markdown, "CODIS vs ALBEF"))
    assert rows[0] == ["Task", "Metric", "Paper delta", "This run: albef -> codis", "Verdict"]
    return {(row[0], row[1]): row[4] for row in rows[1:]}


def test_standard_error_of_a_proportion():
    assert standard_error(50.0, 400) == pytest.approx(2.5)  # 100 * sqrt(0.25 / 400)
    assert standard_error(40.0, 100) == pytest.approx(4.898979)  # 100 * sqrt(0.24 / 100)
    assert standard_error(0.0, 10) == 0.0 and standard_error(100.0, 10) == 0.0


def test_report_direction_without_item_counts_goes_by_sign(tmp_path, report_inputs):
    inputs = report_inputs()
    for baselines in inputs.baselines.values():
        baselines[:] = [dataclasses.replace(b, items={}) for b in baselines]
    markdown = build_report(inputs, tmp_path / "out")["markdown"].read_text()
    verdicts = _verdicts(markdown)
    # codis = albef + 2 on zero-shot retrieval: same sign as the paper everywhere on R@1
    assert verdicts["Image-text retrieval (zero-shot)", "txt_r1"] == "agrees"
    # NLVR2: albef 58.2 > codis 57.9, the paper has CODIS ahead on both splits
    assert verdicts["NLVR²", "accuracy"] == "disagrees"
    # finetuned: albef did not run it
    assert verdicts["Image-text retrieval (finetuned)", "img_r1"] == NOT_RUN
    assert "judged by their sign alone" in _section(markdown, "CODIS vs ALBEF")


@pytest.mark.parametrize("key, title, codis, albef, verdict", [
    # 2 SE at the baseline 50 % over 400 items: 2 * 2.5 = 5.0; both within 5.0 of 50 -> at chance,
    # although the difference 8 is beyond its own 2 SE, 200 * sqrt((.54*.46 + .46*.54) / 400) = 7.05
    ("ve", "SNLI-VE", 54.0, 46.0, "at chance (both)"),
    # both beyond 5.0 of 50; the difference 5 within 200 * sqrt((.62*.38 + .57*.43) / 400) = 6.93
    ("nlvr", "NLVR²", 62.0, 57.0, "within noise"),
    # the difference 13 beyond 200 * sqrt((.70*.30 + .57*.43) / 400) = 6.75: the sign decides
    ("nlvr", "NLVR²", 70.0, 57.0, "agrees"),
    ("nlvr", "NLVR²", 57.0, 70.0, "disagrees"),
    # VQA, 100 questions, baselines 20 and 40: 2 SE at 40 = 200 * sqrt(.4*.6 / 100) = 9.80
    ("vqa", "VQA", 45.0, 49.7, "at chance (both)"),  # 5 and 9.7 from the prior 40
    ("vqa", "VQA", 45.0, 49.9, "within noise"),  # 9.9 > 9.80; 4.9 < 200 * sqrt((.2475 + .25) / 100) = 14.1
    ("vqa", "VQA", 70.0, 50.0, "agrees"),  # 10 > 9.80; 20 > 200 * sqrt((.21 + .25) / 100) = 13.6
])
def test_report_direction_withholds_verdicts_within_noise(tmp_path, report_inputs, key, title, codis,
                                                          albef, verdict):
    inputs = report_inputs()
    inputs.baselines = {
        "ve": [TrivialBaseline("majority label", "test", {"accuracy": 50.0}, {"accuracy": 400})],
        "nlvr": [TrivialBaseline("majority label", "test", {"accuracy": 50.0}, {"accuracy": 400})],
        "vqa": [TrivialBaseline("majority answer", "val", {"accuracy": 20.0}, {"accuracy": 100}),
                TrivialBaseline("question-type prior", "val", {"accuracy": 40.0}, {"accuracy": 100})]}
    inputs.variants["codis"].metrics[key] = {"accuracy": codis}
    inputs.variants["albef"].metrics[key] = {"accuracy": albef}
    markdown = build_report(inputs, tmp_path / "out")["markdown"].read_text()
    assert _verdicts(markdown)[title, "accuracy"] == verdict


def test_report_direction_of_the_demo_numbers(tmp_path, report_inputs):
    verdicts = _verdicts(build_report(report_inputs(), tmp_path / "out")["markdown"].read_text())
    # txt_r1 over 20 images, chance 24.6: 2 SE = 200 * sqrt(.246 * .754 / 20) = 19.3; 12.5 and 10.5 within
    assert verdicts["Image-text retrieval (zero-shot)", "txt_r1"] == "at chance (both)"
    # img_r1 over 100 captions, chance 5: 2 SE = 4.36, codis 11 beyond; +2 within
    # 200 * sqrt((.11*.89 + .09*.91) / 100) = 8.48
    assert verdicts["Image-text retrieval (zero-shot)", "img_r1"] == "within noise"


# ---------------------------------------------------------------------------------- what the run was


def test_wall_time_table_covers_every_stage_and_sums_to_the_run(tmp_path, report_inputs):
    inputs = report_inputs()  # 125 + reused (192) + 60.5 + 3.2 s of stages in a 200 s run
    markdown = build_report(inputs, tmp_path / "out")["markdown"].read_text()
    rows = _table_rows(_section(markdown, "Machine and wall times"))
    times = rows[rows.index(["Stage", "Seconds", "h:mm:ss", "Note"]) + 1:]
    assert [row[0] for row in times] == [t.label for t in inputs.wall_times] + [ORCHESTRATION, "total"]
    seconds = {row[0]: float(row[1]) for row in times}
    assert seconds[ORCHESTRATION] == pytest.approx(200.0 - 125.0 - 60.5 - 3.2)
    assert sum(float(row[1]) for row in times[:-1]) == pytest.approx(seconds["total"]) and \
        seconds["total"] == 200.0
    reused = times[1]
    assert reused[:3] == ["pretrain[albef]", "0.0", "0:00:00"]
    assert reused[3] == "reused (took 0:03:12 when computed)"

    # without the run's wall time: the stages' sum, no orchestration row
    inputs.run_seconds = None
    markdown = build_report(inputs, tmp_path / "out2")["markdown"].read_text()
    rows = _table_rows(_section(markdown, "Machine and wall times"))
    assert ORCHESTRATION not in {row[0] for row in rows}
    assert next(row for row in rows if row[0] == "total")[1:3] == ["188.7", "0:03:09"]


def test_report_states_the_scale_it_ran_at(tmp_path, report_inputs):
    inputs = report_inputs()  # steps x 0.02, one override, from pipelines/demo.yaml
    markdown = build_report(inputs, tmp_path / "out")["markdown"].read_text()
    intro = markdown.split("\n## ")[0]
    assert ("Read this first: this run was scaled down: every training step count x 0.02; recipe "
            "overrides: demo_world.pretrain_images=600.") in intro
    machine = _table_rows(_section(markdown, "Machine and wall times"))
    assert ["recipe", "demo (pipelines/demo.yaml)"] in machine
    assert ["recipe override", "demo_world.pretrain_images=600"] in machine
    assert ["processes that pretrained", "1"] in machine

    inputs.scale = RunScale(overrides=["a=1", "b=2"], world_size=4)
    markdown = build_report(inputs, tmp_path / "out2")["markdown"].read_text()
    assert "this run changed its recipe: recipe overrides: a=1, b=2." in markdown.split("\n## ")[0]
    assert ["processes that pretrained", "4"] in _table_rows(_section(markdown, "Machine and wall times"))

    inputs.scale = RunScale()  # the recipe as written: nothing to warn about
    markdown = build_report(inputs, tmp_path / "out3")["markdown"].read_text()
    assert "this run" not in markdown.split("\n## ")[0]
    machine = _table_rows(_section(markdown, "Machine and wall times"))
    assert ["recipe overrides", "none"] in machine and ["processes that pretrained", "1"] in machine


def test_report_states_each_task_protocol(tmp_path, report_inputs):
    markdown = build_report(report_inputs(), tmp_path / "out")["markdown"].read_text()
    beside = _section(markdown, "The paper's numbers beside this run's")
    for row in REPORT_ROWS:
        if row.optional:  # no variant has transfer results here: no row
            assert f"### {row.title}\n" not in beside and row.title not in markdown
            continue
        protocol = beside.split(f"### {row.title}\n")[1].strip().splitlines()[0]
        assert protocol.startswith(f"Protocol: {row.protocol};"), row.key
    zero_shot = beside.split("### Image-text retrieval (zero-shot)\n")[1]
    assert "no finetuning" in zero_shot.split("\n|")[0] and "COCO-finetuned" in zero_shot.split("\n|")[0]
    # the true zero-shot row is compared with the paper's zero-shot MSCOCO numbers only
    assert "Flickr30K" not in zero_shot.split("\n### ")[0].split("\n|", 1)[1]
    assert "the paper's is the same" in beside.split("### NLVR²\n")[1].split("\n|")[0]


def test_the_transfer_protocol_has_its_own_row_beside_the_papers_flickr_zero_shot(tmp_path,
                                                                                   report_inputs):
    inputs = report_inputs()
    transfer = {"txt_r1": 30.0, "txt_r5": 60.0, "txt_r10": 70.0, "img_r1": 20.0, "img_r5": 50.0,
                "img_r10": 65.0, "r_mean": 49.2}
    inputs.variants["codis"].metrics["retrieval_transfer"] = transfer
    markdown = build_report(inputs, tmp_path / "out")["markdown"].read_text()
    row = next(r for r in REPORT_ROWS if r.key == "retrieval_transfer")
    beside = _section(markdown, "The paper's numbers beside this run's")
    block = beside.split(f"### {row.title}\n")[1].split("\n### ")[0].strip()
    assert block.startswith(f"Protocol: {row.protocol};") and "transfer_from" in block
    rows = _table_rows(block)
    assert ["paper", "ALBEF 4M", "Flickr30K 1K", "90.5", "98.8", "99.7", "76.8", "93.7", "96.7", "-"] in rows
    assert ["this run", "codis", "demo test", "30.00", "60.00", "70.00", "20.00", "50.00", "65.00",
            "49.20"] in rows
    assert ["this run", "albef", "demo test", *[NOT_RUN] * 7] in rows
    summary = _table_rows(_section(markdown, "Summary"))
    assert any(r[0] == row.title and r[1] == "r_mean" and r[2] == "49.20" for r in summary)


# ---------------------------------------------------------------------------------- the Prefect artifact


def test_the_artifact_inlines_small_pngs_and_narrow_tables(tmp_path, report_inputs):
    inputs = report_inputs()
    wide = tmp_path / "wide.png"
    Image.effect_noise((1600, 300), 60).convert("RGB").save(wide)  # photo-like: compresses badly
    inputs.variants["codis"].gradcam_figures.append(Figure("a wide figure", wide))
    paths = build_report(inputs, tmp_path / "out")
    artifact, markdown = paths["artifact"].read_text(), paths["markdown"].read_text()

    targets = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", artifact)
    assert len(targets) == len(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)) == 6
    assert "report_files/" not in artifact
    for target in targets:
        assert target.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(target.split(",", 1)[1], validate=True))) as image:
            assert image.format == "PNG"
            image.load()
            assert image.width <= ARTIFACT_IMAGE_WIDTH
    assert len(artifact.encode()) < 2_000_000

    # every table fits: no cell wraps in Prefect's tables, so a column is as wide as its widest cell
    table: list[list[str]] = []
    for line in [*artifact.splitlines(), ""]:
        if line.startswith("|") and not line.startswith("|---"):
            table.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
        elif table:
            assert sum(max(map(len, column)) + 3 for column in zip(*table)) <= ARTIFACT_TABLE_WIDTH, table[0]
            table = []
    # the same report otherwise: its prose, in order, and every row of every table (maybe split)
    prose = [line for line in markdown.splitlines() if line and not line.startswith(("|", "!["))]
    assert [line for line in artifact.splitlines() if line and not line.startswith(("|", "!["))] == prose
    for row in _table_rows(markdown):
        assert row[0] in artifact and all(cell in artifact for cell in row)


def test_narrow_tables_splits_evenly_and_repeats_the_key_columns():
    table = Table(["Key", "Name", *(f"column {i}" for i in range(5))],
                  [["k1", "first", *("1234567" for _ in range(5))]], keys=2)
    assert table_width(table) == 6 + 8 + 5 * 11
    sections = narrow_tables([Section("s", ["text", table])], max_width=40)
    assert sections[0].blocks[0] == "text"
    parts = sections[0].blocks[1:]
    # 14 of key columns + 11 per other column: two per part fit, so three parts of 2, 2 and 1
    assert [part.headers for part in parts] == [["Key", "Name", "column 0", "column 1"],
                                               ["Key", "Name", "column 2", "column 3"],
                                               ["Key", "Name", "column 4"]]
    assert all(part.rows == [["k1", "first", *["1234567"] * (len(part.headers) - 2)]] for part in parts)
    assert narrow_tables([Section("s", [table])], max_width=100)[0].blocks == [table]


# ---------------------------------------------------------------------------------- inputs


def test_build_report_rejects_bad_inputs_before_writing(tmp_path, report_inputs):
    inputs = report_inputs()
    inputs.variants["codis"].retrieval_examples.append(
        RetrievalExample("gone", [tmp_path / "missing.png"], [True]))
    with pytest.raises(FileNotFoundError, match=r"variants\['codis'\].retrieval_examples\[1\]"):
        build_report(inputs, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    inputs = report_inputs()
    inputs.variants["albef"].metrics["captioning"] = {"cider": 1.0}
    with pytest.raises(ValueError, match="captioning"):
        build_report(inputs, tmp_path / "out")

    inputs = report_inputs()
    inputs.wall_times = {"pretrain": 12.0}  # the old {stage: seconds}
    with pytest.raises(TypeError, match=r"wall_times\[0\]: expected a StageTime"):
        build_report(inputs, tmp_path / "out")
    inputs.wall_times = [StageTime("pretrain", -1.0)]
    with pytest.raises(ValueError, match=r"wall_times\[0\] \(pretrain\)"):
        build_report(inputs, tmp_path / "out")


def test_trivial_baselines_from_manifest():
    manifest = {"baselines": {"retrieval_test": {"txt_r1": 5.0, "images": 10},
                              "vqa_val": {"majority_answer": "2", "majority_accuracy": 20.0,
                                          "question_type_prior_accuracy": 30.0},
                              "nlvr": {"test": {"majority_label": True, "accuracy": 52.0}},
                              "ve": {"test": {"majority_label": "neutral", "accuracy": 34.0}}}}
    baselines = trivial_baselines(manifest)
    assert baselines["retrieval_zero_shot"][0].metrics == {"txt_r1": 5.0}
    assert baselines["retrieval_finetuned"] == baselines["retrieval_zero_shot"]
    assert [b.metrics["accuracy"] for b in baselines["vqa"]] == [20.0, 30.0]
    assert baselines["nlvr"] == [TrivialBaseline("majority label (True)", "test", {"accuracy": 52.0})]
    with pytest.raises(ValueError, match="baselines"):
        trivial_baselines({})


def test_trivial_baselines_count_the_items_of_each_metric():
    manifest = {"baselines": {"retrieval_test": {"images": 10, "captions": 50, "txt_r1": 5.0,
                                                 "img_r1": 1.0, "r_mean": 9.0},
                              "vqa_val": {"questions": 30, "majority_answer": "2",
                                          "majority_accuracy": 20.0, "question_type_prior_accuracy": 30.0},
                              "ve": {"test": {"majority_label": "neutral", "accuracy": 34.0, "rows": 90}}}}
    baselines = trivial_baselines(manifest)
    # text retrieval ranks captions for each image, image retrieval images for each caption;
    # r_mean gets the fewer queries
    assert baselines["retrieval_zero_shot"][0].items == {"txt_r1": 10, "img_r1": 50, "r_mean": 10}
    assert [b.items for b in baselines["vqa"]] == [{"accuracy": 30}] * 2
    assert baselines["ve"][0].items == {"accuracy": 90}


def test_chart_draws_the_series():
    flat = chart({"a": [(0, 1.0), (1, 1.0)]}, "flat")
    rising = chart({"a": [(0, 0.0), (1, 1.0)], "b": [(0, 1.0), (1, 0.0)]}, "x")
    bars = chart({"h": [(i, float(10 - i)) for i in range(10)]}, "hist", "bar")
    for image in (flat, rising, bars):
        assert image.size == (380, 250)
        pixels = image.convert("RGB").getcolors(1 << 20)
        # drawn in colour, not just axes and text
        assert any(abs(r - g) > 60 or abs(g - b) > 60 for _, (r, g, b) in pixels)
    with pytest.raises(ValueError, match="kind"):
        chart({"a": [(0, 1.0)]}, "x", "pie")


def test_machine_info_current():
    machine = MachineInfo.current("cpu")
    assert machine.device == "cpu" and machine.cpu_count >= 1
    assert machine.torch_version == torch.__version__
    assert not math.isnan(float(machine.python_version.split(".")[0]))


# ---------------------------------------------------------------------------------- report rows, ITM AUC


def test_report_rows_are_the_task_tables_report_keys():
    assert [row.key for row in REPORT_ROWS] == [k for t in TASKS.values() for k in t.report_keys]
    for row in REPORT_ROWS:
        task = TASKS[row.task]
        assert row.key in task.report_keys and row.title.startswith(task.title)
        # every row reads at least one value of the paper's ALBEF and CODIS rows
        for method in (paper.ALBEF, paper.CODIS):
            found = []
            for ref in row.paper_refs:
                for metric in row.metrics:
                    try:
                        found.append(ref.value(method, metric))
                    except KeyError:
                        pass
            assert any(v is not None for v in found), (row.key, method)
    assert len({row.title for row in REPORT_ROWS}) == len(REPORT_ROWS)


def test_report_shows_the_itm_auc_where_measured(tmp_path, report_inputs):
    markdown = build_report(report_inputs(), tmp_path / "out")["markdown"].read_text()
    section = markdown.split("## Image-text matching against random negatives")[1].split("\n## ")[0]
    assert "| codis | 0.813 |" in section and f"| albef | {NOT_RUN} |" in section


def test_build_report_rejects_an_itm_auc_outside_0_1(tmp_path, report_inputs):
    inputs = report_inputs()
    inputs.variants["albef"].itm_auc = 81.3  # a percentage where a fraction belongs
    with pytest.raises(ValueError, match=r"variants\['albef'\].itm_auc"):
        build_report(inputs, tmp_path / "out")
