"""Triton recall kernel against its loop twin and the torch path, run on the CPU by Triton's interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from conftest import relative_error
from gsa.errors import InvalidInputError
from gsa.ops.naive import naive_recalled_attention
from gsa.ops.recall import Partial, torch_recalled_attention

TOLERANCE = 1e-5
SOURCE_ROOT = Path(__file__).resolve().parents[1] / "src"

# Triton chooses between compiling and interpreting when @triton.jit decorates a kernel, which
# gsa.ops.triton_recall does on import. So the kernel runs in a child process that imports it with
# TRITON_INTERPRET=1, and this process, whose import may already have compiled-mode kernels, only
# builds the inputs and checks the saved outputs.
RUN_KERNEL = """
import sys
import torch
from gsa.errors import InvalidInputError
from gsa.ops.recall import recalled_attention
from gsa.ops.triton_recall import triton_recalled_attention

results = {}
for name, case in torch.load(sys.argv[1]).items():
    try:
        if case["dispatch"]:
            partial = recalled_attention(*case["args"], kernel="triton")
        else:
            partial = triton_recalled_attention(*case["args"], splits=case["splits"])
    except InvalidInputError as error:
        results[name] = str(error)
    else:
        results[name] = (partial.numer, partial.top, partial.total)
torch.save(results, sys.argv[2])
"""


@dataclass(frozen=True)
class Case:
    """Sizes and options of one kernel check."""

    batch: int = 2
    kv_heads: int = 2
    group: int = 3
    dim: int = 24
    num_chunks: int = 6
    chunk_len: int = 5
    slots: int = 3
    gists: bool = True
    dtype: torch.dtype = torch.float32
    splits: int | None = None
    unpicked_rows: bool = False  # row (1, 0) picks nothing, row (0, 1) picks only an all-padding chunk
    strided: bool = False  # non-contiguous views of every input
    dispatch: bool = False  # call through recalled_attention(kernel="triton")


CASES = {
    "g1_d64_cm16_one_slot": Case(group=1, dim=64, chunk_len=16, slots=1, gists=False),
    "g3_d24_cm5_several_slots": Case(group=3, slots=4),
    "g4_d24_cm1_gists": Case(group=4, chunk_len=1, slots=3),
    "g4_d64_cm1_no_gists": Case(group=4, dim=64, chunk_len=1, slots=2, gists=False),
    "g3_d64_cm16_gists": Case(group=3, dim=64, chunk_len=16, slots=5),
    "zero_slots": Case(slots=0),
    "zero_slots_no_gists": Case(group=1, slots=0, gists=False),
    "unpicked_rows_no_gists": Case(group=4, dim=64, slots=3, gists=False, unpicked_rows=True),
    "unpicked_rows_gists": Case(group=3, slots=3, unpicked_rows=True),
    "splits_uneven": Case(group=3, slots=7, splits=3),
    "splits_more_than_slots": Case(group=1, slots=2, splits=4),
    "splits_unpicked_rows": Case(group=4, slots=5, splits=2, unpicked_rows=True),
    "chunk_over_two_tiles": Case(batch=1, kv_heads=1, group=4, dim=64, num_chunks=3, chunk_len=40, slots=2),
    "bfloat16_tier": Case(group=4, slots=3, dtype=torch.bfloat16),
    "float16_tier": Case(group=3, chunk_len=16, slots=3, dtype=torch.float16),
    "strided_views": Case(group=3, slots=4, strided=True),
    "recalled_attention_dispatch": Case(group=4, slots=3, dispatch=True),
}


def make_inputs(case: Case, seed: int) -> tuple:
    """Return random contract inputs for ``case``, whose two batch rows differ in valid slots and recalled chunks."""
    generator = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.kv_heads, case.num_chunks, case.chunk_len, case.dim)

    def normal(*size):
        return torch.randn(*size, generator=generator)

    grouped = normal(case.batch, case.kv_heads, case.group, case.dim) * case.dim ** -0.5
    chunk_k, chunk_v = normal(*shape).to(case.dtype), normal(*shape).to(case.dtype)
    chunk_valid = torch.rand(case.batch, case.num_chunks, case.chunk_len, generator=generator) < 0.7
    chunk_valid[:, :, 0] = True
    chunk_valid[:, 0] = False  # chunk 0 has no valid token, like a fully padded chunk
    index = torch.randint(1, case.num_chunks, (case.batch, case.kv_heads, case.slots), generator=generator)
    picked = torch.rand(case.batch, case.kv_heads, case.slots, generator=generator) < 0.8
    # Unpicked entries of row 0 point outside the tier, and those of row 1 at real chunks. The kernel
    # must skip both.
    index[0] = torch.where(picked[0], index[0], torch.full_like(index[0], -1))
    if case.unpicked_rows and case.batch > 1:
        picked[1, 0] = False
        index[1, 0] = case.num_chunks + 5
    if case.unpicked_rows and case.slots > 0:
        picked[0, 1] = True
        index[0, 1] = 0
    gist_k = normal(case.batch, case.kv_heads, case.num_chunks, case.dim).to(case.dtype) if case.gists else None
    gist_v = normal(case.batch, case.kv_heads, case.num_chunks, case.dim).to(case.dtype) if case.gists else None
    inputs = (grouped, chunk_k, chunk_v, chunk_valid, index, picked, gist_k, gist_v)
    return tuple(_strided_copy(tensor) for tensor in inputs) if case.strided else inputs


def _strided_copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """Return an equal non-contiguous view, with dims 1 and 2 swapped in memory and a last-dim stride of 2."""
    if tensor is None:
        return None
    padded = torch.zeros(*tensor.shape[:-1], tensor.shape[-1] * 2, dtype=tensor.dtype)
    padded[..., ::2] = tensor
    swapped = padded.transpose(1, 2).contiguous().transpose(1, 2)
    view = swapped[..., ::2]
    assert not view.is_contiguous()
    return view


def lse_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Return the relative error of log-sum-exps over the rows where ``expected`` is finite."""
    finite = torch.isfinite(expected)
    if not finite.any():
        return 0.0
    return relative_error(actual[finite], expected[finite])


@dataclass
class KernelRun:
    """Inputs of every request and what the interpreted kernel returned for it, kept out of failure reports."""

    inputs: dict = field(repr=False)
    results: dict = field(repr=False)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> KernelRun:
    """Run every request through the kernel in a child process in interpreter mode."""
    pytest.importorskip("triton", reason="the Triton kernel tests need triton: python -m pip install triton")
    folder = tmp_path_factory.mktemp("triton_recall")
    inputs = {name: make_inputs(case, seed) for seed, (name, case) in enumerate(CASES.items())}
    requests = {
        name: {"args": inputs[name], "splits": case.splits, "dispatch": case.dispatch} for name, case in CASES.items()
    }
    requests.update(invalid_requests())
    torch.save(requests, folder / "inputs.pt")

    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-c", RUN_KERNEL, str(folder / "inputs.pt"), str(folder / "outputs.pt")]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, f"interpreted kernel run failed:\n{finished.stderr[-4000:]}"
    return KernelRun(inputs, torch.load(folder / "outputs.pt"))


def invalid_requests() -> dict:
    """Return inputs that break the contract, keyed by the value that the error message must name."""
    grouped, chunk_k, chunk_v, chunk_valid, index, picked, gist_k, gist_v = make_inputs(Case(), seed=99)
    base = [grouped, chunk_k, chunk_v, chunk_valid, index, picked, gist_k, gist_v]

    def replaced(position: int, value) -> list:
        args = list(base)
        args[position] = value
        return args

    outside = index.clone()
    outside[0, 1, 0] = 6
    picked_outside = picked.clone()
    picked_outside[0, 1, 0] = True
    cases = {
        "grouped": replaced(0, grouped.half()),
        "chunk_k": replaced(1, chunk_k[..., :8]),
        "chunk_v": replaced(2, chunk_v.double()),
        "chunk_valid": replaced(3, chunk_valid.int()),
        "index": replaced(4, index.int()),
        "picked": replaced(5, picked[:, :, :2]),
        "gist_v": replaced(7, gist_v[:, :, :2]),
        "gist_k and gist_v": replaced(7, None),
    }
    outside_args = replaced(4, outside)
    outside_args[5] = picked_outside
    cases["outside the tier's 6 chunks"] = outside_args
    requests = {
        f"invalid: {name}": {"args": tuple(args), "splits": None, "dispatch": False} for name, args in cases.items()
    }
    requests["invalid: splits"] = {"args": tuple(base), "splits": 0, "dispatch": False}
    return requests


def as_partial(result) -> Partial:
    assert not isinstance(result, str), f"kernel raised: {result}"
    return Partial(*result)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_loop_twin(interpreted, name):
    partial = as_partial(interpreted.results[name])
    expected_out, expected_lse = naive_recalled_attention(*interpreted.inputs[name])

    assert relative_error(partial.output(), expected_out) < TOLERANCE
    assert lse_error(partial.lse(), expected_lse) < TOLERANCE
    assert torch.equal(torch.isfinite(partial.lse()), torch.isfinite(expected_lse))


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_torch_path(interpreted, name):
    partial = as_partial(interpreted.results[name])
    grouped, chunk_k, chunk_v, chunk_valid, index, picked, gist_k, gist_v = interpreted.inputs[name]
    # The torch path gathers every entry, picked or not, so unpicked entries get an in-range id.
    in_range = index.clamp(0, chunk_k.shape[2] - 1)
    expected = torch_recalled_attention(grouped, chunk_k, chunk_v, chunk_valid, in_range, picked, gist_k, gist_v)

    assert relative_error(partial.output(), expected.output()) < TOLERANCE
    assert lse_error(partial.lse(), expected.lse()) < TOLERANCE


@pytest.mark.parametrize("name", ["zero_slots", "unpicked_rows_no_gists", "splits_unpicked_rows"])
def test_kernel_empty_rows_exact(interpreted, name):
    partial = as_partial(interpreted.results[name])
    _, expected_lse = naive_recalled_attention(*interpreted.inputs[name])
    empty = torch.isneginf(expected_lse)  # (B, Hk, G)

    assert empty.any()
    assert torch.all(partial.numer[empty] == 0)
    assert torch.all(partial.total[empty] == 0)
    assert torch.all(torch.isneginf(partial.top[empty]))
    assert not partial.output().isnan().any()


@pytest.mark.parametrize("name", list(invalid_requests()))
def test_kernel_rejects_invalid_input(interpreted, name):
    message = interpreted.results[name]

    assert isinstance(message, str), f"{name} was accepted"
    assert name.removeprefix("invalid: ") in message


def test_unavailable_without_cuda_or_interpreter():
    pytest.importorskip("triton", reason="the Triton kernel tests need triton: python -m pip install triton")
    from gsa.ops import triton_recall

    if torch.cuda.is_available() or triton_recall.triton_available():
        pytest.skip("this process can run the kernel: a CUDA device is present or TRITON_INTERPRET is set")
    reason = triton_recall.triton_unavailable_reason()

    assert "CUDA" in reason
    assert "TRITON_INTERPRET=1" in reason
    with pytest.raises(InvalidInputError, match="CUDA"):
        triton_recall.triton_recalled_attention(*make_inputs(Case(), seed=0))


def test_import_without_triton():
    # A None entry in sys.modules makes `import triton` raise ImportError, as if it were not installed.
    script = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "from gsa.ops import triton_recall\n"
        "assert not triton_recall.triton_available()\n"
        "print(triton_recall.triton_unavailable_reason())\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH")]))
    finished = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)

    assert finished.returncode == 0, finished.stderr[-4000:]
    assert "pip install triton" in finished.stdout
