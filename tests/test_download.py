"""codis.data.download: real img2dataset runs over a loopback HTTP server (a couple of dozen tiny images)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

import codis  # noqa: F401  - first, as everywhere: its torch/torchvision shims
import webdataset as wds
from codis.config import ConfigError
from codis.data.download import (
    DownloadConfig,
    LoopbackImageServer,
    download,
    download_demo,
    validate_url_list,
)

N_GOOD = 20
IMAGE_SIZE = 32


class World:
    """A demo-like folder: images/pretrain/*.jpg, two dead urls, one text file, pretrain/urls.parquet."""

    def __init__(self, root: Path) -> None:
        self.root = root
        images = root / "images" / "pretrain"
        images.mkdir(parents=True)
        (root / "pretrain").mkdir()
        self.rows: list[tuple[str, str]] = []
        self.good: dict[str, tuple[str, tuple[int, int]]] = {}  # url -> (caption, original size)
        for i in range(N_GOOD):
            size = (40 + i, 64 - i)  # landscape and portrait shapes, all 40-64 px
            rel = f"images/pretrain/{i:06d}.jpg"
            Image.new("RGB", size, (12 * i, 255 - 12 * i, 90)).save(root / rel, quality=90)
            caption = f'photo {i}: a "coloured", tiny square' if i % 5 == 0 else f"photo number {i}"
            self.rows.append((rel, caption))
            self.good[rel] = (caption, size)
        self.dead = ["images/pretrain/missing_a.jpg", "images/pretrain/missing_b.jpg"]
        self.rows += [(url, "a dead link") for url in self.dead]
        (images / "notes.txt").write_text("this is not an image\n")
        self.rows.append(("images/pretrain/notes.txt", "a text file"))
        # a fixed shuffle, so that the failures spread over the shards
        self.rows.sort(key=lambda r: hashlib.md5(r[0].encode()).hexdigest())
        self.url_list = root / "pretrain" / "urls.parquet"
        pd.DataFrame(self.rows, columns=["url", "caption"]).to_parquet(self.url_list)


def _config(**changes) -> DownloadConfig:
    return DownloadConfig(**{"image_size": IMAGE_SIZE, "samples_per_shard": 8, "thread_count": 4,
                             "timeout": 5, **changes})


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _samples(out: Path, names: list[str]) -> list[dict]:
    dataset = wds.WebDataset([str(out / n) for n in names], shardshuffle=False)
    return list(dataset)


def _forbid_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    def popen(*args, **kwargs):
        raise AssertionError("img2dataset was started")
    monkeypatch.setattr("codis.data.download.subprocess.Popen", popen)


# Not the shared tiny_world: the manifest checks need images of known sizes and captions with
# quotes, and exactly two dead urls and one non-image.
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def demo_download(world: World, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("out") / "shards"
    return out, download_demo(world.root, out, _config(), progress=False)


def test_demo_download_manifest_and_shards(world: World, demo_download: tuple[Path, dict]) -> None:
    out, manifest = demo_download
    assert json.loads((out / "manifest.json").read_text()) == manifest

    totals = manifest["totals"]
    assert totals["count"] == len(world.rows) == N_GOOD + 3
    assert totals["successes"] == N_GOOD
    assert totals["failed_to_download"] == len(world.dead)
    assert totals["failed_to_resize"] == 1  # the text file: fetched, not decodable
    assert totals["success_rate"] == pytest.approx(N_GOOD / len(world.rows))
    reasons = manifest["status_dict"]
    assert reasons["success"] == N_GOOD
    assert sum(n for r, n in reasons.items() if "404" in r) == len(world.dead)
    assert sum(reasons.values()) == len(world.rows)

    assert manifest["source"]["sha256"] == _sha256(world.url_list)
    assert manifest["source"]["rows"] == len(world.rows)
    assert manifest["config"] == _config().to_dict()
    assert manifest["runner"]["img2dataset"] == "1.47.0"

    shards = manifest["shards"]
    assert [s["name"] for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]  # ceil(23 / 8)
    assert [s["count"] for s in shards] == [8, 8, 7]
    for shard in shards:
        assert _sha256(out / shard["name"]) == shard["sha256"]
        assert (out / shard["name"]).stat().st_size == shard["bytes"]
        assert len(_samples(out, [shard["name"]])) == shard["samples"]
        table = pd.read_parquet(out / shard["parquet"])  # one row per URL, failures included
        assert len(table) == shard["count"]
        assert (table["status"] == "success").sum() == shard["samples"]

    seen = {}
    for sample in _samples(out, [s["name"] for s in shards]):
        assert {"jpg", "txt", "json"} <= set(sample)
        meta = json.loads(sample["json"])
        rel = meta["url"].split("/", 3)[3]  # strip http://127.0.0.1:PORT/
        caption, (w, h) = world.good[rel]
        assert sample["txt"].decode() == caption
        image = Image.open(io.BytesIO(sample["jpg"]))
        # keep_ratio: shorter side to image_size, aspect ratio kept
        assert min(image.size) == IMAGE_SIZE
        assert abs(image.size[0] / image.size[1] - w / h) < 0.05
        seen[rel] = sample["__key__"]
    assert set(seen) == set(world.good)
    assert len(set(seen.values())) == N_GOOD


def test_pretraining_loader_reads_the_download_folder(demo_download: tuple[Path, dict]) -> None:
    from codis.data.loaders import pretrain_loader
    from codis.text import load_tokenizer

    out, manifest = demo_download
    loader = pretrain_loader(str(out), tokenizer=load_tokenizer("builtin"), image_size=32,
                             batch_size=4, drop_last=False, shuffle_buffer=0)
    keys = [key for batch in loader for key in batch["key"]]
    assert len(keys) == manifest["totals"]["successes"] and len(set(keys)) == len(keys)


def test_resume_redoes_only_unfinished_shards(world: World, demo_download: tuple[Path, dict],
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    first_out, first = demo_download
    out = tmp_path / "shards"
    shutil.copytree(first_out, out)
    # Shard 1: never started. Shard 2: cut off mid-write (half a tar, no stats file yet).
    for suffix in (".tar", ".parquet", "_stats.json"):
        (out / f"00001{suffix}").unlink()
    tar2 = out / "00002.tar"
    tar2.write_bytes(tar2.read_bytes()[: tar2.stat().st_size // 2])
    (out / "00002_stats.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in out.glob("00000*")}
    assert len(kept) == 3

    with caplog.at_level(logging.INFO, logger="codis.data.download"):
        second = download_demo(world.root, out, _config(), progress=False)
    assert "resuming: 1 of 3 shards already done" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished shard not rewritten
    assert second["totals"] == first["totals"]
    assert second["status_dict"] == first["status_dict"]

    def layout(m: dict) -> list[dict]:  # rewritten tars differ in bytes: member mtimes, server port
        return [{k: v for k, v in s.items() if k not in ("sha256", "bytes")} for s in m["shards"]]
    assert layout(second) == layout(first)
    assert second["shards"][0]["sha256"] == first["shards"][0]["sha256"]
    for shard in second["shards"]:
        assert _sha256(out / shard["name"]) == shard["sha256"]
        assert len(_samples(out, [shard["name"]])) == shard["samples"]

    # A complete folder: nothing to fetch, so img2dataset is not started and no shard changes.
    _forbid_subprocess(monkeypatch)
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("0000*")}
    third = download_demo(world.root, out, _config(), progress=False)
    assert third["source"].pop("base_url") != second["source"].pop("base_url")  # a new server port
    assert third == second
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

    # Other shard settings would mix two datasets: refused, naming the setting.
    with pytest.raises(ValueError, match="samples_per_shard"):
        download_demo(world.root, out, _config(samples_per_shard=5), progress=False)
    assert (out / "manifest.json").exists()  # a refused call leaves the folder as it was

    # A shard whose stats survived but whose tar was lost is scheduled again, not skipped for good.
    (out / "00000.tar").unlink()
    with pytest.raises(AssertionError, match="img2dataset was started"):
        download_demo(world.root, out, _config(), progress=False)
    assert "shard 00000 is incomplete" in caplog.text
    assert not (out / "00000_stats.json").exists()
    assert not (out / "manifest.json").exists()  # an unfinished folder has no manifest


@pytest.mark.parametrize("suffix", ["parquet", "csv", "tsv"])
@pytest.mark.parametrize("drop", ["caption", "url"])
def test_bad_url_list_fails_before_download(world: World, tmp_path: Path, suffix: str, drop: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_subprocess(monkeypatch)
    frame = pd.DataFrame(world.rows, columns=["url", "caption"]).drop(columns=[drop])
    frame["other"] = 1
    path = tmp_path / f"bad_list.{suffix}"
    if suffix == "parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, sep="," if suffix == "csv" else "\t", index=False)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"bad_list\.{suffix}.*missing column '{drop}'"):
        download(path, out, _config())
    assert not out.exists()


def test_custom_columns_missing_file_and_bad_config(world: World, tmp_path: Path) -> None:
    path = tmp_path / "renamed.parquet"
    pd.DataFrame(world.rows, columns=["image_url", "text"]).to_parquet(path)
    assert validate_url_list(path, _config(url_col="image_url", caption_col="text")) == len(world.rows)
    with pytest.raises(ValueError, match=r"'url' \(DownloadConfig.url_col\).*'caption'"):
        validate_url_list(path, _config())
    with pytest.raises(FileNotFoundError, match="nowhere.parquet"):
        validate_url_list(tmp_path / "nowhere.parquet", _config())
    with pytest.raises(ValueError, match="urls.json"):
        (tmp_path / "urls.json").write_text("[]")
        validate_url_list(tmp_path / "urls.json", _config())
    for field, value in [("image_size", 0), ("resize_mode", "stretch"), ("distributor", "dask"),
                         ("samples_per_shard", 2.5), ("encode_quality", 101), ("input_format", "txt"),
                         ("caption_col", "url"), ("retries", -1)]:
        with pytest.raises(ConfigError, match=rf"DownloadConfig\.{field}"):
            _config(**{field: value})


def test_base_url_rewrites_only_relative_urls(world: World, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_subprocess(monkeypatch)
    path = tmp_path / "mixed.csv"
    pd.DataFrame({"url": ["images/a b.jpg", "/images/c.jpg", "https://example.org/d.jpg"],
                  "caption": ["one", "two", "three"]}).to_csv(path, index=False)
    with pytest.raises(AssertionError, match="img2dataset was started"):
        download(path, tmp_path / "out", _config(), base_url="http://127.0.0.1:9/root/")
    rewritten = pd.read_parquet(tmp_path / "out" / "_work" / "urls.parquet")
    assert rewritten["url"].tolist() == ["http://127.0.0.1:9/root/images/a%20b.jpg",
                                         "http://127.0.0.1:9/root/images/c.jpg",
                                         "https://example.org/d.jpg"]
    assert rewritten["caption"].tolist() == ["one", "two", "three"]


def test_loopback_server_serves_and_stops(world: World) -> None:
    server = LoopbackImageServer(world.root)
    with pytest.raises(RuntimeError):
        server.base_url
    with server:
        base = server.base_url
        assert base.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{base}/images/pretrain/000003.jpg", timeout=5) as r:
            assert r.read() == (world.root / "images/pretrain/000003.jpg").read_bytes()
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"{base}/{world.dead[0]}", timeout=5)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{base}/images/pretrain/000003.jpg", timeout=2)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        LoopbackImageServer(world.root / "no_such_dir")


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_csv_and_tsv_lists(world: World, tmp_path: Path, fmt: str) -> None:
    """img2dataset reads the csv/tsv itself (absolute urls, no rewrite); csv uses custom column names."""
    cols = ("image_url", "text") if fmt == "csv" else ("url", "caption")
    subset = [r for r in world.rows if r[0] in world.good][:6] + [(world.dead[0], "gone")]
    path, out = tmp_path / f"list.{fmt}", tmp_path / "out"
    with LoopbackImageServer(world.root) as server:
        frame = pd.DataFrame([(f"{server.base_url}/{u}", c) for u, c in subset], columns=cols)
        frame.to_csv(path, sep="," if fmt == "csv" else "\t", index=False)
        config = _config(url_col=cols[0], caption_col=cols[1], samples_per_shard=10)
        manifest = download(path, out, config, progress=False)
    assert manifest["source"]["sha256"] == _sha256(path)
    assert manifest["totals"]["count"] == 7
    assert manifest["totals"]["successes"] == 6
    assert manifest["totals"]["failed_to_download"] == 1
    samples = _samples(out, [s["name"] for s in manifest["shards"]])
    captions = {json.loads(s["json"])["url"]: s["txt"].decode() for s in samples}
    assert captions == {u: c for u, c in frame.itertuples(index=False) if "missing" not in u}


def _fake_img2dataset(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake_img2dataset"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def test_img2dataset_failures_raise_with_log_tail(world: World, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-zero exit, and a zero exit that left shards missing (img2dataset exits 0 on SIGINT)."""
    path = tmp_path / "list.parquet"
    pd.DataFrame(world.rows, columns=["url", "caption"]).to_parquet(path)
    crash = _fake_img2dataset(tmp_path, 'echo "early line"; echo "Traceback: boom" >&2; exit 3')
    monkeypatch.setattr("codis.data.download.img2dataset_executable", lambda: crash)
    with pytest.raises(RuntimeError, match=r"(?s)status 3.*Traceback: boom"):
        download(path, tmp_path / "out", _config(), progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()

    quits = _fake_img2dataset(tmp_path, "echo interrupted; exit 0")
    monkeypatch.setattr("codis.data.download.img2dataset_executable", lambda: quits)
    with pytest.raises(RuntimeError, match=r"(?s)3 of 3 shards are missing.*download again"):
        download(path, tmp_path / "out", _config(), progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
