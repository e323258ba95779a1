"""Annotation files over local images -> webdataset tar shards, written atomically and resumably.

One sample per annotation record, keyed ``%09d`` by record position. Members: the image file's
original bytes as ``jpg`` (``0.jpg`` / ``1.jpg`` for the two NLVR2 images; Pillow reads the format
from the bytes, so a PNG stored under ``jpg`` still decodes), the caption / sentence / question as
``txt``, and the rest of the record as ``json``. Pretraining shards thus have img2dataset's member
names (``key.jpg``, ``key.txt``, ``key.json``) and one loader reads both. A pretraining record
whose ``caption`` is a list (ALBEF's ``Pretrain.yaml``: "text or list_of_text") keeps the list in
``json`` and has no ``txt``: the loader draws one caption per epoch.

Released ALBEF files load as they are (:func:`image_files` resolves their image paths): SNLI-VE's
``image`` is a bare Flickr id (``"2248275918"``), opened as ``<id>.jpg`` as ALBEF and LAVIS do;
VQA and VG-QA records name their image root by their ``dataset`` field (ALBEF's ``vqa_root`` /
``vg_root``), given as ``image_roots``; the pretraining files name absolute paths on ALBEF's
servers (``/export/share/datasets/vision/coco/images/train2014/...``), whose prefix
``image_prefix`` replaces by the image root.

Each shard is written under a hidden temporary name and ``os.replace``d into place when complete,
so a shard with its final name is always whole. ``manifest.partial.json`` records every finished
shard (name, count, sha256, first/last key, and a fingerprint of the records and image files it
came from); a re-run with the same inputs keeps each shard whose file still has the recorded
sha256 and rewrites the others. ``manifest.json`` is written last and exists only while the
directory is complete.

:func:`verify_shards` checks a shard folder (this module's or the download's, whose manifest
lists the same per-shard size and sha256) against its manifest: the store calls it before reusing
a shard or download stage, the loaders before they read a folder. Re-hashing hundreds of GB for
every check would be too slow, so a verified digest is cached in the folder's
``.verified-digests`` (:data:`VERIFIED`) under the file's name, size and mtime: a shard whose size
or mtime changed is hashed again, but an in-place rewrite that keeps both (``touch -r``, or a
write within the same timestamp tick as the check that cached it, which is why files modified less
than two seconds before hashing are never cached) is not noticed. ``CODIS_VERIFY_SHARDS=full`` (or
``mode="full"``) re-hashes every shard; ``off`` skips the check.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import webdataset as wds
from tqdm import tqdm

from codis.config import check, check_choice, check_int
from codis.data.manifest import MANIFEST, read_manifest, record_location
from codis.files import atomic_path, atomic_write_json, sha256_file

_LOG = logging.getLogger(__name__)

FORMAT = "codis-shards/1"
PROGRESS = "manifest.partial.json"
SHARD_PATTERN = "shard-%06d.tar"
KEY_PATTERN = "%09d"
# A fixed member mtime makes a shard's bytes (and sha256) a function of its inputs alone.
_TAR_MTIME = 0  # an int: a float mtime makes tarfile add a PAX header to every member

KINDS = ("pretrain", "retrieval_train", "retrieval_eval", "vqa", "nlvr", "ve")
_REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "pretrain": {"image": str, "caption": (str, list)},
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


def _type_names(types: type | tuple[type, ...]) -> str:
    names = {"str": "a string", "int": "an integer", "list": "a list of strings"}
    return " or ".join(names.get(t.__name__, t.__name__) for t in
                       (types if isinstance(types, tuple) else (types,)))


def _validate_records(records: list[dict], kind: str) -> None:
    """Each record has the fields of ``kind`` with the right types; an error names the record
    (``<file>: record <i>`` for :func:`~codis.data.manifest.read_annotations`' lists) and the field."""
    required = _REQUIRED[kind]
    for index, record in enumerate(records):
        where = record_location(records, index)
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(record).__name__}")
        for key, types in required.items():
            if key not in record:
                raise ValueError(f"{where}: missing key {key!r} (kind {kind!r} needs "
                                 f"{', '.join(required)})")
            if not isinstance(record[key], types) or isinstance(record[key], bool):
                raise ValueError(f"{where}: {key!r} must be {_type_names(types)}, got "
                                 f"{type(record[key]).__name__} {record[key]!r:.60}")
        if kind == "nlvr" and (len(record["images"]) != 2
                               or not all(isinstance(p, str) for p in record["images"])):
            raise ValueError(f"{where}: 'images' must be a list of two paths")
        # An evaluation image may have no caption (ALBEF counts it as a text-retrieval miss); a
        # pretraining sample needs one to draw.
        if kind in ("retrieval_eval", "pretrain") and isinstance(record["caption"], list) and (
                not all(isinstance(c, str) for c in record["caption"])
                or (kind == "pretrain" and not record["caption"])):
            qualifier = "non-empty " if kind == "pretrain" else ""
            raise ValueError(f"{where}: 'caption' must be a {qualifier}list of strings")
        if kind in LABEL_NAMES_BY_KIND and record["label"] not in LABEL_NAMES_BY_KIND[kind]:
            raise ValueError(f"{where}: 'label' is {record['label']!r}, expected one of "
                             f"{', '.join(LABEL_NAMES_BY_KIND[kind])}")
        if kind == "vqa" and "answer" in record:
            # the answers become the tokenizer's input: strings only (ALBEF: the annotators' list)
            answer = record["answer"]
            if not (isinstance(answer, str) or isinstance(answer, list) and answer
                    and all(isinstance(a, str) for a in answer)):
                raise ValueError(f"{where}: 'answer' must be a string or a non-empty list of "
                                 f"strings, got {answer!r:.60}")


def _image_paths(record: dict, kind: str) -> list[str]:
    return list(record["images"]) if kind == "nlvr" else [record["image"]]


def _record_root(records: list[dict], index: int, image_root: Path | None,
                 image_roots: dict[str, Path]) -> Path:
    """The image root of one record: ``image_roots[record["dataset"]]`` where ``image_roots`` is
    given and the record names its dataset (ALBEF's VQA: "vqa" or "vg"), else ``image_root``."""
    record = records[index]
    if image_roots and "dataset" in record:
        dataset = record["dataset"]
        if not isinstance(dataset, str) or dataset not in image_roots:
            raise ValueError(f"{record_location(records, index)}: 'dataset' is {dataset!r}, "
                             f"image_roots has {', '.join(map(repr, image_roots))}")
        return image_roots[dataset]
    if image_root is None:
        raise ValueError(f"{record_location(records, index)}: no image root: the record has no "
                         f"'dataset' field and image_root is not given")
    return image_root


def image_files(records: list[dict], kind: str, image_root: str | Path | None, *,
                image_roots: dict[str, str | Path] | None = None,
                image_prefix: str | None = None) -> list[list[Path]]:
    """Each record's image files, as :func:`write_shards` opens them.

    A path is taken under the record's root (:func:`_record_root`); an absolute path stands as it
    is, unless it begins with ``image_prefix``, which is then replaced by the root. A SNLI-VE
    ``image`` without a suffix is a Flickr id, opened as ``<id>.jpg`` (ALBEF's ``ve_dataset.py``)."""
    root = None if image_root is None else Path(image_root)
    roots = {name: Path(path) for name, path in (image_roots or {}).items()}
    resolved = []
    for index, record in enumerate(records):
        record_root = _record_root(records, index, root, roots)
        paths = []
        for path in _image_paths(record, kind):
            if kind == "ve" and not PurePosixPath(path).suffix:
                path += ".jpg"
            if image_prefix and path.startswith(image_prefix):
                path = path[len(image_prefix):].lstrip("/")
            paths.append(record_root / path)
        resolved.append(paths)
    return resolved


def _check_images(resolved: list[list[Path]], roots: list[Path]) -> None:
    """Raise before any write if some images are missing."""
    missing = list(dict.fromkeys(str(p) for paths in resolved for p in paths if not p.is_file()))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} referenced image(s) missing under {', '.join(map(str, roots))}; "
            f"first: {', '.join(missing[:5])}")


def _sample(record: dict, paths: list[Path], kind: str, key: str) -> dict[str, Any]:
    sample: dict[str, Any] = {"__key__": key}
    if kind == "nlvr":
        sample["0.jpg"], sample["1.jpg"] = (p.read_bytes() for p in paths)
    else:
        sample["jpg"] = paths[0].read_bytes()
    rest = dict(record)
    text_field = TEXT_FIELD.get(kind)
    if text_field is not None and isinstance(rest[text_field], str):  # a caption list stays in json
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


def write_shards(records: list[dict], image_root: str | Path | None, output_dir: str | Path, *,
                 kind: str, samples_per_shard: int = 1000, source: dict | None = None,
                 progress: bool = True, image_roots: dict[str, str | Path] | None = None,
                 image_prefix: str | None = None) -> dict:
    """Write ``records`` (an ALBEF annotation list of ``kind``) with their images as tar shards.

    Image paths are relative to ``image_root``; with ``image_roots`` (dataset name -> root), a
    record that has a ``dataset`` field takes its root from there (ALBEF's VQA training set mixes
    ``"vqa"`` records under COCO with ``"vg"`` ones under Visual Genome), and ``image_root`` may be
    None when every record does. ``image_prefix``: a prefix of absolute image paths that stands
    for the root (see :func:`image_files`).

    Returns the manifest (also saved as ``output_dir/manifest.json``): format, kind, source (the
    caller's ``source`` plus image root(s), kind and shard size), totals, and per shard its name,
    sample count, sha256, first and last key. Re-running with the same inputs rewrites nothing;
    shards whose inputs or bytes changed are rewritten. Raises ConfigError for a bad ``kind``,
    ``samples_per_shard``, ``image_roots`` or ``image_prefix``, ValueError for a bad record and
    FileNotFoundError for missing images, before anything is written.
    """
    check_choice(kind, "kind", KINDS)
    check_int(samples_per_shard, "samples_per_shard", 1)
    check(image_roots is None or isinstance(image_roots, dict) and all(
        isinstance(name, str) and isinstance(path, (str, Path)) for name, path in image_roots.items()),
        "image_roots", f"must map dataset names to folders, got {image_roots!r:.80}")
    check(image_root is not None or bool(image_roots), "image_root",
          "must be given unless image_roots is")
    check(image_prefix is None or isinstance(image_prefix, str) and image_prefix != "",
          "image_prefix", f"must be a non-empty string or None, got {image_prefix!r}")
    if not isinstance(records, list) or not records:
        raise ValueError("records: must be a non-empty list of annotation records")
    _validate_records(records, kind)
    paths = image_files(records, kind, image_root, image_roots=image_roots,
                        image_prefix=image_prefix)
    roots = {name: str(path) for name, path in (image_roots or {}).items()}
    _check_images(paths, [Path(path) for path in [image_root, *roots.values()] if path is not None])

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
        "source": {**(source or {}), "image_root": None if image_root is None else str(image_root),
                   **({"image_roots": roots} if roots else {}),
                   **({"image_prefix": image_prefix} if image_prefix else {}),
                   "kind": kind, "samples_per_shard": samples_per_shard},
        "num_samples": len(records),
        "num_images": sum(len(p) for p in paths),
        "num_shards": num_shards,
        "shards": entries,
    }
    atomic_write_json(out / MANIFEST, manifest)
    (out / PROGRESS).unlink(missing_ok=True)
    return manifest


# ---- integrity: shard files against their manifest ------------------------------------------------
VERIFIED = ".verified-digests"
"""The sidecar of a shard folder, JSON: ``{"format": 1, "files": {name: {"size", "mtime_ns",
"sha256"}}}``, the digests :func:`verify_shards` computed, reused while a file's size and mtime are
unchanged. Not named ``*.json``: img2dataset reads every ``*.json`` of its output folder as a
shard's stats."""
VERIFY_ENV = "CODIS_VERIFY_SHARDS"
VERIFY_MODES = ("cached", "full", "off")
# A file modified this recently may be modified again within the same mtime tick: not cached.
_RACY_NS = 2_000_000_000


class ShardIntegrityError(ValueError):
    """Shard files that differ from their manifest. ``problems``: ``(shard path, what differs)``
    for each, in manifest order."""

    def __init__(self, message: str, problems: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.problems = [tuple(problem) for problem in problems]

    @property
    def paths(self) -> list[Path]:
        return [Path(path) for path, _ in self.problems]


def entry_samples(entry: dict[str, Any]) -> int | None:
    """The samples one shard of a manifest holds: ``samples`` in the download's entries (whose
    ``count`` is URL rows, failed ones included), ``count`` in :func:`write_shards`'."""
    value = entry.get("samples", entry.get("count"))
    return None if value is None else int(value)


def _entry_size(entry: dict[str, Any]) -> int | None:
    value = entry.get("size", entry.get("bytes"))  # write_shards' and the download's field
    return None if value is None else int(value)


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _listed(source: str | Path | Sequence[str | Path]) -> list[tuple[Path, list[tuple[str, dict]]]]:
    """``(folder, [(url, manifest entry)])`` for the shards ``source`` names that a manifest lists:
    a shard folder or its manifest.json (all its shards; the manifest must exist), or shard paths
    (those whose folder has a manifest listing them; others have nothing to be checked against)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir() or path.name == MANIFEST:
            folder = path if path.is_dir() else path.parent
            return [(folder, [(str(folder / e["name"]), e) for e in read_manifest(folder)["shards"]])]
        source = [source]
    wanted: dict[Path, list[str]] = {}
    for url in map(str, source):
        if _is_local(url):
            wanted.setdefault(Path(url).parent, []).append(url)
    groups = []
    for folder, urls in wanted.items():
        if not (folder / MANIFEST).is_file():
            continue
        entries = {e["name"]: e for e in read_manifest(folder)["shards"]}
        listed = [(url, entries[Path(url).name]) for url in dict.fromkeys(urls)
                  if Path(url).name in entries]
        if listed:
            groups.append((folder, listed))
    return groups


def shard_sample_counts(urls: Sequence[str]) -> dict[str, int]:
    """``{url: samples}`` for the shards among ``urls`` that their folder's manifest lists (the
    loaders compare what they read with it)."""
    return {url: count for _, listed in _listed(list(urls)) for url, entry in listed
            if (count := entry_samples(entry)) is not None}


def verify_mode(mode: str | None = None) -> str:
    """``mode``, else the :data:`VERIFY_ENV` environment variable, else "cached"; checked."""
    if mode is None:
        value = os.environ.get(VERIFY_ENV, "") or "cached"
        check_choice(value, VERIFY_ENV, VERIFY_MODES)
        return value
    check_choice(mode, "mode", VERIFY_MODES)
    return mode


@contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Hold an exclusive flock on the folder's manifest, so that processes verifying one folder at
    once (the ranks of a torchrun job) hash it once: the others then find the cache. The manifest
    is opened for reading, so a read-only folder is locked too."""
    try:
        handle = open(folder / MANIFEST, "rb")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_cache(folder: Path) -> dict[str, dict]:
    try:
        data = json.loads((folder / VERIFIED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("format") == 1 else None
    return files if isinstance(files, dict) else {}


def _digest(path: Path, stat: os.stat_result, cache: dict[str, dict], full: bool) -> tuple[str, bool]:
    """The sha256 of ``path`` (cached under its name, size and mtime) and whether it was hashed."""
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    known = cache.get(path.name)
    if not full and isinstance(known, dict) and known.get("sha256") and \
            {k: known.get(k) for k in stamp} == stamp:
        return known["sha256"], False
    started = time.time_ns()
    digest = sha256_file(path)
    after = path.stat()
    if (after.st_size, after.st_mtime_ns) == (stat.st_size, stat.st_mtime_ns) \
            and stat.st_mtime_ns < started - _RACY_NS:
        cache[path.name] = {**stamp, "sha256": digest}
    else:
        cache.pop(path.name, None)
    return digest, True


def verify_shards(source: str | Path | Sequence[str | Path], *, mode: str | None = None,
                  ) -> dict[str, int]:
    """Check shard files against their manifest: each must exist with the manifest's size and
    sha256 (an entry without them is checked for what it has).

    ``source``: a shard folder (or its ``manifest.json``): every shard it lists; or a list of shard
    paths: those that their folder's manifest lists (remote URLs and folders without a manifest
    have nothing to be checked against). ``mode`` (default: the :data:`VERIFY_ENV` environment
    variable, else "cached"): "cached" re-hashes only files whose size or mtime changed since a
    check cached their digest in the folder's :data:`VERIFIED` (see the module docstring for what
    that misses), "full" re-hashes every file, "off" checks nothing.

    Returns ``{"shards": checked, "hashed": re-hashed}``. Raises :class:`ShardIntegrityError`
    naming every differing shard (path, expected and actual size or sha256), FileNotFoundError /
    ValueError for a missing or unreadable manifest.
    """
    mode = verify_mode(mode)
    if mode == "off":
        return {"shards": 0, "hashed": 0}
    problems: list[tuple[str, str]] = []
    checked = hashed = 0
    for folder, listed in _listed(source):
        with _exclusive(folder):
            cache = _read_cache(folder)
            before = json.dumps(cache, sort_keys=True)
            for url, entry in listed:
                path = folder / entry["name"]
                checked += 1
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    problems.append((url, "missing (listed in its folder's manifest)"))
                    continue
                size = _entry_size(entry)
                if size is not None and stat.st_size != size:
                    problems.append((url, f"{stat.st_size} bytes, its manifest lists {size}"))
                    continue
                if not entry.get("sha256"):
                    continue
                digest, fresh = _digest(path, stat, cache, mode == "full")
                hashed += fresh
                if digest != entry["sha256"]:
                    problems.append((url, f"sha256 {digest[:16]}..., its manifest lists "
                                          f"{entry['sha256'][:16]}..."))
            if json.dumps(cache, sort_keys=True) != before:
                try:
                    atomic_write_json(folder / VERIFIED, {"format": 1, "files": cache})
                except OSError as error:  # a read-only folder: verified, just not cached
                    _LOG.debug("%s: cannot cache verified digests (%s)", folder, error)
    if problems:
        shown = "; ".join(f"{url}: {what}" for url, what in problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ShardIntegrityError(f"{len(problems)} shard(s) differ from their manifest: "
                                  f"{shown}{more}", problems)
    return {"shards": checked, "hashed": hashed}
