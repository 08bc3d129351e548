"""Tests of the attention-mask rules against matrices and a plain-Python reference of the rules."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from gsa.layout import GistSpec, TokenKind, collate, insert_gists
from gsa.masks import (
    and_masks, block_mask, causal, dense_mask, dense_prefill_mask, gist_mask, gists, or_masks, own_chunk,
    padding, previous_chunks, sinks, sliding_window,
)

GIST_ID = 99
PAD_ID = 0

SINK, RAW, GIST, TAIL, SUFFIX, PAD = (int(k) for k in TokenKind)

# The sequence ``s a b G c d H e q`` drawn in the masks docstrings: one sink, chunks ``a b`` and
# ``c d`` closed by gists ``G`` and ``H``, the tail ``e`` and the suffix ``q`` (C=2, S=1, P=1).
NAMES = "s a b G c d H e q".split()
DOC_SPEC = GistSpec(chunk_size=2, sinks=1, window_chunks=1)
DOC_CONTEXT = [10, 11, 12, 13, 14, 15]  # s a b c d e
DOC_SUFFIX = [20]  # q

# Token t attends, causally, to its own chunk, the P=1 previous chunk, every gist and the sink.
GIST_MATRIX = [
    "x . . . . . . . .",  # s
    "x x . . . . . . .",  # a
    "x x x . . . . . .",  # b
    "x x x x . . . . .",  # G
    "x x x x x . . . .",  # c
    "x x x x x x . . .",  # d
    "x x x x x x x . .",  # H
    "x . . x x x x x .",  # e
    "x . . x x x x x x",  # q
]

# Raw tokens attend to every earlier raw token and no gist. A gist attends to its own chunk and the sink.
DENSE_PREFILL_MATRIX = [
    "x . . . . . . . .",  # s
    "x x . . . . . . .",  # a
    "x x x . . . . . .",  # b
    "x x x x . . . . .",  # G
    "x x x . x . . . .",  # c
    "x x x . x x . . .",  # d
    "x . . . x x x . .",  # H
    "x x x . x x . x .",  # e
    "x x x . x x . x x",  # q
]


def _doc_sequence():
    return insert_gists(DOC_CONTEXT, DOC_SUFFIX, GIST_ID, DOC_SPEC)


def _doc_batch():
    return collate([_doc_sequence()], DOC_SPEC, pad_id=PAD_ID)


def _render(row: torch.Tensor) -> str:
    return " ".join("x" if allowed else "." for allowed in row.tolist())


def _doc_dense(rule) -> torch.Tensor:
    return dense_mask(rule, 1, len(NAMES), len(NAMES))[0, 0]


# The docstring sequence


def test_doc_sequence_layout():
    batch = _doc_batch()

    assert batch.input_ids[0].tolist() == [10, 11, 12, 99, 13, 14, 99, 15, 20]
    assert batch.kind[0].tolist() == [SINK, RAW, RAW, GIST, RAW, RAW, GIST, TAIL, SUFFIX]
    assert batch.chunk[0].tolist() == [-1, 0, 0, 0, 1, 1, 1, 2, 2]


def test_gist_mask_doc_matrix():
    batch = _doc_batch()

    actual = _doc_dense(gist_mask(batch))

    for i, name in enumerate(NAMES):
        assert _render(actual[i]) == GIST_MATRIX[i], f"query {name}"


def test_dense_prefill_doc_matrix():
    batch = _doc_batch()

    actual = _doc_dense(dense_prefill_mask(batch))

    for i, name in enumerate(NAMES):
        assert _render(actual[i]) == DENSE_PREFILL_MATRIX[i], f"query {name}"


def test_gist_mask_window_zero():
    # With P=0, c and d no longer attend to chunk 0, and e, q no longer attend to chunk 1's raw tokens.
    spec = GistSpec(chunk_size=2, sinks=1, window_chunks=0)
    batch = collate([insert_gists(DOC_CONTEXT, DOC_SUFFIX, GIST_ID, spec)], spec, pad_id=PAD_ID)
    expected = [
        "x . . . . . . . .",  # s
        "x x . . . . . . .",  # a
        "x x x . . . . . .",  # b
        "x x x x . . . . .",  # G
        "x . . x x . . . .",  # c
        "x . . x x x . . .",  # d
        "x . . x x x x . .",  # H
        "x . . x . . x x .",  # e
        "x . . x . . x x x",  # q
    ]

    actual = _doc_dense(gist_mask(batch))

    for i, name in enumerate(NAMES):
        assert _render(actual[i]) == expected[i], f"query {name}"


def test_own_chunk_doc_rows():
    batch = _doc_batch()

    actual = _doc_dense(own_chunk(batch.chunk))

    assert _render(actual[NAMES.index("a")]) == ". x x x . . . . ."
    assert _render(actual[NAMES.index("G")]) == ". x x x . . . . ."
    assert _render(actual[NAMES.index("H")]) == ". . . . x x x . ."
    assert _render(actual[NAMES.index("e")]) == ". . . . . . . x x"
    assert _render(actual[NAMES.index("q")]) == ". . . . . . . x x"


def test_previous_chunks_doc_rows():
    batch = _doc_batch()

    actual = _doc_dense(previous_chunks(batch.chunk, 1))

    assert _render(actual[NAMES.index("a")]) == ". . . . . . . . ."
    assert _render(actual[NAMES.index("c")]) == ". x x x . . . . ."
    assert _render(actual[NAMES.index("e")]) == ". . . . x x x . ."
    assert _render(actual[NAMES.index("q")]) == ". . . . x x x . ."


def test_previous_chunks_count_two():
    batch = _doc_batch()

    actual = _doc_dense(previous_chunks(batch.chunk, 2))

    assert _render(actual[NAMES.index("e")]) == ". x x x x x x . ."


def test_gists_and_sinks_doc_rows():
    batch = _doc_batch()

    gist_keys = _doc_dense(gists(batch.kind))
    sink_keys = _doc_dense(sinks(batch.kind))

    for i, name in enumerate(NAMES):
        assert _render(gist_keys[i]) == ". . . x . . x . .", f"gists, query {name}"
        assert _render(sink_keys[i]) == "x . . . . . . . .", f"sinks, query {name}"


# Composition


def _query_is_zero(b, h, q_idx, kv_idx):
    return q_idx == 0


def _key_is_zero(b, h, q_idx, kv_idx):
    return kv_idx == 0


def _key_is_one(b, h, q_idx, kv_idx):
    return kv_idx == 1


def test_and_masks_truth_table():
    actual = dense_mask(and_masks(_query_is_zero, _key_is_zero), 1, 2, 2)[0, 0]

    assert actual.tolist() == [[True, False], [False, False]]


def test_or_masks_truth_table():
    actual = dense_mask(or_masks(_query_is_zero, _key_is_zero), 1, 2, 2)[0, 0]

    assert actual.tolist() == [[True, True], [True, False]]


def test_and_masks_three_rules():
    actual = dense_mask(and_masks(_query_is_zero, _key_is_zero, _key_is_one), 1, 2, 2)[0, 0]

    assert not actual.any()


def test_or_masks_three_rules():
    actual = dense_mask(or_masks(_key_is_zero, _key_is_one, _query_is_zero), 1, 2, 3)[0, 0]

    assert actual.tolist() == [[True, True, True], [True, True, False]]


def test_or_inside_and():
    rule = and_masks(causal(), or_masks(_key_is_zero, _query_is_zero))

    actual = dense_mask(rule, 1, 3, 3)[0, 0]

    assert actual.tolist() == [[True, False, False], [True, False, False], [True, False, False]]


def test_causal_lower_triangle():
    actual = dense_mask(causal(), 1, 4, 4)[0, 0]

    assert torch.equal(actual, torch.ones(4, 4, dtype=torch.bool).tril())


def test_sliding_window_with_causal():
    actual = dense_mask(and_masks(causal(), sliding_window(3)), 1, 5, 5)[0, 0]

    expected = [
        "x . . . .",
        "x x . . .",
        "x x x . .",
        ". x x x .",
        ". . x x x",
    ]
    for i in range(5):
        assert _render(actual[i]) == expected[i], f"query {i}"


def test_sliding_window_one_is_diagonal():
    actual = dense_mask(and_masks(causal(), sliding_window(1)), 1, 4, 4)[0, 0]

    assert torch.equal(actual, torch.eye(4, dtype=torch.bool))


def test_dense_mask_query_offset():
    batch = _doc_batch()

    actual = dense_mask(gist_mask(batch), 1, 2, 9, q_offset=7)[0, 0]

    assert _render(actual[0]) == GIST_MATRIX[7]
    assert _render(actual[1]) == GIST_MATRIX[8]


# Padding


def _padded_pair():
    """A left-padded batch: row 0 is 18 tokens long, row 1 is the 9-token docstring sequence."""
    long = insert_gists(list(range(30, 41)), [50, 51], GIST_ID, DOC_SPEC)
    return long, _doc_sequence(), collate([long, _doc_sequence()], DOC_SPEC, pad_id=PAD_ID)


def test_padding_rule_hides_pad_keys():
    long, short, batch = _padded_pair()
    pad = len(long) - len(short)

    actual = dense_mask(padding(batch.kind), 2, len(long), len(long))

    assert actual[0].all()
    assert not actual[1, 0, :, :pad].any()
    assert actual[1, 0, :, pad:].all()


@pytest.mark.parametrize("rule_of", [gist_mask, dense_prefill_mask], ids=["gist", "dense_prefill"])
def test_padded_batch_hides_pad_keys(rule_of):
    long, short, batch = _padded_pair()
    pad = len(long) - len(short)

    actual = dense_mask(rule_of(batch), 2, len(long), len(long))

    assert pad == 9
    assert not actual[1, 0, :, :pad].any()
    assert not actual[1, 0, :pad, :].any()


@pytest.mark.parametrize("rule_of", [gist_mask, dense_prefill_mask], ids=["gist", "dense_prefill"])
def test_padded_batch_matches_single_rows(rule_of):
    long, short, batch = _padded_pair()
    pad = len(long) - len(short)
    single_long = collate([long], DOC_SPEC, pad_id=PAD_ID)
    single_short = collate([short], DOC_SPEC, pad_id=PAD_ID)

    actual = dense_mask(rule_of(batch), 2, len(long), len(long))

    expected_long = dense_mask(rule_of(single_long), 1, len(long), len(long))[0, 0]
    expected_short = dense_mask(rule_of(single_short), 1, len(short), len(short))[0, 0]
    assert torch.equal(actual[0, 0], expected_long)
    assert torch.equal(actual[1, 0, pad:, pad:], expected_short)


def test_padded_doc_row_matrix():
    long, short, batch = _padded_pair()
    pad = len(long) - len(short)

    actual = dense_mask(gist_mask(batch), 2, len(long), len(long))[1, 0, pad:, pad:]

    for i, name in enumerate(NAMES):
        assert _render(actual[i]) == GIST_MATRIX[i], f"query {name}"


# Randomised layouts against a plain-Python reference


def _reference_gist_mask(kind: list[int], chunk: list[int], window: int) -> list[list[bool]]:
    """Build the gist mask by the rule: query q attends to key k <= q if k is a sink or a gist, or
    if k lies in q's chunk or the ``window`` chunks before it. Padding neither attends nor is attended."""
    size = len(kind)
    rows = []
    for q in range(size):
        row = []
        for k in range(size):
            allowed = False
            if k <= q and kind[q] != PAD and kind[k] != PAD:
                if kind[k] == SINK or kind[k] == GIST:
                    allowed = True
                elif kind[q] != SINK and 0 <= chunk[q] - chunk[k] <= window:
                    allowed = True
            row.append(allowed)
        rows.append(row)
    return rows


def _reference_dense_prefill(kind: list[int], chunk: list[int]) -> list[list[bool]]:
    """Build the dense prefill mask by the rule: a non-gist query attends to every earlier non-gist
    key, and a gist query attends to its own chunk and the sinks."""
    size = len(kind)
    rows = []
    for q in range(size):
        row = []
        for k in range(size):
            allowed = False
            if k <= q and kind[q] != PAD and kind[k] != PAD:
                if kind[q] == GIST:
                    allowed = kind[k] == SINK or chunk[k] == chunk[q]
                else:
                    allowed = kind[k] != GIST
            row.append(allowed)
        rows.append(row)
    return rows


def _random_batch(rng: random.Random, chunk_size: int, sink_count: int, window: int):
    """Three rows whose chunked part is not a multiple of C, so each row has a tail."""
    spec = GistSpec(chunk_size=chunk_size, sinks=sink_count, window_chunks=window)
    sequences = []
    for _ in range(3):
        full_chunks = rng.randint(0, 5)
        tail = rng.randint(1, chunk_size - 1)
        context = [rng.randint(1, 90) for _ in range(sink_count + full_chunks * chunk_size + tail)]
        suffix_ids = [rng.randint(1, 90) for _ in range(rng.randint(0, 3))]
        sequences.append(insert_gists(context, suffix_ids, GIST_ID, spec))
    return collate(sequences, spec, pad_id=PAD_ID)


RANDOM_LAYOUTS = list(itertools.product((3, 4, 5), (0, 1, 2, 3), (0, 1, 2)))


@pytest.mark.parametrize(("chunk_size", "sink_count", "window"), RANDOM_LAYOUTS)
def test_gist_mask_random_layouts(chunk_size, sink_count, window):
    rng = random.Random(1000 * chunk_size + 10 * sink_count + window)
    batch = _random_batch(rng, chunk_size, sink_count, window)
    width = batch.input_ids.shape[1]

    actual = dense_mask(gist_mask(batch), batch.batch_size, width, width)

    for b in range(batch.batch_size):
        expected = _reference_gist_mask(batch.kind[b].tolist(), batch.chunk[b].tolist(), window)
        assert actual[b, 0].tolist() == expected, f"row {b}"


@pytest.mark.parametrize(("chunk_size", "sink_count", "window"), RANDOM_LAYOUTS)
def test_dense_prefill_random_layouts(chunk_size, sink_count, window):
    rng = random.Random(1000 * chunk_size + 10 * sink_count + window + 7)
    batch = _random_batch(rng, chunk_size, sink_count, window)
    width = batch.input_ids.shape[1]

    actual = dense_mask(dense_prefill_mask(batch), batch.batch_size, width, width)

    for b in range(batch.batch_size):
        expected = _reference_dense_prefill(batch.kind[b].tolist(), batch.chunk[b].tolist())
        assert actual[b, 0].tolist() == expected, f"row {b}"


# FlexAttention BlockMask


def _tiles(dense: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return which (q-block, kv-block) tiles of a (B, L, L) mask have any and all pairs allowed.

    Columns past L count as masked, so an edge tile is never fully allowed.
    """
    batch_size, length, _ = dense.shape
    blocks = -(-length // block_size)
    padded = torch.zeros(batch_size, blocks * block_size, blocks * block_size, dtype=torch.bool)
    padded[:, :length, :length] = dense
    tiles = padded.view(batch_size, blocks, block_size, blocks, block_size)
    return tiles.any(dim=(2, 4)), tiles.all(dim=(2, 4))


def _block_flags(num_blocks: torch.Tensor, indices: torch.Tensor, blocks: int) -> torch.Tensor:
    """Turn BlockMask (B, H, Q blocks) counts and (B, H, Q blocks, KV blocks) indices into flags."""
    batch_size, _, q_blocks = num_blocks.shape
    flags = torch.zeros(batch_size, q_blocks, blocks, dtype=torch.bool)
    for b in range(batch_size):
        for q in range(q_blocks):
            for kv in indices[b, 0, q, : num_blocks[b, 0, q]].tolist():
                flags[b, q, kv] = True
    return flags


def test_block_mask_matches_dense_tiles():
    # C=32 with block size 16 leaves whole tiles of old raw tokens that later queries reach only
    # through their gist.
    spec = GistSpec(chunk_size=32, sinks=2, window_chunks=1)
    sequences = [
        insert_gists(list(range(250)), [5, 6, 7, 8, 9], GIST_ID, spec),
        insert_gists(list(range(180)), [5, 6, 7], GIST_ID, spec),
    ]
    batch = collate(sequences, spec, pad_id=PAD_ID)
    width = batch.input_ids.shape[1]
    block_size = 16
    blocks = -(-width // block_size)

    dense = dense_mask(gist_mask(batch), 2, width, width)[:, 0]
    mask = block_mask(gist_mask(batch), 2, width, width, block_size=block_size)
    tile_any, tile_all = _tiles(dense, block_size)
    partial = _block_flags(mask.kv_num_blocks, mask.kv_indices, blocks)
    full = _block_flags(mask.full_kv_num_blocks, mask.full_kv_indices, blocks)
    visited = partial | full

    below_diagonal = torch.ones(blocks, blocks, dtype=torch.bool).tril(-1)
    assert width % block_size != 0
    assert (~tile_any & below_diagonal).any(), "layout has no skippable tile below the diagonal"
    assert not (tile_any & ~visited).any(), "a tile with allowed pairs is skipped"
    assert not (visited & ~tile_any).any(), "a fully masked tile is visited"
    assert not (full & ~tile_all).any(), "a tile marked full has masked pairs"
    assert not (partial & full).any(), "a tile is both partial and full"
