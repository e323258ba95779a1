import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from codis.config import ConfigError, LossWeights, preset
from codis.model import CodisModel, load_model
from codis.data.shards import write_shards
from codis.train import (DataConfig, OptimConfig, PretrainConfig, TrainConfig, distillation_alpha,
                         latest_checkpoint, learning_rate, pretrain)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "circle")


# Not the shared tiny_world's shards: the pretraining tests' step counts and queue size are set
# for these 48 pairs with distinct captions (6 batches of 8 per epoch), which cost nothing to draw.
@pytest.fixture(scope="module")
def caption_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("captions")
    records = []
    for index in range(48):
        colour = list(COLOURS)[index % 4]
        shape = SHAPES[(index // 4) % 2]
        image = Image.new("RGB", (40, 40), (index * 5 % 255, 90, 120))
        from PIL import ImageDraw
        draw = ImageDraw.Draw(image)
        box = (8 + index % 7, 8, 30, 30 - index % 5)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
        image.save(root / f"{index:03d}.jpg", quality=90)
        records.append({"image": f"{index:03d}.jpg", "caption": f"a {colour} {shape} number {index}"})
    write_shards(records, root, root / "shards", kind="pretrain", samples_per_shard=16, progress=False)
    return root / "shards"


def run_config(output: Path, shards: Path, **train) -> PretrainConfig:
    settings = dict(steps=6, batch_size=8, alpha_warmup_steps=3, checkpoint_every=2, log_every=1,
                    seed=3)
    settings.update(train)
    return PretrainConfig(
        output_dir=str(output), model=preset("tiny", queue_size=32),
        data=DataConfig(shards=(str(shards),), num_workers=0, shuffle_buffer=16, hflip=False),
        train=TrainConfig(**settings), optim=OptimConfig(warmup_steps=2, lr=1e-3))


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    config = OptimConfig(lr=1e-4, warmup_lr=1e-5, warmup_steps=10, min_lr=1e-6)
    assert learning_rate(0, 110, config) == pytest.approx(1e-5)
    assert learning_rate(5, 110, config) == pytest.approx(5.5e-5)
    assert learning_rate(10, 110, config) == pytest.approx(1e-4)
    assert learning_rate(60, 110, config) == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6))
    assert learning_rate(110, 110, config) == pytest.approx(1e-6)
    values = [learning_rate(s, 110, config) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_alpha_ramps_up_over_the_warmup_then_stays():
    assert distillation_alpha(0, 0.4, 100) == 0.0
    assert distillation_alpha(50, 0.4, 100) == pytest.approx(0.2)
    assert distillation_alpha(500, 0.4, 100) == pytest.approx(0.4)
    assert distillation_alpha(0, 0.4, 0) == 0.4


def test_run_config_round_trips_and_bad_fields_are_named(tmp_path, caption_shards):
    config = run_config(tmp_path / "run", caption_shards)
    path = config.save(tmp_path / "run.yaml")
    assert PretrainConfig.load(path) == config
    data = config.to_dict()
    data["train"]["batch_sise"] = 4
    with pytest.raises(ConfigError, match=r"train\.batch_sise: unknown field"):
        PretrainConfig.from_dict(data)
    with pytest.raises(ConfigError, match=r"data\.shards"):
        DataConfig(shards=())
    preset_form = PretrainConfig.from_dict({"output_dir": "x", "data": {"shards": ["a"]},
                                            "model": {"preset": "tiny", "mode": "albef"}})
    assert preset_form.model == preset("tiny", mode="albef")


def test_pretrain_writes_checkpoints_metrics_and_a_loadable_model(tmp_path, caption_shards):
    seen = []
    final = pretrain(run_config(tmp_path / "run", caption_shards), progress=False,
                     callback=lambda step, metrics: seen.append((step, metrics)))
    assert [step for step, _ in seen] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "ica", "itm", "mlm", "code", "lr", "alpha", "samples_per_s"} <= set(seen[-1][1])
    assert seen[0][1]["alpha"] == 0.0 and seen[-1][1]["alpha"] == pytest.approx(0.4)
    assert all(math.isfinite(m["loss"]) for _, m in seen)
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000004.pt", "step-00000006.pt"]  # the last two are kept
    model = load_model(final)
    assert model.config == preset("tiny", queue_size=32) and int(model.queue.filled) == 32


def _train_process(config_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "codis.cli", "pretrain", "--config",
                             str(config_path), "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path, caption_shards):
    torch.set_num_threads(1)
    straight = run_config(tmp_path / "straight", caption_shards, steps=10, checkpoint_every=3)
    killed = run_config(tmp_path / "killed", caption_shards, steps=10, checkpoint_every=3)
    straight_path = straight.save(tmp_path / "straight.yaml")
    killed_path = killed.save(tmp_path / "killed.yaml")
    assert _train_process(straight_path).wait(timeout=300) == 0

    process = _train_process(killed_path)
    deadline = time.time() + 300
    while latest_checkpoint(tmp_path / "killed" / "checkpoints") is None:
        assert process.poll() is None and time.time() < deadline, process.stdout.read().decode()
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # mid-run, no chance to clean up
    process.wait()
    interrupted_at = int(latest_checkpoint(tmp_path / "killed" / "checkpoints").stem.split("-")[1])
    assert interrupted_at < 10 and not (tmp_path / "killed" / "model.pt").exists()
    leftovers = [p for p in (tmp_path / "killed" / "checkpoints").iterdir() if p.suffix != ".pt"]
    assert all(p.name.startswith(".") for p in leftovers)  # at most a hidden temporary

    resumed = _train_process(killed_path)
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read().decode()
    a = load_model(tmp_path / "straight" / "model.pt").state_dict()
    b = load_model(tmp_path / "killed" / "model.pt").state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resuming_with_a_different_model_section_is_refused(tmp_path, caption_shards):
    config = run_config(tmp_path / "run", caption_shards, steps=4)
    pretrain(config, progress=False, stop_after=2)
    changed = PretrainConfig(output_dir=config.output_dir, data=config.data, train=config.train,
                             optim=config.optim, model=preset("tiny", queue_size=32, mode="albef"))
    with pytest.raises(ConfigError, match="different `model` section"):
        pretrain(changed, progress=False)


# ---- DDP: 2 processes x B/2 == 1 process x B ------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_step(batch, world: int, rank: int):
    torch.manual_seed(0)
    config = preset("tiny", queue_size=24, loss_weights=LossWeights(itm=0.0, mlm=0.0))
    model = CodisModel(config).eval()  # eval: no dropout, so both set-ups compute the same function
    trained = model
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    images, ids, mask = batch
    for step in range(2):  # the second step sees the first one's features in the queue
        share = images.shape[0] // world
        rows = slice(rank * share, (rank + 1) * share)
        output = trained(images[rows], ids[rows], mask[rows], alpha=0.4)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ddp_worker(rank: int, world: int, port: int, batch, results) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results[rank] = _one_step(batch, world, rank)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_with_half_batches_match_one_process_with_the_full_batch():
    from codis.text import load_tokenizer, tokenize

    torch.manual_seed(1)
    tokenizer = load_tokenizer("builtin")
    captions = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    ids, mask = tokenize(tokenizer, captions, 30)
    size = preset("tiny").vision.image_size
    batch = (torch.randn(8, 3, size, size), ids, mask)
    single = _one_step(batch, world=1, rank=0)
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), batch, results), nprocs=2, join=True)
    for rank in (0, 1):
        for name, value in single.items():
            torch.testing.assert_close(results[rank][name], value, rtol=1e-4, atol=1e-5,
                                       msg=f"rank {rank}: {name}")


def test_itm_negatives_are_uniform_for_the_first_steps_then_hard(tmp_path, caption_shards, monkeypatch):
    import codis.losses as losses
    drawn_from_equal_similarities = []
    original = losses.hard_negative_indices

    def recording(sim_i2t, sim_t2i, *args, **kwargs):
        drawn_from_equal_similarities.append(bool((sim_i2t == sim_i2t[0, 0]).all()))
        return original(sim_i2t, sim_t2i, *args, **kwargs)

    monkeypatch.setattr(losses, "hard_negative_indices", recording)
    pretrain(run_config(tmp_path / "run", caption_shards, steps=4, itm_uniform_negative_steps=2),
             progress=False)
    assert drawn_from_equal_similarities == [True, True, False, False]
    with pytest.raises(ConfigError, match="train.itm_uniform_negative_steps"):
        TrainConfig(itm_uniform_negative_steps=-1)
