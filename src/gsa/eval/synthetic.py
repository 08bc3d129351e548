"""Synthetic tasks built from background text: pass key retrieval, needles in a haystack, perplexity.

``passkey`` and ``niah`` hide sentences in Paul Graham's essays (``haystack/paul_graham_essays``)
at chosen depths, for a grid of context lengths in tokens times depths. Extra settings are read
from attributes of ``TaskOptions`` when present: ``lengths`` (default ``[2048, 4096]``) and
``depths`` (default ``[0.0, 0.25, 0.5, 0.75, 1.0]``, fractions of the context). ``perplexity``
cuts held-out documents into a context and a continuation whose likelihood the runner measures.
"""

from __future__ import annotations

import bisect
import logging
import math
import re
from pathlib import Path
from typing import Any

from gsa.errors import InvalidInputError
from gsa.eval.task_io import (
    check_limit, count_tokens, data_file, decode, encode, limit_items, read_jsonl, require_field, seeded_rng,
    task_option,
)
from gsa.eval.types import Sample, TaskOptions

logger = logging.getLogger(__name__)

HAYSTACK_DIR = "haystack/paul_graham_essays"
DOCS_FILE = "corpus/python-3.11-docs.jsonl.gz"

PASSKEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_SUFFIX = "\n\nWhat is the pass key? The pass key is"
NEEDLE_SENTENCE = "The secret ingredient number {number} for the recipe is {word}."
INGREDIENTS = (
    "saffron", "cardamom", "tamarind", "sumac", "fenugreek", "juniper",
    "lemongrass", "nutmeg", "paprika", "turmeric", "galangal", "anise",
)
NEEDLE_COUNT = 3
# Depth gap between neighbouring needles of one niah context.
NEEDLE_SPACING = 0.1

# A sentence ends at ., ! or ? (after any closing quotes or brackets) followed by whitespace.
SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)")
# How often a context is rebuilt with a corrected filler size to reach the target token count.
LENGTH_RETRIES = 8
# Filler tokens tokenized beyond the target length, so that corrections have text to draw from.
FILLER_MARGIN = 256


def _positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is a positive integer and raise InvalidInputError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    return value


def _grid(options: TaskOptions) -> list[tuple[int, float]]:
    """Return the (length, depth) pairs of the needle tasks, lengths outermost."""
    lengths = task_option(options, "lengths", [2048, 4096])
    depths = task_option(options, "depths", [0.0, 0.25, 0.5, 0.75, 1.0])
    lengths = [_positive_int("each entry of lengths", length) for length in lengths]
    for depth in depths:
        if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
            raise InvalidInputError(f"each depth must be a number from 0 to 1, got {depth!r}")

    grid = [(length, float(depth)) for length in lengths for depth in depths]
    names = [f"{length}:{depth:.2f}" for length, depth in grid]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"lengths and depths must give distinct pairs at 2 decimals, got {names}")
    return grid


def _read_haystack(options: TaskOptions) -> str:
    """Read the essays in sorted file order, joined by blank lines."""
    folder = Path(options.data_dir) / HAYSTACK_DIR
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    if not files:
        raise InvalidInputError(
            f"haystack essays (*.txt) not found: expected them in {folder}; set TaskOptions.data_dir to "
            "the data directory that contains them"
        )
    haystack = "\n\n".join(path.read_text(encoding="utf-8").strip() for path in files)
    if not haystack.strip():
        raise InvalidInputError(f"the haystack essays in {folder} are empty; add text to them")
    return haystack


def _haystack_ids(tokenizer: Any, haystack: str, count: int) -> list[int]:
    """Tokenize at least ``count`` tokens of the haystack, repeating the text when it is too short."""
    chars = 6 * count + 1000
    while True:
        repeats = math.ceil(chars / len(haystack))
        ids = encode(tokenizer, "\n\n".join([haystack] * repeats)[:chars])
        # The cut at ``chars`` can split the last token, so one more token than needed is kept.
        if len(ids) > count:
            return ids[:count]
        chars *= 2


def _insert_needles(filler: str, needles: list[tuple[float, str]]) -> tuple[str, list[int]]:
    """Insert each ``(depth, sentence)`` at the sentence boundary nearest to ``depth`` of the filler.

    Returns the text and the character offset of each needle in it, in the order of ``needles``.
    """
    boundaries = [0] + [match.end() for match in SENTENCE_END.finditer(filler)] + [len(filler)]
    placements = []
    for order, (depth, sentence) in enumerate(needles):
        target = depth * len(filler)
        index = bisect.bisect_left(boundaries, target)
        candidates = boundaries[max(index - 1, 0):index + 1]
        position = min(candidates, key=lambda boundary: abs(boundary - target))
        placements.append((position, order, sentence))

    text = ""
    cursor = 0
    offsets = [0] * len(needles)
    for position, order, sentence in sorted(placements):
        text += filler[cursor:position]
        cursor = position
        if text and not text[-1].isspace():
            text += " "
        offsets[order] = len(text)
        text += sentence
        if position < len(filler) and not filler[position].isspace():
            text += " "
    return text + filler[cursor:], offsets


def _build_context(
    tokenizer: Any, filler_ids: list[int], length: int, needles: list[tuple[float, str]]
) -> tuple[str, list[int], int]:
    """Fill a context of ``length`` tokens with haystack text and the needles.

    The filler is resized until the whole context has ``length`` tokens, or as close as
    ``LENGTH_RETRIES`` attempts get. Returns the text, the needle offsets and the token count.
    """
    needle_tokens = sum(count_tokens(tokenizer, " " + sentence) for _, sentence in needles)
    filler_count = length - needle_tokens
    best: tuple[str, list[int], int] | None = None
    for _ in range(LENGTH_RETRIES):
        if filler_count < 1:
            raise InvalidInputError(f"context length {length} is too short for needles of {needle_tokens} tokens")
        filler = decode(tokenizer, filler_ids[:filler_count])
        text, offsets = _insert_needles(filler, needles)
        tokens = count_tokens(tokenizer, text)
        if best is None or abs(tokens - length) < abs(best[2] - length):
            best = (text, offsets, tokens)
        if tokens == length:
            break
        filler_count += length - tokens
    return best


def _grid_and_filler(options: TaskOptions) -> tuple[list[tuple[int, float]], list[int]]:
    """Return the (length, depth) grid and enough essay token ids for its longest context."""
    haystack = _read_haystack(options)
    grid = limit_items(_grid(options), options)
    longest = max((length for length, _ in grid), default=0)
    return grid, _haystack_ids(options.tokenizer, haystack, longest + FILLER_MARGIN)


def load_passkey(options: TaskOptions) -> list[Sample]:
    """Build pass key retrieval samples: a 5-digit key hidden in essays, one per length and depth."""
    grid, filler_ids = _grid_and_filler(options)

    samples = []
    for length, depth in grid:
        key = str(seeded_rng("passkey", options.seed, length, depth).randint(10000, 99999))
        context, offsets, tokens = _build_context(
            options.tokenizer, filler_ids, length, [(depth, PASSKEY_SENTENCE.format(key=key))]
        )
        samples.append(Sample(
            id=f"passkey:{length}:{depth:.2f}", context=context, suffix=PASSKEY_SUFFIX, answers=[key],
            metric="contains", max_new_tokens=10,
            extra={"length": length, "depth": depth, "context_tokens": tokens, "needle_offset": offsets[0]},
        ))
    return samples


def _needle_depths(depth: float) -> list[float]:
    """Space the needles ``NEEDLE_SPACING`` apart around ``depth``, shifted to stay within 0 and 1."""
    span = (NEEDLE_COUNT - 1) * NEEDLE_SPACING
    start = min(max(depth - span / 2, 0.0), 1.0 - span)
    return [round(start + index * NEEDLE_SPACING, 6) for index in range(NEEDLE_COUNT)]


def load_niah(options: TaskOptions) -> list[Sample]:
    """Build needle-in-a-haystack samples with several needles, querying the needle at the grid depth.

    The needles are numbered in a seeded random order, so a needle's number does not give away
    its position.
    """
    grid, filler_ids = _grid_and_filler(options)

    samples = []
    for length, depth in grid:
        rng = seeded_rng("niah", options.seed, length, depth)
        numbers = list(range(1, NEEDLE_COUNT + 1))
        rng.shuffle(numbers)
        words = rng.sample(INGREDIENTS, NEEDLE_COUNT)
        depths = _needle_depths(depth)
        sentences = [NEEDLE_SENTENCE.format(number=number, word=word) for number, word in zip(numbers, words)]
        needle_specs = list(zip(depths, sentences))
        context, offsets, tokens = _build_context(options.tokenizer, filler_ids, length, needle_specs)

        queried = min(range(NEEDLE_COUNT), key=lambda index: abs(depths[index] - depth))
        number = numbers[queried]
        needles = [
            {"number": numbers[index], "word": words[index], "depth": depths[index], "offset": offsets[index]}
            for index in range(NEEDLE_COUNT)
        ]
        samples.append(Sample(
            id=f"niah:{length}:{depth:.2f}", context=context,
            suffix=(
                f"\n\nWhat is secret ingredient number {number} for the recipe? "
                f"The secret ingredient number {number} for the recipe is"
            ),
            answers=[words[queried]], metric="contains", max_new_tokens=10,
            extra={
                "length": length, "depth": depth, "context_tokens": tokens, "needles": needles,
                "queried_number": number,
            },
        ))
    return samples


def load_perplexity(options: TaskOptions) -> list[Sample]:
    """Cut held-out documents into a context and a continuation for measuring perplexity.

    Documents are visited in a seeded random order, and each one with at least
    ``lengths[0] + continuation_tokens`` tokens gives one sample, up to ``num_documents``
    (default 10) samples. The context is the document's first ``lengths[0]`` tokens (default
    2048) and the continuation the next ``continuation_tokens`` (default 256).
    """
    path = data_file(options, DOCS_FILE)
    lengths = task_option(options, "lengths", [2048])
    if not lengths:
        raise InvalidInputError("lengths must list at least one context length in tokens")
    context_tokens = _positive_int("lengths[0]", lengths[0])
    continuation_tokens = _positive_int("continuation_tokens", task_option(options, "continuation_tokens", 256))
    max_samples = _positive_int("num_documents", task_option(options, "num_documents", 10))
    limit = check_limit(options.limit)
    if limit is not None:
        max_samples = min(max_samples, limit)
    needed = context_tokens + continuation_tokens

    rows = read_jsonl(path)
    order = list(range(len(rows)))
    seeded_rng("perplexity", options.seed).shuffle(order)
    samples = []
    for index in order:
        if len(samples) >= max_samples:
            break
        where = f"line {index + 1} of {path}"
        text = require_field(rows[index], "text", where)
        # NOTE: skipping texts with fewer UTF-8 bytes than needed tokens saves tokenizing short
        # documents. It assumes that each token covers at least one byte, as in byte-level BPE.
        if len(text.encode("utf-8")) < needed:
            continue
        ids = encode(options.tokenizer, text)
        if len(ids) < needed:
            continue
        name = require_field(rows[index], "path", where)
        samples.append(Sample(
            id=f"perplexity:{name}", context=decode(options.tokenizer, ids[:context_tokens]), suffix="",
            answers=[decode(options.tokenizer, ids[context_tokens:needed])], metric="perplexity", max_new_tokens=0,
            extra={"path": name, "context_tokens": context_tokens, "continuation_tokens": continuation_tokens},
        ))
    if len(samples) < max_samples:
        logger.warning(
            "only %d documents in %s have at least %d tokens, fewer than the %d samples requested",
            len(samples), path, needed, max_samples,
        )
    return samples
