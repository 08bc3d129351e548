"""Gist layout: where gist tokens go in a sequence, and the per-token metadata masks and caches read.

A gisted sequence is the context, cut into chunks of C raw tokens with one gist token after each
full chunk, followed by the suffix (question or instruction), which stays raw:

    [sink x S] [raw x C, gist] [raw x C, gist] ... [tail < C] [suffix ...]

Metadata per token:

- ``kind``: one of ``TokenKind`` (sink, raw chunk token, gist, tail, suffix, padding);
- ``chunk``: the index of the level-1 chunk the token belongs to. A gist belongs to the chunk it
  closes. Sinks get -1. The tail (the last, partial chunk of the context, which gets no gist) and
  the suffix form one final chunk with index N, the number of full chunks;
- ``level``: 0 for every non-gist token, l for a gist of level l. With chunk sizes
  (C1, C2, ..., CL), a level-l gist follows every C_l gists of level l - 1, right after the
  level-(l-1) gist that completes its section. Gists above level 1 get chunk index -1, so the
  chunk rules of the masks (own chunk, local window) never apply to them;
- ``position``: the RoPE position. Raw tokens keep the positions they would have without gists,
  and a gist reuses the position of the last raw token of its chunk.

A multi-level batch also carries a ``gsa.hierarchy.Hierarchy``: the section index of every token
at every level, the gist columns of each level above 1 and the parent of each gist.

Batches are left-padded, so that every row's last token sits in the last column and decode steps
append in step. Besides the flat tensors, a batch carries index maps from each cache tier (sinks,
chunk raw tokens, gists, recent tokens) to input columns; the cache and the selective attention
read the tiers through them.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from gsa.errors import InvalidInputError
from gsa.hierarchy import Hierarchy, build_hierarchy


class TokenKind(enum.IntEnum):
    """Role of a token in a gisted sequence."""

    SINK = 0
    RAW = 1
    GIST = 2
    TAIL = 3
    SUFFIX = 4
    PAD = 5


@dataclass(frozen=True)
class GistSpec:
    """Layout settings: chunk sizes of every gist level, sinks and the local window.

    Attributes:
        chunk_size: raw tokens per level-1 chunk, C1. The compression ratio of one level is C1.
        sinks: leading tokens that are never chunked and stay visible to every token, S.
        window_chunks: previous chunks that stay raw-visible to every token, P (the local window).
        word_boundary: move a chunk's end forward by at most C // 2 tokens so it does not split
            a word; chunks are then between C and C + C // 2 tokens long.
        fanouts: gists of level l - 1 per level-l gist, (C2, ..., CL), for a gist-of-gists
            layout; empty for one level. The compression ratio is C1 * C2 * ... * CL.
    """

    chunk_size: int = 16
    sinks: int = 3
    window_chunks: int = 1
    word_boundary: bool = False
    fanouts: tuple[int, ...] = ()

    @classmethod
    def from_sizes(cls, sizes: Sequence[int], **options) -> GistSpec:
        """Build a spec from the chunk sizes of every level, lowest first: ``from_sizes((4, 4))`` is 16x."""
        sizes = tuple(sizes)
        if not sizes:
            raise InvalidInputError("chunk sizes are empty; pass at least one size, such as (16,) or (4, 4)")
        return cls(chunk_size=sizes[0], fanouts=sizes[1:], **options)

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise InvalidInputError(f"chunk size must be at least 1, got {self.chunk_size}")
        if self.sinks < 0:
            raise InvalidInputError(f"the number of sink tokens must be 0 or more, got {self.sinks}")
        if self.window_chunks < 0:
            raise InvalidInputError(f"the local window must be 0 or more chunks, got {self.window_chunks}")
        object.__setattr__(self, "fanouts", tuple(int(f) for f in self.fanouts))
        if any(fanout < 1 for fanout in self.fanouts):
            raise InvalidInputError(f"every chunk size above level 1 must be at least 1, got {self.fanouts}")

    @property
    def chunk_sizes(self) -> tuple[int, ...]:
        """Chunk size of each level, lowest first: (C1, C2, ..., CL)."""
        return (self.chunk_size, *self.fanouts)

    @property
    def num_levels(self) -> int:
        return 1 + len(self.fanouts)

    @property
    def ratio(self) -> int:
        """Compression ratio, the product of the chunk sizes of all levels."""
        return math.prod(self.chunk_sizes)

    @property
    def ratio_label(self) -> str:
        """The chunk sizes as the command line writes them: ``16``, ``4x4``, ``8x4x4``."""
        return format_ratio(self.chunk_sizes)

    @property
    def max_chunk_len(self) -> int:
        return self.chunk_size + (self.chunk_size // 2 if self.word_boundary else 0)


RATIO_PATTERN = re.compile(r"[1-9][0-9]*(x[1-9][0-9]*)*")


def parse_ratio(text: str, option: str = "--ratio") -> tuple[int, ...]:
    """Parse a compression ratio into chunk sizes, lowest level first: ``16`` -> (16,), ``4x4`` -> (4, 4)."""
    cleaned = str(text).strip().lower()
    if RATIO_PATTERN.fullmatch(cleaned) is None:
        raise InvalidInputError(
            f"{option} must be a chunk size of at least 1, or one such size per level joined by x "
            f"(such as 16, 4x4 or 8x4x4); got {text}"
        )
    return tuple(int(part) for part in cleaned.split("x"))


def format_ratio(sizes: Sequence[int]) -> str:
    """Join chunk sizes as ``parse_ratio`` reads them: (4, 4) -> ``4x4``."""
    return "x".join(str(size) for size in sizes)


@dataclass
class GistedSequence:
    """One gisted sequence as plain lists, before batching."""

    input_ids: list[int]
    position_ids: list[int]
    kind: list[int]
    chunk: list[int]
    num_chunks: int
    level: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def append(self, token: int, position: int, kind: TokenKind, chunk: int, level: int = 0) -> None:
        self.input_ids.append(token)
        self.position_ids.append(position)
        self.kind.append(int(kind))
        self.chunk.append(chunk)
        self.level.append(level)


def chunk_bounds(length: int, spec: GistSpec, word_starts: list[bool] | None = None) -> list[tuple[int, int]]:
    """Return the [start, end) bounds of the full chunks in a context of ``length`` raw tokens.

    Chunking starts after the sinks. With ``spec.word_boundary`` and ``word_starts`` (True where a
    token begins a word), a chunk end that would fall inside a word moves forward to the next
    word start, by at most C // 2 tokens.
    """
    if spec.word_boundary and word_starts is not None and len(word_starts) != length:
        raise InvalidInputError(
            f"word_starts has {len(word_starts)} entries for a context of {length} tokens; pass one flag per token"
        )
    bounds = []
    start = min(spec.sinks, length)
    while start + spec.chunk_size <= length:
        end = start + spec.chunk_size
        if spec.word_boundary and word_starts is not None:
            end = _next_word_start(end, length, spec.chunk_size // 2, word_starts)
        bounds.append((start, end))
        start = end
    return bounds


def _next_word_start(end: int, length: int, max_shift: int, word_starts: list[bool]) -> int:
    for shift in range(max_shift + 1):
        if end + shift >= length:
            break
        if word_starts[end + shift]:
            return end + shift
    return end


def insert_gists(
    context_ids: list[int],
    suffix_ids: list[int],
    gist_id: int | Sequence[int] | None,
    spec: GistSpec,
    word_starts: list[bool] | None = None,
) -> GistedSequence:
    """Insert one gist after every full chunk of ``context_ids`` and append ``suffix_ids`` raw.

    ``gist_id`` is the gist token, or one token per level (level 1 first) for a multi-level spec.
    A level-l gist follows the level-(l-1) gist that completes a section of C_l of them, at the
    same position. With ``gist_id=None`` no gist is inserted and the whole context is one final
    chunk with the suffix: the layout of plain full attention, used by the ``full`` method.
    """
    seq = GistedSequence([], [], [], [], num_chunks=0)
    gist_ids = _gist_ids_by_level(gist_id, spec)
    bounds = chunk_bounds(len(context_ids), spec, word_starts) if gist_ids else []
    seq.num_chunks = len(bounds)

    # Sinks, then each full chunk followed by its gist at the position of the chunk's last token.
    sink_end = bounds[0][0] if bounds else min(spec.sinks, len(context_ids))
    for i in range(sink_end):
        seq.append(context_ids[i], i, TokenKind.SINK, -1)
    for n, (start, end) in enumerate(bounds):
        for i in range(start, end):
            seq.append(context_ids[i], i, TokenKind.RAW, n)
        seq.append(gist_ids[0], end - 1, TokenKind.GIST, n, level=1)
        _close_sections(seq, gist_ids, spec.fanouts, n + 1, end - 1)

    # The tail of the context and the suffix share the final chunk index N.
    tail_start = bounds[-1][1] if bounds else sink_end
    for i in range(tail_start, len(context_ids)):
        seq.append(context_ids[i], i, TokenKind.TAIL, seq.num_chunks)
    for j, token in enumerate(suffix_ids):
        seq.append(token, len(context_ids) + j, TokenKind.SUFFIX, seq.num_chunks)
    return seq


def _gist_ids_by_level(gist_id: int | Sequence[int] | None, spec: GistSpec) -> list[int]:
    if gist_id is None:
        return []
    ids = [gist_id] if isinstance(gist_id, int) else list(gist_id)
    if len(ids) < spec.num_levels:
        raise InvalidInputError(
            f"got {len(ids)} gist token id(s) for a {spec.num_levels}-level layout ({spec.ratio_label}); "
            "pass one id per level, as enable_gsa(model, tokenizer, levels=L) returns"
        )
    return ids[: spec.num_levels]


def _close_sections(seq: GistedSequence, gist_ids: list[int], fanouts: tuple[int, ...], count: int, position: int) -> None:
    """Append the higher-level gists that the ``count``-th level-1 gist completes, lowest level first."""
    for level, fanout in enumerate(fanouts, start=2):
        if count % fanout != 0:
            return
        count //= fanout
        seq.append(gist_ids[level - 1], position, TokenKind.GIST, -1, level=level)


def strip_gists(input_ids: list[int], kind: list[int]) -> list[int]:
    """Return ``input_ids`` without gist and padding tokens."""
    return [t for t, k in zip(input_ids, kind) if k not in (TokenKind.GIST, TokenKind.PAD)]


@dataclass
class GistBatch:
    """A left-padded batch of gisted sequences with the index maps of the cache tiers.

    Shapes (B batch, L columns, S0 sinks, N chunks, Cm max chunk length, R recent, Tq suffix
    queries). Index maps hold input columns, -1 for padding slots.
    """

    spec: GistSpec
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L), 1 for real tokens
    position_ids: torch.Tensor  # (B, L)
    kind: torch.Tensor  # (B, L)
    chunk: torch.Tensor  # (B, L)
    level: torch.Tensor  # (B, L): 0 for non-gists, l for a level-l gist
    num_chunks: torch.Tensor  # (B,)
    sink_index: torch.Tensor  # (B, S0)
    chunk_index: torch.Tensor  # (B, N, Cm)
    gist_index: torch.Tensor  # (B, N)
    recent_index: torch.Tensor  # (B, R): tail and suffix
    suffix_index: torch.Tensor  # (B, Tq): suffix columns, the queries that select
    suffix_slot: torch.Tensor  # (B, Tq): their slot in the recent tier
    extras: dict = field(default_factory=dict)
    hierarchy: Hierarchy | None = None  # sections and gist maps above level 1; None for one level

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> GistBatch:
        moved = {name: getattr(self, name).to(device) for name in _TENSOR_FIELDS}
        hierarchy = self.hierarchy.to(device) if self.hierarchy is not None else None
        return GistBatch(spec=self.spec, extras=self.extras, hierarchy=hierarchy, **moved)


_TENSOR_FIELDS = (
    "input_ids", "attention_mask", "position_ids", "kind", "chunk", "level", "num_chunks", "sink_index",
    "chunk_index", "gist_index", "recent_index", "suffix_index", "suffix_slot",
)


def collate(sequences: list[GistedSequence], spec: GistSpec, pad_id: int) -> GistBatch:
    """Left-pad gisted sequences into a batch and build the tier index maps."""
    if not sequences:
        raise ValueError("cannot collate an empty list of sequences")
    width = max(len(s) for s in sequences)
    rows = [_pad_row(s, width, pad_id) for s in sequences]
    input_ids, position_ids, kind, chunk, level = (torch.tensor(column, dtype=torch.long) for column in zip(*rows))
    num_chunks = torch.tensor([s.num_chunks for s in sequences], dtype=torch.long)

    maps = [_tier_maps(kind[b], chunk[b], level[b], int(num_chunks[b])) for b in range(len(sequences))]
    sink_index = _pad_lists([m["sink"] for m in maps])
    gist_index = _pad_lists([m["gist"] for m in maps])
    recent_index = _pad_lists([m["recent"] for m in maps], left=True)
    suffix_index = _pad_lists([m["suffix"] for m in maps], left=True)
    chunk_index = _pad_chunks([m["chunks"] for m in maps], max(spec.max_chunk_len, 1))

    # A suffix query's recent slot: recent columns are increasing, so search the column.
    suffix_slot = torch.full_like(suffix_index, -1)
    for b in range(len(sequences)):
        valid = suffix_index[b] >= 0
        suffix_slot[b, valid] = torch.searchsorted(recent_index[b], suffix_index[b, valid])

    hierarchy = build_hierarchy(kind == TokenKind.GIST, chunk, level, spec.fanouts) if spec.fanouts else None
    return GistBatch(
        spec=spec, input_ids=input_ids, attention_mask=(kind != TokenKind.PAD).long(),
        position_ids=position_ids, kind=kind, chunk=chunk, level=level, num_chunks=num_chunks,
        sink_index=sink_index, chunk_index=chunk_index, gist_index=gist_index,
        recent_index=recent_index, suffix_index=suffix_index, suffix_slot=suffix_slot, hierarchy=hierarchy,
    )


def _pad_row(seq: GistedSequence, width: int, pad_id: int) -> tuple[list[int], ...]:
    pad = width - len(seq)
    return (
        [pad_id] * pad + seq.input_ids,
        [0] * pad + seq.position_ids,
        [int(TokenKind.PAD)] * pad + seq.kind,
        [-1] * pad + seq.chunk,
        [0] * pad + seq.level,
    )


def _tier_maps(kind: torch.Tensor, chunk: torch.Tensor, level: torch.Tensor, num_chunks: int) -> dict[str, list]:
    columns = torch.arange(kind.numel())
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    raw = kind == TokenKind.RAW
    for col, n in zip(columns[raw].tolist(), chunk[raw].tolist()):
        chunks[n].append(col)
    recent = (kind == TokenKind.TAIL) | (kind == TokenKind.SUFFIX)
    return {
        "sink": columns[kind == TokenKind.SINK].tolist(),
        "gist": columns[(kind == TokenKind.GIST) & (level == 1)].tolist(),  # higher levels: Hierarchy
        "recent": columns[recent].tolist(),
        "suffix": columns[kind == TokenKind.SUFFIX].tolist(),
        "chunks": chunks,
    }


def _pad_lists(lists: list[list[int]], left: bool = False) -> torch.Tensor:
    width = max((len(x) for x in lists), default=0)
    padded = [([-1] * (width - len(x)) + x) if left else (x + [-1] * (width - len(x))) for x in lists]
    return torch.tensor(padded, dtype=torch.long).reshape(len(lists), width)


def _pad_chunks(per_row: list[list[list[int]]], chunk_len: int) -> torch.Tensor:
    num_chunks = max((len(r) for r in per_row), default=0)
    out = torch.full((len(per_row), num_chunks, chunk_len), -1, dtype=torch.long)
    for b, row in enumerate(per_row):
        for n, cols in enumerate(row):
            out[b, n, : len(cols)] = torch.tensor(cols, dtype=torch.long)
    return out
