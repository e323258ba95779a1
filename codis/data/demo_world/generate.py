"""Write a demo world to disk: :func:`generate_demo_world`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from codis.config import ConfigError
from codis.data.demo_world import questions
from codis.data.demo_world.baselines import trivial_baselines
from codis.data.demo_world.config import CAPTIONS_PER_RETRIEVAL_IMAGE, DemoWorldConfig
from codis.data.demo_world.language import caption, captions
from codis.data.demo_world.scenes import World
from codis.files import atomic_write_bytes, sha256_bytes

GENERATOR_VERSION = "2"
"""Changes whenever the same config would give other files (the stage store keys on it)."""
# The name the manifest gives the generator: the package, whichever module holds the code.
_GENERATOR = "codis.data.demo_world"
_NON_IMAGE_TEXT = b"this is not an image, it is a text file that the download stage must reject\n"


def _json_bytes(rows: Any) -> bytes:
    return json.dumps(rows, ensure_ascii=True).encode("ascii")


def _pretrain_rows(world: World) -> tuple[list[dict], list[dict]]:
    """Caption pairs, and the url list: the pairs plus dead and non-image urls spread through it."""
    n, per = world.config.pretrain_images, world.config.captions_per_pretrain_image
    digits = max(6, len(str(n)))
    pairs = []
    for index in range(n):
        rng = world.rng("pretrain", index)
        scene = world.new_scene(rng)
        path = world.save(scene, f"images/pretrain/{index:0{digits}d}.jpg")
        pairs += [{"image": path, "caption": c} for c in captions(rng, scene, per)]
    rows = [{"url": p["image"], "caption": p["caption"]} for p in pairs]
    rng = world.rng("pretrain", "bad_urls")
    bad = [{"url": f"images/pretrain/missing_{i:06d}.jpg",
            "caption": caption(rng, world.sample(rng))} for i in range(world.config.dead_urls)]
    if world.config.non_image_urls:
        atomic_write_bytes(world.root / "images/pretrain/not_an_image.jpg", _NON_IMAGE_TEXT)
        bad += [{"url": "images/pretrain/not_an_image.jpg", "caption": caption(rng, world.sample(rng))}
                for _ in range(world.config.non_image_urls)]
    # Spread the failures through the list so they land in different download shards.
    for j, row in enumerate(bad):
        rows.insert(round((j + 1) * len(rows) / (len(bad) + 1)), row)
    return pairs, rows


def _classification_rows(world: World, split: str, n: int) -> list[dict]:
    rows = []
    for index in range(n):
        rng = world.rng("classification", split, index)
        scene = world.new_scene(rng)
        path = world.save(scene, f"images/classification_{split}/{index:06d}.jpg")
        labels = sorted({o.shape for o in scene.objects}) + sorted({o.color for o in scene.objects})
        rows.append({"image": path, "labels": labels})
    return rows


def _retrieval_rows(world: World, split: str, n: int) -> list[dict]:
    """ALBEF's layouts: one row per caption (with its image id) for train, one per image else."""
    rows = []
    for index in range(n):
        rng = world.rng("retrieval", split, index)
        scene = world.new_scene(rng)
        path = world.save(scene, f"images/retrieval_{split}/{index:06d}.jpg")
        texts = captions(rng, scene, CAPTIONS_PER_RETRIEVAL_IMAGE)
        if split == "train":
            rows += [{"image": path, "caption": c, "image_id": index} for c in texts]
        else:
            rows.append({"image": path, "caption": texts})
    return rows


def generate_demo_world(root: str | Path, config: DemoWorldConfig = DemoWorldConfig(),
                        progress: bool = True) -> dict[str, Any]:
    """Render the demo world under ``root`` and return its manifest (also ``root/manifest.json``).

    Deterministic: the same config writes byte-identical files. ``manifest.json`` is removed first
    and written last, so a folder without it is an incomplete generation. Existing files of the
    layout are overwritten; other files under ``root`` are left alone.
    """
    if not isinstance(config, DemoWorldConfig):
        raise ConfigError(f"demo_world.config: expected a DemoWorldConfig, got {type(config).__name__}")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"demo world root {root} exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").unlink(missing_ok=True)

    total_images = (config.pretrain_images + sum(config.retrieval_images.values())
                    + sum(config.vqa_images.values()) + 2 * sum(config.nlvr_pairs.values())
                    + sum(config.ve_images.values()) + sum(config.classification_images.values()))
    files: dict[str, Any] = {}

    def write(relative: str, rows: Any) -> None:
        data = _json_bytes(rows)
        atomic_write_bytes(root / relative, data)
        files[relative] = {"rows": len(rows), "sha256": sha256_bytes(data)}

    with tqdm(total=total_images, desc="demo world", unit="img", disable=not progress) as bar:
        world = World(root, config, bar)
        # Evaluation splits first: their scenes do not depend on how large pretraining is.
        retrieval = {s: _retrieval_rows(world, s, config.retrieval_images[s])
                     for s in ("test", "val", "train")}
        answer_list = questions.answer_list()
        vqa: dict[str, list[dict]] = {}
        question_types: dict[str, str] = {}
        next_id = 0
        for split in ("val", "test", "train"):
            vqa[split], types = questions.vqa_rows(world, split, config.vqa_images[split], next_id)
            question_types.update(types)
            next_id += len(vqa[split])
        nlvr = {s: questions.nlvr_rows(world, s, config.nlvr_pairs[s]) for s in ("test", "dev", "train")}
        ve = {s: questions.ve_rows(world, s, config.ve_images[s]) for s in ("test", "dev", "train")}
        pairs, url_rows = _pretrain_rows(world)
        # Last, so that adding it left every earlier split's scenes as they were.
        classification = {s: _classification_rows(world, s, config.classification_images[s])
                          for s in ("val", "train")}

    write("pretrain/captions.json", pairs)
    table = pa.table({"url": [r["url"] for r in url_rows], "caption": [r["caption"] for r in url_rows]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    parquet = sink.getvalue().to_pybytes()
    atomic_write_bytes(root / "pretrain/urls.parquet", parquet)
    files["pretrain/urls.parquet"] = {"rows": len(url_rows), "sha256": sha256_bytes(parquet)}
    for split in ("train", "val", "test"):
        write(f"retrieval/{split}.json", retrieval[split])
        write(f"vqa/{split}.json", vqa[split])
    write("vqa/answer_list.json", answer_list)
    for split in ("train", "dev", "test"):
        write(f"nlvr/{split}.json", nlvr[split])
        write(f"ve/{split}.json", ve[split])
    for split in ("train", "val"):
        write(f"classification/{split}.json", classification[split])
    write("meta/scenes.json", dict(sorted(world.scenes.items())))
    write("meta/vqa_question_types.json", question_types)

    manifest = {
        "generator": _GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "config": config.to_dict(),
        "image_size": config.image_size,
        "images": dict(sorted(Counter(p.split("/")[1] for p in world.scenes).items())),
        "pretrain_pairs": len(pairs),
        "bad_urls": {"dead": [r["url"] for r in url_rows if "/missing_" in r["url"]],
                     "non_image": [r["url"] for r in url_rows if r["url"].endswith("not_an_image.jpg")]},
        "files": dict(sorted(files.items())),
        "baselines": trivial_baselines(config.retrieval_images["test"], vqa["val"], question_types,
                                       answer_list, nlvr, ve),
    }
    atomic_write_bytes(root / "manifest.json", json.dumps(manifest, indent=2).encode("ascii"))
    return manifest
