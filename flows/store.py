"""Content-keyed stage folders: what makes a re-run skip finished work.

Every stage of a reproduction writes into ``<store>/<stage>/<key>/``, where the key is a hash of
the stage's parameters and of the identities of its inputs (:func:`stage_key`). An input inside
another stage's folder is identified by that stage's key, so a changed upstream stage changes the
key of everything downstream; an input outside the store (a URL list, an annotation file) by its
sha256, a folder outside the store (an image root) by its path.

A stage folder is complete when it holds ``_stage.json`` (:data:`MARKER`): written last and
atomically, after the stage's own outputs, with the key, parameters, inputs, outputs and metrics,
so ``cat runs/store/*/*/_stage.json`` shows what was computed from what. A folder without the
marker is a stage that started and did not finish: running it again continues in the same
folder, and codis's stages resume from what is there (training checkpoints, finished download
and tar shards). Stages therefore write in place rather than in a temporary folder renamed at the
end: the folder's path never changes, so the paths recorded inside checkpoints and run configs
stay true, and an interrupted stage resumes instead of starting over.

A completed stage whose outputs are shard folders lists them in its marker's ``verify`` (the
download and shard stages pass ``verify=["shards"]``): before such a stage is returned as done,
each folder's shards are checked against its manifest (size and sha256,
:func:`codis.data.shards.verify_shards`; digests are cached in the folder by file size and mtime,
so a check of unchanged files costs a ``stat`` each). A stage that fails the check is not reused:
the differing shard files are deleted, the marker is moved aside to ``_stage.rejected.json``
(:data:`REJECTED`, with the reason) and the log names the shards; the stage then runs again in its
folder, rewriting just those shards (write_shards and the download both redo a missing shard).

Two reproductions running the same stage at once are serialised by an exclusive ``flock`` on
``<store>/<stage>/.locks/<key>.lock``: the second waits, then finds the marker and skips. Different keys
never share a folder. (``flock`` is per host; on a shared network file system give each host its
own store or one writer per stage.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from codis.data.shards import verify_mode, verify_shards
from codis.files import atomic_write_json, sha256_file
from codis.processes import file_lock

_LOG = logging.getLogger(__name__)

MARKER = "_stage.json"
STARTED = "_stage.started.json"
REJECTED = "_stage.rejected.json"
"""Where a completed stage's marker goes when its outputs fail their check (see the module doc)."""
KEY_VERSION = 1
"""Part of every key: bump it when the stage functions change what they write."""
KEY_LENGTH = 16

InputPaths = Mapping[str, "str | Path | list[str | Path] | None"]


def canonical_json(value: Any) -> str:
    """Deterministic JSON of parameters: sorted keys, dataclasses and pydantic models as dicts,
    tuples as lists, paths as strings."""
    def default(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        if hasattr(obj, "model_dump"):
            return obj.model_dump(mode="json")
        if isinstance(obj, Path):
            return str(obj)
        raise TypeError(f"cannot key a value of type {type(obj).__name__}: {obj!r}")

    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=default,
                      ensure_ascii=True, allow_nan=False)


def stage_key(stage: str, params: Mapping[str, Any], inputs: Mapping[str, Any]) -> str:
    """The key of a stage: sha256 over the stage name, :data:`KEY_VERSION`, its parameters and its
    inputs' identities (see :func:`input_identity`), first :data:`KEY_LENGTH` hex digits."""
    payload = canonical_json({"stage": stage, "version": KEY_VERSION, "params": params,
                              "inputs": inputs})
    return hashlib.sha256(payload.encode("ascii")).hexdigest()[:KEY_LENGTH]


def owning_stage(path: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The completed stage folder that contains ``path`` (and its marker), if any."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        marker = folder / MARKER
        if marker.is_file():
            return folder, json.loads(marker.read_text(encoding="utf-8"))
    return None


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    stat = path.stat()
    cache_key = (str(path), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _SHA_CACHE:  # a CC3M URL list is hashed once per process, not per stage
        _SHA_CACHE[cache_key] = sha256_file(path)
    return _SHA_CACHE[cache_key]


def input_identity(path: str | Path) -> str:
    """What a stage's key records for one input path.

    Inside a completed stage folder: ``<stage>/<key>[/<relative path>]``. Elsewhere, a file:
    ``sha256:<digest>``; a folder: ``dir:<absolute path>`` (folders of images are not hashed:
    replacing images in place is not noticed, use a new folder)."""
    path = Path(path).resolve()
    owner = owning_stage(path)
    if owner is not None:
        folder, marker = owner
        relative = path.relative_to(folder).as_posix()
        base = f"{marker['stage']}/{marker['key']}"
        return base if relative == "." else f"{base}/{relative}"
    if path.is_file():
        return f"sha256:{_file_digest(path)}"
    if path.is_dir():
        return f"dir:{path}"
    raise FileNotFoundError(f"stage input not found: {path}")


def identities(inputs: InputPaths) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in inputs.items():
        if value is None:
            out[name] = None
        elif isinstance(value, (list, tuple)):
            out[name] = [input_identity(v) for v in value]
        else:
            out[name] = input_identity(value)
    return out


@dataclass(frozen=True)
class StageResult:
    """A finished stage: its folder, key, outputs (paths relative to the folder, and other
    JSON values) and metrics; ``cached`` when this call found it already done."""

    stage: str
    key: str
    path: str
    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    cached: bool = False
    marker: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def file(self, name: str) -> Path:
        """An output path by name (outputs hold paths relative to the stage folder)."""
        if name not in self.outputs:
            raise KeyError(f"stage {self.stage}/{self.key} has no output {name!r} "
                           f"(outputs: {', '.join(self.outputs)})")
        return Path(self.path) / self.outputs[name]

    def files(self, name: str) -> list[Path]:
        return [Path(self.path) / p for p in self.outputs[name]]

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "key": self.key, "path": self.path, "outputs": self.outputs,
                "metrics": self.metrics, "cached": self.cached}

    @classmethod
    def from_marker(cls, folder: Path, marker: dict[str, Any], cached: bool) -> "StageResult":
        return cls(stage=marker["stage"], key=marker["key"], path=str(folder),
                   outputs=marker.get("outputs", {}), metrics=marker.get("metrics", {}),
                   cached=cached, marker=marker)


@dataclass(frozen=True)
class StageOutput:
    """What a stage's work function returns: ``outputs`` (paths relative to the stage folder,
    lists of them, or other JSON values), ``metrics`` (floats), and ``verify``: shard folders
    (relative to the stage folder) checked against their manifests whenever the stage is reused."""

    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    verify: list[str] = field(default_factory=list)


class Store:
    """The shared stage store (``runs/store`` by default)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def folder(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str, *, verify: Sequence[str] = (),
               log: Callable[[str], None] | None = None) -> StageResult | None:
        """The completed stage ``stage/key``, or None: also when a shard folder listed by its
        marker's ``verify`` field or by ``verify`` (for markers written without the field) differs
        from its manifest. Then the differing shards are deleted, the marker moved to
        :data:`REJECTED`, and ``log`` (default: this module's logger) told which shards failed, so
        that running the stage again redoes them."""
        folder = self.folder(stage, key)
        path = folder / MARKER
        if not path.is_file():
            return None
        marker = json.loads(path.read_text(encoding="utf-8"))
        if not self._intact(folder, marker, verify, log or _LOG.warning):
            return None
        return StageResult.from_marker(folder, marker, True)

    def _intact(self, folder: Path, marker: dict[str, Any], verify: Sequence[str],
                log: Callable[[str], None]) -> bool:
        """Check the shard folders a completed stage lists; reject the stage if one differs."""
        mode = verify_mode()  # a bad setting is an error of its own, not a broken stage
        for relative in dict.fromkeys([*marker.get("verify", []), *verify]):
            try:
                verify_shards(folder / relative, mode=mode)
            except (ValueError, FileNotFoundError) as error:  # ShardIntegrityError, bad manifest
                for shard in getattr(error, "paths", []):
                    shard.unlink(missing_ok=True)
                try:
                    atomic_write_json(folder / REJECTED, {**marker, "rejected": {
                        "time": time.time(), "folder": relative, "reason": str(error)}})
                    (folder / MARKER).unlink()
                except FileNotFoundError:  # rejected by a concurrent lookup already
                    pass
                log(f"{marker['stage']}/{marker['key']}: not reused, {relative}/ fails its "
                    f"check: {error}; the stage runs again")
                return False
        return True

    def prepare(self, stage: str, params: Mapping[str, Any], inputs: InputPaths) -> tuple[str, dict]:
        """The key of a stage call and its inputs' identities (nothing is written)."""
        ids = identities(inputs)
        return stage_key(stage, params, ids), ids

    def run(self, stage: str, params: Mapping[str, Any], inputs: InputPaths,
            work: Callable[[Path], StageOutput], *, key: str | None = None,
            on_wait: Callable[[], None] | None = None,
            provenance: Mapping[str, Any] | None = None,
            verify: Sequence[str] = ()) -> StageResult:
        """Run ``work(folder)`` unless ``stage`` with these parameters and inputs is complete (and
        its shard folders, ``verify`` and those its marker lists, pass their check: see
        :meth:`lookup`).

        ``work`` writes its files into ``folder`` (which may hold a previous attempt's files) and
        returns their names; the marker is written after it returns, listing ``verify`` and the
        output's ``verify`` as the folders to check on reuse. An exception leaves the folder
        without a marker, to be resumed by the next call."""
        params = json.loads(canonical_json(params))
        computed, ids = self.prepare(stage, params, inputs)
        if key is not None and key != computed:
            raise ValueError(f"stage {stage}: key {key} does not match its inputs ({computed})")
        key = computed
        found = self.lookup(stage, key, verify=verify)
        if found is not None:
            return found
        folder = self.folder(stage, key)
        with file_lock(self.root / stage / ".locks" / f"{key}.lock", on_wait):
            found = self.lookup(stage, key, verify=verify)  # finished elsewhere while we waited
            if found is not None:
                return found
            folder.mkdir(parents=True, exist_ok=True)
            resumed = (folder / STARTED).is_file()
            started = time.time()
            atomic_write_json(folder / STARTED, {
                "stage": stage, "key": key, "params": params, "inputs": ids,
                "input_paths": _paths(inputs), "started": started, "resumed": resumed})
            output = work(folder)
            marker = {
                "format": 1, "stage": stage, "key": key, "params": params, "inputs": ids,
                "input_paths": _paths(inputs), "outputs": output.outputs,
                "metrics": output.metrics, "info": output.info,
                "verify": list(dict.fromkeys([*verify, *output.verify])), "started": started,
                "finished": time.time(), "duration_s": round(time.time() - started, 3),
                "resumed": resumed, "host": socket.gethostname(), "pid": os.getpid(),
                "provenance": dict(provenance or {}),
            }
            atomic_write_json(folder / MARKER, json.loads(canonical_json(marker)))
            (folder / STARTED).unlink(missing_ok=True)
            return StageResult.from_marker(folder, marker, cached=False)

    def completed(self, stage: str | None = None) -> list[StageResult]:
        """Every completed stage in the store (of one stage kind), for inspection and tests."""
        pattern = f"{stage}/*/{MARKER}" if stage else f"*/*/{MARKER}"
        return [StageResult.from_marker(m.parent, json.loads(m.read_text(encoding="utf-8")), True)
                for m in sorted(self.root.glob(pattern))]


def _paths(inputs: InputPaths) -> dict[str, Any]:
    return {name: ([str(v) for v in value] if isinstance(value, (list, tuple))
                   else None if value is None else str(value))
            for name, value in inputs.items()}
