"""Composable attention-mask rules over a gisted sequence.

Each rule is a mask function ``(b, h, q_idx, kv_idx) -> bool tensor`` in the form FlexAttention
and transformers' masking utilities use, so one definition yields both a dense boolean mask
(``dense_mask``) and a FlexAttention ``BlockMask`` (``block_mask``). Rules index the per-token
metadata of a ``GistBatch`` (``kind``, ``chunk``) and combine with ``and_masks`` / ``or_masks``.

The examples below use the sequence ``s a b G c d H e q``: one sink ``s``, chunk 0 ``a b``
closed by gist ``G``, chunk 1 ``c d`` closed by gist ``H``, the tail ``e`` and the suffix ``q``
(C=2, S=1, P=1). Rows are queries, columns keys, ``x`` marks an allowed pair. The multi-level
rules at the end of the file use a two-level example, described there.
"""

from __future__ import annotations

from typing import Callable

import torch

from gsa.layout import GistBatch, TokenKind

MaskFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def and_masks(*rules: MaskFunction) -> MaskFunction:
    """Allow a pair only where every rule allows it."""

    def mask(b, h, q_idx, kv_idx):
        result = rules[0](b, h, q_idx, kv_idx)
        for rule in rules[1:]:
            result = result & rule(b, h, q_idx, kv_idx)
        return result

    return mask


def or_masks(*rules: MaskFunction) -> MaskFunction:
    """Allow a pair where any rule allows it."""

    def mask(b, h, q_idx, kv_idx):
        result = rules[0](b, h, q_idx, kv_idx)
        for rule in rules[1:]:
            result = result | rule(b, h, q_idx, kv_idx)
        return result

    return mask


def causal() -> MaskFunction:
    """Keys at or before the query."""
    return lambda b, h, q_idx, kv_idx: kv_idx <= q_idx


def padding(kind: torch.Tensor) -> MaskFunction:
    """Keys that are not padding. ``kind`` is (B, S)."""
    return lambda b, h, q_idx, kv_idx: kind[b, kv_idx] != TokenKind.PAD


def sliding_window(window: int) -> MaskFunction:
    """Keys fewer than ``window`` columns before the query, the query included; later keys pass
    too, so combine it with ``causal``."""
    return lambda b, h, q_idx, kv_idx: q_idx - kv_idx < window


def own_chunk(chunk: torch.Tensor) -> MaskFunction:
    """Keys of the query's own chunk; a gist belongs to the chunk it closes. ``chunk`` is (B, S)::

            s a b G c d H e q
        s   . . . . . . . . .
        a   . x x x . . . . .
        G   . x x x . . . . .
        e   . . . . . . . x x
        q   . . . . . . . x x

    (rows ``b``, ``c``, ``d``, ``H`` follow the same rule; combine with ``causal``.)
    """

    def mask(b, h, q_idx, kv_idx):
        return (chunk[b, q_idx] == chunk[b, kv_idx]) & (chunk[b, kv_idx] >= 0)

    return mask


def previous_chunks(chunk: torch.Tensor, count: int) -> MaskFunction:
    """Keys of the ``count`` chunks before the query's chunk (the local window)::

            s a b G c d H e q
        c   . x x x . . . . .
        e   . . . . x x x . .
        q   . . . . x x x . .
    """

    def mask(b, h, q_idx, kv_idx):
        distance = chunk[b, q_idx] - chunk[b, kv_idx]
        return (distance >= 1) & (distance <= count) & (chunk[b, kv_idx] >= 0)

    return mask


def gists(kind: torch.Tensor) -> MaskFunction:
    """Gist keys (earlier ones once combined with ``causal``)::

            s a b G c d H e q
        any . . . x . . x . .
    """
    return lambda b, h, q_idx, kv_idx: kind[b, kv_idx] == TokenKind.GIST


def sinks(kind: torch.Tensor) -> MaskFunction:
    """Sink keys::

            s a b G c d H e q
        any x . . . . . . . .
    """
    return lambda b, h, q_idx, kv_idx: kind[b, kv_idx] == TokenKind.SINK


def suffix(kind: torch.Tensor) -> MaskFunction:
    """Tail and suffix keys for tail and suffix queries (the final chunk attended densely)."""

    def is_final(k):
        return (k == TokenKind.TAIL) | (k == TokenKind.SUFFIX)

    return lambda b, h, q_idx, kv_idx: is_final(kind[b, q_idx]) & is_final(kind[b, kv_idx])


def gist_mask(batch: GistBatch) -> MaskFunction:
    """Build the training mask of one level: causal, unpadded, and one of own chunk, the P previous
    chunks, a gist or a sink. With P=1::

            s a b G c d H e q
        s   x . . . . . . . .
        a   x x . . . . . . .
        b   x x x . . . . . .
        G   x x x x . . . . .
        c   x x x x x . . . .
        d   x x x x x x . . .
        H   x x x x x x x . .
        e   x . . x x x x x .
        q   x . . x x x x x x

    Raw tokens older than the window (``a b`` for ``e`` and ``q``) are reachable only through
    their gist ``G``.
    """
    kind, chunk = batch.kind, batch.chunk
    visible = or_masks(
        own_chunk(chunk), previous_chunks(chunk, batch.spec.window_chunks), gists(kind), sinks(kind),
        suffix(kind),
    )
    return and_masks(causal(), padding(kind), visible)


def dense_prefill_mask(batch: GistBatch) -> MaskFunction:
    """The mask of ``prefill="dense"``: raw tokens attend every earlier raw token and no gist, so
    their KV equals the model's without gists; a gist reads its own chunk and the sinks, so its key
    can route::

            s a b G c d H e q
        s   x . . . . . . . .
        a   x x . . . . . . .
        b   x x x . . . . . .
        G   x x x x . . . . .
        c   x x x . x . . . .
        d   x x x . x x . . .
        H   x . . . x x x . .
        e   x x x . x x . x .
        q   x x x . x x . x x
    """
    kind, chunk = batch.kind, batch.chunk
    is_gist = gists(kind)

    def raw_to_raw(b, h, q_idx, kv_idx):
        return ~is_gist(b, h, q_idx, q_idx) & ~is_gist(b, h, q_idx, kv_idx)

    def gist_to_chunk(b, h, q_idx, kv_idx):
        return is_gist(b, h, q_idx, q_idx) & (own_chunk(chunk)(b, h, q_idx, kv_idx) | sinks(kind)(b, h, q_idx, kv_idx))

    return and_masks(causal(), padding(kind), or_masks(raw_to_raw, gist_to_chunk))


def causal_mask(batch: GistBatch) -> MaskFunction:
    """Plain causal attention over the unpadded tokens (the ``full`` method, which has no gists)."""
    return and_masks(causal(), padding(batch.kind))


def dense_mask(
    mask: MaskFunction, batch_size: int, q_len: int, kv_len: int, q_offset: int = 0, device=None
) -> torch.Tensor:
    """Evaluate ``mask`` on every (query, key) pair; returns a (B, 1, T, S) boolean tensor.

    Query ``t`` is column ``q_offset + t`` of the sequence, so a long prefill can be masked
    block by block.
    """
    b = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q_idx = torch.arange(q_offset, q_offset + q_len, device=device).view(1, 1, -1, 1)
    kv_idx = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
    return mask(b, h, q_idx, kv_idx).expand(batch_size, 1, q_len, kv_len)


def block_mask(mask: MaskFunction, batch_size: int, q_len: int, kv_len: int, block_size: int = 128, device="cpu"):
    """Build a FlexAttention ``BlockMask`` from ``mask``; fully masked blocks are skipped.

    NOTE: no gsa code path runs ``flex_attention`` yet. The block mask equals ``dense_mask``
    (tested). Even so, torch 2.13's eager CPU ``flex_attention`` gave outputs under ``gist_mask``
    that differ from SDPA on the same dense mask, while a plain causal rule matched. Check the
    outputs before relying on it.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(
        mask, B=batch_size, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device, BLOCK_SIZE=block_size
    )


# --------------------------------------------------------------------------------------------------
# Multi-level rules. The examples use chunk sizes (2, 2), S=1, P=1 and the sequence
# ``s a b G c d H K e f I g q``: level-1 gists ``G``, ``H`` and ``I`` close chunks ``a b``, ``c d``
# and ``e f``; the level-2 gist ``K`` closes the section of ``G`` and ``H``; ``I`` has no parent
# yet; ``g`` is the tail and ``q`` the suffix.


def token_sections(batch: GistBatch) -> torch.Tensor:
    """Section of every token at every level, (B, L, levels); one level is the chunk index."""
    if batch.hierarchy is not None:
        return batch.hierarchy.section
    return batch.chunk[..., None]


def level_gists(batch: GistBatch) -> MaskFunction:
    """Gist keys that the multi-level rule shows to the query, by level.

    A top-level gist is visible to every later token. A level-m gist below the top is visible to
    the tokens of its own level-(m+1) section, so to no token after the level-(m+1) gist that
    closes the section; that gist itself also reads the level-m gists of the previous section.
    A gist of level l has no section below level l, so it never reads gists below level l - 1::

            s a b G c d H K e f I g q
        s   . . . . . . . . . . . . .
        a   . . . x . . x . . . . . .
        K   . . . x . . x x . . . . .
        e   . . . . . . . x . . . . .
        I   . . . . . . . x . . x . .
        q   . . . . . . . x . . x . .

    (causality is left to ``causal``; with one level every gist is a top-level gist.)
    """
    kind, level = batch.kind, batch.level
    section = token_sections(batch)
    levels = section.shape[-1]

    def mask(b, h, q_idx, kv_idx):
        is_gist = kind[b, kv_idx] == TokenKind.GIST
        key_level = level[b, kv_idx]
        visible = is_gist & (key_level == levels)
        for m in range(1, levels):
            query_parent, key_parent = section[b, q_idx, m], section[b, kv_idx, m]
            same = query_parent == key_parent
            previous = (level[b, q_idx] == m + 1) & (query_parent - 1 == key_parent)
            visible = visible | (is_gist & (key_level == m) & (key_parent >= 0) & (same | previous))
        return visible

    return mask


def hierarchical_mask(batch: GistBatch) -> MaskFunction:
    """Build the training mask of any number of levels: causal, unpadded, and one of own chunk, the
    P previous chunks, a sink, or a gist that ``level_gists`` shows. With P=1::

            s a b G c d H K e f I g q
        s   x . . . . . . . . . . . .
        a   x x . . . . . . . . . . .
        b   x x x . . . . . . . . . .
        G   x x x x . . . . . . . . .
        c   x x x x x . . . . . . . .
        d   x x x x x x . . . . . . .
        H   x x x x x x x . . . . . .
        K   x . . x . . x x . . . . .
        e   x . . . x x x x x . . . .
        f   x . . . x x x x x x . . .
        I   x . . . x x x x x x x . .
        g   x . . . . . . x x x x x .
        q   x . . . . . . x x x x x x

    Raw tokens keep the local window and the sinks. A gist above level 1 (``K``) reads the gists
    below it and the sinks but no raw token: the sinks stay visible because models use them as
    attention sinks. The window still shows the level-1 gist of a window chunk (``H`` for ``e``)
    even after its section closed. With one level this equals ``gist_mask``.
    """
    kind, chunk = batch.kind, batch.chunk
    visible = or_masks(
        own_chunk(chunk), previous_chunks(chunk, batch.spec.window_chunks), level_gists(batch), sinks(kind),
        suffix(kind),
    )
    return and_masks(causal(), padding(kind), visible)


def hierarchical_dense_prefill_mask(batch: GistBatch) -> MaskFunction:
    """The ``prefill="dense"`` mask of any number of levels: raw tokens attend every earlier raw
    token and no gist; a level-l gist reads the raw tokens of its level-l section, itself and the
    sinks, so its key can route::

            s a b G c d H K e f I g q
        s   x . . . . . . . . . . . .
        G   x x x x . . . . . . . . .
        H   x . . . x x x . . . . . .
        K   x x x . x x . x . . . . .
        I   x . . . . . . . x x x . .
        q   x x x . x x . . x x . x x

    With one level this equals ``dense_prefill_mask``.
    """
    kind, level = batch.kind, batch.level
    section = token_sections(batch)
    is_gist = gists(kind)
    is_sink = sinks(kind)

    def raw_to_raw(b, h, q_idx, kv_idx):
        return ~is_gist(b, h, q_idx, q_idx) & ~is_gist(b, h, q_idx, kv_idx)

    def gist_to_section(b, h, q_idx, kv_idx):
        own = (level[b, q_idx] - 1).clamp(min=0)  # the query gist's level, 0-based
        query_section = section[b, q_idx, own]
        same = (section[b, kv_idx, own] == query_section) & ~is_gist(b, h, q_idx, kv_idx) & (query_section >= 0)
        return is_gist(b, h, q_idx, q_idx) & (same | is_sink(b, h, q_idx, kv_idx) | (q_idx == kv_idx))

    return and_masks(causal(), padding(kind), or_masks(raw_to_raw, gist_to_section))


def prefill_rule(batch: GistBatch, name: str) -> MaskFunction:
    """Return the context-prefill rule ``name`` (``causal``, ``gist`` or ``dense``) for the batch's levels."""
    if name == "causal":
        return causal_mask(batch)
    multi_level = batch.hierarchy is not None
    if name == "gist":
        return hierarchical_mask(batch) if multi_level else gist_mask(batch)
    return hierarchical_dense_prefill_mask(batch) if multi_level else dense_prefill_mask(batch)
