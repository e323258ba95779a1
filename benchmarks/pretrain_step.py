"""Step time of CODIS vs its ALBEF baseline on the same batch, measured side by side in one run.

Target (issue 2): the codebook and intra-modal terms add at most 10% to a pretraining step.
A step is forward (students, teachers, queues, all losses) + backward + AdamW update.

    python benchmarks/pretrain_step.py --preset tiny --batch-size 32 --steps 20
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import codis  # noqa: F401
from codis.config import preset
from codis.model import CodisModel
from codis.text import text_tokenizer, tokenize

WORDS = "red green blue yellow circle square triangle star left right above below small large".split()


def make_batch(config, batch_size: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    tokenizer = text_tokenizer(config.text)
    captions = [" ".join(WORDS[j] for j in torch.randint(len(WORDS), (8,), generator=generator))
                for _ in range(batch_size)]
    ids, mask = tokenize(tokenizer, captions, config.text.max_length)
    size = config.vision.image_size
    images = torch.randn(batch_size, 3, size, size, generator=generator)
    return images.to(device), ids.to(device), mask.to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--modes", default="albef,albef_intra,codis")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    modes = args.modes.split(",")

    models, optimizers = {}, {}
    for mode in modes:
        torch.manual_seed(0)
        models[mode] = CodisModel(preset(args.preset, mode=mode)).to(device).train()
        optimizers[mode] = torch.optim.AdamW(
            [p for p in models[mode].parameters() if p.requires_grad], lr=1e-4)
    batch = make_batch(models[modes[0]].config, args.batch_size, device)

    def step(mode: str) -> float:
        synchronize(device)
        start = time.perf_counter()
        output = models[mode](*batch)
        optimizers[mode].zero_grad(set_to_none=True)
        output.loss.backward()
        optimizers[mode].step()
        synchronize(device)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        for mode in modes:
            step(mode)
    times = {mode: [] for mode in modes}
    for _ in range(args.steps):  # interleaved, so that drift of the machine hits every mode alike
        for mode in modes:
            times[mode].append(step(mode))

    print(f"device: {device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), preset: {args.preset}, batch: {args.batch_size}, "
          f"steps: {args.steps} (median)")
    baseline = statistics.median(times[modes[0]])
    print(f"{'mode':<14}{'step ms':>10}{'samples/s':>12}{'vs ' + modes[0]:>14}")
    for mode in modes:
        median = statistics.median(times[mode])
        print(f"{mode:<14}{median * 1e3:>10.1f}{args.batch_size / median:>12.1f}"
              f"{median / baseline:>14.3f}")
    overhead = statistics.median(times[modes[-1]]) / baseline - 1
    print(f"overhead of {modes[-1]} over {modes[0]}: {overhead:+.1%} (target <= +10%)")


if __name__ == "__main__":
    main()
