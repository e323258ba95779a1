"""codis.data.download: real img2dataset runs over a loopback HTTP server (a couple of dozen tiny images)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
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
    DownloadError,
    LoopbackImageServer,
    _QuietHandler,
    download,
    download_demo,
    is_transient,
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


def _digests(out: Path) -> dict[str, str]:
    """sha256 of every shard file (.tar and .parquet) of a download folder."""
    return {p.name: _sha256(p) for p in sorted(out.glob("*")) if p.suffix in (".tar", ".parquet")}


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
        rel = meta["url"]  # as the list has it, not as served (http://127.0.0.1:<a new port>/...)
        caption, (w, h) = world.good[rel]
        assert sample["txt"].decode() == caption
        image = Image.open(io.BytesIO(sample["jpg"]))
        # keep_ratio: shorter side to image_size, aspect ratio kept
        assert min(image.size) == IMAGE_SIZE
        assert abs(image.size[0] / image.size[1] - w / h) < 0.05
        seen[rel] = sample["__key__"]
    assert set(seen) == set(world.good)
    assert len(set(seen.values())) == N_GOOD

    # Canonical shards: members by key then name, fixed headers; parquet rows by key.
    for shard in shards:
        with tarfile.open(out / shard["name"]) as tar:
            members = tar.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names, key=lambda n: n.partition(".")[::2])
        assert [n.partition(".")[2] for n in names[:3]] == ["jpg", "json", "txt"]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
            (0, 0, 0, "", "", 0o444)}
        keys = pd.read_parquet(out / shard["parquet"])["key"].tolist()
        assert keys == sorted(keys)
    assert not (out / "_work" / "img2dataset.json").exists()  # the process group is gone


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
    # Redownloaded shards are canonical: the same bytes as the first time, from a new server port.
    assert second["shards"] == first["shards"]
    assert _digests(out) == _digests(first_out)
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
                         ("caption_col", "url"), ("retries", -1), ("min_success_rate", 1.5),
                         ("min_success_rate", -0.1), ("min_success_rate", True),
                         ("min_success_rate", float("nan"))]:
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


# ---- a stage is complete only when its result is right (issue #16) -------------------------------

def test_two_downloads_give_identical_shards(world: World, demo_download: tuple[Path, dict],
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same list, same settings (another thread count: speed only), another folder and server port:
    byte-identical .tar and .parquet files and the same manifest sha256s."""
    first_out, first = demo_download
    out = tmp_path / "again"
    second = download_demo(world.root, out, _config(thread_count=2), progress=False)
    assert _digests(out) == _digests(first_out)
    assert len(_digests(out)) == 6
    assert second["shards"] == first["shards"]

    # A shard as img2dataset leaves it (members in completion order, the current time in each
    # header) is rewritten canonically, also after an interrupted rewrite (no marker, a stray
    # temporary file); img2dataset is not started for it.
    tar = out / "00001.tar"
    with tarfile.open(tar) as source:
        members = [(m, source.extractfile(m).read()) for m in source.getmembers()]
    with tarfile.open(tar, "w") as scrambled:
        for member, data in reversed(members):
            member.mtime, member.uname = time.time(), "bigdata"
            scrambled.addfile(member, io.BytesIO(data))
    assert _sha256(tar) != first["shards"][1]["sha256"]
    (out / "_work" / "canonical" / "00001.json").unlink()
    (out / ".00001.tar.0badf00d.tmp").write_bytes(b"half a tar")
    _forbid_subprocess(monkeypatch)
    third = download_demo(world.root, out, _config(), progress=False)
    assert third["shards"] == first["shards"]
    assert _digests(out) == _digests(first_out)
    assert not list(out.glob(".*.tmp"))


def _group_alive(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies, read from /proc directly."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


_CHILD = """
import sys
import codis
from codis.data import download
config = download.DownloadConfig(image_size=32, samples_per_shard=8, thread_count=1, timeout=5)
download.download(sys.argv[1], sys.argv[2], config, base_url=sys.argv[3], progress=False)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_kill_9_during_download_then_rerun_gives_the_full_data(world: World, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 of the downloading process takes img2dataset's whole process group with it (before,
    the orphan went on and wrote the remaining shards, which the re-run took as done); the re-run
    then downloads the rest.

    The slow server lives here, not in the killed process: it outlives the kill, so an orphan
    could only go on at 0.5 s a url. With the server dying too, the few hundred ms a busy machine
    takes to deliver the parent-death signal let img2dataset race through the remaining urls as
    "Connection refused" (shards the re-run redoes, as transient failures), and how many shards
    that finished said nothing about the group."""
    serve = _QuietHandler.do_GET

    def slowly(handler: _QuietHandler) -> None:
        time.sleep(0.5)
        serve(handler)

    monkeypatch.setattr(_QuietHandler, "do_GET", slowly)
    out, script = tmp_path / "shards", tmp_path / "child.py"
    script.write_text(_CHILD)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))
    with LoopbackImageServer(world.root) as server:
        child = subprocess.Popen([sys.executable, str(script), str(world.url_list), str(out),
                                  server.base_url], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 300
            while not list(out.glob("*_stats.json")):  # one shard (8 urls, 0.5 s each) finished
                assert child.poll() is None, child.stderr.read().decode()
                assert time.monotonic() < deadline, "img2dataset finished no shard in 300 s"
                time.sleep(0.05)
            group = json.loads((out / "_work" / "img2dataset.json").read_text())
            assert _group_alive(group["pgid"])
            child.kill()
        finally:
            child.kill()
            child.wait()
            child.stderr.close()
        deadline = time.monotonic() + 60
        while _group_alive(group["pgid"]):
            assert time.monotonic() < deadline, "img2dataset survived its parent's kill -9"
            time.sleep(0.1)
        finished = sorted(p.name for p in out.glob("*_stats.json"))
        assert len(finished) < 3  # it was killed mid-way (the other two shards need 7.5 s)...
        time.sleep(1.0)
        assert sorted(p.name for p in out.glob("*_stats.json")) == finished  # ...and nothing writes on
        assert not (out / "manifest.json").exists()

        monkeypatch.undo()
        manifest = download(world.url_list, out, _config(), base_url=server.base_url, progress=False)
    assert manifest["totals"]["successes"] == N_GOOD
    assert not any(is_transient(reason) for reason in manifest["status_dict"])
    assert not any("refused" in reason for reason in manifest["status_dict"])
    keys = {json.loads(s["json"])["url"] for s in _samples(out, [s["name"] for s in manifest["shards"]])}
    assert keys == set(world.good)
    assert not (out / "_work" / "img2dataset.json").exists()


def test_all_failed_download_is_not_complete_and_a_rerun_retries(world: World, tmp_path: Path) -> None:
    """A dead server: every url refused. The download raises, naming the list, the rate and the
    reasons, and writes no manifest; once the server is back, the same call downloads it all."""
    out = tmp_path / "shards"
    with socket.socket() as dead:  # bound, never listening: every connection is refused
        dead.bind(("127.0.0.1", 0))
        with pytest.raises(DownloadError) as failed:
            download(world.url_list, out, _config(), progress=False,
                     base_url="http://127.0.0.1:%d" % dead.getsockname()[1])
    message = str(failed.value)
    for part in (str(world.url_list), "only 0 of 23 rows", "(0.0%)", "min_success_rate 0.5",
                 "Connection refused>' (23)", "transient", "run the same download again"):
        assert part in message, part
    assert not (out / "manifest.json").exists()
    assert len(list(out.glob("*_stats.json"))) == 3  # img2dataset took every shard as done

    with LoopbackImageServer(world.root) as server:
        manifest = download(world.url_list, out, _config(), base_url=server.base_url, progress=False)
    assert manifest["totals"]["successes"] == N_GOOD
    assert (out / "manifest.json").exists()


def test_all_404_download_fails_and_reruns_once_the_files_are_there(tmp_path: Path) -> None:
    """Permanent failures only: the error says so (nothing transient); shards that fall short of
    the threshold are still redone by a re-run, which succeeds once the files exist."""
    site = tmp_path / "site"
    (site / "images").mkdir(parents=True)
    url_list = tmp_path / "gone.parquet"
    pd.DataFrame({"url": [f"images/{i}.jpg" for i in range(4)],
                  "caption": [f"picture {i}" for i in range(4)]}).to_parquet(url_list)
    out = tmp_path / "shards"
    with LoopbackImageServer(site) as server:
        with pytest.raises(DownloadError, match=r"(?s)gone\.parquet: only 0 of 4 rows.*404") as failed:
            download(url_list, out, _config(), base_url=server.base_url, progress=False)
        assert "transient" not in str(failed.value)
        assert not (out / "manifest.json").exists()
        for i in range(4):
            Image.new("RGB", (40, 40), (60 * i, 0, 0)).save(site / "images" / f"{i}.jpg")
        manifest = download(url_list, out, _config(), base_url=server.base_url, progress=False)
    assert manifest["totals"]["successes"] == 4


def test_resume_redoes_a_shard_with_transient_failures(world: World, demo_download: tuple[Path, dict],
                                                       tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A finished shard whose failures are mostly transient (a server gone mid-shard) is downloaded
    again by a resume; shards with permanent failures only (404, not an image) are kept."""
    first_out, first = demo_download
    out = tmp_path / "shards"
    shutil.copytree(first_out, out)
    (out / "manifest.json").unlink()  # a killed run writes none
    stats_path = out / "00002_stats.json"
    stats = json.loads(stats_path.read_text())
    assert stats["status_dict"] == {"success": 7}  # the world's failures are in shards 0 and 1
    refused = "<urlopen error [Errno 111] Connection refused>"
    stats["successes"] -= 2
    stats["failed_to_download"] += 2
    stats["status_dict"] = {**stats["status_dict"], "success": stats["successes"], refused: 2}
    stats_path.write_text(json.dumps(stats))
    kept = {p: p.stat().st_mtime_ns for p in out.glob("0000[01]*")}

    with caplog.at_level(logging.INFO, logger="codis.data.download"):
        manifest = download_demo(world.root, out, _config(), progress=False)
    assert "shard 00002 is redone: 2 of its 2 failures are transient" in caplog.text
    assert "resuming: 2 of 3 shards already done" in caplog.text
    assert refused not in json.loads(stats_path.read_text())["status_dict"]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # the others were not touched
    assert manifest["shards"] == first["shards"]
    assert manifest["status_dict"] == first["status_dict"]


def test_transient_failure_reasons() -> None:
    for reason in ("<urlopen error [Errno 111] Connection refused>", "timed out",
                   "The read operation timed out", "[Errno 104] Connection reset by peer",
                   "Remote end closed connection without response", "HTTP Error 503: Service Unavailable",
                   "HTTP Error 429: Too Many Requests",
                   "<urlopen error [Errno -3] Temporary failure in name resolution>"):
        assert is_transient(reason), reason
    for reason in ("HTTP Error 404: File not found", "HTTP Error 403: Forbidden", "Image decoding error",
                   "<urlopen error [Errno -2] Name or service not known>", "unknown url type: None"):
        assert not is_transient(reason), reason
