"""Attention of one decode query per row over its recalled raw chunks, with interchangeable kernels.

A decode step attends a few hundred recalled chunks out of thousands. Every kernel here computes
the same partial softmax over those chunks (and, optionally, each recalled chunk's gist), which
``attend_gathered`` merges with the sinks, recent tokens and upper gists:

- ``torch``: gathers the recalled chunks into a copy, then runs two matrix products over it.
- ``cpp``: a C++ kernel (``gsa/csrc/recall_attention.cpp``) that reads the chunks in place from
  the tier, with an online softmax, compiled on first use (``gsa.ops.cpu_kernel``). CPU only.
- ``triton``: a Triton kernel of the same contract for CUDA tensors (``gsa.ops.triton_recall``).

``auto`` takes ``cpp`` for float32 CPU tensors when the kernel builds, and ``torch`` otherwise.
``triton`` runs only when requested. ``naive_recalled_attention`` in ``gsa.ops.naive`` is the loop twin that all of them are tested
against.

Shape legend: B batch, Hk KV heads, G query heads per KV head, D head dim, N chunks, Cm max chunk
length, K recalled chunks per KV head.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from gsa.errors import InvalidInputError
from gsa.tiers import gather_chunk_rows, gather_gist_rows

KERNELS = ("auto", "torch", "cpp", "triton")
KERNEL_ENV = "GSA_RECALL_KERNEL"


@dataclass
class Partial:
    """A softmax over part of the keys, kept unnormalised so that parts can be merged.

    ``numer`` is sum_j exp(s_j - top) v_j, ``total`` is sum_j exp(s_j - top) and ``top`` the max
    logit s_j. A row with no visible key has numer 0, total 0 and top -inf.
    """

    numer: torch.Tensor  # (B, Hk, G, D), float32
    top: torch.Tensor  # (B, Hk, G)
    total: torch.Tensor  # (B, Hk, G)

    def merge(self, other: Partial) -> Partial:
        """Combine two partials over disjoint keys into one over their union."""
        top = torch.maximum(self.top, other.top)
        # exp(-inf - -inf) is NaN for a row empty in both parts, and such a part contributes nothing.
        mine = torch.exp(self.top - top).nan_to_num_(0.0)
        theirs = torch.exp(other.top - top).nan_to_num_(0.0)
        numer = self.numer * mine[..., None] + other.numer * theirs[..., None]
        return Partial(numer, top, self.total * mine + other.total * theirs)

    def output(self) -> torch.Tensor:
        """Return the attention output (B, Hk, G, D), with zeros in rows that see no key."""
        return self.numer / self.total.clamp(min=torch.finfo(self.total.dtype).tiny)[..., None]

    def lse(self) -> torch.Tensor:
        """Return the log-sum-exp of the logits per row, (B, Hk, G), which is -inf where no key is visible."""
        return self.top + torch.log(self.total)


def partial_attention(grouped: torch.Tensor, parts: list[tuple]) -> Partial:
    """Attend scaled queries (B, Hk, G, D) to key groups without concatenating their keys and values.

    ``parts`` lists (keys, values, visible) triples of (B, Hk, L_i, D), (B, Hk, L_i, D) and
    (B, Hk, L_i). One softmax runs over the concatenated logits, and the exponentials are summed
    with the values before any division. Logits are computed as keys @ queries^T, (B, Hk, L_i, G),
    because on the CPU that matrix product streams the keys about twice as fast as
    queries @ keys^T (measured with torch 2.13 on an AMD EPYC CPU).
    """
    parts = [part for part in parts if part[0].shape[2] > 0]
    if not parts:
        empty = grouped.new_zeros(grouped.shape[:-1])
        return Partial(torch.zeros_like(grouped), empty.fill_(float("-inf")), torch.zeros_like(empty))
    logits = []
    for keys, _, visible in parts:
        part = torch.matmul(keys.float(), grouped.transpose(-1, -2))  # (B, Hk, L_i, G)
        logits.append(part.masked_fill_(~visible[..., None], float("-inf")).transpose(-1, -2))
    logits = torch.cat(logits, dim=-1)  # (B, Hk, G, L), contiguous so the reductions run along rows
    top = logits.amax(dim=-1)  # (B, Hk, G)
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # an empty row stays -inf
    weights = torch.exp_(logits.sub_(shift[..., None]))  # exp(-inf) = 0 for hidden keys
    total = weights.sum(dim=-1)  # (B, Hk, G)
    sizes = [keys.shape[2] for keys, _, _ in parts]
    numer = None
    for (_, values, _), part in zip(parts, weights.split(sizes, dim=-1)):
        term = torch.matmul(part, values.float())  # (B, Hk, G, D)
        numer = term if numer is None else numer.add_(term)
    return Partial(numer, top, total)


def recalled_attention(
    grouped: torch.Tensor, chunk_k: torch.Tensor, chunk_v: torch.Tensor, chunk_valid: torch.Tensor,
    index: torch.Tensor, picked: torch.Tensor, gist_k: torch.Tensor | None = None,
    gist_v: torch.Tensor | None = None, kernel: str = "auto",
) -> Partial:
    """Attend scaled queries to the recalled raw chunks of each KV head, and to their gists.

    Args:
        grouped: (B, Hk, G, D) float32 queries, already multiplied by the attention scaling.
        chunk_k, chunk_v: (B, Hk, N, Cm, D) raw chunk tier.
        chunk_valid: (B, N, Cm) valid token slots of each chunk.
        index: (B, Hk, K) int64 recalled chunks. Entries where ``picked`` is false are ignored.
        picked: (B, Hk, K) bool.
        gist_k, gist_v: (B, Hk, N, D) level-1 gists. When given, each recalled chunk's gist is
            attended too.
        kernel: one of ``KERNELS``. ``auto`` also reads the ``GSA_RECALL_KERNEL`` variable.

    Returns:
        The ``Partial`` softmax over those keys.
    """
    name = resolve_kernel(kernel, grouped, chunk_k)
    if name == "cpp":
        from gsa.ops.cpu_kernel import cpp_recalled_attention
        return cpp_recalled_attention(grouped, chunk_k, chunk_v, chunk_valid, index, picked, gist_k, gist_v)
    if name == "triton":
        from gsa.ops.triton_recall import triton_recalled_attention
        return triton_recalled_attention(grouped, chunk_k, chunk_v, chunk_valid, index, picked, gist_k, gist_v)
    return torch_recalled_attention(grouped, chunk_k, chunk_v, chunk_valid, index, picked, gist_k, gist_v)


def torch_recalled_attention(grouped, chunk_k, chunk_v, chunk_valid, index, picked, gist_k=None,
                             gist_v=None) -> Partial:
    """``recalled_attention`` with PyTorch operators: gather the recalled chunks, then attend the copy."""
    check_picked_range(index, picked, chunk_k.shape[2])
    index = torch.where(picked, index, torch.zeros_like(index))  # entries not picked may hold any value
    raw_k, raw_v = gather_chunk_rows(chunk_k, index), gather_chunk_rows(chunk_v, index)  # (B, Hk, K, Cm, D)
    gists = (gather_gist_rows(gist_k, index), gather_gist_rows(gist_v, index)) if gist_k is not None else None
    return gathered_attention(grouped, raw_k, raw_v, chunk_valid, index, picked, gists)


def gathered_attention(grouped: torch.Tensor, raw_k: torch.Tensor, raw_v: torch.Tensor, chunk_valid: torch.Tensor,
                       index: torch.Tensor, picked: torch.Tensor,
                       gists: tuple[torch.Tensor, torch.Tensor] | None = None) -> Partial:
    """Attend scaled queries (B, Hk, G, D) to chunks already gathered as (B, Hk, K, Cm, D).

    ``index`` and ``picked`` (B, Hk, K) name the gathered chunks, ``chunk_valid`` (B, N, Cm) their
    valid token slots, and ``gists`` their (B, Hk, K, D) gist keys and values, if attended.
    """
    rows = torch.arange(grouped.shape[0], device=index.device)[:, None, None]
    raw_on = (chunk_valid[rows, index] & picked[..., None]).flatten(2, 3)  # (B, Hk, K*Cm)
    parts = [(raw_k.flatten(2, 3), raw_v.flatten(2, 3), raw_on)]  # (B, Hk, K*Cm, D)
    if gists is not None:
        parts.append((gists[0], gists[1], picked))
    return partial_attention(grouped, parts)


def check_picked_range(index: torch.Tensor, picked: torch.Tensor, num_chunks: int) -> None:
    """Raise ``InvalidInputError`` when a picked entry of ``index`` (B, Hk, K) is outside [0, N)."""
    outside = picked & ((index < 0) | (index >= num_chunks))
    if bool(outside.any()):
        value = int(index[outside][0])
        raise InvalidInputError(f"recalled chunk index {value} is outside the tier's {num_chunks} chunks; "
                                "pick indices in [0, N) or mark the entry as not picked")


def kernel_unavailable_reason(kernel: str) -> str | None:
    """Return why ``kernel`` cannot run in this process (the C++ kernel is built to find out), or None."""
    if kernel == "cpp":
        from gsa.ops.cpu_kernel import cpp_unavailable_reason
        return cpp_unavailable_reason()
    if kernel == "triton":
        from gsa.ops.triton_recall import triton_unavailable_reason
        return triton_unavailable_reason()
    return None


def environment_kernel() -> str:
    """Return the kernel that ``GSA_RECALL_KERNEL`` sets (``auto`` when unset), raising for an invalid value."""
    kernel = os.environ.get(KERNEL_ENV, "auto") or "auto"
    if kernel not in KERNELS:
        raise InvalidInputError(f"invalid {KERNEL_ENV}={kernel!r}; set it to one of {', '.join(KERNELS)}")
    return kernel


def resolve_kernel(kernel: str, grouped: torch.Tensor, chunk_k: torch.Tensor) -> str:
    """Return the kernel that serves these tensors: the requested one, or for ``auto`` the best available."""
    if kernel not in KERNELS:
        raise InvalidInputError(f"invalid recall kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if kernel == "auto":
        kernel = environment_kernel()
        reason = kernel_unavailable_reason(kernel)
        if reason is not None:
            raise InvalidInputError(f"{KERNEL_ENV}={kernel} cannot run here: {reason}")
    if kernel != "auto":
        return kernel
    # NOTE: CUDA tensors take the PyTorch path unless triton is requested, because the Triton
    # kernel has run only in Triton's CPU interpreter, never compiled on a GPU.
    if chunk_k.device.type == "cpu":
        from gsa.ops.cpu_kernel import cpp_available, cpp_supports
        if cpp_supports(grouped, chunk_k) and cpp_available():
            return "cpp"
    return "torch"
