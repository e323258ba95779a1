"""Pretraining throughput, host cost and model FLOPs utilisation (MFU) of a full step on this device.

A step = what ``codis.train.fit`` runs per batch (see ``pretrain_step.train_step``): forward
(students, teachers, queues, every loss) + backward + the loop's AdamW update, on captions of
exactly the preset's ``text.max_length`` tokens, with randomly initialised weights (``--preset
base`` runs offline). Printed:

- ATen ops and host-device syncs per step, by phase, with the sync sites (counted on one eager
  step by ``codis.train.syncs.count_syncs``); with ``--compile regional`` also the ATen ops that
  ``torch.profiler`` records per step, eager and compiled (a dispatch-mode counter would run the
  compiled layers eagerly, so it cannot count them);
- step time, samples/s, model FLOPs (``torch.utils.flop_counter`` over one real step) and the
  achieved TFLOP/s;
- MFU against the device's spec peak (dense bf16, :data:`SPEC_PEAKS`; the row used is named) and
  against a measured matmul (8192^3 in the step's dtype on a GPU, 1024^3 fp32 on the CPU).

    python benchmarks/pretrain_throughput.py --preset tiny --batch-size 32          # CPU here
    python benchmarks/pretrain_throughput.py --preset base --batch-size 64 --compile regional  # GPU
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
from collections import Counter
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils import flop_counter

from pretrain_step import build, forward, make_batch, random_init_preset, timed, train_step

from codis.train import autocast
from codis.train.engine import compile_regions
from codis.train.syncs import SyncReport, count_syncs

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s: (row, pattern
# searched in torch.cuda.get_device_name, peak). A card that matches no row (H100 NVL, GH200,
# A10G, ...) gets no spec MFU rather than a neighbour's.
SPEC_PEAKS: tuple[tuple[str, str, float], ...] = (
    ("H200", r"(?<!G)H200", 989.0),
    ("H100 PCIe", r"H100.*PCIe", 756.0),
    ("H100 SXM", r"H100.*(SXM|HBM3)", 989.0),
    ("A100", r"A100", 312.0),
    ("L40S", r"L40S", 362.0),
    ("A10", r"\bA10\b", 125.0),
)
MATMUL_SIZE = {"cuda": 8192, "cpu": 1024}
PHASES = ("forward", "backward", "optimizer")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def spec_peak(name: str) -> tuple[str, float] | None:
    """(row, dense bf16 TFLOP/s) of :data:`SPEC_PEAKS` for a GPU named ``name`` (as
    ``torch.cuda.get_device_name`` gives it); None if no row matches."""
    return next(((row, peak) for row, pattern, peak in SPEC_PEAKS if re.search(pattern, name)), None)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None,
                repeats: int = 10) -> float:
    """Measured FLOP/s of a square matmul (the median of ``repeats``): the practical peak."""
    size = size or MATMUL_SIZE.get(device.type, 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    seconds = statistics.median(timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * size**3 / seconds


def utilisation(flops_per_step: float, seconds: float, device: torch.device, precision: str,
                measured_peak: float) -> dict[str, Any]:
    """Achieved TFLOP/s and MFU against the spec peak (bf16 steps on a listed GPU only) and
    against ``measured_peak`` (FLOP/s)."""
    achieved = flops_per_step / seconds
    spec = spec_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if spec is None:
        spec_note = "unknown device: spec MFU n/a" if device.type == "cuda" else "CPU: spec MFU n/a"
    elif precision != "bf16":
        spec_note, spec = f"{spec[0]}: the table is dense bf16, spec MFU n/a for {precision}", None
    else:
        spec_note = f"{spec[0]} ({spec[1]:.0f} TFLOP/s dense bf16)"
    return {"achieved_tflops": achieved / 1e12, "spec_row": spec[0] if spec else None,
            "spec_tflops": spec[1] if spec else None, "spec_note": spec_note,
            "mfu_spec": achieved / (spec[1] * 1e12) if spec else None,
            "matmul_tflops": measured_peak / 1e12, "mfu_matmul": achieved / measured_peak}


def utilisation_lines(result: dict[str, Any], device: torch.device, dtype: torch.dtype) -> list[str]:
    size = MATMUL_SIZE.get(device.type, 1024)
    spec = (f"{result['mfu_spec']:.1%} of {result['spec_note']}" if result["mfu_spec"] is not None
            else result["spec_note"])
    return [f"achieved: {result['achieved_tflops']:.4f} TFLOP/s",
            f"MFU vs spec peak: {spec}",
            f"MFU vs measured matmul peak: {result['mfu_matmul']:.1%} of "
            f"{result['matmul_tflops']:.4f} TFLOP/s ({size}^3 {str(dtype).removeprefix('torch.')})"]


def count_cpu_attention_flops() -> None:
    """Give CPU SDPA the FLOP formula of the CUDA kernels (torch counts only those), so that the
    CPU count is the GPU one."""
    aten = torch.ops.aten
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", flop_counter.sdpa_flop),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward",
                           flop_counter.sdpa_backward_flop)):
        op = getattr(aten, name, None)
        if op is not None and op not in flop_counter.flop_registry:
            # The module's formulas already take tensors (registering wrapped them), hence raw.
            flop_counter.register_flop_formula(op, get_raw=True)(formula)


def count_flops(step: Callable[[], None]) -> int:
    """Model FLOPs of one call of ``step`` (matmuls, convolutions and attention)."""
    count_cpu_attention_flops()
    with flop_counter.FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def audit_step(model, optimizer, batch: dict[str, torch.Tensor], precision: str,
               ) -> dict[str, SyncReport]:
    """ATen ops and syncs of one eager training step, per phase (:data:`PHASES`). Run it before
    compiling: under a dispatch mode compiled layers fall back to eager, and stay so."""
    reports = {}
    optimizer.zero_grad(set_to_none=True)
    with autocast(precision, batch["image"].device):
        with count_syncs() as reports["forward"]:
            output = forward(model, batch)
        with count_syncs() as reports["backward"]:
            output.loss.backward()
    with count_syncs() as reports["optimizer"]:
        optimizer.step()
    return reports


def audit_summary(reports: dict[str, SyncReport]) -> dict[str, Any]:
    sites = sum((report.sites for report in reports.values()), Counter())
    return {"ops": sum(r.ops for r in reports.values()),
            "ops_by_phase": {phase: r.ops for phase, r in reports.items()},
            "syncs": sum(r.count for r in reports.values()),
            "syncs_by_phase": {phase: r.count for phase, r in reports.items()},
            "sites": dict(sites.most_common())}


def outermost_aten_ops(events) -> int:
    """How many of ``torch.profiler``'s ``events`` are ATen ops not called by another ATen op."""
    count = 0
    for event in events:
        if event.name.startswith("aten::"):
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            count += parent is None
    return count


def profiled_ops(step: Callable[[], None]) -> int:
    """The ATen ops ``torch.profiler`` records in one call of ``step`` (:func:`outermost_aten_ops`)."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    return outermost_aten_ops(profiler.events())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--mode", default="codis")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--compile", choices=("off", "regional"), default="off",
                        help="regional: .compile() each ViT block and BERT layer "
                             "(codis.train.engine.compile_regions)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    torch.manual_seed(0)
    model, optimizer = build(random_init_preset(args.preset, args.mode), device)
    batch = make_batch(model, args.batch_size, device)

    def step() -> None:
        train_step(model, optimizer, batch, precision)

    step()  # fills an empty queue, creates the optimiser's state
    flops_per_step = count_flops(step)
    audit = audit_summary(audit_step(model, optimizer, batch, precision))
    compiled = None
    if args.compile == "regional":
        eager_ops = profiled_ops(step)
        regions = compile_regions(model)
        first = timed(step, device)
        for _ in range(2):  # the shapes not seen in the first step (e.g. the teachers' no-grad)
            step()
        compiled = {"regions": regions, "first_step_s": first, "eager": eager_ops,
                    "regional": profiled_ops(step)}
    for _ in range(args.warmup):
        step()
    seconds = statistics.median(timed(step, device) for _ in range(args.steps))
    result = utilisation(flops_per_step, seconds, device, precision, matmul_peak(device, dtype))

    config = model.config
    print(f"device: {device} ({device_name(device)}), preset: {args.preset} (random init, offline), "
          f"mode: {args.mode}, batch: {args.batch_size}, precision: {precision}, "
          f"compile: {args.compile}")
    print(f"captions: {config.text.max_length} tokens (text.max_length); "
          f"images: {config.vision.image_size} px")
    by_phase = ", ".join(f"{phase} {audit['ops_by_phase'][phase]:,}" for phase in PHASES)
    print(f"ATen ops per step: {audit['ops']:,} ({by_phase}; eager, dispatched)")
    by_phase = ", ".join(f"{phase} {audit['syncs_by_phase'][phase]}" for phase in PHASES)
    print(f"syncs per step: {audit['syncs']} ({by_phase})")
    for site, count in audit["sites"].items():
        print(f"    {count:>4}  {site}")
    if compiled is not None:
        print(f"regional compile: {compiled['regions']} layers, first step "
              f"{compiled['first_step_s']:.1f} s; "
              f"ATen ops per step (torch.profiler, outermost): eager {compiled['eager']:,} -> "
              f"regional {compiled['regional']:,} ({compiled['regional'] / compiled['eager']:.2f}x)")
    print(f"step time (median of {args.steps}): {seconds * 1e3:.1f} ms")
    print(f"samples/s: {args.batch_size / seconds:.3g}")
    print(f"model FLOPs per step: {flops_per_step / 1e9:.2f} GFLOP "
          f"({flops_per_step / args.batch_size / 1e9:.2f} per sample)")
    for line in utilisation_lines(result, device, dtype):
        print(line)


if __name__ == "__main__":
    main()
