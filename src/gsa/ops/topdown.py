"""Top-down chunk selection over gist levels: score the top gists, then only the children of kept ones.

Level by level from the top: the candidates of the top level are all its gists. A level below gets
as candidates the children of the gists kept one level up, plus its *frontier*: the gists of its
last, unfinished section, which have no parent yet and so are always candidates. Level 1 drops the
chunks of the local window, which are unfolded anyway. At every level each query head keeps its
top-k candidates and the heads of a GQA group merge their choices as in ``select_chunks``.

Candidates are kept as index lists, so a step scores the top level (N_L gists) plus about
k * G * C_l children per lower level, instead of every level-1 gist.

Shape legend: B batch, T queries, H query heads, Hk KV heads, G = H / Hk, D head dim, N_l gists of
level l, K candidates or kept gists of one level.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gsa.ops.select import select_chunks


@dataclass
class LevelGists:
    """The gists of one level, as selection reads them."""

    keys: torch.Tensor  # (B, Hk, N_l, D)
    count: torch.Tensor  # (B,) valid gists per row; they occupy indices 0 .. count - 1


@dataclass
class LevelChoice:
    """Gists kept at one level per KV head and query, as an index list."""

    index: torch.Tensor  # (B, Hk, T, K)
    picked: torch.Tensor  # (B, Hk, T, K): False marks padding

    def dense(self, width: int) -> torch.Tensor:
        """Return the choice as a (B, Hk, T, width) boolean mask."""
        out = torch.zeros(*self.index.shape[:3], width + 1, dtype=torch.bool, device=self.index.device)
        slot = torch.where(self.picked, self.index, width)  # padding writes to the spare last column
        return out.scatter(-1, slot, True)[..., :width]


@dataclass
class TopDownResult:
    """Kept gists per level (level 1 first, so ``levels[0]`` lists the recalled chunks) and the work done."""

    levels: list[LevelChoice]
    scored: torch.Tensor  # (B, Hk, T): candidate gists scored over all levels, per KV head


def select_top_down(
    query: torch.Tensor,
    gists: list[LevelGists],
    fanouts: tuple[int, ...],
    k: list[torch.Tensor],
    window_start: torch.Tensor,
    scaling: float,
    merge: str = "union",
    top_p: float | None = None,
) -> TopDownResult:
    """Choose chunks for (B, H, T, D) queries by walking the gist levels from the top.

    Args:
        gists: level 1 first; ``gists[l - 1]`` contains the level-l gist keys.
        fanouts: (C2, ..., CL).
        k: per level, (B, T) gists to keep per query head (ignored when ``top_p`` is set).
        window_start: (B,) first level-1 chunk of the local window; chunks from there on are not
            candidates.
    """
    batch, heads, length, dim = query.shape
    kv_heads = gists[0].keys.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, length, dim).float()  # (B, Hk, G, T, D)
    top = gists[-1]
    index = torch.arange(top.keys.shape[2], device=query.device).expand(batch, kv_heads, length, -1)
    valid = index < top.count[:, None, None, None]
    scored = torch.zeros(batch, kv_heads, length, dtype=torch.long, device=query.device)
    levels: list[LevelChoice] = [None] * len(gists)  # type: ignore[list-item]
    for level in range(len(gists), 0, -1):
        if level == 1:
            valid = valid & (index < window_start[:, None, None, None])
        scores = _score(grouped, gists[level - 1].keys, index, scaling, whole=level == len(gists))
        chosen = select_chunks(scores, valid, k[level - 1], merge, top_p)  # (B, Hk, T, K)
        scored += valid.sum(-1)
        levels[level - 1] = compact(index, chosen)
        if level > 1:
            index, valid = _candidates(levels[level - 1], gists[level - 1].count, gists[level - 2].count,
                                       fanouts[level - 2])
    return TopDownResult(levels, scored)


def _score(grouped: torch.Tensor, keys: torch.Tensor, index: torch.Tensor, scaling: float, whole: bool) -> torch.Tensor:
    """Scores (B, Hk, G, T, K) of the candidates ``index`` (B, Hk, T, K) against (B, Hk, N, D) keys."""
    if whole:  # the top level scores every gist, so no gather is needed
        return torch.einsum("bkgtd,bknd->bkgtn", grouped, keys.float()) * scaling
    batch, kv_heads, length, count = index.shape
    dim = keys.shape[-1]
    flat = index.clamp(min=0).reshape(batch, kv_heads, length * count, 1).expand(-1, -1, -1, dim)
    picked = keys.gather(2, flat).reshape(batch, kv_heads, length, count, dim)  # (B, Hk, T, K, D)
    return torch.einsum("bkgtd,bktnd->bkgtn", grouped, picked.float()) * scaling


def compact(index: torch.Tensor, chosen: torch.Tensor) -> LevelChoice:
    """Keep the chosen entries of ``index`` (B, Hk, T, K), left-aligned, padded to the largest count."""
    count = int(chosen.sum(-1).max()) if chosen.numel() else 0
    order = torch.sort(chosen.to(torch.int8), dim=-1, descending=True, stable=True)
    keep = order.indices[..., :count]
    return LevelChoice(index.gather(-1, keep), order.values[..., :count].bool())


def _candidates(kept: LevelChoice, num_parents: torch.Tensor, num_children: torch.Tensor,
                fanout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates one level down: the children of ``kept`` and the frontier, (B, Hk, T, K') each."""
    offsets = torch.arange(fanout, device=kept.index.device)
    children = kept.index[..., None] * fanout + offsets  # (B, Hk, T, K, C)
    child_valid = kept.picked[..., None].expand_as(children)
    batch, kv_heads, length = kept.index.shape[:3]
    children = children.reshape(batch, kv_heads, length, -1)
    child_valid = child_valid.reshape(batch, kv_heads, length, -1)

    # The frontier: at most C - 1 gists after the last full section. (B, C - 1)
    start = num_parents * fanout
    frontier = start[:, None] + offsets[None, : fanout - 1]
    frontier_valid = frontier < num_children[:, None]
    frontier = frontier[:, None, None].expand(-1, kv_heads, length, -1)
    frontier_valid = frontier_valid[:, None, None].expand(-1, kv_heads, length, -1)
    index, valid = torch.cat([children, frontier], dim=-1), torch.cat([child_valid, frontier_valid], dim=-1)
    return torch.where(valid, index, 0), valid  # padding points at gist 0, so gathers stay in range
