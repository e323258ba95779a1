"""Recipes (pipelines/*.yaml): every shipped recipe validates, mistakes name their field before any
work, the learning rate follows the global batch, and the torchrun command is what torchrun parses."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

import codis  # noqa: F401
from codis.data.demo_world import DemoWorldConfig
from codis.data.manifest import read_annotations, shard_files
from codis.data.shards import write_shards
from codis.train import OptimConfig, TrainConfig, schedules
from flows import launch
from flows import recipe as recipes
from flows.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "pipelines").glob("*.yaml"))


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def demo_data() -> dict:
    return yaml.safe_load((REPO / "pipelines" / "demo.yaml").read_text(encoding="utf-8"))


def error_of(tmp_path: Path, data: dict) -> str:
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path / "recipe.yaml", data))
    return str(caught.value)


def test_the_shipped_recipes_are_there_and_validate() -> None:
    names = {p.stem for p in RECIPES}
    assert {"demo", "codis-4m", "albef-4m", "ablation-objectives", "ablation-codebook"} <= names
    for path in RECIPES:
        recipe = load_recipe(path)
        assert recipe.name == path.stem
        for name, variant in recipe.variants.items():
            config = recipes.pretrain_config(recipe.pretrain, variant, ["x.tar"], "/tmp/out",
                                             recipe.steps_scale)
            assert config.data.shards == ("x.tar",)
            assert config.model.mode in codis.config.MODES


def test_demo_recipe_compares_codis_with_albef_on_cpu() -> None:
    recipe = load_recipe(REPO / "pipelines" / "demo.yaml")
    modes = {name: recipes.model_config(v).mode for name, v in recipe.variants.items()}
    assert sorted(modes.values()) == ["albef", "codis"]
    assert {v.preset for v in recipe.variants.values()} == {"tiny"}
    assert recipe.demo_world is not None
    assert {t.task for t in recipe.tasks} == {"retrieval", "vqa", "nlvr", "ve"}
    assert recipe.pretrain.nodes * recipe.pretrain.gpus_per_node == 1
    assert launch.launcher(recipe.pretrain) == "inprocess"
    assert recipe.champion_metric == "retrieval.demo.zs.r_mean"
    # the demo's crop scale reaches the engine; the paper recipes keep ALBEF's 0.2
    config = recipes.pretrain_config(recipe.pretrain, recipe.variants["codis"], ["x.tar"], "/out")
    assert config.data.crop_min_scale == pytest.approx(0.8) and not config.data.hflip
    paper = load_recipe(REPO / "pipelines" / "codis-4m.yaml")
    paper_config = recipes.pretrain_config(paper.pretrain, paper.variants["codis"], ["x.tar"], "/out")
    assert paper_config.data.crop_min_scale == pytest.approx(0.2)
    # the demo's ViT starts from its vision_init (conv stem); the paper recipes from DeiT
    assert recipe.vision_init is not None and recipe.vision_init.annotations.startswith("demo://")
    assert recipes.vision_init_config(recipe).stem == "conv"
    assert paper.vision_init is None and paper_config.model.vision.pretrained.startswith("deit_")
    nlvr = next(t for t in recipe.tasks if t.task == "nlvr")
    assert recipes.task_config(nlvr).augment is False


def test_paper_recipes_use_albefs_settings() -> None:
    codis_4m = load_recipe(REPO / "pipelines" / "codis-4m.yaml")
    albef_4m = load_recipe(REPO / "pipelines" / "albef-4m.yaml")
    for recipe in (codis_4m, albef_4m):
        spec = recipe.pretrain
        (name, variant), = recipe.variants.items()
        assert variant.preset == "base"
        config = recipes.pretrain_config(spec, variant, ["x.tar"], "/out")
        assert (spec.nodes, spec.gpus_per_node, config.train.batch_size) == (1, 8, 64)
        assert schedules.global_batch(config.train, spec.nodes, spec.gpus_per_node) == 512
        assert config.optim.lr == pytest.approx(1e-4)
        assert config.model.vision.image_size == 256
        assert launch.launcher(spec) == "torchrun"
    assert recipes.model_config(codis_4m.variants["codis"]).mode == "codis"
    assert recipes.model_config(albef_4m.variants["albef"]).mode == "albef"
    # albef-4m inherits everything else, so its data stages have codis-4m's keys
    assert albef_4m.pretrain_data == codis_4m.pretrain_data
    assert albef_4m.tasks == codis_4m.tasks


def test_ablation_recipes_cover_the_papers_rows() -> None:
    objectives = load_recipe(REPO / "pipelines" / "ablation-objectives.yaml")
    assert sorted(recipes.model_config(v).mode for v in objectives.variants.values()) == sorted(
        codis.config.MODES)
    codebook = load_recipe(REPO / "pipelines" / "ablation-codebook.yaml")
    configs = {name: recipes.model_config(v) for name, v in codebook.variants.items()}
    sizes = {c.codebook.size for c in configs.values() if c.mode == "codis"}
    weights = {c.loss_weights.code for c in configs.values() if c.mode == "codis"}
    assert {500, 3000} <= sizes and {0.5, 1.0, 2.0} <= weights
    assert all(t.zero_shot and not t.finetune for t in objectives.tasks + codebook.tasks)


@pytest.mark.parametrize("change, field", [
    (lambda d: d.update(variantz=d.pop("variants")), "variantz"),
    (lambda d: d["variants"]["codis"]["model"].update(codebook={"sizee": 3}), "variants.codis.model.codebook.sizee"),
    (lambda d: d["pretrain"]["train"].update(stepz=3), "pretrain.train.stepz"),
    (lambda d: d["pretrain"]["train"].update(steps="ten"), "pretrain.train.steps"),
    (lambda d: d["pretrain"]["optim"].update(lr=-1.0), "optim.lr"),
    (lambda d: d["tasks"][0].update(config={"k_tst": 3}), "tasks.0.config.k_tst"),
    (lambda d: d["tasks"][0].update(train={"stepz": 3}), "tasks.0.train.stepz"),
    (lambda d: d["tasks"][1].update(evaluate_args={"answers": "x"}), "tasks.1.evaluate_args.answers"),
    (lambda d: d["tasks"][1].update(evaluate_args={"config": "x"}), "tasks.1.evaluate_args.config"),
    (lambda d: d["tasks"][1].update(zero_shot=True), "tasks.1.zero_shot"),
    (lambda d: d["tasks"][0].update(task="captioning"), "tasks.0.task"),
    (lambda d: d["pretrain_data"][0]["download"].update(thread_count=0), "thread_count"),
    (lambda d: d["demo_world"].update(pretrain_images="many"), "demo_world.pretrain_images"),
    (lambda d: d["report"].update(baseline_variant="clip"), "report.baseline_variant"),
    (lambda d: d["pretrain"].update(nodes=2), "pretrain.rdzv_endpoint"),
    (lambda d: d["variants"].update({"Bad Name": {"preset": "tiny"}}), "variants.Bad Name"),
])
def test_a_wrong_field_fails_naming_it(tmp_path: Path, change, field: str) -> None:
    data = demo_data()
    change(data)
    message = error_of(tmp_path, data)
    assert field in message, message
    assert "recipe.yaml" in message  # and the file


def test_demo_paths_need_a_demo_world(tmp_path: Path) -> None:
    data = demo_data()
    del data["demo_world"]
    assert "pretrain_data.0.url_list" in error_of(tmp_path, data)


def test_overrides_and_their_mistakes(tmp_path: Path) -> None:
    path = REPO / "pipelines" / "demo.yaml"
    recipe = load_recipe(path, ["pretrain.train.steps=7", "tasks.0.train={steps: 3}",
                                "variants.albef.model.codebook.size=8"])
    assert recipe.pretrain.train.steps == 7 and recipe.tasks[0].train == {"steps": 3}
    assert recipes.model_config(recipe.variants["albef"]).codebook.size == 8
    with pytest.raises(RecipeError, match="no list item 99"):
        load_recipe(path, ["tasks.99.train.steps=3"])
    with pytest.raises(RecipeError, match="dotted.path=value"):
        load_recipe(path, ["pretrain.train.steps"])


def test_compile_off_as_yaml_reads_it() -> None:
    # YAML 1.1 reads a bare off / on as a boolean, in a recipe file and in --set alike.
    recipe = load_recipe("demo", ["pretrain.train.compile=off", "tasks.nlvr.train.compile=off",
                                  "variants.albef.train={compile: on}"])
    assert recipe.pretrain.train.compile == "off"
    assert recipes.pretrain_train_config(recipe.pretrain, recipe.variants["albef"]).compile == "full"
    nlvr = next(t for t in recipe.tasks if t.task == "nlvr")
    assert recipes.task_schedule(nlvr, 12000)[0].compile == "off"
    with pytest.raises(RecipeError, match="pretrain.train.compile: must be off, regional or full"):
        load_recipe("demo", ["pretrain.train.compile=fast"])


def test_overrides_name_list_items_by_task_or_name(tmp_path: Path) -> None:
    recipe = load_recipe("demo", ["tasks.vqa.config.k_test=64", "tasks.ve.train.steps=9",
                                  "pretrain_data.demo-web.download.thread_count=2"])
    by_task = {t.task: t for t in recipe.tasks}
    assert by_task["vqa"].config["k_test"] == 64 and by_task["ve"].train == {"steps": 9}
    assert by_task["retrieval"].config == {} and recipe.pretrain_data[0].download.thread_count == 2
    with pytest.raises(RecipeError, match=r"'caption' names no item; use an index \(0-3\) or "
                                          r"one of: demo, nlvr, retrieval, ve, vqa"):
        load_recipe("demo", ["tasks.caption.train.steps=3"])
    data = demo_data()
    data["tasks"].append({**data["tasks"][0], "name": "other"})  # two retrieval tasks
    with pytest.raises(RecipeError, match="'retrieval' names several items"):
        load_recipe(write(tmp_path / "two.yaml", data), ["tasks.retrieval.train.steps=3"])
    # "other" is unique: a dataset name addresses its task
    assert load_recipe(tmp_path / "two.yaml", ["tasks.other.train.steps=3"]).tasks[-1].train == \
        {"steps": 3}


def test_shipped_recipes_by_name() -> None:
    assert {"demo", "quick", "codis-4m"} <= set(recipes.shipped_recipes())
    assert recipes.recipe_path("quick") == REPO / "pipelines" / "quick.yaml"
    assert recipes.recipe_path("pipelines/quick.yaml") == Path("pipelines/quick.yaml")
    assert recipes.shipped_name(REPO / "pipelines" / "quick.yaml") == "quick"
    assert recipes.shipped_name("elsewhere/quick.yaml") is None
    assert load_recipe("quick").name == "quick"


@pytest.mark.parametrize("margin, score, samples, expected", [
    (None, 50.0, 100, 10.0),     # 2 x 100 x sqrt(0.5 x 0.5 / 100)
    (None, 90.0, 400, 3.0),      # 2 x 100 x sqrt(0.9 x 0.1 / 400)
    (None, 100.0, 400, 0.0),     # a perfect score has no spread
    (None, 50.0, None, 0.0),     # unknown sample count
    (1.5, 50.0, 100, 1.5),       # the recipe's margin wins
])
def test_champion_margin_is_the_evaluations_spread_unless_set(margin, score, samples,
                                                              expected) -> None:
    recipe = load_recipe("demo", [] if margin is None else [f"tracking.champion_margin={margin}"])
    assert recipes.champion_margin(recipe, score, samples) == pytest.approx(expected)


def test_extends_replaces_whole_sections_and_refuses_loops(tmp_path: Path) -> None:
    base = demo_data()
    write(tmp_path / "base.yaml", base)
    child = write(tmp_path / "child.yaml", {"extends": "base.yaml", "name": "child",
                                            "variants": {"only": {"preset": "tiny"}},
                                            "report": {"title": "child"}})
    recipe = load_recipe(child)
    assert recipe.name == "child" and list(recipe.variants) == ["only"]
    assert recipe.tasks == load_recipe(tmp_path / "base.yaml").tasks
    write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(RecipeError, match="loops back"):
        load_recipe(tmp_path / "a.yaml")


def test_missing_inputs_are_named_before_any_work(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CODIS_DATA", raising=False)
    recipe = load_recipe(REPO / "pipelines" / "codis-4m.yaml")
    with pytest.raises(RecipeError) as caught:
        recipes.check_inputs(recipe)
    assert "pretrain_data.0.url_list: environment variable CODIS_DATA is not set" in str(caught.value)
    monkeypatch.setenv("CODIS_DATA", str(tmp_path))
    with pytest.raises(RecipeError) as caught:
        recipes.check_inputs(recipe)
    assert f"tasks.3.evaluate_args.answer_list: {tmp_path}/albef/answer_list.json does not exist" \
        in str(caught.value)
    with pytest.raises(RecipeError) as caught:
        recipes.check_inputs(load_recipe(REPO / "pipelines" / "albef-4m-finetune.yaml"))
    assert f"variants.albef.checkpoint: {tmp_path}/albef/ALBEF_4M.pth does not exist" \
        in str(caught.value)
    # the demo's inputs are produced by the run itself
    recipes.check_inputs(load_recipe(REPO / "pipelines" / "demo.yaml"))


# ---- learning rate and batch -------------------------------------------------------------------
def test_scaled_lr_is_linear_in_the_global_batch() -> None:
    assert schedules.scaled_lr(1e-4, 512, 512) == pytest.approx(1e-4)
    assert schedules.scaled_lr(1e-4, 512, 1024) == pytest.approx(2e-4)  # ALBEF on 16 GPUs
    assert schedules.scaled_lr(1e-4, 512, 128) == pytest.approx(2.5e-5)
    assert schedules.scaled_lr(3e-4, None, 4096) == 3e-4  # no reference: unchanged
    with pytest.raises(ValueError):
        schedules.scaled_lr(1e-4, 0, 512)


def test_global_batch_counts_accumulation_nodes_and_gpus() -> None:
    train = TrainConfig(batch_size=64, grad_accumulation=2)
    assert schedules.global_batch(train) == 128
    assert schedules.global_batch(train, nodes=2, gpus_per_node=8) == 64 * 2 * 16


def test_pretrain_optim_scales_lr_only(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "pipelines" / "codis-4m.yaml").read_text(encoding="utf-8"))
    data["pretrain"].update(nodes=2, rdzv_endpoint="node0:29500")
    recipe = recipes.parse_recipe(data)
    optim = recipes.pretrain_optim_config(recipe.pretrain, recipe.variants["codis"])
    assert optim.lr == pytest.approx(2e-4)  # 64 x 8 GPUs x 2 nodes = 1024 = 2 x 512
    assert (optim.warmup_lr, optim.min_lr) == (1e-5, 1e-5)  # not scaled (salesforce/ALBEF#92)
    halved = recipe.variants["codis"].model_copy(update={"train": {"batch_size": 32}})
    assert recipes.pretrain_optim_config(recipe.pretrain, halved).lr == pytest.approx(1e-4)


def test_steps_scale_shortens_every_schedule() -> None:
    full = load_recipe(REPO / "pipelines" / "demo.yaml")
    short = load_recipe(REPO / "pipelines" / "demo.yaml", steps_scale=0.1)
    variant = full.variants["codis"]
    a = recipes.pretrain_train_config(full.pretrain, variant, full.steps_scale)
    b = recipes.pretrain_train_config(short.pretrain, variant, short.steps_scale)
    assert b.steps == max(1, round(a.steps * 0.1))
    assert b.checkpoint_every <= b.steps and b.log_every <= b.steps
    task = full.tasks[0]
    assert recipes.task_schedule(task, 1000, 0.1)[0].steps == max(
        1, round(recipes.task_schedule(task, 1000, 1.0)[0].steps * 0.1))


def test_scale_schedule_keeps_everything_valid() -> None:
    train, optim = schedules.scale_schedule(TrainConfig(steps=1000, alpha_warmup_steps=100,
                                                      checkpoint_every=500, log_every=10),
                                          OptimConfig(warmup_steps=200), 0.001)
    assert (train.steps, train.alpha_warmup_steps, train.checkpoint_every, train.log_every) == (1, 0, 1, 1)
    assert optim.warmup_steps == 0
    halved, _ = schedules.scale_schedule(TrainConfig(steps=1800, itm_uniform_negative_steps=900),
                                       OptimConfig(), 0.5)
    assert (halved.steps, halved.itm_uniform_negative_steps) == (900, 450)


def test_task_schedule_uses_the_task_module_and_accumulation() -> None:
    recipe = load_recipe(REPO / "pipelines" / "codis-4m.yaml")
    coco = recipe.tasks[0]
    train, optim = recipes.task_schedule(coco, 566_747)
    # ALBEF: 5 epochs of 32 x 8 = 256 pairs per step, lr 1e-5
    assert train.grad_accumulation == 8 and train.batch_size == 32
    assert train.steps == 5 * (566_747 // 256)
    assert optim.lr == pytest.approx(1e-5)
    demo = load_recipe(REPO / "pipelines" / "demo.yaml")
    ve = next(t for t in demo.tasks if t.task == "ve")
    train, _ = recipes.task_schedule(ve, 600)
    assert train.steps == ve.train["steps"]  # the recipe's override wins


# ---- torchrun ----------------------------------------------------------------------------------
def _parse(command: list[str]):
    from torch.distributed.run import get_args_parser

    assert command[1:3] == ["-m", "torch.distributed.run"]
    return get_args_parser().parse_args(command[3:])


def test_torchrun_command_one_node() -> None:
    spec = recipes.PretrainSpec(gpus_per_node=8)
    command = launch.torchrun_command(spec, "/runs/x/run.yaml", metrics="/runs/x/metrics.jsonl",
                                       python="/venv/bin/python")
    assert command[0] == "/venv/bin/python"
    args = _parse(command)
    assert (args.nnodes, args.nproc_per_node, args.standalone) == ("1", "8", True)
    assert args.module and args.training_script == "flows.pretrain_entry"
    assert args.training_script_args == ["--config", "/runs/x/run.yaml",
                                         "--metrics", "/runs/x/metrics.jsonl"]


def test_torchrun_command_several_nodes() -> None:
    spec = recipes.PretrainSpec(nodes=2, gpus_per_node=8, rdzv_endpoint="node0:29500",
                                max_restarts=3)
    args = _parse(launch.torchrun_command(spec, "run.yaml", rdzv_id="job-7"))
    assert (args.nnodes, args.nproc_per_node, args.standalone) == ("2", "8", False)
    assert (args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == ("c10d", "node0:29500", "job-7")
    assert args.max_restarts == 3
    assert args.training_script_args == ["--config", "run.yaml"]


def test_launcher_choice() -> None:
    assert launch.launcher(recipes.PretrainSpec()) == "inprocess"
    assert launch.launcher(recipes.PretrainSpec(gpus_per_node=2)) == "torchrun"
    assert launch.launcher(recipes.PretrainSpec(launcher="torchrun")) == "torchrun"
    with pytest.raises(ValueError, match="needs torchrun"):
        recipes.PretrainSpec(launcher="inprocess", gpus_per_node=4)


def test_pretrain_config_round_trips_through_run_yaml(tmp_path: Path) -> None:
    recipe = load_recipe(REPO / "pipelines" / "demo.yaml")
    config = recipes.pretrain_config(recipe.pretrain, recipe.variants["albef"], ["a.tar", "b.tar"],
                                     tmp_path, recipe.steps_scale)
    loaded = type(config).load(config.save(tmp_path / "run.yaml"))
    assert loaded == config
    assert dataclasses.asdict(loaded.train) == dataclasses.asdict(
        recipes.pretrain_train_config(recipe.pretrain, recipe.variants["albef"]))


# ---- every bad input named before any work (issue #16) ------------------------------------------
def test_demo_world_files_are_the_files_the_generator_writes(tiny_world: Path) -> None:
    manifest = json.loads((tiny_world / "manifest.json").read_text(encoding="utf-8"))
    files = recipes.demo_world_files(DemoWorldConfig(**manifest["config"]))
    assert set(files) == set(manifest["files"]) | {"manifest.json"}
    bad_urls = sum(map(len, manifest["bad_urls"].values()))
    for name, samples in files.items():
        if samples is not None:
            assert manifest["files"][name]["rows"] == samples + (bad_urls if name.endswith(".parquet") else 0), name


@pytest.mark.parametrize("change, message", [
    # a mistyped url list used to be ignored: the download served pretrain/urls.parquet anyway
    (lambda d: d["pretrain_data"][0].update(url_list="demo://pretrain/urlz.parquet"),
     "pretrain_data.0.url_list: 'demo://pretrain/urlz.parquet' is not a file that the demo world "
     "generates; valid here: demo://pretrain/urls.parquet"),
    (lambda d: d["tasks"][0]["train_data"][0].update(annotations="demo://retrieval/trian.json"),
     "tasks.0.train_data.0.annotations.0: 'demo://retrieval/trian.json' is not a file that the demo "
     "world generates; valid here: demo://retrieval/train.json, demo://retrieval/val.json, "
     "demo://retrieval/test.json"),
    (lambda d: d["tasks"][1]["eval_data"].update(annotations="demo://nlvr/dev.json"),
     "tasks.1.eval_data.annotations.0: 'demo://nlvr/dev.json' is not a file that fits here; valid "
     "here: demo://vqa/train.json"),
    (lambda d: d["tasks"][1]["evaluate_args"].update(answer_list="demo://vqa/answers.json"),
     "tasks.1.evaluate_args.answer_list: 'demo://vqa/answers.json' is not a file that the demo world"),
    (lambda d: d["vision_init"].update(eval_annotations="demo://classification/test.json"),
     "vision_init.eval_annotations: 'demo://classification/test.json' is not a file"),
    (lambda d: d["tasks"][3]["eval_data"].update(image_root="demo://images"),
     "tasks.3.eval_data.image_root: 'demo://images': the demo world's annotation files name their "
     "images relative to its root; valid here: demo://"),
])
def test_demo_paths_must_be_files_the_demo_world_generates(tmp_path: Path, change, message) -> None:
    data = demo_data()
    change(data)
    assert message in error_of(tmp_path, data)


@pytest.mark.parametrize("change, message", [
    # pydantic took `true` as 1: `steps: true` ran one step
    (lambda d: d["pretrain"]["train"].update(steps=True), "pretrain.train.steps: must be an integer, got True"),
    (lambda d: d["variants"]["codis"].update(train={"batch_size": True}),
     "variants.codis.train.batch_size: must be an integer, got True"),
    (lambda d: d["variants"]["codis"]["model"].update(loss_weights={"code": True}),
     "variants.codis.model.loss_weights.code: must be a number, got True"),
    (lambda d: d["pretrain"].update(gpus_per_node=True), "pretrain.gpus_per_node: must be an integer"),
    (lambda d: d["demo_world"].update(pretrain_images=True), "demo_world.pretrain_images: must be an integer"),
    (lambda d: d.update(steps_scale=True), "steps_scale: must be a number, got True"),
    # and a NaN learning rate validated
    (lambda d: d["pretrain"]["optim"].update(lr=float("nan")), "pretrain.optim.lr: must be a finite number, got nan"),
    (lambda d: d["pretrain"]["optim"].update(lr="inf"), "pretrain.optim.lr: must be a finite number, got 'inf'"),
    (lambda d: d["variants"]["albef"].update(optim={"lr": float("nan")}), "variants.albef.optim.lr: must be a finite"),
    (lambda d: d["tasks"][0].update(optim={"lr": float("nan")}), "tasks.0.optim.lr: must be a number > 0, got nan"),
    (lambda d: d["tasks"][0]["train"].update(clip_grad_norm=float("inf")), "tasks.0.train.clip_grad_norm (0 = off): must be a number >= 0, got inf"),
    (lambda d: d["vision_init"]["optim"].update(weight_decay=float("nan")), "vision_init.optim.weight_decay: must be a finite"),
    (lambda d: d["variants"]["codis"]["model"].update(loss_weights={"code": float("inf")}),
     "variants.codis.model.loss_weights.code: must be a finite number, got inf"),
    (lambda d: d.update(steps_scale=float("inf")), "steps_scale: must be a finite number, got inf"),
])
def test_bools_and_non_finite_numbers_are_refused(tmp_path: Path, change, message) -> None:
    data = demo_data()
    change(data)
    assert f"recipe.yaml: invalid recipe: {message}" in error_of(tmp_path, data)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["demo_world"].update(nlvr_pairs={"train": 10, "dev": 10, "test": 10}),
     "tasks.2.config.batch_size: 10 training samples do not fill one batch of 16 x 1 process(es) x 1 "
     "accumulation step(s) (counted in demo_world (demo://nlvr/train.json))"),
    (lambda d: d["tasks"][1].update(train={"batch_size": 2000}),
     "tasks.1.train.batch_size: a batch of 2000 is more than the 1800 samples of demo_world "
     "(demo://vqa/train.json)"),
    (lambda d: d["tasks"][0].update(grad_accumulation=64),
     "tasks.0.grad_accumulation: 1000 training samples do not fill one batch of 16 x 1 process(es) x "
     "64 accumulation step(s)"),
    (lambda d: d["pretrain"]["train"].update(batch_size=7000),
     "pretrain.train.batch_size: a batch of 7000 is more than the 6000 samples of demo_world "
     "(demo://pretrain/urls.parquet)"),
    (lambda d: d["variants"]["albef"].update(train={"grad_accumulation": 200}),
     "pretrain.train.batch_size: a batch of 6400 (32 x 200 accumulation step(s) x 1 process(es)) is "
     "more than the 6000 samples"),
    (lambda d: d["vision_init"]["train"].update(batch_size=9000),
     "vision_init.train.batch_size: a batch of 9000 is more than the 8000 samples of demo_world "
     "(demo://classification/train.json)"),
    (lambda d: (d["demo_world"].update(pretrain_images=5), d["pretrain"]["train"].update(batch_size=8)),
     "tasks.2.config.ta_batch_size: 10 training samples do not fill one batch of 16"),
])
def test_a_batch_the_demo_world_cannot_fill_is_named_at_validation(tmp_path: Path, change, message) -> None:
    data = demo_data()
    change(data)
    assert message in error_of(tmp_path, data)


def test_a_batch_the_shards_cannot_fill_is_named_before_training(shards) -> None:
    demo = load_recipe(REPO / "pipelines" / "demo.yaml")
    vqa = demo.tasks[1]
    with pytest.raises(ValueError, match=r"^tasks\[vqa\.demo\]\.config\.batch_size: 12 training samples "
                                         r"do not fill one batch of 16 .*\(counted in the training "
                                         r"shards' manifests\)"):
        recipes.task_schedule(vqa, 12)
    nlvr = demo.tasks[2]
    with pytest.raises(ValueError, match=r"^tasks\[nlvr\.demo\]\.config\.ta_batch_size: 15 training"):
        recipes.text_assignment_schedule(nlvr, 15)
    # pretraining: the manifests of the shard folders give the sample and shard counts
    folder = shards("pretrain", "train")
    tars = shard_files([folder])
    samples = json.loads((folder / "manifest.json").read_text())["num_samples"]
    variant = demo.variants["codis"]
    with pytest.raises(ValueError, match=rf"^pretrain\.train\.batch_size: a batch of 32 is more than "
                                         rf"the {samples} samples of the pretraining shards' manifests"):
        recipes.pretrain_config(demo.pretrain, variant, tars, "/out", where="variants.codis")
    small = demo.pretrain.model_copy(update={"train": TrainConfig(batch_size=1), "gpus_per_node": 8})
    with pytest.raises(ValueError, match=rf"^pretrain\.gpus_per_node: 8 processes .* but {len(tars)} "
                                         r"shard\(s\)"):
        recipes.pretrain_config(small, variant, tars, "/out", where="variants.codis")
    fits = demo.pretrain.model_copy(update={"train": TrainConfig(batch_size=samples)})
    assert recipes.pretrain_config(fits, variant, tars, "/out").train.batch_size == samples


def test_bad_records_name_the_file_the_record_and_the_field(tiny_world: Path, tmp_path: Path) -> None:
    good = tiny_world / "vqa" / "val.json"
    records = json.loads(good.read_text(encoding="utf-8"))
    # answers that are no strings used to crash later, in the tokenizer
    bad = tmp_path / "vqa_bad.json"
    bad.write_text(json.dumps([records[0], {**records[1], "answer": [1, 2, 3]}]), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}: record 1: 'answer' must be a string "
                                         r"or a non-empty list of strings, got \[1, 2, 3\]"):
        write_shards(read_annotations([good, bad]), tiny_world, tmp_path / "out", kind="vqa",
                     progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything is written
    bad.write_text(json.dumps([{**records[0], "question": 7}]), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}: record 0: 'question' must be a "
                                         r"string, got int 7"):
        write_shards(read_annotations([bad]), tiny_world, tmp_path / "out", kind="vqa", progress=False)
    missing = {k: v for k, v in records[2].items() if k != "image"}
    bad.write_text(json.dumps([records[0], records[1], missing]), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}: record 2: missing key 'image'"):
        write_shards(read_annotations([bad]), tiny_world, tmp_path / "out", kind="vqa", progress=False)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image": "a.jpg",\n  "question": }]', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(broken))}: not valid JSON: Expecting value "
                                         r"at line 2, column 15"):
        read_annotations([good, broken])


# ---- the command line: one line per bad input -----------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--steps-scale", "inf"], "error: --steps-scale: must be a finite number > 0, got inf"),
    (["--steps-scale", "0"], "error: --steps-scale: must be a finite number > 0, got 0.0"),
    (["--set", "pretrain.train.steps=[1"], "error: --set 'pretrain.train.steps=[1': the value '[1' is "
                                           "not valid YAML"),
    (["--set", "pretrain.train.steps=true"], "invalid recipe: pretrain.train.steps: must be an integer, "
                                             "got True"),
    (["--set", "pretrain.optim.lr=.nan"], "invalid recipe: pretrain.optim.lr: must be a finite number"),
    (["--recipe", "missing.yaml"], "error: recipe: no recipe file at"),
])
def test_reproduce_reports_bad_input_in_one_line(args, message, capsys, monkeypatch) -> None:
    from flows import reproduce

    monkeypatch.delenv("CODIS_DEBUG", raising=False)
    assert reproduce.main([*args, "--validate"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("error: ") and "\n" not in err, err
    if "--steps-scale" not in args:  # checked before the recipe is read
        with pytest.raises(ValueError):  # a RecipeError, with its traceback when asked for
            reproduce.main([*args, "--validate", "--debug"])
