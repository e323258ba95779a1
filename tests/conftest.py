"""Fixtures shared by the test modules, each built once per test run: one tiny demo world
(``tiny_world``), its shards (``shards(kind, split)``) and one tiny pretrained checkpoint
(``tiny_checkpoint``). They are shared across modules, so tests read them and write into their
own ``tmp_path``. ``report_inputs()`` builds a report's inputs afresh for each test."""

import os

# Nothing may reach a model hub from the tests; the tokenizers and weights used are all local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (scripts/test.sh runs two workers): each worker keeps its own Prefect state
# (two test processes on one SQLite database lock each other out) and its share of the CPUs for
# torch (more threads than cores only wait on each other).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["PREFECT_HOME"] = os.path.join(
        os.environ.get("PREFECT_HOME", os.path.join(os.getcwd(), ".cache", "prefect")),
        os.environ["PYTEST_XDIST_WORKER"])
    os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))

import codis  # noqa: E402,F401  - the torchvision compat shim runs before any test imports timm

import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from codis.config import preset  # noqa: E402
from codis.data.demo_world import DemoWorldConfig, generate_demo_world  # noqa: E402
from codis.data.shards import write_shards  # noqa: E402
from codis.metrics import codebook_usage  # noqa: E402
from codis.model import CodisModel, save_model  # noqa: E402
from codis.report import (Figure, MachineInfo, ReportInputs, RetrievalExample, RunScale,  # noqa: E402
                          StageTime, VariantResults, trivial_baselines)

# The smallest world that serves every test using it. Tests assert some of these sizes: 8
# retrieval training images (test_retrieval: the queued image ids), 7 test images (test_analysis;
# at most 10, so every caption's image is in its top 10), 10 NLVR² dev pairs and 4 x 3 SNLI-VE dev
# examples (their evaluation tests), 400 / 200 labelled images (test_vision_init learns colours
# from them; test_cli counts the evaluated ones). 12 pretraining images: NLVR² text assignment
# draws batches of 8 pairs. 32 px: the loaders resize to the model's size anyway.
TINY_WORLD = DemoWorldConfig(
    image_size=32, pretrain_images=12,
    retrieval_images={"train": 8, "val": 1, "test": 7},
    vqa_images={"train": 8, "val": 4, "test": 2},
    nlvr_pairs={"train": 16, "dev": 10, "test": 1},
    ve_images={"train": 8, "dev": 4, "test": 1},
    classification_images={"train": 400, "val": 200},
    dead_urls=0, non_image_urls=0)
# Small, so that every split but the tiniest spans several shards and ends with a partial one.
SAMPLES_PER_SHARD = 4
# The annotation file each shard kind is written from, relative to the world.
ANNOTATIONS = {"pretrain": "pretrain/captions.json", "retrieval_train": "retrieval/{split}.json",
               "retrieval_eval": "retrieval/{split}.json", "vqa": "vqa/{split}.json",
               "nlvr": "nlvr/{split}.json", "ve": "ve/{split}.json"}

ShardFactory = Callable[[str, str], Path]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The files holding slow tests first, each in its own order: scripts/test.sh's workers take
    a file at a time, and a long file picked up last would end the run alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The root of a demo world of :data:`TINY_WORLD`'s sizes."""
    root = tmp_path_factory.mktemp("tiny_world")
    generate_demo_world(root, TINY_WORLD, progress=False)
    return root


@pytest.fixture(scope="session")
def shards(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> ShardFactory:
    """``shards(kind, split)``: the folder of write_shards output for ``tiny_world``'s ``split``
    of ``kind`` ("pretrain" has only "train"), written on first use. VQA shards name the world's
    answer list in their manifest, so evaluation finds it."""
    root = tmp_path_factory.mktemp("tiny_shards")
    written: dict[tuple[str, str], Path] = {}

    def folder(kind: str, split: str) -> Path:
        if (kind, split) not in written:
            if kind not in ANNOTATIONS:
                raise ValueError(f"kind: must be one of {', '.join(ANNOTATIONS)}, got {kind!r}")
            if kind == "pretrain" and split != "train":
                raise ValueError(f"split: pretraining has only 'train', got {split!r}")
            annotations = tiny_world / ANNOTATIONS[kind].format(split=split)
            if not annotations.is_file():
                raise ValueError(f"split: the tiny world has no {kind} split {split!r}")
            source = ({"answer_list": str(tiny_world / "vqa" / "answer_list.json")}
                      if kind == "vqa" else None)
            out = root / f"{kind}-{split}"
            write_shards(json.loads(annotations.read_text()), tiny_world, out, kind=kind,
                         samples_per_shard=SAMPLES_PER_SHARD, source=source, progress=False)
            written[kind, split] = out
        return written[kind, split]

    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised ``tiny`` CodisModel (torch seed 0) saved with save_model: the
    pretrained checkpoint the task tests finetune and evaluate. The global RNG is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CodisModel(preset("tiny"))
    return save_model(model, tmp_path_factory.mktemp("tiny_checkpoint") / "pretrained.pt")


@pytest.fixture
def transform_calls(monkeypatch: pytest.MonkeyPatch):
    """Counts the images the training transforms (pretraining and task finetuning) are applied to,
    in every loader process (a shared counter: DataLoader workers add to it too); reset it by
    setting ``.value``."""
    import multiprocessing
    from codis.data import loaders

    calls = multiprocessing.Value("q", 0)

    def counting(build):
        def built(*args, **kwargs):
            transform = build(*args, **kwargs)

            def counted(image):
                with calls.get_lock():
                    calls.value += 1
                return transform(image)
            return counted
        return built

    for name in ("pretrain_transform", "train_transform"):
        monkeypatch.setattr(loaders, name, counting(getattr(loaders, name)))
    return calls


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a
    shared CPU, several threads per small op of a tiny model only wait on each other (a retrieval
    evaluation took 10x longer with two threads than with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def report_inputs(tmp_path: Path) -> Callable[[], ReportInputs]:
    """``report_inputs()``: a fresh ReportInputs of two variants (codis, albef) with every kind of
    content (loss curves, metrics with one task not run, codebook usage, retrieval examples, a
    Grad-CAM figure, the demo world's trivial baselines with item counts, stage wall times, a
    scaled-down run), its pictures in ``tmp_path``."""

    def image(name: str, colour: str) -> Path:
        Image.new("RGB", (32, 32), colour).save(tmp_path / name)
        return tmp_path / name

    def build() -> ReportInputs:
        images = [image(f"img{i}.png", c) for i, c in enumerate(["red", "green", "blue"])]
        curve = [(step, {"loss": 10.0 / (1 + step), "ica": 4.0 / (1 + step), "itm": 0.7})
                 for step in range(0, 50, 5)]
        retrieval = {"txt_r1": 12.5, "txt_r5": 40.0, "txt_r10": 61.25, "img_r1": 11.0,
                     "img_r5": 38.0, "img_r10": 55.0, "r_mean": 36.29}
        assign = torch.softmax(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)), -1)
        codis_results = VariantResults(
            loss_curve=curve,
            metrics={"retrieval_zero_shot": retrieval,
                     "retrieval_finetuned": {k: v + 5 for k, v in retrieval.items()},
                     "vqa": {"accuracy": 41.3}, "nlvr": {"accuracy": 57.9}},  # ve not run
            codebook={"image": codebook_usage(assign), "text": codebook_usage(assign.flip(0))},
            retrieval_examples=[RetrievalExample("a red square", images, [True, False, False])],
            gradcam_figures=[Figure("a red square: words", image("gradcam.png", "yellow"))],
            itm_auc=0.8131)
        albef_results = VariantResults(
            loss_curve=[(s, {k: v * 1.1 for k, v in d.items()}) for s, d in curve],
            metrics={"retrieval_zero_shot": {k: v - 2 for k, v in retrieval.items()},
                     "vqa": {"accuracy": 40.1}, "nlvr": {"accuracy": 58.2}},
            retrieval_examples=[RetrievalExample("a green square", images[1:], [False, True])])
        manifest = {"baselines": {
            "retrieval_test": {"images": 20, "captions": 100, "txt_r1": 24.6, "txt_r5": 74.0,
                               "txt_r10": 93.0, "img_r1": 5.0, "img_r5": 25.0, "img_r10": 50.0,
                               "r_mean": 45.3},
            "vqa_val": {"questions": 100, "majority_answer": "yes", "majority_accuracy": 23.4,
                        "question_type_prior_accuracy": 38.8},
            "nlvr": {"dev": {"majority_label": True, "accuracy": 50.5, "rows": 100},
                     "test": {"majority_label": False, "accuracy": 51.0, "rows": 400}},
            "ve": {"test": {"majority_label": "entailment", "accuracy": 33.4, "rows": 300}}}}
        return ReportInputs(
            variants={"codis": codis_results, "albef": albef_results}, recipe="demo",
            machine=MachineInfo.current("cpu"), baselines=trivial_baselines(manifest),
            wall_times=(StageTime("pretrain[codis]", 125.0), StageTime("pretrain[albef]", 192.0, True),
                        StageTime("finetune[nlvr.demo/codis]", 60.5),
                        StageTime("evaluate[ve.demo/codis]", 3.2)),
            run_seconds=200.0,
            scale=RunScale(steps_scale=0.02, overrides=("demo_world.pretrain_images=600",), world_size=1,
                           recipe_file="pipelines/demo.yaml"))

    return build
