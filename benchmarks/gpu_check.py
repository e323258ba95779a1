"""A 10-minute check of a GPU at the paper's shape: the measurements that replace the estimates of
the GPU-readiness review (docs: ../shared/reviews/gpu-readiness.md, section 13).

One command, offline, random weights at the ``base`` shape (ViT-B/16 at 256 px, BERT 6 + 6 with the
BERT-uncased vocabulary, full queue, captions of ``text.max_length`` tokens), batch 64:

    python -u benchmarks/gpu_check.py --out gpu-check          # on one GPU, about 5-8 minutes
    python benchmarks/gpu_check.py --smoke --out /tmp/check    # tiny preset on the CPU (the tests)

Sections (``--skip`` takes letters or names, e.g. ``--skip compile,loader``):

    A env        library versions, device, SDPA backends, TF32, attention implementations
    B flops      model FLOPs per sample of one real step (forward, backward, AdamW)
    C syncs      ATen ops and host-device syncs of one step, by phase, with file:line (on CUDA
                 ``torch.cuda.set_sync_debug_mode("warn")`` too); the per-step metric reads
    D memory     peak memory at batch 64 and 128 (CUDA only)
    E throughput samples/s of ``codis`` and ``albef`` modes, interleaved, median of 10 steps, with
                 and without per-step metric reads; TFLOP/s, MFU vs spec peak and measured matmul
    F profile    one step under torch.profiler: kernel (or op) count, GPU-busy share, top kernels,
                 attention kernels; Chrome trace in ``step_trace.json``
    G ot         IPOT as two solves vs one batched (2, N, K) solve, N = 8 x batch; plans compared
    H eval       COCO-5K ITM re-ranking time extrapolated from one pass each way, fp32 / TF32 / bf16
    I loader     pretrain_loader samples/s per worker at the preset's image size on synthetic JPEG
                 shards (3/4 at 341x256, 1/4 at 640x480)
    J compile    regional compile (codis.train.engine.compile_regions): compile time, step speed-up,
                 ATen ops per step eager vs compiled (skipped by default with --smoke)

``--budget-s`` is shared: a section that would start after it is spent is skipped, and the timed
loops stop early. Each section runs on its own: one that fails is recorded with its error and the
others still run. ``--out`` receives ``gpu_check.json`` (rewritten after every section, so a
killed run leaves what it measured) and ``step_trace.json``; stdout is line-buffered.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from loader import make_images
from pretrain_step import (build, forward, make_batch, metric_values, random_init_preset,
                           synchronize, timed, train_step)
from pretrain_throughput import (PHASES, audit_step, audit_summary, count_cpu_attention_flops,
                                 count_flops, device_name, matmul_peak, outermost_aten_ops,
                                 profiled_ops, spec_peak, utilisation)

import timm
import transformers
from codis.data.loaders import pretrain_loader
from codis.data.shards import write_shards
from codis.losses import codeword_distance
from codis.model import CodisModel
from codis.ot import transport_plan
from codis.tasks import retrieval
from codis.train import autocast
from codis.train.engine import compile_regions
from codis.train.syncs import count_syncs

TRACE_NAME = "step_trace.json"
# Seconds a section needs left in the budget to start (compiling the base model's layers takes
# a minute or more); the others start while any is left.
MINIMUM_SECONDS = {"J": 90.0}
RESULT_NAME = "gpu_check.json"
GIB = 2**30
# COCO 5K test split (Karpathy): 5,000 images and their 25,010 captions.
COCO_IMAGES, COCO_CAPTIONS = 5000, 25010
# (width, height) of the loader section's synthetic JPEGs, in turn: 3/4 like img2dataset's
# 256 px downloads (CC3M, SBU), 1/4 like the COCO / VG originals, about the 4M mix's shares.
JPEG_SIZES = ((341, 256), (341, 256), (341, 256), (640, 480))


@dataclass
class Check:
    """What the sections share: settings, the clock, and the models built once."""

    preset: str
    batch_size: int
    device: torch.device
    precision: str
    steps: int
    smoke: bool
    out: Path
    deadline: float
    models: dict[str, tuple[CodisModel, torch.optim.Optimizer]] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)
    shared_batch: dict[str, torch.Tensor] | None = None
    peak: float | None = None

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def model(self, mode: str = "codis") -> tuple[CodisModel, torch.optim.Optimizer]:
        """The ``mode`` model and its optimiser, built once and stepped once (an "empty" queue
        is then filled, the optimiser state exists)."""
        if mode not in self.models:
            torch.manual_seed(0)
            self.models[mode] = build(random_init_preset(self.preset, mode), self.device)
            self.step(mode)()
        return self.models[mode]

    def batch(self) -> dict[str, torch.Tensor]:
        """The batch every mode's step reads (the modes share tokenizer and shapes)."""
        if self.shared_batch is None:
            model = next(iter(self.models.values()))[0] if self.models else self.model()[0]
            self.shared_batch = make_batch(model, self.batch_size, self.device)
        return self.shared_batch

    def step(self, mode: str = "codis", read_metrics: bool = False) -> Callable[[], Any]:
        """One training step of the ``mode`` model on the shared batch, as a function."""
        model, optimizer = self.model(mode)
        batch = self.batch()
        return lambda: train_step(model, optimizer, batch, self.precision, read_metrics)

    def step_flops(self, mode: str = "codis") -> int:
        if mode not in self.flops:
            self.model(mode)
            self.flops[mode] = count_flops(self.step(mode))
        return self.flops[mode]

    def matmul_peak(self) -> float:
        if self.peak is None:
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
            self.peak = matmul_peak(self.device, dtype)
        return self.peak

    def release(self, mode: str) -> None:
        self.models.pop(mode, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def median_ms(function: Callable[[], Any], device: torch.device, repeats: int) -> float:
    return statistics.median(timed(function, device) for _ in range(repeats)) * 1e3


# ---- sections -------------------------------------------------------------------------------------
def section_env(check: Check) -> dict[str, Any]:
    model, _ = check.model()
    backends = torch.backends.cuda
    sdpa = {name: bool(getattr(backends, f"{name}_sdp_enabled", lambda: None)())
            for name in ("flash", "mem_efficient", "math", "cudnn")}
    fusion = model.text_encoder.fusion[0]
    spec = spec_peak(torch.cuda.get_device_name(check.device)) if check.device.type == "cuda" else None
    attention = {
        "text": model.text_encoder.bert.config._attn_implementation,
        "fusion_self": fusion.attention.self.config._attn_implementation,
        "fusion_cross": fusion.crossattention.self.config._attn_implementation,
        "vit_fused_attn": bool(model.visual_encoder.blocks[0].attn.fused_attn),
    }
    config = model.config
    result = {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "timm": timm.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "device": device_name(check.device), "device_type": check.device.type,
        "gpu_memory_gib": (torch.cuda.get_device_properties(check.device).total_memory / GIB
                           if check.device.type == "cuda" else None),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "spec_row": spec[0] if spec else None, "spec_bf16_tflops": spec[1] if spec else None,
        "sdpa_enabled": sdpa,
        "tf32": {"matmul": backends.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32,
                 "float32_matmul_precision": torch.get_float32_matmul_precision()},
        "attention": attention,
        "shape": {"preset": check.preset, "image_size": config.vision.image_size,
                  "patch_size": config.vision.patch_size, "max_length": config.text.max_length,
                  "vocab_size": model.text_encoder.vocab_size, "queue_size": config.queue_size,
                  "codebook_size": config.codebook.size, "batch_size": check.batch_size,
                  "precision": check.precision,
                  "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                  "parameters": sum(p.numel() for p in model.parameters())},
    }
    result["summary"] = (f"{result['device']}; torch {torch.__version__}, attention "
                         f"{attention['text']}/{attention['fusion_cross']}, timm fused_attn "
                         f"{attention['vit_fused_attn']}, TF32 {result['tf32']['matmul']}")
    return result


def section_flops(check: Check) -> dict[str, Any]:
    """Model FLOPs of one step, by phase (FlopCounterMode's per-module split attributes the
    backward unevenly, so phases it is)."""
    model, optimizer = check.model()
    batch = check.batch()
    count_cpu_attention_flops()
    counters = {phase: FlopCounterMode(display=False) for phase in PHASES}
    optimizer.zero_grad(set_to_none=True)
    with autocast(check.precision, check.device):
        with counters["forward"]:
            output = forward(model, batch)
        with counters["backward"]:
            output.loss.backward()
    with counters["optimizer"]:
        optimizer.step()
    by_phase = {phase: counter.get_total_flops() for phase, counter in counters.items()}
    total = sum(by_phase.values())
    check.flops.setdefault("codis", total)
    per_sample = total / check.batch_size
    return {"flops_per_step": total, "gflop_per_sample": per_sample / 1e9,
            "batch_size": check.batch_size,
            "gflop_per_sample_by_phase": {phase: flops / check.batch_size / 1e9
                                          for phase, flops in by_phase.items()},
            "summary": f"{per_sample / 1e9:.2f} GFLOP/sample ({total / 1e12:.3f} TFLOP/step)"}


def section_syncs(check: Check) -> dict[str, Any]:
    model, optimizer = check.model()
    audit = audit_summary(audit_step(model, optimizer, check.batch(), check.precision))
    output = check.step()()
    with count_syncs() as reads:  # what the training loop read on every step before issue 13
        metric_values(output)
    audit.update(metric_reads_per_step=reads.count, cuda_sync_debug_mode=check.device.type == "cuda")
    phases = audit["syncs_by_phase"]
    audit["summary"] = (f"{audit['syncs']} syncs/step (forward {phases['forward']}, backward "
                        f"{phases['backward']}, optimizer {phases['optimizer']}), "
                        f"{audit['ops']:,} ATen ops/step; +{reads.count} with per-step metric reads")
    return audit


def section_memory(check: Check) -> dict[str, Any]:
    if check.device.type != "cuda":
        return {"note": "n/a: CUDA only", "summary": "n/a (CUDA only)"}
    model, optimizer = check.model()
    result: dict[str, Any] = {}
    for size in (check.batch_size, 2 * check.batch_size):
        batch = make_batch(model, size, check.device)
        synchronize(check.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(check.device)
        try:
            train_step(model, optimizer, batch, check.precision)
            synchronize(check.device)
            result[str(size)] = {
                "max_allocated_gib": torch.cuda.max_memory_allocated(check.device) / GIB,
                "max_reserved_gib": torch.cuda.max_memory_reserved(check.device) / GIB}
        except torch.cuda.OutOfMemoryError:
            result[str(size)] = {"oom": True}
        finally:
            del batch
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    result["summary"] = ", ".join(
        f"batch {size}: " + ("OOM" if value.get("oom") else
                             f"{value['max_allocated_gib']:.1f} GiB allocated "
                             f"({value['max_reserved_gib']:.1f} reserved)")
        for size, value in result.items())
    return result


def section_throughput(check: Check) -> dict[str, Any]:
    modes = ("albef", "codis")
    flops = {mode: check.step_flops(mode) for mode in modes}
    series = [(mode, reads) for mode in modes for reads in (False, True)]
    steps = {key: check.step(key[0], read_metrics=key[1]) for key in series}
    for _ in range(1 if check.smoke else 2):
        for key in series:
            steps[key]()
    times: dict[tuple[str, bool], list[float]] = {key: [] for key in series}
    for done in range(check.steps):  # interleaved: drift of the machine hits every series alike
        if done >= 3 and check.left() < 0:
            break
        for key in series:
            times[key].append(timed(steps[key], check.device))
    peak = check.matmul_peak()
    result: dict[str, Any] = {"batch_size": check.batch_size, "steps": len(times[series[0]])}
    for mode in modes:
        plain, reads = (statistics.median(times[(mode, flag)]) for flag in (False, True))
        result[mode] = {"step_ms": plain * 1e3, "samples_per_s": check.batch_size / plain,
                        "step_ms_with_metric_reads": reads * 1e3,
                        "samples_per_s_with_metric_reads": check.batch_size / reads,
                        "metric_reads_cost": reads / plain - 1, "gflop_per_step": flops[mode] / 1e9,
                        **utilisation(flops[mode], plain, check.device, check.precision, peak)}
    codis, albef = result["codis"], result["albef"]
    result["codis_overhead_vs_albef"] = codis["step_ms"] / albef["step_ms"] - 1
    check.release("albef")
    spec = f"{codis['mfu_spec']:.1%} spec" if codis["mfu_spec"] is not None else "spec n/a"
    result["summary"] = (f"codis {codis['samples_per_s']:.1f}/s, albef {albef['samples_per_s']:.1f}/s "
                         f"(codis {result['codis_overhead_vs_albef']:+.1%}); metric reads "
                         f"{codis['metric_reads_cost']:+.1%}; {codis['achieved_tflops']:.3f} TFLOP/s, "
                         f"MFU {spec}, {codis['mfu_matmul']:.1%} of matmul")
    return result


def _busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    busy, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy


def section_profile(check: Check) -> dict[str, Any]:
    step = check.step()
    step()
    cuda = check.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        with record_function("gpu_check_step"):
            step()
            synchronize(check.device)
    trace = check.out / TRACE_NAME
    profiler.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    wall_us = max((e.get("dur", 0) for e in events if e.get("name") == "gpu_check_step"
                   and e.get("cat") == "user_annotation"), default=0)
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    durations, calls = Counter(), Counter()
    for kernel in kernels:
        durations[kernel["name"]] += kernel["dur"]
        calls[kernel["name"]] += 1
    top_kernels = [{"name": name[:160], "ms": us / 1e3, "calls": calls[name]}
                   for name, us in durations.most_common(15)]
    attention = sorted({name[:160] for name in durations
                        if re.search(r"flash|fmha|attention|sdpa|cutlass.*attn", name, re.I)})
    top_ops = sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
    busy = _busy_time([(k["ts"], k["ts"] + k["dur"]) for k in kernels]) if kernels else None
    result = {
        "wall_ms": wall_us / 1e3,
        "aten_ops": outermost_aten_ops(profiler.events()),
        "kernels": len(kernels) if cuda else None,
        "gpu_busy_share": busy / wall_us if busy is not None and wall_us else None,
        "top_kernels": top_kernels, "attention_kernels": attention,
        "top_cpu_ops": [{"name": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3}
                        for e in top_ops],
        "trace": str(trace),
    }
    if cuda:
        result["summary"] = (f"{len(kernels):,} kernels, GPU busy {result['gpu_busy_share']:.0%} of "
                             f"{result['wall_ms']:.0f} ms; {result['aten_ops']:,} ATen ops")
    else:
        result["summary"] = (f"{result['aten_ops']:,} ATen ops in {result['wall_ms']:.0f} ms "
                             f"(kernels, GPU busy: n/a on CPU)")
    return result


def section_ot(check: Check) -> dict[str, Any]:
    model, _ = check.model()
    codebook_config = model.config.codebook
    n, k, dim = 8 * check.batch_size, codebook_config.size, model.config.embed_dim
    generator = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(2, n, dim, generator=generator), dim=-1).to(check.device)
    codewords = F.normalize(torch.randn(k, dim, generator=generator), dim=-1).to(check.device)
    cost = codeword_distance(features, codewords).clamp_min(0)

    def separate() -> torch.Tensor:
        return torch.stack([transport_plan(cost[0], codebook_config.ot),
                            transport_plan(cost[1], codebook_config.ot)])

    def batched() -> torch.Tensor:
        return transport_plan(cost, codebook_config.ot)

    plans = {"separate": separate(), "batched": batched()}  # warm-up, and the plans compared
    counts = {}
    for name, solve in (("separate", separate), ("batched", batched)):
        with count_syncs() as report:
            solve()
        counts[name] = report
    repeats = 3 if check.smoke else 10
    times = {"separate": [], "batched": []}
    for _ in range(repeats):
        for name, solve in (("separate", separate), ("batched", batched)):
            times[name].append(timed(solve, check.device))
    difference = (plans["separate"] - plans["batched"]).abs().max().item()
    scale = plans["separate"].abs().max().item()
    result = {"n": n, "k": k, "solver": codebook_config.ot.solver,
              "iterations": codebook_config.ot.iterations,
              "max_abs_difference": difference, "max_relative_difference": difference / scale}
    for name in times:
        result[f"{name}_ms"] = statistics.median(times[name]) * 1e3
        result[f"{name}_ops"] = counts[name].ops
        result[f"{name}_syncs"] = counts[name].count
    result["summary"] = (f"{n}x{k}, {result['iterations']} iterations: two solves "
                         f"{result['separate_ms']:.2f} ms ({result['separate_syncs']} syncs), one "
                         f"batched {result['batched_ms']:.2f} ms ({result['batched_syncs']} syncs); "
                         f"plans differ by {result['max_relative_difference']:.1e} (relative)")
    return result


def section_eval(check: Check) -> dict[str, Any]:
    """One ITM re-ranking pass each way, as ``codis.tasks.retrieval.rerank`` batches them (the
    ``k_test`` candidates of ``rerank_batch_size // k_test`` queries per pass, shared work on),
    timed and multiplied by the passes of COCO 5K. Encoding the images and texts is not included."""
    model, _ = check.model()
    task = retrieval.config("demo" if check.smoke else "coco")
    k = task.k_test
    per_pass = max(1, task.rerank_batch_size // k)
    tokens = (task.image_size // model.config.vision.patch_size) ** 2 + 1
    length = task.max_length or model.config.text.max_length
    width = model.text_encoder.hidden_size
    pool = per_pass * k  # as many images (texts) as a pass can hold: candidates drawn from them
    generator = torch.Generator().manual_seed(0)
    device = check.device
    image_tokens = torch.randn(pool, tokens, width, generator=generator).to(device)
    text_tokens = torch.randn(pool, length, width, generator=generator).to(device)
    text_mask = torch.ones(pool, length, dtype=torch.long, device=device)
    queries = torch.arange(per_pass).repeat_interleave(k).to(device)
    candidates = torch.cat([torch.randperm(pool, generator=generator)[:k]
                            for _ in range(per_pass)]).to(device)
    passes = {"i2t": (queries, candidates), "t2i": (candidates, queries)}  # (image_rows, text_rows)
    counts = {"i2t": math.ceil(COCO_IMAGES / per_pass), "t2i": math.ceil(COCO_CAPTIONS / per_pass)}
    result: dict[str, Any] = {
        "image_size": task.image_size, "image_tokens": tokens, "text_tokens": length, "k_test": k,
        "queries_per_pass": per_pass, "passes": counts,
        "distinct_images_per_t2i_pass": int(candidates.unique().numel()),
        "note": "ITM re-ranking only; encoding the 5K images and 25K captions is not included"}
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    model.eval()
    try:
        for precision in ("fp32", "tf32", "bf16"):
            if device.type != "cuda" and precision != "fp32":
                result[precision] = "n/a: CUDA only"
                continue
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
            context = autocast("bf16", device) if precision == "bf16" else nullcontext()
            measured = {}
            for direction, (image_rows, text_rows) in passes.items():
                def one_pass() -> None:
                    with torch.no_grad(), context:
                        retrieval.shared_match_logits(model, image_tokens, text_tokens, text_mask,
                                                      image_rows, text_rows)
                one_pass()
                measured[f"{direction}_pass_ms"] = median_ms(one_pass, device, 1 if check.smoke else 3)
            seconds = sum(counts[d] * measured[f"{d}_pass_ms"] / 1e3 for d in counts)
            result[precision] = {**measured, "coco5k_minutes": seconds / 60}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        model.train()
    result["summary"] = "COCO-5K re-rank: " + ", ".join(
        f"{p} {result[p]['coco5k_minutes']:.1f} min" if isinstance(result[p], dict) else f"{p} n/a"
        for p in ("fp32", "tf32", "bf16"))
    return result


def section_loader(check: Check) -> dict[str, Any]:
    model, _ = check.model()
    config = model.config
    count = 32 if check.smoke else 1536
    cores = os.cpu_count() or 1
    workers = [1] if check.smoke else sorted({max(1, cores // 4), max(1, cores // 2),
                                             max(1, cores - 2)})
    result: dict[str, Any] = {"images": count, "image_size": config.vision.image_size,
                              "cpu_count": cores, "note": "one epoch per run, worker start included"}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp) / "images"
        root.mkdir()
        records = make_images(root, count, sizes=JPEG_SIZES)
        write_shards(records, root, Path(tmp) / "shards", kind="pretrain", samples_per_shard=32,
                     progress=False)
        rates = {}
        for num_workers in workers:
            if rates and check.left() < 0:
                break
            loader = pretrain_loader(str(Path(tmp) / "shards"), tokenizer=model.tokenizer,
                                     image_size=config.vision.image_size,
                                     batch_size=check.batch_size, max_length=config.text.max_length,
                                     num_workers=num_workers, drop_last=False,
                                     mlm_probability=config.mlm_probability)
            start = time.perf_counter()
            seen = sum(len(batch["input_ids"]) for batch in loader)
            rate = seen / (time.perf_counter() - start)
            rates[str(num_workers)] = {"samples": seen, "samples_per_s": rate,
                                       "samples_per_s_per_worker": rate / num_workers}
    result["workers"] = rates
    result["summary"] = ", ".join(f"{w} workers: {r['samples_per_s']:.0f}/s "
                                  f"({r['samples_per_s_per_worker']:.0f} per worker)"
                                  for w, r in rates.items())
    return result


def section_compile(check: Check) -> dict[str, Any]:
    """A fresh codis model (the shared one stays eager), eager first, then regionally compiled.
    The op counts come from torch.profiler: a dispatch-mode counter would run compiled layers
    eagerly."""
    torch.manual_seed(0)
    model, optimizer = build(random_init_preset(check.preset, "codis"), check.device)
    batch = check.batch()

    def step() -> None:
        train_step(model, optimizer, batch, check.precision)

    step()
    repeats = 3 if check.smoke else check.steps
    eager_ms = median_ms(step, check.device, repeats)
    eager_ops = profiled_ops(step)
    regions = compile_regions(model)
    first_s = timed(step, check.device)
    for _ in range(2):  # shapes the first step did not meet (e.g. the teachers' no-grad calls)
        step()
    compiled_ms = median_ms(step, check.device, repeats)
    compiled_ops = profiled_ops(step)
    return {"regions": regions, "first_step_s": first_s, "eager_step_ms": eager_ms,
            "regional_step_ms": compiled_ms, "speed_up": eager_ms / compiled_ms,
            "aten_ops_eager": eager_ops, "aten_ops_regional": compiled_ops,
            "summary": f"{eager_ms / compiled_ms:.2f}x ({eager_ms:.1f} -> {compiled_ms:.1f} ms), "
                       f"ATen ops {eager_ops:,} -> {compiled_ops:,}, first step {first_s:.0f} s"}


SECTIONS: dict[str, tuple[str, Callable[[Check], dict[str, Any]]]] = {
    "A": ("env", section_env), "B": ("flops", section_flops), "C": ("syncs", section_syncs),
    "D": ("memory", section_memory), "E": ("throughput", section_throughput),
    "F": ("profile", section_profile), "G": ("ot", section_ot), "H": ("eval", section_eval),
    "I": ("loader", section_loader), "J": ("compile", section_compile),
}


def _letters(spec: str, option: str) -> set[str]:
    """Section letters from "B,compile,..." (letters or names, any case)."""
    names = {name: letter for letter, (name, _) in SECTIONS.items()}
    letters = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        letter = item.upper() if item.upper() in SECTIONS else names.get(item.lower())
        if letter is None:
            raise SystemExit(f"{option}: unknown section {item!r} (known: "
                             f"{', '.join(f'{key}/{name}' for key, (name, _) in SECTIONS.items())})")
        letters.add(letter)
    return letters


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str))
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="output folder")
    parser.add_argument("--budget-s", type=float, default=520.0,
                        help="time shared by the sections (default 520, for a 600 s slot)")
    parser.add_argument("--skip", default=None,
                        help="sections to skip, letters or names (default: none; compile with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny preset on the CPU with small sizes: checks that the script runs")
    parser.add_argument("--preset", default=None, help="default: base (tiny with --smoke)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 (8 with --smoke)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per series (default: 10, 3 with --smoke)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    parser.add_argument("--fail", default="", help=argparse.SUPPRESS)  # tests: sections that raise
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke
                                          else "cpu"))
    skip = _letters(args.skip if args.skip is not None else ("compile" if args.smoke else ""), "--skip")
    fail = _letters(args.fail, "--fail")
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(preset=args.preset or ("tiny" if args.smoke else "base"),
                  batch_size=args.batch_size or (8 if args.smoke else 64), device=device,
                  precision=args.precision or ("bf16" if device.type == "cuda" else "fp32"),
                  steps=args.steps or (3 if args.smoke else 10), smoke=args.smoke, out=args.out,
                  deadline=started + args.budget_s)
    report: dict[str, Any] = {
        "settings": {"preset": check.preset, "batch_size": check.batch_size, "device": str(device),
                     "precision": check.precision, "steps": check.steps, "smoke": args.smoke,
                     "budget_s": args.budget_s, "skipped": sorted(skip),
                     "command": " ".join(sys.argv)},
        "sections": {}}
    print(f"gpu_check: preset {check.preset}, batch {check.batch_size}, {device} "
          f"({device_name(device)}), {check.precision}, budget {args.budget_s:.0f} s, out {args.out}")
    for letter, (name, section) in SECTIONS.items():
        entry: dict[str, Any] = {"name": name}
        if letter in skip:
            entry["status"] = "skipped"
        elif check.left() <= MINIMUM_SECONDS.get(letter, 0):
            entry["status"] = "skipped: budget spent"
        else:
            print(f"[{letter}] {name} ...")
            start = time.perf_counter()
            try:
                if letter in fail:
                    raise RuntimeError(f"section {letter} forced to fail (--fail)")
                entry["result"] = section(check)
                entry["status"] = "ok"
            except Exception as error:  # noqa: BLE001 - one section's failure must not stop the rest
                entry["status"] = "error"
                entry["error"] = f"{type(error).__name__}: {error}"
                entry["traceback"] = traceback.format_exc()
                print(entry["traceback"], end="")
            entry["seconds"] = time.perf_counter() - start
            if device.type == "cuda":
                torch.cuda.empty_cache()
        line = entry.get("result", {}).get("summary") or entry.get("error") or ""
        print(f"[{letter}] {name}: {entry['status']} "
              f"{'(%.1f s) ' % entry['seconds'] if 'seconds' in entry else ''}{line}")
        report["sections"][letter] = entry
        report["elapsed_s"] = time.perf_counter() - started
        _write_json(args.out / RESULT_NAME, report)

    print(f"\nsummary ({report['elapsed_s']:.0f} s, {device_name(device)}, preset {check.preset}, "
          f"batch {check.batch_size}, {check.precision}):")
    print("| section | status | s | result |\n|---|---|---|---|")
    for letter, entry in report["sections"].items():
        line = entry.get("result", {}).get("summary") or entry.get("error") or ""
        seconds = f"{entry['seconds']:.1f}" if "seconds" in entry else ""
        print(f"| {letter} {entry['name']} | {entry['status']} | {seconds} | {line} |")
    print(f"written: {args.out / RESULT_NAME}" + (f", {args.out / TRACE_NAME}"
                                                   if (args.out / TRACE_NAME).exists() else ""))
    return 1 if any(e["status"] == "error" for e in report["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
