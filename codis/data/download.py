"""Image-text URL lists (CC3M, SBU, CC12M, any parquet / csv / tsv list) to webdataset shards.

The download itself is img2dataset's (run as its command-line tool in a subprocess: its Python
``download()`` starts a spawn pool, which re-runs an unguarded caller, and installs a SIGINT
handler). This module adds what a reproducible pipeline needs around it:

* the URL list and the config are checked before anything starts (missing columns name themselves
  and the file);
* resuming: img2dataset always runs with ``--incremental_mode incremental``. img2dataset 1.47.0
  takes a shard as done when ``NNNNN_stats.json`` exists in the output folder (it globs ``*.json``
  there and parses the number before ``_``); a shard writes that file only after its ``.tar`` and
  ``.parquet`` are closed, so a shard cut off mid-write has no stats file and is downloaded again
  from its first URL (its ``.tar`` / ``.parquet`` are reopened with ``"wb"``). Before each run we
  also drop the stats file of any shard whose stats do not parse or whose ``.tar`` / ``.parquet``
  went missing, so such a shard is redone instead of being skipped for good; and we refuse to
  resume into a folder made from a different URL list or different shard/image settings (that
  would mix two datasets). A user re-running an interrupted download sees the shard progress bar
  start at k/n (and, at INFO level, "resuming: k of n shards already done"); only the missing
  shards are fetched, from their first URL, and finished shards are not touched. Re-running a
  complete download starts no subprocess and only rewrites the manifest.
* a manifest (``manifest.json``, written atomically once every shard is there) with the totals,
  the failure reasons, every shard's sample count and sha256, the config, and the source list's
  sha256. It is removed before img2dataset starts (img2dataset would read it as a shard's stats
  file and crash), so its presence means the folder is complete.

Output layout is img2dataset's webdataset format: ``NNNNN.tar`` (``key.jpg``, ``key.txt``,
``key.json``), ``NNNNN.parquet`` (one row per URL, failures included), ``NNNNN_stats.json``;
plus ``download.log`` (img2dataset's output, appended per run), ``_work/`` and ``manifest.json``.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from tqdm import tqdm

from codis.config import check, check_choice, check_int
from codis.data.manifest import MANIFEST
from codis.files import atomic_path, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

INPUT_FORMATS: tuple[str, ...] = ("parquet", "csv", "tsv", "csv.gz", "tsv.gz")
RESIZE_MODES: tuple[str, ...] = ("keep_ratio", "center_crop", "border", "keep_ratio_largest", "no")
DISTRIBUTORS: tuple[str, ...] = ("multiprocessing", "pyspark", "ray")
ENCODE_FORMATS: tuple[str, ...] = ("jpg", "png", "webp")
LOG_FILE = "download.log"
WORK_DIR = "_work"
REQUEST_FILE = "request.json"  # in _work/: what the shards in this folder were made from
_STATS_RE = re.compile(r"^(\d+)_stats\.json$")
_SHARD_DIGITS = 5  # img2dataset's oom_shard_count default: shard names are 00000, 00001, ...
# Settings that change what the shards hold: resuming with any of them changed would mix datasets.
_OUTPUT_FIELDS = ("url_col", "caption_col", "image_size", "resize_mode", "samples_per_shard",
                  "encode_format", "encode_quality")


@dataclass(frozen=True)
class DownloadConfig:
    """What to read from the URL list and how img2dataset should fetch and store it.

    ``resize_mode="keep_ratio"`` scales the shorter side to ``image_size`` and keeps the whole
    picture: ALBEF/CODIS pretraining takes ``RandomResizedCrop(scale=(0.2, 1.0))`` of the stored
    image, so nothing should be cropped away beforehand (``center_crop``) or padded with bars that
    the random crops would then see (img2dataset's default ``border``). 256 px is the paper's
    pretraining resolution. ``processes_count`` / ``thread_count`` / ``distributor`` only change
    speed, never the shards; ``input_format=None`` takes the format from the file's suffix.
    """

    url_col: str = "url"
    caption_col: str = "caption"
    input_format: str | None = None
    image_size: int = 256
    resize_mode: str = "keep_ratio"
    samples_per_shard: int = 10000
    processes_count: int = 1
    thread_count: int = 16
    distributor: str = "multiprocessing"
    timeout: int = 10
    retries: int = 0
    encode_format: str = "jpg"
    encode_quality: int = 95
    max_shard_retry: int = 1

    def __post_init__(self) -> None:
        for name in ("url_col", "caption_col"):
            value = getattr(self, name)
            check(isinstance(value, str) and value.strip() != "", f"DownloadConfig.{name}",
                  f"must be a non-empty column name, got {value!r}")
        check(self.url_col != self.caption_col, "DownloadConfig.caption_col",
              f"must differ from url_col (both are {self.url_col!r})")
        check(self.input_format is None or self.input_format in INPUT_FORMATS,
              "DownloadConfig.input_format", f"must be None (from the suffix) or one of "
              f"{', '.join(INPUT_FORMATS)}; got {self.input_format!r}")
        for name in ("image_size", "samples_per_shard", "processes_count", "thread_count",
                     "timeout", "max_shard_retry"):
            check_int(getattr(self, name), f"DownloadConfig.{name}", 1)
        check_int(self.retries, "DownloadConfig.retries", 0)
        check_choice(self.resize_mode, "DownloadConfig.resize_mode", RESIZE_MODES)
        check_choice(self.distributor, "DownloadConfig.distributor", DISTRIBUTORS)
        check_choice(self.encode_format, "DownloadConfig.encode_format", ENCODE_FORMATS)
        # img2dataset hands encode_quality to OpenCV: JPEG/WebP quality 0-100, PNG compression 0-9.
        top = 9 if self.encode_format == "png" else 100
        check_int(self.encode_quality, "DownloadConfig.encode_quality", 0)
        check(self.encode_quality <= top, "DownloadConfig.encode_quality",
              f"must be at most {top} for {self.encode_format}, got {self.encode_quality!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def infer_input_format(path: str | Path, config: DownloadConfig) -> str:
    """``config.input_format`` if set, else img2dataset's format name from the file's suffix."""
    if config.input_format is not None:
        return config.input_format
    name = Path(path).name.lower()
    for fmt in sorted(INPUT_FORMATS, key=len, reverse=True):  # "csv.gz" before "csv"
        if name.endswith("." + fmt):
            return fmt
    raise ValueError(f"{path}: cannot tell the URL list's format from its suffix; use one of "
                     f"{', '.join('.' + f for f in INPUT_FORMATS)} or set DownloadConfig.input_format")


def _csv_options(fmt: str) -> pa_csv.ParseOptions:
    # The same parse options img2dataset uses, so what validates here is what it will read.
    return pa_csv.ParseOptions(delimiter="\t" if fmt.startswith("tsv") else ",")


def validate_url_list(path: str | Path, config: DownloadConfig) -> int:
    """Check that the URL list exists and has ``config.url_col`` and ``config.caption_col``.

    Reads only the header (and, for csv/tsv, the url column to count rows), so a bad list fails in
    well under a second, before any download starts. Returns the number of rows.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; pass one URL list file")
    if not path.is_file():
        raise FileNotFoundError(f"URL list not found: {path}")
    fmt = infer_input_format(path, config)
    try:
        if fmt == "parquet":
            parquet = pq.ParquetFile(path)
            columns = parquet.schema_arrow.names
            rows = parquet.metadata.num_rows
        else:
            columns = pa_csv.open_csv(path, parse_options=_csv_options(fmt)).schema.names
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path}: cannot be read as {fmt}: {err}") from err
    missing = [c for c in (config.url_col, config.caption_col) if c not in columns]
    if missing:
        roles = {config.url_col: "url_col", config.caption_col: "caption_col"}
        named = ", ".join(f"{c!r} (DownloadConfig.{roles[c]})" for c in missing)
        raise ValueError(f"{path}: missing column {named}; the file has columns {columns}")
    if fmt != "parquet":
        # Count rows from the url column alone, read as text: no type inference to trip over.
        only_urls = pa_csv.ConvertOptions(include_columns=[config.url_col],
                                          column_types={config.url_col: pa.string()})
        try:
            reader = pa_csv.open_csv(path, parse_options=_csv_options(fmt), convert_options=only_urls)
            rows = sum(batch.num_rows for batch in reader)
        except (pa.ArrowInvalid, OSError) as err:
            raise ValueError(f"{path}: cannot be read as {fmt}: {err}") from err
    if rows == 0:
        raise ValueError(f"{path}: the URL list has no rows")
    return rows


def _shard_name(shard_id: int) -> str:
    return f"{shard_id:0{_SHARD_DIGITS}d}"


def _rewrite_with_base_url(path: Path, fmt: str, config: DownloadConfig, base_url: str,
                           work_dir: Path) -> Path:
    """Copy the list's url and caption columns to a parquet file with relative urls made absolute."""
    if fmt == "parquet":
        table = pq.read_table(path, columns=[config.url_col, config.caption_col])
    else:
        table = pa_csv.read_csv(path, parse_options=_csv_options(fmt)).select(
            [config.url_col, config.caption_col])
    base = base_url.rstrip("/") + "/"

    def absolute(url: str | None) -> str | None:
        if url is None or urlsplit(url).scheme:
            return url
        return base + quote(url.lstrip("/"))

    urls = pa.array([absolute(u) for u in table.column(config.url_col).to_pylist()], pa.string())
    table = table.set_column(table.schema.get_field_index(config.url_col), config.url_col, urls)
    out = work_dir / "urls.parquet"
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    return out


def img2dataset_executable() -> Path:
    """The img2dataset CLI of the running interpreter's environment (falls back to PATH)."""
    beside = Path(sys.executable).parent / "img2dataset"
    if beside.is_file():
        return beside
    found = shutil.which("img2dataset")
    if found is None:
        raise FileNotFoundError(f"img2dataset CLI not found next to {sys.executable} nor on PATH; "
                                "pip install img2dataset==1.47.0")
    return Path(found)


def _scan_shards(output_dir: Path) -> tuple[list[int], list[int]]:
    """Shard ids with a stats file, split into complete and incomplete; changes nothing.

    img2dataset takes any ``NNNNN_stats.json`` as a finished shard. One that does not parse, or
    whose .tar/.parquet is gone, would be skipped for good, so it counts as incomplete here. Any
    other top-level ``*.json`` but our manifest would crash img2dataset (it parses every one as
    ``<shard>_stats.json``): refuse it by name.
    """
    complete, incomplete = [], []
    for path in sorted(output_dir.glob("*.json")):
        if path.name == MANIFEST:
            continue
        match = _STATS_RE.match(path.name)
        if match is None:
            raise ValueError(f"{path}: img2dataset treats every *.json in the output folder as a "
                             "shard's stats file; move this file out of the folder")
        shard = int(match.group(1))
        stem = output_dir / _shard_name(shard)
        try:
            stats = json.loads(path.read_text())
            ok = isinstance(stats, dict) and "count" in stats and "successes" in stats
        except (OSError, ValueError):
            ok = False
        ok = ok and stem.with_suffix(".tar").is_file() and stem.with_suffix(".parquet").is_file()
        (complete if ok else incomplete).append(shard)
    return complete, incomplete


def _check_request(output_dir: Path, work_dir: Path, request: dict[str, Any],
                   has_shards: bool) -> None:
    """Refuse to resume into a folder whose shards came from another list or other settings."""
    record = work_dir / REQUEST_FILE
    if has_shards:
        if not record.is_file():
            raise ValueError(f"{output_dir}: holds shards that were not made by codis.data.download "
                             f"(no {WORK_DIR}/{REQUEST_FILE}); use an empty output folder")
        previous = json.loads(record.read_text())
        changed = sorted(k for k in request if previous.get(k) != request[k])
        if changed:
            detail = "; ".join(f"{k}: {previous.get(k)!r} -> {request[k]!r}" for k in changed)
            raise ValueError(f"{output_dir}: cannot resume, its shards were made with other "
                             f"settings ({detail}); use a new output folder")
    atomic_write_json(record, request)


def _run_img2dataset(args: list[str], log_path: Path, work_dir: Path, output_dir: Path,
                     n_shards: int, n_done: int, progress: bool) -> int:
    """Run the CLI with its output appended to ``log_path``; tqdm counts finished shards.

    Returns the log offset where this run's output starts (for error messages)."""
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled",
               WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as log_file:
        log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(args)}\n".encode())
        log_file.flush()
        start = log_file.tell()
        proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, cwd=work_dir,
                                env=env, stdin=subprocess.DEVNULL)
        bar = tqdm(total=n_shards, initial=n_done, unit="shard", desc="img2dataset",
                   disable=not progress)
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                finished = len(list(output_dir.glob("*_stats.json")))
                if finished != bar.n:
                    bar.update(finished - bar.n)
        except BaseException:
            # Ctrl-C reaches img2dataset too; give it a moment to clean up, then make sure it is gone.
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        finally:
            bar.update(len(list(output_dir.glob("*_stats.json"))) - bar.n)
            bar.close()
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset exited with status {proc.returncode}; "
                           f"last lines of {log_path}:\n{_tail(log_path, start)}")
    return start


def _tail(log_path: Path, start: int, lines: int = 40) -> str:
    with open(log_path, "rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def download(url_list: str | Path, output_dir: str | Path, config: DownloadConfig, *,
             base_url: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Download ``url_list`` into webdataset shards in ``output_dir``; returns the manifest.

    Re-running after an interruption resumes (only missing shards are fetched). ``base_url``
    prefixes url values that have no scheme (a list of paths relative to a web root, like the
    demo's); absolute urls are left alone.
    """
    url_list = Path(url_list).resolve()
    rows = validate_url_list(url_list, config)
    fmt = infer_input_format(url_list, config)
    output_dir = Path(output_dir).resolve()
    work_dir = output_dir / WORK_DIR
    source_sha = sha256_file(url_list)
    n_shards = math.ceil(rows / config.samples_per_shard)

    complete, incomplete = _scan_shards(output_dir) if output_dir.is_dir() else ([], [])
    request = {"source_sha256": source_sha, "rows": rows,
               **{k: getattr(config, k) for k in _OUTPUT_FIELDS}}
    work_dir.mkdir(parents=True, exist_ok=True)
    _check_request(output_dir, work_dir, request, bool(complete or incomplete))

    expected = set(range(n_shards))
    if not expected <= set(complete):
        (output_dir / MANIFEST).unlink(missing_ok=True)  # img2dataset would parse it as shard stats
        for shard in incomplete:
            log.warning("shard %s is incomplete: downloading it again", _shard_name(shard))
            for suffix in ("_stats.json", ".tar", ".parquet"):
                Path(f"{output_dir / _shard_name(shard)}{suffix}").unlink(missing_ok=True)
        if complete:
            log.info("resuming: %d of %d shards already done in %s", len(complete), n_shards, output_dir)
        source, source_fmt = url_list, fmt
        if base_url is not None:
            source = _rewrite_with_base_url(url_list, fmt, config, base_url, work_dir)
            source_fmt = "parquet"
        args = [
            str(img2dataset_executable()),
            "--url_list", str(source), "--input_format", source_fmt,
            "--url_col", config.url_col, "--caption_col", config.caption_col,
            "--output_format", "webdataset", "--output_folder", str(output_dir),
            "--incremental_mode", "incremental",
            "--image_size", str(config.image_size), "--resize_mode", config.resize_mode,
            "--encode_format", config.encode_format, "--encode_quality", str(config.encode_quality),
            "--number_sample_per_shard", str(config.samples_per_shard),
            "--processes_count", str(config.processes_count),
            "--thread_count", str(config.thread_count),
            "--distributor", config.distributor,
            "--timeout", str(config.timeout), "--retries", str(config.retries),
            "--max_shard_retry", str(config.max_shard_retry),
            "--enable_wandb", "False",
        ]
        log_start = _run_img2dataset(args, output_dir / LOG_FILE, work_dir, output_dir,
                                     n_shards, len(complete), progress)
        complete, _ = _scan_shards(output_dir)
        missing = sorted(expected - set(complete))
        if missing:
            raise RuntimeError(
                f"img2dataset finished but {len(missing)} of {n_shards} shards are missing "
                f"({', '.join(_shard_name(s) for s in missing[:10])}); run the same download again "
                f"to resume. Last lines of {output_dir / LOG_FILE}:\n"
                f"{_tail(output_dir / LOG_FILE, log_start)}")

    manifest = _manifest(output_dir, sorted(expected), config, url_list, source_sha, rows, base_url)
    atomic_write_json(output_dir / MANIFEST, manifest)
    return manifest


def _manifest(output_dir: Path, shard_ids: list[int], config: DownloadConfig, url_list: Path,
              source_sha: str, rows: int, base_url: str | None) -> dict[str, Any]:
    totals = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
    status: dict[str, int] = {}
    shards = []
    for shard in shard_ids:
        stem = output_dir / _shard_name(shard)
        stats = json.loads(Path(f"{stem}_stats.json").read_text())
        for key in totals:
            totals[key] += int(stats[key])
        for reason, n in stats["status_dict"].items():
            status[reason] = status.get(reason, 0) + int(n)
        tar = stem.with_suffix(".tar")
        shards.append({"name": tar.name, "parquet": stem.with_suffix(".parquet").name,
                       "count": int(stats["count"]), "samples": int(stats["successes"]),
                       "bytes": tar.stat().st_size, "sha256": sha256_file(tar)})
    if totals["count"] != rows:
        raise RuntimeError(f"{output_dir}: shards hold {totals['count']} rows but {url_list} has "
                           f"{rows}; the folder is inconsistent, use a new output folder")
    return {
        "source": {"url_list": str(url_list), "sha256": source_sha, "rows": rows,
                   "base_url": base_url},
        "totals": {**totals, "success_rate": totals["successes"] / totals["count"]},
        "status_dict": dict(sorted(status.items(), key=lambda kv: (-kv[1], kv[0]))),
        "shards": shards,
        "config": config.to_dict(),
        "runner": {"img2dataset": metadata.version("img2dataset"),
                   "distributor": config.distributor, "processes_count": config.processes_count,
                   "thread_count": config.thread_count},
    }


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up (an interrupted download) is not the server's error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class LoopbackImageServer:
    """Serve a folder over HTTP on 127.0.0.1 (a free port) from a background thread.

    Lets the demo exercise the real download path (HTTP, 404s, non-image bodies) with no internet.
    Use as a context manager; ``base_url`` is valid while it runs.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"LoopbackImageServer root is not a folder: {self.root}")
        self._server: _QuietServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("LoopbackImageServer is not running; use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "LoopbackImageServer":
        handler = partial(_QuietHandler, directory=str(self.root))
        self._server = _QuietServer(("127.0.0.1", 0), handler)
        # A short poll interval: shutdown() waits for the serving loop's next poll.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="loopback-images", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = self._thread = None


def download_demo(demo_root: str | Path, output_dir: str | Path, config: DownloadConfig, *,
                  progress: bool = True) -> dict[str, Any]:
    """Download the demo world's ``pretrain/urls.parquet`` (urls relative to ``demo_root``)."""
    demo_root = Path(demo_root)
    url_list = demo_root / "pretrain" / "urls.parquet"
    validate_url_list(url_list, config)  # fail before the server starts
    with LoopbackImageServer(demo_root) as server:
        return download(url_list, output_dir, config, base_url=server.base_url, progress=progress)
