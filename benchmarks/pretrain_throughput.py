"""Pretraining throughput and model FLOPs utilisation (MFU) of a full step on this device.

A step = forward (students, teachers, queues, every loss) + backward + AdamW update, as in
``codis.train``. FLOPs are counted by ``torch.utils.flop_counter`` on one real step (so the
teacher forwards, the ITM negatives and the MLM pass are all included); the device's peak is
measured here with a large matmul in the step's precision. Both are printed, then their ratio.

    python benchmarks/pretrain_throughput.py --preset tiny --batch-size 32          # CPU here
    python benchmarks/pretrain_throughput.py --preset base --batch-size 64 --precision bf16  # GPU
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

import codis  # noqa: F401
from codis.config import preset
from codis.model import CodisModel
from codis.text import tokenize

WORDS = "red green blue yellow circle square triangle star left right above below small large".split()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """Measured FLOP/s of a square matmul, the practical peak the step is compared with."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--mode", default="codis")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    autocast = torch.autocast(device.type, dtype=dtype) if precision == "bf16" else nullcontext()

    torch.manual_seed(0)
    config = preset(args.preset, mode=args.mode)
    model = CodisModel(config).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokenizer = model.tokenizer
    generator = torch.Generator().manual_seed(0)
    captions = [" ".join(WORDS[j] for j in torch.randint(len(WORDS), (12,), generator=generator))
                for _ in range(args.batch_size)]
    ids, mask = (t.to(device) for t in tokenize(tokenizer, captions, config.text.max_length))
    size = config.vision.image_size
    images = torch.randn(args.batch_size, 3, size, size, generator=generator).to(device)

    def step() -> None:
        with autocast:
            loss = model(images, ids, mask).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops_per_step = counter.get_total_flops()
    for _ in range(2):
        step()
    times = []
    for _ in range(args.steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak = matmul_peak(device, dtype, 4096 if device.type == "cuda" else 1024)
    achieved = flops_per_step / seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"device: {device} ({name}), preset: {args.preset}, mode: {args.mode}, "
          f"batch: {args.batch_size}, precision: {precision}")
    print(f"step time (median of {args.steps}): {seconds * 1e3:.1f} ms")
    print(f"samples/s: {args.batch_size / seconds:.1f}")
    print(f"model FLOPs per step: {flops_per_step / 1e9:.2f} GFLOP")
    print(f"achieved: {achieved / 1e12:.4f} TFLOP/s; measured matmul peak: {peak / 1e12:.4f} TFLOP/s")
    print(f"MFU: {achieved / peak:.1%}")


if __name__ == "__main__":
    main()
