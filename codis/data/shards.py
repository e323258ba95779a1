"""Annotation files over local images -> webdataset tar shards, written atomically and resumably.

One sample per annotation record, keyed ``%09d`` by record position. Members: the image file's
original bytes as ``jpg`` (``0.jpg`` / ``1.jpg`` for the two NLVR2 images; Pillow reads the format
from the bytes, so a PNG stored under ``jpg`` still decodes), the caption / sentence / question as
``txt``, and the rest of the record as ``json``. Pretraining shards thus have img2dataset's member
names (``key.jpg``, ``key.txt``, ``key.json``) and one loader reads both.

Each shard is written under a hidden temporary name and ``os.replace``d into place when complete,
so a shard with its final name is always whole. ``manifest.partial.json`` records every finished
shard (name, count, sha256, first/last key, and a fingerprint of the records and image files it
came from); a re-run with the same inputs keeps each shard whose file still has the recorded
sha256 and rewrites the others. ``manifest.json`` is written last and exists only while the
directory is complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import webdataset as wds
from tqdm import tqdm

from codis.config import check_choice, check_int
from codis.data.manifest import MANIFEST
from codis.files import atomic_path, atomic_write_json, sha256_file

FORMAT = "codis-shards/1"
PROGRESS = "manifest.partial.json"
SHARD_PATTERN = "shard-%06d.tar"
KEY_PATTERN = "%09d"
# A fixed member mtime makes a shard's bytes (and sha256) a function of its inputs alone.
_TAR_MTIME = 0.0

KINDS = ("pretrain", "retrieval_train", "retrieval_eval", "vqa", "nlvr", "ve")
_REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "pretrain": {"image": str, "caption": str},
    "retrieval_train": {"image": str, "caption": str, "image_id": (int, str)},
    "retrieval_eval": {"image": str, "caption": list},
    "vqa": {"image": str, "question": str, "question_id": (int, str)},
    "nlvr": {"images": list, "sentence": str, "label": str},
    "ve": {"image": str, "sentence": str, "label": str},
}
TEXT_FIELD = {"pretrain": "caption", "retrieval_train": "caption", "vqa": "question",
              "nlvr": "sentence", "ve": "sentence"}
"""The record field stored as the ``txt`` member (retrieval_eval keeps its caption list in json)."""
NLVR_LABEL_NAMES: tuple[str, ...] = ("True", "False")
VE_LABEL_NAMES: tuple[str, ...] = ("entailment", "neutral", "contradiction")
"""The SNLI-VE labels as written in annotation records, in SNLI's order (the one definition:
the loaders' class ids and the demo world's labels derive from it)."""
LABEL_NAMES_BY_KIND: dict[str, tuple[str, ...]] = {"nlvr": NLVR_LABEL_NAMES, "ve": VE_LABEL_NAMES}


def _validate_records(records: list[dict], kind: str) -> None:
    required = _REQUIRED[kind]
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"record {index}: expected a mapping, got {type(record).__name__}")
        for key, types in required.items():
            if key not in record:
                raise ValueError(f"record {index}: missing key {key!r} (kind {kind!r} needs "
                                 f"{', '.join(required)})")
            if not isinstance(record[key], types) or isinstance(record[key], bool):
                raise ValueError(f"record {index}: {key!r} has type {type(record[key]).__name__}")
        if kind == "nlvr" and (len(record["images"]) != 2
                               or not all(isinstance(p, str) for p in record["images"])):
            raise ValueError(f"record {index}: 'images' must be a list of two paths")
        if kind == "retrieval_eval" and (not record["caption"]
                                         or not all(isinstance(c, str) for c in record["caption"])):
            raise ValueError(f"record {index}: 'caption' must be a non-empty list of strings")
        if kind in LABEL_NAMES_BY_KIND and record["label"] not in LABEL_NAMES_BY_KIND[kind]:
            raise ValueError(f"record {index}: 'label' is {record['label']!r}, expected one of "
                             f"{', '.join(LABEL_NAMES_BY_KIND[kind])}")
        if kind == "vqa" and "answer" in record and not isinstance(record["answer"], (list, str)):
            raise ValueError(f"record {index}: 'answer' must be a list of strings (or one string)")


def _image_paths(record: dict, kind: str) -> list[str]:
    return list(record["images"]) if kind == "nlvr" else [record["image"]]


def _check_images(records: list[dict], kind: str, image_root: Path) -> list[list[Path]]:
    """Resolve every record's image paths; raise before any write if some are missing."""
    resolved = [[image_root / p for p in _image_paths(r, kind)] for r in records]
    missing = list(dict.fromkeys(str(p) for paths in resolved for p in paths if not p.is_file()))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} referenced image(s) missing under {image_root}; first: "
            f"{', '.join(missing[:5])}")
    return resolved


def _sample(record: dict, paths: list[Path], kind: str, key: str) -> dict[str, Any]:
    sample: dict[str, Any] = {"__key__": key}
    if kind == "nlvr":
        sample["0.jpg"], sample["1.jpg"] = (p.read_bytes() for p in paths)
    else:
        sample["jpg"] = paths[0].read_bytes()
    rest = dict(record)
    text_field = TEXT_FIELD.get(kind)
    if text_field is not None:
        sample["txt"] = rest.pop(text_field).encode("utf-8")
    sample["json"] = json.dumps(rest, ensure_ascii=False).encode("utf-8")
    return sample


def _fingerprint(kind: str, start: int, records: list[dict], paths: list[list[Path]]) -> str:
    """What a shard's bytes depend on: format, kind, keys, records, and each image's size+mtime."""
    digest = hashlib.sha256(f"{FORMAT}\n{kind}\n{start}\n".encode())
    digest.update(json.dumps(records, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    for record_paths in paths:
        for path in record_paths:
            stat = path.stat()
            digest.update(f"\n{path}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _write_shard(target: Path, samples: Iterable[dict[str, Any]]) -> None:
    """Write one tar under a hidden temporary name, fsync, then rename it into place."""
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        with wds.TarWriter(f, encoder=False, mtime=_TAR_MTIME) as writer:
            for sample in samples:
                writer.write(sample)
        f.flush()
        os.fsync(f.fileno())


def _previous_entries(out: Path, kind: str) -> dict[str, dict]:
    """Shard entries of an earlier run in ``out`` (complete manifest, else progress file)."""
    for name in (MANIFEST, PROGRESS):
        path = out / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                continue  # a progress file is written atomically, but be lenient with strays
            if data.get("format") == FORMAT and data.get("kind") == kind:
                return {entry["name"]: entry for entry in data.get("shards", [])}
    return {}


def write_shards(records: list[dict], image_root: str | Path, output_dir: str | Path, *,
                 kind: str, samples_per_shard: int = 1000, source: dict | None = None,
                 progress: bool = True) -> dict:
    """Write ``records`` (an ALBEF annotation list of ``kind``) with their images as tar shards.

    Returns the manifest (also saved as ``output_dir/manifest.json``): format, kind, source (the
    caller's ``source`` plus image root, kind and shard size), totals, and per shard its name,
    sample count, sha256, first and last key. Re-running with the same inputs rewrites nothing;
    shards whose inputs or bytes changed are rewritten. Raises ConfigError for a bad ``kind`` or
    ``samples_per_shard``, ValueError for a bad record and FileNotFoundError for missing images,
    before anything is written.
    """
    check_choice(kind, "kind", KINDS)
    check_int(samples_per_shard, "samples_per_shard", 1)
    if not isinstance(records, list) or not records:
        raise ValueError("records: must be a non-empty list of annotation records")
    _validate_records(records, kind)
    image_root = Path(image_root)
    paths = _check_images(records, kind, image_root)

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stray in out.glob(".shard-*.tar.*tmp"):  # left by a killed run
        stray.unlink()
    known = _previous_entries(out, kind)
    # From here on the directory may change: it is complete again only when the manifest returns.
    (out / MANIFEST).unlink(missing_ok=True)

    num_shards = math.ceil(len(records) / samples_per_shard)
    entries = []
    with tqdm(total=len(records), unit="sample", desc=f"sharding {kind}",
              disable=not progress) as bar:
        for index in range(num_shards):
            start, stop = index * samples_per_shard, min((index + 1) * samples_per_shard, len(records))
            name = SHARD_PATTERN % index
            target = out / name
            inputs = _fingerprint(kind, start, records[start:stop], paths[start:stop])
            old = known.get(name)
            if not (old and old.get("inputs") == inputs and target.is_file()
                    and sha256_file(target) == old.get("sha256")):
                _write_shard(target, (_sample(records[i], paths[i], kind, KEY_PATTERN % i)
                                      for i in range(start, stop)))
                known[name] = {"name": name, "count": stop - start, "sha256": sha256_file(target),
                               "size": target.stat().st_size, "first_key": KEY_PATTERN % start,
                               "last_key": KEY_PATTERN % (stop - 1), "inputs": inputs}
                atomic_write_json(out / PROGRESS, {"format": FORMAT, "kind": kind,
                                                    "shards": list(known.values())})
            entries.append(known[name])
            bar.update(stop - start)

    current = {entry["name"] for entry in entries}
    for name in set(known) - current:  # shards of an earlier, longer run of this directory
        (out / name).unlink(missing_ok=True)
    manifest = {
        "format": FORMAT,
        "kind": kind,
        "source": {**(source or {}), "image_root": str(image_root), "kind": kind,
                   "samples_per_shard": samples_per_shard},
        "num_samples": len(records),
        "num_images": sum(len(p) for p in paths),
        "num_shards": num_shards,
        "shards": entries,
    }
    atomic_write_json(out / MANIFEST, manifest)
    (out / PROGRESS).unlink(missing_ok=True)
    return manifest
