"""The report of a run from the files its stages wrote: pretraining ``metrics.jsonl``, evaluation
``metrics.json``, analysis folders and the demo world's manifest (``report_from_stage_outputs``).

The machine a report describes is the one that trained, not the one that renders the report: a
training stage records ``describe_machine`` where it runs, and the report is given that record.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from codis.report import (MachineInfo, ReportInputs, RunScale, StageTime, VariantResults, build_report,
                          trivial_baselines)
from codis.report.analysis import read_analysis

LOSS_CURVE_KEYS = ("loss", "ica", "itm", "mlm", "code")
"""The pretraining losses the report plots."""

NOT_RECORDED = "not recorded"


def describe_machine(device: str | None = None) -> dict[str, Any]:
    """This machine as ``codis.report.MachineInfo`` fields (JSON, for a stage's record).
    ``device`` None: the device codis trains on here, the GPU if there is one."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return dataclasses.asdict(MachineInfo.current(device))


def read_metrics_jsonl(path: str | Path) -> list[tuple[int, dict[str, float]]]:
    """``(step, metrics)`` records of a ``metrics.jsonl`` (one ``{"step": ..., name: value}``
    object per line), in step order; a later record of a step replaces an earlier one (a resumed
    run repeats the steps after its last checkpoint). A missing file has no records."""
    path = Path(path)
    if not path.is_file():
        return []
    records: dict[int, dict[str, float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by a crash
        step = int(item.pop("step"))
        records[step] = item
    return sorted(records.items())


def _read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def report_from_stage_outputs(
        output_dir: str | Path, *, recipe: str, pretrain_metrics: Mapping[str, str | Path],
        evaluations: Mapping[str, Mapping[str, str | Path]] | None = None,
        analyses: Mapping[str, str | Path] | None = None, world_manifest: str | Path | None = None,
        machine: Mapping[str, Any] | None = None, wall_times: Sequence[StageTime] = (),
        run_seconds: float | None = None, scale: RunScale | None = None,
        dataset: str = "the demo world (a generated toy dataset)", preset: str = "tiny",
        ) -> dict[str, Path]:
    """Build the report (``codis.report.build_report``) into ``output_dir`` from stage outputs.

    ``pretrain_metrics``: ``{variant: its pretraining metrics.jsonl}``, in the report's variant
    order. ``evaluations``: ``{variant: {report task key: an evaluation's metrics.json}}``.
    ``analyses``: ``{variant: folder holding analysis.json}``. ``world_manifest``: the demo
    world's manifest (its trivial baselines and split sizes). ``machine``:
    ``codis.report.MachineInfo`` fields of the machine that trained (``describe_machine``); None:
    not recorded. ``wall_times``: every stage of the run in order, reused ones included;
    ``run_seconds``: the run's wall time up to the report (None: not measured). ``scale``: the
    run's steps scale, recipe overrides, pretraining world size and recipe file (None: the recipe
    as written, one process). Returns ``{"markdown": path, "html": path, "artifact": path}``
    (``report_artifact.md``, for a Prefect Markdown artifact)."""
    evaluations, analyses = evaluations or {}, analyses or {}
    unknown = sorted((set(evaluations) | set(analyses)) - set(pretrain_metrics))
    if unknown:
        raise ValueError(f"evaluations / analyses: variant {unknown[0]!r} has no pretrain_metrics")
    variants = {}
    for name, jsonl in pretrain_metrics.items():
        curve = [(step, {k: v for k, v in values.items() if k in LOSS_CURVE_KEYS})
                 for step, values in read_metrics_jsonl(jsonl)]
        metrics = {key: _read_json(path) for key, path in evaluations.get(name, {}).items()}
        analysis = read_analysis(analyses[name]) if name in analyses else {}
        variants[name] = VariantResults(loss_curve=curve, metrics=metrics, **analysis)
    baselines = trivial_baselines(_read_json(world_manifest)) if world_manifest is not None else {}
    if machine is None:
        machine = {"platform": NOT_RECORDED, "cpu_count": 0, "torch_version": NOT_RECORDED,
                   "device": NOT_RECORDED}
    inputs = ReportInputs(variants=variants, recipe=recipe, machine=MachineInfo(**machine),
                          baselines=baselines, wall_times=tuple(wall_times), run_seconds=run_seconds,
                          scale=scale or RunScale(), dataset=dataset, preset=preset)
    return build_report(inputs, Path(output_dir))
