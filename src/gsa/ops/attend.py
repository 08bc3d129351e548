"""Vectorised attention over KV tiers with a per-KV-head choice of recalled chunks.

Two paths compute the same result:

- ``attend_masked`` concatenates all tiers and masks what is not visible. It serves any number of
  queries (the suffix during prefill) and is the dense twin of the gathered path.
- ``attend_gathered`` serves one query per row (a decode step): it reads only the recalled
  chunks and their gists, so its cost grows with the budget rather than with the context.

Shape legend: B batch, T queries, H query heads, Hk KV heads, G = H / Hk, D head dim, N chunks,
Cm max chunk length, K recalled chunks, R recent tokens, S0 sinks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gsa.ops.recall import Partial, gathered_attention, partial_attention, recalled_attention, resolve_kernel
from gsa.tiers import Tiers


@dataclass
class Visibility:
    """Per-KV-head visibility of chunks, gists and recent tokens for each query."""

    chunk_on: torch.Tensor  # (B, Hk, T, N): raw tokens of these chunks are attended
    gist_on: torch.Tensor  # (B, Hk, T, N): these gists are attended
    recent_on: torch.Tensor  # (B, T, R): recent tokens at or before the query
    gist_mode: str = "chunks"  # "chunks": gist_on equals chunk_on; "all": every valid gist; "none"
    upper_on: list[torch.Tensor] = field(default_factory=list)  # levels 2..L: (B, Hk, T, N_l) attended gists
    # Optional index lists of the same choice, which let a decode step skip scanning the masks:
    # recalled chunks (B, Hk, T, K) with a validity flag, and the attended gists of each level above 1.
    chunk_index: tuple[torch.Tensor, torch.Tensor] | None = None
    upper_index: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    scored: torch.Tensor | None = None  # (B, Hk, T) gists scored to make the choice, when gists routed it


def recent_visibility(tiers: Tiers, query_slot: torch.Tensor) -> torch.Tensor:
    """Recent tokens visible to each query: valid and at or before its slot. Returns (B, T, R)."""
    slots = torch.arange(tiers.recent_valid.shape[1], device=query_slot.device)
    return tiers.recent_valid[:, None, :] & (slots[None, None, :] <= query_slot[:, :, None])


def attended_counts(tiers: Tiers, vis: Visibility) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count keys per (B, Hk, T): all attended, raw attended, and what full attention would read."""
    sinks = tiers.sink_valid.sum(-1)[:, None, None]  # (B, 1, 1)
    chunk_len = chunk_lengths(tiers)  # (B, N)
    if vis.chunk_index is not None:
        index, picked = vis.chunk_index  # (B, Hk, T, K)
        rows = torch.arange(index.shape[0], device=index.device)[:, None, None, None]
        raw_chunks = (chunk_len[rows, index] * picked).sum(-1)  # (B, Hk, T)
    else:
        raw_chunks = (vis.chunk_on * chunk_len[:, None, None, :]).sum(-1)  # (B, Hk, T)
    recent = vis.recent_on.sum(-1)[:, None, :]  # (B, 1, T)
    raw = sinks + raw_chunks + recent
    attended = raw + vis.gist_on.sum(-1)
    if vis.upper_index:
        attended = attended + sum(picked.sum(-1) for _, picked in vis.upper_index)
    else:
        attended = attended + sum(on.sum(-1) for on in vis.upper_on)
    full = sinks + tiers.summaries["raw_total"][:, None, None] + recent
    return attended, raw, full.expand_as(attended)


def chunk_lengths(tiers: Tiers) -> torch.Tensor:
    """Valid tokens per raw chunk, (B, N), computed once per chunk tier with its (B,) total."""
    if "chunk_len" not in tiers.summaries:
        chunk_len = tiers.chunk_valid.sum(-1).to(torch.long)
        tiers.summaries["chunk_len"] = chunk_len
        tiers.summaries["raw_total"] = chunk_len.sum(-1)
    return tiers.summaries["chunk_len"]


def attend_masked(query: torch.Tensor, tiers: Tiers, vis: Visibility, scaling: float) -> torch.Tensor:
    """Attend (B, H, T, D) queries to the visible part of every tier; returns (B, H, T, D)."""
    batch, heads, length, dim = query.shape
    kv_heads = tiers.num_kv_heads
    group = heads // kv_heads
    num_chunks, chunk_len = tiers.chunk_valid.shape[1:]

    chunk_k, chunk_v = tiers.raw_chunks()  # (B, Hk, N, Cm, D)
    upper_k, upper_v = [tier.keys for tier in tiers.upper], [tier.values for tier in tiers.upper]
    keys = torch.cat([tiers.sink_k, chunk_k.flatten(2, 3), tiers.gist_k, tiers.recent_k, *upper_k], dim=2)
    values = torch.cat([tiers.sink_v, chunk_v.flatten(2, 3), tiers.gist_v, tiers.recent_v, *upper_v], dim=2)

    # Visibility of each key column, in the same tier order. (B, Hk, T, S0 + N*Cm + N + R)
    sink_on = tiers.sink_valid[:, None, None, :].expand(batch, kv_heads, length, -1)
    raw_on = vis.chunk_on[..., None] & tiers.chunk_valid[:, None, None]  # (B, Hk, T, N, Cm)
    recent_on = vis.recent_on[:, None].expand(batch, kv_heads, length, -1)
    upper_on = vis.upper_on or [torch.zeros_like(vis.gist_on[..., :1]).expand(-1, -1, -1, tier.valid.shape[1])
                                for tier in tiers.upper]
    mask = torch.cat([sink_on, raw_on.reshape(batch, kv_heads, length, num_chunks * chunk_len),
                      vis.gist_on, recent_on, *upper_on], dim=-1)

    # Queries of one group share the mask. (B, Hk, G*T, D)
    grouped = query.reshape(batch, kv_heads, group * length, dim)
    mask = mask[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, kv_heads, group * length, -1)
    mask = keep_rows_finite(mask)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, length, dim)


def attend_gathered(query: torch.Tensor, tiers: Tiers, vis: Visibility, scaling: float,
                    kernel: str = "auto") -> torch.Tensor:
    """Attend one query per row (T = 1) to sinks, recalled chunks, their gists and recent tokens.

    The recalled chunks go through ``recalled_attention`` with ``kernel`` (see ``gsa.ops.recall``);
    the other tiers are small and go through PyTorch products. With ``gist_mode="all"`` (the
    ``gist-only`` method and layer 0) every gist is read, because every gist is attended there.
    """
    batch, heads, length, dim = query.shape
    if length != 1:
        raise ValueError(f"the gathered path takes one query per row, got {length}")
    kv_heads = tiers.num_kv_heads
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim).float() * scaling  # (B, Hk, G, D)
    index, picked = recalled_chunks(vis)  # (B, Hk, K)
    recalled = _recalled_partial(grouped, tiers, index, picked, with_gists=vis.gist_mode == "chunks", kernel=kernel)

    # Every other tier: sinks, all gists in "all" mode, recent tokens and upper gists.
    b = torch.arange(batch, device=query.device)[:, None, None]
    h = torch.arange(kv_heads, device=query.device)[None, :, None]
    parts = [(tiers.sink_k, tiers.sink_v, tiers.sink_valid[:, None].expand(-1, kv_heads, -1))]
    if vis.gist_mode == "all":
        parts.append((tiers.gist_k, tiers.gist_v, vis.gist_on[:, :, 0]))
    parts.append((tiers.recent_k, tiers.recent_v, vis.recent_on[:, 0][:, None].expand(-1, kv_heads, -1)))
    parts += _upper_parts(tiers, vis, b, h)
    out = recalled.merge(partial_attention(grouped, parts)).output()  # (B, Hk, G, D)
    return out.to(query.dtype).reshape(batch, heads, 1, dim)


def _recalled_partial(grouped: torch.Tensor, tiers: Tiers, index: torch.Tensor, picked: torch.Tensor,
                      with_gists: bool, kernel: str) -> Partial:
    """Attend the recalled chunks (and their gists), in place where a kernel can read the tier.

    A ``ChunkStore`` on the CPU without an LRU is read in place too. The ``torch`` kernel and other
    stores go through ``Tiers.gather_chunks``, which reuses its gather buffers between steps.
    """
    stored = (tiers.chunk_k, tiers.chunk_v) if tiers.store is None else tiers.store.in_place()
    name = resolve_kernel(kernel, grouped, stored[0]) if stored is not None else "torch"
    if name != "torch":
        gist_k, gist_v = (tiers.gist_k, tiers.gist_v) if with_gists else (None, None)
        return recalled_attention(grouped, *stored, tiers.chunk_valid, index, picked, gist_k, gist_v, kernel=name)
    raw_k, raw_v = tiers.gather_chunks(index)  # (B, Hk, K, Cm, D)
    gists = tiers.gather_gists(index) if with_gists else None  # (B, Hk, K, D) each
    return gathered_attention(grouped, raw_k, raw_v, tiers.chunk_valid, index, picked, gists)


def recalled_chunks(vis: Visibility) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the recalled chunks of one query per row as (B, Hk, K) indices and validity flags.

    Without ``vis.chunk_index`` the indices are compacted from ``vis.chunk_on`` in ascending
    order and padded with chunk 0 to the largest count K.
    """
    if vis.chunk_index is not None:
        return vis.chunk_index[0][:, :, 0], vis.chunk_index[1][:, :, 0]
    chunk_on = vis.chunk_on[:, :, 0]  # (B, Hk, N)
    count = chunk_on.sum(-1)  # (B, Hk)
    width = int(count.max()) if count.numel() else 0
    # The r-th recalled chunk goes to slot r; hidden chunks all go to the spare slot ``width``.
    slot = torch.where(chunk_on, chunk_on.cumsum(-1) - 1, width)
    chunks = torch.arange(chunk_on.shape[-1], device=chunk_on.device).expand_as(slot)
    index = torch.zeros(*slot.shape[:-1], width + 1, dtype=torch.long, device=chunk_on.device)
    index = index.scatter_(-1, slot, chunks)[..., :width]
    picked = torch.arange(width, device=chunk_on.device) < count[..., None]
    return index, picked


def _upper_parts(tiers: Tiers, vis: Visibility, b: torch.Tensor, h: torch.Tensor) -> list[tuple]:
    """(keys, values, visible) of the attended gists above level 1 for one query per row."""
    parts = []
    for level, tier in enumerate(tiers.upper):
        if vis.upper_index:
            index, picked = (x[:, :, 0] for x in vis.upper_index[level])  # (B, Hk, K)
            parts.append((tier.keys[b, h, index], tier.values[b, h, index], picked))
        elif vis.upper_on:
            parts.append((tier.keys, tier.values, vis.upper_on[level][:, :, 0]))
    return parts


def keep_rows_finite(mask: torch.Tensor) -> torch.Tensor:
    """Let rows with no visible key (padding queries) see every key, so softmax stays finite."""
    empty = ~mask.any(dim=-1, keepdim=True)
    return mask | empty
