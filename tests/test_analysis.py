"""codis.report.analysis on random tiny checkpoints over a small demo world (files, codebook usage per
mode, ITC ranking checked against the model's own encoders, Grad-CAM PNGs, the report sections
they fill), and the flows' ``analyze`` stage with the codis call replaced by a fake (one per
variant, cached on a second run, re-run when its settings change, its outputs in ReportInputs)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

import codis  # noqa: F401
import codis.report.analysis
import codis.data.demo_world
import codis.data.download
import codis.metrics
import codis.report
import codis.report.collect
import codis.tasks.retrieval
import codis.data.shards
import codis.train
import flows  # noqa: F401  - sets PREFECT_SERVER_ANALYTICS_ENABLED before prefect is imported
from codis.report.analysis import (FUNCTION_WORDS, analyze_checkpoint, gradcam_words,
                                   image_specificity, query_rows, read_analysis)
from codis.config import preset
from codis.model import CodisModel, save_model
from codis.report import (Figure, MachineInfo, ReportInputs, RetrievalExample, VariantResults,
                          build_report)
from codis.data.shards import write_shards
from codis.text import clean_caption, tokenize
from codis.transforms import eval_transform
from flows import deployments
from flows.recipe import RecipeError
from flows.reproduce import reproduce

TEST_IMAGES = 7  # the tiny world's retrieval test split
CAPTIONS_PER_IMAGE = 5  # the demo world's retrieval captions per test image
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_world, shards, tiny_checkpoint) -> dict[str, Any]:
    """The shared tiny world (linked as root/world; the analyses write beside it), its retrieval
    test shards, and random tiny CODIS and ALBEF checkpoints."""
    root = tmp_path_factory.mktemp("analysis")
    (root / "world").symlink_to(tiny_world)
    records = json.loads((tiny_world / "retrieval" / "test.json").read_text())
    with torch.random.fork_rng():
        torch.manual_seed(0)  # as tiny_checkpoint's CODIS model
        albef = save_model(CodisModel(preset("tiny", mode="albef")), root / "albef.pt")
    return {"root": root, "records": records, "shards": shards("retrieval_eval", "test"),
            "checkpoints": {"codis": tiny_checkpoint, "albef": albef}}


@pytest.fixture(scope="module")
def analyses(world) -> dict[str, dict[str, Any]]:
    return {mode: analyze_checkpoint(checkpoint, world["shards"], world["root"] / f"out-{mode}",
                                     examples=3, top_k=4, gradcam_words=3, device="cpu")
            for mode, checkpoint in world["checkpoints"].items()}


def _own_image(world: dict[str, Any], query: str) -> Path:
    """The image of the test record one of whose captions is ``query`` (from the annotations)."""
    matches = [r["image"] for r in world["records"]
               if query in (clean_caption(c) for c in r["caption"])]
    assert len(matches) == 1, query
    return world["root"] / "world" / matches[0]


# ---- codis.report.analysis ------------------------------------------------------------------------------
def test_analysis_writes_its_files(world, analyses) -> None:
    for mode in ("codis", "albef"):
        folder = world["root"] / f"out-{mode}"
        data = json.loads((folder / codis.report.analysis.ANALYSIS_FILE).read_text())
        assert data["mode"] == mode and data["images"] == TEST_IMAGES
        assert data["texts"] == TEST_IMAGES * CAPTIONS_PER_IMAGE
        assert "ITC" in data["ranking"] and data["top_k"] == 4
        found = analyses[mode]
        assert len(found["retrieval_examples"]) == 3 and len(found["gradcam_figures"]) == 3
        assert all(isinstance(e, RetrievalExample) for e in found["retrieval_examples"])
        assert all(isinstance(f, Figure) for f in found["gradcam_figures"])
        assert read_analysis(folder) == found  # the return value is what the folder holds


def test_codebook_usage_for_codis_and_none_for_albef(analyses) -> None:
    assert analyses["albef"]["codebook"] is None
    usage = analyses["codis"]["codebook"]
    assert set(usage) == {"image", "text"}
    codewords = preset("tiny").codebook.size
    for source, samples in (("image", TEST_IMAGES), ("text", TEST_IMAGES * CAPTIONS_PER_IMAGE)):
        assert usage[source]["codewords"] == codewords and usage[source]["samples"] == samples
        assert sum(usage[source]["histogram"]) == samples
        assert 1 <= usage[source]["used"] <= min(samples, codewords)
        assert 0.0 <= usage[source]["entropy"] <= 1.0 + 1e-9


def test_examples_are_the_top_images_by_itc(world, analyses) -> None:
    """Each example's images are the query's top 4 by the model's own image and text encoders
    (eval transform on the original JPEGs), and "correct" marks exactly the query's own image."""
    model = codis.tasks.retrieval.load_retrieval_model(world["checkpoints"]["codis"])
    files = sorted((world["root"] / "world" / "images" / "retrieval_test").glob("*.jpg"))
    assert len(files) == TEST_IMAGES
    transform = eval_transform(model.config.vision.image_size)
    with torch.no_grad():
        images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
        image_feat, _ = model.encode_image(images)
    digests = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]

    queries = set()
    for example in analyses["codis"]["retrieval_examples"]:
        queries.add(example.query)
        ids, mask = tokenize(model.tokenizer, [example.query], model.config.text.max_length)
        with torch.no_grad():
            text_feat, _ = model.encode_text(ids, mask)
        scores = (image_feat @ text_feat.T)[:, 0]
        expected = [digests[i] for i in scores.topk(4).indices.tolist()]
        shown = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in example.image_paths]
        assert shown == expected  # same images, same order: the JPEG bytes are copied unchanged
        own = hashlib.sha256(_own_image(world, example.query).read_bytes()).hexdigest()
        assert list(example.correct) == [d == own for d in shown]
    assert len(queries) == 3  # three different images' captions


def test_gradcam_figures_are_pngs_of_the_most_image_specific_words(world, analyses) -> None:
    data = json.loads((world["root"] / "out-codis" / codis.report.analysis.ANALYSIS_FILE).read_text())
    assert data["gradcam_vocabulary"] is None
    scores = image_specificity([clean_caption(c) for c in r["caption"]] for r in world["records"])
    examples = analyses["codis"]["retrieval_examples"]
    for figure, record, example in zip(analyses["codis"]["gradcam_figures"],
                                       data["gradcam_figures"], examples):
        assert figure.path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(figure.path) as picture:
            width, height = picture.size
        assert width > height * (len(record["words"]) + 1) / 2  # image + one panel per word
        assert record["query"] == example.query and record["layer"] == 0  # first of 2 fusion layers
        words = [w for w in dict.fromkeys(example.query.split()) if w not in FUNCTION_WORDS]
        chosen = [scores[w] for w in record["words"]]
        assert chosen == sorted(chosen, reverse=True) and len(chosen) == min(3, len(words))
        assert all(scores[w] <= chosen[-1] for w in words if w not in record["words"])
        assert all(repr(w) in figure.caption for w in record["words"])


def test_the_report_shows_the_analysis_instead_of_not_run(world, analyses, tmp_path) -> None:
    variants = {mode: VariantResults(**found) for mode, found in analyses.items()}
    inputs = ReportInputs(variants=variants, recipe="t", machine=MachineInfo.current())
    written = build_report(inputs, tmp_path)
    markdown = written["markdown"].read_text()
    codebook = markdown.split("## Codebook usage")[1].split("\n## ")[0]
    assert "| codis | image | 32 | 7 |" in codebook and "| codis | text | 32 | 35 |" in codebook
    assert "no codebook in this mode" in codebook
    for section in ("## Retrieval examples", "## Grad-CAM"):
        body = markdown.split(section)[1].split("\n## ")[0]
        assert "not run" not in body
        assert body.count("codis") >= 3 and body.count("albef") >= 3
    matching = markdown.split("## Image-text matching")[1].split("\n## ")[0]
    for mode, found in analyses.items():
        assert f"| {mode} | {found['itm_auc']:.3f} |" in matching


def test_helpers_choose_spread_queries_and_content_words() -> None:
    assert query_rows(7, 3) == [0, 2, 4] and query_rows(2, 5) == [0, 1] and query_rows(5, 1) == [0]
    caption = "there is a small red square to the left of a grey circle and a red star".split()
    assert gradcam_words(caption, 3) == ["small", "red", "square"]  # content words, caption order
    vocabulary = dict.fromkeys(["red", "grey", "square", "circle", "star"], 1.0)
    assert gradcam_words(caption, 3, vocabulary) == ["red", "square", "grey"]
    assert gradcam_words(caption, 10, vocabulary) == ["red", "square", "grey", "circle", "star", "small"]
    assert gradcam_words(caption, 2, {"star": 0.9, "small": 0.2, "red": 0.5}) == ["star", "red"]
    assert gradcam_words("two dogs play on the grass".split(), 2) == ["dogs", "play"]


def test_bad_arguments_fail_before_any_work(world, tmp_path) -> None:
    checkpoint, shards = world["checkpoints"]["codis"], world["shards"]
    with pytest.raises(ValueError, match="examples"):
        analyze_checkpoint(checkpoint, shards, tmp_path / "a", examples=0)
    with pytest.raises(ValueError, match="gradcam_words"):
        analyze_checkpoint(checkpoint, shards, tmp_path / "a", gradcam_words=True)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        analyze_checkpoint(tmp_path / "missing.pt", shards, tmp_path / "a")
    records = json.loads((world["root"] / "world" / "retrieval" / "train.json").read_text())
    write_shards(records, world["root"] / "world", tmp_path / "train", kind="retrieval_train",
                 progress=False)
    with pytest.raises(ValueError, match="retrieval_eval"):
        analyze_checkpoint(checkpoint, tmp_path / "train", tmp_path / "a")
    assert not (tmp_path / "a").exists()


# ---- the analyze stage in the flows --------------------------------------------------------------
@pytest.fixture(scope="module")
def prefect_api():
    """A temporary Prefect API; no telemetry (it locks the test database)."""
    from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings(updates={PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


class Fakes:
    """Fast stand-ins for the codis functions a zero-shot retrieval reproduction calls; each
    records (name, arguments) and writes files shaped like the real ones."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def generate_demo_world(self, root, config, progress=True):
        self.calls.append(("generate_demo_world", {}))
        root = Path(root)
        (root / "retrieval").mkdir(parents=True, exist_ok=True)
        records = [{"image": "x.jpg", "caption": ["a"]}]
        (root / "retrieval" / "test.json").write_text(json.dumps(records))
        (root / "pretrain").mkdir(parents=True, exist_ok=True)
        (root / "pretrain" / "urls.parquet").write_bytes(b"urls")
        manifest = {"images": {"pretrain": 4}, "pretrain_pairs": 4, "baselines": {}}
        (root / "manifest.json").write_text(json.dumps(manifest))
        return manifest

    def download_demo(self, demo_root, output_dir, config, progress=True):
        self.calls.append(("download_demo", {}))
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "00000.tar").write_text("pairs")
        manifest = {"totals": {"count": 4, "successes": 4, "success_rate": 1.0},
                    "shards": [{"name": "00000.tar"}]}
        (out / "manifest.json").write_text(json.dumps(manifest))
        return manifest

    def write_shards(self, records, image_root, output_dir, *, kind, samples_per_shard=1000,
                     source=None, progress=True, **kwargs):
        self.calls.append(("write_shards", {"kind": kind}))
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "shard-000000.tar").write_text(json.dumps(records))
        manifest = {"kind": kind, "num_samples": len(records),
                    "shards": [{"name": "shard-000000.tar"}]}
        (out / "manifest.json").write_text(json.dumps(manifest))
        return manifest

    def pretrain(self, config, *, resume=True, callback=None, progress=True, stop_after=None):
        self.calls.append(("pretrain", {"mode": config.model.mode}))
        callback(1, {"loss": 1.0})
        out = Path(config.output_dir) / "model.pt"
        out.write_text(f"weights of {config.model.mode}")
        return out

    def evaluate(self, checkpoint, shards, config=None, *, progress=True, **kwargs):
        self.calls.append(("retrieval.evaluate", {"checkpoint": str(checkpoint)}))
        return {"txt_r1": 10.0, "img_r1": 10.0, "r_mean": 10.0}

    def analyze_checkpoint(self, checkpoint, eval_shards, output_dir, *, config=None, examples=3,
                           top_k=5, gradcam_words=3, progress=False, **kwargs):
        self.calls.append(("analyze_checkpoint", {
            "checkpoint": str(checkpoint), "eval_shards": str(eval_shards), "config": config,
            "examples": examples, "top_k": top_k, "gradcam_words": gradcam_words}))
        output_dir = Path(output_dir)
        (output_dir / "images").mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
        for name in ("images/0.png", "gradcam_1.png"):
            (output_dir / name).write_bytes(buffer.getvalue())
        mode = Path(checkpoint).read_text().split()[-1]
        usage = codis.metrics.codebook_usage(torch.full((2, 4), 0.25))
        data = {"format": codis.report.analysis.FORMAT,
                "codebook": {"image": usage, "text": usage} if mode == "codis" else None,
                "itm_auc": 0.75 if mode == "codis" else 0.5,
                "retrieval_examples": [{"query": f"query of {mode}", "images": ["images/0.png"],
                                        "correct": [True]}] * examples,
                "gradcam_figures": [{"caption": f"grad-cam of {mode}", "path": "gradcam_1.png"}]}
        (output_dir / codis.report.analysis.ANALYSIS_FILE).write_text(json.dumps(data))
        return read_analysis(output_dir)

    def build_report(self, results, output_dir):
        self.calls.append(("build_report", {"results": results}))
        output_dir = Path(output_dir)
        (output_dir / "report.md").write_text(results.recipe)
        (output_dir / "report.html").write_text(results.recipe)
        (output_dir / "report_artifact.md").write_text(results.recipe)
        return {"markdown": output_dir / "report.md", "html": output_dir / "report.html",
                "artifact": output_dir / "report_artifact.md"}


@pytest.fixture
def fakes(monkeypatch, prefect_api) -> Fakes:
    fake = Fakes()
    monkeypatch.setattr(codis.data.demo_world, "generate_demo_world", fake.generate_demo_world)
    monkeypatch.setattr(codis.data.download, "download_demo", fake.download_demo)
    monkeypatch.setattr(codis.data.shards, "write_shards", fake.write_shards)
    monkeypatch.setattr(codis.train, "pretrain", fake.pretrain)
    monkeypatch.setattr(codis.tasks.retrieval, "evaluate", fake.evaluate)
    monkeypatch.setattr(codis.report.analysis, "analyze_checkpoint", fake.analyze_checkpoint)
    monkeypatch.setattr(codis.report.collect, "build_report", fake.build_report)
    return fake


def recipe_data(analysis: dict[str, Any] | None = None) -> dict[str, Any]:
    report: dict[str, Any] = {"baseline_variant": "albef"}
    if analysis is not None:
        report["analysis"] = analysis
    return {
        "name": "t",
        "demo_world": {"seed": 1, "pretrain_images": 4},
        "pretrain_data": [{"name": "web", "url_list": "demo://pretrain/urls.parquet"}],
        "variants": {"codis": {"preset": "tiny", "model": {"mode": "codis"}},
                     "albef": {"preset": "tiny", "model": {"mode": "albef"}}},
        "pretrain": {"train": {"steps": 1, "batch_size": 4, "checkpoint_every": 1, "log_every": 1},
                     "optim": {"lr": 1e-3, "warmup_steps": 0}, "reference_batch": 4,
                     "data": {"num_workers": 0}},
        "tasks": [{"task": "retrieval", "name": "t", "preset": "demo", "zero_shot": True,
                   "finetune": False, "eval_data": {"annotations": "demo://retrieval/test.json",
                                                    "image_root": "demo://"}}],
        "report": report,
    }


def run(root: Path, data: dict[str, Any], overrides: list[str] | None = None) -> dict[str, Any]:
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    return reproduce(recipe_file=str(recipe), overrides=tuple(overrides or ()), runs_root=str(root / "runs"),
                     track=False, progress=False)


def test_analyze_stage_runs_per_variant_is_cached_and_reaches_the_report(fakes, tmp_path) -> None:
    summary = run(tmp_path, recipe_data({"examples": 2}))
    per_variant = ["pretrain", "retrieval.evaluate", "analyze_checkpoint"]
    assert fakes.names() == ["generate_demo_world", "download_demo", "write_shards",
                             *per_variant, *per_variant, "build_report"]
    analyzed = [args for name, args in fakes.calls if name == "analyze_checkpoint"]
    for args, variant in zip(analyzed, ("codis", "albef")):
        pretrained = Path(summary["variants"][variant]["pretrain"]["path"]) / "model.pt"
        assert args["checkpoint"] == str(pretrained)  # the variant's pretrained checkpoint
        manifest = json.loads((Path(args["eval_shards"]) / "manifest.json").read_text())
        assert manifest["kind"] == "retrieval_eval"
        assert (args["examples"], args["top_k"], args["gradcam_words"]) == (2, 5, 3)
        assert args["config"] == codis.tasks.retrieval.config("demo")  # as the evaluation reads
    evaluated = [args for name, args in fakes.calls if name == "retrieval.evaluate"]
    assert [a["checkpoint"] for a in evaluated] == [a["checkpoint"] for a in analyzed]

    results = fakes.calls[-1][1]["results"]
    codis_results, albef_results = results.variants["codis"], results.variants["albef"]
    assert set(codis_results.codebook) == {"image", "text"} and albef_results.codebook is None
    assert [e.query for e in codis_results.retrieval_examples] == ["query of codis"] * 2
    assert albef_results.gradcam_figures[0].caption == "grad-cam of albef"
    assert (codis_results.itm_auc, albef_results.itm_auc) == (0.75, 0.5)
    for variant in (codis_results, albef_results):
        assert all(Path(p).is_file() for e in variant.retrieval_examples for p in e.image_paths)
        assert all(f.path.is_file() for f in variant.gradcam_figures)
    assert {f"analyze[retrieval.t/{v}]" for v in ("codis", "albef")} <= {t.label for t in results.wall_times}
    analyze_stages = [s for s in summary["stages"] if s["stage"] == "analyze"]
    assert len(analyze_stages) == 2
    assert analyze_stages[0]["metrics"]["analysis.codebook.image.used"] == 1.0
    assert set(analyze_stages[1]["metrics"]) == {"analysis.itm_auc"}  # ALBEF: no codebook

    fakes.calls.clear()
    again = run(tmp_path, recipe_data({"examples": 2}))
    assert fakes.calls == []
    assert all(s["cached"] for s in again["stages"])

    options = {"recipe_file": str(tmp_path / "recipe.yaml"), "runs_root": str(tmp_path / "runs"),
               "track": False, "progress": False}
    rebuilt = deployments.report(overrides=("report.analysis.examples=2",), options=options)
    assert rebuilt["cached"] and rebuilt["key"] == again["report"]["stage"].rsplit("/", 1)[-1]
    assert fakes.calls == []

    run(tmp_path, recipe_data({"examples": 2}), overrides=["report.analysis.gradcam_words=1"])
    assert fakes.names() == ["analyze_checkpoint", "analyze_checkpoint", "build_report"]


def test_no_analysis_section_runs_no_analyze_stage(fakes, tmp_path) -> None:
    summary = run(tmp_path, recipe_data(None))
    assert "analyze_checkpoint" not in fakes.names()
    results = fakes.calls[-1][1]["results"]
    codis_results = results.variants["codis"]
    assert codis_results.codebook is None and not codis_results.gradcam_figures
    assert "analysis" not in summary["variants"]["codis"]


def test_analysis_needs_a_retrieval_task(fakes, tmp_path) -> None:
    data = recipe_data({})
    data["tasks"] = [{"task": "ve", "name": "t", "preset": "demo",
                      "train_data": [{"annotations": "demo://ve/train.json",
                                      "image_root": "demo://"}],
                      "eval_data": {"annotations": "demo://ve/test.json", "image_root": "demo://"}}]
    with pytest.raises(RecipeError, match="report.analysis"):
        run(tmp_path, data)
    assert fakes.calls == []


# ---- ITM AUC, word choice, analysis format --------------------------------------------------------
def test_ranking_auc_on_known_cases() -> None:
    auc = codis.report.analysis.ranking_auc
    assert auc(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.5])) == 0.75  # 3 of 4 pairs
    assert auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert auc(torch.tensor([1.0]), torch.tensor([1.0, 1.0])) == 0.5  # ties count half
    generator = torch.Generator().manual_seed(0)
    positive = torch.randint(0, 5, (40,), generator=generator).float()  # many ties
    negative = torch.randint(0, 4, (30,), generator=generator).float()
    pairs = (positive[:, None] > negative[None, :]).float() + 0.5 * (positive[:, None] == negative[None, :])
    assert auc(positive, negative) == pytest.approx(pairs.mean().item())
    with pytest.raises(ValueError, match="negatives"):
        auc(torch.tensor([1.0]), torch.tensor([]))


class _RowMatcher(torch.nn.Module):
    """ITM of an encoding whose image and text tokens hold image rows: ``match`` scores a pair 1 if
    the rows are equal and -1 otherwise; ``text_only`` scores a caption by its text alone."""

    def __init__(self, rule: str) -> None:
        super().__init__()
        self.rule = rule
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def itm_logits(self, image_tokens, text_tokens, attention_mask):
        image_row, text_row = image_tokens[:, 0, 0], text_tokens[:, 0, 0]
        if self.rule == "match":
            score = (image_row == text_row).float() * 2 - 1
        else:
            score = text_row * 0.1
        return torch.stack([torch.zeros_like(score), score], dim=1)


def _row_encoding(images: int, texts: int) -> codis.tasks.retrieval.EncodedEvalSet:
    text_to_image = torch.arange(texts) % images
    rows = torch.arange(images, dtype=torch.float32)
    return codis.tasks.retrieval.EncodedEvalSet(
        image_feat=torch.zeros(images, 4), image_tokens=rows[:, None, None].expand(images, 2, 3),
        text_feat=torch.zeros(texts, 4),
        text_tokens=text_to_image.float()[:, None, None].expand(texts, 2, 3),
        text_mask=torch.ones(texts, 2, dtype=torch.long), text_to_image=text_to_image)


def test_itm_auc_is_one_for_a_perfect_matcher_and_half_for_a_blind_one() -> None:
    encoded = _row_encoding(images=4, texts=10)
    itm_auc = codis.report.analysis.itm_auc
    # 1.0 also means no negative was the caption's own image (it would tie with the positives)
    assert itm_auc(_RowMatcher("match"), encoded, batch_size=3) == 1.0
    assert itm_auc(_RowMatcher("text_only"), encoded, batch_size=3) == 0.5
    assert itm_auc(_RowMatcher("match"), _row_encoding(images=1, texts=3)) is None


def test_image_specificity_scores_words_the_other_captions_repeat() -> None:
    scores = image_specificity([["a red ball", "a red box"], ["a blue ball", "a blue cup"],
                                ["green thing"]])  # one caption: tells nothing, skipped
    assert scores == pytest.approx({"a": 0.0, "red": 0.5, "blue": 0.5, "ball": -0.5, "box": -0.25,
                                    "cup": -0.25})


def test_a_vocabulary_keeps_the_demo_worlds_colour_and_shape_words(world, tmp_path) -> None:
    """The caller that knows its dataset (here the demo world) names the words to show first."""
    shapes = codis.data.demo_world.SHAPES
    vocabulary = {*codis.data.demo_world.COLORS, "grey", *shapes,
                  *(s + ("es" if s.endswith("s") else "s") for s in shapes)}
    found = analyze_checkpoint(world["checkpoints"]["albef"], world["shards"], tmp_path / "out",
                               examples=2, top_k=2, gradcam_words=3, gradcam_vocabulary=vocabulary,
                               device="cpu")
    data = json.loads((tmp_path / "out" / codis.report.analysis.ANALYSIS_FILE).read_text())
    assert data["gradcam_vocabulary"] == sorted(vocabulary)
    assert 0.0 <= found["itm_auc"] <= 1.0 and data["itm_negatives"]
    for record in data["gradcam_figures"]:
        words = record["query"].split()
        named = [w for w in dict.fromkeys(words) if w in vocabulary]
        assert record["words"][:len(named)] == named[:3]
    with pytest.raises(TypeError, match="gradcam_vocabulary"):
        analyze_checkpoint(world["checkpoints"]["albef"], world["shards"], tmp_path / "a",
                           gradcam_vocabulary="red")
    with pytest.raises(ValueError, match="gradcam_vocabulary"):
        analyze_checkpoint(world["checkpoints"]["albef"], world["shards"], tmp_path / "a",
                           gradcam_vocabulary=["Red"])
    assert not (tmp_path / "a").exists()


def test_read_analysis_reads_format_1_without_the_itm_auc(tmp_path) -> None:
    data = {"format": 1, "codebook": None, "retrieval_examples": [], "gradcam_figures": []}
    (tmp_path / codis.report.analysis.ANALYSIS_FILE).write_text(json.dumps(data))
    assert read_analysis(tmp_path)["itm_auc"] is None
    data["format"] = 3
    (tmp_path / codis.report.analysis.ANALYSIS_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format 3"):
        read_analysis(tmp_path)
