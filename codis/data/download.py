"""Image-text URL lists (CC3M, SBU, CC12M, any parquet / csv / tsv list) to webdataset shards.

The download itself is img2dataset's (run as its command-line tool in a subprocess: its Python
``download()`` starts a spawn pool, which re-runs an unguarded caller, and installs a SIGINT
handler). This module adds what a reproducible pipeline needs around it:

* the URL list and the config are checked before anything starts (missing columns name themselves
  and the file);
* the subprocess dies with its caller. img2dataset runs in its own process group (a session) under
  a small ``sh`` guard that has Linux's parent-death signal set (``prctl(PR_SET_PDEATHSIG)``): when
  the caller dies, even by ``kill -9``, the guard kills the whole group (img2dataset, its spawn
  workers, its logger). Before that, an orphan went on downloading after the loopback server (a
  thread of the caller) had died, wrote every remaining shard full of "Connection refused", and the
  re-run took those shards as finished. The group id is recorded in ``_work/img2dataset.json``
  with a random token that every member carries in its environment; each run first kills a group
  left over from an earlier one (only once a member of that group is seen to carry the token, so a
  reused id is never hit). Elsewhere than Linux there is no parent-death signal: the leftover
  sweep then needs ``/proc`` and does nothing without it;
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
  complete download starts no subprocess and only rewrites the manifest;
* a re-run retries what failed: a finished shard is redone (logged as "shard N is redone: ...")
  when its success rate is below ``min_success_rate`` (whatever its failures were: a re-run is how
  one retries after fixing a server, the network or ``base_url``), or when most of its failures
  are transient (:func:`is_transient`: connection refused / reset, timeouts, name resolution that
  may succeed later, HTTP 429 and 5xx). An outage (a server down, a lost network, an orphan
  downloader) makes transient failures dominate a shard; an ordinary web list fails mostly for good
  (404, 403, dead hosts, bodies that are not images) with a sprinkle of timeouts, and redoing whole
  shards for those would turn every resume of a CC3M download into a full one. Permanent failures
  (404, not an image) stay failures;
* a success threshold: ``DownloadConfig.min_success_rate`` (default 0.5) of the list's rows must
  become samples, or :class:`DownloadError` is raised (naming the list, the rate, the most frequent
  failure reasons and what to do) and no manifest is written, so the stage is not complete;
* deterministic content: img2dataset writes samples in the order its threads finish and tar
  headers with the current time, so two downloads of one list differed. Each finished shard is
  rewritten canonically before it counts (before the success check and the manifest): tar members
  sorted by key, then by name (``key.jpg``, ``key.json``, ``key.txt``), with fixed headers (mtime 0,
  mode 0444, uid/gid 0, empty user and group names), and parquet rows sorted by key. When
  ``base_url`` was given, the ``url`` in each sample's ``.json`` and in the parquet is the list's
  own (relative) value, not the served address (the demo's loopback server has a new port every
  run); the per-sample ``.json`` holds nothing else that changes between runs (url, caption, key,
  status, error message, sizes). Rewrites are atomic; ``_work/canonical/NNNNN.json`` records the
  sha256 of a shard's canonical tar and parquet, so an interrupted rewrite is redone and a
  canonical shard is not rewritten again. Two downloads of the same list with the same settings
  thus give byte-identical ``.tar`` and ``.parquet`` files and the same sha256s in the manifest
  (as long as the same URLs succeed);
* a manifest (``manifest.json``, written atomically once every shard is there and the threshold is
  met) with the totals, the failure reasons, every shard's sample count and sha256, the config, and
  the source list's sha256. It is removed before img2dataset starts (img2dataset would read it as a
  shard's stats file and crash), so its presence means the folder is complete.

Output layout is img2dataset's webdataset format: ``NNNNN.tar`` (``key.jpg``, ``key.json``,
``key.txt``), ``NNNNN.parquet`` (one row per URL, failures included), ``NNNNN_stats.json``;
plus ``download.log`` (img2dataset's output, appended per run), ``_work/`` and ``manifest.json``.
"""

from __future__ import annotations

import dataclasses
import http.server
import io
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote, urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from tqdm import tqdm

from codis.config import check, check_choice, check_int, check_number
from codis.data.manifest import MANIFEST
from codis.files import atomic_path, atomic_write_json, sha256_file
from codis.processes import die_with_parent

log = logging.getLogger(__name__)

INPUT_FORMATS: tuple[str, ...] = ("parquet", "csv", "tsv", "csv.gz", "tsv.gz")
RESIZE_MODES: tuple[str, ...] = ("keep_ratio", "center_crop", "border", "keep_ratio_largest", "no")
DISTRIBUTORS: tuple[str, ...] = ("multiprocessing", "pyspark", "ray")
ENCODE_FORMATS: tuple[str, ...] = ("jpg", "png", "webp")
LOG_FILE = "download.log"
WORK_DIR = "_work"
REQUEST_FILE = "request.json"  # in _work/: what the shards in this folder were made from
GROUP_FILE = "img2dataset.json"  # in _work/: the process group of a running img2dataset
CANONICAL_DIR = "canonical"  # in _work/: NNNNN.json, the sha256s of a shard's canonical files
_GROUP_ENV = "CODIS_IMG2DATASET_GROUP"  # every member of the group carries the run's token
# Kills the whole process group when the guard is told its parent died (SIGTERM from the
# parent-death signal) or is stopped; otherwise waits for img2dataset and exits with its status.
_GUARD = 'trap "kill -KILL 0" TERM HUP INT; "$@" & wait $!'
# Failures that a later attempt may not have: the peer or network was down or slow, or the server
# said so (429, 5xx). urllib reports them as "<urlopen error [Errno 111] Connection refused>",
# "timed out", "Remote end closed connection without response", "HTTP Error 503: ...".
_TRANSIENT_RE = re.compile(
    r"connection (refused|reset|aborted)|timed? ?out|temporary failure in name resolution"
    r"|remote end closed|incompleteread|broken pipe|network is unreachable"
    r"|\[errno (32|101|103|104|110|111|-3)\]|http error (429|5\d\d)\b", re.IGNORECASE)
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

    ``min_success_rate``: the fraction of the list's rows that must become samples, else the
    download raises :class:`DownloadError` and writes no manifest. 0.5 is far below what a healthy
    download gives (the demo world loses 5 of 3005 rows on purpose; CC3M and SBU, years after
    publication, still give roughly 70-80% through img2dataset) and far above what a broken one
    gives (a server or network down, a wrong ``base_url`` or url column: nearly every row fails).
    0 accepts any result.
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
    min_success_rate: float = 0.5

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
        check_number(self.min_success_rate, "DownloadConfig.min_success_rate", 0.0, 1.0)
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


class DownloadError(RuntimeError):
    """A download that finished below ``DownloadConfig.min_success_rate`` (no manifest written)."""


def is_transient(reason: str) -> bool:
    """Whether an img2dataset failure reason (a ``status_dict`` key, a parquet ``error_message``)
    may not recur on another attempt: connection refused / reset, timeouts, temporary name
    resolution failures, HTTP 429 and 5xx. 404s, dead hosts and undecodable bodies are permanent."""
    return _TRANSIENT_RE.search(reason) is not None


def _shard_name(shard_id: int) -> str:
    return f"{shard_id:0{_SHARD_DIGITS}d}"


def _absolute_url(url: str | None, base_url: str) -> str | None:
    if url is None or urlsplit(url).scheme:
        return url
    return base_url.rstrip("/") + "/" + quote(url.lstrip("/"))


def _read_columns(path: Path, fmt: str, columns: list[str]) -> pa.Table:
    if fmt == "parquet":
        return pq.read_table(path, columns=columns)
    return pa_csv.read_csv(path, parse_options=_csv_options(fmt)).select(columns)


def _rewrite_with_base_url(path: Path, fmt: str, config: DownloadConfig, base_url: str,
                           work_dir: Path) -> Path:
    """Copy the list's url and caption columns to a parquet file with relative urls made absolute."""
    table = _read_columns(path, fmt, [config.url_col, config.caption_col])
    urls = pa.array([_absolute_url(u, base_url) for u in table.column(config.url_col).to_pylist()],
                    pa.string())
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
            ok = (isinstance(stats, dict) and "count" in stats and "successes" in stats
                  and isinstance(stats.get("status_dict"), dict))
        except (OSError, ValueError):
            ok = False
        ok = ok and stem.with_suffix(".tar").is_file() and stem.with_suffix(".parquet").is_file()
        (complete if ok else incomplete).append(shard)
    return complete, incomplete


def _read_stats(output_dir: Path, shard: int) -> dict[str, Any]:
    return json.loads((output_dir / f"{_shard_name(shard)}_stats.json").read_text())


def _redo_reason(stats: dict[str, Any], config: DownloadConfig) -> str | None:
    """Why a finished shard of an unfinished download should be downloaded again, if it should."""
    count, successes = int(stats["count"]), int(stats["successes"])
    failures = {r: int(n) for r, n in stats["status_dict"].items() if r != "success"}
    transient = sum(n for reason, n in failures.items() if is_transient(reason))
    if count and successes / count < config.min_success_rate:
        return (f"{successes} of its {count} rows succeeded, below min_success_rate "
                f"{config.min_success_rate:g}")
    if transient > sum(failures.values()) - transient:
        return f"{transient} of its {sum(failures.values())} failures are transient"
    return None


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


# ---- the img2dataset process group -------------------------------------------------------------

def group_members(pgid: int, token: str) -> list[int]:
    """Live processes of group ``pgid`` whose environment carries ``token`` (from ``/proc``;
    [] where there is none). Zombies have no environment left and do not count."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    marker = f"{_GROUP_ENV}={token}".encode()
    members = []
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            if os.getpgid(int(name)) != pgid:
                continue
            environ = (proc / name / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if marker in environ.split(b"\0"):
            members.append(int(name))
    return members


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid ..."; comm may hold ")"


def _end_group(pgid: int, token: str, timeout: float = 60.0) -> bool:
    """SIGKILL process group ``pgid`` once one of its members is seen to carry ``token`` (a group id
    is not reused while the group has members, so a verified group is ours), and wait until no
    member is left. Returns whether there was one."""
    found = False
    deadline = time.monotonic() + timeout
    while group_members(pgid, token):
        found = True
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"img2dataset's process group {pgid} survives SIGKILL")
        time.sleep(0.1)
    return found


def _end_leftover(work_dir: Path) -> None:
    """Kill an img2dataset that an earlier run in this folder left behind (refuse a live run's)."""
    record = work_dir / GROUP_FILE
    try:
        group = json.loads(record.read_text())
        pgid, token, parent = int(group["pgid"]), str(group["token"]), int(group["parent"])
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError):
        record.unlink(missing_ok=True)
        return
    members = group_members(pgid, token)
    if pgid in members and _parent_pid(pgid) == parent:
        # Its guard dies with its parent, so a live guard still under it is a live download.
        raise RuntimeError(f"{work_dir.parent}: another download into this folder is running "
                           f"(process {parent}, img2dataset process group {pgid}); wait for it "
                           "or stop it first")
    if members and _end_group(pgid, token):
        log.warning("killed img2dataset process group %d, left running by an earlier download "
                    "into %s", pgid, work_dir.parent)
    record.unlink(missing_ok=True)


def _run_img2dataset(args: list[str], log_path: Path, work_dir: Path, output_dir: Path,
                     n_shards: int, n_done: int, progress: bool) -> int:
    """Run the CLI in its own process group with its output appended to ``log_path``; tqdm
    counts finished shards. Returns the log offset where this run's output starts."""
    token = secrets.token_hex(8)
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled",
               WANDB_SILENT="true", PYTHONUNBUFFERED="1", **{_GROUP_ENV: token})
    record = work_dir / GROUP_FILE
    with open(log_path, "ab") as log_file:
        log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(args)}\n".encode())
        log_file.flush()
        start = log_file.tell()
        # start_new_session: a group of its own (killed as one, and the terminal's Ctrl-C no
        # longer reaches it: the except clause below stops it instead).
        proc = subprocess.Popen(["/bin/sh", "-c", _GUARD, "img2dataset-guard", *args],
                                stdout=log_file, stderr=subprocess.STDOUT, cwd=work_dir, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=die_with_parent(signal.SIGTERM))
        bar = tqdm(total=n_shards, initial=n_done, unit="shard", desc="img2dataset",
                   disable=not progress)
        try:
            atomic_write_json(record, {"pgid": proc.pid, "token": token, "parent": os.getpid()})
            while proc.poll() is None:
                time.sleep(0.5)
                finished = len(list(output_dir.glob("*_stats.json")))
                if finished != bar.n:
                    bar.update(finished - bar.n)
        except BaseException:
            if proc.poll() is None:  # not reaped yet, so the group id is still the guard's
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise
        finally:
            _end_group(proc.pid, token)  # whatever img2dataset left running
            record.unlink(missing_ok=True)
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


# ---- canonical shards ----------------------------------------------------------------------------

UrlFix = Callable[[str, Any], Any]  # (key, recorded url) -> url to store


def _served_as(recorded: Any, listed: Any) -> bool:
    """Whether img2dataset's ``recorded`` url is the list's ``listed`` one, absolute or made
    absolute by some ``base_url`` (the demo's loopback port differs between runs)."""
    if recorded == listed:
        return True
    if not isinstance(listed, str) or not isinstance(recorded, str) or urlsplit(listed).scheme:
        return False
    return bool(urlsplit(recorded).scheme) and recorded.endswith("/" + quote(listed.lstrip("/")))


def _list_url(urls: list[Any], samples_per_shard: int, shard: int, key: str, recorded: Any) -> Any:
    """The list's own url of sample ``key`` of ``shard``, checked against the one recorded."""
    # img2dataset's compute_key: key = shard * 10**ceil(log10(samples_per_shard)) + index in shard
    index = int(key) - shard * 10 ** math.ceil(math.log10(samples_per_shard))
    row = shard * samples_per_shard + index
    if not (0 <= index < samples_per_shard and row < len(urls) and _served_as(recorded, urls[row])):
        raise RuntimeError(f"shard {_shard_name(shard)}, key {key}: url {recorded!r} is not row "
                           f"{row} of the URL list; the folder is inconsistent, use a new one")
    return urls[row]


def _rewrite_tar(path: Path, fix_url: UrlFix | None) -> None:
    """Members sorted by (key, extension), fixed headers, urls fixed in each ``.json``."""
    with tarfile.open(path, "r:") as source:
        members = source.getmembers()
        if len({m.name for m in members}) != len(members):
            raise RuntimeError(f"{path}: holds a member name twice; delete the shard's files to "
                               "download it again")
        with atomic_path(path) as tmp, open(tmp, "wb") as stream:
            with tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as target:
                for member in sorted(members, key=lambda m: m.name.partition(".")[::2]):
                    handle = source.extractfile(member) if member.isfile() else None
                    if handle is None:
                        raise RuntimeError(f"{path}: {member.name} is not a regular file")
                    data = handle.read()
                    key, _, extension = member.name.partition(".")
                    if extension == "json" and fix_url is not None:
                        meta = json.loads(data)
                        meta["url"] = fix_url(key, meta.get("url"))
                        data = json.dumps(meta, indent=4).encode()  # as img2dataset writes it
                    info = tarfile.TarInfo(member.name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o444
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    target.addfile(info, io.BytesIO(data))
            stream.flush()
            os.fsync(stream.fileno())


def _rewrite_parquet(path: Path, fix_url: UrlFix | None) -> None:
    """Rows sorted by key, urls fixed."""
    table = pq.read_table(path)
    if fix_url is not None:
        urls = [fix_url(k, u) for k, u in zip(table.column("key").to_pylist(),
                                               table.column("url").to_pylist())]
        index = table.schema.get_field_index("url")
        table = table.set_column(index, table.schema.field(index), pa.array(urls, pa.string()))
    table = table.take(pc.sort_indices(table, sort_keys=[("key", "ascending")])).combine_chunks()
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _canonical_shard(output_dir: Path, work_dir: Path, shard: int, fix_url: UrlFix | None) -> str:
    """Rewrite a finished shard canonically unless its marker says it is; returns the tar's sha256.

    Rewriting a canonical shard gives the same bytes, so a rewrite cut off anywhere is simply
    done again (the marker is written last)."""
    name = _shard_name(shard)
    tar, parquet = output_dir / f"{name}.tar", output_dir / f"{name}.parquet"
    marker = work_dir / CANONICAL_DIR / f"{name}.json"
    digests = {"tar": sha256_file(tar), "parquet": sha256_file(parquet)}
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        recorded = None
    if recorded != digests:
        _rewrite_tar(tar, fix_url)
        _rewrite_parquet(parquet, fix_url)
        digests = {"tar": sha256_file(tar), "parquet": sha256_file(parquet)}
        atomic_write_json(marker, digests)
    return digests["tar"]


# ---- the download --------------------------------------------------------------------------------

def download(url_list: str | Path, output_dir: str | Path, config: DownloadConfig, *,
             base_url: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Download ``url_list`` into webdataset shards in ``output_dir``; returns the manifest.

    Re-running after an interruption resumes (only missing shards are fetched, and finished ones
    that fall short are redone: see the module docstring). ``base_url`` prefixes url values that
    have no scheme (a list of paths relative to a web root, like the demo's); absolute urls are
    left alone, and the shards record each url as the list writes it. Raises
    :class:`DownloadError`, writing no manifest, when fewer than ``config.min_success_rate`` of the
    rows become samples.
    """
    url_list = Path(url_list).resolve()
    rows = validate_url_list(url_list, config)
    fmt = infer_input_format(url_list, config)
    output_dir = Path(output_dir).resolve()
    work_dir = output_dir / WORK_DIR
    source_sha = sha256_file(url_list)
    n_shards = math.ceil(rows / config.samples_per_shard)

    if work_dir.is_dir():
        _end_leftover(work_dir)  # before looking at shards: an orphan may still be writing them
    complete, incomplete = _scan_shards(output_dir) if output_dir.is_dir() else ([], [])
    request = {"source_sha256": source_sha, "rows": rows,
               **{k: getattr(config, k) for k in _OUTPUT_FIELDS}}
    work_dir.mkdir(parents=True, exist_ok=True)
    _check_request(output_dir, work_dir, request, bool(complete or incomplete))
    for stray in output_dir.glob(".*.tmp"):  # a rewrite or manifest cut off by a kill
        stray.unlink()

    expected = set(range(n_shards))
    redo = {}
    if not ((output_dir / MANIFEST).is_file() and expected <= set(complete)):
        for shard in sorted(expected & set(complete)):
            reason = _redo_reason(_read_stats(output_dir, shard), config)
            if reason is not None:
                redo[shard] = reason
    if redo or not expected <= set(complete):
        (output_dir / MANIFEST).unlink(missing_ok=True)  # img2dataset would parse it as shard stats
        for shard in sorted(incomplete + list(redo)):
            if shard in redo:
                log.warning("shard %s is redone: %s", _shard_name(shard), redo[shard])
            else:
                log.warning("shard %s is incomplete: downloading it again", _shard_name(shard))
            for suffix in ("_stats.json", ".tar", ".parquet"):
                Path(f"{output_dir / _shard_name(shard)}{suffix}").unlink(missing_ok=True)
            (work_dir / CANONICAL_DIR / f"{_shard_name(shard)}.json").unlink(missing_ok=True)
        done = len(set(complete) - set(redo))
        if done:
            log.info("resuming: %d of %d shards already done in %s", done, n_shards, output_dir)
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
                                     n_shards, done, progress)
        complete, _ = _scan_shards(output_dir)
        missing = sorted(expected - set(complete))
        if missing:
            raise RuntimeError(
                f"img2dataset finished but {len(missing)} of {n_shards} shards are missing "
                f"({', '.join(_shard_name(s) for s in missing[:10])}); run the same download again "
                f"to resume. Last lines of {output_dir / LOG_FILE}:\n"
                f"{_tail(output_dir / LOG_FILE, log_start)}")

    fix_url = None
    if base_url is not None:
        urls = _read_columns(url_list, fmt, [config.url_col]).column(0).to_pylist()
        fix_url = partial(_list_url, urls, config.samples_per_shard)
    digests = {shard: _canonical_shard(output_dir, work_dir, shard,
                                       None if fix_url is None else partial(fix_url, shard))
               for shard in sorted(expected)}
    totals, status = _totals(output_dir, sorted(expected), url_list, rows)
    _check_success(url_list, output_dir, totals, status, config)
    manifest = _manifest(output_dir, digests, totals, status, config, url_list, source_sha, rows,
                         base_url)
    atomic_write_json(output_dir / MANIFEST, manifest)
    return manifest


def _totals(output_dir: Path, shard_ids: list[int], url_list: Path,
            rows: int) -> tuple[dict[str, int], dict[str, int]]:
    """Summed counts and failure reasons (most frequent first) of the shards' stats files."""
    totals = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
    status: dict[str, int] = {}
    for shard in shard_ids:
        stats = _read_stats(output_dir, shard)
        for key in totals:
            totals[key] += int(stats[key])
        for reason, n in stats["status_dict"].items():
            status[reason] = status.get(reason, 0) + int(n)
    if totals["count"] != rows:
        raise RuntimeError(f"{output_dir}: shards hold {totals['count']} rows but {url_list} has "
                           f"{rows}; the folder is inconsistent, use a new output folder")
    return totals, dict(sorted(status.items(), key=lambda kv: (-kv[1], kv[0])))


def _check_success(url_list: Path, output_dir: Path, totals: dict[str, int],
                   status: dict[str, int], config: DownloadConfig) -> None:
    rate = totals["successes"] / totals["count"]
    if rate >= config.min_success_rate:
        return
    (output_dir / MANIFEST).unlink(missing_ok=True)
    failures = {r: n for r, n in status.items() if r != "success"}
    top = "; ".join(f"{reason!r} ({n})" for reason, n in list(failures.items())[:3])
    transient = sum(n for reason, n in failures.items() if is_transient(reason))
    if transient:
        retry = (f"{transient} of the failures look transient (a server or the network down, "
                 "timeouts): once the URLs answer again, run the same download again")
    else:
        retry = "Once the URLs are right (or the files are back), run the same download again"
    raise DownloadError(
        f"{url_list}: only {totals['successes']} of {totals['count']} rows were downloaded "
        f"({rate:.1%}), below DownloadConfig.min_success_rate {config.min_success_rate:g}. Most "
        f"frequent failures: {top}. {retry}; it redoes the shards that "
        "fall short and keeps the others. If the list really has that many dead links, lower "
        f"min_success_rate. No manifest was written to {output_dir}; img2dataset's log: "
        f"{output_dir / LOG_FILE}")


def _manifest(output_dir: Path, digests: dict[int, str], totals: dict[str, int],
              status: dict[str, int], config: DownloadConfig, url_list: Path, source_sha: str,
              rows: int, base_url: str | None) -> dict[str, Any]:
    shards = []
    for shard, digest in digests.items():
        stem = output_dir / _shard_name(shard)
        stats = _read_stats(output_dir, shard)
        tar = stem.with_suffix(".tar")
        shards.append({"name": tar.name, "parquet": stem.with_suffix(".parquet").name,
                       "count": int(stats["count"]), "samples": int(stats["successes"]),
                       "bytes": tar.stat().st_size, "sha256": digest})
    return {
        "source": {"url_list": str(url_list), "sha256": source_sha, "rows": rows,
                   "base_url": base_url},
        "totals": {**totals, "success_rate": totals["successes"] / totals["count"]},
        "status_dict": status,
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
