"""The ``gsa`` command line: a thin layer over the library that parses, validates and prints."""

from __future__ import annotations

import argparse
import os
import contextlib
import io
import json
import logging
import sys
from importlib import resources
from pathlib import Path

from gsa.bench import DTYPES
from gsa.chunk_store import RAW_TIERS
from gsa.cli_train import add_train_parser
from gsa.config import IMPLS, MERGES, PREFILLS, GSAConfig
from gsa.errors import InvalidInputError
from gsa.layout import GistSpec, format_ratio, parse_ratio
from gsa.checkpoints import NO_CHECKPOINT, checkpoint_ratios, load_for_inference, resolve_checkpoint
from gsa.methods import METHODS, get_method

EXIT_USAGE = 2
SAMPLE_DOCUMENT = "sample_document.md"
SAMPLE_QUESTIONS = "sample_questions.json"
CHECKPOINT_HELP = ("trained GSA checkpoint folder (from gsa train); none uses the untrained base model (default: "
                   "$GSA_CHECKPOINT, else the bundled checkpoints/smollm2-135m-gsa16 when present and --model is unset)")
PROGRESS_MIN_TOKENS = 1024  # prompts at least this long show a prefill progress bar


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors become one-line ``InvalidInputError`` messages."""

    def error(self, message: str):
        raise InvalidInputError(f"{message}; see {self.prog} --help")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gsa", description="Gist Sparse Attention for Hugging Face causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = commands.add_parser("generate", help="answer a question over a long context")
    gen.add_argument("--context", help="text file to read, or - for standard input (default: the bundled sample document)")
    gen.add_argument("--question", help="question to answer (default with the sample document: its first sample question)")
    gen.add_argument("--model", help="local model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    gen.add_argument("--ratio", default="16", help="compression ratio: the chunk size C in tokens, or one chunk size per "
                     "gist level joined by x, such as 4x4 (16x) or 8x4x4 (128x) (default 16)")
    gen.add_argument("--method", default="gsa", choices=list(METHODS), help="gsa, gist-only, full, or a training-free "
                     "baseline: streaming, quest, mean-key, random, recent, oracle (default gsa)")
    gen.add_argument("--top-k", type=int, help="chunks recalled per query head (default: the budget rule)")
    gen.add_argument("--top-p", type=float, help="recall chunks until their gist-score mass reaches this share")
    gen.add_argument("--merge", default="union", choices=MERGES, help="GQA merge of head choices (default union)")
    gen.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    gen.add_argument("--prefill", choices=PREFILLS, help="gist: the gist mask, for checkpoints trained with gists "
                     "(default with a trained checkpoint); dense: full causal context where gists only route, which "
                     "needs no training (default for an untrained model)")
    gen.add_argument("--impl", default="fast", choices=IMPLS, help="fast, or naive: the loop reference, for small inputs (default fast)")
    gen.add_argument("--sinks", type=int, default=3, help="leading tokens never chunked (default 3)")
    gen.add_argument("--window", type=int, default=1, help="previous chunks kept raw-visible (default 1)")
    gen.add_argument("--raw-tier", default="device", choices=RAW_TIERS, help="where the raw chunk KV lives: device "
                     "(the model's device), host (host memory, pinned with CUDA) or disk (a temporary memory-mapped "
                     "file); gists, sinks and recent tokens stay on the device (default device)")
    gen.add_argument("--lru-chunks", type=int, default=0, help="with --raw-tier host or disk: LRU entries per layer "
                     "kept on the device, each the raw KV of one chunk of one batch row for all KV heads; 0 disables "
                     "the LRU (default 0)")
    gen.add_argument("--word-boundary", action="store_true", help="move chunk ends up to C/2 tokens to avoid splitting words")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="maximum tokens to generate (default 32)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.set_defaults(handler=run_generate)
    _add_eval_parsers(commands)
    _add_bench_parsers(commands)
    add_train_parser(commands)
    return parser


def _add_eval_parsers(commands) -> None:
    evaluate = commands.add_parser("eval", help="evaluate one method on one task and write predictions and a summary")
    evaluate.add_argument("--task", required=True, help="longbench:<task>, leval:<task>, rag-nq, kv-retrieval, passkey, "
                          "niah or perplexity; a comma-separated list runs each")
    evaluate.add_argument("--method", default="gsa", help="registered method names, comma-separated (default gsa)")
    evaluate.add_argument("--ratio", default="16", help="compression ratios, comma-separated; each is a chunk size in tokens "
                          "or one size per gist level joined by x, such as 16,4x4 (default 16)")
    evaluate.add_argument("--limit", type=int, help="evaluate at most N samples")
    evaluate.add_argument("--out", default="runs/eval", help="folder for run folders (default runs/eval)")
    evaluate.add_argument("--model", help="local model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    evaluate.add_argument("--data-dir", help="folder with the data sets (default: $GSA_DATA_DIR, else ./data)")
    evaluate.add_argument("--max-context-tokens", type=int, default=7500, help="truncate longer contexts in the middle (default 7500)")
    evaluate.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    evaluate.add_argument("--prefill", choices=PREFILLS, help="for methods built on gists: gist (trained gists; default "
                          "with a trained checkpoint) or dense (gists only route; default for an untrained model)")
    evaluate.add_argument("--top-k", type=int, help="chunks recalled per query head (default: the budget rule)")
    evaluate.add_argument("--lengths", help="comma-separated context lengths in tokens for passkey, niah and perplexity")
    evaluate.add_argument("--depths", help="comma-separated needle depths in [0, 1] for passkey and niah")
    evaluate.add_argument("--max-new-tokens", type=int, help="cap every sample's generation budget (default: each task's own)")
    evaluate.add_argument("--diagnostics", action="store_true", help="also measure router recall and agreement with full attention")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the tasks' random choices (default 0)")
    evaluate.set_defaults(handler=run_eval_command)

    report = commands.add_parser("report", help="turn a folder of eval runs into markdown tables and plots")
    report.add_argument("results", help="folder given to gsa eval --out")
    report.add_argument("--out", help="output folder (default RESULTS/report)")
    report.set_defaults(handler=run_report_command)

    explain = commands.add_parser("explain", help="draw which chunks were recalled while answering, as PNG and HTML")
    explain.add_argument("--context", help="text file to read, or - for standard input (default: the bundled sample document)")
    explain.add_argument("--question", help="question to answer (default with the sample document: its first sample question)")
    explain.add_argument("--model", help="local model directory or .gguf file")
    explain.add_argument("--method", default="gsa", help="a registered method name (default gsa)")
    explain.add_argument("--ratio", default="16", help="compression ratio: the chunk size C in tokens, or one chunk size "
                         "per gist level joined by x, such as 4x4 (16x) (default 16)")
    explain.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    explain.add_argument("--prefill", choices=PREFILLS, help="gist or dense (default: gist with a trained checkpoint, "
                         "else dense)")
    explain.add_argument("--max-new-tokens", type=int, default=24, help="maximum tokens to generate (default 24)")
    explain.add_argument("--out", default="explain", help="output path prefix: writes PREFIX.png and PREFIX.html (default explain)")
    explain.set_defaults(handler=run_explain_command)


def _add_bench_parsers(commands) -> None:
    bench = commands.add_parser("bench", help="speed benchmarks: a decode step or a prefill against context length")
    kinds = bench.add_subparsers(dest="bench_command", required=True, parser_class=_Parser)

    decode = kinds.add_parser("decode", help="time one decode step of full attention and sparse methods")
    decode.add_argument("--contexts", default="1024,4096,16384,65536,131072",
                        help="layer-scope context lengths in keys, comma-separated; K and M multiply by 1024 and 1024^2 "
                        "(default 1024,4096,16384,65536,131072)")
    decode.add_argument("--methods", default="full,gsa,quest", help="registered method names, comma-separated; full is "
                        "PyTorch SDPA over the whole cache (default full,gsa,quest)")
    decode.add_argument("--ratios", default="8,16,32", help="compression ratios, comma-separated; each is a chunk size in "
                        "tokens, or one chunk size per gist level joined by x (4x4, 4x4x4) so gsa selects top-down "
                        "(default 8,16,32)")
    decode.add_argument("--top-k", type=int, help="layer scope: chunks, and gists per level, kept per query head "
                        "(default: the budget rule)")
    decode.add_argument("--scope", default="layer,model", help="layer: one attention layer on synthetic KV; model: a "
                        "whole decode step of the model after a prefill; comma-separated (default layer,model)")
    decode.add_argument("--model-contexts", default="2048,4096,8000", help="model-scope context lengths in tokens, "
                        "comma-separated; at most the model's positions minus one (default 2048,4096,8000)")
    decode.add_argument("--model", help="model for the model scope: local directory or .gguf file "
                        "(default: embedded SmolLM2-135M-Instruct)")
    decode.add_argument("--prefill", default="gist", choices=PREFILLS, help="gist: gsa also attends the gists of recalled "
                        "chunks, as with trained gists (default); dense: gists only route")
    decode.add_argument("--raw-tier", default="device", choices=RAW_TIERS, help="model scope: where the cache keeps "
                        "raw chunk KV (device, host or disk); each model point reports resident_kv_bytes and "
                        "stored_kv_bytes in bytes (default device)")
    decode.add_argument("--recall-kernels", default="auto", help="kernels of the attention over recalled chunks, "
                        "comma-separated: auto, torch (gather, then products), cpp (C++, reads chunks in place, CPU) "
                        "or triton (CUDA); each sparse point runs once per kernel (default auto)")
    decode.add_argument("--copy-mb", type=int, default=256, help="size of the bandwidth copy benchmark in MiB (default 256)")
    _add_bench_options(decode, repeats=20, warmup=3, plot="bench_decode.png")
    decode.set_defaults(handler=run_bench_decode)

    prefill = kinds.add_parser("prefill", help="time and measure the peak memory of a one-layer prefill, causal SDPA "
                               "against the gist mask")
    prefill.add_argument("--contexts", default="2048,4096,8192", help="context lengths in tokens, comma-separated; K and "
                         "M multiply by 1024 and 1024^2 (default 2048,4096,8192)")
    prefill.add_argument("--ratios", default="16", help="compression ratios of the gist layout, comma-separated (default 16)")
    prefill.add_argument("--masks", default="causal,gist", help="causal (SDPA with is_causal), gist (the gist mask, each "
                         "query block attending only the keys it may see) and gist-full (the gist mask over all keys, "
                         "the reference path), comma-separated (default causal,gist)")
    _add_bench_options(prefill, repeats=5, warmup=1, plot="bench_prefill.png")
    prefill.set_defaults(handler=run_bench_prefill)


def _add_bench_options(parser, repeats: int, warmup: int, plot: str) -> None:
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads Hk of the synthetic layer (default 8)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dimension D of the synthetic layer (default 128)")
    parser.add_argument("--group", type=int, default=4, help="query heads per KV head, G (default 4, so 32 query heads)")
    parser.add_argument("--batch", type=int, default=1, help="rows per step (default 1)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the KV, queries and, in the "
                        "model scope, weights (default float32)")
    parser.add_argument("--sinks", type=int, default=3, help="leading tokens never chunked (default 3)")
    parser.add_argument("--window", type=int, default=1, help="previous chunks kept raw-visible (default 1)")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed runs per point; the median is reported (default {repeats})")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed runs before them (default {warmup})")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic tensors (default 0)")
    parser.add_argument("--plot", default=plot, help=f"PNG file for the log-log plot (default {plot})")
    parser.add_argument("--no-plot", action="store_true", help="do not write the plot")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        return args.handler(args)
    except InvalidInputError as error:
        print(f"gsa: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gsa: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (for example `| head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def read_context(source: str | None) -> tuple[str, str]:
    """Return ``(text, name)`` from a file, standard input (``-``) or the bundled sample."""
    if source is None:
        return resources.files("gsa.data").joinpath(SAMPLE_DOCUMENT).read_text(encoding="utf-8"), "sample"
    if source == "-":
        data, name = sys.stdin.buffer.read(), "standard input"
    else:
        path = Path(source)
        if path.is_dir():
            raise InvalidInputError(f"context {source} is a directory; pass a text file or - for standard input")
        if path.exists() and not path.is_file():
            raise InvalidInputError(f"context {source} is not a regular file; save it to a file or pipe it with --context -")
        if not path.is_file():
            raise InvalidInputError(f"context file {source} not found; pass an existing text file or - for standard input")
        try:
            data, name = path.read_bytes(), source
        except OSError as error:
            raise InvalidInputError(f"context file {source} is unreadable ({error.strerror}); check its permissions") from error
    if b"\x00" in data:
        raise InvalidInputError(f"context {name} looks binary (it contains NUL bytes); pass a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidInputError(
            f"context {name} is not valid UTF-8 (byte {error.start}); convert it, e.g. iconv -t UTF-8"
        ) from error
    if not text.strip():
        raise InvalidInputError(f"context {name} is empty; pass a file with text")
    return text, name


def _question(text: str | None, context_name: str) -> str:
    if text is not None and not text.strip():
        raise InvalidInputError("--question is empty; pass the question to answer over the context")
    return text if text is not None else _default_question(context_name)


def _default_question(context_name: str) -> str:
    if context_name != "sample":
        raise InvalidInputError("--question is missing; pass the question to answer over the context")
    questions = json.loads(resources.files("gsa.data").joinpath(SAMPLE_QUESTIONS).read_text(encoding="utf-8"))
    return questions[0]["question"]


def _build_config(args):
    if args.max_new_tokens < 1:
        raise InvalidInputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    sizes = parse_ratio(args.ratio)
    _resolve_prefill(args, [format_ratio(sizes)], [args.method])
    if args.sinks < 0 or args.window < 0:
        raise InvalidInputError(f"--sinks and --window must be 0 or more, got {args.sinks} and {args.window}")
    if args.top_k is not None and args.top_k < 1:
        raise InvalidInputError(f"--top-k must be at least 1, got {args.top_k}; omit it to use the budget rule")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise InvalidInputError(f"--top-p must be in (0, 1], got {args.top_p}; it is a share of the gist-score mass")
    if args.top_k is not None and args.top_p is not None:
        raise InvalidInputError("--top-k and --top-p both set; pass one of them")
    if args.sample and not args.temperature > 0:
        raise InvalidInputError(
            f"--temperature must be above 0 with --sample, got {args.temperature}; omit --sample for greedy decoding"
        )
    if args.lru_chunks < 0:
        raise InvalidInputError(f"--lru-chunks must be 0 or more, got {args.lru_chunks}; use 0 to disable the LRU")
    spec = GistSpec.from_sizes(sizes, sinks=args.sinks, window_chunks=args.window, word_boundary=args.word_boundary)
    return GSAConfig(spec=spec, method=args.method, top_k=args.top_k, top_p=args.top_p, merge=args.merge,
                     prefill=args.prefill, impl=args.impl, raw_tier=args.raw_tier, lru_chunks=args.lru_chunks)


def run_generate(args) -> int:
    config = _build_config(args)
    context, name = read_context(args.context)
    question = _question(args.question, name)

    import torch
    from transformers import TextStreamer

    torch.manual_seed(args.seed)
    generator = _load_generator(args)
    tokenizer, model = generator.tokenizer, generator.model
    batch = generator.build_batch([context], [question], config, args.max_new_tokens)

    streamer = None if args.json else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with _PrefillProgress(model.config.num_hidden_layers, batch.input_ids.shape[1]) as progress:
        (result,) = generator.generate(
            [context], [question], config, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
            temperature=args.temperature, streamer=streamer, on_layer=progress.on_layer,
        )
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        if not result.answer:
            print("(empty answer)")
        steps = f"{result.decode_steps} decode step{'s' if result.decode_steps != 1 else ''}"
        ratio = "" if result.method == "full" else f" {result.ratio}x"
        print(
            f"[{result.method}{ratio}] context {result.context_tokens} tokens, {result.gist_tokens} gists, {steps}, "
            f"{result.mean_unfolded_tokens_per_step:.0f} raw tokens attended per "
            f"step and layer, {result.mean_attended_kv_fraction:.1%} of full attention's keys, {result.seconds:.1f} s"
        )
    return 0


def _load_generator(args):
    """Load the model quietly and enable GSA on it."""
    import transformers

    from gsa.engine import GistGenerator

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # The GGUF loader draws its own progress bar on stderr; it is shown only with --verbose.
    with contextlib.nullcontext() if args.verbose else contextlib.redirect_stderr(io.StringIO()):
        loaded = load_for_inference(args.model, getattr(args, "checkpoint", NO_CHECKPOINT))
    generator = GistGenerator(loaded.model, loaded.tokenizer)
    generator.model_name = loaded.name
    return generator


def _resolve_prefill(args, ratios: list[str], methods: list[str]) -> None:
    """Set ``args.prefill`` from the model source when unset, and check a checkpoint's ratios.

    Reads only the checkpoint's ``trainer.json``, so bad input fails before the model loads. The
    default checkpoint gives way to the untrained model for a ratio it was not trained for; a
    checkpoint named with ``--checkpoint`` raises instead.
    """
    path = resolve_checkpoint(args.model, args.checkpoint)
    if path is not None and any(get_method(m).inserts_gists for m in methods):
        trained = checkpoint_ratios(path)
        missing = [ratio for ratio in ratios if ratio not in trained]
        if missing and args.checkpoint is None:
            print(f"gsa: note: the default checkpoint {path} was trained for ratios {trained}, not {missing}; "
                  "using the untrained model", file=sys.stderr)
            args.checkpoint, path = NO_CHECKPOINT, None
        elif missing:
            raise InvalidInputError(
                f"checkpoint {path} was trained for ratios {trained}, not {missing}; pass --ratio {trained[0]} "
                "or --checkpoint none for the untrained model"
            )
    if args.prefill is None:
        args.prefill = "gist" if path is not None else "dense"


def _number_list(text: str | None, option: str, cast=int) -> list | None:
    if text is None:
        return None
    try:
        return [cast(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise InvalidInputError(f"{option} must be a comma-separated list of numbers, got {text!r}") from error


def run_eval_command(args) -> int:
    """Run every (task, method, ratio) combination of the comma-separated lists in one process."""
    from tqdm import tqdm

    from gsa.eval.runner import EvalSettings, default_data_dir, run_eval

    if args.limit is not None and args.limit < 1:
        raise InvalidInputError(f"--limit must be at least 1, got {args.limit}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise InvalidInputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    _resolve_prefill(args, _ratio_labels(args.ratio), _names(args.method))
    task_options = {}
    for name, cast in (("lengths", int), ("depths", float)):
        values = _number_list(getattr(args, name), f"--{name}", cast)
        if values:
            task_options[name] = values
    grid = [
        EvalSettings(
            task=task, method=method, ratio=ratio, out=Path(args.out),
            data_dir=Path(args.data_dir) if args.data_dir else default_data_dir(), limit=args.limit,
            max_context_tokens=args.max_context_tokens, prefill=args.prefill, top_k=args.top_k,
            diagnostics=args.diagnostics, seed=args.seed, task_options=task_options,
            max_new_tokens=args.max_new_tokens,
        )
        for task in _names(args.task) for method in _names(args.method) for ratio in _ratio_labels(args.ratio)
    ]
    from gsa.eval.tasks import TASKS

    for settings in grid:
        settings.gsa_config()  # validates method, ratio, prefill and top-k before the model loads
        if settings.task not in TASKS:
            raise InvalidInputError(f"unknown task {settings.task!r}; choose one of: {', '.join(TASKS)}")
    generator = _load_generator(args)
    for settings in grid:
        with tqdm(desc=f"{settings.task} {settings.method} {settings.ratio}x", unit="sample", file=sys.stderr) as bar:
            summary = run_eval(settings, generator, progress=lambda record: bar.update(1))
        print(json.dumps(summary), flush=True)
    return 0


def _ratio_labels(text: str) -> list[str]:
    """Validate a comma-separated list of ratios such as ``16,4x4`` and return them in canonical form."""
    return [format_ratio(parse_ratio(part)) for part in text.split(",") if part.strip()]


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def run_report_command(args) -> int:
    from gsa.eval.report import build_report

    path = build_report(Path(args.results), Path(args.out) if args.out else None)
    print(path)
    return 0


def run_explain_command(args) -> int:
    from gsa.eval.explain import explain

    context, name = read_context(args.context)
    question = _question(args.question, name)
    sizes = parse_ratio(args.ratio)
    _resolve_prefill(args, [format_ratio(sizes)], [args.method])
    config = GSAConfig(spec=GistSpec.from_sizes(sizes), method=args.method, prefill=args.prefill)
    generator = _load_generator(args)
    png, html = explain(generator, context, question, config, args.max_new_tokens, Path(args.out))
    print(png)
    print(html)
    return 0


def run_bench_decode(args) -> int:
    """Run the decode benchmark; print the table, then the plot path, then one JSON line."""
    from gsa.bench import parse_names, parse_sizes
    from gsa.bench_decode import DecodeSettings, format_decode_table, plot_decode, run_decode_bench

    settings = DecodeSettings(
        contexts=parse_sizes(args.contexts, "--contexts"), methods=parse_names(args.methods, "--methods"),
        ratios=_ratio_labels(args.ratios), scopes=parse_names(args.scope, "--scope"),
        model_contexts=parse_sizes(args.model_contexts, "--model-contexts"), kv_heads=args.kv_heads,
        head_dim=args.head_dim, group=args.group, batch=args.batch, dtype=DTYPES[args.dtype], prefill=args.prefill,
        raw_tier=args.raw_tier, sinks=args.sinks, window=args.window, repeats=args.repeats, warmup=args.warmup, copy_mb=args.copy_mb,
        seed=args.seed, top_k=args.top_k, kernels=parse_names(args.recall_kernels, "--recall-kernels"),
    )
    settings.validate()
    _set_threads(args.threads)
    generator = _load_generator(args) if "model" in settings.scopes else None
    return _print_bench(run_decode_bench(settings, generator), format_decode_table, plot_decode, args)


def run_bench_prefill(args) -> int:
    """Run the prefill benchmark; print the table, then the plot path, then one JSON line."""
    from gsa.bench import parse_names, parse_sizes
    from gsa.bench_prefill import PrefillSettings, format_prefill_table, plot_prefill, run_prefill_bench

    _set_threads(args.threads)
    settings = PrefillSettings(
        contexts=parse_sizes(args.contexts, "--contexts"), ratios=parse_sizes(args.ratios, "--ratios"),
        masks=parse_names(args.masks, "--masks"), kv_heads=args.kv_heads, head_dim=args.head_dim, group=args.group,
        batch=args.batch, dtype=args.dtype, sinks=args.sinks, window=args.window, repeats=args.repeats,
        warmup=args.warmup, seed=args.seed, threads=args.threads,
    )
    return _print_bench(run_prefill_bench(settings), format_prefill_table, plot_prefill, args)


def _print_bench(result: dict, format_table, plot, args) -> int:
    """Print a benchmark's table, then its plot path, then its JSON line last."""
    print(format_table(result))
    if not args.no_plot:
        result["plot"] = str(plot(result, Path(args.plot)))
        print(f"plot: {result['plot']}")
    print(json.dumps(result), flush=True)
    return 0


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise InvalidInputError(f"--threads must be at least 1, got {threads}; omit it to use torch's default")
    import torch

    torch.set_num_threads(threads)


class _PrefillProgress:
    """A tqdm bar over decoder layers during the prefill of long prompts."""

    def __init__(self, num_layers: int, prompt_tokens: int):
        self.bar = None
        if prompt_tokens >= PROGRESS_MIN_TOKENS:
            from tqdm import tqdm

            self.bar = tqdm(total=num_layers, desc=f"prefill {prompt_tokens} tokens with gists", unit="layer", file=sys.stderr, leave=False)

    def on_layer(self, layer_idx: int, prefill: bool) -> None:
        if prefill and self.bar is not None:
            self.bar.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
