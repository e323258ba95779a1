"""The four downstream tasks, one module each with the same contract.

Every task module defines a config class derived from :class:`codis.tasks.base.TaskConfig`, its
presets (``PRESETS``, built by ``config(preset, **changes)``), and::

    finetune(pretrained, train_shards, output_dir, config, *, train, optim, callback=None,
             progress=True, resume=True, stop_after=None) -> Path   # output_dir/model.pt
    evaluate(checkpoint, shards, config, *, progress=True, **task_options) -> dict[str, float]

:data:`TASKS` is the one table of what differs between them; the CLI, the flows and the report
read it instead of knowing the task list themselves.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class TaskInfo:
    """What the code around a task needs to know about it.

    ``train_kind`` / ``eval_kind``: the shard kinds its finetuning and evaluation read;
    ``headline_metric``: the metric that ranks models of the task; ``report_keys``: its rows in
    the report (retrieval reports zero-shot, finetuned and transfer from another dataset's
    finetuning separately); ``paper_preset``: the preset
    with the paper's (ALBEF's) settings; ``loader``: the function of its module that loads a
    finetuned checkpoint as a module in eval mode (``load(path)``)."""

    name: str
    title: str
    train_kind: str
    eval_kind: str
    headline_metric: str
    report_keys: tuple[str, ...]
    paper_preset: str
    loader: str

    @property
    def module_name(self) -> str:
        return f"codis.tasks.{self.name}"

    def module(self) -> ModuleType:
        """The task's module (imported on first use: task modules are heavy)."""
        return importlib.import_module(self.module_name)


TASKS: dict[str, TaskInfo] = {
    "retrieval": TaskInfo("retrieval", "Image-text retrieval", "retrieval_train", "retrieval_eval",
                          "r_mean", ("retrieval_zero_shot", "retrieval_finetuned",
                                    "retrieval_transfer"), "coco",
                          "load_retrieval_model"),
    "vqa": TaskInfo("vqa", "VQA", "vqa", "vqa", "accuracy", ("vqa",), "vqa", "load_vqa_model"),
    "nlvr": TaskInfo("nlvr", "NLVR²", "nlvr", "nlvr", "accuracy", ("nlvr",), "nlvr",
                     "load_nlvr_model"),
    "ve": TaskInfo("ve", "SNLI-VE", "ve", "ve", "accuracy", ("ve",), "ve", "load_ve_model"),
}
