"""Composable attention-mask rules over a gisted sequence.

Each rule is a mask function ``(b, h, q_idx, kv_idx) -> bool tensor`` in the form FlexAttention
and transformers' masking utilities use, so one definition yields both a dense boolean mask
(``dense_mask``) and a FlexAttention ``BlockMask`` (``block_mask``). Rules index the per-token
metadata of a ``GistBatch`` (``kind``, ``chunk``) and combine with ``and_masks`` / ``or_masks``.

The examples below use the sequence ``s a b G c d H e q``: one sink ``s``, chunk 0 ``a b``
closed by gist ``G``, chunk 1 ``c d`` closed by gist ``H``, the tail ``e`` and the suffix ``q``
(C=2, S=1, P=1). Rows are queries, columns keys, ``x`` marks an allowed pair.
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
    """Build a FlexAttention ``BlockMask`` from ``mask``; fully masked blocks are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(
        mask, B=batch_size, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device, BLOCK_SIZE=block_size
    )
