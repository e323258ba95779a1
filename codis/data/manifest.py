"""Reading shard folders and annotation files.

A shard folder holds ``manifest.json`` (:data:`MANIFEST`), written last by whichever function
filled the folder, in one of two formats:

* :func:`codis.data.shards.write_shards`: ``{"kind", "num_samples", "shards": [{"name", ...}]}``;
* :func:`codis.data.download.download` (img2dataset): ``{"totals": {"successes", ...},
  "shards": [{"name", ...}]}``: rows that failed to download are not samples.

Both list their tar files under ``shards`` in reading order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a shard folder; errors name the file."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST} (not a finished shard folder)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ValueError(f"{path}: a shard manifest is a mapping with a 'shards' list")
    return manifest


def manifest_samples(manifest: dict[str, Any]) -> int:
    """The number of samples a manifest's shards hold, in either format."""
    if "num_samples" in manifest:
        return int(manifest["num_samples"])
    return int(manifest["totals"]["successes"])


def shard_listing(folder: str | Path) -> tuple[list[str], int]:
    """The tar files of a shard folder (in manifest order) and their sample count."""
    manifest = read_manifest(folder)
    return [str(Path(folder) / entry["name"]) for entry in manifest["shards"]], \
        manifest_samples(manifest)


def shard_files(folders: Sequence[str | Path]) -> list[str]:
    """The tar files of several shard folders, folder by folder."""
    return [tar for folder in folders for tar in shard_listing(folder)[0]]


def shard_samples(folders: Sequence[str | Path]) -> int:
    """The total sample count of several shard folders."""
    return sum(manifest_samples(read_manifest(folder)) for folder in folders)


def read_annotations(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """The records of ALBEF annotation files (each a JSON list of records), concatenated in
    order (ALBEF's VQA training set, for one, is vqa_train followed by vqa_val)."""
    records: list[dict[str, Any]] = []
    for path in map(Path, paths):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: an ALBEF annotation file is a JSON list of records, "
                             f"got a {type(data).__name__}")
        records += data
    return records
