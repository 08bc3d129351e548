"""Training examples: corpus readers, packing, gist insertion and loss targets.

A training example is a gisted sequence plus a target per column: the id of the raw token that
column should predict, or ``IGNORE`` for columns that predict nothing. Gists of every level never
predict and are never predicted, so the target of the last raw token of a chunk skips the gists
that follow it and names the first raw token of the next chunk. Packed pretraining windows overlap by one token, so
every corpus token after the first is predicted exactly once.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator, Sequence

import torch

from gsa.errors import InvalidInputError
from gsa.eval.task_io import iter_jsonl
from gsa.layout import GistBatch, GistedSequence, GistSpec, TokenKind, collate, insert_gists

logger = logging.getLogger(__name__)

IGNORE = -100  # the target of a column that predicts nothing (cross_entropy's ignore_index)
GistIds = int | Sequence[int] | None  # one gist token, one per level (level 1 first), or none
TEXT_FIELDS = ("text", "content", "body")


@dataclass
class Document:
    name: str
    text: str


@dataclass
class Example:
    """One gisted training sequence with per-column targets (IGNORE where nothing is predicted)."""

    sequence: GistedSequence
    targets: list[int]
    spec: GistSpec


def read_documents(path: Path) -> Iterator[Document]:
    """Yield the documents of a corpus file or folder.

    Accepted: ``.txt`` (one document), ``.jsonl`` (one document per line, text in a ``text``,
    ``content`` or ``body`` field), both optionally gzip-compressed (``.gz``), and folders of
    ``.txt`` files (one document each, in sorted order).
    """
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise InvalidInputError(f"corpus folder {path} has no .txt files; add text files or pass a file")
        for file in files:
            yield Document(file.name, file.read_text(encoding="utf-8"))
        return
    if not path.is_file():
        raise InvalidInputError(f"corpus path {path} not found; check data.dir and data.corpus")

    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            if name.endswith(".jsonl"):
                yield from _jsonl_documents(handle, path)
            else:
                yield Document(name, handle.read())
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"corpus file {path} could not be read ({error}); pass an intact text, JSONL or gzip file") from error


def _jsonl_documents(handle, path: Path) -> Iterator[Document]:
    for number, row in iter_jsonl(handle, path):
        text = next((row[f] for f in TEXT_FIELDS if isinstance(row.get(f), str)), None)
        if text is None:
            raise InvalidInputError(f"line {number} of {path} has no text field; expected one of {', '.join(TEXT_FIELDS)}")
        yield Document(str(row.get("path") or row.get("citation") or number), text)


def is_heldout(corpus: str, name: str, fraction: float) -> bool:
    """Return whether document ``name`` of ``corpus`` is held out, by a stable hash (no seed)."""
    digest = hashlib.sha256(f"{corpus}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def corpus_tokens(
    paths: list[Path], tokenizer, split: str, heldout_fraction: float, max_tokens: int,
) -> list[list[int]]:
    """Tokenise each corpus into one stream of the ``train`` or ``heldout`` split's documents.

    Documents are joined with the end-of-sequence token, and each stream stops after
    ``max_tokens`` tokens.
    """
    streams = []
    eos = tokenizer.eos_token_id
    for path in paths:
        stream: list[int] = []
        for doc in read_documents(path):
            if is_heldout(path.name, doc.name, heldout_fraction) != (split == "heldout"):
                continue
            stream.extend(tokenizer(doc.text, add_special_tokens=False)["input_ids"])
            if eos is not None:
                stream.append(eos)
            if len(stream) >= max_tokens:
                break
        if len(stream) < 2:
            raise InvalidInputError(
                f"corpus {path} has no {split} text; pass a corpus file with content (or lower data.heldout_fraction)"
            )
        streams.append(stream[:max_tokens])
        logger.info("read %d %s tokens from %s", len(streams[-1]), split, path)
    return streams


def pack(stream: list[int], seq_len: int) -> list[list[int]]:
    """Cut a token stream into windows of ``seq_len + 1`` tokens overlapping by one token."""
    return [stream[start:start + seq_len + 1] for start in range(0, len(stream) - seq_len, seq_len)]


def check_seq_len(seq_len: int, spec: GistSpec) -> None:
    if seq_len < spec.sinks + spec.chunk_size:
        raise InvalidInputError(
            f"sequence length {seq_len} is shorter than the sinks plus one chunk ({spec.sinks} + "
            f"{spec.chunk_size}); raise data.seq_len or use a smaller ratio"
        )


def pretrain_example(window: list[int], gist_id: GistIds, spec: GistSpec) -> Example:
    """Gist a window of ``n + 1`` tokens: the first n are inputs, and each predicts its successor.

    ``gist_id`` is the gist token, one token per level (level 1 first, as ``insert_gists`` takes
    it), or None for no gists.
    """
    sequence = insert_gists(window[:-1], [], gist_id, spec)
    raw_targets = window[1:]
    return Example(sequence, _raw_targets(sequence, raw_targets), spec)


def task_example(
    context_ids: list[int], prompt_ids: list[int], answer_ids: list[int], gist_id: GistIds, spec: GistSpec,
    context_loss: bool = False,
) -> Example:
    """Gist a fine-tuning sample: the suffix is the prompt followed by the answer.

    Only columns that predict an answer token get a target, unless ``context_loss`` also trains
    next-token prediction on the context.
    """
    sequence = insert_gists(context_ids, prompt_ids + answer_ids, gist_id, spec)
    stream = context_ids + prompt_ids + answer_ids
    first_answer = len(context_ids) + len(prompt_ids)  # index in ``stream`` of the first answer token

    raw_targets = stream[1:] + [IGNORE]
    for i in range(len(raw_targets)):
        in_answer = i + 1 >= first_answer
        if not in_answer and not (context_loss and i + 1 < len(context_ids)):
            raw_targets[i] = IGNORE
    return Example(sequence, _raw_targets(sequence, raw_targets), spec)


def _raw_targets(sequence: GistedSequence, raw_targets: list[int]) -> list[int]:
    """Spread per-raw-token targets over the gisted columns; gists of every level get IGNORE."""
    targets = []
    raw_index = 0
    for kind in sequence.kind:
        if kind == TokenKind.GIST:
            targets.append(IGNORE)
            continue
        targets.append(raw_targets[raw_index])
        raw_index += 1
    if raw_index != len(raw_targets):
        raise RuntimeError(f"layout has {raw_index} raw tokens but {len(raw_targets)} targets were given")
    return targets


@dataclass
class TrainBatch:
    """A collated micro-batch: the gist layout and (B, L) targets aligned with its columns."""

    batch: GistBatch
    targets: torch.Tensor

    def to(self, device) -> TrainBatch:
        return TrainBatch(self.batch.to(device), self.targets.to(device))


def collate_examples(examples: list[Example], pad_id: int) -> TrainBatch:
    """Left-pad examples of one layout spec into a batch; padding columns get IGNORE."""
    specs = {e.spec for e in examples}
    if len(specs) != 1:
        raise ValueError(f"a micro-batch must share one gist layout, got {len(specs)}")
    batch = collate([e.sequence for e in examples], examples[0].spec, pad_id)
    width = batch.input_ids.shape[1]
    targets = torch.tensor([[IGNORE] * (width - len(e.targets)) + e.targets for e in examples], dtype=torch.long)
    return TrainBatch(batch, targets)
