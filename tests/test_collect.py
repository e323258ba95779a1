"""codis.report.collect: a report built from the files the stages write."""

from __future__ import annotations

import json

import pytest

import codis.report.collect
from codis.report import MachineInfo, RunScale, StageTime
from codis.report.collect import describe_machine, read_metrics_jsonl, report_from_stage_outputs

TRAINER = {"platform": "Linux-trainer", "cpu_count": 64, "torch_version": "2.x",
           "device": "cuda:0 (H100)", "python_version": "3.11.0"}


@pytest.fixture
def captured(monkeypatch) -> list:
    """The ReportInputs that build_report receives (nothing is rendered)."""
    found: list = []

    def build_report(inputs, output_dir):
        found.append((inputs, output_dir))
        return {"markdown": output_dir / "report.md", "html": output_dir / "report.html"}

    monkeypatch.setattr(codis.report.collect, "build_report", build_report)
    return found


def test_metrics_jsonl_keeps_the_last_record_of_each_step(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "loss": 2.0}\n{"step": 1, "loss": 1.0}\n'
                    '{"step": 2, "loss": 0.5}\n{"step": 3, "lo')  # a resumed run, a cut-off line
    assert read_metrics_jsonl(path) == [(1, {"loss": 1.0}), (2, {"loss": 0.5})]
    assert read_metrics_jsonl(tmp_path / "missing.jsonl") == []


def test_the_report_reads_stage_outputs_and_describes_the_training_machine(tmp_path, captured) -> None:
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text('{"step": 1, "loss": 3.0, "ica": 1.0, "lr": 0.001}\n')
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"accuracy": 55.0}))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"baselines": {"ve": {"test": {"majority_label": "neutral",
                                                                  "accuracy": 34.0}}}}))
    written = report_from_stage_outputs(
        tmp_path / "out", recipe="demo", pretrain_metrics={"codis": jsonl, "albef": jsonl},
        evaluations={"codis": {"ve": metrics}}, world_manifest=manifest, machine=TRAINER,
        wall_times=[StageTime("pretrain[codis]", 12.0), StageTime("pretrain[albef]", 30.0, reused=True)],
        run_seconds=20.0, scale=RunScale(0.5, ["pretrain.train.steps=10"], 2, "r.yaml"),
        dataset="toy", preset="tiny")
    assert written["html"] == tmp_path / "out" / "report.html"
    (inputs, output_dir), = captured
    assert output_dir == tmp_path / "out" and inputs.recipe == "demo"
    assert list(inputs.variants) == ["codis", "albef"]
    assert inputs.variants["codis"].loss_curve == [(1, {"loss": 3.0, "ica": 1.0})]  # no lr
    assert inputs.variants["codis"].metrics == {"ve": {"accuracy": 55.0}}
    assert inputs.variants["albef"].metrics == {}
    assert inputs.baselines["ve"][0].metrics == {"accuracy": 34.0}
    assert inputs.machine == MachineInfo(**TRAINER)  # not the machine rendering the report
    assert inputs.wall_times == (StageTime("pretrain[codis]", 12.0), StageTime("pretrain[albef]", 30.0, True))
    assert inputs.run_seconds == 20.0
    assert inputs.scale == RunScale(0.5, ["pretrain.train.steps=10"], 2, "r.yaml")
    assert (inputs.dataset, inputs.preset) == ("toy", "tiny")


def test_an_unrecorded_machine_says_so(tmp_path, captured) -> None:
    report_from_stage_outputs(tmp_path, recipe="r", pretrain_metrics={"codis": tmp_path / "none"})
    inputs = captured[0][0]
    assert inputs.machine.device == "not recorded"
    # nor are the stages' times, and the run is the recipe as written, on one process
    assert (inputs.wall_times, inputs.run_seconds, inputs.scale) == ((), None, RunScale())


def test_an_evaluation_of_an_unknown_variant_is_refused(tmp_path, captured) -> None:
    with pytest.raises(ValueError, match="variant 'albef' has no pretrain_metrics"):
        report_from_stage_outputs(tmp_path, recipe="r", pretrain_metrics={"codis": tmp_path},
                                  evaluations={"albef": {}})
    assert captured == []


def test_describe_machine_is_a_json_record_of_machine_info() -> None:
    record = describe_machine("cpu")
    assert json.loads(json.dumps(record)) == record
    assert MachineInfo(**record) == MachineInfo.current("cpu")


def test_the_report_comes_with_its_prefect_artifact(tmp_path) -> None:
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n')
    written = report_from_stage_outputs(tmp_path / "out", recipe="demo", pretrain_metrics={"codis": jsonl},
                                        wall_times=[StageTime("pretrain[codis]", 12.0)], run_seconds=15.0)
    assert set(written) == {"markdown", "html", "artifact"}
    artifact = written["artifact"].read_text()
    assert written["artifact"] == tmp_path / "out" / "report_artifact.md"
    assert "](data:image/png;base64," in artifact and "report_files/" not in artifact
