"""The ``codis`` command line: ``codis pretrain --config run.yaml`` (also under ``torchrun``)."""

from __future__ import annotations

import argparse
import sys

import codis  # noqa: F401


def _pretrain(args: argparse.Namespace) -> int:
    from codis.train import PretrainConfig, pretrain

    config = PretrainConfig.load(args.config)
    final = pretrain(config, resume=not args.no_resume, progress=not args.no_progress,
                     stop_after=args.stop_after)
    print(final)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="codis", description="CODIS / ALBEF pretraining, "
                                     "finetuning and evaluation")
    commands = parser.add_subparsers(dest="command", required=True)
    pretrain = commands.add_parser("pretrain", help="pretrain from a run config (YAML)")
    pretrain.add_argument("--config", required=True, help="run config written by a recipe or by hand")
    pretrain.add_argument("--no-resume", action="store_true",
                          help="ignore checkpoints in output_dir and start from step 0")
    pretrain.add_argument("--no-progress", action="store_true", help="no progress bar")
    pretrain.add_argument("--stop-after", type=int, default=None,
                          help="stop after this many steps of this invocation (a resumable slice)")
    pretrain.set_defaults(run=_pretrain)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
