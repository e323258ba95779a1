"""One checkpoint format for every model (codis.checkpoint) and the one EMA update (codis.ema)."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from codis.checkpoint import FORMAT, Checkpoint, read_checkpoint, save_checkpoint
from codis.config import ConfigError, preset
from codis.ema import momentum_update
from codis.model import CodisModel, load_model, save_model


class _NotData:  # pickling this needs code: weights_only loading must refuse it
    pass


def _checkpoint(kind: str = "retrieval") -> Checkpoint:
    return Checkpoint(kind=kind, model_config={"embed_dim": 8}, text_architecture={"hidden_size": 4},
                      state_dict={"w": torch.arange(6.0).reshape(2, 3)}, task_config={"k_test": 3},
                      extra={"step": 7, "shards": ("a.tar", "b.tar")})


def test_a_checkpoint_round_trips_with_its_kind_and_fields(tmp_path):
    path = save_checkpoint(tmp_path / "model.pt", _checkpoint())
    back = read_checkpoint(path, kinds=("retrieval",))
    assert back.kind == "retrieval" and back.task_config == {"k_test": 3}
    assert back.extra["step"] == 7 and torch.equal(back.state_dict["w"], torch.arange(6.0).reshape(2, 3))
    assert torch.load(path, weights_only=True)["format"] == FORMAT


def test_a_checkpoint_of_another_kind_is_refused_naming_both(tmp_path):
    path = save_checkpoint(tmp_path / "model.pt", _checkpoint("vqa"))
    with pytest.raises(ValueError, match=r"a 'vqa' checkpoint; expected 'pretrain' or 'retrieval'"):
        read_checkpoint(path, kinds=("pretrain", "retrieval"))
    with pytest.raises(ValueError, match="kind: must be one of"):
        _checkpoint("coco")


def test_old_and_foreign_files_are_refused_with_what_to_do(tmp_path):
    old = tmp_path / "old.pt"
    torch.save({"format": 1, "config": {}, "state_dict": {}}, old)
    with pytest.raises(ValueError, match=r"format 1 was written by an older codis.*re-run the stage"):
        read_checkpoint(old)
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": FORMAT, "object": _NotData()}, foreign)
    with pytest.raises(ValueError, match=r"foreign\.pt: not a codis checkpoint"):
        read_checkpoint(foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(pickle.dumps([1, 2, 3]) + b"junk")
    with pytest.raises(ValueError, match="not a codis checkpoint"):
        read_checkpoint(garbage)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        read_checkpoint(tmp_path / "missing.pt")


def test_load_model_names_every_mismatched_field(tmp_path):
    config = preset("tiny")
    path = save_model(CodisModel(config), tmp_path / "model.pt")
    assert isinstance(load_model(path, config), CodisModel)
    other = config.replace(queue_size=64, embed_dim=32)
    with pytest.raises(ConfigError, match=r"embed_dim: checkpoint 64, requested 32.*queue_size"):
        load_model(path, other)
    with pytest.raises(ValueError, match=r"a 'pretrain' checkpoint; expected 'vqa'"):
        load_model(path, kinds=("vqa",))


def test_momentum_update_moves_each_teacher_towards_its_student():
    student, teacher = nn.Linear(2, 2), nn.Linear(2, 2)
    for module, value in ((student, 1.0), (teacher, 0.0)):
        for parameter in module.parameters():
            nn.init.constant_(parameter, value)
    momentum_update([teacher], [student], momentum=0.75)
    assert all(torch.allclose(p, torch.full_like(p, 0.25)) for p in teacher.parameters())
    assert all(torch.equal(p, torch.ones_like(p)) for p in student.parameters())
    with pytest.raises(ValueError, match="teachers have 2 parameters, students 4"):
        momentum_update([teacher], [student, nn.Linear(2, 2)], momentum=0.5)
