"""codis.data.manifest: the two shard-manifest formats, and annotation files read as one list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codis.data.manifest import (MANIFEST, read_annotations, read_manifest, shard_files,
                                 shard_listing, shard_samples)


def write_folder(folder: Path, manifest: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_both_manifest_formats_list_their_tars_and_samples(tmp_path) -> None:
    sharded = write_folder(tmp_path / "sharded", {
        "kind": "ve", "num_samples": 7, "shards": [{"name": "shard-000001.tar"},
                                                   {"name": "shard-000000.tar"}]})
    downloaded = write_folder(tmp_path / "downloaded", {
        "totals": {"count": 10, "successes": 8}, "shards": [{"name": "00000.tar"}]})
    assert shard_listing(sharded) == ([str(sharded / "shard-000001.tar"),
                                       str(sharded / "shard-000000.tar")], 7)  # manifest order
    assert shard_listing(downloaded) == ([str(downloaded / "00000.tar")], 8)  # successes only
    assert shard_files([sharded, downloaded])[-1] == str(downloaded / "00000.tar")
    assert shard_samples([sharded, downloaded]) == 15


def test_a_bad_shard_folder_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"num_samples": 3}))
    with pytest.raises(ValueError, match="manifest.json: .*'shards' list"):
        read_manifest(tmp_path)


def test_annotation_files_are_concatenated_in_order(tmp_path) -> None:
    first, second = tmp_path / "train.json", tmp_path / "val.json"
    first.write_text(json.dumps([{"i": 0}, {"i": 1}]))
    second.write_text(json.dumps([{"i": 2}]))
    assert read_annotations([first, second]) == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert read_annotations([second, first])[0] == {"i": 2}


def test_a_bad_annotation_file_is_named(tmp_path) -> None:
    good, broken, mapping = tmp_path / "good.json", tmp_path / "broken.json", tmp_path / "map.json"
    good.write_text("[]")
    broken.write_text('[{"image": "a.jpg"},')
    mapping.write_text('{"image": "a.jpg"}')
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        read_annotations([good, broken])
    with pytest.raises(ValueError, match="map.json: an ALBEF annotation file is a JSON list"):
        read_annotations([mapping])
