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
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import random
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import webdataset as wds
from transformers import PreTrainedTokenizerBase
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples
from webdataset.utils import make_seed

from codis.config import check, check_choice, check_int
from codis.data.manifest import MANIFEST
from codis.data.shards import PROGRESS, VE_LABEL_NAMES, shard_sample_counts, verify_shards
from codis.text import clean_caption, tokenize
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
    """

    def __init__(self) -> None:
        self._count = multiprocessing.Value("q", 0)

    def __call__(self, exn: BaseException) -> bool:
        self.add(1, describe_error(exn))
        return True

    def add(self, samples: int, what: str) -> None:
        """Count ``samples`` lost, logging ``what`` (which should name the shard)."""
        with self._count.get_lock():
            self._count.value += samples
        _LOG.warning("skipping %d sample(s): %s", samples, what)

    @property
    def count(self) -> int:
        return int(self._count.value)


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
    """``function(sample)``; an error names the sample's shard and key (webdataset's map does not)."""
    try:
        return function(sample)
    except Exception as exn:
        raise ShardDataError(f"{sample.get('__url__')}: sample {sample.get('__key__')!r}: "
                             f"{type(exn).__name__}: {exn}"[:500]) from exn


def _read_shards(sources: Iterator[dict], expected: dict[str, int],
                 skips: SkipCounter | None) -> Iterator[dict]:
    """Shards (webdataset's ``{"url": ...}`` stream) -> samples, one shard at a time, and what
    each shard lost.

    A shard read to its end must yield the samples its manifest lists (``expected``); a truncated
    or corrupt tar ends early, with an error or, when the damage falls between members, without
    one. Training (``skips`` given) logs the shard and the last key read and counts the missing
    samples; evaluation (``skips`` None) raises a ShardDataError naming them. A stream that stops
    inside a shard (a resampled stream cut at its last step) counts nothing for it.
    """
    for source in sources:
        url = source["url"]
        state: dict[str, Any] = {"member": None, "last": None, "error": None}

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

        seen = 0
        for sample in tarfile_samples(iter([source]), handler=handle, rename_files=note_member):
            seen += 1
            state["last"] = sample.get("__key__")
            yield sample
        want = expected.get(url)
        lost = (1 if state["error"] is not None else 0) if want is None else want - seen
        if lost > 0:
            what = (f"{url}: read {seen} sample(s), its manifest lists {want}" if want is not None
                    else f"{url}: broken tar, samples after {state['last']!r} lost (no manifest "
                         "to count them; counted as one)")
            if skips is None:
                raise ShardDataError(f"{what} (the last key read: {state['last']!r})")
            skips.add(lost, what)


class ShardLoader:
    """Iterable over batches (dicts) of a webdataset pipeline, in ``num_workers`` processes when
    that is above 0; ``skips`` counts the data the pipeline skipped (0 for evaluation loaders)."""

    def __init__(self, pipeline: wds.DataPipeline, num_workers: int, skips: SkipCounter) -> None:
        self.pipeline = pipeline
        self.num_workers = num_workers
        self.skips = skips
        # batch_size=None: batches are built inside the pipeline, the DataLoader only moves them.
        self._loader = (pipeline if num_workers == 0 else
                        wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers,
                                      worker_init_fn=_drop_inherited_thread_exit_handlers))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._loader)


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


def _sample_seed(seed: int, epoch: int, sample: dict) -> int:
    """A seed of its own for each (run seed, epoch, shard, key), stable across processes."""
    name = f"{seed}/{epoch}/{Path(str(sample.get('__url__', ''))).name}/{sample['__key__']}"
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


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
    an uninterrupted one would.
    """
    sample_seed = _sample_seed(seed, epoch, sample)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed)
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
             text_field: str) -> dict[str, Any]:
    """Stack tensors, turn integer fields into a tensor, keep the rest as lists; tokenise text."""
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


def _build(urls: list[str], task: _Task, transform: Callable, *, batch_size: int,
           tokenizer: PreTrainedTokenizerBase | None, max_words: int, max_length: int,
           num_workers: int, train: bool, resample: bool, seed: int, epoch: int,
           shuffle_buffer: int, drop_last: bool, skips: SkipCounter, rank: int = 0,
           world_size: int = 1) -> ShardLoader:
    for name, value in (("batch_size", batch_size), ("max_words", max_words),
                        ("max_length", max_length), ("world_size", world_size)):
        check_int(value, name, 1)
    check_int(rank, "rank", 0)
    check(rank < world_size, "rank", f"must be below world_size={world_size}, got {rank}")
    check(world_size == 1 or not train, "world_size", "only evaluation loaders take rank / "
          "world_size (training loaders split their shards by the torch.distributed rank)")
    check_int(num_workers, "num_workers", 0)
    check_int(shuffle_buffer, "shuffle_buffer", 0)
    handler = skips if train else _raise_named
    if resample:
        # Each rank and worker draws its own shards (ResampledShards seeds by rank and worker id),
        # so there is nothing to split.
        stages: list = [wds.ResampledShards(urls, seed=make_seed(seed, epoch), deterministic=True)]
    elif train:
        # The same seed on every rank and worker: all see the same permutation, so the two
        # splits below partition it and each sample is read once per epoch.
        stages = [wds.SimpleShardList(urls, seed=make_seed(seed, epoch)), wds.split_by_node,
                  wds.split_by_worker]
    else:
        # Evaluation: shard order; with world_size > 1 this rank keeps its share of the samples.
        stages = [wds.SimpleShardList(urls), wds.split_by_worker]
    stages.append(partial(_read_shards, expected=shard_sample_counts(urls),
                          skips=skips if train else None))
    if world_size > 1:
        stages.append(partial(_rank_share, shard_index={url: i for i, url in enumerate(urls)},
                              rank=rank, world_size=world_size))
    if train and shuffle_buffer > 0:
        # Shuffle the raw bytes (cheap to hold) before decoding.
        stages.append(wds.shuffle(shuffle_buffer, seed=make_seed(seed, epoch, 1)))
    stages += [
        wds.decode("pil", handler=handler),
        wds.map(partial(_naming_errors, function=(
            partial(_with_sample_seed, to_sample=task.to_sample, seed=seed, epoch=epoch,
                    transform=transform, max_words=max_words) if train else
            partial(task.to_sample, transform=transform, max_words=max_words))), handler=handler),
        wds.batched(batch_size, partial=not drop_last,
                    collation_fn=partial(_collate, tokenizer=tokenizer, max_length=max_length,
                                         text_field=task.text_field)),
    ]
    return ShardLoader(wds.DataPipeline(*stages), num_workers, skips)


def pretrain_loader(shards: str | list[str], *, tokenizer: PreTrainedTokenizerBase, image_size: int,
                    batch_size: int, max_words: int = 30, num_workers: int = 0,
                    resample: bool = False, seed: int = 0, shuffle_buffer: int = 1000,
                    hflip: bool = True, crop_min_scale: float = 0.2, epoch: int = 0,
                    max_length: int = 30, drop_last: bool = True,
                    skips: SkipCounter | None = None) -> ShardLoader:
    """The pretraining stream over caption shards (write_shards' pretrain/retrieval_train kinds or
    img2dataset's webdataset output). A record with a list of captions gives one of them per
    epoch, drawn from ``(seed, epoch)`` and the sample (:func:`_draw_caption`).

    Batches: ``image`` (B, 3, S, S) float, ``input_ids`` / ``attention_mask`` (B, L) long (L <=
    ``max_length``, pass ``TextConfig.max_length``), ``caption`` (cleaned, at most ``max_words``
    words) and ``key`` lists. Shard and sample order are seeded by ``(seed, epoch)``: build one
    loader per epoch. With ``resample`` shards are drawn with replacement and the stream never ends
    (take the steps you need). ``drop_last`` (ALBEF's default) keeps batch sizes fixed, which the
    momentum queues need. Broken data is skipped and counted in ``loader.skips`` (pass ``skips`` to
    share a counter across loaders).
    """
    task = _TASKS["pretrain"]
    return _build(shard_urls(shards, task.kinds), task,
                  pretrain_transform(image_size, hflip=hflip, crop_min_scale=crop_min_scale),
                  batch_size=batch_size, tokenizer=tokenizer, max_words=max_words,
                  max_length=max_length, num_workers=num_workers, train=True, resample=resample,
                  seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer, drop_last=drop_last,
                  skips=skips or SkipCounter())


def task_loader(shards: str | list[str], kind: str, *, image_size: int, batch_size: int,
                train: bool = False, tokenizer: PreTrainedTokenizerBase | None = None,
                max_words: int = 30, max_length: int = 30, num_workers: int = 0, seed: int = 0,
                epoch: int = 0, shuffle_buffer: int = 1000, hflip: bool = True,
                augment: bool = True, drop_last: bool | None = None,
                skips: SkipCounter | None = None, rank: int = 0, world_size: int = 1,
                ) -> ShardLoader:
    """A downstream-task loader over shards written by write_shards with ``kind``.

    ``train=False`` (evaluation): eval transform, shard and record order, every batch kept, errors
    raised. ``train=True``: finetuning transform (``hflip`` as in :mod:`codis.transforms`; with
    ``augment`` False the evaluation transform, no crops or RandAugment), shard
    and sample shuffles seeded by ``(seed, epoch)``, shards split across ranks and workers, full
    batches only (unless ``drop_last=False``), broken data skipped and counted in ``skips``.
    With a tokenizer, the task's text (caption / question / sentence) becomes ``input_ids`` and
    ``attention_mask``; for retrieval_eval all captions of the batch are flattened and
    ``text_image_index`` gives each text row's ``image_index``. Evaluation under several
    processes: ``rank`` of ``world_size`` reads its share of the samples (see :func:`_rank_share`).
    """
    check_choice(kind, "kind", tuple(k for k in _TASKS if k != "pretrain"))
    task = _TASKS[kind]
    augmenting = train and augment
    transform = train_transform(image_size, hflip=hflip) if augmenting else eval_transform(image_size)
    return _build(shard_urls(shards, task.kinds), task, transform, batch_size=batch_size,
                  tokenizer=tokenizer, max_words=max_words, max_length=max_length,
                  num_workers=num_workers, train=train, resample=False, seed=seed, epoch=epoch,
                  shuffle_buffer=shuffle_buffer, drop_last=train if drop_last is None else drop_last,
                  skips=skips or SkipCounter(), rank=rank, world_size=world_size)


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
