"""C++ chunk selection of a decode step against the PyTorch selection and the loop twin."""

from __future__ import annotations

import pytest
import torch

from conftest import relative_error, skip_unavailable
from gsa.config import GSAConfig
from gsa.errors import InvalidInputError
from gsa.layout import GistSpec
from gsa.ops import cpu_kernel
from gsa.ops.attend import Visibility, recalled_chunks
from gsa.ops.naive import naive_recalled_attention, naive_select
from gsa.ops.select import score_gists, select_chunks
from gsa.sparse import selective_attention, visibility
from gsa.tiers import Tiers

# (B, Hk, G, D, N): G = 9 scores in two passes (8 + 1); D = 20 leaves a tail after the 8-lane
# blocks; N = 1 and 5 are tiny tiers, N = 37 is not a multiple of any block.
SHAPES = [
    (2, 2, 4, 16, 37),
    (1, 3, 1, 8, 5),
    (2, 1, 3, 20, 12),
    (1, 2, 9, 24, 30),
    (2, 2, 2, 128, 1),
]


def rows_inputs(batch: int, num_chunks: int, generator: torch.Generator):
    """Per-row gist validity with holes, window starts from before 0 to past N, and k from 0 to N + 1."""
    gist_valid = torch.rand(batch, num_chunks, generator=generator) > 0.2
    window_start = torch.randint(-1, num_chunks + 2, (batch,), generator=generator)
    k = torch.randint(0, num_chunks + 2, (batch,), generator=generator)
    return gist_valid, window_start, k


def torch_choice(scores, gist_valid, window_start, k, merge):
    """The PyTorch pipeline the kernel replaces: select, add the window, list the chunks."""
    num_chunks = gist_valid.shape[-1]
    in_window = torch.arange(num_chunks)[None, :] >= window_start[:, None]  # (B, N)
    candidate = (gist_valid & ~in_window)[:, None, :]  # (B, T, N)
    chosen = select_chunks(scores, candidate, k[:, None], merge)  # (B, Hk, T, N)
    chunk_on = chosen | (gist_valid & in_window)[:, None, None]
    return recalled_chunks(Visibility(chunk_on, chunk_on, torch.zeros(1, 1, 0, dtype=torch.bool)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("merge", ["union", "group-sum"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gist_selection_matches_torch(shape, merge, seed):
    skip_unavailable("cpp")
    batch, kv_heads, group, dim, num_chunks = shape
    generator = torch.Generator().manual_seed(seed)
    grouped = torch.randn(batch, kv_heads, group, dim, generator=generator)
    gist_k = torch.randn(batch, kv_heads, num_chunks, dim, generator=generator)
    gist_valid, window_start, k = rows_inputs(batch, num_chunks, generator)

    index, picked = cpu_kernel.cpp_gist_top_chunks(grouped, gist_k, gist_valid, window_start, k, merge)
    queries = grouped.reshape(batch, kv_heads * group, 1, dim)  # (B, H, T, D)
    expected_index, expected_picked = torch_choice(score_gists(queries, gist_k, 1.0), gist_valid, window_start, k, merge)
    assert torch.equal(picked, expected_picked)
    assert torch.equal(index[picked], expected_index[expected_picked])
    assert torch.equal(index[~picked], torch.zeros_like(index[~picked]))


@pytest.mark.parametrize("merge", ["union", "group-sum"])
def test_score_selection_matches_loop_twin(merge):
    skip_unavailable("cpp")
    generator = torch.Generator().manual_seed(3)
    # Integer scores tie often, and the twin ranks ties by the lower chunk index.
    scores = torch.randint(-3, 4, (2, 3, 4, 1, 23), generator=generator).float()  # (B, Hk, G, T, N)
    gist_valid, window_start, k = rows_inputs(2, 23, generator)
    index, picked = cpu_kernel.cpp_top_chunks(scores[:, :, :, 0], gist_valid, window_start, k, merge)

    in_window = torch.arange(23)[None, :] >= window_start[:, None]
    candidate = (gist_valid & ~in_window)[:, None, :]
    expected = naive_select(scores, candidate, k[:, None], merge)[:, :, 0] | (gist_valid & in_window)[:, None]
    chosen = torch.zeros_like(expected)
    for b, h in zip(*torch.nonzero(picked.any(-1), as_tuple=True)):
        chosen[b, h, index[b, h][picked[b, h]]] = True
    assert torch.equal(chosen, expected)


def test_selection_skips_non_finite_scores():
    skip_unavailable("cpp")
    scores = torch.tensor([[[[0.5, float("nan"), float("inf"), -float("inf"), 0.1, 0.2]]]])  # (1, 1, 1, 6)
    everything = torch.ones(1, 6, dtype=torch.bool)
    index, picked = cpu_kernel.cpp_top_chunks(scores, everything, torch.tensor([6]), torch.tensor([4]), "union")
    assert index[picked].tolist() == [0, 4, 5]


def test_selection_zero_k_keeps_window_only():
    skip_unavailable("cpp")
    grouped, gist_k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 10, 8)
    valid = torch.ones(1, 10, dtype=torch.bool)
    index, picked = cpu_kernel.cpp_gist_top_chunks(grouped, gist_k, valid, torch.tensor([8]), torch.tensor([0]),
                                                   "union")
    assert index.tolist() == [[[8, 9], [8, 9]]]
    assert picked.all()


def test_selection_empty_rows_give_width_zero():
    skip_unavailable("cpp")
    grouped, gist_k = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 4, 8)
    none_valid = torch.zeros(2, 4, dtype=torch.bool)
    index, picked = cpu_kernel.cpp_gist_top_chunks(grouped, gist_k, none_valid, torch.tensor([2, 0]),
                                                   torch.tensor([3, 3]), "group-sum")
    assert index.shape == picked.shape == (2, 1, 0)


@pytest.mark.parametrize("name, change", [
    ("grouped", lambda x: x.double()),
    ("gist_k", lambda x: x[:, :, :, :4]),
    ("gist_valid", lambda x: x.long()),
    ("window_start", lambda x: x[None]),
    ("k", lambda x: x.int()),
])
def test_selection_rejects_bad_inputs(name, change):
    inputs = {"grouped": torch.randn(1, 2, 3, 8), "gist_k": torch.randn(1, 2, 5, 8),
              "gist_valid": torch.ones(1, 5, dtype=torch.bool), "window_start": torch.tensor([4]),
              "k": torch.tensor([2])}
    inputs[name] = change(inputs[name])
    with pytest.raises(InvalidInputError, match=name):
        cpu_kernel.cpp_gist_top_chunks(**inputs, merge="union")


def test_selection_rejects_unknown_merge():
    with pytest.raises(InvalidInputError, match="merge"):
        cpu_kernel.cpp_top_chunks(torch.zeros(1, 1, 1, 2), torch.ones(1, 2, dtype=torch.bool), torch.tensor([1]),
                                  torch.tensor([1]), "max")


def test_selection_operator_checks_shapes():
    skip_unavailable("cpp")
    with pytest.raises(RuntimeError, match="gist_valid"):
        torch.ops.gsa_cpu.top_chunks(torch.zeros(1, 1, 1, 4), torch.ones(1, 3, dtype=torch.bool),
                                     torch.tensor([1]), torch.tensor([1]), False)


def random_tiers(num_chunks: int, kv_heads: int = 2, dim: int = 16, chunk: int = 4, seed: int = 0) -> Tiers:
    generator = torch.Generator().manual_seed(seed)

    def states(*shape):
        return torch.randn(1, kv_heads, *shape, dim, generator=generator)

    def ones(*shape):
        return torch.ones(1, *shape, dtype=torch.bool)

    return Tiers(states(2), states(2), ones(2), states(num_chunks, chunk), states(num_chunks, chunk),
                 ones(num_chunks, chunk), states(num_chunks), states(num_chunks), ones(num_chunks), states(3),
                 states(3), ones(3), torch.tensor([num_chunks]))


@pytest.mark.parametrize("method", ["gsa", "quest", "mean-key", "streaming"])
@pytest.mark.parametrize("merge", ["union", "group-sum"])
def test_decode_step_same_with_either_kernel(method, merge):
    """The C++ selection and attention give the PyTorch path's visibility and output."""
    skip_unavailable("cpp")
    tiers = random_tiers(num_chunks=41)
    query = torch.randn(1, 6, 1, 16, generator=torch.Generator().manual_seed(9))  # G = 3
    slot = torch.tensor([[1]])  # the last recent token comes after the query, so it stays hidden
    outputs = {}
    for kernel in ("torch", "cpp"):
        config = GSAConfig(method=method, merge=merge, spec=GistSpec(chunk_size=4, window_chunks=2),
                           recall_kernel=kernel)
        vis = visibility(query, tiers, slot, config, layer_idx=1, scaling=0.25)
        out, counts = selective_attention(query, tiers, slot, config, layer_idx=1, scaling=0.25)
        outputs[kernel] = (vis.chunk_on, vis.gist_on, out, counts.attended)
    for fast, reference in zip(outputs["cpp"], outputs["torch"]):
        assert torch.allclose(fast, reference, rtol=1e-5, atol=1e-6) if fast.is_floating_point() \
            else torch.equal(fast, reference)


def loop_attention(grouped, rows):
    """Loop twin of one softmax per (b, h, g) over explicit (key, value) rows: rows[b][h] lists them.

    Returns the (B, Hk, G, D) output, zeros where a row has no key, in float64.
    """
    batch, kv_heads, group, dim = grouped.shape
    out = torch.zeros(batch, kv_heads, group, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(kv_heads):
            if not rows[b][h]:
                continue
            keys = torch.stack([key for key, _ in rows[b][h]]).double()
            values = torch.stack([value for _, value in rows[b][h]]).double()
            for g in range(group):
                weights = torch.softmax(keys @ grouped[b, h, g].double(), dim=0)
                out[b, h, g] = weights @ values
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("merge", ["union", "group-sum"])
@pytest.mark.parametrize("with_gists", [True, False])
def test_select_and_attend_matches_twins(shape, merge, with_gists):
    """The fused call picks what the selection kernel picks and attends sinks, recent tokens and
    the picked chunks as the loop twin does."""
    skip_unavailable("cpp")
    batch, kv_heads, group, dim, num_chunks = shape
    generator = torch.Generator().manual_seed(5)
    grouped = torch.randn(batch, kv_heads, group, dim, generator=generator)
    gist_k, gist_v = torch.randn(2, batch, kv_heads, num_chunks, dim, generator=generator)
    chunk_k, chunk_v = torch.randn(2, batch, kv_heads, num_chunks, 3, dim, generator=generator)
    chunk_valid = torch.rand(batch, num_chunks, 3, generator=generator) > 0.3
    chunk_valid[:, :, 0] = True
    sink_k, sink_v = torch.randn(2, batch, kv_heads, 2, dim, generator=generator)
    recent_k, recent_v = torch.randn(2, batch, kv_heads, 5, dim, generator=generator)
    sink_valid = torch.rand(batch, 2, generator=generator) > 0.3
    recent_valid = torch.rand(batch, 5, generator=generator) > 0.5
    gist_valid, window_start, k = rows_inputs(batch, num_chunks, generator)

    index, picked, partial = cpu_kernel.cpp_select_and_attend(
        grouped, gist_k, gist_v, gist_valid, window_start, k, merge, chunk_k, chunk_v, chunk_valid, with_gists,
        sinks=(sink_k, sink_v, sink_valid), recent=(recent_k, recent_v, recent_valid))
    expected_index, expected_picked = cpu_kernel.cpp_gist_top_chunks(grouped, gist_k, gist_valid, window_start, k,
                                                                     merge)
    assert torch.equal(index, expected_index)
    assert torch.equal(picked, expected_picked)

    rows = [[[] for _ in range(kv_heads)] for _ in range(batch)]
    for b in range(batch):
        for h in range(kv_heads):
            rows[b][h] += [(sink_k[b, h, s], sink_v[b, h, s]) for s in range(2) if sink_valid[b, s]]
            rows[b][h] += [(recent_k[b, h, r], recent_v[b, h, r]) for r in range(5) if recent_valid[b, r]]
            for n in index[b, h][picked[b, h]].tolist():
                rows[b][h] += [(chunk_k[b, h, n, c], chunk_v[b, h, n, c]) for c in range(3) if chunk_valid[b, n, c]]
                if with_gists:
                    rows[b][h].append((gist_k[b, h, n], gist_v[b, h, n]))
    assert relative_error(partial.output(), loop_attention(grouped, rows).float()) < 1e-5
    seen = torch.tensor([[bool(rows[b][h]) for h in range(kv_heads)] for b in range(batch)])
    assert torch.equal(torch.isfinite(partial.lse()), seen[..., None].expand(-1, -1, group))


def small_fused_call(gists: torch.Tensor, sinks: tuple) -> None:
    """Call the fused kernel on one row, one KV head, G = 2, D = 8 and four chunks of two tokens."""
    grouped, chunks = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 4, 2, 8)
    recent = (torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8), torch.ones(1, 2, dtype=torch.bool))
    cpu_kernel.cpp_select_and_attend(grouped, gists, gists, torch.ones(1, 4, dtype=torch.bool), torch.tensor([2]),
                                     torch.tensor([1]), "union", chunks, chunks, torch.ones(1, 4, 2, dtype=torch.bool),
                                     True, sinks=sinks, recent=recent)


def test_select_and_attend_rejects_float64_gists():
    sinks = (torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(InvalidInputError, match="gist_k"):
        small_fused_call(torch.randn(1, 1, 4, 8, dtype=torch.float64), sinks)


def test_select_and_attend_rejects_bad_sinks():
    bad = (torch.randn(1, 1, 2, 6), torch.randn(1, 1, 2, 6), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(InvalidInputError, match="sink keys"):
        small_fused_call(torch.randn(1, 1, 4, 8), bad)


def test_selection_huge_k_keeps_every_candidate():
    skip_unavailable("cpp")
    scores = torch.randn(1, 2, 3, 7, generator=torch.Generator().manual_seed(4))
    valid = torch.ones(1, 7, dtype=torch.bool)
    every = cpu_kernel.cpp_top_chunks(scores, valid, torch.tensor([7]), torch.tensor([7]), "union")
    huge = cpu_kernel.cpp_top_chunks(scores, valid, torch.tensor([7]), torch.tensor([2 ** 62 + 1]), "union")
    assert torch.equal(huge[0], every[0])
    assert torch.equal(huge[1], every[1])


@pytest.mark.parametrize("merge", ["union", "group-sum"])
def test_non_finite_scores_agree_across_paths(merge):
    """NaN and infinite scores are skipped by the C++ selection, the PyTorch selection and the twin."""
    skip_unavailable("cpp")
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([[[[0.5, nan, 0.4, 0.1, inf, -inf]], [[inf, 0.2, -inf, 0.3, 0.0, 0.6]]]])  # (1, 1, 2, 1, 6)
    scores = scores.reshape(1, 1, 2, 1, 6)
    candidate = torch.ones(1, 1, 6, dtype=torch.bool)
    k = torch.tensor([[2]])
    index, picked = cpu_kernel.cpp_top_chunks(scores[:, :, :, 0], candidate[:, 0], torch.tensor([6]), k[:, 0], merge)
    fast = torch.zeros(1, 1, 6, dtype=torch.bool)
    fast[0, 0, index[0, 0][picked[0, 0]]] = True
    torch_chosen = select_chunks(scores, candidate, k, merge)[:, :, 0]
    twin_chosen = naive_select(scores, candidate, k, merge)[:, :, 0]
    assert torch.equal(fast, twin_chosen)
    assert torch.equal(torch_chosen, twin_chosen)


def test_oracle_twin_row_without_keys():
    """A query with no visible key gets zeros from the oracle's fast path and from its loop twin."""
    def states(*shape):
        return torch.randn(1, 1, *shape, 8, generator=torch.Generator().manual_seed(len(shape)))

    def hidden(*shape):
        return torch.zeros(1, *shape, dtype=torch.bool)

    query = torch.randn(1, 2, 1, 8, generator=torch.Generator().manual_seed(0))
    for impl in ("fast", "naive"):
        tiers = Tiers(states(1), states(1), hidden(1), states(4, 2), states(4, 2), hidden(4, 2), states(4), states(4),
                      torch.ones(1, 4, dtype=torch.bool), states(1), states(1), hidden(1), torch.tensor([4]))
        config = GSAConfig(method="oracle", impl=impl, spec=GistSpec(chunk_size=2, window_chunks=1))
        out, _ = selective_attention(query, tiers, torch.tensor([[0]]), config, layer_idx=1, scaling=0.3)
        assert torch.equal(out, torch.zeros_like(out))
