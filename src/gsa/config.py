"""Typed settings of the sparse attention: which method, how many chunks to recall, which kernel."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from gsa.chunk_store import RAW_TIERS
from gsa.errors import InvalidInputError
from gsa.layout import GistSpec
from gsa.methods import get_method
from gsa.ops.recall import KERNELS, environment_kernel, kernel_unavailable_reason

MERGES = ("union", "group-sum")
PREFILLS = ("gist", "dense")
IMPLS = ("fast", "naive")


@dataclass(frozen=True)
class GSAConfig:
    """Settings of gist sparse attention, shared by the cache and the attention function.

    Attributes:
        spec: gist layout (chunk sizes of every level, sinks, local window). Two levels of 4:
            ``GistSpec.from_sizes((4, 4))`` or ``GistSpec(chunk_size=4, fanouts=(4,))``.
        method: name of a registered method (``gsa.methods.METHODS``). ``gsa`` recalls the top-k
            chunks per query head by gist score; ``gist-only`` attends every gist and no old raw
            chunk (compression without recall); ``full`` inserts no gists and attends everything;
            ``streaming``, ``quest``, ``mean-key``, ``random``, ``recent`` and ``oracle`` are
            training-free baselines that route on raw keys and never attend gists.
        top_k: chunks recalled per query head. ``None`` uses the budget rule
            k = floor(n / (r * G * C)) + 1, capped at max(1, floor(gists / 4)), where n is the
            number of keys, r the compression ratio and G the query heads per KV head. With several
            levels, C is the level-1 chunk size, r the product of all chunk sizes, the cap uses the
            gists of the level being chosen, and ``top_k`` applies at every level.
        top_p: if set, recall the smallest set of chunks whose softmax gist-score mass reaches
            this share instead of a count.
        merge: how query heads sharing a KV head combine their choices: ``union`` of the
            per-head top-k, or ``group-sum``, one top-k over scores summed across the group.
        prefill: ``gist`` runs the context under the gist mask; ``dense`` runs it with full causal
            attention, so untrained gists only route (a training-free mode). ``gist-only`` always
            uses the gist mask, and the training-free baselines always use the dense one.
        impl: ``fast`` (vectorised) or ``naive`` (loop-by-loop reference twin).
        seed: seed of the ``random`` method's draws.
        select_first_layer: also select in layer 0, whose gists carry little information; off by
            default, so layer 0 attends under the gist mask.
        raw_tier: where a ``GistCache`` keeps the raw chunk KV: ``device`` (the model's device),
            ``host`` (host memory, pinned when CUDA is available) or ``disk`` (a memory-mapped
            file). Gists, sinks and recent tokens always stay on the device.
        lru_chunks: (batch row, chunk) entries per layer, all KV heads each, that a host or disk
            tier keeps on the device after recalling them; 0 disables the LRU. Ignored by the
            device tier.
        offload_dir: folder for the disk tier's files; ``None`` uses a temporary folder. Each
            file is removed when its cache is closed or garbage-collected.
        recall_kernel: kernel of a decode step's attention over the recalled chunks (``gsa.ops.recall``):
            ``auto`` (the ``GSA_RECALL_KERNEL`` variable if set, else the C++ kernel for float32 on
            the CPU and PyTorch otherwise), ``torch``, ``cpp`` or ``triton`` (CUDA, opt-in).
    """

    spec: GistSpec = field(default_factory=GistSpec)
    method: str = "gsa"
    top_k: int | None = None
    top_p: float | None = None
    merge: str = "union"
    prefill: str = "gist"
    impl: str = "fast"
    seed: int = 0
    select_first_layer: bool = False
    raw_tier: str = "device"
    lru_chunks: int = 0
    offload_dir: str | None = None
    recall_kernel: str = "auto"

    def __post_init__(self) -> None:
        get_method(self.method)  # raises for an unknown name
        _check_choice("merge", self.merge, MERGES)
        _check_choice("prefill", self.prefill, PREFILLS)
        _check_choice("impl", self.impl, IMPLS)
        _check_choice("raw tier", self.raw_tier, RAW_TIERS)
        _check_choice("recall kernel", self.recall_kernel, KERNELS)
        # Report an invalid GSA_RECALL_KERNEL, or a Triton kernel without CUDA, before any model loads.
        kernel = environment_kernel() if self.recall_kernel == "auto" else self.recall_kernel
        if kernel == "triton" and (reason := kernel_unavailable_reason(kernel)) is not None:
            source = "GSA_RECALL_KERNEL=triton" if self.recall_kernel == "auto" else "recall kernel triton"
            raise InvalidInputError(f"{source} cannot run here: {reason}")
        if self.lru_chunks < 0:
            raise InvalidInputError(f"lru-chunks must be 0 or more, got {self.lru_chunks}; use 0 to disable the LRU")
        if self.offload_dir is not None and not os.path.isdir(self.offload_dir):
            raise InvalidInputError(f"offload directory {self.offload_dir!r} not found; create it or omit offload_dir")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidInputError(f"top-k must be at least 1, got {self.top_k}; omit it to use the budget rule")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise InvalidInputError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def inserts_gists(self) -> bool:
        return get_method(self.method).inserts_gists

    @property
    def attends_gists(self) -> bool:
        """Whether queries attend gist keys: only methods built on trained gists, under the gist mask."""
        method = get_method(self.method)
        return method.reads_gist_content and (self.prefill == "gist" or method.needs_gist_prefill)

    @property
    def prefill_mask(self) -> str:
        """Mask of the context prefill: ``causal`` without gists, ``gist``, or ``dense`` (gists only route)."""
        if not self.inserts_gists:
            return "causal"
        return "gist" if self.attends_gists else "dense"

    @property
    def ratio(self) -> int:
        """Compression ratio r of the layout: the product of the chunk sizes of all levels."""
        return self.spec.ratio


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidInputError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
