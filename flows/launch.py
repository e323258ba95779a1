"""Launching codis in other processes: torchrun command lines, and running one as a stage's
subprocess while following the metrics it writes.

Pretraining with several processes runs :func:`torchrun_command` (:mod:`flows.pretrain_entry`,
whose rank 0 appends to ``metrics.jsonl``); evaluation with several runs
:func:`evaluate_command` (``codis evaluate``, whose rank 0 writes ``metrics.json``). Both run on
this machine through :func:`run_logged`, as do the one-process trainings of stages that run
side by side (:func:`pretrain_command`, :func:`finetune_command`, with
:func:`thread_environment`). :func:`pretrain_run_config` is the run config of one
variant of a recipe as the pretrain stage builds it, which ``flows.pretrain_entry --recipe`` (a
torchrun job outside the flow: infra/README.md) trains.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from codis.data.manifest import shard_files
from codis.train import PretrainConfig
from flows import recipe as recipes
from flows.recipe import PretrainSpec, VariantSpec

OnRecord = Callable[[int, dict[str, float]], None]
"""Called with ``(step, metrics)`` for each line of a followed ``metrics.jsonl``."""


class Stopped(RuntimeError):
    """A stage's subprocess was ended because a stage running beside it failed or the flow was
    interrupted (:func:`run_logged`'s ``stop``)."""


def launcher(spec: PretrainSpec) -> Literal["inprocess", "torchrun"]:
    """``auto``: in-process for one process (metrics through the callback, no start-up cost),
    torchrun for more."""
    if spec.launcher != "auto":
        return spec.launcher
    return "inprocess" if spec.nodes * spec.gpus_per_node == 1 else "torchrun"


def torchrun_command(spec: PretrainSpec, run_config: str | Path, *, metrics: str | Path | None = None,
                     rdzv_id: str = "codis", python: str | None = None) -> list[str]:
    """The pretraining command line for ``spec``'s nodes and processes: torchrun (run as
    ``python -m torch.distributed.run``, the module behind the ``torchrun`` script, so it is the
    same interpreter as the flow's) starting :mod:`flows.pretrain_entry` on ``run_config`` (the
    ``codis pretrain`` command plus a metrics file). One node: ``--standalone``; several: c10d
    rendezvous at ``rdzv_endpoint`` under ``rdzv_id``, the same command on every node."""
    command = [python or sys.executable, "-m", "torch.distributed.run",
               f"--nnodes={spec.nodes}", f"--nproc-per-node={spec.gpus_per_node}",
               f"--max-restarts={spec.max_restarts}"]
    if spec.nodes == 1:
        command.append("--standalone")
    else:
        if not spec.rdzv_endpoint:
            raise ValueError("pretrain.rdzv_endpoint: required when nodes > 1")
        command += ["--rdzv-backend=c10d", f"--rdzv-endpoint={spec.rdzv_endpoint}",
                    f"--rdzv-id={rdzv_id}"]
    command += ["-m", "flows.pretrain_entry", "--config", str(run_config)]
    if metrics is not None:
        command += ["--metrics", str(metrics)]
    return command


def pretrain_run_config(spec: PretrainSpec, name: str, variant: VariantSpec,
                        shards: Sequence[str | Path], output_dir: str | Path,
                        steps_scale: float = 1.0, vision_weights: str | Path | None = None,
                        ) -> PretrainConfig:
    """The run config (``run.yaml``) of variant ``name`` over the tar files of the shard folders
    ``shards``, written to ``output_dir``: :func:`flows.recipe.pretrain_config`, its ViT
    initialised from ``vision_weights`` (a vision_init stage's weights file) if given. Errors name
    the recipe field (``variants.<name>....``)."""
    config = recipes.pretrain_config(spec, variant, shard_files(shards), output_dir, steps_scale,
                                     where=f"variants.{name}")
    if vision_weights is not None:
        vision = dataclasses.replace(config.model.vision, pretrained=str(vision_weights))
        config = dataclasses.replace(config, model=config.model.replace(vision=vision))
    return config


def pretrain_command(run_config: str | Path, metrics: str | Path,
                     python: str | None = None) -> list[str]:
    """Pretraining in one subprocess without torchrun (:mod:`flows.pretrain_entry` on the
    pretrain stage's ``run.yaml``, appending to ``metrics``): how a single-process pretraining runs
    beside other training stages."""
    return [python or sys.executable, "-m", "flows.pretrain_entry", "--config", str(run_config),
            "--metrics", str(metrics), "--no-progress"]


def finetune_command(job: str | Path, metrics: str | Path, python: str | None = None) -> list[str]:
    """A finetuning or text-assignment stage's job (``job.json``) in a subprocess
    (:mod:`flows.finetune_entry`), appending its metrics to ``metrics``."""
    return [python or sys.executable, "-m", "flows.finetune_entry", "--job", str(job),
            "--metrics", str(metrics)]


def cpu_threads() -> int:
    """The CPUs this process may run on (its affinity, where the platform tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The GPUs this process may hand to its subprocesses, as ``CUDA_VISIBLE_DEVICES`` entries:
    those it was given itself, else every device torch sees; none without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    given = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return given[:torch.cuda.device_count()] or [str(i) for i in range(torch.cuda.device_count())]


def gpu_device(gpus: str | None) -> str | None:
    """The torch device, as this process numbers its GPUs, of the first GPU in ``gpus`` (a
    ``CUDA_VISIBLE_DEVICES`` value made of :func:`visible_gpus` entries); None for none."""
    if not gpus:
        return None
    first = gpus.split(",")[0].strip()
    given = visible_gpus()
    if first not in given:
        raise ValueError(f"GPU {first!r} is not one of this process's GPUs: "
                         f"{', '.join(given) or 'none'}")
    return f"cuda:{given.index(first)}"


def thread_environment(threads: int) -> dict[str, str]:
    """Environment variables that give a subprocess's torch (OpenMP, MKL) ``threads`` threads."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def evaluation_processes(spec: PretrainSpec) -> int:
    """How many processes an evaluation runs: one per GPU that pretraining uses on a node.
    Evaluation runs on the flow's own node (``--standalone``), so with several pretraining nodes
    it uses this node's GPUs only."""
    return spec.gpus_per_node


def evaluate_command(task: str, checkpoint: str | Path, shards: str | Path, output: str | Path, *,
                     preset: str, config: Mapping[str, Any], processes: int,
                     options: Mapping[str, Any] | None = None, progress: bool = True,
                     python: str | None = None) -> list[str]:
    """``codis evaluate`` under torchrun with ``processes`` processes on this machine: the task
    config is ``preset`` with every field set to ``config``'s value (so the subprocess evaluates
    exactly the config the stage was keyed with), ``options``: further keyword arguments of the
    task's ``evaluate``; rank 0 writes the metrics to ``output``."""
    command = [python or sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={processes}", "-m", "codis.cli", "evaluate", "--task", task,
               "--checkpoint", str(checkpoint), "--shards", str(shards), "--preset", preset,
               "--set", json.dumps(dict(config), sort_keys=True), "--output", str(output)]
    if options:
        command += ["--options", json.dumps(dict(options), sort_keys=True)]
    if not progress:
        command.append("--no-progress")
    return command


def follow_jsonl(process: subprocess.Popen, jsonl: Path, on_record: OnRecord,
                 poll: float = 1.0, stop: threading.Event | None = None) -> None:
    """Wait for ``process``, passing each new line of ``jsonl`` to ``on_record`` as it appears;
    raise :class:`Stopped` once ``stop`` is set."""
    offset = jsonl.stat().st_size if jsonl.is_file() else 0  # earlier attempts were logged then
    pending = ""
    while True:
        finished = process.poll() is not None
        if jsonl.is_file():
            with open(jsonl, encoding="utf-8") as handle:
                handle.seek(offset)
                pending += handle.read()
                offset = handle.tell()
            *lines, pending = pending.split("\n")
            for line in lines:
                if line.strip():
                    item = json.loads(line)
                    on_record(int(item.pop("step")), item)
        if finished:
            return
        _check_stop(stop)
        time.sleep(poll)


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise Stopped("stopped: a stage running beside this one failed, or the run was interrupted")


def _wait(process: subprocess.Popen, stop: threading.Event | None, poll: float = 1.0) -> None:
    while True:
        try:
            process.wait(timeout=poll)
            return
        except subprocess.TimeoutExpired:
            _check_stop(stop)


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a text file ("" if there is none)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def run_logged(command: Sequence[str], folder: Path, name: str, *, jsonl: Path | None = None,
               on_record: OnRecord | None = None, label: str | None = None,
               logger: logging.Logger | logging.LoggerAdapter | None = None,
               env: Mapping[str, str] | None = None, stop: threading.Event | None = None) -> None:
    """Run ``command`` for the stage folder ``folder``: the command line goes to
    ``command.txt`` (and, as ``<label>: <command>``, to ``logger``), its output to
    ``<name>.log``; with ``jsonl`` and ``on_record``, each line the process appends to ``jsonl``
    is passed on while it runs. ``env``: variables set for the process on top of this one's.
    Interrupting the wait, or setting ``stop`` (checked every second), ends the process; a failed
    one raises RuntimeError with the last lines of its log."""
    (folder / "command.txt").write_text(" ".join(command) + "\n", encoding="utf-8")
    if logger is not None:
        logger.info("%s: %s", label or name, " ".join(command))
    log_path = folder / f"{name}.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(list(command), stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL,
                                   env={**os.environ, **env} if env else None)
        try:
            if jsonl is not None and on_record is not None:
                follow_jsonl(process, jsonl, on_record, stop=stop)
            else:
                _wait(process, stop)
        except BaseException:
            process.terminate()
            process.wait()
            raise
    if process.returncode != 0:
        raise RuntimeError(f"{name} exited with status {process.returncode}; last lines of "
                           f"{log_path}:\n{tail(log_path)}")
