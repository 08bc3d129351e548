"""The ``gsa`` command line: a thin layer over the library that parses, validates and prints."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
from importlib import resources
from pathlib import Path

from gsa.errors import InvalidInputError

EXIT_USAGE = 2
SAMPLE_DOCUMENT = "sample_document.md"
SAMPLE_QUESTIONS = "sample_questions.json"
PROGRESS_MIN_TOKENS = 1024  # prompts at least this long show a prefill progress bar


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gsa", description="Gist Sparse Attention for Hugging Face causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="answer a question over a long context")
    gen.add_argument("--context", help="text file to read, or - for standard input (default: the bundled sample document)")
    gen.add_argument("--question", help="question to answer (default with the sample document: its first sample question)")
    gen.add_argument("--model", help="local model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    gen.add_argument("--ratio", type=int, default=16, help="compression ratio, the chunk size C in tokens (default 16)")
    gen.add_argument("--method", default="gsa", help="gsa, gist-only, full, or a training-free baseline: "
                     "streaming, quest, mean-key, random, recent, oracle (default gsa)")
    gen.add_argument("--top-k", type=int, help="chunks recalled per query head (default: the budget rule)")
    gen.add_argument("--top-p", type=float, help="recall chunks until their gist-score mass reaches this share")
    gen.add_argument("--merge", default="union", help="GQA merge of head choices: union or group-sum (default union)")
    gen.add_argument("--prefill", default="gist", help="gist (gist mask) or dense (full causal context, gists only route)")
    gen.add_argument("--impl", default="fast", help="fast or naive (loop reference, for small inputs)")
    gen.add_argument("--sinks", type=int, default=3, help="leading tokens never chunked (default 3)")
    gen.add_argument("--window", type=int, default=1, help="previous chunks kept raw-visible (default 1)")
    gen.add_argument("--word-boundary", action="store_true", help="move chunk ends up to C/2 tokens to avoid splitting words")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="maximum tokens to generate (default 32)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_generate(args)
    except InvalidInputError as error:
        print(f"gsa: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gsa: interrupted", file=sys.stderr)
        return 130


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


def _default_question(context_name: str) -> str:
    if context_name != "sample":
        raise InvalidInputError("--question is missing; pass the question to answer over the context")
    questions = json.loads(resources.files("gsa.data").joinpath(SAMPLE_QUESTIONS).read_text(encoding="utf-8"))
    return questions[0]["question"]


def _build_config(args):
    from gsa.config import GSAConfig
    from gsa.layout import GistSpec

    if args.max_new_tokens < 1:
        raise InvalidInputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.ratio < 1:
        raise InvalidInputError(f"--ratio must be at least 1, got {args.ratio}; it is the chunk size in tokens")
    if args.sample and not args.temperature > 0:
        raise InvalidInputError(
            f"--temperature must be above 0 with --sample, got {args.temperature}; omit --sample for greedy decoding"
        )
    spec = GistSpec(chunk_size=args.ratio, sinks=args.sinks, window_chunks=args.window, word_boundary=args.word_boundary)
    return GSAConfig(spec=spec, method=args.method, top_k=args.top_k, top_p=args.top_p, merge=args.merge,
                     prefill=args.prefill, impl=args.impl)


def run_generate(args) -> int:
    config = _build_config(args)
    context, name = read_context(args.context)
    question = args.question if args.question else _default_question(name)

    import torch
    import transformers
    from transformers import TextStreamer

    from gsa.engine import GistGenerator
    from gsa.model import load_model

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    # The GGUF loader draws its own progress bar on stderr; it is shown only with --verbose.
    with contextlib.nullcontext() if args.verbose else contextlib.redirect_stderr(io.StringIO()):
        model, tokenizer = load_model(args.model)
    generator = GistGenerator(model, tokenizer)
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
        print(
            f"\n[{result.method} {result.ratio}x] context {result.context_tokens} tokens, {result.gist_tokens} gists, "
            f"{result.decode_steps} decode steps, {result.mean_unfolded_tokens_per_step:.0f} raw tokens attended per "
            f"step and layer, {result.mean_attended_kv_fraction:.1%} of full attention's keys, {result.seconds:.1f} s"
        )
    return 0


class _PrefillProgress:
    """A tqdm bar over decoder layers during the prefill of long prompts."""

    def __init__(self, num_layers: int, prompt_tokens: int):
        self.bar = None
        if prompt_tokens >= PROGRESS_MIN_TOKENS:
            from tqdm import tqdm

            self.bar = tqdm(total=num_layers, desc=f"prefill {prompt_tokens} tokens", unit="layer", file=sys.stderr, leave=False)

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
