import math
import re

import pytest
import torch
from PIL import Image

from codis.metrics import codebook_usage
from codis.report import (NOT_RUN, REPORT_ROWS, Figure, MachineInfo, ReportInputs, RetrievalExample,
                          TrivialBaseline, VariantResults, build_report, paper, trivial_baselines)
from codis.report.charts import chart
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


def _image(path, colour):
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def _inputs(tmp_path) -> ReportInputs:
    images = [_image(tmp_path / f"img{i}.png", c) for i, c in enumerate(["red", "green", "blue"])]
    figure = _image(tmp_path / "gradcam.png", "yellow")
    curve = [(step, {"loss": 10.0 / (1 + step), "ica": 4.0 / (1 + step), "itm": 0.7})
             for step in range(0, 50, 5)]
    retrieval = {"txt_r1": 12.5, "txt_r5": 40.0, "txt_r10": 61.25, "img_r1": 11.0, "img_r5": 38.0,
                 "img_r10": 55.0, "r_mean": 36.29}
    codebook_assign = torch.softmax(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)), -1)
    codis = VariantResults(
        loss_curve=curve,
        metrics={"retrieval_zero_shot": retrieval,
                 "retrieval_finetuned": {k: v + 5 for k, v in retrieval.items()},
                 "vqa": {"accuracy": 41.3}, "nlvr": {"accuracy": 57.9}},  # ve not run
        codebook={"image": codebook_usage(codebook_assign), "text": codebook_usage(codebook_assign.flip(0))},
        retrieval_examples=[RetrievalExample("a red square", images, [True, False, False])],
        gradcam_figures=[Figure("a red square: words", figure)],
        itm_auc=0.8131)
    albef = VariantResults(
        loss_curve=[(s, {k: v * 1.1 for k, v in d.items()}) for s, d in curve],
        metrics={"retrieval_zero_shot": {k: v - 2 for k, v in retrieval.items()},
                 "vqa": {"accuracy": 40.1}, "nlvr": {"accuracy": 58.2}},
        retrieval_examples=[RetrievalExample("a green square", images[1:], [False, True])])
    manifest = {"baselines": {
        "retrieval_test": {"images": 20, "captions": 100, "txt_r1": 24.6, "txt_r5": 74.0,
                           "txt_r10": 93.0, "img_r1": 5.0, "img_r5": 25.0, "img_r10": 50.0,
                           "r_mean": 45.3},
        "vqa_val": {"majority_answer": "yes", "majority_accuracy": 23.4,
                    "question_type_prior_accuracy": 38.8},
        "nlvr": {"dev": {"majority_label": True, "accuracy": 50.5},
                 "test": {"majority_label": False, "accuracy": 51.0}},
        "ve": {"test": {"majority_label": "entailment", "accuracy": 33.4}}}}
    return ReportInputs(variants={"codis": codis, "albef": albef}, recipe="demo",
                        machine=MachineInfo.current("cpu"), baselines=trivial_baselines(manifest),
                        wall_times={"pretrain": 125.0, "finetune": 60.5, "evaluate": 3.2})


def test_build_report_writes_self_contained_html_and_markdown(tmp_path):
    inputs = _inputs(tmp_path)
    paths = build_report(inputs, tmp_path / "out")
    assert set(paths) == {"markdown", "html"}
    assert paths["markdown"].is_file() and paths["html"].is_file()
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
        for row in REPORT_ROWS:
            assert row.title in text
        for variant in ("codis", "albef"):
            assert variant in text
        # the paper's CODIS numbers, beside ours
        assert "71.5" in text and "74.70" in text and "74.86" in text and "80.84" in text and "59.38" in text
        assert "41.30" in text and "57.90" in text
        assert NOT_RUN in text
        assert "not comparable" in text
        assert "majority answer" in text and "chance" in text


def test_report_marks_missing_pieces_not_run(tmp_path):
    inputs = _inputs(tmp_path)
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


def test_report_direction_against_the_paper(tmp_path):
    inputs = _inputs(tmp_path)
    markdown = build_report(inputs, tmp_path / "out")["markdown"].read_text()
    direction = markdown.split("## CODIS vs ALBEF")[1].split("\n## ")[0]
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in direction.splitlines()
            if line.startswith("| ")}
    # codis = albef + 2 on zero-shot retrieval: same sign as the paper everywhere on R@1
    assert rows[("Image-text retrieval (zero-shot)", "txt_r1")].rstrip(" |").endswith("agrees")
    # NLVR2: albef 58.2 > codis 57.9, the paper has CODIS ahead on both splits
    assert rows[("NLVR²", "accuracy")].rstrip(" |").endswith("disagrees")
    # finetuned: albef did not run it
    assert rows[("Image-text retrieval (finetuned)", "img_r1")].rstrip(" |").endswith(NOT_RUN)


def test_build_report_rejects_bad_inputs_before_writing(tmp_path):
    inputs = _inputs(tmp_path)
    inputs.variants["codis"].retrieval_examples.append(
        RetrievalExample("gone", [tmp_path / "missing.png"], [True]))
    with pytest.raises(FileNotFoundError, match=r"variants\['codis'\].retrieval_examples\[1\]"):
        build_report(inputs, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    inputs = _inputs(tmp_path)
    inputs.variants["albef"].metrics["captioning"] = {"cider": 1.0}
    with pytest.raises(ValueError, match="captioning"):
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


def test_report_shows_the_itm_auc_where_measured(tmp_path):
    markdown = build_report(_inputs(tmp_path), tmp_path / "out")["markdown"].read_text()
    section = markdown.split("## Image-text matching against random negatives")[1].split("\n## ")[0]
    assert "| codis | 0.813 |" in section and f"| albef | {NOT_RUN} |" in section


def test_build_report_rejects_an_itm_auc_outside_0_1(tmp_path):
    inputs = _inputs(tmp_path)
    inputs.variants["albef"].itm_auc = 81.3  # a percentage where a fraction belongs
    with pytest.raises(ValueError, match=r"variants\['albef'\].itm_auc"):
        build_report(inputs, tmp_path / "out")
