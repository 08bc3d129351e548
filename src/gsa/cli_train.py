"""The ``gsa train`` subcommand: a thin layer over ``gsa.train``."""

from __future__ import annotations

import contextlib
import io
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

    export = commands.add_parser("export", help="copy a checkpoint's trained weights without the optimiser state")
    export.add_argument("source", help="checkpoint folder, or a run folder for its latest checkpoint")
    export.add_argument("target", help="new checkpoint folder; it must not exist yet")
    export.add_argument("--force", action="store_true", help="replace TARGET if it is an existing checkpoint folder "
                        "(atomically; other files in it are lost)")
    export.set_defaults(handler=run_export)

    loss = commands.add_parser("loss", help="next-token loss on the held-out split of corpus files, with and without gists")
    loss.add_argument("--checkpoint", help="trained checkpoint folder (default: the bundled one if present; none: the base model)")
    loss.add_argument("--model", help="untrained local model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    loss.add_argument("--corpus", default="corpus/python-3.11-docs.jsonl.gz,corpus/kjv.jsonl.gz",
                      help="corpus files relative to --data-dir, comma-separated; each needs held-out documents, so a one-document "
                      "file such as the Debian reference has none (default: the Python docs and the King James Bible)")
    loss.add_argument("--data-dir", help="data folder (default: $GSA_DATA_DIR, else ./data)")
    loss.add_argument("--methods", default="gsa,full", help="gsa (gists under the gist mask) and/or full (no gists, causal), "
                      "comma-separated (default gsa,full)")
    loss.add_argument("--ratio", default="16", help="compression ratio of the gist layout: the chunk size C in tokens, or "
                      "one chunk size per gist level joined by x, such as 4x4 (default 16)")
    loss.add_argument("--seq-len", type=int, default=1024, help="tokens per scored window (default 1024)")
    loss.add_argument("--sequences", type=int, default=4, help="held-out windows per corpus file (default 4)")
    loss.add_argument("--heldout-fraction", type=float, default=0.05, help="share of documents held out, as in training "
                      "data.heldout_fraction (default 0.05)")
    loss.set_defaults(handler=run_loss)


def run_train(args) -> int:
    from gsa.errors import InvalidInputError
    from gsa.train import load_config, train

    if args.max_steps is not None and args.max_steps < 1:
        raise InvalidInputError(f"--max-steps must be at least 1, got {args.max_steps}")
    config = load_config(args.config, args.set)
    if not args.verbose:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # the GGUF loader's bar; the training bar stays
    # The trainer logs one line per optimiser step at INFO level.
    logging.getLogger("gsa.train").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    result = train(config, resume=args.resume, max_steps=args.max_steps)
    if not result.main_process:
        return 0
    print(json.dumps({
        "out_dir": str(result.out_dir), "step": result.step, "loss": result.last_loss,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
    }))
    return 0


def run_loss(args) -> int:
    from pathlib import Path

    from gsa.checkpoints import load_for_inference
    from gsa.errors import InvalidInputError
    from gsa.eval.runner import default_data_dir
    from gsa.layout import GistSpec, format_ratio, parse_ratio
    from gsa.model import enable_gsa
    from gsa.train.evaluate import heldout_loss

    methods = [m for m in args.methods.split(",") if m]
    sizes = parse_ratio(args.ratio)
    ratio = format_ratio(sizes)
    for option, value in (("--seq-len", args.seq_len), ("--sequences", args.sequences)):
        if value < 1:
            raise InvalidInputError(f"{option} must be at least 1, got {value}")
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    corpus = [data_dir / name for name in args.corpus.split(",") if name]
    # The GGUF loader draws its own progress bar on stderr; it is shown only with --verbose.
    with contextlib.nullcontext() if args.verbose else contextlib.redirect_stderr(io.StringIO()):
        loaded = load_for_inference(args.model, args.checkpoint)
    if loaded.trained and ratio not in loaded.ratios:
        raise InvalidInputError(f"checkpoint {loaded.name} was trained for ratios {loaded.ratios}, not {ratio}; pass --ratio {loaded.ratios[0]}")
    spec = GistSpec.from_sizes(sizes)
    gist_ids = enable_gsa(loaded.model, loaded.tokenizer, levels=spec.num_levels)
    for method in methods:
        result = heldout_loss(
            loaded.model, loaded.tokenizer, gist_ids, corpus, method, spec, args.seq_len, args.sequences,
            args.heldout_fraction,
        )
        print(json.dumps({"model": loaded.name, "trained": loaded.trained, **result.__dict__}))
    return 0


def run_export(args) -> int:
    from gsa.train.checkpoint import export_checkpoint

    path = export_checkpoint(args.source, args.target, overwrite=args.force)
    size = sum(f.stat().st_size for f in path.iterdir())
    print(json.dumps({"checkpoint": str(path), "bytes": size}))
    return 0
