"""Step time of CODIS vs its ALBEF baseline on the same batch, measured side by side in one run.

Targets: the codebook and intra-modal terms add at most 10% to a pretraining step (issue 2), at
most 5% at the `tiny` preset (issue 13).
A step is what ``codis.train.fit`` runs between two batches: uint8 images normalised on the device,
forward (students, teachers, queues, all losses) with the MLM mask drawn by the loader, backward,
and the training loop's AdamW update. Captions fill the preset's ``text.max_length``.

The models are randomly initialised (no hub weights: ``--preset base`` runs offline, with the
BERT-uncased vocabulary of the MiniLM package, see :func:`random_init_preset`).

    python benchmarks/pretrain_step.py --preset tiny --batch-size 32 --steps 20

``benchmarks/pretrain_throughput.py`` and ``benchmarks/gpu_check.py`` build their batches and
steps with the functions here.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from typing import Callable

import torch

import codis  # noqa: F401
from codis.config import ModelConfig, preset
from codis.model import CodisModel
from codis.text import mask_tokens, mlm_positions, tokenize
from codis.train import OptimConfig, autocast
from codis.train.engine import build_optimizer
from codis.transforms import normalize_on_device

WORDS = "red green blue yellow circle square triangle star left right above below small large".split()


def random_init_preset(name: str, mode: str = "codis") -> ModelConfig:
    """Preset ``name`` with random weights and a local tokenizer, so that it builds offline.

    Hub weights do not change a step's cost. The text tokenizer stays the preset's where it names
    one, else it is the MiniLM package's (``text.tokenizer="minilm"``): BERT uncased, the same
    30,522 entries as bert-base-uncased, so the MLM head keeps its size."""
    config = preset(name, mode=mode)
    text = config.text
    if text.pretrained is not None:
        text = dataclasses.replace(text, pretrained=None, tokenizer=text.tokenizer or "minilm")
    return config.replace(vision=dataclasses.replace(config.vision, pretrained=None), text=text)


def make_batch(model: CodisModel, batch_size: int, device: torch.device, seed: int = 0,
               ) -> dict[str, torch.Tensor]:
    """A pretraining batch as the loader gives it, on ``device``: uint8 images, captions of exactly
    ``text.max_length`` tokens, and the MLM mask drawn on the CPU (``mlm_ids``, ``mlm_labels``,
    ``mlm_positions``)."""
    config = model.config
    length = config.text.max_length
    generator = torch.Generator().manual_seed(seed)
    # More words than tokens, so that truncation makes every caption exactly max_length long.
    captions = [" ".join(WORDS[j] for j in torch.randint(len(WORDS), (length,), generator=generator))
                for _ in range(batch_size)]
    ids, mask = tokenize(model.tokenizer, captions, length)
    if tuple(ids.shape) != (batch_size, length) or not bool(mask.all()):
        raise RuntimeError(f"captions did not fill {length} tokens: {tuple(ids.shape)}")
    masked, labels = mask_tokens(ids, model.tokenizer, config.mlm_probability, generator=generator)
    size = config.vision.image_size
    images = torch.randint(0, 256, (batch_size, 3, size, size), generator=generator,
                           dtype=torch.uint8)
    batch = {"image": images, "input_ids": ids, "attention_mask": mask, "mlm_ids": masked,
             "mlm_labels": labels, "mlm_positions": mlm_positions(labels)}
    return {key: value.to(device) for key, value in batch.items()}


def build(config: ModelConfig, device: torch.device) -> tuple[CodisModel, torch.optim.Optimizer]:
    """The model in training mode on ``device`` and the training loop's optimiser for it."""
    model = CodisModel(config).to(device).train()
    return model, build_optimizer(model, OptimConfig())


def forward(model: CodisModel, batch: dict[str, torch.Tensor]):
    """The training step's forward on ``batch`` (see :func:`make_batch`)."""
    return model(normalize_on_device(batch["image"]), batch["input_ids"], batch["attention_mask"],
                 mlm_inputs=(batch["mlm_ids"], batch["mlm_labels"], batch["mlm_positions"]))


def train_step(model: CodisModel, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               precision: str, read_metrics: bool = False):
    """One optimisation step as ``codis.train.fit`` runs it, under ``precision`` ("fp32" or
    "bf16" autocast); returns the forward's output. ``read_metrics``: :func:`metric_values` at
    every step, as the loop did before issue 13."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(precision, batch["image"].device):
        output = forward(model, batch)
        output.loss.backward()
    optimizer.step()
    if read_metrics:
        metric_values(output)
    return output


def metric_values(output) -> dict[str, float]:
    """The loss and each of its parts as a float: one read from the device each."""
    return {name: float(value)
            for name, value in [("loss", output.loss.detach()), *output.parts.items()]}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], None], device: torch.device) -> float:
    """Seconds ``function`` takes, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--modes", default="albef,albef_intra,codis")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    modes = args.modes.split(",")

    models, optimizers = {}, {}
    for mode in modes:
        torch.manual_seed(0)
        models[mode], optimizers[mode] = build(random_init_preset(args.preset, mode), device)
    batch = make_batch(models[modes[0]], args.batch_size, device)

    def step(mode: str) -> float:
        return timed(lambda: train_step(models[mode], optimizers[mode], batch, precision), device)

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
    print(f"overhead of {modes[-1]} over {modes[0]}: {overhead:+.1%} (target <= +5% at tiny, issue 13)")


if __name__ == "__main__":
    main()
