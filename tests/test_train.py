import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from codis.config import ConfigError, LossWeights, preset
from codis.model import CodisModel, PretrainOutput, load_model
from codis.data.shards import write_shards
from codis.train import (DataConfig, OptimConfig, PretrainConfig, Runtime, TrainConfig,
                         distillation_alpha, fit, latest_checkpoint, learning_rate, pretrain)
from codis.train import engine as train_engine
from codis.train.engine import _check_resumable, _to_device, build_optimizer
from codis.train.syncs import count_syncs

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


# ---- the loop's step: syncs, metrics, optimiser, DDP, compile, batches, resume ---------------------
def _stub_batches(rows: int, batch_size: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(rows, 4, generator=generator), torch.randn(rows, 1, generator=generator)
    return [{"x": x[i:i + batch_size], "y": y[i:i + batch_size]} for i in range(0, rows, batch_size)]


def _stub_step(trained: torch.nn.Module, batch: dict, step: int) -> PretrainOutput:
    """A regression step reporting parts as the real ones do: a tensor of the step and a CPU one."""
    error = trained(batch["x"]) - batch["y"]
    return PretrainOutput(error.pow(2).mean(), {"mae": error.abs().mean().detach(),
                                                "alpha": torch.tensor(0.25)})


def _stub_fit(output: Path, batches: list[dict], step_loss=_stub_step, runtime: Runtime | None = None,
              **train) -> tuple[torch.nn.Module, list]:
    """``fit`` of a 4 -> 1 linear model over ``batches`` (every epoch the same), logging into a list."""
    settings = dict(steps=4, batch_size=len(batches[0]["x"]), log_every=100, checkpoint_every=100)
    torch.manual_seed(0)
    model, seen = torch.nn.Linear(4, 1), []
    fit(model, step_loss, lambda epoch: batches, run_config={"stub": 1},
        train=TrainConfig(**{**settings, **train}), optim=OptimConfig(lr=0.01, warmup_steps=1),
        output_dir=output, runtime=runtime or Runtime(torch.device("cpu")), progress=False,
        callback=lambda step, metrics: seen.append((step, metrics)))
    return model, seen


def _syncs_per_step(marks: list, calls_per_step: int) -> list[Counter]:
    """The sync sites between the first ``step_loss`` call of one step and of the next."""
    firsts = marks[::calls_per_step]
    return [after - before for before, after in zip(firsts, firsts[1:])]


def test_fit_reads_metrics_in_one_sync_on_logged_steps_only_with_the_micro_batch_means(tmp_path):
    losses, marks = [], []
    with count_syncs() as report:
        def step_loss(trained, batch, step):
            marks.append(report.sites.copy())
            output = _stub_step(trained, batch, step)
            losses.append(output.loss.detach())
            return output
        _, seen = _stub_fit(tmp_path, _stub_batches(64, 4), step_loss, steps=4, log_every=2,
                            grad_accumulation=2, clip_grad_norm=1.0)
    # steps 1 and 3 (0-based) are logged; the interval after the last one holds the final checkpoint
    assert [sum(sites.values()) for sites in _syncs_per_step(marks, 2)] == [0, 1, 0], \
        _syncs_per_step(marks, 2)
    assert [step for step, _ in seen] == [2, 4]
    for (_, metrics), first in zip(seen, (2, 6)):
        assert set(metrics) == {"loss", "mae", "alpha", "grad_norm", "lr", "skipped_samples",
                                "samples_per_s"}
        # what fit computed on the host before: float(part) / accumulation, summed in Python
        assert metrics["loss"] == float(losses[first]) / 2 + float(losses[first + 1]) / 2
        assert metrics["alpha"] == 0.25 and metrics["grad_norm"] > 0


def test_a_tiny_model_pretraining_step_in_fit_syncs_only_to_log(tmp_path, caption_shards):
    from codis.data.loaders import pretrain_loader

    torch.manual_seed(0)
    model = CodisModel(preset("tiny", queue_size=32))
    loader = pretrain_loader(str(caption_shards), tokenizer=model.tokenizer, batch_size=8,
                             image_size=model.config.vision.image_size, shuffle_buffer=4, seed=0,
                             mlm_probability=model.config.mlm_probability)
    batches = list(loader)  # decoded before counting: a loader worker's work is not the step's
    marks = []

    def step_loss(trained, batch, step):  # pretraining's
        marks.append(report.sites.copy())
        return trained(batch["image"], batch["input_ids"], batch["attention_mask"], alpha=0.4,
                       mlm_inputs=(batch["mlm_ids"], batch["mlm_labels"], batch["mlm_positions"]))

    with count_syncs() as report:
        fit(model, step_loss, lambda epoch: batches, run_config={}, progress=False,
            train=TrainConfig(steps=5, batch_size=8, log_every=3, checkpoint_every=100),
            optim=OptimConfig(), output_dir=tmp_path, runtime=Runtime(torch.device("cpu")))
    # the queue (32) fills over the first four steps, then is full; the third step is logged
    per_step = _syncs_per_step(marks, 1)
    assert [sum(sites.values()) for sites in per_step] == [0, 0, 1, 0], per_step
    (site,) = per_step[2]
    assert "codis/train/engine.py:" in site and site.endswith("tolist"), site


def test_build_optimizer_is_fused_keeps_the_groups_and_matches_the_reference_adamw():
    torch.manual_seed(0)
    config = preset("tiny", temperature_parameter="raw")
    model, reference_model = CodisModel(config), CodisModel(config)
    reference_model.load_state_dict(model.state_dict())
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.05))
    assert all(group["fused"] for group in optimizer.param_groups)
    decays = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert decays[id(model.temp)] == 0.05  # decayed_scalars (ALBEF's grouping) kept
    assert decays[id(model.visual_encoder.blocks[0].norm1.weight)] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    reference_parameters = dict(reference_model.named_parameters())
    reference = torch.optim.AdamW(
        [{"params": [reference_parameters[names[id(p)]] for p in group["params"]],
          "weight_decay": group["weight_decay"]} for group in optimizer.param_groups],
        lr=1e-3, foreach=False, fused=False)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.grad = torch.randn(parameter.shape, generator=generator)
                reference_parameters[name].grad = parameter.grad.clone()
        optimizer.step()
        reference.step()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter, reference_parameters[name], rtol=0, atol=1e-6,
                                   msg=name)
        assert not torch.equal(parameter, initial[name]) or not parameter.requires_grad, name


def test_vision_lr_scale_moves_the_image_encoder_by_that_fraction_of_the_rest(tmp_path):
    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual_encoder, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.visual_encoder(x))

    def step_loss(trained, batch, step):
        return PretrainOutput((trained(batch["x"]) - batch["y"]).pow(2).mean(), {})

    moved = {}
    for scale in (1.0, 0.25):
        torch.manual_seed(0)
        model = Tower()
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        fit(model, step_loss, lambda epoch: _stub_batches(8, 8), run_config={"stub": 1},
            train=TrainConfig(steps=1, batch_size=8, log_every=100, checkpoint_every=100),
            optim=OptimConfig(lr=0.01, warmup_steps=0, weight_decay=0.0, vision_lr_scale=scale),
            output_dir=tmp_path / str(scale), runtime=Runtime(torch.device("cpu")), progress=False)
        moved[scale] = {name: (p.detach() - before[name]).abs() for name, p in model.named_parameters()}
    # AdamW's first step moves every weight by its learning rate (sign of the gradient)
    for name, change in moved[0.25].items():
        expected = moved[1.0][name] * (0.25 if name.startswith("visual_encoder.") else 1.0)
        torch.testing.assert_close(change, expected, rtol=1e-4, atol=1e-7, msg=name)
    assert moved[1.0]["visual_encoder.weight"].min() > 0.009
    optimizer = build_optimizer(Tower(), OptimConfig(weight_decay=0.05, vision_lr_scale=0.5))
    groups = sorted((g.get("lr_scale", 1.0), g["weight_decay"], len(g["params"]))
                    for g in optimizer.param_groups)
    assert groups == [(0.5, 0.0, 1), (0.5, 0.05, 1), (1.0, 0.0, 1), (1.0, 0.05, 1)]
    with pytest.raises(ConfigError, match="optim.vision_lr_scale"):
        OptimConfig(vision_lr_scale=0.0)


def test_uint8_images_reach_the_device_as_the_float_transform_made_them():
    import torchvision.transforms as T
    from codis.transforms import MEAN, STD

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 2, 3, 8, 8), dtype=torch.uint8, generator=generator)
    old = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    expected = torch.stack([torch.stack([old(Image.fromarray(image.permute(1, 2, 0).numpy()))
                                         for image in pair]) for pair in images])
    ids = torch.arange(6).view(2, 3)
    batch = _to_device({"image": images[:, 0], "images": images, "input_ids": ids,
                        "features": images[:, 0].float(), "key": ["a", "b"]}, torch.device("cpu"))
    assert batch["image"].dtype == batch["images"].dtype == torch.float32
    torch.testing.assert_close(batch["image"], expected[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(batch["images"], expected, rtol=0, atol=1e-6)
    assert torch.equal(batch["input_ids"], ids) and batch["key"] == ["a", "b"]
    assert torch.equal(batch["features"], images[:, 0].float())  # not an image key: untouched


def test_resuming_with_another_world_size_is_refused_older_states_are_not(tmp_path):
    batches = _stub_batches(32, 4)
    _stub_fit(tmp_path, batches, steps=2)
    with pytest.raises(ConfigError, match="world size 1.*this one has world size 2"):
        _stub_fit(tmp_path, batches, steps=4, runtime=Runtime(torch.device("cpu"), world_size=2))
    path = latest_checkpoint(tmp_path / "checkpoints")
    state = torch.load(path, weights_only=True)
    assert state["world_size"] == 1
    del state["world_size"]  # a state written before the world size was saved
    _check_resumable(state, {"stub": 1}, path, world_size=2)


def test_train_compile_takes_a_mode_and_reads_the_old_booleans():
    assert TrainConfig().compile == "off"
    assert TrainConfig(compile=False).compile == "off" and TrainConfig(compile=True).compile == "full"
    assert TrainConfig(compile="regional").compile == "regional"
    with pytest.raises(ConfigError, match="train.compile"):
        TrainConfig(compile="fast")


@pytest.mark.slow
def test_regional_compile_trains_to_the_eager_losses(tmp_path, caption_shards, monkeypatch):
    compiled = []

    def counting(model):
        compiled.append(regions(model))
        return compiled[-1]
    regions = train_engine.compile_regions
    monkeypatch.setattr(train_engine, "compile_regions", counting)
    losses = {}
    for mode in ("off", "regional"):
        seen = []
        pretrain(run_config(tmp_path / mode, caption_shards, steps=2, compile=mode),
                 progress=False, callback=lambda step, metrics: seen.append(metrics["loss"]))
        losses[mode] = seen
    # students and teachers: 2 ViT blocks, 1 text and 2 fusion layers each
    assert compiled == [10]
    assert losses["regional"] == pytest.approx(losses["off"], rel=0, abs=1e-4)


def _fit_worker(rank: int, world: int, port: int, output: Path, shares, results) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for accumulation, batches in shares.items():
        model, _ = _stub_fit(output / str(accumulation), batches[rank], steps=3,
                             grad_accumulation=accumulation,
                             runtime=Runtime(torch.device("cpu"), rank=rank, world_size=world))
        results[rank, accumulation] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dist.destroy_process_group()


@pytest.mark.slow
def test_fit_in_two_gloo_processes_matches_one_process_with_the_full_batch(tmp_path):
    full = _stub_batches(24, 8)  # 3 steps of 8
    single, _ = _stub_fit(tmp_path / "single", full, steps=3)
    # without accumulation rank r takes rows 4r..4r+3 of each step's batch (DDP's static graph);
    # with 2 micro-batches (no_sync for the first), rows 4r+2m, 4r+2m+1 in micro-batch m
    shares = {accumulation: [[{k: v[4 * rank + size * micro:][:size] for k, v in batch.items()}
                              for batch in full for micro in range(accumulation)]
                             for rank in (0, 1)]
              for accumulation, size in ((1, 4), (2, 2))}
    results = mp.Manager().dict()
    mp.spawn(_fit_worker, args=(2, _free_port(), tmp_path / "ddp", shares, results), nprocs=2,
             join=True)
    for (rank, accumulation), state in results.items():
        for name, value in single.state_dict().items():
            torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6,
                                       msg=f"rank {rank}, accumulation {accumulation}: {name}")
    assert len(results) == 4


def test_a_resumed_run_decodes_only_the_batches_it_trains_on(tmp_path, caption_shards,
                                                               transform_calls):
    # The checkpoint's data position holds the loader's stream position: a resumed run drops the
    # samples it consumed before decoding them. An older position ({epoch, batch} only) replays
    # the consumed batches instead, and both reach the same weights.
    decoded = transform_calls
    config = run_config(tmp_path / "run", caption_shards, steps=6)  # batches of 8, 6 per epoch
    checkpoints = tmp_path / "run" / "checkpoints"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads may sum a CPU backward in either order: not bitwise
    try:
        pretrain(config, progress=False, stop_after=4)
        saved = checkpoints / "step-00000004.pt"
        state = torch.load(saved, weights_only=True)
        assert state["position"]["epoch"] == 0 and state["position"]["batch"] == 4
        assert [len(s["workers"]) for s in state["position"]["streams"]] == [1]
        weights = {}
        for form in ("replayed", "streamed"):
            if form == "replayed":
                torch.save({**state, "position": {"epoch": 0, "batch": 4}}, saved)
            else:
                torch.save(state, saved)
                (checkpoints / "step-00000006.pt").unlink()
            decoded.value = 0
            final = pretrain(config, progress=False)
            assert decoded.value == 8 * (2 if form == "streamed" else 6), form
            weights[form] = load_model(final).state_dict()
    finally:
        torch.set_num_threads(threads)
    for name, value in weights["streamed"].items():
        assert torch.equal(value, weights["replayed"][name]), name


def _stream_worker(rank: int, world: int, port: int, shards: Path, results) -> None:
    import torch.distributed as dist
    from codis.data.loaders import pretrain_loader
    from codis.text import load_tokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))  # as torchrun sets them: the shards split by rank
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tokenizer = load_tokenizer("builtin")

    def open_epoch(epoch: int):
        return pretrain_loader(str(shards), tokenizer=tokenizer, image_size=16, batch_size=4,
                               seed=1, epoch=epoch, shuffle_buffer=8)

    runtime = Runtime(torch.device("cpu"), rank=rank, world_size=world)
    straight = train_engine.EpochBatches(open_epoch, runtime)
    for _ in range(3):
        straight.next()
    position = straight.position()  # every rank's stream, gathered
    # rank 1 reads one shard of the three (4 batches): both ranks go on into epoch 1 together
    expected = [straight.next()["key"] for _ in range(4)]
    resumed = train_engine.EpochBatches(open_epoch, runtime, **position)
    results[rank] = (position, expected, [resumed.next()["key"] for _ in range(4)])
    dist.destroy_process_group()


@pytest.mark.slow
def test_each_rank_resumes_its_own_stream(tmp_path, caption_shards):
    results = mp.Manager().dict()
    mp.spawn(_stream_worker, args=(2, _free_port(), caption_shards, results), nprocs=2, join=True)
    assert results[0][0] == results[1][0]  # the position holds both ranks' streams
    assert [stream["workers"] for stream in results[0][0]["streams"]] == [[[12, 0]], [[12, 0]]]
    for rank in (0, 1):
        _, expected, resumed = results[rank]
        assert resumed == expected
    assert not set(sum(results[0][1][:1], [])) & set(sum(results[1][1][:1], []))
