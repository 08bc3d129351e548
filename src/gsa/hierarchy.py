"""Gist-of-gists metadata: sections per level, gist maps above level 1, parents and children.

With chunk sizes (C1, C2, ..., CL), level-1 gist n closes raw chunk n, and level-l gist j
(l >= 2) closes section j of level l, which contains the level-(l-1) gists j * C_l to
j * C_l + C_l - 1. Sections above level 1 always contain exactly C_l gists because only level-1
chunk ends move (word boundaries), so parents and children are plain index arithmetic:

- the parent of level-(l-1) gist i is level-l gist i // C_l, if that gist exists yet;
- a section that is not full yet (the last one of a level) has no parent gist: its gists form the
  *frontier* of their level, together with every top-level gist.

Per token, ``section[b, t, m - 1]`` is the level-m section that token t belongs to: for a raw
token of chunk n (and for the level-1 gist of chunk n, the tail and the suffix, which belong to
chunk n too) it is n // (C2 * ... * Cm). A level-l gist j belongs to section j of level l and to
the sections above that contain it. Sinks, padding, and levels below a gist's own level get -1.

Shape legend: B batch, L columns, N_l gists of level l.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Hierarchy:
    """Per-token sections and per-level gist maps of a batch with more than one gist level."""

    fanouts: tuple[int, ...]  # (C2, ..., CL)
    section: torch.Tensor  # (B, L, levels): section index per level, -1 for none
    gist_index: list[torch.Tensor]  # levels 2..L: (B, N_l) input columns of the level-l gists, -1 padding
    num_gists: torch.Tensor  # (B, levels): gists per level, level 1 first
    parent: list[torch.Tensor]  # levels 1..L-1: (B, N_l) index of each gist's parent, -1 for none

    @property
    def num_levels(self) -> int:
        return 1 + len(self.fanouts)

    def children(self, level: int, index: int) -> range:
        """Indices of the level-(level - 1) gists that level-``level`` gist ``index`` covers."""
        fanout = self.fanouts[level - 2]
        return range(index * fanout, (index + 1) * fanout)

    def to(self, device: torch.device | str) -> Hierarchy:
        return Hierarchy(
            self.fanouts, self.section.to(device), [g.to(device) for g in self.gist_index],
            self.num_gists.to(device), [p.to(device) for p in self.parent],
        )


def section_spans(fanouts: tuple[int, ...]) -> list[int]:
    """Level-1 chunks per section of each level: [1, C2, C2 * C3, ...]."""
    return [math.prod(fanouts[:m]) for m in range(len(fanouts) + 1)]


def build_hierarchy(
    is_gist: torch.Tensor, chunk: torch.Tensor, level: torch.Tensor, fanouts: tuple[int, ...]
) -> Hierarchy:
    """Build the section of every token at every level and the gist maps from (B, L) metadata."""
    levels = 1 + len(fanouts)
    spans = section_spans(fanouts)
    in_chunk = chunk >= 0
    section = torch.stack(
        [torch.where(in_chunk, chunk // spans[m], -1) for m in range(levels)], dim=-1
    )  # (B, L, levels)

    gist_index = []
    counts = [(is_gist & (level == 1)).sum(1)]
    for own in range(2, levels + 1):
        is_own = is_gist & (level == own)
        index = is_own.long().cumsum(1) - 1  # (B, L): the gist's index within its level
        for m in range(own, levels + 1):
            span = math.prod(fanouts[own - 1 : m - 1])  # level-own gists per level-m section
            section[..., m - 1] = torch.where(is_own, index // span, section[..., m - 1])
        gist_index.append(_columns(is_own))
        counts.append(is_own.sum(1))
    num_gists = torch.stack(counts, dim=1)  # (B, levels)

    parent = []
    for lower in range(1, levels):
        width = int(num_gists[:, lower - 1].max()) if num_gists.numel() else 0
        parent.append(parent_map(num_gists[:, lower - 1], num_gists[:, lower], fanouts[lower - 1], width))
    return Hierarchy(tuple(fanouts), section, gist_index, num_gists, parent)


def parent_map(num_lower: torch.Tensor, num_upper: torch.Tensor, fanout: int, width: int) -> torch.Tensor:
    """Parent index of each of ``width`` lower gists per row, (B, width); -1 for padding and no parent."""
    index = torch.arange(width, device=num_lower.device)
    parent = (index // fanout)[None, :].expand(num_lower.shape[0], width)
    has_parent = (parent < num_upper[:, None]) & (index[None, :] < num_lower[:, None])
    return torch.where(has_parent, parent, -1)


def frontier(num_gists: torch.Tensor, num_parents: torch.Tensor | None, fanout: int, width: int) -> torch.Tensor:
    """Gists of one level that have no parent yet, (B, width) boolean.

    ``num_parents`` is the gist count of the level above, or None at the top level, where every
    valid gist is on the frontier.
    """
    index = torch.arange(width, device=num_gists.device)[None, :]
    valid = index < num_gists[:, None]
    if num_parents is None:
        return valid
    return valid & (index >= (num_parents * fanout)[:, None])


def _columns(flags: torch.Tensor) -> torch.Tensor:
    """Columns where ``flags`` (B, L) is True, left-aligned and padded with -1; returns (B, max count)."""
    width = int(flags.sum(1).max()) if flags.numel() else 0
    out = torch.full((flags.shape[0], width), -1, dtype=torch.long, device=flags.device)
    for b in range(flags.shape[0]):
        cols = flags[b].nonzero().flatten()
        out[b, : cols.numel()] = cols
    return out
