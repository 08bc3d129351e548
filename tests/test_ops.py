"""Fast ops against their loop twins at awkward sizes and GQA ratios 1, 3 and 4."""

from __future__ import annotations

import pytest
import torch

from conftest import relative_error, skip_unavailable
from gsa.config import GSAConfig
from gsa.layout import GistSpec, collate, insert_gists
from gsa.masks import dense_mask, gist_mask
from gsa.ops.attend import attend_gathered, attend_masked, recent_visibility
from gsa.ops.naive import naive_masked_attention, naive_select, naive_tier_attention
from gsa.ops.select import budget, score_gists, select_chunks
from gsa.sparse import selective_attention, visibility
from gsa.tiers import split_tiers

TOLERANCE = 1e-5
GQA_SHAPES = [(3, 3), (6, 2), (8, 2)]  # (H, Hk): G = 1, 3, 4


def ragged_tiers(chunk_size: int, kv_heads: int, dim: int = 8, seed: int = 0):
    """Tiers of a two-row batch whose contexts are not multiples of the chunk size."""
    torch.manual_seed(seed)
    spec = GistSpec(chunk_size=chunk_size, sinks=2, window_chunks=1)
    sequences = [
        insert_gists(list(range(1, 1 + 7 * chunk_size + 3)), [90, 91, 92], 99, spec),
        insert_gists(list(range(1, 1 + 4 * chunk_size + 1)), [93, 94], 99, spec),
    ]
    batch = collate(sequences, spec, pad_id=0)
    length = batch.input_ids.shape[1]
    key = torch.randn(2, kv_heads, length, dim)
    value = torch.randn(2, kv_heads, length, dim)
    return batch, split_tiers(key, value, batch)


def test_score_gists_matches_loops():
    torch.manual_seed(0)
    query, gist_k = torch.randn(2, 6, 3, 8), torch.randn(2, 2, 5, 8)
    scores = score_gists(query, gist_k, scaling=0.5)
    for b in range(2):
        for h in range(6):
            for t in range(3):
                for n in range(5):
                    expected = float(query[b, h, t] @ gist_k[b, h // 3, n]) * 0.5
                    assert abs(float(scores[b, h // 3, h % 3, t, n]) - expected) < 1e-5


@pytest.mark.parametrize("merge", ["union", "group-sum"])
@pytest.mark.parametrize("top_p", [None, 0.6])
def test_select_matches_naive(merge, top_p):
    torch.manual_seed(1)
    scores = torch.randn(2, 3, 4, 5, 11)  # (B, Hk, G, T, N)
    candidate = torch.rand(2, 5, 11) > 0.3
    k = torch.randint(1, 5, (2, 5))
    fast = select_chunks(scores, candidate, k, merge, top_p)
    slow = naive_select(scores, candidate, k, merge, top_p)
    assert torch.equal(fast, slow)


def test_select_never_picks_noncandidates():
    torch.manual_seed(2)
    scores = torch.randn(1, 2, 2, 3, 9)
    candidate = torch.zeros(1, 3, 9, dtype=torch.bool)
    candidate[0, :, :4] = True
    chosen = select_chunks(scores, candidate, torch.full((1, 3), 8), "union")
    assert not chosen[..., 4:].any()
    assert chosen[..., :4].all()


def test_budget_rule_values():
    num_keys = torch.tensor([[0, 767, 768, 100_000]])
    k = budget(num_keys, torch.tensor([400]), ratio=16, group=3, chunk=16)
    # floor(n / 768) + 1, capped at floor(400 / 4) = 100
    assert k.tolist() == [[1, 1, 2, 100]]


def test_budget_cap_at_least_one():
    k = budget(torch.tensor([[5000]]), torch.tensor([2]), ratio=4, group=1, chunk=4)
    assert k.tolist() == [[1]]


@pytest.mark.parametrize("heads,kv_heads", GQA_SHAPES)
@pytest.mark.parametrize("chunk_size", [1, 3, 4])
def test_masked_tier_attention_matches_naive(heads, kv_heads, chunk_size):
    batch, tiers = ragged_tiers(chunk_size, kv_heads)
    query = torch.randn(2, heads, batch.suffix_slot.shape[1], 8)
    config = GSAConfig(spec=batch.spec, top_k=2)
    vis = visibility(query, tiers, batch.suffix_slot, config, layer_idx=1, scaling=0.3)
    valid = batch.suffix_slot >= 0
    fast = attend_masked(query, tiers, vis, 0.3)
    slow = naive_tier_attention(query, tiers, vis, 0.3)
    for b in range(2):
        assert relative_error(fast[b][:, valid[b]], slow[b][:, valid[b]]) < TOLERANCE


@pytest.mark.parametrize("heads,kv_heads", GQA_SHAPES)
@pytest.mark.parametrize("method", ["gsa", "gist-only"])
@pytest.mark.parametrize("prefill", ["gist", "dense"])
@pytest.mark.parametrize("kernel", ["torch", "cpp"])
def test_gathered_matches_masked_and_naive(heads, kv_heads, method, prefill, kernel):
    skip_unavailable(kernel)
    batch, tiers = ragged_tiers(chunk_size=3, kv_heads=kv_heads, seed=3)
    query = torch.randn(2, heads, 1, 8)
    slot = batch.suffix_slot[:, -1:]
    config = GSAConfig(spec=batch.spec, method=method, top_k=3, prefill=prefill)
    vis = visibility(query, tiers, slot, config, layer_idx=2, scaling=0.3)
    gathered = attend_gathered(query, tiers, vis, 0.3, kernel=kernel)
    assert relative_error(gathered, attend_masked(query, tiers, vis, 0.3)) < TOLERANCE
    assert relative_error(gathered, naive_tier_attention(query, tiers, vis, 0.3)) < TOLERANCE


@pytest.mark.parametrize("merge", ["union", "group-sum"])
def test_selective_naive_impl_matches_fast(merge):
    batch, tiers = ragged_tiers(chunk_size=4, kv_heads=2, seed=4)
    query = torch.randn(2, 8, batch.suffix_slot.shape[1], 8)
    fast_config = GSAConfig(spec=batch.spec, merge=merge)
    naive_config = GSAConfig(spec=batch.spec, merge=merge, impl="naive")
    fast, fast_counts = selective_attention(query, tiers, batch.suffix_slot, fast_config, 1, 0.25)
    slow, slow_counts = selective_attention(query, tiers, batch.suffix_slot, naive_config, 1, 0.25)
    valid = batch.suffix_slot >= 0
    for b in range(2):
        assert relative_error(fast[b][:, valid[b]], slow[b][:, valid[b]]) < TOLERANCE
    assert torch.equal(fast_counts.attended, slow_counts.attended)


def test_selection_indices_equal_naive():
    batch, tiers = ragged_tiers(chunk_size=2, kv_heads=2, seed=5)
    query = torch.randn(2, 6, batch.suffix_slot.shape[1], 8)
    fast = visibility(query, tiers, batch.suffix_slot, GSAConfig(spec=batch.spec), 1, 0.3)
    slow = visibility(query, tiers, batch.suffix_slot, GSAConfig(spec=batch.spec, impl="naive"), 1, 0.3)
    assert torch.equal(fast.chunk_on, slow.chunk_on)


def test_window_chunks_always_unfolded():
    batch, tiers = ragged_tiers(chunk_size=3, kv_heads=1, seed=6)
    query = torch.randn(2, 1, 1, 8)
    vis = visibility(query, tiers, batch.suffix_slot[:, -1:], GSAConfig(spec=batch.spec, top_k=1), 1, 1.0)
    for b, num_chunks in enumerate(batch.num_chunks.tolist()):
        assert vis.chunk_on[b, 0, 0, num_chunks - 1]
        assert int(vis.chunk_on[b, 0, 0].sum()) == 2  # the window chunk and one recalled chunk


def test_first_layer_attends_every_gist():
    batch, tiers = ragged_tiers(chunk_size=3, kv_heads=1, seed=7)
    query = torch.randn(2, 1, 1, 8)
    vis = visibility(query, tiers, batch.suffix_slot[:, -1:], GSAConfig(spec=batch.spec), 0, 1.0)
    assert torch.equal(vis.gist_on[:, 0, 0], tiers.gist_valid)
    assert int(vis.chunk_on[0, 0, 0].sum()) == 1


def test_topk_all_chunks_equals_causal_dense():
    """With every chunk recalled, suffix queries see every earlier key: plain causal attention."""
    batch, tiers = ragged_tiers(chunk_size=3, kv_heads=2, seed=8)
    length = batch.input_ids.shape[1]
    key, value = torch.randn(2, 2, length, 8), torch.randn(2, 2, length, 8)
    tiers = split_tiers(key, value, batch)
    query = torch.randn(2, 4, length, 8)
    suffix_query = torch.stack([query[b][:, batch.suffix_index[b].clamp(min=0)] for b in range(2)])
    config = GSAConfig(spec=batch.spec, top_k=100)
    out, _ = selective_attention(suffix_query, tiers, batch.suffix_slot, config, 1, 0.3)

    causal = dense_mask(lambda b, h, q, kv: (kv <= q) & (batch.kind[b, kv] != 5), 2, length, length)
    expected = naive_masked_attention(query, key, value, causal, 0.3)
    for b in range(2):
        cols = batch.suffix_index[b][batch.suffix_index[b] >= 0]
        got = out[b][:, batch.suffix_index[b] >= 0]
        assert relative_error(got, expected[b][:, cols]) < TOLERANCE


@pytest.mark.parametrize("heads,kv_heads", GQA_SHAPES)
def test_masked_sdpa_matches_naive(heads, kv_heads):
    from gsa.attention import masked_attention

    batch, _ = ragged_tiers(chunk_size=3, kv_heads=kv_heads, seed=9)
    length = batch.input_ids.shape[1]
    query = torch.randn(2, heads, length, 8)
    key, value = torch.randn(2, kv_heads, length, 8), torch.randn(2, kv_heads, length, 8)
    rule = gist_mask(batch)
    fast = masked_attention(query, key, value, rule, 0.3)
    mask = dense_mask(rule, 2, length, length)
    slow = naive_masked_attention(query, key, value, mask, 0.3)
    real = batch.attention_mask.bool()
    for b in range(2):
        assert relative_error(fast[b][:, real[b]], slow[b][:, real[b]]) < TOLERANCE


def test_masked_sdpa_gradients_match_naive():
    from gsa.attention import masked_attention

    batch, _ = ragged_tiers(chunk_size=4, kv_heads=2, seed=10)
    length = batch.input_ids.shape[1]
    tensors = [torch.randn(1, 6, length, 8), torch.randn(1, 2, length, 8), torch.randn(1, 2, length, 8)]
    rule = gist_mask(batch)
    mask = dense_mask(rule, 2, length, length)[:1]
    grads = []
    for fn in (lambda q, k, v: masked_attention(q, k, v, rule, 0.3), lambda q, k, v: _masked_softmax(q, k, v, mask, 0.3)):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        fn(*leaves)[:, :, batch.attention_mask[0].bool()].square().sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for fast, slow in zip(*grads):
        assert relative_error(fast, slow) < 1e-4


def _masked_softmax(query, key, value, mask, scaling):
    """Differentiable dense twin: explicit logits, mask and softmax with GQA repetition."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    logits = (query @ key.transpose(-1, -2)) * scaling
    mask = mask | ~mask.any(-1, keepdim=True)
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), -1) @ value


def test_recent_visibility_is_causal():
    batch, tiers = ragged_tiers(chunk_size=3, kv_heads=1, seed=11)
    visible = recent_visibility(tiers, batch.suffix_slot)
    for b in range(2):
        for t, slot in enumerate(batch.suffix_slot[b].tolist()):
            if slot < 0:
                continue
            expected = [bool(tiers.recent_valid[b, r]) and r <= slot for r in range(tiers.recent_valid.shape[1])]
            assert visible[b, t].tolist() == expected



@pytest.mark.parametrize("name", ["gsa", "mean-key", "quest", "oracle", "recent", "streaming", "random"])
def test_method_scores_match_loops(name):
    from gsa.methods import SelectionInputs, get_method

    batch, tiers = ragged_tiers(chunk_size=3, kv_heads=2, seed=12)
    query = torch.randn(2, 6, 2, 8)
    slot = batch.suffix_slot[:, -2:]
    inputs = SelectionInputs(query, tiers, recent_visibility(tiers, slot), 0.3, slot, seed=5, layer_idx=2)
    method = get_method(name)
    fast, slow = method.scores(inputs), method.scores_naive(inputs)
    candidate = tiers.gist_valid[:, None, None, None, :].expand_as(fast)
    assert relative_error(fast[candidate], slow[candidate]) < TOLERANCE


@pytest.mark.parametrize("name", ["gsa", "mean-key", "quest", "oracle", "recent", "streaming", "random"])
def test_method_selection_matches_naive(name):
    batch, tiers = ragged_tiers(chunk_size=3, kv_heads=2, seed=13)
    query = torch.randn(2, 6, batch.suffix_slot.shape[1], 8)
    fast = visibility(query, tiers, batch.suffix_slot, GSAConfig(spec=batch.spec, method=name), 1, 0.3)
    slow = visibility(query, tiers, batch.suffix_slot, GSAConfig(spec=batch.spec, method=name, impl="naive"), 1, 0.3)
    valid = batch.suffix_slot >= 0
    for b in range(2):
        assert torch.equal(fast.chunk_on[b][:, valid[b]], slow.chunk_on[b][:, valid[b]])
