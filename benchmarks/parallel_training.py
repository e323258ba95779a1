"""One training with every CPU thread against several trainings side by side with a share each:
the measurement behind a recipe's ``parallel_variants`` (the demo's 2).

Each training is the real pretraining loop (``codis.train.pretrain``: the shard loader decoding
JPEGs in the training process, as the demo's ``num_workers: 0`` does, the ``tiny`` model, AdamW)
on a small generated demo world at 64 px, in its own process with ``OMP_NUM_THREADS`` set. The
steps after ``--warmup`` are timed from the metrics callback's clock, so process start-up and
the first steps do not count. The configurations alternate for ``--rounds`` rounds, so a machine
that other jobs load slows all of them alike; the medians are printed.

    python benchmarks/parallel_training.py                      # 2 trainings x 1 thread vs 1 x 2
    python benchmarks/parallel_training.py --parallel 4 --steps 60
    python benchmarks/parallel_training.py --compile            # side by side, eager vs regional

``--compile`` compares the side-by-side trainings eager and with ``train.compile: regional``
instead (each process compiles anew; the first step, which compiles, is printed apart).

``speed-up`` is the steps per second of all side-by-side trainings together over the one
training's steps per second: above 1, running variants side by side finishes sooner.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))


def make_shards(folder: Path, images: int) -> Path:
    """Pretraining shards of a generated demo world with ``images`` images (2 captions each)."""
    from codis.data.demo_world import DemoWorldConfig, generate_demo_world
    from codis.data.shards import write_shards

    world = folder / "world"
    generate_demo_world(world, DemoWorldConfig(
        pretrain_images=images, retrieval_images={"train": 2, "val": 1, "test": 2},
        vqa_images={"train": 2, "val": 1, "test": 1}, nlvr_pairs={"train": 2, "dev": 1, "test": 1},
        ve_images={"train": 2, "dev": 1, "test": 1},
        classification_images={"train": 2, "val": 1}, dead_urls=0, non_image_urls=0),
        progress=False)
    records = json.loads((world / "pretrain" / "captions.json").read_text())
    shards = folder / "shards"
    write_shards(records, world, shards, kind="pretrain", samples_per_shard=500, progress=False)
    return shards


def child(shards: str, output: str, steps: int, warmup: int, batch_size: int, mode: str,
          compile_mode: str) -> None:
    """One training; prints ``{"steps_per_s": ...}`` over the steps after ``warmup`` and the
    seconds from its start to the end of the first step (``first_step_s``)."""
    from codis.config import preset
    from codis.train import DataConfig, OptimConfig, PretrainConfig, TrainConfig, pretrain

    model = preset("tiny", mode=mode)  # the demo's model: the conv stem
    config = PretrainConfig(
        output_dir=output, model=model.replace(vision=dataclasses.replace(model.vision, stem="conv")),
        data=DataConfig(shards=(shards,), num_workers=0, hflip=False, crop_min_scale=0.8),
        train=TrainConfig(steps=steps, batch_size=batch_size, log_every=1,
                          checkpoint_every=10 * steps, compile=compile_mode),
        optim=OptimConfig(lr=1e-3, warmup_steps=5))
    clock: dict[int, float] = {}
    started = time.perf_counter()
    pretrain(config, resume=False, progress=False,
             callback=lambda step, metrics: clock.__setitem__(step, time.perf_counter()))
    print(json.dumps({"steps_per_s": (steps - warmup) / (clock[steps] - clock[warmup]),
                      "first_step_s": clock[1] - started}))


def trainings(count: int, threads: int, args: argparse.Namespace, shards: Path,
              scratch: Path, compile_mode: str = "off") -> list[dict[str, float]]:
    """What :func:`child` prints for each of ``count`` trainings run at once with ``threads``
    threads."""
    from flows.launch import thread_environment

    env = {**os.environ, **thread_environment(threads)}
    processes = [subprocess.Popen(
        [sys.executable, __file__, "--child", str(shards), str(scratch / f"run-{time.time_ns()}"),
         "--steps", str(args.steps), "--warmup", str(args.warmup),
         "--batch-size", str(args.batch_size), "--mode", args.mode, "--compile-mode", compile_mode],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(count)]
    rates = []
    for process in processes:
        out, err = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"a training failed:\n{err[-2000:]}")
        rates.append(json.loads(out.strip().splitlines()[-1]))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parallel", type=int, default=2, help="trainings side by side")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of the one training (default: this machine's CPUs)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mode", default="codis")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile", action="store_true",
                        help="compare the side-by-side trainings eager and with regional compile")
    parser.add_argument("--child", nargs=2, metavar=("SHARDS", "OUTPUT"), help=argparse.SUPPRESS)
    parser.add_argument("--compile-mode", default="off", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.steps, args.warmup, args.batch_size, args.mode, args.compile_mode)
        return
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be between 0 and --steps")
    from flows.launch import cpu_threads

    cpus = cpu_threads()
    threads = args.threads or cpus
    shared = max(1, threads // args.parallel)
    print(f"{cpus} CPUs; tiny preset, conv stem, batch {args.batch_size}, {args.mode} mode, "
          f"{args.steps - args.warmup} timed steps, {args.rounds} rounds (medians)")
    with tempfile.TemporaryDirectory() as scratch:
        shards = make_shards(Path(scratch), args.images)
        if args.compile:
            compare_compile(args, shared, shards, Path(scratch))
            return
        one, side = [], []
        for _ in range(args.rounds):
            one += [r["steps_per_s"] for r in trainings(1, threads, args, shards, Path(scratch))]
            side.append(sum(r["steps_per_s"]
                            for r in trainings(args.parallel, shared, args, shards, Path(scratch))))
    solo, together = statistics.median(one), statistics.median(side)
    print(f"1 training x {threads} threads:       {solo:6.2f} steps/s")
    print(f"{args.parallel} trainings x {shared} thread(s) each: {together:6.2f} steps/s together "
          f"({together / args.parallel:.2f} each)")
    print(f"speed-up of side by side: {together / solo:.2f}x")


def compare_compile(args: argparse.Namespace, threads: int, shards: Path, scratch: Path) -> None:
    """``args.parallel`` trainings side by side, eager and with regional compile, alternating."""
    results: dict[str, list[list[dict[str, float]]]] = {"off": [], "regional": []}
    for _ in range(args.rounds):
        for mode in results:
            results[mode].append(trainings(args.parallel, threads, args, shards, scratch, mode))
    rate = {mode: statistics.median(sum(r["steps_per_s"] for r in round_) for round_ in rounds)
            for mode, rounds in results.items()}
    for mode, rounds in results.items():
        first = [r["first_step_s"] for round_ in rounds for r in round_]
        print(f"{args.parallel} trainings x {threads} thread(s), compile {mode:<8}: "
              f"{rate[mode]:6.2f} steps/s together; start + first step {min(first):.1f}-"
              f"{max(first):.1f} s")
    print(f"regional over eager, after the first steps: {rate['regional'] / rate['off']:.2f}x "
          "(the first round compiles into an empty inductor cache only if it is empty)")


if __name__ == "__main__":
    main()
