"""Helpers shared by the task loaders: data files, seeded random generators and token budgets."""

from __future__ import annotations

import gzip
import json
import logging
import random
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, TypeVar

from gsa.errors import InvalidInputError
from gsa.eval.types import TaskOptions

logger = logging.getLogger(__name__)

Item = TypeVar("Item")

# How often middle truncation shrinks its budget when decoding and re-encoding the kept halves
# yields more tokens than the budget (the tokens at the join can merge differently).
TRUNCATION_RETRIES = 8


def data_file(options: TaskOptions, relative: str) -> Path:
    """Resolve ``relative`` under the data directory and raise InvalidInputError if it is missing."""
    path = Path(options.data_dir) / relative
    if not path.is_file():
        raise InvalidInputError(
            f"data file {relative} not found: expected {path}; set TaskOptions.data_dir to the data "
            "directory that contains it"
        )
    return path


def read_json(path: Path) -> Any:
    """Parse a JSON file, raising InvalidInputError with the path when it is not valid JSON."""
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"invalid JSON in {path}: {error}") from error


def read_jsonl(path: Path) -> list[dict]:
    """Parse a JSON Lines file (gzip-compressed when the name ends in ``.gz``), skipping blank lines."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [row for _, row in iter_jsonl(handle, path)]


def iter_jsonl(lines: Iterable[str], path: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)`` for each non-blank line of JSON Lines read from ``path``."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidInputError(f"invalid JSON on line {number} of {path}: {error}") from error
        if not isinstance(row, dict):
            raise InvalidInputError(f"line {number} of {path} is not a JSON object")
        yield number, row


def require_field(row: dict, name: str, where: str) -> Any:
    """Return ``row[name]``, raising InvalidInputError that names the record when the field is missing."""
    if name not in row:
        raise InvalidInputError(f"{where} has no {name!r} field")
    return row[name]


def task_option(options: TaskOptions, name: str, default: Any) -> Any:
    """Read an optional task setting that callers may set as an extra attribute of ``options``."""
    return getattr(options, name, default)


def seeded_rng(*parts: object) -> random.Random:
    """Create a generator seeded from ``parts``, reproducible across processes and Python runs.

    A string seed is hashed with SHA-512 by ``random.Random``, so it does not depend on
    ``PYTHONHASHSEED`` the way ``hash()`` of a tuple would.
    """
    return random.Random(":".join(str(part) for part in parts))


def check_limit(limit: object) -> int | None:
    """Return ``limit`` if it is None or a non-negative integer and raise InvalidInputError otherwise."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise InvalidInputError(f"limit must be a non-negative integer or None, got {limit!r}")
    return limit


def limit_items(items: Sequence[Item], options: TaskOptions) -> list[Item]:
    """Keep the first ``options.limit`` items, or all of them when the limit is None."""
    limit = check_limit(options.limit)
    return list(items if limit is None else items[:limit])


def encode(tokenizer: Any, text: str) -> list[int]:
    """Tokenize ``text`` without special tokens such as BOS."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Turn token ids back into text, dropping special tokens and leaving spaces as they are."""
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def count_tokens(tokenizer: Any, text: str) -> int:
    """Count the tokens of ``text`` without special tokens."""
    return len(encode(tokenizer, text))


def check_token_budget(max_tokens: object) -> int:
    """Return ``max_tokens`` if it is a positive integer and raise InvalidInputError otherwise."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidInputError(f"max_context_tokens must be a positive integer, got {max_tokens!r}")
    return max_tokens


def truncate_middle(tokenizer: Any, text: str, max_tokens: int) -> tuple[str, bool]:
    """Cut the middle out of ``text`` so that it has at most ``max_tokens`` tokens.

    Like LongBench, the first and the last half of the budget are kept and their decoded texts
    joined. Returns the text and whether it was truncated; a text within the budget comes back
    unchanged.
    """
    check_token_budget(max_tokens)
    ids = encode(tokenizer, text)
    if len(ids) <= max_tokens:
        return text, False

    budget = max_tokens
    for _ in range(TRUNCATION_RETRIES):
        head = budget // 2
        tail = budget - head
        joined = decode(tokenizer, ids[:head]) + decode(tokenizer, ids[len(ids) - tail:])
        excess = count_tokens(tokenizer, joined) - max_tokens
        if excess <= 0:
            logger.debug("truncated a context of %d tokens to %d", len(ids), budget)
            return joined, True
        budget -= excess
        if budget < 1:
            break
    raise InvalidInputError(
        f"could not truncate a context of {len(ids)} tokens to {max_tokens} tokens; raise max_context_tokens"
    )
