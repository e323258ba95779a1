"""The flows with the codis calls replaced by fast fakes: stage wiring, caching by stage keys,
re-running only what a change touches, resuming after a failed stage, validation before work,
the MLflow layout, code fingerprints, the deployable stage flows, and the torchrun paths of the
pretrain stage (with a stand-in command) and of the evaluate stage (with the launch mocked)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import codis  # noqa: F401
import codis.data.demo_world
import codis.data.download
import codis.tasks.nlvr
import codis.report
import codis.report.collect
import codis.tasks.retrieval
import codis.data.shards
import codis.train
import codis.tasks.ve
import codis.train.vision_init
import codis.tasks.vqa
import flows  # noqa: F401  - sets PREFECT_SERVER_ANALYTICS_ENABLED before prefect is imported
from codis.report import MachineInfo
from codis.report.collect import read_metrics_jsonl
from flows import deployments, fingerprint, launch, stages
from flows import recipe as recipes
from flows.recipe import RecipeError
from flows.reproduce import reproduce
from flows.store import MARKER, STARTED, StageOutput, Store, input_identity, stage_key
from flows.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]
RECORDS = 40  # per fake annotation file: enough for every task schedule's first epoch
TRAINER = {"platform": "the training host", "cpu_count": 96, "torch_version": "2.x",
           "device": "cuda (8 GPUs)", "python_version": "3.11"}
"""What the pretrain stages of the shared reproduction record as their machine."""


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    """A temporary Prefect API for the module; no telemetry (it locks the test database)."""
    from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings(updates={PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


# ---- fakes ---------------------------------------------------------------------------------------
def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _score(checkpoint: str) -> float:
    """A deterministic 'metric' of a fake checkpoint's content."""
    return int(hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()[:6], 16) % 1000 / 10


class Fakes:
    """Stand-ins for the codis functions the stages call; each records (name, arguments) and
    writes files shaped like the real outputs (manifests, model.pt)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.failures: dict[str, int] = {}  # call name -> times left to fail

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def _call(self, name: str, **arguments: Any) -> None:
        self.calls.append((name, arguments))
        if self.failures.get(name, 0) > 0:
            self.failures[name] -= 1
            raise RuntimeError(f"fake failure of {name}")

    def generate_demo_world(self, root, config, progress=True):
        self._call("generate_demo_world", root=Path(root), config=config)
        root = Path(root)
        for task, splits in {"retrieval": ("train", "test"), "vqa": ("train", "val"),
                             "nlvr": ("train", "test"), "ve": ("train", "test")}.items():
            for split in splits:
                path = root / task / f"{split}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps([{"image": f"images/{task}_{split}/{i}.jpg", "i": i}
                                            for i in range(RECORDS)]))
        (root / "pretrain").mkdir(parents=True, exist_ok=True)
        (root / "pretrain" / "urls.parquet").write_bytes(b"urls")
        manifest = {"images": {"pretrain": RECORDS}, "pretrain_pairs": RECORDS, "baselines": {},
                    "config": config.to_dict()}
        (root / "manifest.json").write_text(json.dumps(manifest))
        return manifest

    def download_demo(self, demo_root, output_dir, config, progress=True):
        self._call("download_demo", demo_root=Path(demo_root), output_dir=Path(output_dir), config=config)
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("00000.tar", "00001.tar"):  # one per process of a two-process pretraining
            (out / name).write_text(_digest("download", name, config.to_dict()))
        manifest = {"totals": {"count": RECORDS + 2, "successes": RECORDS, "success_rate": 0.95},
                    "shards": [{"name": "00000.tar"}, {"name": "00001.tar"}]}
        (out / "manifest.json").write_text(json.dumps(manifest))
        return manifest

    def write_shards(self, records, image_root, output_dir, *, kind, samples_per_shard=1000,
                     source=None, progress=True, **kwargs):
        self._call("write_shards", records=records, image_root=Path(image_root),
                   output_dir=Path(output_dir), kind=kind)
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "shard-000000.tar").write_text(_digest(records, kind))
        manifest = {"kind": kind, "num_samples": len(records), "shards": [{"name": "shard-000000.tar"}]}
        (out / "manifest.json").write_text(json.dumps(manifest))
        return manifest

    def pretrain(self, config, *, resume=True, callback=None, progress=True, stop_after=None):
        self._call("pretrain", config=config)
        for step in range(1, config.train.steps + 1):
            callback(step, {"loss": 10.0 / step, "ica": 1.0, "lr": config.optim.lr})
        out = Path(config.output_dir) / "model.pt"
        out.write_text(_digest("pretrain", config.model.to_dict(), config.train.steps))
        return out

    def pretrain_vision(self, vision, train_annotations, image_root, output_dir, *, train, optim,
                        eval_annotations=None, callback=None, progress=True, **kwargs):
        self._call("pretrain_vision", vision=vision, annotations=Path(train_annotations),
                   eval_annotations=eval_annotations, train=train)
        callback(train.steps, {"loss": 0.3})
        out = Path(output_dir)
        (out / "metrics.json").write_text(json.dumps({"steps": train.steps, "balanced_accuracy": 70.0}))
        (out / "vision.safetensors").write_text(_digest("vision", vision.stem, train.steps))
        return out / "vision.safetensors"

    def task_functions(self, task: str) -> dict[str, Any]:
        def finetune(pretrained, train_shards, output_dir, config, *, train, optim, callback=None,
                     progress=True, **kwargs):
            self._call(f"{task}.finetune", pretrained=str(pretrained), shards=train_shards,
                       config=config, train=train, optim=optim, kwargs=kwargs)
            callback(train.steps, {"loss": 0.5, "accuracy": 50.0})
            out = Path(output_dir) / "model.pt"
            out.write_text(_digest(task, hashlib.sha256(Path(pretrained).read_bytes()).hexdigest(),
                                   train.steps))
            return out

        def evaluate(checkpoint, shards, config=None, *, progress=True, **kwargs):
            self._call(f"{task}.evaluate", checkpoint=str(checkpoint), shards=shards,
                       config=config, kwargs=kwargs)
            if "result_file" in kwargs:  # VQA writes the server's file for questions without answers
                Path(kwargs["result_file"]).write_text(json.dumps([{"question_id": 1, "answer": "yes"}]))
            if task == "retrieval":
                return {"txt_r1": _score(checkpoint), "img_r1": 1.0, "r_mean": _score(checkpoint)}
            return {"accuracy": _score(checkpoint)}

        functions = {"finetune": finetune, "evaluate": evaluate}
        if task == "nlvr":
            def text_assignment(pretrained, pretrain_shards, output_dir, config=None, *, train, optim,
                                callback=None, progress=True, **kwargs):
                self._call("nlvr.text_assignment", pretrained=str(pretrained),
                           shards=pretrain_shards, train=train)
                callback(train.steps, {"loss": 1.0})
                out = Path(output_dir) / "model.pt"
                out.write_text(_digest("ta", Path(pretrained).read_text(), train.steps))
                return out
            functions["text_assignment"] = text_assignment
        return functions

    def build_report(self, results, output_dir, plot_backend="auto"):
        self._call("build_report", results=results)
        output_dir = Path(output_dir)
        markdown, page = output_dir / "report.md", output_dir / "report.html"
        rows = {name: v.metrics for name, v in results.variants.items()}
        markdown.write_text(f"# {results.recipe}\n{json.dumps(rows)}\n")
        page.write_text(f"<html><body>{results.recipe}</body></html>")
        artifact = output_dir / "report_artifact.md"
        artifact.write_text(markdown.read_text())
        return {"markdown": markdown, "html": page, "artifact": artifact}

    @staticmethod
    def checkpoint_loader(task: str | None = None):
        """Fake checkpoints are not models: registration logs a stand-in module instead."""
        return lambda path: torch.nn.Linear(2, 1)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> "Fakes":
        """Replace the codis functions the stages call with this object's fakes."""
        monkeypatch.setattr(codis.data.demo_world, "generate_demo_world", self.generate_demo_world)
        monkeypatch.setattr(codis.data.download, "download_demo", self.download_demo)
        monkeypatch.setattr(codis.data.shards, "write_shards", self.write_shards)
        monkeypatch.setattr(codis.train, "pretrain", self.pretrain)
        monkeypatch.setattr(codis.train.vision_init, "pretrain_vision", self.pretrain_vision)
        monkeypatch.setattr(codis.report.collect, "build_report", self.build_report)
        monkeypatch.setattr(stages, "checkpoint_loader", self.checkpoint_loader)
        for task, module in (("retrieval", codis.tasks.retrieval), ("vqa", codis.tasks.vqa),
                             ("nlvr", codis.tasks.nlvr), ("ve", codis.tasks.ve)):
            for name, function in self.task_functions(task).items():
                monkeypatch.setattr(module, name, function)
        return self


@pytest.fixture
def fakes(monkeypatch) -> Fakes:
    return Fakes().install(monkeypatch)


# ---- the recipe ----------------------------------------------------------------------------------
def recipe_data(experiment: str = "flows-test") -> dict:
    def part(task: str, split: str) -> dict:
        return {"annotations": f"demo://{task}/{split}.json", "image_root": "demo://"}

    return {
        "name": "t",
        "demo_world": {"seed": 1, "pretrain_images": 8},
        "pretrain_data": [{"name": "web", "url_list": "demo://pretrain/urls.parquet",
                           "download": {"image_size": 32, "samples_per_shard": 16}}],
        "variants": {"codis": {"preset": "tiny", "model": {"mode": "codis"}},
                     "albef": {"preset": "tiny", "model": {"mode": "albef"}}},
        "pretrain": {"train": {"steps": 3, "batch_size": 4, "checkpoint_every": 1, "log_every": 1},
                     "optim": {"lr": 1e-3, "warmup_steps": 1}, "reference_batch": 4,
                     "data": {"num_workers": 0, "hflip": False}},
        "tasks": [
            {"task": "retrieval", "name": "t", "preset": "demo", "zero_shot": True,
             "train_data": [part("retrieval", "train")], "eval_data": part("retrieval", "test"),
             "train": {"steps": 2}},
            {"task": "nlvr", "name": "t", "preset": "demo", "train_data": [part("nlvr", "train")],
             "eval_data": part("nlvr", "test"), "text_assignment": {"train": {"steps": 2}},
             "train": {"steps": 2}},
            {"task": "ve", "name": "t", "preset": "demo", "train_data": [part("ve", "train")],
             "eval_data": part("ve", "test"), "train": {"steps": 2}, "config": {"num_workers": 0}},
        ],
        "report": {"baseline_variant": "albef"},
        "tracking": {"experiment": experiment},
    }


def write_recipe(folder: Path, data: dict) -> str:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def run(root: Path, data: dict | None = None, overrides: list[str] | None = None,
        tracking: str | None = None, **kwargs: Any) -> dict:
    recipe = write_recipe(root, data or recipe_data())
    return reproduce(recipe_file=recipe, overrides=tuple(overrides or ()), runs_root=str(root / "runs"),
                     tracking_uri=tracking or "", track=tracking is not None, progress=False,
                     **kwargs)


PER_VARIANT = ["pretrain", "retrieval.evaluate", "retrieval.finetune", "retrieval.evaluate",
               "nlvr.text_assignment", "nlvr.finetune", "nlvr.evaluate", "ve.finetune", "ve.evaluate"]
DATA = ["generate_demo_world", "download_demo"] + ["write_shards"] * 6


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> dict[str, Any]:
    """One complete reproduction with MLflow tracking, shared by the tests that inspect it."""
    monkeypatch = pytest.MonkeyPatch()
    fake = Fakes()
    try:
        fake.install(monkeypatch)
        monkeypatch.setattr(stages, "describe_machine", lambda: TRAINER)
        root = tmp_path_factory.mktemp("first")
        tracking = f"sqlite:///{root}/mlflow.db"
        started = time.time()
        summary = run(root, tracking=tracking)
        elapsed = time.time() - started
    finally:
        monkeypatch.undo()
    return {"root": root, "fakes": fake, "summary": summary, "tracking": tracking,
            "elapsed": elapsed}


def copy_runs(first: dict[str, Any], tmp_path: Path) -> Path:
    """A copy of the first reproduction's store, so a test can change it on its own."""
    shutil.copytree(first["root"] / "runs" / "store", tmp_path / "runs" / "store")
    return tmp_path


# ---- wiring --------------------------------------------------------------------------------------
def test_stages_run_in_order_with_their_inputs(first) -> None:
    fake, summary = first["fakes"], first["summary"]
    assert fake.names() == DATA + PER_VARIANT + PER_VARIANT + ["build_report"]
    calls = fake.calls
    kinds = [args["kind"] for name, args in calls if name == "write_shards"]
    assert kinds == ["retrieval_train", "retrieval_eval", "nlvr", "nlvr", "ve", "ve"]
    world = calls[0][1]["root"]
    assert calls[1][1]["demo_root"] == world  # the download serves the generated world
    download_tars = tuple(str(calls[1][1]["output_dir"] / name) for name in ("00000.tar", "00001.tar"))

    pretrains = [args for name, args in calls if name == "pretrain"]
    assert [p["config"].model.mode for p in pretrains] == ["codis", "albef"]
    for p in pretrains:
        assert p["config"].data.shards == download_tars
        assert Path(p["config"].output_dir).parent.name == "pretrain"
        assert p["config"].optim.lr == pytest.approx(1e-3)  # batch 4 at reference 4
    codis_model = str(Path(pretrains[0]["config"].output_dir) / "model.pt")

    first_variant = calls[len(DATA):len(DATA) + len(PER_VARIANT)]
    zero_shot, retrieval_ft, retrieval_eval, ta, nlvr_ft, nlvr_eval, ve_ft, ve_eval = \
        (args for _, args in first_variant[1:])
    assert zero_shot["checkpoint"] == codis_model  # zero-shot: the pretrained checkpoint
    assert retrieval_ft["pretrained"] == codis_model
    assert Path(retrieval_eval["checkpoint"]).parent.parent.name == "finetune"
    assert ta["pretrained"] == codis_model and ta["shards"] == list(download_tars)
    assert Path(nlvr_ft["pretrained"]).parent.parent.name == "text_assignment"  # NLVR starts from TA
    assert Path(nlvr_eval["checkpoint"]).parent.parent.name == "finetune"
    assert ve_ft["kwargs"] == {} and ve_ft["config"].num_workers == 0
    assert isinstance(ve_ft["config"], codis.tasks.ve.VEConfig) and ve_ft["train"].steps == 2
    assert zero_shot["shards"] == retrieval_eval["shards"]
    assert json.loads((Path(retrieval_eval["shards"]) / "manifest.json").read_text())["kind"] == "retrieval_eval"

    report_inputs = calls[-1][1]["results"]
    assert set(report_inputs.variants) == {"codis", "albef"}
    assert set(report_inputs.variants["codis"].metrics) == {
        "retrieval_zero_shot", "retrieval_finetuned", "nlvr", "ve"}
    assert [step for step, _ in report_inputs.variants["codis"].loss_curve] == [1, 2, 3]
    assert report_inputs.machine == MachineInfo(**TRAINER)  # the machine that trained

    assert summary["status"] == "completed"
    assert Path(summary["report"]["html"]).is_file() and Path(summary["report"]["markdown"]).is_file()
    comparison = Path(summary["comparison"]).read_text()
    assert "| metric | codis | albef | codis - albef |" in comparison
    assert "retrieval.t.zs.r_mean" in comparison and "ve.t.accuracy" in comparison
    assert all(not s["cached"] for s in summary["stages"])


def test_the_report_times_every_stage_of_the_run(first) -> None:
    results = first["fakes"].calls[-1][1]["results"]
    before_report = [s for s in first["summary"]["stages"] if s["stage"] != "report"]
    assert [t.label for t in results.wall_times] == [s["label"] for s in before_report]
    assert {"finetune[nlvr.t/albef]", "text_assignment[nlvr.t/codis]"} <= {
        t.label for t in results.wall_times}
    assert [t.seconds for t in results.wall_times] == [s["duration_s"] for s in before_report]
    # The rows the stages took plus orchestration are the run's wall time up to the report.
    ran = sum(t.seconds_this_run for t in results.wall_times)
    assert ran <= results.run_seconds <= first["elapsed"]
    assert results.scale.steps_scale == 1.0 and not results.scale.changed


def test_the_flow_run_is_named_after_the_recipe_file(first) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(first["summary"]["prefect_flow_run_id"])
    assert flow_run.name == "reproduce[recipe]"  # recipe_file recipe.yaml, not the default demo


def test_stage_folders_are_keyed_and_marked(first) -> None:
    store = Store(first["root"] / "runs" / "store")
    done = store.completed()
    assert {r.stage for r in done} == {"generate_demo", "download", "shard", "pretrain",
                                       "text_assignment", "finetune", "evaluate", "report"}
    for result in done:
        marker = json.loads((Path(result.path) / MARKER).read_text())
        assert Path(result.path).name == result.key == marker["key"]
        assert stage_key(marker["stage"], marker["params"], marker["inputs"]) == result.key
        assert not (Path(result.path) / STARTED).exists()
    finetunes = [r for r in done if r.stage == "finetune"]
    for result in finetunes:  # downstream keys name their upstream stages
        assert result.marker["inputs"]["pretrained"].split("/")[0] in ("pretrain", "text_assignment")


def test_mlflow_layout(first) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=first["tracking"], registry_uri=first["tracking"])
    summary = first["summary"]
    parent_id = summary["mlflow"]["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["codis.kind"] == "reproduction" and parent.data.tags["codis.recipe"] == "t"
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.artifact_location == (first["root"] / "runs" / "mlartifacts" / "flows-test").as_uri()
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                  max_results=500)
    names = {run.info.run_name for run in children}
    assert names == {stage["label"] for stage in summary["stages"]}  # one run per stage, no more
    assert {"generate_demo[demo]", "download[web]", "pretrain[codis]", "pretrain[albef]",
            "evaluate[retrieval.t.zs/codis]", "finetune[nlvr.t/albef]", "report[t]"} <= names
    assert not any(run.data.tags.get("codis.cached") == "true" for run in children)
    pretrain = next(r for r in children if r.info.run_name == "pretrain[codis]")
    # The total loss sums other terms in each mode: one metric name per mode.
    history = client.get_metric_history(pretrain.info.run_id, "pretrain.loss_codis")
    assert [(m.step, m.value) for m in history] == [(1, 10.0), (2, 5.0), (3, 10.0 / 3)]
    assert pretrain.data.params["run.model.mode"] == "codis"
    assert pretrain.data.params["variant"] == "codis"
    assert "run.model.codebook.size" in pretrain.data.params
    albef_pretrain = next(r for r in children if r.info.run_name == "pretrain[albef]")
    assert not any(k.startswith("run.model.codebook") or k == "run.model.loss_weights.code"
                   for k in albef_pretrain.data.params)  # ALBEF has no codebook
    assert "pretrain.loss_albef" in albef_pretrain.data.metrics
    note = parent.data.tags["mlflow.note.content"]
    assert all(stage["label"] in note for stage in summary["stages"])
    assert pretrain.data.tags["codis.stage_dir"].endswith(pretrain.data.tags["codis.stage_key"])
    download = next(r for r in children if r.info.run_name == "download[web]")
    assert [a.path for a in client.list_artifacts(download.info.run_id, "manifest")] == [
        "manifest/manifest.json"]
    evaluations = {r.info.run_name: r.data.metrics for r in children if r.info.run_name.startswith("evaluate[")}
    zs = {v: evaluations[f"evaluate[retrieval.t.zs/{v}]"]["retrieval.t.zs.r_mean"] for v in ("codis", "albef")}
    assert parent.data.metrics["codis/retrieval.t.zs.r_mean"] == zs["codis"]
    assert parent.data.metrics["albef/ve.t.accuracy"] == evaluations["evaluate[ve.t/albef]"]["ve.t.accuracy"]

    # registry: candidate is the latest version, champion the better zero-shot r_mean
    versions = {int(v.version): v for v in client.search_model_versions("name='t-pretrained'")}
    assert sorted(versions) == [1, 2]
    # A version's source is the run that trained it, not a registration run.
    trained_by = {r.info.run_id: r.info.run_name for r in children}
    assert trained_by[versions[1].run_id] == "pretrain[codis]"
    assert trained_by[versions[2].run_id] == "pretrain[albef]"
    assert versions[1].tags["codis.variant"] == "codis" and versions[2].tags["codis.variant"] == "albef"
    assert int(client.get_model_version_by_alias("t-pretrained", "candidate").version) == 2
    champion = 2 if zs["albef"] > zs["codis"] else 1
    assert int(client.get_model_version_by_alias("t-pretrained", "champion").version) == champion
    finetuned = client.search_model_versions("name='t-ve-t'")
    assert len(finetuned) == 2
    tracker = Tracker(first["tracking"], "flows-test")
    checkpoint = tracker.download_checkpoint("t-pretrained", "candidate", first["root"] / "download")
    albef_model = Path(summary["variants"]["albef"]["pretrain"]["path"]) / "model.pt"
    assert checkpoint.read_bytes() == albef_model.read_bytes()


# ---- caching -------------------------------------------------------------------------------------
def test_a_second_run_reruns_nothing(first, fakes) -> None:
    from mlflow import MlflowClient

    summary = run(first["root"], tracking=first["tracking"])
    assert fakes.calls == []
    assert all(s["cached"] for s in summary["stages"])
    assert summary["variants"]["codis"]["metrics"] == first["summary"]["variants"]["codis"]["metrics"]
    client = MlflowClient(tracking_uri=first["tracking"], registry_uri=first["tracking"])
    parent = summary["mlflow"]["parent_run_id"]
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
                                  max_results=500)
    assert children == []  # reused stages add no runs
    # The parent names the runs that computed its reused stages: the first reproduction's.
    first_runs = {s["label"]: s["mlflow_run_id"] for s in first["summary"]["stages"]}
    assert {s["label"]: s["mlflow_run_id"] for s in summary["stages"]} == first_runs
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    assert first_runs["pretrain[codis]"][:8] in note and "reused" in note
    assert len(client.search_model_versions("name='t-pretrained'")) == 2  # nothing re-registered


def test_changing_a_task_parameter_reruns_that_task_only(first, fakes, tmp_path) -> None:
    root = copy_runs(first, tmp_path)
    run(root, overrides=["tasks.1.train.steps=3"])
    assert fakes.names() == ["nlvr.finetune", "nlvr.evaluate"] * 2 + ["build_report"]
    assert [args["train"].steps for name, args in fakes.calls if name == "nlvr.finetune"] == [3, 3]


def test_changing_one_variant_reruns_its_branch_only(first, fakes, tmp_path) -> None:
    root = copy_runs(first, tmp_path)
    run(root, overrides=["variants.albef.model.temperature=0.05"])
    assert fakes.names() == PER_VARIANT + ["build_report"]
    assert fakes.calls[0][1]["config"].model.mode == "albef"
    assert fakes.calls[0][1]["config"].model.temperature == 0.05


def test_changing_the_data_reruns_everything_downstream(first, fakes, tmp_path) -> None:
    root = copy_runs(first, tmp_path)
    run(root, overrides=["pretrain_data.0.download.image_size=48"])
    # the demo world and the task shards are upstream or beside the download: kept
    assert fakes.names() == ["download_demo"] + PER_VARIANT * 2 + ["build_report"]


def test_changed_codis_code_reruns_the_stages_that_run_it(first, fakes, tmp_path, monkeypatch) -> None:
    root = copy_runs(first, tmp_path)
    digest, imports = fingerprint.module_source("codis.tasks.retrieval")
    monkeypatch.setitem(fingerprint._SOURCE_CACHE, "codis.tasks.retrieval",
                        fingerprint.ModuleSource("edited" + digest[6:], imports))
    run(root)
    retrieval = ["retrieval.evaluate", "retrieval.finetune", "retrieval.evaluate"]
    assert fakes.names() == retrieval + retrieval + ["build_report"]


def test_speed_only_download_settings_do_not_change_keys(first, fakes, tmp_path) -> None:
    root = copy_runs(first, tmp_path)
    run(root, overrides=["pretrain_data.0.download.thread_count=3",
                         "pretrain_data.0.download.processes_count=2"])
    assert fakes.calls == []


# ---- failures ------------------------------------------------------------------------------------
def test_a_failed_stage_is_resumed_by_the_next_run(first, fakes, tmp_path) -> None:
    root = copy_runs(first, tmp_path)
    fakes.failures["ve.finetune"] = 1
    with pytest.raises(RuntimeError, match="fake failure of ve.finetune"):
        run(root, overrides=["tasks.2.train.steps=5"])
    assert fakes.names() == ["ve.finetune"]  # everything before it was in the store
    store = Store(root / "runs" / "store")
    started = [p.parent for p in (root / "runs" / "store" / "finetune").glob(f"*/{STARTED}")]
    assert len(started) == 1 and not (started[0] / MARKER).exists()
    failed_run = sorted((root / "runs").glob("t-*/reproduction.json"))
    assert json.loads(failed_run[-1].read_text())["status"] == "failed"

    fakes.calls.clear()
    summary = run(root, overrides=["tasks.2.train.steps=5"])
    assert fakes.names() == ["ve.finetune", "ve.evaluate"] * 2 + ["build_report"]
    assert summary["status"] == "completed"
    resumed = store.lookup("finetune", started[0].name)
    assert resumed is not None and resumed.marker["resumed"] is True  # the same folder, continued


def test_prefect_retries_a_failed_stage_within_the_run(first, fakes, tmp_path) -> None:
    root = copy_runs(first, tmp_path)
    fakes.failures["nlvr.evaluate"] = 1
    data = recipe_data()
    data["retries"] = 1
    summary = run(root, data=data, overrides=["tasks.1.train.steps=4"])
    assert summary["status"] == "completed"
    assert fakes.names() == ["nlvr.finetune", "nlvr.evaluate", "nlvr.evaluate",
                             "nlvr.finetune", "nlvr.evaluate", "build_report"]


def vision_init_data() -> dict:
    data = recipe_data()
    data["vision_init"] = {"annotations": "demo://retrieval/train.json",
                           "eval_annotations": "demo://retrieval/test.json", "image_root": "demo://",
                           "train": {"steps": 4, "batch_size": 8, "checkpoint_every": 2}}
    for variant in data["variants"].values():
        variant["model"]["vision"] = {"stem": "conv"}
    return data


def test_vision_init_runs_once_and_initialises_every_variant(fakes, tmp_path) -> None:
    summary = run(tmp_path, data=vision_init_data())
    assert summary["status"] == "completed"
    assert fakes.names()[len(DATA)] == "pretrain_vision"  # after the data, before pretraining
    assert fakes.names().count("pretrain_vision") == 1
    init = fakes.calls[len(DATA)][1]
    assert init["vision"].stem == "conv" and init["vision"].pretrained is None
    assert init["train"].steps == 4 and init["annotations"].name == "train.json"
    weights = Path(summary["vision_init"]["path"]) / "vision.safetensors"
    pretrains = [args["config"] for name, args in fakes.calls if name == "pretrain"]
    assert [c.model.vision.pretrained for c in pretrains] == [str(weights)] * 2
    assert all(c.model.vision.stem == "conv" for c in pretrains)
    store = Store(tmp_path / "runs" / "store")
    marked = [r for r in store.completed() if r.stage == "pretrain"]
    assert {r.marker["inputs"]["vision_init"].split("/")[0] for r in marked} == {"vision_init"}
    vision_stage = next(r for r in store.completed() if r.stage == "vision_init")
    assert vision_stage.metrics["vision_init.balanced_accuracy"] == 70.0

    # Another initialisation re-runs it and both pretrainings (their keys name its output) ...
    fakes.calls.clear()
    run(tmp_path, data=vision_init_data(), overrides=["vision_init.train.steps=6"])
    assert fakes.names().count("pretrain_vision") == 1 and fakes.names().count("pretrain") == 2
    # ... the same one re-runs nothing.
    fakes.calls.clear()
    run(tmp_path, data=vision_init_data(), overrides=["vision_init.train.steps=6"])
    assert fakes.names() == []


def test_vision_init_recipe_errors_name_the_field(fakes, tmp_path) -> None:
    data = vision_init_data()
    data["variants"]["albef"]["model"]["vision"] = {"stem": "patch"}
    with pytest.raises(RecipeError, match="vision_init: variants codis and albef have different ViTs"):
        run(tmp_path, data=data)
    data = vision_init_data()
    data["variants"]["codis"]["model"]["vision"]["pretrained"] = "deit.safetensors"
    with pytest.raises(RecipeError, match="variants.codis.model.vision.pretrained"):
        run(tmp_path, data=data)
    data = vision_init_data()
    data["vision_init"]["annotations"] = str(tmp_path / "nowhere.json")
    with pytest.raises(RecipeError, match="vision_init.annotations"):
        run(tmp_path, data=data)
    assert fakes.calls == []


def test_an_invalid_recipe_fails_before_any_work(fakes, tmp_path) -> None:
    data = recipe_data()
    data["tasks"][0]["train"] = {"stepz": 3}
    with pytest.raises(RecipeError, match="tasks.0.train.stepz"):
        run(tmp_path, data=data)
    with pytest.raises(RecipeError, match="pretrain.train.steps"):
        run(tmp_path, overrides=["pretrain.train.steps=0"])
    assert fakes.calls == []
    assert not (tmp_path / "runs").exists()


# ---- the store -----------------------------------------------------------------------------------
def test_store_serialises_concurrent_runs_of_one_stage(tmp_path) -> None:
    store = Store(tmp_path / "store")
    ran: list[int] = []

    def work(folder: Path) -> StageOutput:
        ran.append(threading.get_ident())
        time.sleep(0.3)
        (folder / "out.txt").write_text("x")
        return StageOutput(outputs={"out": "out.txt"}, metrics={"m": 1.0})

    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(store.run("s", {"a": 1}, {}, work)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ran) == 1  # the others waited for the lock, then found the marker
    assert len({r.key for r in results}) == 1 and sorted(r.cached for r in results) == [False, True, True]
    assert results[0].file("out").read_text() == "x"


def test_input_identity_follows_upstream_keys(tmp_path) -> None:
    store = Store(tmp_path / "store")
    source = tmp_path / "list.txt"
    source.write_text("a")

    def produce(folder: Path) -> StageOutput:
        (folder / "data.txt").write_text(source.read_text())
        return StageOutput(outputs={"data": "data.txt"})

    up = store.run("up", {}, {"source": source}, produce)
    assert input_identity(source).startswith("sha256:")
    assert input_identity(up.file("data")) == f"up/{up.key}/data.txt"
    down = store.run("down", {}, {"data": up.file("data")}, lambda f: StageOutput())
    source.write_text("b")  # a changed external input: new upstream key, new downstream key
    up2 = store.run("up", {}, {"source": source}, produce)
    assert up2.key != up.key and not up2.cached
    down2 = store.run("down", {}, {"data": up2.file("data")}, lambda f: StageOutput())
    assert down2.key != down.key
    assert store.run("down", {}, {"data": up.file("data")}, lambda f: StageOutput()).cached


# ---- the pretrain stage's subprocess path ---------------------------------------------------------
STAND_IN = """
import json, sys, time
from pathlib import Path
args = sys.argv[1:]
config = Path(args[args.index('--config') + 1])
metrics = Path(args[args.index('--metrics') + 1])
for step in (1, 2, 3):
    with open(metrics, 'a') as f:
        f.write(json.dumps({'step': step, 'loss': 1.0 / step}) + '\\n')
    print('step', step, flush=True)
    time.sleep(0.2)
if 'FAIL' in config.read_text():
    sys.exit('stand-in failure')
(config.parent / 'model.pt').write_text('weights')
"""


def test_pretrain_runs_torchrun_commands_and_follows_their_metrics(tmp_path, monkeypatch) -> None:
    commands: list[list[str]] = []
    torchrun_command = launch.torchrun_command

    def command(spec, run_config, *, metrics=None, rdzv_id="codis", python=None):
        real = torchrun_command(spec, run_config, metrics=metrics, rdzv_id=rdzv_id)
        commands.append(real)
        return [sys.executable, "-c", STAND_IN, *real[real.index("--config"):]]

    monkeypatch.setattr(launch, "torchrun_command", command)
    recipe = recipes.parse_recipe(recipe_data())
    spec = recipe.pretrain.model_copy(update={"gpus_per_node": 2, "launcher": "torchrun"})
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("a.tar", "b.tar"):  # a shard for each of the two processes
        (shards / name).write_text(name)
    (shards / "manifest.json").write_text(json.dumps(
        {"num_samples": RECORDS, "shards": [{"name": "a.tar"}, {"name": "b.tar"}]}))
    ctx = stages.StageContext(store=Store(tmp_path / "store"), tracker=Tracker(None, "x"),
                              progress=False)
    result = stages.pretrain_stage(ctx, "codis", recipe.variants["codis"], spec, [str(shards)])
    assert commands[0][commands[0].index("-m") + 1] == "torch.distributed.run"
    assert "--nproc-per-node=2" in commands[0]
    assert result.metrics == {"pretrain.loss_codis": pytest.approx(1 / 3)}
    assert read_metrics_jsonl(result.file("metrics")) == [(1, {"loss": 1.0}), (2, {"loss": 0.5}),
                                                         (3, {"loss": pytest.approx(1 / 3)})]
    assert "step 3" in (Path(result.path) / "pretrain.log").read_text()
    assert (Path(result.path) / "command.txt").read_text().startswith(sys.executable)

    failing = recipe.variants["codis"].model_copy(update={"model": {"mode": "codis", "alpha": 0.3}})
    monkeypatch.setattr(codis.train.PretrainConfig, "save",
                        lambda self, path: Path(path).write_text("FAIL") and Path(path))
    with pytest.raises(RuntimeError, match="(?s)exited with status 1.*stand-in failure"):
        stages.pretrain_stage(ctx, "codis", failing, spec, [str(shards)])


# ---- the evaluate stage under torchrun ------------------------------------------------------------
def _torchrun_arguments(command: list[str]):
    from torch.distributed.run import get_args_parser

    assert command[1:3] == ["-m", "torch.distributed.run"]
    return get_args_parser().parse_args(command[3:])


def _eval_inputs(root: Path) -> tuple[str, str]:
    shards = root / "ve-shards"
    shards.mkdir()
    (shards / "shard-000000.tar").write_text("ve")
    (shards / "manifest.json").write_text(json.dumps({"kind": "ve", "num_samples": 3,
                                                      "shards": [{"name": "shard-000000.tar"}]}))
    checkpoint = root / "model.pt"
    checkpoint.write_text("weights")
    return str(checkpoint), str(shards)


class InThisProcess:
    """A stand-in for :func:`flows.launch.run_logged`: runs the main function of the module that
    a torchrun command starts, with the command's arguments, once in this process (so the fakes
    answer), and records the commands."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def __call__(self, command, folder, name, **kwargs) -> None:
        import codis.cli
        import flows.pretrain_entry

        self.commands.append(list(command))
        arguments = _torchrun_arguments(list(command))
        assert arguments.module
        main = {"codis.cli": codis.cli.main,
                "flows.pretrain_entry": flows.pretrain_entry.main}[arguments.training_script]
        assert main(arguments.training_script_args) == 0


def test_evaluate_stage_launches_codis_evaluate_under_torchrun(fakes, tmp_path, monkeypatch) -> None:
    """With several processes the stage runs ``codis evaluate`` under torchrun and reads back the
    metrics.json it writes."""
    launched = InThisProcess()
    monkeypatch.setattr(launch, "run_logged", launched)
    spec = recipes.parse_recipe(recipe_data()).tasks[2].model_copy(
        update={"config": {"batch_size": 4}, "evaluate_args": {"num_workers": 0}})
    checkpoint, shards = _eval_inputs(tmp_path)
    ctx = stages.StageContext(store=Store(tmp_path / "store"), tracker=Tracker(None, "x"),
                              progress=False)
    result = stages.evaluate_stage(ctx, spec, checkpoint, shards, variant="codis", processes=2)

    arguments = _torchrun_arguments(launched.commands[0])
    assert arguments.standalone and arguments.nproc_per_node == "2"
    cli = arguments.training_script_args
    assert cli[:3] == ["evaluate", "--task", "ve"]
    assert cli[cli.index("--preset") + 1] == "demo"
    assert cli[cli.index("--output") + 1] == str(result.file("metrics"))
    assert "--no-progress" in cli
    (name, call), = fakes.calls
    assert name == "ve.evaluate" and (call["checkpoint"], call["shards"]) == (checkpoint, shards)
    assert call["config"] == recipes.task_config(spec)  # every field reaches the subprocess
    assert call["config"].batch_size == 4 and call["kwargs"] == {"num_workers": 0}
    expected = {"ve.t.accuracy": _score(checkpoint)}
    assert result.metrics == expected
    assert json.loads(result.file("metrics").read_text()) == {"accuracy": _score(checkpoint)}

    # One process or two: the same metrics, so the same stage (the count is not in the key).
    fakes.calls.clear()
    again = stages.evaluate_stage(ctx, spec, checkpoint, shards, variant="codis")
    assert again.cached and again.key == result.key and fakes.calls == []
    in_process = stages.evaluate_stage(ctx, spec.model_copy(update={"config": {}}), checkpoint,
                                       shards, variant="codis")
    assert fakes.names() == ["ve.evaluate"] and in_process.metrics == expected
    assert len(launched.commands) == 1


def test_a_failed_evaluation_subprocess_names_its_log(tmp_path, monkeypatch) -> None:
    def command(*args, **kwargs):
        return [sys.executable, "-c", "import sys; print('rank 1 failed'); sys.exit(3)"]

    monkeypatch.setattr(launch, "evaluate_command", command)
    spec = recipes.parse_recipe(recipe_data()).tasks[2]
    checkpoint, shards = _eval_inputs(tmp_path)
    ctx = stages.StageContext(store=Store(tmp_path / "store"), tracker=Tracker(None, "x"),
                              progress=False)
    with pytest.raises(RuntimeError, match="(?s)evaluate exited with status 3.*evaluate.log.*rank 1 failed"):
        stages.evaluate_stage(ctx, spec, checkpoint, shards, processes=2)
    with pytest.raises(ValueError, match="processes"):
        stages.evaluate_stage(ctx, spec, checkpoint, shards, processes=0)


@pytest.mark.slow
def test_evaluate_stage_with_two_gloo_processes(tiny_checkpoint, shards, tmp_path) -> None:
    """The real thing: torchrun starts two gloo processes of ``codis evaluate`` (zero-shot
    retrieval of the tiny checkpoint); their metrics are those of one process."""
    eval_data = {"annotations": "unused.json", "image_root": "."}
    spec = recipes.TaskSpec(task="retrieval", name="t", preset="demo", zero_shot=True,
                            finetune=False, eval_data=eval_data, config={"k_test": 4})
    folder = str(shards("retrieval_eval", "test"))

    def evaluate(store: str, processes: int):
        ctx = stages.StageContext(store=Store(tmp_path / store), tracker=Tracker(None, "x"),
                                  progress=False)
        return stages.evaluate_stage(ctx, spec, str(tiny_checkpoint), folder, zero_shot=True,
                                     processes=processes)

    two = evaluate("two", 2)
    assert "--nproc-per-node=2" in (Path(two.path) / "command.txt").read_text()
    assert "retrieval.t.zs.r_mean" in two.metrics
    assert two.metrics == pytest.approx(evaluate("one", 1).metrics)


def test_evaluations_use_the_pretraining_gpus_of_one_node() -> None:
    assert launch.evaluation_processes(recipes.PretrainSpec()) == 1
    assert launch.evaluation_processes(recipes.PretrainSpec(gpus_per_node=8)) == 8
    several = recipes.PretrainSpec(nodes=2, gpus_per_node=4, rdzv_endpoint="node0:29500")
    assert launch.evaluation_processes(several) == 4  # torchrun --standalone: this node's GPUs


def test_reproduce_evaluates_with_the_pretraining_gpu_count(fakes, tmp_path, monkeypatch) -> None:
    launched = InThisProcess()
    monkeypatch.setattr(launch, "run_logged", launched)
    data = recipe_data()
    data["variants"].pop("albef")
    data["tasks"], data["report"] = data["tasks"][:1], {}
    summary = run(tmp_path, data, overrides=["pretrain.gpus_per_node=2"])
    assert summary["status"] == "completed"
    scripts = [_torchrun_arguments(c).training_script for c in launched.commands]
    assert scripts == ["flows.pretrain_entry", "codis.cli", "codis.cli"]  # pretrain, zs, finetuned
    assert all("--nproc-per-node=2" in command for command in launched.commands)
    assert fakes.names()[-5:] == ["pretrain", "retrieval.evaluate", "retrieval.finetune",
                                  "retrieval.evaluate", "build_report"]


# ---- code fingerprints -----------------------------------------------------------------------------
def test_fingerprints_hash_the_code_each_stage_runs() -> None:
    pretrain = fingerprint.code_fingerprint("pretrain")
    assert {"codis", "codis.train", "codis.model", "codis.losses"} <= set(pretrain)
    assert not any(name.startswith("codis.tasks") for name in pretrain)
    evaluate = fingerprint.code_fingerprint("evaluate", "ve")
    assert {"codis.tasks.ve", "codis.model"} <= set(evaluate)
    assert not any(name.startswith("codis.report") for name in evaluate)
    assert {"codis.report.collect", "codis.report.analysis"} <= set(
        fingerprint.code_fingerprint("report"))
    assert set(fingerprint.code_fingerprint("shard")) == {"codis.data.shards"}  # own code only
    assert set(fingerprint.code_fingerprint("download")) == {"img2dataset"}
    assert fingerprint.code_fingerprint("register") == {}


def test_own_code_of_a_package_is_the_package_and_its_submodules(tmp_path, monkeypatch) -> None:
    package = tmp_path / "codis_fake_world"
    (package / "scenes").mkdir(parents=True)
    (package / "__init__.py").write_text("from .generate import generate\n")
    (package / "generate.py").write_text("from .scenes.shapes import draw\ndef generate(): ...\n")
    (package / "scenes" / "__init__.py").write_text("")
    (package / "scenes" / "shapes.py").write_text("def draw(): ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(fingerprint.STAGE_ROOTS, "generate_demo", "codis_fake_world")
    monkeypatch.setattr(fingerprint, "_SOURCE_CACHE", {})
    monkeypatch.setitem(fingerprint.ALSO_HASHED, "generate_demo", ())
    before = fingerprint.code_fingerprint("generate_demo")
    assert set(before) == {"codis_fake_world", "codis_fake_world.generate",
                           "codis_fake_world.scenes", "codis_fake_world.scenes.shapes"}
    (package / "scenes" / "shapes.py").write_text("def draw(): return 1\n")
    monkeypatch.setattr(fingerprint, "_SOURCE_CACHE", {})
    after = fingerprint.code_fingerprint("generate_demo")
    assert [name for name in before if before[name] != after[name]] == ["codis_fake_world.scenes.shapes"]
    # relative imports are followed like absolute ones
    assert "codis_fake_world.scenes.shapes" in fingerprint.module_source(
        "codis_fake_world.generate").imports


def test_the_demo_world_fingerprint_covers_its_whole_package_and_the_metrics() -> None:
    modules = fingerprint.code_fingerprint("generate_demo")
    files = [Path(codis.data.demo_world.__file__)]
    if files[0].name == "__init__.py":  # a package: every module under it
        files = sorted(files[0].parent.rglob("*.py"))
    assert "codis.metrics" in modules  # the manifest's baselines are scored with it
    world = {name for name in modules if name != "codis.metrics"}
    assert len(world) == len(files)
    assert all(name == "codis.data.demo_world" or name.startswith("codis.data.demo_world.")
               for name in world)


# ---- prefect.yaml -----------------------------------------------------------------------------------
def test_every_deployment_entrypoint_is_a_flow() -> None:
    from prefect import Flow

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    entrypoints = {d["entrypoint"] for d in config["deployments"]}
    modules = {"flows/reproduce.py": sys.modules["flows.reproduce"],
               "flows/deployments.py": deployments}
    assert {e.split(":")[0] for e in entrypoints} == set(modules)
    for entrypoint in entrypoints:
        path, name = entrypoint.split(":")
        assert isinstance(getattr(modules[path], name), Flow), entrypoint
    stage_flows = {e.split(":")[1] for e in entrypoints if e.startswith("flows/deployments.py")}
    assert stage_flows == {"generate_demo", "download", "shard", "vision_init", "pretrain",
                           "register", "finetune", "evaluate", "analyze", "report"}


# ---- the deployable stage flows ------------------------------------------------------------------
def test_a_stage_flow_runs_one_stage_of_a_recipe_and_what_it_needs(fakes, tmp_path) -> None:
    options = {"recipe_file": write_recipe(tmp_path, recipe_data()),
               "runs_root": str(tmp_path / "runs"), "track": False, "progress": False}
    first = deployments.shard(task="ve", options=options)
    again = deployments.shard(task="ve.t", options=options)
    assert again["eval"] == first["eval"] and again["train"] == first["train"]
    assert fakes.names() == ["generate_demo_world", "write_shards", "write_shards"]

    # Evaluating ALBEF's VE model runs the stages upstream of it that are missing (not CODIS's),
    # and the override reaches the task's config.
    fakes.calls.clear()
    result = deployments.evaluate(task="ve", variant="albef",
                                  overrides=("tasks.ve.config.num_workers=1",), options=options)
    assert fakes.names() == ["download_demo", "pretrain", "ve.finetune", "ve.evaluate"]
    assert fakes.calls[1][1]["config"].model.mode == "albef"
    assert fakes.calls[-1][1]["config"].num_workers == 1
    assert result["metrics"] and not result["cached"]
    fakes.calls.clear()
    assert deployments.evaluate(task="ve", variant="albef",
                                overrides=("tasks.ve.config.num_workers=1",),
                                options=options)["key"] == result["key"]
    assert fakes.calls == []  # everything reused

    with pytest.raises(Exception, match="variant 'clip' is not in recipe t.*codis, albef"):
        deployments.pretrain(variant="clip", options=options)
    with pytest.raises(Exception, match="task 'caption' is not a task of recipe t"):
        deployments.finetune(task="caption", options=options)


def test_mlflow_runs_link_to_prefect_flow_runs_only_of_a_lasting_server(monkeypatch) -> None:
    from prefect import flow

    from flows.server import OWNED_SERVER_VARIABLE, prefect_run_tags

    @flow
    def tagged() -> dict[str, str]:
        return prefect_run_tags()

    monkeypatch.delenv(OWNED_SERVER_VARIABLE, raising=False)
    tags = tagged()
    assert tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{tags['prefect.flow_run_id']}")
    assert prefect_run_tags() == {}  # outside a flow run
    monkeypatch.setenv(OWNED_SERVER_VARIABLE, "1")  # a command-line run's own server
    assert tagged() == {}


def test_report_flow_reuses_the_report_of_a_reproduction(first, fakes) -> None:
    options = {"recipe_file": str(first["root"] / "recipe.yaml"),
               "runs_root": str(first["root"] / "runs"), "track": False, "progress": False}
    rebuilt = deployments.report(options=options)
    assert rebuilt["cached"] and rebuilt["key"] == next(
        s["key"] for s in first["summary"]["stages"] if s["stage"] == "report")
    assert fakes.calls == []


# ---- command lines -------------------------------------------------------------------------------
def test_a_log_line_never_lands_across_a_progress_bar(capsys) -> None:
    from tqdm import tqdm

    from flows.reproduce import AboveBars

    logger = logging.getLogger("bars-test")
    logger.propagate = False
    logger.handlers = [AboveBars(logging.StreamHandler(sys.stderr))]
    with tqdm(total=4, file=sys.stderr, desc="train", mininterval=0) as bar:
        bar.update(2)
        logger.warning("step 2/4")
    drawn = capsys.readouterr().err
    before, after = drawn.split("step 2/4")
    assert "train:  50%" in before  # the bar was drawn ...
    assert before.rstrip(" ").endswith("\r")  # ... and cleared before the line
    assert "train:  50%" in after  # ... and redrawn below it


def test_reproduce_cli_validates_without_running(tmp_path, capsys) -> None:
    from flows.reproduce import main

    recipe = write_recipe(tmp_path, recipe_data())
    assert main(["--recipe", recipe, "--validate"]) == 0
    assert "valid (2 variants, 3 tasks)" in capsys.readouterr().out
    assert main(["--recipe", recipe, "--validate", "--set", "variants.codis.preset=huge"]) == 2
    assert "variants.codis.preset" in capsys.readouterr().err


def test_compare_cli_tables_the_latest_reproduction(first, tmp_path, capsys) -> None:
    from flows.compare import main

    out = tmp_path / "cmp.md"
    assert main(["--recipe", "t", "--tracking-uri", first["tracking"], "--out", str(out),
                 "--baseline", "albef"]) == 0
    table = out.read_text()
    assert "| metric | codis | albef | codis - albef |" in table
    zs = first["summary"]["variants"]["codis"]["metrics"]["retrieval.t.zs.r_mean"]
    assert f"| retrieval.t.zs.r_mean | {zs:.4g} |" in table
    assert out.with_suffix(".csv").read_text().startswith("metric,codis,albef")
    assert main(["--recipe", "nonexistent", "--tracking-uri", first["tracking"],
                 "--out", str(out)]) == 1


@pytest.mark.slow
def test_torchrun_pretraining_with_two_cpu_processes(tmp_path) -> None:
    """The real thing: torchrun starts two gloo processes of flows.pretrain_entry on real shards;
    rank 0's metrics reach the stage, the learning rate is scaled to the doubled global batch."""
    from codis.data.demo_world import DemoWorldConfig, generate_demo_world
    from codis.model import load_model

    one = {"train": 1, "val": 1, "test": 1}
    generate_demo_world(tmp_path / "world", DemoWorldConfig(
        seed=2, image_size=32, pretrain_images=24, retrieval_images=one, vqa_images=one,
        nlvr_pairs={"train": 1, "dev": 1, "test": 1}, ve_images={"train": 1, "dev": 1, "test": 1},
        dead_urls=0, non_image_urls=0), progress=False)
    records = json.loads((tmp_path / "world" / "pretrain" / "captions.json").read_text())
    codis.data.shards.write_shards(records, tmp_path / "world", tmp_path / "shards", kind="pretrain",
                              samples_per_shard=12, progress=False)
    recipe = recipes.parse_recipe(recipe_data())
    spec = recipe.pretrain.model_copy(update={"gpus_per_node": 2, "launcher": "torchrun"})
    ctx = stages.StageContext(store=Store(tmp_path / "store"), tracker=Tracker(None, "x"),
                              progress=False)
    result = stages.pretrain_stage(ctx, "codis", recipe.variants["codis"], spec,
                                   [str(tmp_path / "shards")])
    run_config = yaml.safe_load(result.file("run_config").read_text())
    assert run_config["optim"]["lr"] == pytest.approx(2e-3)  # 1e-3 at 4, global batch 2 x 4
    assert [step for step, _ in read_metrics_jsonl(result.file("metrics"))] == [1, 2, 3]
    assert set(result.metrics) >= {"pretrain.loss_codis", "pretrain.ica", "pretrain.code"}
    assert load_model(result.file("model")).config.mode == "codis"
    assert "--nproc-per-node=2" in (Path(result.path) / "command.txt").read_text()


# ---- protocols and starting points -----------------------------------------------------------------
def test_a_transfer_task_evaluates_the_model_finetuned_on_the_task_it_names(fakes, tmp_path) -> None:
    data = recipe_data()
    data["variants"], data["report"] = {"codis": data["variants"]["codis"]}, {}
    data["tasks"] = data["tasks"][:1] + [
        {"task": "retrieval", "name": "other", "preset": "demo", "finetune": False,
         "transfer_from": "t", "eval_data": {"annotations": "demo://retrieval/train.json",
                                             "image_root": "demo://"}}]
    summary = run(tmp_path, data)
    finetunes = [args for name, args in fakes.calls if name == "retrieval.finetune"]
    evaluations = [args for name, args in fakes.calls if name == "retrieval.evaluate"]
    assert len(finetunes) == 1  # the transfer task finetunes nothing of its own
    finetuned = next(s for s in summary["stages"] if s["label"] == "finetune[retrieval.t/codis]")
    # zero-shot on t, finetuned on t, then t's finetuned model on the other dataset
    assert evaluations[-1]["checkpoint"] == str(Path(finetuned["path"]) / "model.pt")
    assert sum(e["checkpoint"] == evaluations[-1]["checkpoint"] for e in evaluations) == 2
    metrics = summary["variants"]["codis"]["metrics"]
    assert "retrieval.other.r_mean" in metrics and "retrieval.other.zs.r_mean" not in metrics
    spec = recipes.parse_recipe(data)
    assert stages.report_task_key(spec.tasks[1], False) == "retrieval_transfer"
    assert stages.report_task_key(spec.tasks[0], False) == "retrieval_finetuned"


@pytest.mark.parametrize("change, message", [
    ({"transfer_from": "nowhere"}, r"tasks.1.transfer_from: 'nowhere' is not another retrieval task"),
    ({"transfer_from": "other"}, r"'other' is not another retrieval task"),
    ({"transfer_from": "t", "finetune": True, "train_data": [{"annotations": "demo://retrieval/train.json", "image_root": "demo://"}]},
     r"tasks.1.finetune: must be false with transfer_from"),
])
def test_transfer_from_errors_name_the_field(change, message) -> None:
    data = recipe_data()
    data["tasks"] = data["tasks"][:1] + [
        {"task": "retrieval", "name": "other", "preset": "demo", "finetune": False,
         "eval_data": {"annotations": "demo://retrieval/test.json", "image_root": "demo://"},
         **change}]
    with pytest.raises(RecipeError, match=message):
        recipes.parse_recipe(data)


def test_a_variant_with_a_checkpoint_starts_from_it_instead_of_pretraining(
        fakes, tmp_path, tiny_checkpoint) -> None:
    data = recipe_data()
    data["variants"] = {"codis": {**data["variants"]["codis"], "checkpoint": str(tiny_checkpoint)}}
    data["report"] = {}
    data["tasks"] = data["tasks"][2:]  # ve
    summary = run(tmp_path, data)
    assert "pretrain" not in fakes.names()
    imported = next(s for s in summary["stages"] if s["label"] == "import_checkpoint[codis]")
    model = Path(imported["path"]) / "model.pt"
    assert model.read_bytes() == tiny_checkpoint.read_bytes()
    finetune = next(args for name, args in fakes.calls if name == "ve.finetune")
    assert finetune["pretrained"] == str(model)

    fakes.calls.clear()
    again = run(tmp_path, data)
    assert fakes.calls == []  # nothing runs again, the import included
    assert next(s for s in again["stages"] if s["label"] == "import_checkpoint[codis]")["cached"]

    # A checkpoint of another architecture fails in its stage, naming what differs.
    data["variants"]["codis"]["model"] = {"mode": "codis", "embed_dim": 32}
    (tmp_path / "other").mkdir()
    with pytest.raises(Exception, match="embed_dim"):
        run(tmp_path / "other", data)
    data["variants"]["codis"].pop("checkpoint")
    data["variants"]["codis"]["checkpoint_format"] = "albef"
    with pytest.raises(RecipeError, match="variants.codis.checkpoint_format: 'albef' needs "
                                          "variants.codis.checkpoint"):
        recipes.parse_recipe(data)


def test_a_vqa_evaluation_keeps_the_server_result_file(fakes, tmp_path) -> None:
    data = recipe_data()
    data["variants"], data["report"] = {"codis": data["variants"]["codis"]}, {}
    data["tasks"] = [{"task": "vqa", "name": "t", "preset": "demo",
                      "train_data": [{"annotations": "demo://vqa/train.json", "image_root": "demo://"}],
                      "eval_data": {"annotations": "demo://vqa/val.json", "image_root": "demo://"},
                      "train": {"steps": 2}}]
    summary = run(tmp_path, data)
    evaluation = next(s for s in summary["stages"] if s["label"] == "evaluate[vqa.t/codis]")
    result = Path(evaluation["path"]) / stages.VQA_RESULT
    call = next(args for name, args in fakes.calls if name == "vqa.evaluate")
    assert call["kwargs"]["result_file"] == str(result)
    assert evaluation["outputs"]["result"] == stages.VQA_RESULT
    assert json.loads(result.read_text()) == [{"question_id": 1, "answer": "yes"}]
    with pytest.raises(RecipeError, match="result_file: set by the flow"):
        data["tasks"][0]["evaluate_args"] = {"result_file": "x.json"}
        recipes.parse_recipe(data)


def test_an_albef_checkpoint_is_converted_to_the_variants_config(fakes, tmp_path, monkeypatch) -> None:
    released = tmp_path / "ALBEF_4M.pth"
    released.write_bytes(b"released weights")
    converted: list[tuple[Path, Path, Any]] = []

    class Conversion:
        def to_dict(self) -> dict[str, Any]:
            return {"kind": "pretrain", "unplaced": {"text_encoder.bert.embeddings.position_ids": "a buffer"}}

    def convert(source, output, config):
        converted.append((Path(source), Path(output), config))
        Path(output).write_bytes(b"converted")
        return Conversion()

    monkeypatch.setattr(stages.codis_albef, "convert_albef_checkpoint", convert)
    data = recipe_data()
    data["variants"] = {"albef": {"preset": "tiny", "model": {"mode": "albef"},
                                  "checkpoint": str(released), "checkpoint_format": "albef"}}
    data["tasks"] = data["tasks"][2:]  # ve
    summary = run(tmp_path, data)
    (source, output, config), = converted
    assert source == released and config.mode == "albef" and config == recipes.model_config(
        recipes.parse_recipe(data).variants["albef"])
    stage = next(s for s in summary["stages"] if s["label"] == "import_checkpoint[albef]")
    assert output == Path(stage["path"]) / "model.pt"
    assert json.loads((Path(stage["path"]) / "conversion.json").read_text())["unplaced"]
    assert next(args for name, args in fakes.calls if name == "ve.finetune")["pretrained"] == str(output)


# ---- parallel_variants: variants side by side, training stages as subprocesses -------------------
def _run_entry_in_this_thread(calls: list, barrier: threading.Barrier | None = None):
    """A stand-in for :func:`flows.launch.run_logged` that runs the entry module a training stage
    starts (``python -m flows.<entry> ...``) in the calling thread, so the fakes stand in for
    codis, then passes the metrics it appended on as the real follower does."""
    import importlib

    def run_logged(command, folder, name, *, jsonl=None, on_record=None, label=None, logger=None,
                   env=None, stop=None):
        calls.append({"name": name, "label": label, "command": list(command), "env": env,
                      "stop": stop})
        if barrier is not None and name == "pretrain":
            barrier.wait()  # both variants' pretraining at once, or a BrokenBarrierError
        module = command[command.index("-m") + 1]
        assert importlib.import_module(module).main(command[command.index("-m") + 2:]) == 0
        for line in Path(jsonl).read_text().splitlines():
            item = json.loads(line)
            on_record(int(item.pop("step")), item)
    return run_logged


def _training_calls(fake: Fakes, store: Path) -> list[str]:
    """The fakes' training calls with everything they were given (paths as strings, the store's
    folder as ``<store>``), sorted: comparable between two reproductions."""
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value
    names = {"pretrain", "nlvr.text_assignment"} | {f"{t}.finetune" for t in ("retrieval", "nlvr", "ve")}
    return sorted(repr((name, {k: plain(v) for k, v in args.items() if k != "output_dir"}))
                  .replace(str(store.resolve()), "<store>")
                  for name, args in fake.calls if name in names)


def test_parallel_variants_train_side_by_side_what_they_train_in_turn(first, fakes, tmp_path,
                                                                      monkeypatch) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(launch, "run_logged", _run_entry_in_this_thread(calls, threading.Barrier(2, timeout=300)))
    monkeypatch.setattr(launch, "cpu_threads", lambda: 4)
    monkeypatch.setattr(launch, "visible_gpus", lambda: ["3", "5"])
    summary = run(tmp_path, overrides=["parallel_variants=2"])
    # Same stages, same keys, same metrics as the reproduction that ran the variants in turn.
    keys = lambda s: sorted((item["label"], item["key"]) for item in s["stages"])
    assert keys(summary) == keys(first["summary"])
    for name in ("codis", "albef"):
        assert summary["variants"][name]["metrics"] == first["summary"]["variants"][name]["metrics"]
    assert (_training_calls(fakes, tmp_path / "runs" / "store")
            == _training_calls(first["fakes"], first["root"] / "runs" / "store"))
    # Every training stage ran as a subprocess with half the 4 CPU threads and one of the two
    # GPUs, each variant's stages on its own; evaluations did not.
    entries = {(call["name"], call["command"][call["command"].index("-m") + 1]) for call in calls}
    assert entries == {("pretrain", "flows.pretrain_entry"), ("finetune", "flows.finetune_entry"),
                       ("text_assignment", "flows.finetune_entry")}
    assert len(calls) == 2 * (1 + 1 + 3)  # per variant: pretrain, TA, 3 finetunes
    assert all({k: v for k, v in call["env"].items() if k != "CUDA_VISIBLE_DEVICES"}
               == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"} for call in calls)
    gpus = {name: {c["env"]["CUDA_VISIBLE_DEVICES"] for c in calls if c["label"].endswith(f"{name}]")}
            for name in ("codis", "albef")}
    assert sorted(gpus["codis"] | gpus["albef"]) == ["3", "5"] and all(len(g) == 1 for g in gpus.values())
    # Each variant's evaluations, in the flow's process, ran on its GPU ("3" is cuda:0 here).
    variant_of = {str(Path(s["path"]) / "model.pt"): re.split(r"[\[/]", s["label"].rstrip("]"))[-1]
                  for s in summary["stages"] if s["stage"] in ("pretrain", "finetune")}
    devices = {(variant_of[args["checkpoint"]], args["kwargs"]["device"])
               for name, args in fakes.calls if name.endswith(".evaluate")}
    assert devices == {(name, f"cuda:{['3', '5'].index(next(iter(gpus[name])))}")
                       for name in ("codis", "albef")}
    job = json.loads((Path(next(s["path"] for s in summary["stages"]
                                if s["label"] == "finetune[ve.t/codis]")) / "job.json").read_text())
    assert job["function"] == "finetune" and job["task"] == "ve"


def test_parallel_variants_is_checked_with_the_recipe() -> None:
    data = recipe_data()
    data["parallel_variants"] = 0
    with pytest.raises(RecipeError, match="parallel_variants"):
        recipes.parse_recipe(data)
    data["parallel_variants"] = 2
    assert recipes.parse_recipe(data).parallel_variants == 2


@pytest.mark.parametrize("gpus_per_node, gpus, why", [(2, [], "2 processes"),
                                                       (1, ["0"], "1 GPU(s) for 2 variants")])
def test_parallel_variants_run_in_turn_where_they_would_share_gpus(gpus_per_node, gpus, why, caplog,
                                                                   monkeypatch) -> None:
    from types import SimpleNamespace

    from flows.reproduce import for_each_variant

    monkeypatch.setattr(launch, "visible_gpus", lambda: gpus)
    recipe = recipes.parse_recipe({**recipe_data(), "parallel_variants": 2})
    recipe = recipe.model_copy(update={"pretrain": recipe.pretrain.model_copy(
        update={"gpus_per_node": gpus_per_node})})
    ctx = SimpleNamespace(training_threads=None, stop=threading.Event())
    ran: list[tuple[str, str, int | None]] = []
    with caplog.at_level(logging.WARNING):
        for_each_variant(SimpleNamespace(spec=recipe, ctx=ctx), lambda name: ran.append(
            (name, threading.current_thread().name, ctx.training_threads)))
    # in this thread, one after the other, each training stage in the flow's own way
    assert ran == [(name, threading.current_thread().name, None) for name in recipe.variants]
    assert "parallel_variants: 2 ignored" in caplog.text and why in caplog.text


def test_a_failing_variant_stops_the_other_and_its_error_is_raised(fakes, tmp_path,
                                                                   monkeypatch) -> None:
    calls: list[dict] = []
    in_thread = _run_entry_in_this_thread(calls)

    def run_logged(command, folder, name, **kwargs):
        if name != "pretrain" or kwargs["label"] == "pretrain[albef]":
            return in_thread(command, folder, name, **kwargs)
        # codis's pretraining runs until it is stopped, as a long subprocess would
        if not kwargs["stop"].wait(timeout=300):
            raise AssertionError("the failing variant did not stop this one")
        raise launch.Stopped("stopped")

    monkeypatch.setattr(launch, "run_logged", run_logged)
    original = fakes.pretrain

    def pretrain(config, **kwargs):
        if config.model.mode == "albef":
            raise RuntimeError("albef's pretraining failed")
        return original(config, **kwargs)

    monkeypatch.setattr(codis.train, "pretrain", pretrain)
    data = recipe_data()
    data["variants"]["albef"]["model"]["mode"] = "albef"
    with pytest.raises(RuntimeError, match="albef's pretraining failed"):
        run(tmp_path, data, overrides=["parallel_variants=2"])
    assert not [c for c in fakes.calls if c[0].endswith(".finetune")]


def test_a_gpu_share_names_its_first_gpu_as_this_process_numbers_it(monkeypatch) -> None:
    monkeypatch.setattr(launch, "visible_gpus", lambda: ["4", "6", "7"])
    assert launch.gpu_device(None) is None
    assert launch.gpu_device("6") == "cuda:1"
    assert launch.gpu_device("7,4") == "cuda:2"
    with pytest.raises(ValueError, match="GPU '2' is not one of this process's GPUs: 4, 6, 7"):
        launch.gpu_device("2")


def test_visible_gpus_are_the_ones_this_process_was_given(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert launch.visible_gpus() == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 6")
    assert launch.visible_gpus() == ["4", "6"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launch.visible_gpus() == []


def test_run_logged_ends_its_process_when_stopped_and_passes_its_environment(tmp_path) -> None:
    script = (f"import os, pathlib, time; folder = pathlib.Path({str(tmp_path)!r}); "
              "(folder / 'pid').write_text(str(os.getpid())); "
              "(folder / 'threads').write_text(os.environ['OMP_NUM_THREADS']); time.sleep(600)")
    stop = threading.Event()
    stopper = threading.Thread(target=lambda: (_wait_for(tmp_path / "threads"), stop.set()))
    stopper.start()
    with pytest.raises(launch.Stopped):
        launch.run_logged([sys.executable, "-c", script], tmp_path, "sleeper",
                          env={"OMP_NUM_THREADS": "3"}, stop=stop)
    stopper.join()
    assert (tmp_path / "threads").read_text() == "3"
    with pytest.raises(ProcessLookupError):  # ended and reaped
        os.kill(int((tmp_path / "pid").read_text()), 0)


def _wait_for(path: Path) -> None:
    for _ in range(3000):
        if path.is_file() and path.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} never appeared")


def test_a_finetune_job_in_its_own_process_trains_what_the_stage_trains_in_process(
        shards, tiny_checkpoint, tmp_path) -> None:
    import dataclasses
    import subprocess

    from codis.tasks import ve
    from codis.train import OptimConfig, TrainConfig

    config = ve.config("demo")
    train = TrainConfig(steps=3, batch_size=6, log_every=1, checkpoint_every=10, seed=3)
    optim = OptimConfig(lr=1e-4, warmup_steps=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        logged: list = []
        here = ve.finetune(tiny_checkpoint, str(shards("ve", "train")), tmp_path / "here", config,
                           train=train, optim=optim, progress=False,
                           callback=lambda step, metrics: logged.append((step, metrics)))
    finally:
        torch.set_num_threads(threads)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({
        "function": "finetune", "task": "ve", "pretrained": str(tiny_checkpoint),
        "shards": str(shards("ve", "train")), "output_dir": str(tmp_path / "there"),
        "config": dataclasses.asdict(config), "train": dataclasses.asdict(train),
        "optim": dataclasses.asdict(optim)}))
    jsonl = tmp_path / "metrics.jsonl"
    subprocess.run(launch.finetune_command(job, jsonl), check=True, cwd=REPO,
                   env={**os.environ, **launch.thread_environment(1)}, timeout=900)
    from codis.checkpoint import read_checkpoint

    mine = read_checkpoint(here).state_dict
    theirs = read_checkpoint(tmp_path / "there" / "model.pt").state_dict
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert [(step, m["loss"]) for step, m in read_metrics_jsonl(jsonl)] == [
        (step, m["loss"]) for step, m in logged]
    with pytest.raises(ValueError, match="job.function"):
        from flows.finetune_entry import run_job
        run_job({"function": "pretrain", "task": "ve"})
