"""Reference twins of the fast ops, written as plain loops to be obviously correct.

They are slow (Python loops over batch, heads, queries and keys) and serve as test oracles and
as the ``impl="naive"`` path for small inputs. Shapes follow the fast ops they mirror.
"""

from __future__ import annotations

import math

import torch

from gsa.ops.attend import Visibility
from gsa.tiers import Tiers


def naive_select(
    scores: torch.Tensor, candidate: torch.Tensor, k: torch.Tensor, merge: str = "union",
    top_p: float | None = None,
) -> torch.Tensor:
    """Loop twin of ``select_chunks``: (B, Hk, G, T, N) scores -> (B, Hk, T, N) chosen chunks."""
    batch, kv_heads, group, length, num_chunks = scores.shape
    chosen = torch.zeros(batch, kv_heads, length, num_chunks, dtype=torch.bool)
    for b in range(batch):
        for h in range(kv_heads):
            for t in range(length):
                options = [n for n in range(num_chunks) if candidate[b, t, n]]
                if merge == "group-sum":
                    per_head = [{n: sum(float(scores[b, h, g, t, n]) for g in range(group)) for n in options}]
                else:
                    per_head = [{n: float(scores[b, h, g, t, n]) for n in options} for g in range(group)]
                for head_scores in per_head:
                    for n in _choose(head_scores, int(k[b, t]), top_p):
                        chosen[b, h, t, n] = True
    return chosen


def naive_top_down(
    query: torch.Tensor, gist_keys: list[torch.Tensor], counts: list[torch.Tensor], fanouts: tuple[int, ...],
    k: list[torch.Tensor], window_start: torch.Tensor, scaling: float, merge: str = "union",
    top_p: float | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Loop twin of ``select_top_down``.

    Returns the kept gists of each level as (B, Hk, T, N_l) masks, level 1 first, and the number
    of candidates scored per (B, Hk, T).
    """
    batch, heads, length, _ = query.shape
    kv_heads = gist_keys[0].shape[1]
    levels = len(gist_keys)
    kept = [torch.zeros(batch, kv_heads, length, keys.shape[2], dtype=torch.bool) for keys in gist_keys]
    scored = torch.zeros(batch, kv_heads, length, dtype=torch.long)
    for b in range(batch):
        for hk in range(kv_heads):
            for t in range(length):
                options = list(range(int(counts[-1][b])))
                for level in range(levels, 0, -1):
                    if level == 1:
                        options = [n for n in options if n < int(window_start[b])]
                    chosen = _choose_level(query, gist_keys[level - 1], b, hk, t, options, int(k[level - 1][b, t]),
                                           scaling, merge, top_p)
                    scored[b, hk, t] += len(options)
                    for n in chosen:
                        kept[level - 1][b, hk, t, n] = True
                    if level > 1:
                        options = _children_and_frontier(sorted(chosen), fanouts[level - 2], int(counts[level - 1][b]),
                                                         int(counts[level - 2][b]))
    return kept, scored


def _choose_level(query, keys, b, hk, t, options, k, scaling, merge, top_p) -> set[int]:
    """Union over the query heads of KV head ``hk`` (or one choice on summed scores) among ``options``."""
    group = query.shape[1] // keys.shape[1]
    heads = range(hk * group, (hk + 1) * group)
    per_head = [{n: float(query[b, h, t].double() @ keys[b, hk, n].double()) * scaling for n in options} for h in heads]
    if merge == "group-sum":
        per_head = [{n: sum(s[n] for s in per_head) for n in options}]
    chosen: set[int] = set()
    for head_scores in per_head:
        chosen.update(_choose(head_scores, k, top_p))
    return chosen


def _children_and_frontier(parents: list[int], fanout: int, num_parents: int, num_children: int) -> list[int]:
    """Children of the kept ``parents`` plus the gists after the last full section, which have no parent."""
    children = [parent * fanout + c for parent in parents for c in range(fanout)]
    return children + list(range(num_parents * fanout, num_children))


def _choose(scores: dict[int, float], k: int, top_p: float | None) -> list[int]:
    scores = {n: score for n, score in scores.items() if math.isfinite(score)}  # NaN and ±inf never win
    ranked = sorted(scores, key=lambda n: (-scores[n], n))
    if top_p is None:
        return ranked[:k]
    if not ranked:
        return []
    top = max(scores.values())
    weights = {n: math.exp(scores[n] - top) for n in ranked}
    total = sum(weights.values())
    picked, mass = [], 0.0
    for n in ranked:
        if mass >= top_p:
            break
        picked.append(n)
        mass += weights[n] / total
    return picked


def naive_tier_attention(query: torch.Tensor, tiers: Tiers, vis: Visibility, scaling: float) -> torch.Tensor:
    """Loop twin of ``attend_masked`` and ``attend_gathered``: (B, H, T, D) -> (B, H, T, D)."""
    batch, heads, length, dim = query.shape
    group = heads // tiers.num_kv_heads
    out = torch.zeros(batch, heads, length, dim, dtype=torch.float64)
    chunks = tiers.raw_chunks()  # read once: with a store this loads the whole tier
    for b in range(batch):
        for h in range(heads):
            hk = h // group
            for t in range(length):
                keys, values = _visible_keys(tiers, chunks, vis, b, hk, t)
                if not keys:
                    continue
                out[b, h, t] = _softmax_attend(query[b, h, t], keys, values, scaling)
    return out.to(query.dtype)


def _visible_keys(tiers: Tiers, chunks: tuple[torch.Tensor, torch.Tensor], vis: Visibility, b: int, hk: int, t: int):
    """List the (key, value) pairs that query ``t`` of row ``b`` attends through KV head ``hk``, tier by tier."""
    pairs = []
    chunk_k, chunk_v = chunks  # (B, Hk, N, Cm, D)
    for s in range(tiers.sink_valid.shape[1]):
        if tiers.sink_valid[b, s]:
            pairs.append((tiers.sink_k[b, hk, s], tiers.sink_v[b, hk, s]))
    for n in range(tiers.chunk_valid.shape[1]):
        if vis.chunk_on[b, hk, t, n]:
            for c in range(tiers.chunk_valid.shape[2]):
                if tiers.chunk_valid[b, n, c]:
                    pairs.append((chunk_k[b, hk, n, c], chunk_v[b, hk, n, c]))
        if vis.gist_on[b, hk, t, n]:
            pairs.append((tiers.gist_k[b, hk, n], tiers.gist_v[b, hk, n]))
    for r in range(tiers.recent_valid.shape[1]):
        if vis.recent_on[b, t, r]:
            pairs.append((tiers.recent_k[b, hk, r], tiers.recent_v[b, hk, r]))
    for tier, upper_on in zip(tiers.upper, vis.upper_on):
        for n in range(tier.valid.shape[1]):
            if upper_on[b, hk, t, n]:
                pairs.append((tier.keys[b, hk, n], tier.values[b, hk, n]))
    return [k for k, _ in pairs], [v for _, v in pairs]


def naive_masked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Loop twin of masked SDPA with GQA: (B, H, T, D), (B, Hk, S, D), mask (B, 1, T, S)."""
    batch, heads, length, dim = query.shape
    group = heads // key.shape[1]
    out = torch.zeros(batch, heads, length, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for t in range(length):
                cols = [s for s in range(key.shape[2]) if mask[b, 0, t, s]]
                keys = [key[b, h // group, s] for s in cols]
                values = [value[b, h // group, s] for s in cols]
                if keys:
                    out[b, h, t] = _softmax_attend(query[b, h, t], keys, values, scaling)
    return out.to(query.dtype)


def _softmax_attend(q: torch.Tensor, keys: list, values: list, scaling: float) -> torch.Tensor:
    logits = [float(q.double() @ k.double()) * scaling for k in keys]
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    total = sum(weights)
    return sum(w / total * v.double() for w, v in zip(weights, values))


def naive_recalled_attention(
    grouped: torch.Tensor, chunk_k: torch.Tensor, chunk_v: torch.Tensor, chunk_valid: torch.Tensor,
    index: torch.Tensor, picked: torch.Tensor, gist_k: torch.Tensor | None = None, gist_v: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop twin of ``recalled_attention``: returns the (B, Hk, G, D) output and the (B, Hk, G) log-sum-exp.

    Queries are already scaled. Every picked entry of ``index`` (B, Hk, K) contributes the valid
    tokens of its chunk, then the chunk's gist when ``gist_k`` is given. A row with no visible key
    gets a zero output and a log-sum-exp of -inf. Computed in float64.
    """
    batch, kv_heads, group, dim = grouped.shape
    out = torch.zeros(batch, kv_heads, group, dim, dtype=torch.float64)
    lse = torch.full((batch, kv_heads, group), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        for hk in range(kv_heads):
            keys, values = [], []
            for slot in range(index.shape[2]):
                if not picked[b, hk, slot]:
                    continue
                n = int(index[b, hk, slot])
                for c in range(chunk_valid.shape[2]):
                    if chunk_valid[b, n, c]:
                        keys.append(chunk_k[b, hk, n, c])
                        values.append(chunk_v[b, hk, n, c])
                if gist_k is not None:
                    keys.append(gist_k[b, hk, n])
                    values.append(gist_v[b, hk, n])
            if not keys:
                continue
            for g in range(group):
                logits = [float(grouped[b, hk, g].double() @ k.double()) for k in keys]
                top = max(logits)
                total = sum(math.exp(x - top) for x in logits)
                out[b, hk, g] = _softmax_attend(grouped[b, hk, g], keys, values, 1.0)
                lse[b, hk, g] = top + math.log(total)
    return out, lse
