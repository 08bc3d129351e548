"""Tests of multi-level gists: layout, masks, top-down selection, tiers and decode invariances."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from gsa.errors import InvalidInputError
from gsa.layout import GistSpec, TokenKind, _TENSOR_FIELDS, collate, insert_gists, parse_ratio
from gsa.masks import (
    block_mask, dense_mask, dense_prefill_mask, gist_mask, hierarchical_dense_prefill_mask, hierarchical_mask,
)

GIST_IDS = [97, 98, 99]
PAD_ID = 0
GOLDEN = Path(__file__).parent / "fixtures" / "hierarchy" / "one_level_batches.json"
SINK, RAW, GIST, TAIL, SUFFIX, PAD = (int(k) for k in TokenKind)


def random_rows(rng: random.Random, spec: GistSpec, rows: int = 3, max_chunks: int = 20) -> list:
    sequences = []
    for _ in range(rows):
        length = spec.sinks + rng.randint(0, max_chunks) * spec.chunk_size + rng.randint(0, spec.chunk_size - 1)
        context = [rng.randint(1, 90) for _ in range(length)]
        suffix = [rng.randint(1, 90) for _ in range(rng.randint(0, 3))]
        sequences.append(insert_gists(context, suffix, GIST_IDS[: spec.num_levels], spec))
    return sequences


# Layout


def test_one_level_equals_recorded_batches():
    """Batches recorded from the one-level layout code before levels were added."""
    for case in json.loads(GOLDEN.read_text()):
        spec = GistSpec(**case["spec"])
        sequences = [insert_gists(r["context"], r["suffix"], 99, spec, r["word_starts"]) for r in case["rows"]]
        batch = collate(sequences, spec, pad_id=0)
        assert batch.hierarchy is None
        for name in _TENSOR_FIELDS:
            assert getattr(batch, name).tolist() == case["fields"][name], f"{name} of {case['spec']}"


def test_one_level_list_id_equals_int_id():
    spec = GistSpec(chunk_size=3, sinks=1)
    context = list(range(1, 30))
    assert insert_gists(context, [5], [99], spec) == insert_gists(context, [5], 99, spec)


def test_two_level_doc_layout():
    spec = GistSpec.from_sizes((2, 2), sinks=1)
    seq = insert_gists([1, 2, 3, 4, 5, 6, 7, 8], [9], [97, 98], spec)
    assert seq.input_ids == [1, 2, 3, 97, 4, 5, 97, 98, 6, 7, 97, 8, 9]
    assert seq.kind == [SINK, RAW, RAW, GIST, RAW, RAW, GIST, GIST, RAW, RAW, GIST, TAIL, SUFFIX]
    assert seq.level == [0, 0, 0, 1, 0, 0, 1, 2, 0, 0, 1, 0, 0]
    assert seq.chunk == [-1, 0, 0, 0, 1, 1, 1, -1, 2, 2, 2, 3, 3]
    assert seq.position_ids == [0, 1, 2, 2, 3, 4, 4, 4, 5, 6, 6, 7, 8]


def reference_layout(length: int, spec: GistSpec) -> list[tuple[int, int]]:
    """(level, position) of every gist, in order, counted the slow way."""
    sizes = spec.chunk_sizes
    gists, closed = [], [0] * len(sizes)
    for end in range(spec.sinks + spec.chunk_size, length + 1, spec.chunk_size):
        gists.append((1, end - 1))
        closed[0] += 1
        for level in range(2, len(sizes) + 1):
            below = closed[level - 2]
            if below % sizes[level - 1] == 0 and below // sizes[level - 1] > closed[level - 1]:
                gists.append((level, end - 1))
                closed[level - 1] += 1
    return gists


@pytest.mark.parametrize("sizes", [(2, 2), (3, 2), (2, 3, 2), (4, 1, 3), (1, 2, 2, 2)])
def test_gists_follow_sections(sizes):
    rng = random.Random(sum(sizes))
    for _ in range(20):
        spec = GistSpec.from_sizes(sizes, sinks=rng.randint(0, 3))
        length = rng.randint(0, 90)
        seq = insert_gists(list(range(1, length + 1)), [], GIST_IDS + [96], spec)
        actual = [(lvl, pos) for k, lvl, pos in zip(seq.kind, seq.level, seq.position_ids) if k == GIST]
        assert actual == reference_layout(length, spec), f"length {length}, {spec}"
        for level, gist_id in enumerate(GIST_IDS + [96], start=1):
            assert seq.input_ids.count(gist_id) == sum(1 for lvl, _ in actual if lvl == level)


def expected_section(seq, sizes) -> list[list[int]]:
    """Section of each token at each level, from gist counts along the sequence."""
    levels = len(sizes)
    out, seen = [], [0] * (levels + 1)
    for kind, chunk, level in zip(seq.kind, seq.chunk, seq.level):
        row = [-1] * levels
        if chunk >= 0:
            for m in range(1, levels + 1):
                row[m - 1] = chunk // math.prod(sizes[1:m])
        if kind == GIST and level > 1:
            index = seen[level]
            for m in range(level, levels + 1):
                row[m - 1] = index // math.prod(sizes[level:m])
        if kind == GIST:
            seen[level] += 1
        out.append(row)
    return out


@pytest.mark.parametrize("sizes", [(2, 2), (3, 2, 2), (2, 1, 3)])
def test_sections_and_parents_by_loop(sizes):
    rng = random.Random(len(sizes) * 11)
    spec = GistSpec.from_sizes(sizes, sinks=2)
    sequences = random_rows(rng, spec, rows=4)
    batch = collate(sequences, spec, pad_id=PAD_ID)
    hier = batch.hierarchy
    width = batch.input_ids.shape[1]
    for b, seq in enumerate(sequences):
        pad = width - len(seq)
        assert hier.section[b, pad:].tolist() == expected_section(seq, sizes)
        assert (hier.section[b, :pad] == -1).all()
        counts = [sum(1 for k, lvl in zip(seq.kind, seq.level) if k == GIST and lvl == m) for m in range(1, len(sizes) + 1)]
        assert hier.num_gists[b].tolist() == counts
        for m in range(2, len(sizes) + 1):
            cols = [pad + i for i, (k, lvl) in enumerate(zip(seq.kind, seq.level)) if k == GIST and lvl == m]
            assert hier.gist_index[m - 2][b, : len(cols)].tolist() == cols
        for lower in range(1, len(sizes)):
            for i in range(counts[lower - 1]):
                parent = i // sizes[lower]
                expected = parent if parent < counts[lower] else -1
                assert int(hier.parent[lower - 1][b, i]) == expected
                if expected >= 0:
                    assert i in hier.children(lower + 1, expected)


def test_level_one_gist_index_skips_upper_gists():
    spec = GistSpec.from_sizes((2, 2), sinks=1)
    batch = collate([insert_gists(list(range(1, 12)), [], [97, 98], spec)], spec, PAD_ID)
    assert batch.kind[0, batch.gist_index[0]].tolist() == [GIST] * 5
    assert batch.level[0, batch.gist_index[0]].tolist() == [1] * 5


def test_too_few_gist_ids_raises():
    spec = GistSpec.from_sizes((2, 2))
    with pytest.raises(InvalidInputError, match="one id per level"):
        insert_gists(list(range(30)), [], 99, spec)


@pytest.mark.parametrize(("text", "sizes"), [("16", (16,)), ("4x4", (4, 4)), ("8x4x4", (8, 4, 4)), (" 4X2 ", (4, 2))])
def test_parse_ratio_valid(text, sizes):
    assert parse_ratio(text) == sizes


@pytest.mark.parametrize("text", ["4x0", "x4", "abc", "", "0", "4x", "4xx4", "-4", "4.5"])
def test_parse_ratio_invalid(text):
    with pytest.raises(InvalidInputError, match="at least 1, or one such size per level"):
        parse_ratio(text)


def test_spec_ratio_and_labels():
    spec = GistSpec.from_sizes((8, 4, 4))
    assert spec.ratio == 128
    assert spec.num_levels == 3
    assert spec.chunk_sizes == (8, 4, 4)
    assert spec.ratio_label == "8x4x4"
    assert GistSpec(chunk_size=16) == GistSpec.from_sizes([16])


def test_spec_zero_fanout_raises():
    with pytest.raises(InvalidInputError, match="above level 1 must be at least 1"):
        GistSpec.from_sizes((4, 0))


# Masks


def one_level_batch(rng: random.Random, chunk_size: int, sinks: int, window: int):
    spec = GistSpec(chunk_size=chunk_size, sinks=sinks, window_chunks=window)
    return collate(random_rows(rng, spec, max_chunks=6), spec, PAD_ID)


@pytest.mark.parametrize("seed", range(12))
def test_one_level_masks_equal_gist_mask(seed):
    rng = random.Random(seed)
    batch = one_level_batch(rng, rng.randint(1, 5), rng.randint(0, 3), rng.randint(0, 2))
    width = batch.input_ids.shape[1]
    for multi, single in ((hierarchical_mask, gist_mask), (hierarchical_dense_prefill_mask, dense_prefill_mask)):
        actual = dense_mask(multi(batch), batch.batch_size, width, width)
        expected = dense_mask(single(batch), batch.batch_size, width, width)
        assert torch.equal(actual, expected), multi.__name__


def query_parent_section(kind, chunk, level, index, sizes, m):
    """The level-(m+1) section of a query token, or None when it has none."""
    if kind == GIST and level > 1:
        if level > m + 1:
            return None
        return index // math.prod(sizes[level : m + 1])
    if chunk < 0:
        return None
    return chunk // math.prod(sizes[1 : m + 1])


def reference_hierarchical_mask(seq, sizes, window) -> list[list[bool]]:
    """The multi-level rule written pair by pair from its description."""
    levels = len(sizes)
    counts, index = [0] * (levels + 1), []
    for kind, level in zip(seq.kind, seq.level):
        index.append(counts[level] if kind == GIST else -1)
        if kind == GIST:
            counts[level] += 1
    rows = []
    for q in range(len(seq)):
        row = []
        for k in range(len(seq)):
            row.append(k <= q and _reference_allowed(seq, sizes, window, index, q, k))
        rows.append(row)
    return rows


def _reference_allowed(seq, sizes, window, index, q, k) -> bool:
    kinds, chunks, levels = seq.kind, seq.chunk, seq.level
    final = (TAIL, SUFFIX)
    if kinds[k] == SINK or (kinds[q] in final and kinds[k] in final):
        return True
    if chunks[q] >= 0 and chunks[k] >= 0 and 0 <= chunks[q] - chunks[k] <= window:
        return True
    if kinds[k] != GIST:
        return False
    m = levels[k]
    if m == len(sizes):
        return True
    key_parent = index[k] // sizes[m]
    query_parent = query_parent_section(kinds[q], chunks[q], levels[q], index[q], sizes, m)
    if query_parent is None:
        return False
    return query_parent == key_parent or (kinds[q] == GIST and levels[q] == m + 1 and query_parent - 1 == key_parent)


@pytest.mark.parametrize("sizes", [(2, 2), (3, 2), (2, 2, 2), (2, 3, 2), (1, 2, 2)])
@pytest.mark.parametrize("window", [0, 1, 2])
def test_hierarchical_mask_matches_reference(sizes, window):
    rng = random.Random(sum(sizes) * 7 + window)
    spec = GistSpec.from_sizes(sizes, sinks=rng.randint(0, 2), window_chunks=window)
    sequences = random_rows(rng, spec, rows=2, max_chunks=14)
    batch = collate(sequences, spec, PAD_ID)
    width = batch.input_ids.shape[1]
    actual = dense_mask(hierarchical_mask(batch), batch.batch_size, width, width)
    for b, seq in enumerate(sequences):
        pad = width - len(seq)
        assert actual[b, 0, pad:, pad:].tolist() == reference_hierarchical_mask(seq, sizes, window), f"row {b}"
        assert not actual[b, 0, :, :pad].any()


def test_upper_gist_reads_no_raw_token():
    spec = GistSpec.from_sizes((2, 2, 2), sinks=1)
    batch = collate(random_rows(random.Random(3), spec, rows=2, max_chunks=20), spec, PAD_ID)
    width = batch.input_ids.shape[1]
    mask = dense_mask(hierarchical_mask(batch), 2, width, width)[:, 0]
    upper = (batch.kind == GIST) & (batch.level > 1)
    raw = (batch.kind == RAW) | (batch.kind == TAIL)
    assert upper.any()
    for b in range(2):
        assert not mask[b][upper[b]][:, raw[b]].any()


def test_hierarchical_block_mask_matches_dense():
    spec = GistSpec.from_sizes((4, 2, 2), sinks=2)
    batch = collate(random_rows(random.Random(5), spec, rows=2, max_chunks=40), spec, PAD_ID)
    width = batch.input_ids.shape[1]
    rule = hierarchical_mask(batch)
    dense = dense_mask(rule, 2, width, width)[:, 0]
    mask = block_mask(rule, 2, width, width, block_size=16)
    rebuilt = mask.to_dense()[:, 0].bool()  # (B, Q blocks, KV blocks)
    blocks = rebuilt.shape[-1]
    padded = torch.zeros(2, blocks * 16, blocks * 16, dtype=torch.bool)
    padded[:, :width, :width] = dense
    tile_any = padded.view(2, blocks, 16, blocks, 16).any(dim=(2, 4))
    assert torch.equal(rebuilt, tile_any)


# Top-down selection

from conftest import GIST_ID, decode_steps, make_model, relative_error  # noqa: E402
from gsa.config import GSAConfig  # noqa: E402
from gsa.ops.naive import naive_top_down  # noqa: E402
from gsa.ops.topdown import LevelGists, select_top_down  # noqa: E402
from gsa.tiers import split_tiers  # noqa: E402


def random_levels(chunks_per_row: list[int], sizes: tuple[int, ...], kv_heads: int, dim: int, seed: int):
    """Random gist keys of every level for rows with the given level-1 chunk counts."""
    generator = torch.Generator().manual_seed(seed)
    counts = [torch.tensor(chunks_per_row)]
    for fanout in sizes[1:]:
        counts.append(counts[-1] // fanout)
    keys = [torch.randn(len(chunks_per_row), kv_heads, max(int(c.max()), 1), dim, generator=generator) for c in counts]
    return keys, counts


def fast_top_down(query, keys, counts, sizes, k, window_start, merge, top_p):
    gists = [LevelGists(key, count) for key, count in zip(keys, counts)]
    result = select_top_down(query, gists, sizes[1:], k, window_start, 0.25, merge, top_p)
    kept = [choice.dense(key.shape[2]) for choice, key in zip(result.levels, keys)]
    return kept, result.scored


SELECTION_CASES = [
    # sizes, level-1 chunks per row, KV heads, query heads per KV head, window
    ((2, 2), [1, 7], 2, 1, 1),
    ((3, 2), [13, 5], 1, 3, 1),
    ((2, 3, 2), [29, 12, 0], 2, 4, 2),
    ((4, 4), [37, 16], 2, 3, 0),
    ((2, 2, 2), [8, 9], 1, 4, 1),
    ((3, 1, 2), [11, 2], 2, 1, 1),
]


@pytest.mark.parametrize(("sizes", "chunks", "kv_heads", "group", "window"), SELECTION_CASES)
@pytest.mark.parametrize(("merge", "top_p"), [("union", None), ("group-sum", None), ("union", 0.6)])
def test_top_down_matches_naive(sizes, chunks, kv_heads, group, window, merge, top_p):
    seed = sum(chunks) + kv_heads * group
    keys, counts = random_levels(chunks, sizes, kv_heads, dim=8, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    query = torch.randn(len(chunks), kv_heads * group, 3, 8, generator=generator)
    k = [torch.randint(1, 4, (len(chunks), 3), generator=generator) for _ in sizes]
    window_start = counts[0] - window

    fast, fast_scored = fast_top_down(query, keys, counts, sizes, k, window_start, merge, top_p)
    naive, naive_scored = naive_top_down(query, keys, counts, sizes[1:], k, window_start, 0.25, merge, top_p)
    for level, (a, b) in enumerate(zip(fast, naive), start=1):
        assert torch.equal(a, b), f"level {level}"
    assert torch.equal(fast_scored, naive_scored)


def test_top_down_keeps_only_children_or_frontier():
    sizes = (2, 3)
    keys, counts = random_levels([17], sizes, kv_heads=1, dim=8, seed=4)
    query = torch.randn(1, 2, 1, 8, generator=torch.Generator().manual_seed(5))
    k = [torch.full((1, 1), 2) for _ in sizes]
    kept, _ = fast_top_down(query, keys, counts, sizes, k, counts[0] - 1, "union", None)
    parents = set(kept[1][0, 0, 0].nonzero().flatten().tolist())
    frontier = set(range(int(counts[1][0]) * 3, 16))  # level-2 gists 0 and 1 cover chunks 0..5; 6..15 have none
    for n in kept[0][0, 0, 0].nonzero().flatten().tolist():
        assert n // 3 in parents or n in frontier, f"chunk {n}"
        assert n < 16, "a window chunk was selected"


def scored_per_step(context: int, sizes: tuple[int, ...], top_k: int, group: int) -> int:
    """Gists scored by one decode query over ``context`` keys of synthetic gists (one KV head)."""
    chunks = context // sizes[0]
    keys, counts = random_levels([chunks], sizes, kv_heads=1, dim=4, seed=context)
    query = torch.randn(1, group, 1, 4, generator=torch.Generator().manual_seed(context + 1))
    k = [torch.full((1, 1), top_k) for _ in sizes]
    _, scored = fast_top_down(query, keys, counts, sizes, k, counts[0] - 1, "union", None)
    return int(scored[0, 0, 0])


CONTEXTS = [1024, 4096, 16384, 65536]


def test_scored_gists_three_levels_sublinear():
    group, top_k, sizes = 4, 2, (4, 4, 4)
    counts = [scored_per_step(n, sizes, top_k, group) for n in CONTEXTS]
    for n, count in zip(CONTEXTS, counts):
        top = n // 64
        lower = group * top_k * 4 + 3  # children of the kept gists plus the frontier, per level below the top
        assert top <= count <= top + 2 * lower, f"context {n}: {count}"
    one_level = [n // 4 - 1 for n in CONTEXTS]  # every level-1 gist outside the window
    assert counts[-1] * 10 < one_level[-1]
    for before, after in zip(counts, counts[1:]):
        assert after < 4 * before  # each step quadruples the context


def test_scored_gists_log_depth():
    """With one more level per 4x context, the top stays one gist and each level adds a fixed amount."""
    group, top_k = 4, 2
    per_level = group * top_k * 4 + 3
    counts = []
    for n in CONTEXTS:
        levels = round(math.log(n // 4, 4))  # 4^levels level-1 chunks, so the top level has one gist
        counts.append(scored_per_step(n, (4,) * levels, top_k, group))
        assert counts[-1] <= 1 + (levels - 1) * per_level, f"context {n}"
    for before, after in zip(counts, counts[1:]):
        assert after - before <= per_level


# Tiers and decoding


def row_states(length: int, kv_heads: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(kv_heads, length, dim, generator=torch.Generator().manual_seed(seed))


def tiers_of(sequences, spec, states):
    """Split per-row (Hk, len, D) states, left-padded like the batch, into tiers."""
    batch = collate(sequences, spec, PAD_ID)
    width = batch.input_ids.shape[1]
    flat = torch.zeros(len(sequences), states[0].shape[0], width, states[0].shape[-1])
    for b, seq in enumerate(sequences):
        flat[b, :, width - len(seq):] = states[b][:, : len(seq)]
    return split_tiers(flat, flat * 2, batch), batch


@pytest.mark.parametrize("sizes", [(2, 2), (2, 2, 2), (3, 2)])
def test_append_chunk_equals_rebuilt_tiers(sizes):
    spec = GistSpec.from_sizes(sizes, sinks=2)
    ids = GIST_IDS[: len(sizes)]
    chunks = [7, 11, 8]  # with (2, 2, 2): 7 -> 8 closes levels 2 and 3, 11 -> 12 closes level 2, 8 -> 9 none
    shorter = [insert_gists(list(range(1, 3 + n * sizes[0])), [], ids, spec) for n in chunks]
    longer = [insert_gists(list(range(1, 3 + (n + 1) * sizes[0])), [], ids, spec) for n in chunks]
    states = [row_states(len(seq), 2, 4, seed=b) for b, seq in enumerate(longer)]
    built, _ = tiers_of(longer, spec, states)
    tiers, _ = tiers_of(shorter, spec, states)

    # The new chunk's raw columns and gist columns in each longer row, after the shorter prefix.
    new_raw, new_gists = [], []
    for b, (short, long) in enumerate(zip(shorter, longer)):
        tail = range(len(short), len(long))
        new_raw.append(states[b][:, [i for i in tail if long.kind[i] == RAW]])
        gist_cols = {long.level[i]: i for i in tail if long.kind[i] == GIST}
        new_gists.append([states[b][:, gist_cols[m]] if m in gist_cols else torch.zeros(2, 4)
                          for m in range(1, len(sizes) + 1)])
    key = torch.stack(new_raw)  # (B, Hk, C, D)
    gist = [torch.stack([row[m] for row in new_gists]) for m in range(len(sizes))]  # per level (B, Hk, D)
    added = tiers.append_chunk(key, key * 2, gist[0], gist[0] * 2, gist[1:], [g * 2 for g in gist[1:]])

    assert torch.equal(tiers.num_chunks, built.num_chunks)
    assert added[:, 0].all()
    assert torch.equal(tiers.chunk_valid, built.chunk_valid)
    assert torch.equal(tiers.gist_valid, built.gist_valid)
    valid = built.chunk_valid[:, None, :, :, None]
    assert torch.equal(tiers.chunk_k * valid, built.chunk_k * valid)
    assert torch.equal(tiers.chunk_v * valid, built.chunk_v * valid)
    gist_valid = built.gist_valid[:, None, :, None]
    assert torch.equal(tiers.gist_k * gist_valid, built.gist_k * gist_valid)
    for level, (grown, fresh) in enumerate(zip(tiers.upper, built.upper), start=2):
        assert torch.equal(grown.valid, fresh.valid), f"level {level}"
        mask = fresh.valid[:, None, :, None]
        assert torch.equal(grown.keys * mask, fresh.keys * mask), f"level {level}"
        assert torch.equal(grown.values * mask, fresh.values * mask), f"level {level}"
        assert added[:, level - 1].tolist() == [bool(fresh.count[b] > old) for b, old in
                                                 enumerate(tiers_of(shorter, spec, states)[0].upper[level - 2].count)]


def test_append_chunk_keeps_fork_tensors():
    spec = GistSpec.from_sizes((2, 2), sinks=1)
    sequences = [insert_gists(list(range(1, 12)), [], GIST_IDS[:2], spec)]
    tiers, _ = tiers_of(sequences, spec, [row_states(20, 1, 4, seed=0)])
    before = tiers.gist_k.clone()
    held = tiers.gist_k
    tiers.append_chunk(torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4), torch.ones(1, 1, 4), torch.ones(1, 1, 4),
                       [torch.ones(1, 1, 4)], [torch.ones(1, 1, 4)])
    assert torch.equal(held, before)
    assert tiers.gist_k.shape[2] == before.shape[2] + 1


LEVEL_IDS = [GIST_ID, GIST_ID - 1, GIST_ID - 2]


def token_context(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, GIST_ID - 3, (length,), generator=generator).tolist()


def gisted(contexts, suffixes, spec):
    ids = LEVEL_IDS[: spec.num_levels]
    return collate([insert_gists(c, s, ids, spec) for c, s in zip(contexts, suffixes)], spec, pad_id=0)


def uncached_logits(model, batch, config):
    with torch.no_grad():
        return model(input_ids=batch.input_ids, position_ids=batch.position_ids, gist_batch=batch,
                     gsa_config=config).logits


DECODE_CASES = [
    ("llama", (2, 2), "gsa", None),
    ("llama", (2, 2, 2), "gsa", 2),
    ("qwen2", (3, 2), "gsa", None),
    ("gemma-sliding", (2, 2, 2), "gsa", None),
    ("llama", (2, 2, 2), "gist-only", None),
    ("llama", (2, 2), "quest", None),
]


@pytest.mark.parametrize(("family", "sizes", "method", "top_k"), DECODE_CASES)
def test_decode_equals_parallel_levels(family, sizes, method, top_k):
    model = make_model(family)
    spec = GistSpec.from_sizes(sizes, sinks=2, window_chunks=1)
    config = GSAConfig(spec=spec, method=method, top_k=top_k)
    contexts, suffixes, steps = [token_context(61, 1), token_context(38, 2)], [[5, 6, 7], [8]], [[11, 12, 13], [14, 15, 16]]
    decoded = decode_steps(model, gisted(contexts, suffixes, spec), config, steps)[0]
    for row in range(2):
        parallel = uncached_logits(model, gisted([contexts[row]], [suffixes[row] + steps[row]], spec), config)[:, -4:]
        assert relative_error(decoded[row : row + 1], parallel) < 1e-4, f"row {row}"


@pytest.mark.parametrize("prefill", ["gist", "dense"])
def test_decode_equals_parallel_gqa3_levels(prefill):
    model = make_model("llama", heads=6, kv_heads=2)
    spec = GistSpec.from_sizes((2, 3), sinks=2)
    config = GSAConfig(spec=spec, prefill=prefill, merge="group-sum")
    contexts, suffix, steps = [token_context(70, 3)], [[5, 6]], [[9, 10, 11]]
    decoded = decode_steps(model, gisted(contexts, suffix, spec), config, steps)[0]
    parallel = uncached_logits(model, gisted(contexts, [suffix[0] + steps[0]], spec), config)[:, -4:]
    assert relative_error(decoded, parallel) < 1e-4


def test_naive_impl_equals_fast_levels():
    model = make_model("llama")
    spec = GistSpec.from_sizes((2, 2, 2), sinks=2)
    contexts, suffix = [token_context(40, 4)], [[5, 6, 7]]
    logits = {}
    for impl in ("fast", "naive"):
        logits[impl] = uncached_logits(model, gisted(contexts, suffix, spec), GSAConfig(spec=spec, impl=impl))
    assert relative_error(logits["naive"], logits["fast"]) < 1e-4


def test_full_method_ignores_levels():
    model = make_model("llama")
    spec = GistSpec.from_sizes((2, 2), sinks=2)
    config = GSAConfig(spec=spec, method="full")
    context = token_context(30, 5)
    plain = collate([insert_gists(context, [5, 6], None, spec)], spec, pad_id=0)
    assert not (plain.kind == GIST).any()
    decoded = decode_steps(model, plain, config, [[9, 10]])[0]
    parallel = uncached_logits(model, collate([insert_gists(context, [5, 6, 9, 10], None, spec)], spec, 0), config)
    assert relative_error(decoded, parallel[:, -3:]) < 1e-4
