"""One schedule for every task: `codis finetune` and the flows train with the same
codis.train.schedules.task_schedule, and a recipe without `train:` gets ALBEF's task schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from codis.cli import main
from codis.config import ConfigError
from codis.data.manifest import MANIFEST
from codis.tasks import TASKS
from codis.train import OptimConfig, TrainConfig, task_schedule
from flows import recipe as recipes

REPO = Path(__file__).resolve().parents[1]


def _shard_folder(root: Path, samples: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).write_text(json.dumps({"kind": "x", "num_samples": samples, "shards": []}))
    return root


def _cli_schedule(monkeypatch, tmp_path: Path, task: str, config: dict) -> tuple:
    """The train / optim configs `codis finetune` hands to the task's finetune()."""
    seen = {}

    def finetune(pretrained, shards, output_dir, task_config, *, train, optim, **_):
        seen.update(config=task_config, train=train, optim=optim)
        return Path(output_dir) / "model.pt"

    monkeypatch.setattr(TASKS[task].module(), "finetune", finetune)
    path = tmp_path / f"{task}.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["finetune", "--task", task, "--config", str(path), "--no-progress"]) == 0
    return seen["config"], seen["train"], seen["optim"]


@pytest.mark.parametrize("task", list(TASKS))
def test_cli_and_flow_train_a_task_with_the_same_schedule(task, monkeypatch, tmp_path):
    recipe = recipes.load_recipe(REPO / "pipelines" / "demo.yaml")
    spec = next(t for t in recipe.tasks if t.task == task)
    samples = 1234
    shards = _shard_folder(tmp_path / "shards", samples)
    cli = {"pretrained": "p.pt", "train_shards": str(shards), "output_dir": str(tmp_path / "out"),
           "preset": spec.preset, "task": dict(spec.config), "train": dict(spec.train),
           "optim": dict(spec.optim)}
    config, train, optim = _cli_schedule(monkeypatch, tmp_path, task, cli)
    assert config == recipes.task_config(spec)
    assert (train, optim) == recipes.task_schedule(spec, samples)


@pytest.mark.parametrize("task", list(TASKS))
def test_without_a_train_section_a_task_gets_albefs_schedule(task, monkeypatch, tmp_path):
    info = TASKS[task]
    config = info.module().config(info.paper_preset)
    samples = 40 * config.batch_size + 7
    shards = _shard_folder(tmp_path / "shards", samples)
    cli = {"pretrained": "p.pt", "train_shards": str(shards), "output_dir": str(tmp_path / "out")}
    _, train, optim = _cli_schedule(monkeypatch, tmp_path, task, cli)
    per_epoch = samples // config.batch_size  # full batches only
    assert train.steps == config.epochs * per_epoch and train.batch_size == config.batch_size
    assert train.alpha_warmup_steps == (per_epoch if config.alpha_warmup else 0)
    assert train.checkpoint_every == per_epoch
    assert (optim.lr, optim.min_lr, optim.weight_decay) == (config.lr, config.min_lr, 0.02)
    assert optim.warmup_steps == min(config.warmup_steps, per_epoch)
    # ... and not the pretraining defaults the CLI used to fall back on
    assert (train.steps, optim.warmup_steps) != (TrainConfig().steps, OptimConfig().warmup_steps)


def test_processes_and_accumulation_shorten_the_epoch_and_changes_apply_last():
    config = TASKS["ve"].module().config("ve")
    one, _ = task_schedule(config, 6400)
    eight, _ = task_schedule(config, 6400, world_size=8)
    accumulated, _ = task_schedule(config, 6400, grad_accumulation=8)
    assert one.steps == 8 * eight.steps == 8 * accumulated.steps
    assert accumulated.grad_accumulation == 8 and eight.grad_accumulation == 1
    train, optim = task_schedule(config, 6400, train_changes={"steps": 7}, optim_changes={"lr": 1e-3},
                                 steps_scale=2.0)
    assert (train.steps, optim.lr) == (14, 1e-3)


@pytest.mark.parametrize("changes, field", [
    ({"train_changes": {"stepz": 1}}, "train.stepz"), ({"optim_changes": {"lr": -1}}, "optim.lr"),
    ({"train_samples": 3}, "ve.batch_size"), ({"world_size": 0}, "world_size"),
])
def test_bad_schedule_inputs_name_the_field(changes, field):
    arguments = {"train_samples": 6400, **changes}
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        task_schedule(TASKS["ve"].module().config("ve"), **arguments)


@pytest.mark.parametrize("log_every, factor, steps, expected", [
    (50, 0.02, 6000, 10),    # scaled to 1, held at the floor
    (5, 0.02, 6000, 5),      # a schedule's own interval below the floor is kept
    (50, 0.5, 6000, 25),     # scaled above the floor: scaled
    (50, 0.002, 6000, 10),   # 12 steps: the floor still fits
    (50, 0.001, 6000, 6),    # 6 steps: never more than the steps
    (50, 2.0, 6000, 100),
])
def test_steps_scale_never_logs_more_often_than_the_floor(log_every, factor, steps, expected):
    config = TASKS["nlvr"].module().config("demo")
    train, _ = task_schedule(config, 6400, train_changes={"steps": steps, "log_every": log_every},
                             steps_scale=factor)
    assert train.steps == max(1, round(steps * factor))
    assert train.log_every == expected


def test_a_two_percent_demo_logs_pretraining_every_ten_steps():
    recipe = recipes.load_recipe(REPO / "pipelines" / "demo.yaml", steps_scale=0.02)
    train = recipes.pretrain_train_config(recipe.pretrain, recipe.variants["codis"],
                                          recipe.steps_scale)
    assert (train.steps, train.log_every) == (36, 10)
