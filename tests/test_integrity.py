"""Shard integrity: codis.data.shards.verify_shards (size and sha256 against the manifest, digests
cached by size and mtime) and the store, which re-runs a completed stage whose shards differ."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

import codis.data.shards as shards_module
from codis.config import ConfigError
from codis.data.manifest import MANIFEST
from codis.data.shards import (VERIFIED, VERIFY_ENV, ShardIntegrityError, verify_shards,
                               write_shards)
from codis.files import sha256_file
from flows.store import MARKER, REJECTED, StageOutput, Store

OLD_NS = 1_600_000_000 * 10**9  # an mtime long past: old enough to be cached


@pytest.fixture
def folder(shards, tmp_path: Path) -> Path:
    """A copy of the tiny world's pretraining shards (4 samples each), dated in the past."""
    copy = Path(shutil.copytree(shards("pretrain", "train"), tmp_path / "shards"))
    (copy / VERIFIED).unlink(missing_ok=True)  # left by the tests that read the shared folder
    for path in copy.iterdir():
        path.chmod(0o644)
        os.utime(path, ns=(OLD_NS, OLD_NS))
    return copy


@pytest.fixture
def hashes(monkeypatch) -> list[str]:
    """The names of the files verify_shards hashes, in order."""
    hashed: list[str] = []

    def counting(path, *args, **kwargs):
        hashed.append(Path(path).name)
        return sha256_file(path, *args, **kwargs)

    monkeypatch.setattr(shards_module, "sha256_file", counting)
    return hashed


def names(folder: Path) -> list[str]:
    return [entry["name"] for entry in json.loads((folder / MANIFEST).read_text())["shards"]]


def flip_byte(path: Path, offset: int = 700, *, keep_mtime: bool = False) -> None:
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_flipped_byte_is_named_with_expected_and_actual_digests(folder: Path) -> None:
    shard = folder / names(folder)[1]
    expected = json.loads((folder / MANIFEST).read_text())["shards"][1]["sha256"]
    assert verify_shards(folder)["shards"] == len(names(folder))
    flip_byte(shard)
    actual = sha256_file(shard)
    with pytest.raises(ShardIntegrityError) as info:
        verify_shards(folder)
    assert str(info.value) == (f"1 shard(s) differ from their manifest: {shard}: sha256 "
                               f"{actual[:16]}..., its manifest lists {expected[:16]}...")
    assert info.value.paths == [shard]


def test_truncated_missing_and_listed_shards(folder: Path, tmp_path: Path) -> None:
    first, second, *_ = (folder / name for name in names(folder))
    first.write_bytes(first.read_bytes()[:1000])
    second.unlink()
    with pytest.raises(ShardIntegrityError, match=rf"^2 shard\(s\) differ .*{first}: 1000 bytes, "
                                                  rf"its manifest lists \d+; {second}: missing"):
        verify_shards(folder / MANIFEST)  # the manifest's path works as well as its folder
    # Paths: those a manifest lists are checked, the others have nothing to be checked against.
    third = folder / names(folder)[2]
    assert verify_shards([str(third)])["shards"] == 1
    with pytest.raises(ShardIntegrityError, match=f"{first}: 1000 bytes"):
        verify_shards([third, first])
    loose = tmp_path / "loose" / "00000.tar"
    loose.parent.mkdir()
    loose.write_bytes(b"no manifest here")
    assert verify_shards([str(loose), "https://example.com/x.tar"]) == {"shards": 0, "hashed": 0}
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        verify_shards(loose.parent)


def test_digests_are_cached_until_size_or_mtime_change(folder: Path, hashes: list[str],
                                                       monkeypatch) -> None:
    all_names = names(folder)
    assert verify_shards(folder) == {"shards": len(all_names), "hashed": len(all_names)}
    assert sorted(json.loads((folder / VERIFIED).read_text())["files"]) == sorted(all_names)
    hashes.clear()
    assert verify_shards(folder)["hashed"] == 0 and hashes == []  # unchanged: no file read

    changed = folder / all_names[2]
    flip_byte(changed)  # same size, new mtime: hashed again, and found out
    with pytest.raises(ShardIntegrityError, match=f"{changed}: sha256"):
        verify_shards(folder)
    assert hashes == [changed.name]

    # The documented blind spot: a rewrite that keeps size and mtime passes a cached check ...
    hashes.clear()
    flip_byte(changed)  # back to the original bytes, then corrupt another shard keeping mtime
    os.utime(changed, ns=(OLD_NS, OLD_NS))
    verify_shards(folder)
    other = folder / all_names[0]
    flip_byte(other, keep_mtime=True)
    assert verify_shards(folder)["hashed"] == 0
    # ... and not a full one (an argument or the environment ask for it).
    with pytest.raises(ShardIntegrityError, match=f"{other}: sha256"):
        verify_shards(folder, mode="full")
    monkeypatch.setenv(VERIFY_ENV, "full")
    hashes.clear()
    with pytest.raises(ShardIntegrityError, match=f"{other}: sha256"):
        verify_shards(folder)
    assert sorted(hashes) == sorted(all_names)
    monkeypatch.setenv(VERIFY_ENV, "off")
    assert verify_shards(folder) == {"shards": 0, "hashed": 0}
    monkeypatch.setenv(VERIFY_ENV, "sometimes")
    with pytest.raises(ConfigError, match=rf"^{VERIFY_ENV}: must be one of cached, full, off"):
        verify_shards(folder)


def test_recently_modified_files_are_not_cached(folder: Path, hashes: list[str]) -> None:
    """A write within the same mtime tick as the check would go unnoticed: not trusted."""
    fresh = folder / names(folder)[0]
    os.utime(fresh)  # now
    verify_shards(folder)
    assert fresh.name not in json.loads((folder / VERIFIED).read_text())["files"]
    hashes.clear()
    verify_shards(folder)
    assert hashes == [fresh.name]


def test_a_read_only_folder_is_verified_without_a_cache(folder: Path, monkeypatch) -> None:
    def read_only(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shards_module, "atomic_write_json", read_only)  # as root, chmod would not do
    assert verify_shards(folder)["shards"] == len(names(folder))
    assert not (folder / VERIFIED).exists()


# ---- the store: a completed stage with a corrupted shard is not reused ---------------------------
def shard_stage(store: Store, tiny_world: Path, calls: list[Path], *, verify_in_marker: bool = True):
    records = json.loads((tiny_world / "pretrain" / "captions.json").read_text())

    def work(folder: Path) -> StageOutput:
        calls.append(folder)
        write_shards(records, tiny_world, folder / "shards", kind="pretrain", samples_per_shard=4,
                     progress=False)
        return StageOutput(outputs={"shards": "shards"},
                           verify=["shards"] if verify_in_marker else [])

    return store.run("shard", {"kind": "pretrain"}, {}, work)


def test_the_store_reruns_a_stage_whose_shard_was_corrupted(tiny_world: Path, tmp_path: Path,
                                                            caplog) -> None:
    store, calls = Store(tmp_path / "store"), []
    first = shard_stage(store, tiny_world, calls)
    out = Path(first.path) / "shards"
    assert json.loads((Path(first.path) / MARKER).read_text())["verify"] == ["shards"]
    assert shard_stage(store, tiny_world, calls).cached and len(calls) == 1

    manifest = json.loads((out / MANIFEST).read_text())
    shard = out / manifest["shards"][1]["name"]
    untouched = {e["name"]: (out / e["name"]).stat().st_mtime_ns for e in manifest["shards"]
                 if e["name"] != shard.name}
    flip_byte(shard)
    with caplog.at_level(logging.WARNING, logger="flows.store"):
        assert store.lookup("shard", first.key) is None
    assert f"shard/{first.key}: not reused, shards/ fails its check" in caplog.text
    assert str(shard) in caplog.text
    rejected = json.loads((Path(first.path) / REJECTED).read_text())
    assert str(shard) in rejected["rejected"]["reason"]
    assert not shard.exists()  # deleted, so that the re-run rewrites it

    again = shard_stage(store, tiny_world, calls)
    assert not again.cached and len(calls) == 2 and again.key == first.key
    assert sha256_file(shard) == manifest["shards"][1]["sha256"]
    assert {name: (out / name).stat().st_mtime_ns for name in untouched} == untouched
    assert shard_stage(store, tiny_world, calls).cached and len(calls) == 2


def test_the_caller_names_shard_folders_of_markers_written_without_them(tiny_world: Path,
                                                                       tmp_path: Path) -> None:
    """Stages completed before markers listed their shard folders are checked too: run_stage
    passes the folders of the download and shard stages."""
    store, calls = Store(tmp_path / "store"), []
    first = shard_stage(store, tiny_world, calls, verify_in_marker=False)
    assert json.loads((Path(first.path) / MARKER).read_text())["verify"] == []
    (Path(first.path) / "shards" / MANIFEST).unlink()
    assert store.lookup("shard", first.key) is not None  # nothing asked for a check
    assert store.lookup("shard", first.key, verify=["shards"]) is None
    assert store.lookup("shard", first.key) is None  # the marker was moved aside
    assert (Path(first.path) / REJECTED).is_file()
