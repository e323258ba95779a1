"""The step benchmarks run and report what they promise: ``benchmarks/gpu_check.py --smoke``
writes every section with numbers where they belong and survives a failing section, and
``benchmarks/pretrain_throughput.py`` prints ATen ops, syncs, samples/s and both MFUs,
``benchmarks/vision_init_step.py`` times the ViT initialisation both ways and
``benchmarks/example_cache.py`` an unaugmented task loader's epochs both ways and
``benchmarks/conv_stem.py`` the conv-stem ViT with its stem in both memory layouts and
``benchmarks/frozen_vit.py`` NLVR² finetuning with the ViT trained and fixed. They run
as scripts (``benchmarks/`` is not a package), so the tests start them as subprocesses and assert
no timings: the machine is shared."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def run_script(name: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_gpu_check_smoke_writes_every_section_and_records_a_failing_one(tmp_path: Path) -> None:
    # D (memory) is n/a on the CPU anyway: forcing it to fail costs no other measurement.
    done = run_script("gpu_check.py", "--smoke", "--out", str(tmp_path), "--fail", "memory")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # 1: a section failed
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == list("ABCDEFGHIJ")
    status = {letter: entry["status"] for letter, entry in sections.items()}
    assert status == {**{letter: "ok" for letter in "ABCEFGHI"}, "D": "error", "J": "skipped"}, \
        {letter: sections[letter].get("error") for letter in sections}
    assert "forced to fail" in sections["D"]["error"]
    results = {letter: entry.get("result") for letter, entry in sections.items()}

    env = results["A"]
    assert env["torch"] and env["transformers"] and env["timm"]
    assert env["attention"]["text"] == "sdpa" and env["attention"]["vit_fused_attn"] is True
    assert env["shape"]["preset"] == "tiny" and env["shape"]["max_length"] == 30

    flops = results["B"]
    assert flops["flops_per_step"] > 0
    assert flops["gflop_per_sample"] == pytest.approx(sum(flops["gflop_per_sample_by_phase"].values()))
    assert flops["gflop_per_sample_by_phase"]["forward"] > 0
    assert flops["gflop_per_sample_by_phase"]["backward"] > 0

    syncs = results["C"]
    assert isinstance(syncs["syncs"], int) and syncs["syncs"] == sum(syncs["syncs_by_phase"].values())
    assert syncs["ops"] == sum(syncs["ops_by_phase"].values()) > 0
    assert syncs["metric_reads_per_step"] > 0  # one read per loss part

    throughput = results["E"]
    for mode in ("codis", "albef"):
        assert throughput[mode]["samples_per_s"] > 0
        assert throughput[mode]["achieved_tflops"] > 0 and throughput[mode]["mfu_matmul"] > 0
        assert throughput[mode]["mfu_spec"] is None  # no spec peak for a CPU
    assert throughput["codis"]["gflop_per_step"] > throughput["albef"]["gflop_per_step"]

    profile = results["F"]
    assert profile["aten_ops"] > 0 and profile["top_cpu_ops"]
    trace = json.loads((tmp_path / "step_trace.json").read_text())
    assert any(event.get("name") == "gpu_check_step" for event in trace["traceEvents"])

    ot = results["G"]
    assert ot["separate_ms"] > 0 and ot["batched_ms"] > 0
    assert ot["max_relative_difference"] < 1e-4  # one batched solve gives the two plans

    evaluation = results["H"]
    assert evaluation["fp32"]["coco5k_minutes"] > 0
    assert evaluation["tf32"] == evaluation["bf16"] == "n/a: CUDA only"

    loader = results["I"]
    assert loader["workers"] and all(r["samples"] == loader["images"] and r["samples_per_s"] > 0
                                     for r in loader["workers"].values())
    assert "| J compile | skipped |" in done.stdout  # the summary table


@pytest.mark.slow
def test_pretrain_throughput_prints_ops_syncs_throughput_and_both_mfus() -> None:
    done = run_script("pretrain_throughput.py", "--preset", "tiny", "--batch-size", "4",
                      "--steps", "1", "--warmup", "0")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout

    def number(pattern: str) -> float:
        match = re.search(pattern, out)
        assert match, f"{pattern!r} not in:\n{out}"
        return float(match.group(1).replace(",", ""))

    assert number(r"captions: (\d+) tokens") == 30  # tiny's text.max_length
    assert number(r"ATen ops per step: ([\d,]+) \(") > 0
    assert number(r"syncs per step: (\d+) \(") >= 0
    assert number(r"samples/s: ([\d.]+)") > 0
    assert number(r"model FLOPs per step: ([\d.]+) GFLOP") > 0
    assert number(r"achieved: ([\d.]+) TFLOP/s") >= 0
    assert "MFU vs spec peak: CPU: spec MFU n/a" in out
    assert number(r"MFU vs measured matmul peak: ([\d.]+)% of") >= 0


def assert_two_way_table(stdout: str, baseline: str, other: str) -> None:
    """A side-by-side benchmark's table: the ``baseline`` row, then the ``other`` row, each
    ``| name | seconds (3 decimals) | a rate | ratio to the baseline |``, with positive times, the
    baseline's ratio 1.00 and the other's the ratio of the unrounded times (within what the
    printed decimals leave open)."""
    rows = re.findall(rf"^\| ({re.escape(baseline)}|{re.escape(other)}) \| ([\d.]+) \| ([\d.]+) \| "
                      r"([\d.]+) \|$", stdout, re.MULTILINE)
    assert [row[0] for row in rows] == [baseline, other], stdout
    (_, slow, _, one), (_, fast, _, ratio) = rows
    slow, fast, one, ratio = map(float, (slow, fast, one, ratio))
    assert one == 1.0 and slow > 0 and fast > 0
    half = 0.0005
    assert (slow - half) / (fast + half) - 0.005 <= ratio <= (slow + half) / (fast - half) + 0.005


def test_vision_init_step_times_both_ways_and_prints_the_ratio() -> None:
    done = run_script("vision_init_step.py", "--images", "96", "--steps", "3", "--rounds", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_two_way_table(done.stdout, "decoded for every batch", "held in memory")


def test_example_cache_times_both_ways_and_prints_the_ratio() -> None:
    done = run_script("example_cache.py", "--pairs", "48", "--epochs", "2", "--rounds", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "48 NLVR² pairs at 64 px, 2 epochs of 3 batches of 16" in done.stdout, done.stdout
    assert_two_way_table(done.stdout, "decoded every epoch", "cached after the first epoch")


def test_conv_stem_times_both_layouts_and_prints_the_ratio() -> None:
    done = run_script("conv_stem.py", "--batch-size", "4", "--steps", "2", "--rounds", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "batch 4, 2 forward + backward passes" in done.stdout, done.stdout
    assert_two_way_table(done.stdout, "timm ConvStem (NCHW)", "channels-last")


def test_frozen_vit_times_both_ways_and_prints_the_ratio() -> None:
    done = run_script("frozen_vit.py", "--pairs", "32", "--epochs", "2", "--rounds", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "32 NLVR² pairs at 64 px, 2 epochs: 4 steps of 16 pairs" in done.stdout, done.stdout
    assert_two_way_table(done.stdout, "ViT trained", "ViT fixed, tokens cached")


@pytest.mark.parametrize("name, row", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-40GB", "A100"), ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA L40S", "L40S"), ("NVIDIA A10", "A10"),
    ("NVIDIA A10G", None), ("NVIDIA GH200 480GB", None), ("NVIDIA H100 NVL", None),
    ("Tesla V100-SXM2-16GB", None)])
def test_spec_peak_names_its_row_and_no_neighbours(monkeypatch: pytest.MonkeyPatch, name: str,
                                                   row: str | None) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.import_module("pretrain_throughput").spec_peak(name)
    assert (spec[0] if spec else None) == row
