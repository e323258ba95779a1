"""Webdataset loaders: the pretraining stream and one loader per downstream task.

Every loader is the same webdataset pipeline, built by :func:`_build`:

    shard list -> [resample | seeded shard shuffle -> split_by_node] -> split_by_worker
    -> tar members, counted per shard -> [this rank's share (evaluation)] -> [sample shuffle
    buffer] -> PIL decode -> per-task sample mapping -> batches

Only the per-task sample mapping differs (a small function per kind) and, in the batch, which
text field is tokenised.

Before a loader is built, the shard folders it reads are checked against their manifests
(:func:`codis.data.shards.verify_shards`, via :func:`shard_urls`): a shard whose size or sha256
differs fails the loader, naming it, before any compute. Training streams then skip data that
still breaks (undecodable images, truncated tars) and count the samples lost, exactly, in a
:class:`SkipCounter`: a shard read to its end is compared with its manifest's sample count, so
the members a broken tar never yielded count too. Evaluation loaders raise instead, since a
silently dropped test sample would change the metric: a :class:`ShardDataError` naming the shard,
the sample key and the member.

Training batches hold uint8 images (the training transforms end in ``PILToTensor``), which
:func:`codis.train.fit` normalises on the device; evaluation batches hold normalised floats. A task
trained without augmentation maps each sample to the same example in every epoch: an
:class:`ExampleCache` shared by a run's epoch loaders decodes each once per run.

Resuming a training stream: every batch of a training loader's iterator leaves
:attr:`ShardLoaderIterator.position`: for each DataLoader worker, how many raw samples it has taken
from its sample shuffle (decoded or dropped as broken) and how many it lost, and which worker's
batch comes next. :meth:`ShardLoader.resume` from that position gives exactly the batches that
would have followed: each worker reads its shards and shuffles as before, but drops the consumed
samples right after the shuffle, before they are decoded, and the DataLoader's workers take their
roles in an order rotated so that the same worker's batch comes first (the DataLoader asks its
workers in turn, from worker 0). A restart thus re-reads tar bytes but decodes and augments
nothing it had used. The skip still parses the tar headers of every consumed sample: on the loaded
2-core machine 0.5 ms a sample (three members each) against 3.2 ms to decode and augment a 64 px
demo image, 3-11 ms at 256 px. This holds with ``resample`` too: the resampled shard stream is
seeded per worker (and rank) and epoch, so the skip re-draws the same shards and drops the same
samples, and its cost grows with the samples the epoch has taken (a resampled epoch never ends).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing
import random
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import webdataset as wds
from transformers import PreTrainedTokenizerBase
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples
from webdataset.utils import make_seed, pytorch_worker_info

from codis.config import check, check_choice, check_int, check_number
from codis.data.manifest import MANIFEST
from codis.data.shards import PROGRESS, VE_LABEL_NAMES, shard_sample_counts, verify_shards
from codis.text import clean_caption, mask_tokens, mlm_positions, tokenize
from codis.transforms import eval_transform, pretrain_transform, train_transform

_LOG = logging.getLogger(__name__)

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
"""Image member names tried in order (write_shards and img2dataset write ``jpg``)."""
VE_LABEL_IDS: dict[str, int] = {name: index for index, name in enumerate(reversed(VE_LABEL_NAMES))}
"""ALBEF's SNLI-VE class ids (ve_dataset.py): SNLI's label order reversed, so contradiction 0,
neutral 1, entailment 2."""


class ShardDataError(ValueError):
    """Data of a shard that cannot be read: the message names the shard, and the sample key where
    there is one. (Its text is fixed: webdataset appends its stream and URL to the ``args`` of the
    errors that pass through it.)"""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class SkipCounter:
    """A webdataset error handler for training streams: logs what broke (shard and key), counts
    the samples lost and lets the stream go on.

    :attr:`count` is the number of samples lost: one for each sample that fails to decode or to
    map (a handled error), plus, for each shard read to its end, the samples its manifest lists
    that the tar never yielded (a truncated or corrupt tar loses every member after the damage,
    sometimes without an error; :func:`_read_shards` adds them). So the count is exact for shards
    with a manifest; a broken tar without one counts as one sample (a lower bound). The count
    sits in shared memory, so samples lost inside DataLoader worker processes show up in the
    parent's :attr:`count`. webdataset's own ``warn_and_continue`` is not used because it sleeps
    half a second per error.

    :attr:`local` counts what this process added (a worker's share, which a resumable stream
    records with each batch); while :meth:`muted`, nothing is counted or logged (a resumed stream
    re-reading what the interrupted one counted already).
    """

    def __init__(self) -> None:
        self._count = multiprocessing.Value("q", 0)
        self._local = 0
        self._muted = False

    def __call__(self, exn: BaseException) -> bool:
        self.add(1, describe_error(exn))
        return True

    def add(self, samples: int, what: str) -> None:
        """Count ``samples`` lost, logging ``what`` (which should name the shard)."""
        if self._muted:
            return
        self._local += samples
        with self._count.get_lock():
            self._count.value += samples
        _LOG.warning("skipping %d sample(s): %s", samples, what)

    @property
    def count(self) -> int:
        return int(self._count.value)

    @property
    def local(self) -> int:
        return self._local

    def restore(self, count: int) -> None:
        """Set :attr:`count`: a resumed stream's, as the interrupted one had counted."""
        with self._count.get_lock():
            self._count.value = count

    @contextmanager
    def muted(self) -> Iterator[None]:
        self._muted = True
        try:
            yield
        finally:
            self._muted = False


IN_MEMORY_BYTES = 1 << 30
"""What a training stage may hold in memory to spare decoding again: :class:`ExampleCache`'s
budget, and the ViT initialisation's (:mod:`codis.train.vision_init`)."""


class ExampleCache:
    """A task's decoded training examples, kept from one epoch's loader to the next.

    A training loader whose transform draws nothing at random (``augment`` False: the evaluation
    resize, as uint8) maps a sample to the same example in every epoch, so it need decode and
    resize each image once per run rather than once per epoch: pass one cache to the loader of
    every epoch (:func:`task_loader`). The batches are the same tensors either way. Examples are
    kept, keyed by shard and sample key, while their tensors fit ``max_bytes``; the rest are
    decoded each epoch. A shard read whole whose every example is kept is not read again: later
    epochs take its sample keys, in the tar's order, from the cache, and those keys are counted,
    shuffled and skipped on resume as the tar's samples were. A loader that reads in worker
    processes (``num_workers`` above 0) does not use the cache: its workers end with each epoch.
    """

    def __init__(self, max_bytes: int = IN_MEMORY_BYTES) -> None:
        check_int(max_bytes, "max_bytes", 0)
        self.max_bytes = max_bytes
        self.bytes = 0
        self._examples: dict[tuple[str, str], dict] = {}
        self._shard_keys: dict[str, list[str]] = {}
        self._reader: tuple | None = None

    def __len__(self) -> int:
        return len(self._examples)

    def bind(self, reader: tuple) -> None:
        """Tie the cache to one way of reading (kind, transform settings): a loader reading
        otherwise would map the same sample to a different example."""
        if self._reader is None:
            self._reader = reader
        elif reader != self._reader:
            raise ValueError(f"cache: filled by a loader reading {self._reader}, "
                             f"not by one reading {reader}")

    def note_shard(self, url: str, keys: list[str]) -> None:
        """``url`` was read to its end without loss and gave the samples ``keys``, in order."""
        self._shard_keys[url] = keys

    def shard_keys(self, url: str) -> list[str] | None:
        """The sample keys of shard ``url`` when the cache holds the example of every one of
        them (reading it again would decode nothing), else None."""
        keys = self._shard_keys.get(url)
        if keys is None or any((url, key) not in self._examples for key in keys):
            return None
        return keys

    def examples(self, samples: Iterator[dict], stages: tuple[Callable, ...]) -> Iterator[dict]:
        """``samples`` mapped through ``stages`` (decode, map), each from the cache when it is
        there; a sample the stages drop (broken, counted by their handler) is not kept."""
        for sample in samples:
            identity = (str(sample.get("__url__", "")), sample["__key__"])
            example = self._examples.get(identity)
            if example is not None:
                yield example
                continue
            mapped: Iterator[dict] = iter([sample])
            for stage in stages:
                mapped = stage(mapped)
            for example in mapped:
                size = sum(value.nbytes for value in example.values()
                           if isinstance(value, torch.Tensor))
                if self.bytes + size <= self.max_bytes:
                    self._examples[identity] = example
                    self.bytes += size
                yield example


def describe_error(exn: BaseException) -> str:
    """One line naming what broke: webdataset's DecodingError carries the shard, key and member
    as attributes and the real error as its cause; a ShardDataError names them in its message."""
    if isinstance(exn, wds.DecodingError):
        return (f"{exn.url}: cannot decode member {exn.k!r} of sample {exn.key!r}: "
                f"{exn.__cause__!r}")[:500]
    if isinstance(exn, ShardDataError):
        return str(exn)[:500]
    return repr(exn)[:500]


def _raise_named(exn: BaseException) -> bool:
    """Evaluation's error handler: never skip; raise a ShardDataError naming shard and key."""
    if isinstance(exn, ShardDataError):
        raise exn
    raise ShardDataError(describe_error(exn)) from exn


def _naming_errors(sample: dict, function: Callable[[dict], dict]) -> dict:
    """``function(sample)`` with the sample's ``shard`` (its url: with ``key``, which restarts in
    each source, the sample's identity); an error names the sample's shard and key (webdataset's
    map does not)."""
    try:
        example = function(sample)
    except Exception as exn:
        raise ShardDataError(f"{sample.get('__url__')}: sample {sample.get('__key__')!r}: "
                             f"{type(exn).__name__}: {exn}"[:500]) from exn
    example["shard"] = str(sample.get("__url__", ""))  # each mapping returns a new dict
    return example


def _read_shards(sources: Iterator[dict], expected: dict[str, int], skips: SkipCounter | None,
                 cache: ExampleCache | None = None) -> Iterator[dict]:
    """Shards (webdataset's ``{"url": ...}`` stream) -> samples, one shard at a time, and what
    each shard lost. A shard whose examples ``cache`` holds yields their ``__url__`` / ``__key__``
    stubs without reading the tar (:meth:`ExampleCache.shard_keys`).

    A shard read to its end must yield the samples its manifest lists (``expected``); a truncated
    or corrupt tar ends early, with an error or, when the damage falls between members, without
    one. Training (``skips`` given) logs the shard and the last key read and counts the missing
    samples; evaluation (``skips`` None) raises a ShardDataError naming them. A stream that stops
    inside a shard (a resampled stream cut at its last step) counts nothing for it.
    """
    for source in sources:
        url = source["url"]
        cached = None if cache is None else cache.shard_keys(url)
        if cached is not None:
            yield from ({"__url__": url, "__key__": key} for key in cached)
            continue
        state: dict[str, Any] = {"member": None, "error": None}

        def note_member(name: str) -> str:  # webdataset's rename hook: the member being read
            state["member"] = name
            return name

        def handle(exn: BaseException) -> bool:
            if isinstance(exn, ShardDataError):
                raise exn
            member = state["member"]
            where = (f"{url}: the tar breaks at or after member {member!r} (sample "
                     f"{member.split('.', 1)[0]!r})" if member else f"{url}: the tar cannot be read")
            # webdataset appends " @ <stream>" to the message; the shard is named already
            cause = f"{type(exn).__name__}: {str(exn.args[0]).split(' @ ')[0] if exn.args else ''}"
            if skips is None:
                raise ShardDataError(f"{where}: {cause[:300]}") from exn
            if state["error"] is None:  # a broken tar stream raises again on every later read
                _LOG.warning("%s: %s", where, cause[:300])
            state["error"] = exn
            return True

        keys: list[str] = []
        for sample in tarfile_samples(iter([source]), handler=handle, rename_files=note_member):
            keys.append(sample["__key__"])
            yield sample
        seen, last = len(keys), keys[-1] if keys else None
        want = expected.get(url)
        lost = (1 if state["error"] is not None else 0) if want is None else want - seen
        if cache is not None and lost == 0 and state["error"] is None:
            cache.note_shard(url, keys)
        if lost > 0:
            what = (f"{url}: read {seen} sample(s), its manifest lists {want}" if want is not None
                    else f"{url}: broken tar, samples after {last!r} lost (no manifest "
                         "to count them; counted as one)")
            if skips is None:
                raise ShardDataError(f"{what} (the last key read: {last!r})")
            skips.add(lost, what)


_POSITION = "__position__"
"""The key under which a training pipeline's batch carries (worker, raw samples consumed, samples
lost) of the worker that built it; :class:`ShardLoaderIterator` takes it out."""


@dataclass(frozen=True)
class _WorkerPlan:
    """How the worker processes of one pass over a training stream split it, and where each starts.

    Logical worker w of ``workers`` reads shards w, w + W, ... of its rank's shard list (resampled:
    draws shards from the seed of w); DataLoader worker p plays logical worker (p + ``rotation``)
    mod W. ``start[w]``: (raw samples consumed, samples lost) of logical worker w when the pass
    begins (empty: a fresh pass)."""

    workers: int
    rotation: int = 0
    start: tuple[tuple[int, int], ...] = ()

    def logical_worker(self) -> int:
        info = torch.utils.data.get_worker_info()
        return ((0 if info is None else info.id) + self.rotation) % self.workers


class ShardLoader:
    """Iterable over batches (dicts) of a webdataset pipeline, in ``num_workers`` processes when
    that is above 0; ``skips`` counts the data the pipeline skipped (0 for evaluation loaders).

    ``build_pipeline(plan)`` builds the pipeline of one pass (see :class:`_WorkerPlan`).
    ``resumable``: a training stream, whose iterators keep a :attr:`ShardLoaderIterator.position`
    that :meth:`resume` continues from. ``pin_memory`` (default: when CUDA is available) puts
    batches in page-locked memory, from which a copy to the GPU does not hold the host up."""

    def __init__(self, build_pipeline: Callable[[_WorkerPlan], wds.DataPipeline], num_workers: int,
                 skips: SkipCounter, *, resumable: bool, pin_memory: bool | None = None) -> None:
        self.build_pipeline = build_pipeline
        self.num_workers = num_workers
        self.skips = skips
        self.resumable = resumable
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory

    def __iter__(self) -> ShardLoaderIterator:
        return ShardLoaderIterator(self, None)

    def resume(self, position: dict[str, Any]) -> ShardLoaderIterator:
        """The batches that follow ``position`` (an iterator's :attr:`ShardLoaderIterator.position`,
        from a loader built with the same arguments), without decoding the samples before it; the
        skip counter is set to what it was there."""
        if not self.resumable:
            raise ValueError("only training loaders resume; evaluation loaders start over")
        return ShardLoaderIterator(self, position)


class ShardLoaderIterator:
    """One pass over a :class:`ShardLoader`: its batches, and after each the position it reached."""

    def __init__(self, loader: ShardLoader, position: dict[str, Any] | None) -> None:
        workers = max(loader.num_workers, 1)
        if position is None:
            position = {"next": 0, "workers": [[0, 0]] * workers, "skipped": loader.skips.count}
        elif len(position["workers"]) != workers:
            raise ValueError(f"position: recorded with {len(position['workers'])} loader "
                             f"worker(s), this loader has {workers}")
        else:
            loader.skips.restore(position["skipped"] + sum(lost for _, lost in position["workers"]))
        self._next, self._skipped = int(position["next"]), int(position["skipped"])
        self._workers = [[int(consumed), int(lost)] for consumed, lost in position["workers"]]
        self._tracked, self._pin = loader.resumable, loader.pin_memory and loader.num_workers == 0
        pipeline = loader.build_pipeline(_WorkerPlan(workers, self._next,
                                               tuple(map(tuple, self._workers))))
        # batch_size=None: batches are built inside the pipeline, the DataLoader only moves them.
        self._batches = iter(pipeline if loader.num_workers == 0 else wds.WebLoader(
            pipeline, batch_size=None, num_workers=loader.num_workers,
            pin_memory=loader.pin_memory, worker_init_fn=_drop_inherited_thread_exit_handlers))

    def __iter__(self) -> ShardLoaderIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self._batches)
        if self._tracked:
            worker, consumed, lost = batch.pop(_POSITION)
            self._workers[worker] = [consumed, lost]
            self._next = (worker + 1) % len(self._workers)
        if self._pin:
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
        return batch

    @property
    def position(self) -> dict[str, Any] | None:
        """Where the batches yielded so far end (None for evaluation loaders): ``next``, the
        logical worker whose batch comes next; ``workers``, per logical worker, [raw samples
        taken from its shuffle, samples lost] at its last batch yielded; ``skipped``, the skip
        counter before this pass. Plain lists and ints (it goes into checkpoints)."""
        if not self._tracked:
            return None
        return {"next": self._next, "workers": [list(w) for w in self._workers],
                "skipped": self._skipped}


def _drop_inherited_thread_exit_handlers(worker_id: int) -> None:
    """A forked worker inherits its parent's thread exit handlers; those that a Prefect flow run
    registers (its log and event workers) fail in the child and make every DataLoader worker exit
    with status 1 ("worker exited unexpectedly"). The worker starts no such threads of its own."""
    threading._threading_atexits.clear()  # private, but the only hook: see the docstring


def shard_urls(shards: str | Path | list[str], kinds: tuple[str, ...] | None = None, *,
               verify: bool = True) -> list[str]:
    """Expand a shard spec: a list of paths, a brace pattern (``data/shard-{000000..000009}.tar``),
    a folder written by :func:`codis.data.shards.write_shards` (its manifest's shards, whose kind must be
    in ``kinds``), or any other folder of ``*.tar`` files (e.g. img2dataset's output).

    With ``verify`` the shards that a manifest lists (a folder's, or for paths their folder's) are
    checked against it first (:func:`codis.data.shards.verify_shards`): a ShardIntegrityError names
    each shard whose size or sha256 differs."""
    if isinstance(shards, (list, tuple)):
        urls = [str(s) for s in shards]
    elif Path(shards).is_dir():
        folder = Path(shards)
        manifest = folder / MANIFEST
        if manifest.is_file():
            data = json.loads(manifest.read_text(encoding="utf-8"))
            # The download stage's manifest has no kind: img2dataset writes image-caption pairs.
            kind = data.get("kind", "pretrain")
            if kinds is not None and kind not in kinds:
                raise ValueError(f"{manifest}: holds {kind!r} shards; this loader reads "
                                 f"{' or '.join(kinds)}")
            urls = [str(folder / entry["name"]) for entry in data["shards"]]
        elif (folder / PROGRESS).is_file():
            raise ValueError(f"{folder}: sharding was interrupted (no {MANIFEST}); re-run write_shards")
        else:
            urls = sorted(str(p) for p in folder.glob("*.tar"))
    else:
        urls = expand_urls(str(shards))
    if not urls:
        raise ValueError(f"shards: no shards found in {shards!r}")
    if verify:
        verify_shards(urls)
    return urls


# ---- per-task sample mappings: decoded webdataset sample -> fields of one example ----------------

def _image(sample: dict) -> Any:
    for name in IMAGE_MEMBERS:
        if name in sample:
            return sample[name]
    raise KeyError(f"no image member (one of {', '.join(IMAGE_MEMBERS)})")


def _caption_sample(sample: dict, transform: Callable, max_words: int) -> dict:
    if "txt" not in sample:
        raise KeyError("no 'txt' member: only training loaders draw from a caption list")
    return {"image": transform(_image(sample)), "caption": clean_caption(sample["txt"], max_words),
            "key": sample["__key__"]}


def _retrieval_train_sample(sample: dict, transform: Callable, max_words: int) -> dict:
    return {**_caption_sample(sample, transform, max_words), "image_id": sample["json"]["image_id"]}


def _retrieval_eval_sample(sample: dict, transform: Callable, max_words: int) -> dict:
    # image_index is the record position (the key), which the captions' text_image_index points to
    return {"image": transform(_image(sample)), "image_index": int(sample["__key__"]),
            "caption": [clean_caption(c, max_words) for c in sample["json"]["caption"]],
            "key": sample["__key__"]}


def answer_weights(answer: list[str] | str | None) -> tuple[list[str], list[float]]:
    """ALBEF's VQA targets: each distinct annotator answer weighted by its share of the answers; a
    single (Visual Genome) answer string gets weight 0.5; test questions have none."""
    if answer is None:
        return [], []
    if isinstance(answer, str):
        return [answer], [0.5]
    weights: dict[str, float] = {}
    for item in answer:
        weights[item] = weights.get(item, 0.0) + 1.0 / len(answer)
    return list(weights), list(weights.values())


def _vqa_sample(sample: dict, transform: Callable, max_words: int) -> dict:
    meta = sample["json"]
    answers, weights = answer_weights(meta.get("answer"))
    return {"image": transform(_image(sample)), "question": clean_caption(sample["txt"], max_words),
            "question_id": meta["question_id"], "answers": answers, "answer_weights": weights,
            "key": sample["__key__"]}


def _nlvr_sample(sample: dict, transform: Callable, max_words: int) -> dict:
    return {"image0": transform(sample["0.jpg"]), "image1": transform(sample["1.jpg"]),
            "sentence": clean_caption(sample["txt"], max_words),
            "label": int(sample["json"]["label"] == "True"), "key": sample["__key__"]}


def _ve_sample(sample: dict, transform: Callable, max_words: int) -> dict:
    return {"image": transform(_image(sample)), "sentence": clean_caption(sample["txt"], max_words),
            "label": VE_LABEL_IDS[sample["json"]["label"]], "key": sample["__key__"]}


def _seed_of(name: str) -> int:
    """A 64-bit seed from a name, stable across processes (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _sample_seed(seed: int, epoch: int, sample: dict) -> int:
    """A seed of its own for each (run seed, epoch, shard, key)."""
    shard = Path(str(sample.get("__url__", ""))).name
    return _seed_of(f"{seed}/{epoch}/{shard}/{sample['__key__']}")


def _draw_caption(sample: dict, sample_seed: int) -> dict:
    """A pretraining sample whose record holds a caption list (in ``json``, no ``txt``: see
    :mod:`codis.data.shards`) gets one of its captions as ``txt``. ALBEF draws with
    ``random.choice`` at every read; here the draw comes from the sample's seed, through a
    generator of its own: the same (seed, epoch) draws the same caption, and each epoch draws anew."""
    captions = sample["json"].get("caption") if isinstance(sample.get("json"), dict) else None
    if "txt" in sample or not isinstance(captions, list) or not captions:
        return sample
    return {**sample, "txt": captions[random.Random(sample_seed).randrange(len(captions))]}


def _with_sample_seed(sample: dict, to_sample: Callable, seed: int, epoch: int,
                      transform: Callable, max_words: int) -> dict:
    """Draw a training sample's augmentation (and its caption, from a caption list) from its own
    seed, not from the process's RNG.

    So the augmentations do not depend on the number of workers, on which worker reads which
    shard, or on how far the pipeline has read ahead, and a resumed run sees exactly the images
    an uninterrupted one would. Only the CPU generator, which the transforms draw from, is seeded:
    ``torch.manual_seed`` also queues a seed for every CUDA device, formatting a traceback each
    time (360 us a sample against 12 us, on the CPU-only torch), and ``fork_rng(devices=[])`` does
    not restore the CUDA generators, so without workers it reseeded the training's CUDA RNG.
    """
    sample_seed = _sample_seed(seed, epoch, sample)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(sample_seed)
        return to_sample(_draw_caption(sample, sample_seed), transform, max_words)


@dataclass(frozen=True)
class _Task:
    kinds: tuple[str, ...]  # shard kinds (manifest "kind") the task reads
    to_sample: Callable[[dict, Callable, int], dict]
    text_field: str  # the field tokenised into input_ids / attention_mask


_TASKS = {
    "pretrain": _Task(("pretrain", "retrieval_train"), _caption_sample, "caption"),
    "retrieval_train": _Task(("retrieval_train",), _retrieval_train_sample, "caption"),
    "retrieval_eval": _Task(("retrieval_eval",), _retrieval_eval_sample, "caption"),
    "vqa": _Task(("vqa",), _vqa_sample, "question"),
    "nlvr": _Task(("nlvr",), _nlvr_sample, "sentence"),
    "ve": _Task(("ve",), _ve_sample, "sentence"),
}


def _collate(samples: list[dict], tokenizer: PreTrainedTokenizerBase | None, max_length: int,
             text_field: str, mlm_probability: float | None = None, seed: int = 0,
             epoch: int = 0) -> dict[str, Any]:
    """Stack tensors, turn integer fields into a tensor, keep the rest as lists; tokenise text.

    With ``mlm_probability``, also BERT's masking of the tokenised text
    (:func:`codis.text.mask_tokens`): ``mlm_ids``, ``mlm_labels`` and ``mlm_positions``
    (:func:`codis.text.mlm_positions`), drawn here on the CPU, where finding the masked positions
    costs no device sync, from a generator seeded by ``(seed, epoch)`` and the batch's keys: the
    same batch gets the same masks whichever worker builds it and whenever (a resumed run too)."""
    batch: dict[str, Any] = {}
    for name in samples[0]:
        if name.startswith("__"):
            continue
        values = [s[name] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[name] = torch.stack(values)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            batch[name] = torch.tensor(values, dtype=torch.long)
        else:
            batch[name] = values
    if tokenizer is not None:
        texts = batch[text_field]
        if texts and isinstance(texts[0], list):  # retrieval eval: several captions per image
            batch["text_image_index"] = torch.tensor(
                [int(i) for i, group in zip(batch["image_index"], texts) for _ in group])
            texts = [text for group in texts for text in group]
        batch["input_ids"], batch["attention_mask"] = tokenize(tokenizer, texts, max_length)
    if mlm_probability is not None:
        generator = torch.Generator().manual_seed(
            _seed_of(f"mlm/{seed}/{epoch}/{','.join(batch['key'])}"))
        batch["mlm_ids"], batch["mlm_labels"] = mask_tokens(batch["input_ids"], tokenizer,
                                                            mlm_probability, generator=generator)
        batch["mlm_positions"] = mlm_positions(batch["mlm_labels"])
    return batch


def _rank_share(samples: Iterator[dict], shard_index: dict[str, int], rank: int,
                world_size: int) -> Iterator[dict]:
    """The samples of ``rank``: sample i of shard s belongs to rank (s + i) mod world_size. So
    each sample is on exactly one rank, whichever worker reads its shard, and the offset s
    spreads the shards' remainders over the ranks. Runs before decoding: a rank decodes only its
    own images."""
    position: dict[str, int] = {}
    for sample in samples:
        url = sample["__url__"]
        index = position.get(url, 0)
        position[url] = index + 1
        if (shard_index[url] + index) % world_size == rank:
            yield sample


def _split_by_worker(shards: Iterator[dict], plan: _WorkerPlan) -> Iterator[dict]:
    """This logical worker's shards (webdataset's ``split_by_worker`` reads the physical id)."""
    if plan.workers == 1:
        yield from shards
    else:
        yield from itertools.islice(shards, plan.logical_worker(), None, plan.workers)


def _resampled_worker_seed(plan: _WorkerPlan) -> int:
    """webdataset's per-worker seed of a resampled stream (rank * 1000 + worker), for the logical
    worker."""
    return pytorch_worker_info()[0] * 1000 + plan.logical_worker()


def _batches(samples: Iterator[dict], *, to_examples: tuple[Callable, ...],
             collate: Callable[[list[dict]], dict], batch_size: int, keep_partial: bool,
             plan: _WorkerPlan | None, skips: SkipCounter) -> Iterator[dict]:
    """Raw samples -> examples (through the ``to_examples`` stages: decode, map) -> batches, each
    collated as soon as it is full (webdataset's ``batched`` decodes one sample more first).

    With a ``plan`` (training), this worker first drops, undecoded and without counting them
    again, the raw samples the plan says it had taken, and each batch carries under
    :data:`_POSITION` the worker's totals so far: raw samples taken (broken ones included, so a
    resume drops exactly those) and samples lost (those lost by this process's reading, decoding
    and mapping: :attr:`SkipCounter.local`)."""
    if plan is None:
        worker, consumed, lost = 0, 0, 0
    else:
        worker = plan.logical_worker()
        consumed, lost = plan.start[worker] if plan.start else (0, 0)
        with skips.muted():
            for _ in itertools.islice(samples, consumed):
                pass
    lost_before = skips.local

    def counted() -> Iterator[dict]:
        nonlocal consumed
        for sample in samples:
            consumed += 1
            yield sample

    def collated(examples: list[dict]) -> dict:
        batch = collate(examples)
        if plan is not None:
            batch[_POSITION] = (worker, consumed, lost + skips.local - lost_before)
        return batch

    examples: Iterator[dict] = counted()
    for stage in to_examples:
        examples = stage(examples)
    batch: list[dict] = []
    for example in examples:
        batch.append(example)
        if len(batch) == batch_size:
            yield collated(batch)
            batch = []
    if batch and keep_partial:
        yield collated(batch)


def _build(urls: list[str], task: _Task, transform: Callable, *, batch_size: int,
           tokenizer: PreTrainedTokenizerBase | None, max_words: int, max_length: int,
           num_workers: int, train: bool, resample: bool, seed: int, epoch: int,
           shuffle_buffer: int, drop_last: bool, skips: SkipCounter, rank: int = 0,
           world_size: int = 1, mlm_probability: float | None = None,
           cache: ExampleCache | None = None) -> ShardLoader:
    for name, value in (("batch_size", batch_size), ("max_words", max_words),
                        ("max_length", max_length), ("world_size", world_size)):
        check_int(value, name, 1)
    check_int(rank, "rank", 0)
    check(rank < world_size, "rank", f"must be below world_size={world_size}, got {rank}")
    check(world_size == 1 or not train, "world_size", "only evaluation loaders take rank / "
          "world_size (training loaders split their shards by the torch.distributed rank)")
    check_int(num_workers, "num_workers", 0)
    check_int(shuffle_buffer, "shuffle_buffer", 0)
    if mlm_probability is not None:
        check_number(mlm_probability, "mlm_probability", 0.0, 1.0, low_open=True, high_open=True)
    handler = skips if train else _raise_named
    to_sample = (partial(_with_sample_seed, to_sample=task.to_sample, seed=seed, epoch=epoch,
                         transform=transform, max_words=max_words) if train else
                 partial(task.to_sample, transform=transform, max_words=max_words))
    to_examples = (wds.decode("pil", handler=handler),
                   wds.map(partial(_naming_errors, function=to_sample), handler=handler))
    if cache is not None:
        to_examples = (partial(cache.examples, stages=to_examples),)
    collate = partial(_collate, tokenizer=tokenizer, max_length=max_length,
                      text_field=task.text_field, mlm_probability=mlm_probability, seed=seed,
                      epoch=epoch)
    expected = shard_sample_counts(urls)

    def build_pipeline(plan: _WorkerPlan) -> wds.DataPipeline:
        if resample:
            # Each rank and worker draws its own shards (seeded by rank and worker id), so there
            # is nothing to split.
            stages: list = [wds.ResampledShards(urls, seed=make_seed(seed, epoch),
                                                worker_seed=partial(_resampled_worker_seed, plan),
                                                deterministic=True)]
        elif train:
            # The same seed on every rank and worker: all see the same permutation, so the two
            # splits below partition it and each sample is read once per epoch.
            stages = [wds.SimpleShardList(urls, seed=make_seed(seed, epoch)), wds.split_by_node,
                      partial(_split_by_worker, plan=plan)]
        else:
            # Evaluation: shard order; with world_size > 1 this rank keeps its share of the samples.
            stages = [wds.SimpleShardList(urls), partial(_split_by_worker, plan=plan)]
        stages.append(partial(_read_shards, expected=expected, skips=skips if train else None,
                              cache=cache))
        if world_size > 1:
            stages.append(partial(_rank_share, shard_index={url: i for i, url in enumerate(urls)},
                                  rank=rank, world_size=world_size))
        if train and shuffle_buffer > 0:
            # Shuffle the raw bytes (cheap to hold) before decoding.
            stages.append(wds.shuffle(shuffle_buffer, seed=make_seed(seed, epoch, 1)))
        stages.append(partial(_batches, to_examples=to_examples, collate=collate,
                              batch_size=batch_size, keep_partial=not drop_last,
                              plan=plan if train else None, skips=skips))
        return wds.DataPipeline(*stages)

    return ShardLoader(build_pipeline, num_workers, skips, resumable=train)


def pretrain_loader(shards: str | list[str], *, tokenizer: PreTrainedTokenizerBase, image_size: int,
                    batch_size: int, max_words: int = 30, num_workers: int = 0,
                    resample: bool = False, seed: int = 0, shuffle_buffer: int = 1000,
                    hflip: bool = True, crop_min_scale: float = 0.2, epoch: int = 0,
                    max_length: int = 30, drop_last: bool = True,
                    skips: SkipCounter | None = None,
                    mlm_probability: float | None = None) -> ShardLoader:
    """The pretraining stream over caption shards (write_shards' pretrain/retrieval_train kinds or
    img2dataset's webdataset output). A record with a list of captions gives one of them per
    epoch, drawn from ``(seed, epoch)`` and the sample (:func:`_draw_caption`).

    Batches: ``image`` (B, 3, S, S) uint8 (:func:`codis.transforms.normalize_on_device` makes it
    the model's input), ``input_ids`` / ``attention_mask`` (B, L) long (L <= ``max_length``, pass
    ``TextConfig.max_length``), ``caption`` (cleaned, at most ``max_words`` words) and ``key``
    lists; with ``mlm_probability`` (pass ``ModelConfig.mlm_probability``), the MLM inputs
    ``mlm_ids``, ``mlm_labels`` and ``mlm_positions``, drawn per batch (see :func:`_collate`).
    Shard and sample order are seeded by ``(seed, epoch)``: build one loader per epoch. With
    ``resample`` shards are drawn with replacement and the stream never ends (take the steps you
    need). ``drop_last`` (ALBEF's default) keeps batch sizes fixed, which the
    momentum queues need. Broken data is skipped and counted in ``loader.skips`` (pass ``skips`` to
    share a counter across loaders).
    """
    task = _TASKS["pretrain"]
    return _build(shard_urls(shards, task.kinds), task,
                  pretrain_transform(image_size, hflip=hflip, crop_min_scale=crop_min_scale),
                  batch_size=batch_size, tokenizer=tokenizer, max_words=max_words,
                  max_length=max_length, num_workers=num_workers, train=True, resample=resample,
                  seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer, drop_last=drop_last,
                  skips=skips or SkipCounter(), mlm_probability=mlm_probability)


def task_loader(shards: str | list[str], kind: str, *, image_size: int, batch_size: int,
                train: bool = False, tokenizer: PreTrainedTokenizerBase | None = None,
                max_words: int = 30, max_length: int = 30, num_workers: int = 0, seed: int = 0,
                epoch: int = 0, shuffle_buffer: int = 1000, hflip: bool = True,
                augment: bool = True, drop_last: bool | None = None,
                skips: SkipCounter | None = None, rank: int = 0, world_size: int = 1,
                cache: ExampleCache | None = None) -> ShardLoader:
    """A downstream-task loader over shards written by write_shards with ``kind``.

    ``train=False`` (evaluation): eval transform (normalised float images), shard and record
    order, every batch kept, errors raised. ``train=True``: finetuning transform, uint8 images
    (``hflip`` as in :mod:`codis.transforms`; with ``augment`` False the evaluation resize, no crops
    or RandAugment), shard
    and sample shuffles seeded by ``(seed, epoch)``, shards split across ranks and workers, full
    batches only (unless ``drop_last=False``), broken data skipped and counted in ``skips``.
    With a tokenizer, the task's text (caption / question / sentence) becomes ``input_ids`` and
    ``attention_mask``; for retrieval_eval all captions of the batch are flattened and
    ``text_image_index`` gives each text row's ``image_index``. Evaluation under several
    processes: ``rank`` of ``world_size`` reads its share of the samples (see :func:`_rank_share`).
    ``cache``: an :class:`ExampleCache` shared by the loaders of a run's epochs, used by a training
    loader without ``augment`` that reads in this process (``num_workers`` 0), else unused.
    """
    check_choice(kind, "kind", tuple(k for k in _TASKS if k != "pretrain"))
    task = _TASKS[kind]
    transform = (train_transform(image_size, hflip=hflip, augment=augment) if train else
                 eval_transform(image_size))
    if cache is not None and train and not augment and num_workers == 0:
        cache.bind((kind, image_size, max_words))
    else:
        cache = None
    return _build(shard_urls(shards, task.kinds), task, transform, batch_size=batch_size,
                  tokenizer=tokenizer, max_words=max_words, max_length=max_length,
                  num_workers=num_workers, train=train, resample=False, seed=seed, epoch=epoch,
                  shuffle_buffer=shuffle_buffer, drop_last=train if drop_last is None else drop_last,
                  skips=skips or SkipCounter(), rank=rank, world_size=world_size, cache=cache)


def retrieval_train_loader(shards: str | list[str], **kwargs: Any) -> ShardLoader:
    """Retrieval finetuning (train transform, seeded shuffle): image, caption, image_id, key."""
    return task_loader(shards, "retrieval_train", train=True, **kwargs)


def retrieval_eval_loader(shards: str | list[str], **kwargs: Any) -> ShardLoader:
    """Retrieval evaluation, one sample per image: image, image_index, caption (list), key."""
    return task_loader(shards, "retrieval_eval", **kwargs)


def vqa_loader(shards: str | list[str], **kwargs: Any) -> ShardLoader:
    """VQA: image, question, question_id, answers and ALBEF answer_weights (empty on test), key."""
    return task_loader(shards, "vqa", **kwargs)


def nlvr_loader(shards: str | list[str], **kwargs: Any) -> ShardLoader:
    """NLVR2: image0, image1, sentence, label (1 for "True"), key."""
    return task_loader(shards, "nlvr", **kwargs)


def ve_loader(shards: str | list[str], **kwargs: Any) -> ShardLoader:
    """SNLI-VE: image, sentence, label (:data:`VE_LABEL_IDS`), key."""
    return task_loader(shards, "ve", **kwargs)
