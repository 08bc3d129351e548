"""Tests of the gist layout: chunk bounds, gist insertion, token metadata and batch index maps."""

from __future__ import annotations

import pytest

from gsa.errors import InvalidInputError
from gsa.layout import GistSpec, TokenKind, chunk_bounds, collate, insert_gists, strip_gists

GIST_ID = 99
PAD_ID = 0

SINK, RAW, GIST, TAIL, SUFFIX, PAD = (int(k) for k in TokenKind)


# chunk_bounds


@pytest.mark.parametrize(
    ("length", "sinks", "expected"),
    [
        (10, 0, [(0, 3), (3, 6), (6, 9)]),
        (10, 3, [(3, 6), (6, 9)]),
        (9, 0, [(0, 3), (3, 6), (6, 9)]),
        (5, 3, []),
        (2, 3, []),
        (0, 0, []),
    ],
)
def test_chunk_bounds_plain(length, sinks, expected):
    spec = GistSpec(chunk_size=3, sinks=sinks)

    assert chunk_bounds(length, spec) == expected


def test_chunk_bounds_word_start_shift():
    # C=4, so an end may move forward by up to 2 tokens. The end at 4 moves to the word start
    # at 5. The end at 9 finds no word start at 9, 10 or 11 and stays put.
    spec = GistSpec(chunk_size=4, sinks=0, word_boundary=True)
    word_starts = [True, False, False, False, False, True, False, False, False, False, False, False]

    assert chunk_bounds(12, spec, word_starts) == [(0, 5), (5, 9)]


def test_chunk_bounds_word_start_max_shift():
    spec = GistSpec(chunk_size=4, sinks=0, word_boundary=True)
    word_starts = [True, False, False, False, False, False, True, False, False, False]

    assert chunk_bounds(10, spec, word_starts) == [(0, 6), (6, 10)]


def test_chunk_bounds_word_start_out_of_reach():
    # The next word start is 3 tokens past the end at 4, beyond C // 2 = 2.
    spec = GistSpec(chunk_size=4, sinks=0, word_boundary=True)
    word_starts = [True, False, False, False, False, False, False, True, False, False]

    assert chunk_bounds(10, spec, word_starts) == [(0, 4), (4, 8)]


def test_chunk_bounds_word_start_after_sinks():
    spec = GistSpec(chunk_size=4, sinks=2, word_boundary=True)
    word_starts = [True, True, True, False, False, False, False, True, False, False, False]

    assert chunk_bounds(11, spec, word_starts) == [(2, 7), (7, 11)]


def test_chunk_bounds_word_start_at_context_end():
    # The second end at 8 finds no word start before the context ends at 9.
    spec = GistSpec(chunk_size=4, sinks=0, word_boundary=True)
    word_starts = [True, False, False, False, True, False, False, False, False]

    assert chunk_bounds(9, spec, word_starts) == [(0, 4), (4, 8)]


def test_chunk_bounds_boundary_without_words():
    spec = GistSpec(chunk_size=4, sinks=0, word_boundary=True)

    assert chunk_bounds(10, spec) == [(0, 4), (4, 8)]


def test_chunk_bounds_words_ignored_when_off():
    spec = GistSpec(chunk_size=4, sinks=0, word_boundary=False)
    word_starts = [True, False, False, False, False, True, False, False, False, False]

    assert chunk_bounds(10, spec, word_starts) == [(0, 4), (4, 8)]


# insert_gists: literal layouts


@pytest.mark.parametrize("window_chunks", [0, 1, 2])
def test_insert_gists_tail_no_sinks(window_chunks):
    spec = GistSpec(chunk_size=3, sinks=0, window_chunks=window_chunks)

    seq = insert_gists(list(range(10, 18)), [50, 51], GIST_ID, spec)

    assert seq.input_ids == [10, 11, 12, 99, 13, 14, 15, 99, 16, 17, 50, 51]
    assert seq.position_ids == [0, 1, 2, 2, 3, 4, 5, 5, 6, 7, 8, 9]
    assert seq.kind == [RAW, RAW, RAW, GIST, RAW, RAW, RAW, GIST, TAIL, TAIL, SUFFIX, SUFFIX]
    assert seq.chunk == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert seq.num_chunks == 2


@pytest.mark.parametrize("window_chunks", [0, 1, 2])
def test_insert_gists_tail_three_sinks(window_chunks):
    spec = GistSpec(chunk_size=3, sinks=3, window_chunks=window_chunks)

    seq = insert_gists(list(range(10, 18)), [50, 51], GIST_ID, spec)

    assert seq.input_ids == [10, 11, 12, 13, 14, 15, 99, 16, 17, 50, 51]
    assert seq.position_ids == [0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9]
    assert seq.kind == [SINK, SINK, SINK, RAW, RAW, RAW, GIST, TAIL, TAIL, SUFFIX, SUFFIX]
    assert seq.chunk == [-1, -1, -1, 0, 0, 0, 0, 1, 1, 1, 1]
    assert seq.num_chunks == 1


def test_insert_gists_short_context_no_sinks():
    spec = GistSpec(chunk_size=4, sinks=0)

    seq = insert_gists([10, 11, 12], [50], GIST_ID, spec)

    assert seq.input_ids == [10, 11, 12, 50]
    assert seq.position_ids == [0, 1, 2, 3]
    assert seq.kind == [TAIL, TAIL, TAIL, SUFFIX]
    assert seq.chunk == [0, 0, 0, 0]
    assert seq.num_chunks == 0


def test_insert_gists_short_context_three_sinks():
    spec = GistSpec(chunk_size=4, sinks=3)

    seq = insert_gists([10, 11, 12, 13, 14, 15], [50], GIST_ID, spec)

    assert seq.input_ids == [10, 11, 12, 13, 14, 15, 50]
    assert seq.position_ids == [0, 1, 2, 3, 4, 5, 6]
    assert seq.kind == [SINK, SINK, SINK, TAIL, TAIL, TAIL, SUFFIX]
    assert seq.chunk == [-1, -1, -1, 0, 0, 0, 0]
    assert seq.num_chunks == 0


def test_insert_gists_context_within_sinks():
    spec = GistSpec(chunk_size=4, sinks=3)

    seq = insert_gists([10, 11], [50, 51], GIST_ID, spec)

    assert seq.input_ids == [10, 11, 50, 51]
    assert seq.position_ids == [0, 1, 2, 3]
    assert seq.kind == [SINK, SINK, SUFFIX, SUFFIX]
    assert seq.chunk == [-1, -1, 0, 0]
    assert seq.num_chunks == 0


def test_insert_gists_one_chunk_no_sinks():
    spec = GistSpec(chunk_size=4, sinks=0)

    seq = insert_gists([10, 11, 12, 13], [50], GIST_ID, spec)

    assert seq.input_ids == [10, 11, 12, 13, 99, 50]
    assert seq.position_ids == [0, 1, 2, 3, 3, 4]
    assert seq.kind == [RAW, RAW, RAW, RAW, GIST, SUFFIX]
    assert seq.chunk == [0, 0, 0, 0, 0, 1]
    assert seq.num_chunks == 1


def test_insert_gists_one_chunk_three_sinks():
    spec = GistSpec(chunk_size=4, sinks=3)

    seq = insert_gists(list(range(10, 17)), [50], GIST_ID, spec)

    assert seq.input_ids == [10, 11, 12, 13, 14, 15, 16, 99, 50]
    assert seq.position_ids == [0, 1, 2, 3, 4, 5, 6, 6, 7]
    assert seq.kind == [SINK, SINK, SINK, RAW, RAW, RAW, RAW, GIST, SUFFIX]
    assert seq.chunk == [-1, -1, -1, 0, 0, 0, 0, 0, 1]
    assert seq.num_chunks == 1


def test_insert_gists_empty_suffix():
    spec = GistSpec(chunk_size=2, sinks=1)

    seq = insert_gists([10, 11, 12, 13], [], GIST_ID, spec)

    assert seq.input_ids == [10, 11, 12, 99, 13]
    assert seq.position_ids == [0, 1, 2, 2, 3]
    assert seq.kind == [SINK, RAW, RAW, GIST, TAIL]
    assert seq.chunk == [-1, 0, 0, 0, 1]


def test_insert_gists_without_gist_id():
    # gist_id=None is the layout of plain full attention: sinks, then one final chunk.
    spec = GistSpec(chunk_size=2, sinks=3)

    seq = insert_gists(list(range(10, 17)), [50], None, spec)

    assert seq.input_ids == [10, 11, 12, 13, 14, 15, 16, 50]
    assert seq.position_ids == [0, 1, 2, 3, 4, 5, 6, 7]
    assert seq.kind == [SINK, SINK, SINK, TAIL, TAIL, TAIL, TAIL, SUFFIX]
    assert seq.chunk == [-1, -1, -1, 0, 0, 0, 0, 0]
    assert seq.num_chunks == 0


def test_insert_gists_word_boundary_layout():
    spec = GistSpec(chunk_size=4, sinks=0, word_boundary=True)
    word_starts = [True, False, False, False, False, True, False, False, False, False, False, False]

    seq = insert_gists(list(range(10, 22)), [50], GIST_ID, spec, word_starts)

    assert seq.input_ids == [10, 11, 12, 13, 14, 99, 15, 16, 17, 18, 99, 19, 20, 21, 50]
    assert seq.position_ids == [0, 1, 2, 3, 4, 4, 5, 6, 7, 8, 8, 9, 10, 11, 12]
    assert seq.kind == [RAW] * 5 + [GIST] + [RAW] * 4 + [GIST] + [TAIL] * 3 + [SUFFIX]
    assert seq.chunk == [0] * 6 + [1] * 5 + [2] * 4
    assert seq.num_chunks == 2


# insert_gists: metadata checked by loops over many shapes


LAYOUT_CASES = [
    (chunk_size, sinks, context_len, suffix_len)
    for chunk_size in (1, 2, 3, 5)
    for sinks in (0, 1, 3)
    for context_len in (0, 1, 4, 7, 11, 16)
    for suffix_len in (0, 2)
]


@pytest.mark.parametrize(("chunk_size", "sinks", "context_len", "suffix_len"), LAYOUT_CASES)
def test_insert_gists_metadata_by_loop(chunk_size, sinks, context_len, suffix_len):
    spec = GistSpec(chunk_size=chunk_size, sinks=sinks)
    context = [100 + i for i in range(context_len)]
    suffix_ids = [300 + j for j in range(suffix_len)]

    # Expected layout token by token: sinks, then full chunks of C each followed by a gist.
    sink_count = min(sinks, context_len)
    full_chunks = (context_len - sink_count) // chunk_size
    chunked_end = sink_count + full_chunks * chunk_size
    ids, positions, kinds, chunks = [], [], [], []

    def add(token, position, kind, chunk):
        ids.append(token)
        positions.append(position)
        kinds.append(kind)
        chunks.append(chunk)

    for i in range(context_len):
        if i < sink_count:
            add(context[i], i, SINK, -1)
        elif i < chunked_end:
            n = (i - sink_count) // chunk_size
            add(context[i], i, RAW, n)
            if (i - sink_count) % chunk_size == chunk_size - 1:
                add(GIST_ID, i, GIST, n)
        else:
            add(context[i], i, TAIL, full_chunks)
    for j in range(suffix_len):
        add(suffix_ids[j], context_len + j, SUFFIX, full_chunks)

    seq = insert_gists(context, suffix_ids, GIST_ID, spec)

    assert seq.input_ids == ids
    assert seq.position_ids == positions
    assert seq.kind == kinds
    assert seq.chunk == chunks
    assert seq.num_chunks == full_chunks
    assert len(seq) == context_len + full_chunks + suffix_len


@pytest.mark.parametrize(("chunk_size", "sinks", "context_len", "suffix_len"), LAYOUT_CASES)
def test_insert_gists_positions_skip_gists(chunk_size, sinks, context_len, suffix_len):
    spec = GistSpec(chunk_size=chunk_size, sinks=sinks)

    seq = insert_gists(list(range(100, 100 + context_len)), [7] * suffix_len, GIST_ID, spec)

    non_gist_positions = [p for p, k in zip(seq.position_ids, seq.kind) if k != GIST]
    assert non_gist_positions == list(range(context_len + suffix_len))
    for i, kind in enumerate(seq.kind):
        if kind == GIST:
            assert seq.kind[i - 1] == RAW, f"gist at {i} does not follow a raw token"
            assert seq.position_ids[i] == seq.position_ids[i - 1], f"gist at {i}"


# strip_gists


def test_strip_gists_restores_tokens():
    spec = GistSpec(chunk_size=3, sinks=2)
    context = list(range(10, 21))

    seq = insert_gists(context, [50, 51], GIST_ID, spec)

    assert strip_gists(seq.input_ids, seq.kind) == context + [50, 51]


def test_strip_gists_drops_padding():
    spec = GistSpec(chunk_size=2, sinks=1)
    short = insert_gists([10, 11, 12], [50], GIST_ID, spec)
    long = insert_gists(list(range(20, 30)), [60], GIST_ID, spec)

    batch = collate([short, long], spec, pad_id=PAD_ID)

    row = strip_gists(batch.input_ids[0].tolist(), batch.kind[0].tolist())
    assert row == [10, 11, 12, 50]


def test_strip_gists_keeps_gist_id_in_text():
    # A raw token that happens to equal the gist id stays, because stripping goes by kind.
    spec = GistSpec(chunk_size=2, sinks=0)

    seq = insert_gists([GIST_ID, 11, 12], [50], GIST_ID, spec)

    assert strip_gists(seq.input_ids, seq.kind) == [GIST_ID, 11, 12, 50]


# collate


def _ragged_batch():
    """Three rows with C=3 and 2 sinks: chunks and a tail, no chunk, and no suffix."""
    spec = GistSpec(chunk_size=3, sinks=2, window_chunks=1)
    sequences = [
        insert_gists(list(range(100, 110)), [200, 201], GIST_ID, spec),  # 14 tokens
        insert_gists([110, 111, 112, 113], [210, 211, 212], GIST_ID, spec),  # 7 tokens
        insert_gists(list(range(120, 128)), [], GIST_ID, spec),  # 10 tokens
    ]
    return collate(sequences, spec, pad_id=PAD_ID)


def test_collate_left_pads_ids():
    batch = _ragged_batch()

    assert batch.input_ids.tolist() == [
        [100, 101, 102, 103, 104, 99, 105, 106, 107, 99, 108, 109, 200, 201],
        [0] * 7 + [110, 111, 112, 113, 210, 211, 212],
        [0] * 4 + [120, 121, 122, 123, 124, 99, 125, 126, 127, 99],
    ]


def test_collate_attention_mask():
    batch = _ragged_batch()

    assert batch.attention_mask.tolist() == [[1] * 14, [0] * 7 + [1] * 7, [0] * 4 + [1] * 10]


def test_collate_padding_metadata():
    batch = _ragged_batch()

    assert batch.position_ids.tolist() == [
        [0, 1, 2, 3, 4, 4, 5, 6, 7, 7, 8, 9, 10, 11],
        [0] * 7 + [0, 1, 2, 3, 4, 5, 6],
        [0] * 4 + [0, 1, 2, 3, 4, 4, 5, 6, 7, 7],
    ]
    assert batch.kind[1, :7].tolist() == [PAD] * 7
    assert batch.chunk[1, :7].tolist() == [-1] * 7
    assert batch.chunk[2].tolist() == [-1] * 4 + [-1, -1, 0, 0, 0, 0, 1, 1, 1, 1]
    assert batch.num_chunks.tolist() == [2, 0, 2]


def test_collate_sink_index():
    batch = _ragged_batch()

    assert batch.sink_index.tolist() == [[0, 1], [7, 8], [4, 5]]
    sink_ids = [[batch.input_ids[b, c].item() for c in batch.sink_index[b].tolist()] for b in range(3)]
    assert sink_ids == [[100, 101], [110, 111], [120, 121]]


def test_collate_gist_index():
    batch = _ragged_batch()

    assert batch.gist_index.tolist() == [[5, 9], [-1, -1], [9, 13]]
    for b, n in [(0, 0), (0, 1), (2, 0), (2, 1)]:
        assert batch.input_ids[b, batch.gist_index[b, n]] == GIST_ID, f"row {b} gist {n}"
        assert batch.kind[b, batch.gist_index[b, n]] == GIST, f"row {b} gist {n}"


def test_collate_chunk_index():
    batch = _ragged_batch()

    assert batch.chunk_index.tolist() == [
        [[2, 3, 4], [6, 7, 8]],
        [[-1, -1, -1], [-1, -1, -1]],
        [[6, 7, 8], [10, 11, 12]],
    ]
    expected_ids = {0: [[102, 103, 104], [105, 106, 107]], 2: [[122, 123, 124], [125, 126, 127]]}
    for b, chunks in expected_ids.items():
        for n, ids in enumerate(chunks):
            columns = batch.chunk_index[b, n].tolist()
            assert [batch.input_ids[b, c].item() for c in columns] == ids, f"row {b} chunk {n}"


def test_collate_recent_index():
    batch = _ragged_batch()

    assert batch.recent_index.tolist() == [[-1, 10, 11, 12, 13], [9, 10, 11, 12, 13], [-1] * 5]
    recent_ids = [batch.input_ids[1, c].item() for c in batch.recent_index[1].tolist()]
    assert recent_ids == [112, 113, 210, 211, 212]


def test_collate_suffix_index():
    batch = _ragged_batch()

    assert batch.suffix_index.tolist() == [[-1, 12, 13], [11, 12, 13], [-1, -1, -1]]
    suffix_ids = [batch.input_ids[0, c].item() for c in batch.suffix_index[0, 1:].tolist()]
    assert suffix_ids == [200, 201]


def test_collate_suffix_slot():
    batch = _ragged_batch()

    assert batch.suffix_slot.tolist() == [[-1, 3, 4], [2, 3, 4], [-1, -1, -1]]
    for b in range(3):
        for j, column in enumerate(batch.suffix_index[b].tolist()):
            if column < 0:
                continue
            slot = batch.suffix_slot[b, j]
            assert batch.recent_index[b, slot] == column, f"row {b} suffix {j}"


def test_collate_word_boundary_chunk_index():
    # Chunks grow up to C + C // 2 = 6 tokens, so every chunk row has 6 slots.
    spec = GistSpec(chunk_size=4, sinks=0, word_boundary=True)
    word_starts = [True, False, False, False, False, True, False, False, False, False, False, False]
    seq = insert_gists(list(range(10, 22)), [50], GIST_ID, spec, word_starts)

    batch = collate([seq], spec, pad_id=PAD_ID)

    assert batch.chunk_index.tolist() == [[[0, 1, 2, 3, 4, -1], [6, 7, 8, 9, -1, -1]]]
    assert batch.gist_index.tolist() == [[5, 10]]
    assert batch.recent_index.tolist() == [[11, 12, 13, 14]]
    assert batch.suffix_slot.tolist() == [[3]]


def test_collate_rows_without_chunks():
    spec = GistSpec(chunk_size=4, sinks=0)
    sequences = [insert_gists([10, 11], [50], GIST_ID, spec), insert_gists([20], [60, 61], GIST_ID, spec)]

    batch = collate(sequences, spec, pad_id=PAD_ID)

    assert batch.chunk_index.shape == (2, 0, 4)
    assert batch.gist_index.tolist() == [[], []]
    assert batch.recent_index.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert batch.suffix_slot.tolist() == [[-1, 2], [1, 2]]


def test_collate_empty_list_raises():
    with pytest.raises(ValueError):
        collate([], GistSpec(), pad_id=PAD_ID)


# GistSpec


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_size": 0}, "chunk size must be at least 1, got 0"),
        ({"chunk_size": -2}, "chunk size must be at least 1, got -2"),
        ({"sinks": -1}, "sink tokens must be 0 or more, got -1"),
        ({"window_chunks": -1}, "local window must be 0 or more chunks, got -1"),
    ],
)
def test_gist_spec_invalid_raises(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        GistSpec(**kwargs)


def test_gist_spec_zero_sinks_window_valid():
    spec = GistSpec(chunk_size=1, sinks=0, window_chunks=0)

    assert spec.max_chunk_len == 1


@pytest.mark.parametrize(("chunk_size", "word_boundary", "expected"), [(4, False, 4), (4, True, 6), (5, True, 7)])
def test_gist_spec_max_chunk_len(chunk_size, word_boundary, expected):
    spec = GistSpec(chunk_size=chunk_size, word_boundary=word_boundary)

    assert spec.max_chunk_len == expected


def test_level_marks_gists_only():
    spec = GistSpec(chunk_size=3, sinks=1)
    seqs = [insert_gists(list(range(1, 12)), [40], 99, spec), insert_gists(list(range(1, 5)), [41], 99, spec)]
    batch = collate(seqs, spec, pad_id=0)
    for b in range(2):
        for col in range(batch.input_ids.shape[1]):
            expected = 1 if int(batch.kind[b, col]) == TokenKind.GIST else 0
            assert int(batch.level[b, col]) == expected
    assert spec.chunk_sizes == (3,)
