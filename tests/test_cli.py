import dataclasses
import json
import textwrap

import pytest
import torch
import yaml

from codis import cli
from codis.checkpoint import CheckpointError
from codis.cli import main
from codis.config import VisionConfig, from_dict, preset
from codis.tasks import TASKS
from codis.train import OptimConfig, PretrainConfig, TrainConfig, with_changes


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_world, shards, tiny_checkpoint):
    """A folder for the commands' inputs and outputs: world/, shards/train, shards/test,
    shards/vqa and pretrained.pt link to the shared tiny world, its retrieval shards, its VQA
    validation shards and the tiny checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    (root / "shards").mkdir()
    inputs = {"world": tiny_world, "shards/train": shards("retrieval_train", "train"),
              "shards/test": shards("retrieval_eval", "test"), "shards/vqa": shards("vqa", "val"),
              "pretrained.pt": tiny_checkpoint}
    for name, target in inputs.items():
        (root / name).symlink_to(target)
    return root


def test_finetune_then_evaluate_from_the_command_line(world, capsys):
    config = {"pretrained": str(world / "pretrained.pt"), "train_shards": str(world / "shards/train"),
              "output_dir": str(world / "finetuned"), "preset": "demo",
              "train": {"steps": 3, "batch_size": 8, "alpha_warmup_steps": 1, "log_every": 1},
              "optim": {"lr": 1e-4, "warmup_steps": 1}}
    (world / "finetune.yaml").write_text(yaml.safe_dump(config))
    assert main(["finetune", "--task", "retrieval", "--config", str(world / "finetune.yaml"),
                 "--no-progress"]) == 0
    assert (world / "finetuned" / "model.pt").is_file()
    output = world / "metrics.json"
    assert main(["evaluate", "--task", "retrieval", "--checkpoint", str(world / "finetuned/model.pt"),
                 "--shards", str(world / "shards/test"), "--preset", "demo", "--output", str(output),
                 "--no-progress"]) == 0
    metrics = json.loads(output.read_text())
    assert set(metrics) >= {"txt_r1", "img_r1", "r_mean"}
    assert all(0.0 <= value <= 100.0 for value in metrics.values())


def test_bad_finetune_config_fails_naming_the_field(world, capsys):
    (world / "bad.yaml").write_text(yaml.safe_dump({"pretrained": "x", "train_shards": "y",
                                                    "output_dir": "z", "trian": {}}))
    assert main(["finetune", "--task", "retrieval", "--config", str(world / "bad.yaml")]) == 2
    assert "trian: unknown field" in capsys.readouterr().err
    (world / "bad2.yaml").write_text(yaml.safe_dump({"pretrained": "x", "train_shards": "y",
                                                     "output_dir": "z", "train": {"stepz": 3}}))
    assert main(["finetune", "--task", "retrieval", "--config", str(world / "bad2.yaml")]) == 2
    assert "train.stepz: unknown field" in capsys.readouterr().err
    assert main(["finetune", "--task", "retrieval", "--config", str(world / "missing.yaml")]) == 2
    assert "no config at" in capsys.readouterr().err


def test_pretrain_vision_from_the_command_line(world, capsys):
    config = {"train_annotations": str(world / "world/classification/train.json"),
              "eval_annotations": str(world / "world/classification/val.json"),
              "image_root": str(world / "world"), "output_dir": str(world / "vision_init"),
              "preset": "tiny", "vision": {"stem": "conv"},
              "train": {"steps": 2, "batch_size": 8, "log_every": 1}, "optim": {"warmup_steps": 1}}
    (world / "vision.yaml").write_text(yaml.safe_dump(config))
    assert main(["pretrain-vision", "--config", str(world / "vision.yaml"), "--no-progress"]) == 0
    weights = world / "vision_init" / "vision.safetensors"
    assert capsys.readouterr().out.strip() == str(weights) and weights.is_file()
    metrics = json.loads((world / "vision_init" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["eval_images"] == 200  # the tiny world's
    (world / "vision_bad.yaml").write_text(yaml.safe_dump({**config, "vision": {"stme": "conv"}}))
    assert main(["pretrain-vision", "--config", str(world / "vision_bad.yaml")]) == 2
    assert "vision.stme: unknown field" in capsys.readouterr().err


# ---- bad input: one line on stderr, exit status 2, nothing computed (issue #16) --------------------
def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_a_checkpoint_of_the_wrong_kind_is_one_line_naming_both_kinds(world, capsys, tmp_path):
    evaluate = ["evaluate", "--preset", "demo", "--no-progress", "--shards"]
    pretrained = str(world / "pretrained.pt")
    assert main([*evaluate, str(world / "shards/vqa"), "--checkpoint", pretrained, "--task", "vqa"]) == 2
    err = one_error_line(capsys)
    assert f"{pretrained}: a 'pretrain' checkpoint; expected 'vqa'" in err
    state = tmp_path / "step-3.pt"  # the engine's resumable state: weights, optimiser, RNG
    torch.save({"format": 2, "step": 3, "position": {}, "config": {}, "model": {}, "optimizer": {},
                "rng": []}, state)
    evaluate += [str(world / "shards/test"), "--checkpoint"]
    assert main([*evaluate, str(state), "--task", "retrieval"]) == 2
    assert "a training-state file (step 3" in one_error_line(capsys)
    text = tmp_path / "notes.pt"
    text.write_text("not a model")
    assert main([*evaluate, str(text), "--task", "retrieval"]) == 2
    err = one_error_line(capsys)
    assert "not a torch checkpoint file (a text file)" in err and "expected a 'pretrain'" in err


def test_bad_json_options_name_the_option(world, capsys):
    base = ["evaluate", "--task", "retrieval", "--checkpoint", str(world / "pretrained.pt"),
            "--shards", str(world / "shards/test"), "--preset", "demo", "--no-progress"]
    assert main([*base, "--set", "{k_test: 3"]) == 2
    assert one_error_line(capsys).startswith("error: --set: not valid JSON")
    assert main([*base, "--options", "[1]"]) == 2
    assert one_error_line(capsys).startswith("error: --options: expected a JSON mapping")


def test_a_batch_larger_than_the_data_fails_before_training(world, capsys, tmp_path):
    base = {"pretrained": str(world / "pretrained.pt"), "train_shards": str(world / "shards/train"),
            "output_dir": str(tmp_path / "out"), "preset": "demo"}
    samples = json.loads((world / "shards/train/manifest.json").read_text())["num_samples"]
    for changes, field in (({"task": {"batch_size": samples + 1}}, "task.batch_size"),
                           ({"train": {"batch_size": samples + 1}}, "train.batch_size")):
        config = tmp_path / "finetune.yaml"
        config.write_text(yaml.safe_dump({**base, **changes}))
        assert main(["finetune", "--task", "retrieval", "--config", str(config), "--no-progress"]) == 2
        err = one_error_line(capsys)
        assert f"{config}: {field}:" in err and str(samples) in err
        assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback_and_unexpected_errors_keep_theirs(world, capsys, monkeypatch):
    args = ["evaluate", "--task", "vqa", "--checkpoint", str(world / "pretrained.pt"), "--shards",
            str(world / "shards/vqa"), "--preset", "demo", "--no-progress"]
    with pytest.raises(CheckpointError):
        main(["--debug", *args])
    monkeypatch.setenv("CODIS_DEBUG", "1")
    with pytest.raises(CheckpointError):
        main(args)
    monkeypatch.delenv("CODIS_DEBUG")

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a bad input")

    monkeypatch.setattr(TASKS["retrieval"].module(), "evaluate", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main([*args[:2], "retrieval", *args[3:6], str(world / "shards/test"), *args[7:]])


def test_nan_in_a_config_is_refused_naming_the_field(world, capsys, tmp_path):
    config = tmp_path / "finetune.yaml"
    config.write_text(yaml.safe_dump({"pretrained": str(world / "pretrained.pt"), "output_dir": "x",
                                      "train_shards": str(world / "shards/train"),
                                      "optim": {"lr": float("nan")}}))
    assert main(["finetune", "--task", "retrieval", "--config", str(config)]) == 2
    assert f"{config}: optim.lr: must be a finite number, got nan" in one_error_line(capsys)


COMMANDS = ([], ["pretrain"], ["finetune"], ["pretrain-vision"], ["evaluate"])


def help_text(command: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit:
        main([*command, "--help"])
    assert exit.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "codis")
def test_help_is_plain_text(command, capsys):
    text = help_text(command, capsys)
    for markup in (":func:", ":mod:", ":class:", ":meth:", "::", "``"):
        assert markup not in text, f"{markup!r} in codis {' '.join(command)} --help"


@pytest.mark.parametrize("command, example", [
    (["pretrain"], cli.PRETRAIN_EXAMPLE), (["finetune"], cli.FINETUNE_EXAMPLE),
    (["pretrain-vision"], cli.VISION_INIT_EXAMPLE), (["evaluate"], cli.CHECKPOINT_KINDS),
])
def test_each_command_shows_its_example_and_codis_shows_all(command, example, capsys):
    assert example in help_text(command, capsys)
    assert example in help_text([], capsys)


def example_config(example: str) -> dict:
    """The YAML block of a help example: the indented lines after its introduction."""
    return yaml.safe_load(textwrap.dedent(example.split(":\n\n", 1)[1]))


def test_the_help_examples_are_valid_configs():
    pretrain = PretrainConfig.from_dict(example_config(cli.PRETRAIN_EXAMPLE))
    assert pretrain.model.mode == "codis" and pretrain.model.vision.stem == "conv"
    assert pretrain.model.vision.width == preset("tiny").vision.width  # the preset, changed
    vision = example_config(cli.VISION_INIT_EXAMPLE)
    assert set(vision) <= cli.VISION_INIT_KEYS
    from_dict(VisionConfig, {**dataclasses.asdict(preset(vision["preset"]).vision), **vision["vision"]})
    from_dict(TrainConfig, vision["train"])
    from_dict(OptimConfig, vision["optim"])
    finetune = example_config(cli.FINETUNE_EXAMPLE)
    assert set(finetune) <= cli.FINETUNE_KEYS
    assert TASKS["retrieval"].module().config(finetune["preset"], **finetune["task"]).k_test == 16
    with_changes(TrainConfig(), OptimConfig(), finetune["train"], finetune["optim"])
