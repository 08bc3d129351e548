"""The pieces of the gathered decode path against plain indexing and a dense softmax."""

from __future__ import annotations

import torch

from gsa.ops.attend import Visibility, recalled_chunks
from gsa.ops.recall import partial_attention
from gsa.tiers import gather_chunk_rows


def visibility_of(chunk_on: torch.Tensor) -> Visibility:
    """A Visibility carrying only ``chunk_on`` (B, Hk, 1, N); the other fields are unused here."""
    empty = torch.zeros(chunk_on.shape[0], 1, 0, dtype=torch.bool)
    return Visibility(chunk_on=chunk_on, gist_on=chunk_on, recent_on=empty)


def test_recalled_chunks_ascending_and_padded():
    chunk_on = torch.tensor([[[False, True, False, True, True]], [[True, False, False, False, False]]])
    chunk_on = torch.stack([chunk_on, chunk_on.flip(-1)], dim=1)[:, :, 0, None]  # (B=2, Hk=2, T=1, N=5)
    index, picked = recalled_chunks(visibility_of(chunk_on))

    assert index.shape == (2, 2, 3)
    assert index[0, 0].tolist() == [1, 3, 4]
    assert index[0, 1].tolist() == [0, 1, 3]
    assert index[1, 0, :1].tolist() == [0]
    assert index[1, 1, :1].tolist() == [4]
    assert picked[0].all()
    assert picked[1].tolist() == [[True, False, False], [True, False, False]]


def test_recalled_chunks_none_chosen():
    index, picked = recalled_chunks(visibility_of(torch.zeros(1, 2, 1, 4, dtype=torch.bool)))
    assert index.shape == (1, 2, 0)
    assert picked.shape == (1, 2, 0)


def test_recalled_chunks_match_nonzero():
    torch.manual_seed(0)
    chunk_on = torch.rand(3, 4, 1, 50) > 0.7
    index, picked = recalled_chunks(visibility_of(chunk_on))
    for b in range(3):
        for h in range(4):
            expected = chunk_on[b, h, 0].nonzero().flatten().tolist()
            assert index[b, h][picked[b, h]].tolist() == expected


def test_gather_chunk_rows_one_row_chunks():
    torch.manual_seed(1)
    gists = torch.randn(2, 3, 7, 5)  # (B, Hk, N, D)
    index = torch.randint(0, 7, (2, 3, 4))
    rows = torch.arange(2)[:, None, None]
    heads = torch.arange(3)[None, :, None]
    gathered = gather_chunk_rows(gists[:, :, :, None], index).squeeze(3)
    assert torch.equal(gathered, gists[rows, heads, index])


def test_partial_attention_matches_softmax():
    torch.manual_seed(2)
    grouped = torch.randn(2, 3, 4, 8)  # (B, Hk, G, D)
    keys = [torch.randn(2, 3, length, 8) for length in (3, 10, 1)]
    values = [torch.randn(2, 3, length, 8) for length in (3, 10, 1)]
    visible = [torch.rand(2, 3, length) > 0.4 for length in (3, 10, 1)]
    visible[1][0, 0] = True  # at least one visible key in row (0, 0)
    visible[0][1, 2], visible[1][1, 2], visible[2][1, 2] = False, False, False  # no visible key in row (1, 2)

    out = partial_attention(grouped, list(zip(keys, values, visible))).output()

    all_keys, all_values, all_visible = torch.cat(keys, 2), torch.cat(values, 2), torch.cat(visible, 2)
    logits = (grouped @ all_keys.transpose(-1, -2)).masked_fill(~all_visible[:, :, None], float("-inf"))
    expected = torch.softmax(logits, dim=-1).nan_to_num(0.0) @ all_values
    assert torch.allclose(out, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(out[1, 2], torch.zeros(4, 8))
