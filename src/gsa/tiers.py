"""The KV tiers of one attention layer: sinks, raw chunks, gists and recent tokens.

Selective attention reads keys and values by tier rather than in sequence order. Raw chunks are
stored as a (B, Hk, N, Cm, D) block so that recalling chunk n is one index on the N dimension, and
the gists of those chunks as (B, Hk, N, D). Sinks and recent tokens (the context tail, the suffix
and every generated token) are always attended.

A multi-level layout adds one gist tier per level above 1 (``Tiers.upper``), each (B, Hk, N_l, D);
level-l gist j covers the level-(l-1) gists j * C_l to j * C_l + C_l - 1 (``gsa.hierarchy``).

The raw chunks may be moved off the device into a ``ChunkStore`` (host memory or disk). Code that
reads them goes through ``Tiers.gather_chunks`` and ``Tiers.raw_chunks``; every other tier stays on
the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gsa.chunk_store import ChunkStore
from gsa.layout import GistBatch


@dataclass
class GistTier:
    """The gists of one level above 1: keys, values and which slots contain a gist."""

    keys: torch.Tensor  # (B, Hk, N_l, D)
    values: torch.Tensor
    valid: torch.Tensor  # (B, N_l); the valid slots of a row are 0 .. count - 1

    @property
    def count(self) -> torch.Tensor:
        return self.valid.sum(-1)


@dataclass
class Tiers:
    """Keys and values of one layer by tier, with validity masks for padded slots."""

    sink_k: torch.Tensor  # (B, Hk, S0, D)
    sink_v: torch.Tensor
    sink_valid: torch.Tensor  # (B, S0)
    chunk_k: torch.Tensor | None  # (B, Hk, N, Cm, D); None once moved to ``store``
    chunk_v: torch.Tensor | None
    chunk_valid: torch.Tensor  # (B, N, Cm)
    gist_k: torch.Tensor  # (B, Hk, N, D)
    gist_v: torch.Tensor
    gist_valid: torch.Tensor  # (B, N)
    recent_k: torch.Tensor  # (B, Hk, R, D)
    recent_v: torch.Tensor
    recent_valid: torch.Tensor  # (B, R)
    num_chunks: torch.Tensor  # (B,)
    # Per-chunk key summaries (Quest bounds, mean keys), computed once: the chunk tier never changes.
    summaries: dict = field(default_factory=dict)
    store: ChunkStore | None = None  # the raw chunks when they live in host memory or on disk
    upper: list[GistTier] = field(default_factory=list)  # levels 2..L; empty for one level
    fanouts: tuple[int, ...] = ()  # (C2, ..., CL)

    @property
    def num_kv_heads(self) -> int:
        return self.sink_k.shape[1]

    @property
    def num_levels(self) -> int:
        return 1 + len(self.upper)

    def append_chunk(self, key: torch.Tensor, value: torch.Tensor, gist_key: torch.Tensor, gist_value: torch.Tensor,
                     upper_keys: list[torch.Tensor] = (), upper_values: list[torch.Tensor] = ()) -> torch.Tensor:
        """Append one level-1 chunk per row: (B, Hk, C, D) raw states and its (B, Hk, D) gist.

        ``upper_keys[l - 2]`` and ``upper_values[l - 2]`` (B, Hk, D) are the level-l gist states,
        stored only in the rows where the new chunk completes a level-l section. Returns a
        (B, levels) mask of the rows and levels that gained a gist. Tensors that other
        code refers to are not changed, because every tier that grows is a new tensor.

        NOTE: a growing tier is copied whole, so one append costs O(N). Growing by doubling a spare
        capacity would make it O(1) amortised, but forks share these tensors and consumers read N
        from their shapes. No decode path calls this yet: generated tokens go to the recent tier.
        """
        if self.store is not None:
            raise NotImplementedError("append_chunk needs the raw chunks on the device; use raw_tier='device'")
        if len(upper_keys) != len(self.upper) or len(upper_values) != len(self.upper):
            raise ValueError(f"got {len(upper_keys)} upper gist states for {len(self.upper)} levels above 1")
        chunk_len = key.shape[2]
        slot = self.num_chunks.clone()  # (B,): each row writes after its own last chunk
        self.chunk_k, self.chunk_v, self.chunk_valid = _append_rows(
            self.chunk_k, self.chunk_v, self.chunk_valid, slot, key, value, chunk_len)
        self.gist_k, self.gist_v, self.gist_valid = _append_rows(
            self.gist_k, self.gist_v, self.gist_valid, slot, gist_key, gist_value)
        self.num_chunks = slot + 1
        added = [torch.ones_like(slot, dtype=torch.bool)]
        closed, count = added[0], self.num_chunks
        for tier, fanout, up_k, up_v in zip(self.upper, self.fanouts, upper_keys, upper_values):
            closed = closed & (count % fanout == 0)
            count = count // fanout
            rows = closed.nonzero().flatten()
            if rows.numel():
                tier.keys, tier.values, tier.valid = _append_rows(
                    tier.keys, tier.values, tier.valid, count - 1, up_k, up_v, rows=rows)
            added.append(closed)
        self.summaries = {}  # describes the old chunk tier; a new dict, because forks share the old one
        return torch.stack(added, dim=1)

    def append_recent(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Append T new tokens, (B, Hk, T, D), to the recent tier."""
        self.recent_k = torch.cat([self.recent_k, key], dim=2)
        self.recent_v = torch.cat([self.recent_v, value], dim=2)
        new_valid = torch.ones(key.shape[0], key.shape[2], dtype=torch.bool, device=key.device)
        self.recent_valid = torch.cat([self.recent_valid, new_valid], dim=1)

    def offload(self, store: ChunkStore) -> None:
        """Serve the raw chunks from ``store`` and drop the device copies."""
        self.store = store
        self.chunk_k = self.chunk_v = None

    def gather_chunks(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the raw keys and values of chunks ``index`` (B, Hk, K) as (B, Hk, K, Cm, D)."""
        if self.store is not None:
            return self.store.gather(index)
        keys = gather_chunk_rows(self.chunk_k, index, self._scratch("gather_k", self.chunk_k, index))
        values = gather_chunk_rows(self.chunk_v, index, self._scratch("gather_v", self.chunk_v, index))
        return keys, values

    def gather_gists(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the level-1 gist keys and values of chunks ``index`` (B, Hk, K) as (B, Hk, K, D)."""
        keys = gather_gist_rows(self.gist_k, index, self._scratch("gist_gather_k", self.gist_k[:, :, :, None], index))
        values = gather_gist_rows(self.gist_v, index, self._scratch("gist_gather_v", self.gist_v[:, :, :, None], index))
        return keys, values

    def _scratch(self, name: str, chunks: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
        """Return a reusable flat buffer for ``index.numel()`` gathered chunks.

        Reusing it avoids a fresh allocation per decode step. Fresh buffers of tens of MB made the
        gather several times slower on the CPU, most likely because they arrive as new zeroed pages.
        """
        if not chunks.is_contiguous():
            return None
        rows, width = index.numel(), chunks.shape[3] * chunks.shape[4]
        buffer = self.summaries.get(name)
        if buffer is None or buffer.shape[0] < rows or buffer.dtype != chunks.dtype:
            buffer = torch.empty(max(rows, 1) * 2, width, dtype=chunks.dtype, device=chunks.device)
            self.summaries[name] = buffer
        return buffer[:rows]

    def raw_chunks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return every raw chunk's keys and values (B, Hk, N, Cm, D) on the device.

        With a store this reads the whole tier, so callers on the decode path should gather instead.
        """
        if self.store is not None:
            return self.store.full()
        return self.chunk_k, self.chunk_v

    def nbytes(self) -> int:
        """Bytes of KV stored in every tier, wherever the raw chunks live."""
        return self.resident_nbytes() + (self.store.stored_bytes() if self.store is not None else 0)

    def resident_nbytes(self) -> int:
        """Bytes of KV held in process memory: the device tiers plus the store's host copy and LRU."""
        tensors = [self.sink_k, self.sink_v, self.gist_k, self.gist_v, self.recent_k, self.recent_v]
        if self.store is None:
            tensors += [self.chunk_k, self.chunk_v]
        resident = sum(t.numel() * t.element_size() for t in tensors)
        return resident + (self.store.resident_bytes() if self.store is not None else 0)


def _append_rows(keys, values, valid, slot, new_k, new_v, chunk_len: int | None = None, rows=None):
    """Write (B, Hk, [C,] D) states at ``slot`` (B,) of a padded tier, growing it when needed.

    ``rows`` limits the write to those batch rows. A chunk tier is (B, Hk, N, Cm, D) with (B, N, Cm)
    validity; a gist tier is (B, Hk, N, D) with (B, N) validity.
    """
    rows = torch.arange(keys.shape[0], device=keys.device) if rows is None else rows
    width = max(keys.shape[2], int(slot[rows].max()) + 1)
    if chunk_len is not None and chunk_len > keys.shape[3]:
        raise ValueError(f"a new chunk of {chunk_len} tokens does not fit the chunk tier's {keys.shape[3]} slots")
    keys, values, valid = _grow(keys, width), _grow(values, width), _grow(valid, width)
    heads = torch.arange(keys.shape[1], device=keys.device)
    at = slot[rows]
    if chunk_len is None:
        keys[rows[:, None], heads[None, :], at[:, None]] = new_k[rows].to(keys.dtype)
        values[rows[:, None], heads[None, :], at[:, None]] = new_v[rows].to(values.dtype)
        valid[rows, at] = True
        return keys, values, valid
    keys[rows[:, None], heads[None, :], at[:, None], :chunk_len] = new_k[rows].to(keys.dtype)
    values[rows[:, None], heads[None, :], at[:, None], :chunk_len] = new_v[rows].to(values.dtype)
    valid[rows, at, :chunk_len] = True
    return keys, values, valid


def _grow(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Copy ``tensor`` with dimension 2 (dimension 1 for a validity mask) padded to ``width``."""
    dim = 1 if tensor.dtype == torch.bool else 2
    shape = list(tensor.shape)
    extra = width - shape[dim]
    shape[dim] = extra
    pad = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, pad], dim=dim)


def gather_chunk_rows(chunks: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Gather chunks ``index`` (B, Hk, K) of a (B, Hk, N, Cm, D) tier; returns (B, Hk, K, Cm, D).

    A contiguous tier is read as (B * Hk * N) rows with ``index_select``, one block copy per chunk,
    which on the CPU is several times faster than advanced indexing over three dimensions.
    """
    batch, kv_heads, num_chunks, chunk_len, dim = chunks.shape
    if not chunks.is_contiguous():
        rows = torch.arange(batch, device=index.device)[:, None, None]
        heads = torch.arange(kv_heads, device=index.device)[None, :, None]
        return chunks[rows, heads, index]
    base = torch.arange(batch * kv_heads, device=index.device).view(batch, kv_heads, 1) * num_chunks
    flat = chunks.view(batch * kv_heads * num_chunks, chunk_len * dim)
    rows = (base + index).reshape(-1)
    picked = torch.index_select(flat, 0, rows, out=out) if out is not None else flat.index_select(0, rows)
    # picked: (B * Hk * K, Cm * D)
    return picked.view(batch, kv_heads, index.shape[-1], chunk_len, dim)


def gather_gist_rows(gists: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Gather gists ``index`` (B, Hk, K) of a (B, Hk, N, D) tier as one-row chunks; returns (B, Hk, K, D)."""
    return gather_chunk_rows(gists[:, :, :, None], index, out).squeeze(3)  # (B, Hk, N, 1, D) -> (B, Hk, K, D)


def gather_columns(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather sequence columns of ``states`` (B, Hk, L, D) by ``index`` (B, *X); -1 reads column 0.

    Returns (B, Hk, *X, D).
    """
    batch, heads, _, dim = states.shape
    flat = index.clamp(min=0).reshape(batch, 1, -1, 1).expand(batch, heads, -1, dim)
    gathered = states.gather(2, flat)  # (B, Hk, prod(X), D)
    return gathered.reshape(batch, heads, *index.shape[1:], dim)


def split_tiers(key: torch.Tensor, value: torch.Tensor, batch: GistBatch) -> Tiers:
    """Split flat prompt states (B, Hk, L, D) into tiers through the batch's index maps."""
    def take(index):
        return gather_columns(key, index), gather_columns(value, index), index >= 0

    sink_k, sink_v, sink_valid = take(batch.sink_index)
    chunk_k, chunk_v, chunk_valid = take(batch.chunk_index)
    gist_k, gist_v, gist_valid = take(batch.gist_index)
    recent_k, recent_v, recent_valid = take(batch.recent_index)
    upper = [GistTier(*take(index)) for index in batch.hierarchy.gist_index] if batch.hierarchy is not None else []
    return Tiers(
        sink_k, sink_v, sink_valid, chunk_k, chunk_v, chunk_valid, gist_k, gist_v, gist_valid,
        recent_k, recent_v, recent_valid, batch.num_chunks.to(key.device), upper=upper, fanouts=batch.spec.fanouts,
    )
