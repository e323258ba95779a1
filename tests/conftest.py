"""Fixtures shared by the test modules, each built once per test run: one tiny demo world
(``tiny_world``), its shards (``shards(kind, split)``) and one tiny pretrained checkpoint
(``tiny_checkpoint``). They are shared across modules, so tests read them and write into their
own ``tmp_path``."""

import os

# Nothing may reach a model hub from the tests; the tokenizers and weights used are all local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import codis  # noqa: E402,F401  - the torchvision compat shim runs before any test imports timm

import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from codis.config import preset  # noqa: E402
from codis.data.demo_world import DemoWorldConfig, generate_demo_world  # noqa: E402
from codis.data.shards import write_shards  # noqa: E402
from codis.model import CodisModel, save_model  # noqa: E402

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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a
    shared CPU, several threads per small op of a tiny model only wait on each other (a retrieval
    evaluation took 10x longer with two threads than with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
