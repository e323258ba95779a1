"""The model registry with real codis checkpoints: a registered version is an MLflow model logged
into the run that trained the checkpoint, and ``mlflow.pytorch.load_model`` on the ``champion``
alias gives back a module that computes what the checkpoint's own loader's does."""

from pathlib import Path

import mlflow
import pytest
import torch

from codis.model import load_model
from codis.tasks import TASKS
from codis.tasks import retrieval
from codis.text import tokenize
from flows.tracking import CHAMPION, Tracker, checkpoint_loader

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tracker(tmp_path: Path, monkeypatch) -> Tracker:
    """A tracker on a fresh SQLite store, which MLflow's own functions use too (as a user's
    ``MLFLOW_TRACKING_URI`` would make them), allowed to unpickle models."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    return Tracker(uri, "registry-test", artifact_location=(tmp_path / "mlartifacts").as_uri(),
                   system_metrics=False)


def training_run(tracker: Tracker, name: str) -> str:
    with tracker.stage_run(name, parent=None, tags={"codis.stage": "pretrain"}) as run:
        run.log_metrics({"pretrain.loss": 1.0}, step=1)
    return run.run_id


def encode(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text features of a fixed tiny batch."""
    generator = torch.Generator().manual_seed(0)
    size = model.config.vision.image_size
    images = torch.rand(2, 3, size, size, generator=generator)
    input_ids, attention_mask = tokenize(model.tokenizer, ["a red square", "two blue circles"], 16)
    image_features, _ = model.encode_image(images)
    text_features, _ = model.encode_text(input_ids, attention_mask)
    return image_features, text_features


def test_a_registered_pretrained_checkpoint_loads_back_as_the_same_model(tracker, tiny_checkpoint,
                                                                         tmp_path) -> None:
    trained_in = training_run(tracker, "pretrain[codis]")
    info = tracker.register_checkpoint("reg-pretrained", tiny_checkpoint, stage_key="k1",
                                       load=checkpoint_loader(), source_run_id=trained_in,
                                       label="codis", score_name="r_mean", score=5.0)
    assert info["aliases"] == ["candidate", CHAMPION] and info["run_id"] == trained_in

    version = tracker.client.get_model_version_by_alias("reg-pretrained", CHAMPION)
    assert version.run_id == trained_in and version.source == f"runs:/{trained_in}/model"
    logged = {a.path for a in tracker.client.list_artifacts(trained_in)}
    assert {"model", "checkpoint"} <= logged

    registered = mlflow.pytorch.load_model("models:/reg-pretrained@champion")
    direct = load_model(tiny_checkpoint).eval()
    assert type(registered) is type(direct) and not registered.training
    for mine, theirs in zip(encode(registered), encode(direct)):
        assert torch.equal(mine, theirs)

    downloaded = tracker.download_checkpoint("reg-pretrained", CHAMPION, tmp_path / "download")
    assert downloaded.read_bytes() == Path(tiny_checkpoint).read_bytes()


def test_a_finetuned_checkpoint_is_logged_with_its_tasks_loader(tracker, tiny_checkpoint,
                                                                tmp_path) -> None:
    finetuned = retrieval.save_retrieval_model(load_model(tiny_checkpoint), tmp_path / "model.pt",
                                               retrieval.config("demo"))
    trained_in = training_run(tracker, "finetune[retrieval.t/codis]")
    tracker.register_checkpoint("reg-retrieval", finetuned, stage_key="k1",
                                load=checkpoint_loader("retrieval"), source_run_id=trained_in,
                                label="retrieval.t/codis", score_name="r_mean", score=1.0)
    registered = mlflow.pytorch.load_model("models:/reg-retrieval@champion")
    for mine, theirs in zip(encode(registered), encode(retrieval.load_retrieval_model(finetuned))):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_names_its_loader(task) -> None:
    loader = checkpoint_loader(task)
    assert loader.__module__ == TASKS[task].module_name and loader.__name__.startswith("load_")
