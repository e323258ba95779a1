import json

import pytest
import yaml

from codis.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_world, shards, tiny_checkpoint):
    """A folder for the commands' inputs and outputs: world/, shards/train, shards/test and
    pretrained.pt link to the shared tiny world, its retrieval shards and the tiny checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    (root / "shards").mkdir()
    inputs = {"world": tiny_world, "shards/train": shards("retrieval_train", "train"),
              "shards/test": shards("retrieval_eval", "test"), "pretrained.pt": tiny_checkpoint}
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
