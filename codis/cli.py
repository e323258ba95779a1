"""The codis command line. Every command also runs under torchrun (one process per GPU).

    codis pretrain --config run.yaml
    codis finetune --task retrieval --config finetune.yaml
    codis evaluate --task retrieval --checkpoint model.pt --shards data/test [--preset demo]
    codis pretrain-vision --config vision_init.yaml
    codis convert-albef ALBEF_4M.pth albef_4m.pt

A bad input (a config field, a file, a checkpoint of the wrong kind, a batch larger than the data)
ends the command with one line, "error: <what and where>", and exit status 2, before any training
or evaluation starts; --debug (or CODIS_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from codis.config import ConfigError, check_finite
from codis.tasks import TASKS

DEBUG_ENV = "CODIS_DEBUG"

# What --help shows besides the options: plain text (argparse prints it as written), each part
# under the top-level help and under the help of the commands it concerns.
CHECKPOINT_KINDS = """\
Checkpoints carry their kind (codis.checkpoint), and each command says which it takes:

    finetune pretrained:   retrieval: pretrain or retrieval; vqa: pretrain; nlvr: pretrain or
                           nlvr_ta (after the text-assignment step); ve: pretrain
    evaluate --checkpoint: retrieval: pretrain (zero-shot) or retrieval; vqa, nlvr, ve: the
                           task's own finetuned kind
"""
PRETRAIN_EXAMPLE = """\
A pretraining config (YAML; a recipe's pretrain stage writes one, run.yaml in its folder) names
the output folder, the shards, the model (a preset with changes) and the schedule:

    output_dir: runs/pretrain
    data:
      shards: [runs/shards/pretrain]    # shard folders, tar files or brace patterns
      hflip: false                      # captions that say "left of" / "right of"
      crop_min_scale: 0.8
    model:
      preset: tiny                      # tiny, small, base
      mode: codis                       # albef, albef_intra, codis_cross, codis, codis_student
      vision: {stem: conv, pretrained: runs/vision_init/vision.safetensors}
    train: {steps: 1800, batch_size: 32, checkpoint_every: 600, log_every: 10}
    optim: {lr: 1.0e-3, warmup_steps: 50}
"""
VISION_INIT_EXAMPLE = """\
A vision initialisation config (YAML; codis.train.vision_init) names the labelled images, the
output folder, the ViT (a model preset's vision with changes) and its schedule:

    train_annotations: world/classification/train.json
    eval_annotations: world/classification/val.json     # optional
    image_root: world
    output_dir: runs/vision_init
    preset: tiny
    vision: {stem: conv}
    train: {steps: 3000, batch_size: 64}
    optim: {lr: 1.0e-3}
"""
FINETUNE_EXAMPLE = """\
A finetuning config (YAML) names the pretrained checkpoint, the training shards, the output
folder and the task preset with changes. It trains with the task's schedule (ALBEF's epochs,
batch, learning rates over the shards' sample count and the processes; the same function the flows
use), and the optional train / optim sections replace fields of that schedule:

    pretrained: runs/pretrain/model.pt
    train_shards: runs/shards/retrieval_train
    output_dir: runs/retrieval
    preset: demo                    # the task's preset (e.g. coco, flickr, vqa, nlvr, ve, demo)
    task: {k_test: 16, epochs: 3}   # changes to the preset's fields
    train: {log_every: 10}          # changes to the resulting schedule (optional)
    optim: {lr: 1.0e-4}
"""
CONVERT_ALBEF_EXAMPLE = """\
ALBEF's released checkpoints become checkpoints of ours (the kind is read from the file's keys):

    codis convert-albef ALBEF_4M.pth albef_4m.pt       # pretrain: finetune it on any task
    codis convert-albef mscoco.pth albef_coco.pt       # retrieval: evaluate or finetune it
    codis convert-albef vqa.pth albef_vqa.pt           # vqa
    codis convert-albef pretrain_model_nlvr.pth ta.pt  # nlvr_ta: NLVR2 finetuning starts from it

The model takes the preset's attention heads and settings (base: ALBEF's) with ALBEF's semantics,
the sizes and the image resolution of the file. Every tensor of ours is filled or the command fails
naming the missing ones; ALBEF tensors without a place in ours are listed (--report: each one).
"""
FINETUNE_KEYS = {"pretrained", "train_shards", "output_dir", "preset", "task", "train", "optim"}
VISION_INIT_KEYS = {"train_annotations", "eval_annotations", "image_root", "output_dir", "preset",
                    "vision", "train", "optim"}


def _task_config(task: str, preset: str | None, changes: dict[str, Any] | None):
    info = TASKS[task]
    return info.module().config(preset or info.paper_preset, **(changes or {}))


def _pretrain(args: argparse.Namespace) -> int:
    from codis.data.manifest import listed_samples
    from codis.train import PretrainConfig, global_batch, pretrain

    try:
        check_finite(_load_yaml(args.config))  # NaN passes some of the configs' own checks
    except ConfigError as error:
        raise ConfigError(f"{args.config}: {error}") from None
    config = PretrainConfig.load(args.config)
    listed = listed_samples(config.data.shards)  # None: tar files that no manifest lists
    if listed is not None and not config.data.resample:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        batch = global_batch(config.train, 1, world)
        if batch > listed[0]:
            raise ConfigError(f"{args.config}: train.batch_size: a global batch of {batch} "
                              f"({config.train.batch_size} x {config.train.grad_accumulation} "
                              f"accumulation step(s) x {world} process(es)) is more than the "
                              f"{listed[0]} samples of data.shards")
    print(pretrain(config, resume=not args.no_resume, progress=not args.no_progress,
                   stop_after=args.stop_after))
    return 0


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    if not Path(path).is_file():
        raise FileNotFoundError(f"no config at {path}")
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _load_run_config(path: str, known: set[str], required: tuple[str, ...]) -> dict[str, Any]:
    """A command's YAML config checked for unknown and missing fields (errors name the field)."""
    data = _load_yaml(path)
    try:
        check_finite(data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    for key in required:
        if key not in data:
            raise ConfigError(f"{path}: {key}: required")
    return data


def _finetune(args: argparse.Namespace) -> int:
    from codis.data.manifest import shard_samples
    from codis.train import OptimConfig, TrainConfig, task_schedule, with_changes

    data = _load_run_config(args.config, FINETUNE_KEYS, ("pretrained", "train_shards", "output_dir"))
    config = _task_config(args.task, data.get("preset"), data.get("task"))
    with_changes(TrainConfig(), OptimConfig(), data.get("train"), data.get("optim"))  # before any IO
    shards = data["train_shards"]
    samples = shard_samples(shards if isinstance(shards, list) else [shards])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        train, optim = task_schedule(config, samples, world, train_changes=data.get("train"),
                                     optim_changes=data.get("optim"))
    except ConfigError as error:  # name the field as this file spells it: task.<field>
        message = str(error)
        if message.startswith(f"{args.task}."):
            message = f"task.{message[len(args.task) + 1:]} (counted in the manifests of train_shards)"
        raise ConfigError(f"{args.config}: {message}") from None
    batch = train.batch_size * train.grad_accumulation * world
    if batch > samples:  # the train section replaced the batch the schedule was made for
        raise ConfigError(f"{args.config}: train.batch_size: a batch of {batch} ({train.batch_size} "
                          f"x {train.grad_accumulation} accumulation step(s) x {world} process(es)) "
                          f"is more than the {samples} samples of train_shards")
    print(TASKS[args.task].module().finetune(
        data["pretrained"], shards, data["output_dir"], config, train=train, optim=optim,
        progress=not args.no_progress, resume=not args.no_resume, stop_after=args.stop_after))
    return 0


def _pretrain_vision(args: argparse.Namespace) -> int:
    import dataclasses

    from codis.config import VisionConfig, from_dict, preset
    from codis.data.manifest import read_json
    from codis.train.vision_init import pretrain_vision

    from codis.train import OptimConfig, TrainConfig

    data = _load_run_config(args.config, VISION_INIT_KEYS,
                            ("train_annotations", "image_root", "output_dir"))
    train = from_dict(TrainConfig, data.get("train", {}), prefix="train.")
    optim = from_dict(OptimConfig, data.get("optim", {}), prefix="optim.")
    images = read_json(data["train_annotations"]) if Path(data["train_annotations"]).is_file() else None
    if isinstance(images, list) and train.batch_size > len(images):  # batches are full ones only
        raise ConfigError(f"{args.config}: train.batch_size: {train.batch_size} is more than the "
                          f"{len(images)} images of train_annotations")
    base = dataclasses.asdict(preset(data.get("preset", "tiny")).vision)
    vision = from_dict(VisionConfig, {**base, **data.get("vision", {})}, prefix="vision.")
    print(pretrain_vision(vision, data["train_annotations"], data["image_root"], data["output_dir"],
                          train=train, optim=optim, eval_annotations=data.get("eval_annotations"),
                          progress=not args.no_progress, resume=not args.no_resume,
                          stop_after=args.stop_after))
    return 0


def _convert_albef(args: argparse.Namespace) -> int:
    from codis.config import ModelConfig, merge_dicts, preset
    from codis.tasks.albef import convert_albef

    changes = _json_option(args.set, "--set")
    base = preset(args.preset)
    if changes:
        base = ModelConfig.from_dict(merge_dicts(base.to_dict(), changes))
    conversion = convert_albef(args.source, args.output, kind=None if args.kind == "auto" else args.kind,
                               base=base, image_size=args.image_size, task_preset=args.task_preset,
                               allow_pickle=args.allow_pickle)
    print(conversion.summary())
    if args.report:
        for title, table in (("unplaced", conversion.unplaced), ("derived", conversion.derived)):
            for key, reason in table.items():
                print(f"{title} {key}: {reason}")
    print(args.output)
    return 0


def _json_option(text: str | None, option: str) -> dict[str, Any]:
    """A JSON mapping given on the command line; errors name the option."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{option}: not valid JSON ({error.msg} at column {error.colno}): "
                          f"{text!r}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option}: expected a JSON mapping such as '{{\"k_test\": 16}}', "
                          f"got {text!r}")
    return value


def _evaluate(args: argparse.Namespace) -> int:
    config = _task_config(args.task, args.preset, _json_option(args.set, "--set"))
    extra = {"answer_list": args.answer_list} if args.task == "vqa" and args.answer_list else {}
    extra.update(_json_option(args.options, "--options"))
    metrics = TASKS[args.task].module().evaluate(args.checkpoint, args.shards, config,
                                               progress=not args.no_progress, **extra)
    text = json.dumps(metrics, indent=2)
    if args.output and int(os.environ.get("RANK", "0")) == 0:  # under torchrun: rank 0 writes
        from codis.files import atomic_write_text

        atomic_write_text(args.output, text + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    raw = argparse.RawDescriptionHelpFormatter  # the examples' line breaks and indents kept
    parser = argparse.ArgumentParser(
        prog="codis", description="CODIS / ALBEF pretraining, finetuning and evaluation",
        epilog="\n".join((__doc__ or "", CHECKPOINT_KINDS, PRETRAIN_EXAMPLE, VISION_INIT_EXAMPLE,
                           FINETUNE_EXAMPLE, CONVERT_ALBEF_EXAMPLE)), formatter_class=raw)
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error (also: {DEBUG_ENV}=1)")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, *examples: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=summary,
                                   epilog="\n".join(examples) or None, formatter_class=raw)

    pretrain = command("pretrain", "pretrain from a run config (YAML)", PRETRAIN_EXAMPLE)
    pretrain.add_argument("--config", required=True,
                          help="run config written by a recipe or by hand (see below)")
    pretrain.set_defaults(run=_pretrain)

    finetune = command("finetune", "finetune a pretrained checkpoint on a task", FINETUNE_EXAMPLE,
                       CHECKPOINT_KINDS)
    finetune.add_argument("--task", required=True, choices=TASKS)
    finetune.add_argument("--config", required=True,
                          help="finetuning config (YAML; its pretrained checkpoint's kind: see below)")
    finetune.set_defaults(run=_finetune)

    vision_init = command("pretrain-vision", "supervised initialisation of the ViT on labelled images",
                          VISION_INIT_EXAMPLE)
    vision_init.add_argument("--config", required=True,
                             help="vision initialisation config (YAML, see below)")
    vision_init.set_defaults(run=_pretrain_vision)

    for each in (pretrain, finetune, vision_init):
        each.add_argument("--no-resume", action="store_true",
                          help="ignore checkpoints in output_dir and start from step 0")
        each.add_argument("--stop-after", type=int, default=None,
                          help="stop after this many steps of this invocation (a resumable slice)")
        each.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = command("evaluate", "evaluate a checkpoint on a task's shards", CHECKPOINT_KINDS)
    evaluate.add_argument("--task", required=True, choices=TASKS)
    evaluate.add_argument("--checkpoint", required=True,
                          help="model.pt of the task's finetune stage (retrieval: or a pretrained "
                               "one, zero-shot)")
    evaluate.add_argument("--shards", required=True, help="shard folder written by the shard stage")
    evaluate.add_argument("--preset", default=None, help="the task's preset (default: the paper's)")
    evaluate.add_argument("--set", default=None, help='JSON changes to the preset, e.g. \'{"k_test": 16}\'')
    evaluate.add_argument("--answer-list", default=None, help="VQA: answer_list.json")
    evaluate.add_argument("--options", default=None,
                          help='JSON keyword arguments of the task\'s evaluate, e.g. \'{"num_workers": 8}\'')
    evaluate.add_argument("--output", default=None, help="also write the metrics to this JSON file")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(run=_evaluate)

    from codis.albef import ALBEF_KINDS  # light: the mapping, no task module

    convert = command("convert-albef", "convert a released ALBEF checkpoint into one of ours",
                      CONVERT_ALBEF_EXAMPLE)
    convert.add_argument("source", help="ALBEF's .pth file (its 'model' state dict is read)")
    convert.add_argument("output", help="the checkpoint to write (model.pt of ours)")
    convert.add_argument("--kind", default="auto", choices=("auto", *ALBEF_KINDS),
                         help="the ALBEF model the file holds (default: read from its keys)")
    convert.add_argument("--preset", default="base",
                         help="model preset giving the heads and settings (default: base)")
    convert.add_argument("--set", default=None,
                         help='JSON changes to the preset, e.g. \'{"text": {"tokenizer": "/path"}}\'')
    convert.add_argument("--image-size", type=int, default=None,
                         help="resample the position embeddings to this resolution (default: the file's)")
    convert.add_argument("--task-preset", default=None,
                         help="task config preset stored with a task checkpoint (default: the paper's)")
    convert.add_argument("--report", action="store_true",
                         help="list every ALBEF key left unplaced and every tensor derived, with why")
    convert.add_argument("--allow-pickle", action="store_true",
                         help="read a file whose objects need code to load (a source you trust only)")
    convert.set_defaults(run=_convert_albef)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        # bad input (ConfigError, CheckpointError, ... are ValueErrors): one line, unless asked
        if args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"error: {error_message(error)}", file=sys.stderr)
        return 2


def error_message(error: BaseException) -> str:
    """What a command prints for ``error``: its message (OSError's ``[Errno 2] ...`` prefix left
    out), or its class name when it has none."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.filename}: {error.strerror}"
    return str(error) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
