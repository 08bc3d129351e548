"""Selective unfolding for queries that read the tiers: score gists, recall chunks, attend.

Shape legend: B batch, T queries, H query heads, Hk KV heads, G = H / Hk, D head dim, N chunks,
R recent tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gsa.config import GSAConfig
from gsa.diagnostics import RouterProbe
from gsa.ops.attend import Visibility, attend_gathered, attend_masked, attended_counts, recent_visibility
from gsa.ops.naive import naive_select, naive_tier_attention
from gsa.methods import SelectionInputs, get_method
from gsa.ops.select import budget, select_chunks
from gsa.tiers import Tiers


@dataclass
class KeyCounts:
    """Keys read per (B, Hk, T) by one layer: all attended, raw attended, and full attention's."""

    attended: torch.Tensor
    raw: torch.Tensor
    full: torch.Tensor


def selects_in_layer(config: GSAConfig, layer_idx: int) -> bool:
    """Return whether ``layer_idx`` recalls chunks. Gist routers skip layer 0, whose gists carry little
    information, unless ``select_first_layer`` is set."""
    method = get_method(config.method)
    if not method.selects:
        return False
    return layer_idx > 0 or config.select_first_layer or not method.gist_router


def visibility(
    query: torch.Tensor, tiers: Tiers, query_slot: torch.Tensor, config: GSAConfig, layer_idx: int,
    scaling: float, probe: RouterProbe | None = None,
) -> Visibility:
    """Decide which chunks and gists each query attends, per KV head.

    Chunks in the local window (the last P full chunks) are always unfolded. Outside it, a
    selecting method recalls its top chunks and hides the rest. Gists are attended only by
    methods built on trained gists under the gist mask: those of recalled chunks for ``gsa``,
    every gist for ``gist-only`` and for a layer that does not select.
    """
    batch, heads, length, _ = query.shape
    kv_heads = tiers.num_kv_heads
    num_chunks = tiers.gist_valid.shape[1]
    recent_on = recent_visibility(tiers, query_slot)  # (B, T, R)

    chunk_idx = torch.arange(num_chunks, device=query.device)
    in_window = chunk_idx[None, :] >= (tiers.num_chunks - config.spec.window_chunks)[:, None]
    window = (tiers.gist_valid & in_window)[:, None, None].expand(batch, kv_heads, length, num_chunks)
    if not selects_in_layer(config, layer_idx):
        if not config.attends_gists:
            return Visibility(window, torch.zeros_like(window), recent_on, gist_mode="none")
        every_gist = tiers.gist_valid[:, None, None].expand(batch, kv_heads, length, num_chunks)
        return Visibility(chunk_on=window, gist_on=every_gist, recent_on=recent_on, gist_mode="all")

    # Score the candidates (valid chunks outside the window) and recall the top ones.
    method = get_method(config.method)
    group = heads // kv_heads
    candidate = (tiers.gist_valid & ~in_window)[:, None, :].expand(batch, length, num_chunks)
    k = _chunks_to_recall(tiers, recent_on, config, group) * (group if method.per_group else 1)
    inputs = SelectionInputs(query, tiers, recent_on, scaling, query_slot, seed=config.seed, layer_idx=layer_idx)
    if config.impl == "naive":
        scores = method.scores_naive(inputs).cpu()
        chosen = naive_select(scores, candidate.cpu(), k.cpu(), config.merge, config.top_p).to(query.device)
    else:
        chosen = select_chunks(method.scores(inputs), candidate, k, config.merge, config.top_p)
    if probe is not None:
        probe.observe(layer_idx, inputs, chosen, candidate, k, config.merge)

    chunk_on = chosen | window
    if not config.attends_gists:
        return Visibility(chunk_on, torch.zeros_like(chunk_on), recent_on, gist_mode="none")
    return Visibility(chunk_on=chunk_on, gist_on=chunk_on, recent_on=recent_on)


def _chunks_to_recall(tiers: Tiers, recent_on: torch.Tensor, config: GSAConfig, group: int) -> torch.Tensor:
    batch, length = recent_on.shape[:2]
    if config.top_k is not None:
        return torch.full((batch, length), config.top_k, dtype=torch.long, device=recent_on.device)
    stored = tiers.sink_valid.sum(-1) + tiers.chunk_valid.sum((-1, -2)) + tiers.gist_valid.sum(-1)  # (B,)
    num_keys = stored[:, None] + recent_on.sum(-1)  # (B, T)
    return budget(num_keys, tiers.gist_valid.sum(-1), config.ratio, group, config.spec.chunk_size)


def selective_attention(
    query: torch.Tensor, tiers: Tiers, query_slot: torch.Tensor, config: GSAConfig, layer_idx: int,
    scaling: float, probe: RouterProbe | None = None,
) -> tuple[torch.Tensor, KeyCounts]:
    """Attend (B, H, T, D) queries at recent slots ``query_slot`` (B, T) to the tiers.

    Returns the (B, H, T, D) output and the key counts of this layer. A ``probe`` receives the
    routing choice for diagnostics.
    """
    vis = visibility(query, tiers, query_slot, config, layer_idx, scaling, probe)
    if probe is not None:
        probe.record_unfolded(layer_idx, vis.chunk_on)
    if config.impl == "naive":
        out = naive_tier_attention(query, tiers, vis, scaling)
    elif query.shape[2] == 1:
        out = attend_gathered(query, tiers, vis, scaling)
    else:
        out = attend_masked(query, tiers, vis, scaling)
    return out, KeyCounts(*attended_counts(tiers, vis))
