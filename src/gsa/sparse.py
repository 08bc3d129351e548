"""Selective unfolding for queries that read the tiers: score gists, recall chunks, attend.

Shape legend: B batch, T queries, H query heads, Hk KV heads, G = H / Hk, D head dim, N chunks,
R recent tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gsa.config import GSAConfig
from gsa.diagnostics import RouterProbe
from gsa.ops.recall import resolve_kernel
from gsa.ops.attend import Visibility, attend_gathered, attend_masked, attended_counts, recent_visibility
from gsa.hierarchy import frontier
from gsa.ops.naive import naive_select, naive_tier_attention, naive_top_down
from gsa.methods import SelectionInputs, get_method
from gsa.ops.select import budget, select_chunks
from gsa.ops.topdown import LevelChoice, LevelGists, select_top_down
from gsa.tiers import Tiers


@dataclass
class KeyCounts:
    """Keys read per (B, Hk, T) by one layer: all attended, raw attended, and full attention's."""

    attended: torch.Tensor
    raw: torch.Tensor
    full: torch.Tensor
    scored: torch.Tensor | None = None  # (B, Hk, T) gists scored by a gist router, None otherwise


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
    if tiers.upper and config.attends_gists:
        return _hierarchical_visibility(query, tiers, config, layer_idx, scaling, window, recent_on, probe, query_slot)
    if not selects_in_layer(config, layer_idx):
        if not config.attends_gists:
            return Visibility(window, torch.zeros_like(window), recent_on, gist_mode="none")
        every_gist = tiers.gist_valid[:, None, None].expand(batch, kv_heads, length, num_chunks)
        return Visibility(chunk_on=window, gist_on=every_gist, recent_on=recent_on, gist_mode="all")

    # Score the candidates (valid chunks outside the window) and recall the top ones.
    method = get_method(config.method)
    group = heads // kv_heads
    candidate = (tiers.gist_valid & ~in_window)[:, None, :].expand(batch, length, num_chunks)
    scored = _gists_scored(tiers, config, kv_heads, length) if method.gist_router else None
    k = _chunks_to_recall(tiers, recent_on, config, group) * (group if method.per_group else 1)
    inputs = SelectionInputs(query, tiers, recent_on, scaling, query_slot, seed=config.seed, layer_idx=layer_idx)
    listed = _kernel_choice(inputs, config, k, method) if probe is None else None
    if listed is not None:
        return _listed_visibility(*listed, num_chunks, recent_on, config, scored)
    if config.impl == "naive":
        scores = method.scores_naive(inputs).cpu()
        chosen = naive_select(scores, candidate.cpu(), k.cpu(), config.merge, config.top_p).to(query.device)
    else:
        chosen = select_chunks(method.scores(inputs), candidate, k, config.merge, config.top_p)
    if probe is not None:
        probe.observe(layer_idx, inputs, chosen, candidate, k, config.merge)

    chunk_on = chosen | window
    if not config.attends_gists:
        return Visibility(chunk_on, torch.zeros_like(chunk_on), recent_on, gist_mode="none", scored=scored)
    return Visibility(chunk_on=chunk_on, gist_on=chunk_on, recent_on=recent_on, scored=scored)


def _cpp_decode_queries(query: torch.Tensor, tiers: Tiers, config: GSAConfig,
                        chunk_k: torch.Tensor) -> torch.Tensor | None:
    """Return the unscaled (B, Hk, G, D) float32 queries of a decode step that the C++ kernels serve.

    Returns None for several queries per row, top-p, the naive implementation, gists the kernels
    cannot read, or a recall kernel that does not resolve to ``cpp`` for ``chunk_k``.
    """
    from gsa.ops.cpu_kernel import cpp_supports  # loads torch's extension tools

    if query.shape[2] != 1 or config.top_p is not None or config.impl == "naive":
        return None
    batch, heads, _, dim = query.shape
    grouped = query.reshape(batch, tiers.num_kv_heads, heads // tiers.num_kv_heads, dim).float()  # (B, Hk, G, D)
    if resolve_kernel(config.recall_kernel, grouped, chunk_k) != "cpp" or not cpp_supports(grouped, tiers.gist_k):
        return None
    return grouped


def _gists_scored(tiers: Tiers, config: GSAConfig, kv_heads: int, length: int) -> torch.Tensor:
    """Gists a gist router scores per (B, Hk, T): the valid ones before the local window."""
    num_chunks = tiers.gist_valid.shape[1]
    window_start = tiers.num_chunks - config.spec.window_chunks  # (B,)
    before = torch.arange(num_chunks, device=window_start.device)[None, :] < window_start[:, None]
    count = (tiers.gist_valid & before).sum(-1)  # (B,)
    return count[:, None, None].expand(-1, kv_heads, length)


def _kernel_choice(inputs: SelectionInputs, config: GSAConfig, k: torch.Tensor,
                   method) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Pick the recalled chunks, window included, of a decode step in the C++ selection kernel.

    Returns (B, Hk, K) ascending chunk indices and their validity flags, or None where
    ``_cpp_decode_queries`` finds that the kernel does not apply. ``select_chunks`` is its twin. A
    method whose scores are gist products has them computed inside the kernel too.
    """
    from gsa.ops.cpu_kernel import cpp_gist_top_chunks, cpp_top_chunks

    tiers = inputs.tiers
    grouped = _cpp_decode_queries(inputs.query, tiers, config, tiers.gist_k)
    if grouped is None:
        return None
    window_start = tiers.num_chunks - config.spec.window_chunks  # (B,)
    if method.scores_gist_products:
        return cpp_gist_top_chunks(grouped * inputs.scaling, tiers.gist_k, tiers.gist_valid, window_start, k[:, 0],
                                   config.merge)
    scores = method.scores(inputs)[:, :, :, 0].float()  # (B, Hk, G, N)
    return cpp_top_chunks(scores, tiers.gist_valid, window_start, k[:, 0], config.merge)


def _listed_visibility(index: torch.Tensor, picked: torch.Tensor, num_chunks: int, recent_on: torch.Tensor,
                       config: GSAConfig, scored: torch.Tensor | None) -> Visibility:
    """Visibility of one query per row from its (B, Hk, K) recalled chunk list."""
    batch, kv_heads, _ = index.shape
    # Entries not picked go to a spare last column, which is dropped. (B, Hk, 1, N)
    columns = torch.where(picked, index, num_chunks)
    chunk_on = torch.zeros(batch, kv_heads, num_chunks + 1, dtype=torch.bool, device=index.device)
    chunk_on = chunk_on.scatter_(-1, columns, True)[:, :, None, :num_chunks]
    listed = (index[:, :, None], picked[:, :, None])  # (B, Hk, T, K)
    if not config.attends_gists:
        return Visibility(chunk_on, torch.zeros_like(chunk_on), recent_on, gist_mode="none", chunk_index=listed,
                          scored=scored)
    return Visibility(chunk_on, chunk_on, recent_on, chunk_index=listed, scored=scored)


def _hierarchical_visibility(query, tiers: Tiers, config: GSAConfig, layer_idx: int, scaling: float,
                             window: torch.Tensor, recent_on: torch.Tensor, probe, query_slot) -> Visibility:
    """Visibility under gists of several levels, for methods that attend gists.

    A layer that does not select attends what the multi-level mask shows a suffix token: every
    gist without a parent (the top level and the unfinished sections) and the window chunks with
    their gists. A selecting layer walks the levels top-down (``gsa.ops.topdown``) and attends the
    recalled chunks with their gists, the window, and the gists it kept at each level above 1.
    """
    batch, heads, length, _ = query.shape
    kv_heads = tiers.num_kv_heads
    if not selects_in_layer(config, layer_idx):
        edges = _frontiers(tiers)

        def expand(mask):
            return mask[:, None, None].expand(batch, kv_heads, length, -1)

        return Visibility(window, expand(edges[0]) | window, recent_on, gist_mode="all",
                          upper_on=[expand(edge) for edge in edges[1:]])

    group = heads // kv_heads
    k = [_chunks_to_recall(tiers, recent_on, config, group, gists=count) for count in _level_counts(tiers)]
    window_start = tiers.num_chunks - config.spec.window_chunks
    if config.impl == "naive":
        kept, _ = naive_top_down(query.cpu(), [tiers.gist_k.cpu()] + [t.keys.cpu() for t in tiers.upper],
                                 [c.cpu() for c in _level_counts(tiers)], tiers.fanouts, [x.cpu() for x in k],
                                 window_start.cpu(), scaling, config.merge, config.top_p)
        kept = [mask.to(query.device) for mask in kept]
        chunk_on = kept[0] | window
        if probe is not None:
            _observe(probe, query, tiers, recent_on, scaling, query_slot, config, layer_idx, kept[0], window, k[0])
        return Visibility(chunk_on, chunk_on, recent_on, upper_on=kept[1:])

    gists = [LevelGists(tiers.gist_k, tiers.num_chunks)] + [LevelGists(t.keys, t.count) for t in tiers.upper]
    result = select_top_down(query, gists, tiers.fanouts, k, window_start, scaling, config.merge, config.top_p)
    chosen = result.levels[0]
    window_index = window_start[:, None] + torch.arange(config.spec.window_chunks, device=query.device)
    window_picked = (window_index >= 0) & (window_index < tiers.num_chunks[:, None])  # (B, P)
    chunks = LevelChoice(
        torch.cat([chosen.index, window_index.clamp(min=0)[:, None, None].expand(-1, kv_heads, length, -1)], -1),
        torch.cat([chosen.picked, window_picked[:, None, None].expand(-1, kv_heads, length, -1)], -1),
    )
    num_chunks = tiers.gist_valid.shape[1]
    chunk_on = chunks.dense(num_chunks)
    if probe is not None:
        _observe(probe, query, tiers, recent_on, scaling, query_slot, config, layer_idx,
                 chosen.dense(num_chunks), window, k[0])
    upper = result.levels[1:]
    return Visibility(
        chunk_on, chunk_on, recent_on,
        upper_on=[c.dense(t.valid.shape[1]) for c, t in zip(upper, tiers.upper)],
        chunk_index=(chunks.index, chunks.picked), upper_index=[(c.index, c.picked) for c in upper],
        scored=result.scored,
    )


def _level_counts(tiers: Tiers) -> list[torch.Tensor]:
    return [tiers.num_chunks] + [tier.count for tier in tiers.upper]


def _frontiers(tiers: Tiers) -> list[torch.Tensor]:
    """Gists without a parent at each level, (B, N_l) each, level 1 first."""
    counts = _level_counts(tiers)
    widths = [tiers.gist_valid.shape[1]] + [tier.valid.shape[1] for tier in tiers.upper]
    edges = []
    for level in range(len(counts)):
        above = counts[level + 1] if level + 1 < len(counts) else None
        fanout = tiers.fanouts[level] if above is not None else 1
        edges.append(frontier(counts[level], above, fanout, widths[level]))
    return edges


def _observe(probe, query, tiers, recent_on, scaling, query_slot, config, layer_idx, chosen, window, k) -> None:
    """Report the level-1 choice to ``probe``, against candidates of every chunk outside the window."""
    candidate = (tiers.gist_valid[:, None, :] & ~window[:, 0]).expand(-1, query.shape[2], -1)  # (B, T, N)
    inputs = SelectionInputs(query, tiers, recent_on, scaling, query_slot, seed=config.seed, layer_idx=layer_idx)
    probe.observe(layer_idx, inputs, chosen, candidate, k, config.merge)


def _chunks_to_recall(tiers: Tiers, recent_on: torch.Tensor, config: GSAConfig, group: int,
                      gists: torch.Tensor | None = None) -> torch.Tensor:
    """Gists to keep per query head, (B, T): ``top_k``, or the budget rule capped by ``gists`` (B,),
    the gist count of the level being chosen (level 1 by default).

    Every level uses the level-1 rule k = floor(n / (r * G * C1)) + 1 with r the product of all
    chunk sizes, capped at a quarter of that level's gists, so each level keeps about as many
    gists as the chunks finally recalled.
    """
    batch, length = recent_on.shape[:2]
    if config.top_k is not None:
        return torch.full((batch, length), config.top_k, dtype=torch.long, device=recent_on.device)
    if "stored_keys" not in tiers.summaries:
        upper = sum(tier.count for tier in tiers.upper) if tiers.upper else 0
        tiers.summaries["stored_keys"] = (tiers.sink_valid.sum(-1) + tiers.chunk_valid.sum((-1, -2))
                                          + tiers.gist_valid.sum(-1) + upper)  # (B,)
    num_keys = tiers.summaries["stored_keys"][:, None] + recent_on.sum(-1)  # (B, T)
    gists = tiers.gist_valid.sum(-1) if gists is None else gists
    return budget(num_keys, gists, config.ratio, group, config.spec.chunk_size)


def selective_attention(
    query: torch.Tensor, tiers: Tiers, query_slot: torch.Tensor, config: GSAConfig, layer_idx: int,
    scaling: float, probe: RouterProbe | None = None,
) -> tuple[torch.Tensor, KeyCounts]:
    """Attend (B, H, T, D) queries at recent slots ``query_slot`` (B, T) to the tiers.

    Returns the (B, H, T, D) output and the key counts of this layer. A ``probe`` receives the
    routing choice for diagnostics.
    """
    fused = _select_and_attend(query, tiers, query_slot, config, layer_idx, scaling) if probe is None else None
    if fused is not None:
        return fused
    vis = visibility(query, tiers, query_slot, config, layer_idx, scaling, probe)
    if probe is not None:
        probe.record_unfolded(layer_idx, vis.chunk_on)
    if config.impl == "naive":
        out = naive_tier_attention(query, tiers, vis, scaling)
    elif query.shape[2] == 1:
        out = attend_gathered(query, tiers, vis, scaling, kernel=config.recall_kernel)
    else:
        out = attend_masked(query, tiers, vis, scaling)
    return out, KeyCounts(*attended_counts(tiers, vis), scored=vis.scored)


def _select_and_attend(query: torch.Tensor, tiers: Tiers, query_slot: torch.Tensor, config: GSAConfig,
                       layer_idx: int, scaling: float) -> tuple[torch.Tensor, KeyCounts] | None:
    """Run a decode step of a gist router in one C++ call that scores, picks and attends the chunks.

    Returns None where the call does not apply: a layer that does not select, several gist
    levels, a method whose scores are not gist products, a chunk tier that cannot be read in
    place, or any case ``_cpp_decode_queries`` rejects. ``visibility`` followed by
    ``attend_gathered`` is its twin.
    """
    from gsa.ops.cpu_kernel import cpp_select_and_attend

    method = get_method(config.method)
    if tiers.upper or not method.scores_gist_products or not selects_in_layer(config, layer_idx):
        return None
    stored = (tiers.chunk_k, tiers.chunk_v) if tiers.store is None else tiers.store.in_place()
    grouped = _cpp_decode_queries(query, tiers, config, stored[0]) if stored is not None else None
    if grouped is None:
        return None

    batch, heads, _, dim = query.shape
    recent_on = recent_visibility(tiers, query_slot)  # (B, T, R)
    k = _chunks_to_recall(tiers, recent_on, config, heads // tiers.num_kv_heads)  # (B, T)
    window_start = tiers.num_chunks - config.spec.window_chunks  # (B,)
    index, picked, attended = cpp_select_and_attend(
        grouped * scaling, tiers.gist_k, tiers.gist_v, tiers.gist_valid, window_start, k[:, 0], config.merge,
        *stored, tiers.chunk_valid, with_gists=config.attends_gists,
        sinks=(tiers.sink_k, tiers.sink_v, tiers.sink_valid), recent=(tiers.recent_k, tiers.recent_v, recent_on[:, 0]))
    out = attended.output().to(query.dtype).reshape(batch, heads, 1, dim)

    scored = _gists_scored(tiers, config, tiers.num_kv_heads, 1)
    vis = _listed_visibility(index, picked, tiers.gist_valid.shape[1], recent_on, config, scored)
    return out, KeyCounts(*attended_counts(tiers, vis), scored=vis.scored)
