"""One checkpoint format for every model (codis.checkpoint) and the one EMA update (codis.ema)."""

from __future__ import annotations

import pickle
import re
from typing import Callable

import pytest
import torch
from torch import nn

from codis.checkpoint import FORMAT, Checkpoint, CheckpointError, read_checkpoint, save_checkpoint
from codis.config import ConfigError, preset
from codis.ema import MomentumTeachers, momentum_update, paired_parameters
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


def _safetensors(path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(path))


# (how the file is made, what the error says the file is): each a file someone may pass by mistake
WRONG_FILES = [
    (lambda p: p.write_text("hello"), r"not a torch checkpoint file \(a text file\)"),
    (lambda p: p.write_bytes(b""), r"not a torch checkpoint file \(an empty file\)"),
    (lambda p: p.write_bytes(pickle.dumps({"format": FORMAT})), r"a pickle \(or a legacy torch file\)"),
    (_safetensors, r"a safetensors weights file"),
    (lambda p: torch.save({"format": FORMAT, "object": _NotData()}, p),
     r"whose objects need code to load, not a codis checkpoint \(it holds a test_checkpoint\._NotData\)"),
    (lambda p: torch.save([1, 2], p), r"a torch file holding a list, not a codis checkpoint"),
    (lambda p: torch.save({"weights": torch.zeros(2)}, p), r"without a codis checkpoint's 'format' and "
                                                            r"'kind' fields \(keys: weights\)"),
    (lambda p: torch.save({"format": FORMAT, "step": 3, "position": {}, "config": {}, "model": {},
                           "optimizer": {}, "rng": []}, p), r"a training-state file \(step 3"),
    (lambda p: torch.save({"format": 1, "config": {}, "state_dict": {}}, p),
     r"format 1 was written by an older codis.*re-run the stage"),
    (lambda p: torch.save({"format": FORMAT, "kind": "pretrain"}, p),
     r"without the field\(s\) model_config, task_config, text_architecture, state_dict"),
    (lambda p: torch.save({**{f: {} for f in ("model_config", "task_config", "text_architecture",
                                              "state_dict")}, "format": FORMAT, "kind": "coco"}, p),
     r"unknown kind 'coco'"),
    (lambda p: save_checkpoint(p, _checkpoint("vqa")),
     r"a 'vqa' checkpoint; expected 'pretrain' \(it holds a model finetuned on VQA; this needs a "
     r"pretrained model\)"),
]


@pytest.mark.parametrize("make, what", WRONG_FILES)
def test_a_wrong_file_is_refused_naming_it_what_it_is_and_what_was_expected(tmp_path, make, what):
    path = tmp_path / "model.pt"
    make(path)
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(path, kinds=("pretrain",))
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert re.search(what, message), message
    if "'vqa' checkpoint" in message:
        assert read_checkpoint(path).kind == "vqa"  # any kind will do when none is asked for
    else:
        assert message.endswith("expected a 'pretrain' checkpoint (a pretrained model)")
        with pytest.raises(CheckpointError, match=r"expected a codis model checkpoint \(model\.pt\)$"):
            read_checkpoint(path)


def test_a_missing_checkpoint_says_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*missing\.pt \(expected a "
                                                r"'vqa' checkpoint \(a model finetuned on VQA\)\)"):
        read_checkpoint(tmp_path / "missing.pt", kinds=("vqa",))


def test_load_model_names_every_mismatched_field(tmp_path):
    config = preset("tiny")
    path = save_model(CodisModel(config), tmp_path / "model.pt")
    assert isinstance(load_model(path, config), CodisModel)
    other = config.replace(queue_size=64, embed_dim=32)
    with pytest.raises(ConfigError, match=r"embed_dim: checkpoint 64, requested 32.*queue_size"):
        load_model(path, other)
    with pytest.raises(ValueError, match=r"a 'pretrain' checkpoint; expected 'vqa'"):
        load_model(path, kinds=("vqa",))


def _student_and_teacher(make: Callable[[], nn.Module]) -> tuple[nn.Module, nn.Module]:
    """Two modules from ``make``: the student's parameters all 1, the teacher's all 0."""
    student, teacher = make(), make()
    for module, value in ((student, 1.0), (teacher, 0.0)):
        for parameter in module.parameters():
            nn.init.constant_(parameter, value)
    return student, teacher


def test_momentum_update_moves_each_teacher_towards_its_student():
    student, teacher = _student_and_teacher(lambda: nn.Linear(2, 2))
    momentum_update(*paired_parameters([teacher], [student]), momentum=0.75)
    assert all(torch.allclose(p, torch.full_like(p, 0.25)) for p in teacher.parameters())
    assert all(torch.equal(p, torch.ones_like(p)) for p in student.parameters())
    with pytest.raises(ValueError, match="teachers have 2 parameters, students 4"):
        paired_parameters([teacher], [student, nn.Linear(2, 2)])


def test_momentum_teachers_list_the_parameters_once(monkeypatch):
    student, teacher = _student_and_teacher(lambda: nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)))
    teachers = MomentumTeachers([teacher], [student])
    walks = []
    real = nn.Module.parameters
    monkeypatch.setattr(nn.Module, "parameters",
                        lambda self, *args, **kwargs: walks.append(self) or real(self, *args, **kwargs))
    for _ in range(3):
        teachers.update(momentum=0.5)
    assert walks == [teacher, student]  # once each, at the first update
    assert all(torch.allclose(p, torch.full_like(p, 0.875)) for p in teacher.parameters())
