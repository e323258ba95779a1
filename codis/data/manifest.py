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


def read_json(path: str | Path) -> Any:
    """A JSON file's content; a file that is not JSON raises ValueError naming it and where it
    breaks (line and column)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error.msg} at line {error.lineno}, column "
                         f"{error.colno}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: not UTF-8 text (byte {error.start})") from None


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a shard folder; errors name the file."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST} (not a finished shard folder)")
    manifest = read_json(path)
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


class AnnotationRecords(list):
    """Records of annotation files (:func:`read_annotations`) that remember which file each came
    from, so that a check of the concatenated list names the file and the record's index in it
    (:func:`record_location`)."""

    def __init__(self, records: Iterable[Any] = (), starts: Iterable[tuple[Path, int]] = ()) -> None:
        super().__init__(records)
        self.starts = list(starts)  # (file, index of its first record), in order

    def location(self, index: int) -> str:
        for path, start in reversed(self.starts):
            if index >= start:
                return f"{path}: record {index - start}"
        return f"record {index}"


def record_location(records: Sequence[Any], index: int) -> str:
    """``<file>: record <i>`` for records from :func:`read_annotations`, else ``record <index>``."""
    return records.location(index) if isinstance(records, AnnotationRecords) else f"record {index}"


def listed_samples(tars: Sequence[str | Path]) -> tuple[int, int] | None:
    """(samples, shards) of tar files that make up whole shard folders with a manifest (as
    :func:`shard_files` lists them); None for anything else, such as tar files named by hand."""
    folders = list(dict.fromkeys(Path(tar).parent for tar in tars))
    try:
        listings = [shard_listing(folder) for folder in folders]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    listed = [tar for files, _ in listings for tar in files]
    if not listed or sorted(listed) != sorted(map(str, tars)):
        return None
    return sum(count for _, count in listings), len(listed)


def read_annotations(paths: Iterable[str | Path]) -> AnnotationRecords:
    """The records of ALBEF annotation files (each a JSON list of records), concatenated in
    order (ALBEF's VQA training set, for one, is vqa_train followed by vqa_val). A list that
    remembers each record's file: :func:`codis.data.shards.write_shards` names ``<file>: record
    <i>: '<field>'`` when a record is wrong."""
    records = AnnotationRecords()
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no annotation file there")
        data = read_json(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: an ALBEF annotation file is a JSON list of records, "
                             f"got a {type(data).__name__}")
        records.starts.append((path, len(records)))
        records += data
    return records
