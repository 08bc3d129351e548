"""Tests of the gathered prefill attention (``masked_attention``) against its full-width twins.

The gathered path attends each query block only to the key columns that the block's candidates
allow. It must give the values and the gradients (w.r.t. query, key and value) of the full-width
path on every query row with a visible key, for every rule the prefill and the sliding-window
layers use.
"""

from __future__ import annotations

import pytest
import torch
from conftest import relative_error

from gsa.attention import causal_candidates, gist_candidates, masked_attention, prefill_candidates
from gsa.layout import GistSpec, TokenKind, collate, insert_gists
from gsa.masks import and_masks, causal, dense_mask, padding, prefill_rule, sliding_window

TOLERANCE = 1e-5
GIST_IDS = [90, 91, 92]  # one gist token per level
PAD_ID = 0
DIM = 8
SCALING = 0.3

RULES = ["gist", "dense", "causal"]
LEVELS = [(4,), (4, 4)]
GQA_SHAPES = [(2, 2), (6, 2), (8, 2)]  # (H, Hk): G = 1, 3 and 4
# (context, suffix) tokens per row. Rows are left-padded. In "long-suffix" a row with fewer key
# candidates than another row also has no padding, so its padded candidate slots must stay hidden.
BATCHES = {"single": [(45, 3)], "ragged": [(45, 3), (22, 3)], "long-suffix": [(45, 2), (25, 25)]}
BLOCKS = [16, 512]  # 16 divides no length below; 512 makes one block


def make_batch(rows, sizes, sinks=2, window=1):
    """Collate one gisted sequence per (context, suffix) token count in ``rows``."""
    spec = GistSpec.from_sizes(sizes, sinks=sinks, window_chunks=window)
    sequences = [
        insert_gists(list(range(10, 10 + context)), list(range(5, 5 + suffix)), GIST_IDS, spec)
        for context, suffix in rows
    ]
    return collate(sequences, spec, pad_id=PAD_ID)


def random_inputs(batch_size, heads, kv_heads, queries, keys, seed):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch_size, heads, queries, DIM), (batch_size, kv_heads, keys, DIM), (batch_size, kv_heads, keys, DIM)]
    return [torch.randn(*shape, generator=generator) for shape in shapes]


def forward_backward(attend, tensors, real_rows):
    """Run ``attend`` on fresh leaves; the loss reads only ``real_rows`` (B, T), as training does.

    Returns the (rows, H, D) outputs of the real rows and the gradients w.r.t. query, key, value.
    """
    leaves = [tensor.clone().requires_grad_(True) for tensor in tensors]
    out = attend(*leaves).transpose(1, 2)[real_rows]  # (B, H, T, D) -> (rows, H, D)
    weight = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
    (out * weight).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


def assert_paths_match(gathered, full_width, tensors, real_rows):
    out_fast, grads_fast = forward_backward(gathered, tensors, real_rows)
    out_slow, grads_slow = forward_backward(full_width, tensors, real_rows)
    assert relative_error(out_fast, out_slow) < TOLERANCE
    for name, fast, slow in zip(("query", "key", "value"), grads_fast, grads_slow):
        assert relative_error(fast, slow) < TOLERANCE, f"gradient w.r.t. {name}"


# Prefill rules: gathered against full width, forward and backward


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("rows", sorted(BATCHES))
@pytest.mark.parametrize("heads,kv_heads", GQA_SHAPES)
@pytest.mark.parametrize("sizes", LEVELS, ids=["one-level", "two-level"])
@pytest.mark.parametrize("name", RULES)
def test_prefill_rule_matches_full_width(name, sizes, heads, kv_heads, rows, block):
    batch = make_batch(BATCHES[rows], sizes)
    length = batch.kind.shape[1]
    tensors = random_inputs(batch.batch_size, heads, kv_heads, length, length, seed=len(name) + heads + block)
    rule, candidates = prefill_rule(batch, name), prefill_candidates(batch, name)

    def gathered(q, k, v):
        return masked_attention(q, k, v, rule, SCALING, candidates=candidates, block_size=block)

    def full_width(q, k, v):
        return masked_attention(q, k, v, rule, SCALING, gather=False, block_size=block)

    assert_paths_match(gathered, full_width, tensors, batch.attention_mask.bool())


@pytest.mark.parametrize("sizes", LEVELS, ids=["one-level", "two-level"])
def test_gist_prefill_matches_loop_twin(sizes):
    batch = make_batch([(30, 3), (17, 3)], sizes)
    length = batch.kind.shape[1]
    query, key, value = random_inputs(2, 6, 2, length, length, seed=3)
    rule = prefill_rule(batch, "gist")
    fast = masked_attention(query, key, value, rule, SCALING, candidates=gist_candidates(batch), block_size=8)
    slow = masked_attention(query, key, value, rule, SCALING, naive=True)
    real = batch.attention_mask.bool()
    assert relative_error(fast.transpose(1, 2)[real], slow.transpose(1, 2)[real]) < TOLERANCE


def test_gathered_without_candidates_matches():
    """With no candidates every block attends all keys, and the result still equals the twin."""
    batch = make_batch(BATCHES["ragged"], (4,))
    length = batch.kind.shape[1]
    tensors = random_inputs(2, 6, 2, length, length, seed=4)
    rule = prefill_rule(batch, "gist")

    def gathered(q, k, v):
        return masked_attention(q, k, v, rule, SCALING, block_size=16)

    def full_width(q, k, v):
        return masked_attention(q, k, v, rule, SCALING, gather=False, block_size=16)

    assert_paths_match(gathered, full_width, tensors, batch.attention_mask.bool())


# Sliding-window layers: queries are the last T of S stored keys


@pytest.mark.parametrize("queries", [1, 20, None], ids=["one-query", "tail", "all"])
@pytest.mark.parametrize("heads,kv_heads", GQA_SHAPES)
def test_sliding_window_matches_full_width(heads, kv_heads, queries):
    batch = make_batch(BATCHES["ragged"], (4,))
    length = batch.kind.shape[1]
    queries = queries or length
    tensors = random_inputs(2, heads, kv_heads, queries, length, seed=heads + queries)
    window = 12
    rule = and_masks(causal(), padding(batch.kind), sliding_window(window))
    candidates = causal_candidates(batch.kind, window=window)
    offset = length - queries

    def gathered(q, k, v):
        return masked_attention(q, k, v, rule, SCALING, q_offset=offset, candidates=candidates, block_size=16)

    def full_width(q, k, v):
        return masked_attention(q, k, v, rule, SCALING, q_offset=offset, gather=False, block_size=16)

    assert_paths_match(gathered, full_width, tensors, batch.attention_mask.bool()[:, offset:])


# Candidates: every key a rule shows to a block must be a candidate of that block


def candidate_cases():
    cases = []
    for sizes, sinks, window in [((4,), 2, 1), ((3,), 0, 2), ((4,), 3, 0), ((4, 4), 2, 1), ((2, 2, 2), 1, 1)]:
        batch = make_batch([(61, 3), (30, 3), (7, 9)], sizes, sinks=sinks, window=window)
        label = f"{'x'.join(map(str, sizes))}-s{sinks}-p{window}"
        cases += [pytest.param(batch, name, id=f"{label}-{name}") for name in RULES]
    return cases


@pytest.mark.parametrize("batch,name", candidate_cases())
def test_candidates_cover_rule(batch, name):
    rule, candidates = prefill_rule(batch, name), prefill_candidates(batch, name)
    length = batch.kind.shape[1]
    for block in (1, 5, 16):
        for start in range(0, length, block):
            stop = min(start + block, length)
            seen = dense_mask(rule, batch.batch_size, stop - start, length, start)[:, 0].any(1)  # (B, S)
            allowed = candidates(start, stop)
            assert not (seen & ~allowed).any(), f"block [{start}, {stop}) sees keys outside its candidates"


def test_window_candidates_cover_rule():
    batch = make_batch([(61, 3), (30, 3)], (4,))
    length = batch.kind.shape[1]
    for window in (1, 5, 40):
        rule = and_masks(causal(), padding(batch.kind), sliding_window(window))
        candidates = causal_candidates(batch.kind, window=window)
        for start in range(0, length, 7):
            stop = min(start + 7, length)
            seen = dense_mask(rule, 2, stop - start, length, start)[:, 0].any(1)
            assert not (seen & ~candidates(start, stop)).any()


def test_gist_candidates_skip_old_raw_tokens():
    """A late block of a long gist layout gets sinks, gists and its local window, not the old raw tokens."""
    batch = make_batch([(400, 3)], (16,), sinks=3, window=1)
    kind = batch.kind[0]
    start, stop = 300, 332
    allowed = gist_candidates(batch)(start, stop)[0]
    columns = torch.arange(kind.numel())
    old_raw = (kind == TokenKind.RAW) & (columns < 250)
    earlier_gists = (kind == TokenKind.GIST) & (columns < stop)
    assert not (allowed & old_raw).any()
    assert allowed[kind == TokenKind.SINK].all()
    assert allowed[earlier_gists].all()
    assert not allowed[stop:].any()


# Edge cases


def test_rows_without_keys_stay_finite():
    batch = make_batch([(20, 3)], (4,))
    length = batch.kind.shape[1]
    query, key, value = random_inputs(1, 4, 2, length, length, seed=5)

    def hide_everything(b, h, q_idx, kv_idx):
        return kv_idx < 0

    def no_candidates(start, stop):
        return torch.zeros(1, length, dtype=torch.bool)

    out = masked_attention(query, key, value, hide_everything, SCALING, candidates=no_candidates, block_size=8)
    assert torch.isfinite(out).all()


def test_candidates_of_wrong_width_raise():
    batch = make_batch([(20, 3)], (4,))
    length = batch.kind.shape[1]
    query, key, value = random_inputs(1, 4, 2, length, length, seed=6)
    short = causal_candidates(batch.kind[:, :-1])
    with pytest.raises(ValueError, match="key candidates"):
        masked_attention(query, key, value, prefill_rule(batch, "causal"), SCALING, candidates=short)
