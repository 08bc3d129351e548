"""The ``gsa train`` subcommand: a thin layer over ``gsa.train``."""

from __future__ import annotations

import json
import logging


def add_train_parser(commands) -> None:
    train = commands.add_parser("train", help="train gist tokens: continued pretraining or selective fine-tuning")
    train.add_argument("--config", required=True, help="YAML or TOML file with the run's settings (see docs/training.md)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run.out_dir")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="override one config field, the value written as in TOML (repeatable), e.g. optim.steps=10")
    train.add_argument("--max-steps", type=int, help="stop after this many optimiser steps from the start or resume point "
                       "(the schedule still spans optim.steps)")
    train.set_defaults(handler=run_train)


def run_train(args) -> int:
    from gsa.errors import InvalidInputError
    from gsa.train import load_config, train

    if args.max_steps is not None and args.max_steps < 1:
        raise InvalidInputError(f"--max-steps must be at least 1, got {args.max_steps}")
    config = load_config(args.config, args.set)
    # The trainer logs one line per optimiser step at INFO level.
    logging.getLogger("gsa.train").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    result = train(config, resume=args.resume, max_steps=args.max_steps)
    print(json.dumps({
        "out_dir": str(result.out_dir), "step": result.step, "loss": result.last_loss,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
    }))
    return 0
