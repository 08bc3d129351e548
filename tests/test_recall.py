"""Recall kernels (PyTorch and C++) against the loop twin, at awkward sizes and group sizes."""

from __future__ import annotations

import pytest
import torch

from conftest import relative_error, skip_unavailable
from gsa.config import GSAConfig
from gsa.errors import InvalidInputError
from gsa.ops import cpu_kernel
from gsa.ops.naive import naive_recalled_attention
from gsa.ops.recall import Partial, partial_attention, recalled_attention, resolve_kernel

TOLERANCE = 1e-5
KERNELS = ["torch", "cpp"]

# (B, Hk, G, D, N, Cm, K): G = 9 takes two passes of the C++ kernel (8 + 1); D = 20 and 24 leave
# tails after the 8- and 16-lane blocks; Cm = 1 and 5 are odd chunk lengths; K = 0 recalls nothing.
CASES = [
    (2, 3, 4, 24, 7, 5, 3),
    (1, 2, 3, 64, 5, 1, 2),
    (2, 1, 1, 16, 4, 16, 2),
    (1, 2, 9, 20, 6, 4, 4),
    (2, 2, 4, 128, 40, 16, 12),
    (1, 1, 2, 8, 1, 3, 1),
    (2, 2, 4, 16, 4, 4, 0),
]


def recall_inputs(batch, kv_heads, group, dim, num_chunks, chunk_len, recalled, seed=0):
    """Random queries, tiers and recalled chunks. Row (0, 0) picks nothing, every other row at least one chunk."""
    generator = torch.Generator().manual_seed(seed)
    grouped = torch.randn(batch, kv_heads, group, dim, generator=generator)
    chunk_k = torch.randn(batch, kv_heads, num_chunks, chunk_len, dim, generator=generator)
    chunk_v = torch.randn(batch, kv_heads, num_chunks, chunk_len, dim, generator=generator)
    chunk_valid = torch.rand(batch, num_chunks, chunk_len, generator=generator) > 0.25
    chunk_valid[:, :, 0] = True  # every chunk has a token, as in a real layout
    order = torch.rand(batch, kv_heads, num_chunks, generator=generator).argsort(-1)
    index = order[..., :recalled].sort(-1).values if recalled <= num_chunks else order.repeat(1, 1, 2)[..., :recalled]
    picked = torch.rand(batch, kv_heads, recalled, generator=generator) > 0.3
    if recalled:
        picked[..., 0] = True
        picked[0, 0] = False
    gist_k = torch.randn(batch, kv_heads, num_chunks, dim, generator=generator)
    gist_v = torch.randn(batch, kv_heads, num_chunks, dim, generator=generator)
    return grouped, chunk_k, chunk_v, chunk_valid, index, picked, gist_k, gist_v


def assert_matches_twin(partial: Partial, expected: torch.Tensor, expected_lse: torch.Tensor) -> None:
    assert relative_error(partial.output(), expected) < TOLERANCE
    finite = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(partial.lse()), finite)
    assert relative_error(partial.lse()[finite], expected_lse[finite]) < TOLERANCE
    assert torch.equal(partial.total[~finite], torch.zeros_like(partial.total[~finite]))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_gists", [True, False])
def test_kernel_matches_twin(kernel, case, with_gists):
    skip_unavailable(kernel)
    grouped, chunk_k, chunk_v, valid, index, picked, gist_k, gist_v = recall_inputs(*case)
    gists = (gist_k, gist_v) if with_gists else (None, None)
    expected, expected_lse = naive_recalled_attention(grouped, chunk_k, chunk_v, valid, index, picked, *gists)
    partial = recalled_attention(grouped, chunk_k, chunk_v, valid, index, picked, *gists, kernel=kernel)
    assert_matches_twin(partial, expected, expected_lse)


def test_empty_row_gives_zeros():
    grouped, chunk_k, chunk_v, valid, index, picked, gist_k, gist_v = recall_inputs(2, 2, 3, 16, 5, 4, 3)
    for kernel in KERNELS:
        if kernel == "cpp" and not cpu_kernel.cpp_available():
            continue
        partial = recalled_attention(grouped, chunk_k, chunk_v, valid, index, picked, gist_k, gist_v, kernel=kernel)
        assert torch.equal(partial.output()[0, 0], torch.zeros(3, 16))
        assert torch.isneginf(partial.top[0, 0]).all()
        assert partial.output()[1].abs().sum() > 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_ignores_unpicked_garbage(kernel):
    skip_unavailable(kernel)
    grouped, chunk_k, chunk_v, valid, index, picked, gist_k, gist_v = recall_inputs(2, 2, 3, 16, 6, 4, 4, seed=3)
    expected, expected_lse = naive_recalled_attention(grouped, chunk_k, chunk_v, valid, index, picked, gist_k, gist_v)
    index = torch.where(picked, index, torch.tensor([-1, 6, 99, -5])[None, None, :].expand_as(index))
    partial = recalled_attention(grouped, chunk_k, chunk_v, valid, index, picked, gist_k, gist_v, kernel=kernel)
    assert_matches_twin(partial, expected, expected_lse)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bad", [6, -1])
def test_kernel_rejects_picked_out_of_range(kernel, bad):
    skip_unavailable(kernel)
    grouped, chunk_k, chunk_v, valid, index, picked, gist_k, gist_v = recall_inputs(1, 2, 4, 16, 6, 4, 4, seed=1)
    index[0, 1, 0], picked[0, 1, 0] = bad, True
    with pytest.raises(InvalidInputError, match=f"recalled chunk index {bad} is outside the tier's 6 chunks"):
        recalled_attention(grouped, chunk_k, chunk_v, valid, index, picked, kernel=kernel)


def test_cpp_operator_checks_shapes():
    skip_unavailable("cpp")
    grouped, chunk_k, chunk_v, valid, index, picked, gist_k, gist_v = recall_inputs(1, 2, 4, 16, 6, 4, 3)
    with pytest.raises(RuntimeError, match="chunk_k and chunk_v must be"):
        torch.ops.gsa_cpu.recall_attention(grouped, chunk_k, chunk_v[:, :, :1].contiguous(), valid, index, picked,
                                           gist_k, gist_v)
    with pytest.raises(RuntimeError, match="gist_k and gist_v must be"):
        torch.ops.gsa_cpu.recall_attention(grouped, chunk_k, chunk_v, valid, index, picked, gist_k[:, :1].contiguous(),
                                           gist_v)


@pytest.mark.parametrize("name,change", [
    ("float64 queries", lambda inputs: (inputs[0].double(), *inputs[1:])),
    ("chunk_v shape", lambda inputs: (*inputs[:2], inputs[2][:, :, :-1], *inputs[3:])),
    ("int32 index", lambda inputs: (*inputs[:4], inputs[4].int(), *inputs[5:])),
    ("gist_k alone", lambda inputs: (*inputs[:6], inputs[6], None)),
])
def test_cpp_rejects_bad_inputs(name, change):
    inputs = change(recall_inputs(1, 2, 4, 16, 6, 4, 3))
    with pytest.raises(InvalidInputError):
        cpu_kernel.cpp_recalled_attention(*inputs)


def test_partial_merge_equals_union():
    generator = torch.Generator().manual_seed(2)
    grouped = torch.randn(2, 3, 4, 8, generator=generator)
    keys = [torch.randn(2, 3, length, 8, generator=generator) for length in (5, 7)]
    values = [torch.randn(2, 3, length, 8, generator=generator) for length in (5, 7)]
    visible = [torch.rand(2, 3, length, generator=generator) > 0.5 for length in (5, 7)]
    visible[0][1, 1], visible[1][1, 1] = False, False  # a row empty in both parts
    visible[0][0, 2] = False  # a row empty in one part only
    parts = list(zip(keys, values, visible))

    whole = partial_attention(grouped, parts)
    merged = partial_attention(grouped, parts[:1]).merge(partial_attention(grouped, parts[1:]))
    assert relative_error(merged.output(), whole.output()) < TOLERANCE
    assert torch.allclose(merged.lse(), whole.lse(), atol=1e-5, equal_nan=False)
    assert not torch.isnan(merged.output()).any()


def test_resolve_kernel_names():
    queries, chunks = torch.empty(0), torch.empty(0)
    assert resolve_kernel("torch", queries, chunks) == "torch"
    assert resolve_kernel("auto", queries, chunks.double()) == "torch"  # float64 chunks: no C++ kernel
    with pytest.raises(InvalidInputError, match="invalid recall kernel 'fast'"):
        resolve_kernel("fast", queries, chunks)


def test_resolve_kernel_environment(monkeypatch):
    queries, chunks = torch.empty(0), torch.empty(0)
    monkeypatch.setenv("GSA_RECALL_KERNEL", "torch")
    assert resolve_kernel("auto", queries, chunks) == "torch"
    assert resolve_kernel("cpp", queries, chunks) == "cpp"  # an explicit choice wins over the variable
    monkeypatch.setenv("GSA_RECALL_KERNEL", "gpu")
    with pytest.raises(InvalidInputError, match="GSA_RECALL_KERNEL='gpu'"):
        resolve_kernel("auto", queries, chunks)


def test_environment_kernel_unavailable(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "cpp_unavailable_reason", lambda: "no compiler")
    monkeypatch.setenv("GSA_RECALL_KERNEL", "cpp")
    with pytest.raises(InvalidInputError, match="GSA_RECALL_KERNEL=cpp cannot run here: no compiler"):
        resolve_kernel("auto", torch.empty(0), torch.empty(0))


def test_config_rejects_invalid_environment(monkeypatch):
    monkeypatch.setenv("GSA_RECALL_KERNEL", "gpu")
    with pytest.raises(InvalidInputError, match="GSA_RECALL_KERNEL='gpu'"):
        GSAConfig()


def test_config_rejects_triton_without_cuda(monkeypatch):
    monkeypatch.setattr("gsa.ops.triton_recall.triton_unavailable_reason", lambda: "no CUDA device")
    with pytest.raises(InvalidInputError, match="recall kernel triton cannot run here: no CUDA device"):
        GSAConfig(recall_kernel="triton")
    monkeypatch.setenv("GSA_RECALL_KERNEL", "triton")
    with pytest.raises(InvalidInputError, match="GSA_RECALL_KERNEL=triton cannot run here: no CUDA device"):
        GSAConfig()


def test_auto_falls_back_without_build(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "cpp_unavailable_reason", lambda: "no compiler")
    assert resolve_kernel("auto", torch.empty(0), torch.empty(0)) == "torch"
    inputs = recall_inputs(1, 1, 2, 8, 3, 2, 2)
    with pytest.raises(InvalidInputError, match="no compiler"):
        cpu_kernel.cpp_recalled_attention(*inputs)


def test_config_rejects_unknown_kernel():
    with pytest.raises(InvalidInputError, match="unknown recall kernel 'cuda'"):
        GSAConfig(recall_kernel="cuda")
