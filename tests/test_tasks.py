"""Every downstream task in :data:`codis.tasks.TASKS` through one contract, the way timm tests
every model: the task's "demo" config and ALBEF's schedule from ``task_schedule``; two finetuning
steps from the tiny pretrained checkpoint, saved as the task's checkpoint; a run stopped after one
step and resumed ends with the same weights; evaluation gives the task's headline metric; and a bad
config is refused with an error naming the field."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from codis.checkpoint import read_checkpoint
from codis.config import ConfigError
from codis.data.manifest import shard_samples
from codis.tasks import TASKS, TaskInfo
from codis.train import OptimConfig, TrainConfig
from codis.train.schedules import task_schedule

pytestmark = pytest.mark.usefixtures("one_thread")

# The split of the tiny world each task is evaluated on (VQA's test split has no answers).
EVAL_SPLITS = {"retrieval": "test", "vqa": "val", "nlvr": "dev", "ve": "dev"}
STEPS = 2
each_task = pytest.mark.parametrize("task", list(TASKS.values()), ids=list(TASKS))


def test_every_task_has_an_evaluation_split() -> None:
    assert set(EVAL_SPLITS) == set(TASKS)


@each_task
def test_finetune_resume_and_evaluate(task: TaskInfo, shards, tiny_checkpoint, tmp_path) -> None:
    module = task.module()
    config = module.config("demo", batch_size=4)
    train_shards = shards(task.train_kind, "train")
    train, optim = task_schedule(config, shard_samples([train_shards]))
    # Two steps, and no training checkpoint but the one a stopped run leaves.
    train = dataclasses.replace(train, steps=STEPS, checkpoint_every=STEPS, log_every=1)
    common = dict(train=train, optim=optim, progress=False)

    logged: list[tuple[int, dict[str, float]]] = []
    straight = module.finetune(tiny_checkpoint, train_shards, tmp_path / "straight", config,
                               callback=lambda step, metrics: logged.append((step, metrics)),
                               **common)
    assert straight == tmp_path / "straight" / "model.pt" and straight.is_file()
    assert [step for step, _ in logged] == [1, 2]
    assert all(math.isfinite(metrics["loss"]) for _, metrics in logged)

    resumed = module.finetune(tiny_checkpoint, train_shards, tmp_path / "resumed", config,
                              stop_after=1, **common)
    assert not resumed.exists()  # one step of two: a training checkpoint, no model yet
    rest: list[int] = []
    assert module.finetune(tiny_checkpoint, train_shards, tmp_path / "resumed", config,
                           callback=lambda step, metrics: rest.append(step), **common) == resumed
    assert rest == [2]  # it went on from step 1
    saved, again = (read_checkpoint(path, kinds=[task.name]) for path in (straight, resumed))
    assert type(config).from_dict(saved.task_config) == config
    assert saved.state_dict.keys() == again.state_dict.keys()
    for name, value in saved.state_dict.items():
        assert torch.equal(again.state_dict[name], value), name

    metrics = module.evaluate(straight, shards(task.eval_kind, EVAL_SPLITS[task.name]), config,
                              progress=False)
    assert 0.0 <= metrics[task.headline_metric] <= 100.0


@each_task
@pytest.mark.parametrize("changes, field", [
    ({"batch_size": 0}, "batch_size"),
    ({"epochs": 1.5}, "epochs"),
    ({"lr": -1e-4}, "lr"),
    ({"alpha": 1.5}, "alpha"),
    ({"momentum": 1.0}, "momentum"),
    ({"distill": "yes"}, "distill"),
    ({"num_workers": -1}, "num_workers"),
    ({"bacth_size": 4}, "bacth_size"),
])
def test_a_bad_config_value_is_refused_naming_the_field(task: TaskInfo, changes, field) -> None:
    with pytest.raises(ConfigError, match=rf"^{task.name}\.{field}\b"):
        task.module().config("demo", **changes)


@each_task
def test_an_unknown_preset_is_refused_naming_the_known_ones(task: TaskInfo) -> None:
    with pytest.raises(ConfigError, match=rf"^{task.name}\.preset: .*'nope'.*demo"):
        task.module().config("nope")


@each_task
def test_finetune_refuses_another_tasks_config(task: TaskInfo, shards, tiny_checkpoint,
                                               tmp_path) -> None:
    module = task.module()
    others = [name for name in TASKS if name != task.name]
    wrong = TASKS[others[0]].module().config("demo")
    expected = type(module.config("demo")).__name__
    with pytest.raises(ConfigError, match=rf"^{task.name}\b.*expected an? {expected}"):
        module.finetune(tiny_checkpoint, shards(task.train_kind, "train"), tmp_path, wrong,
                        train=TrainConfig(steps=1, batch_size=2), optim=OptimConfig(),
                        progress=False)
    assert not (tmp_path / "checkpoints").exists()
