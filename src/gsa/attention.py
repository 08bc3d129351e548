"""The ``gsa`` attention function, registered with transformers' attention registry.

Models call it in place of SDPA once ``model.set_attn_implementation("gsa")`` is set. It learns the
gist layout of the current batch in one of two ways:

- with a ``GistCache`` (inference and ``generate()``): the cache's ``update()`` for a layer
  publishes that layer's view in a context variable, and the attention call that follows in the
  same layer consumes it;
- without a cache (training): the forward pass gets ``gist_batch=`` and ``gsa_config=`` keyword
  arguments, which transformers passes through to every attention call.

Shape legend: B batch, L columns of the prompt, T queries, S keys, H query heads, Hk KV heads,
D head dim.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from gsa.config import GSAConfig
from gsa.diagnostics import RouterProbe
from gsa.errors import InvalidInputError
from gsa.layout import GistBatch, TokenKind
from gsa.masks import and_masks, causal, dense_mask, padding, prefill_rule, sliding_window
from gsa.ops.attend import keep_rows_finite
from gsa.ops.naive import naive_masked_attention
from gsa.sparse import KeyCounts, selective_attention
from gsa.tiers import Tiers, gather_columns, split_tiers

ATTENTION_NAME = "gsa"
QUERY_BLOCK = 256  # prefill query rows attended at once, so a block's mask has at most (B, 1, G * 256, S) entries

# Maps the query columns [start, stop) of a block to a (B, S) boolean of the keys its rows may see.
KeyCandidates = Callable[[int, int], torch.Tensor]


@dataclass
class LayerView:
    """Layout, settings and cache tiers that one layer's attention call reads."""

    layer_idx: int
    config: GSAConfig
    batch: GistBatch
    prefill: bool
    tiers: Tiers | None = None
    query_slot: torch.Tensor | None = None  # (B, T) recent slots of decode queries
    window: int | None = None  # sliding-window size of this layer, None for global attention
    flat_kind: torch.Tensor | None = None  # (B, S) token kinds of a sliding layer's stored keys
    on_counts: Callable[[int, KeyCounts], None] | None = None
    probe: RouterProbe | None = None


SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_windows(model_config) -> list[int | None]:
    """Return each decoder layer's sliding window, or None for global attention.

    Raises:
        InvalidInputError: a layer type other than full or sliding-window attention (linear attention,
            state-space layers), which ``gsa`` cannot serve.
    """
    num_layers = model_config.num_hidden_layers
    window = getattr(model_config, "sliding_window", None)
    types = getattr(model_config, "layer_types", None)
    if types is None:
        types = ["sliding_attention" if window else "full_attention"] * num_layers
    unsupported = sorted(set(types) - set(SUPPORTED_LAYER_TYPES))
    if unsupported:
        raise InvalidInputError(
            f"gsa supports full and sliding-window attention layers, but this model has {unsupported}; "
            "use a decoder whose layers are all attention layers"
        )
    return [window if kind == "sliding_attention" else None for kind in types[:num_layers]]


_ACTIVE_VIEW: contextvars.ContextVar[LayerView | None] = contextvars.ContextVar("gsa_layer_view", default=None)


def publish_view(view: LayerView) -> None:
    """Hand ``view`` to the next attention call of layer ``view.layer_idx``."""
    _ACTIVE_VIEW.set(view)


def gsa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention under the gist layout: (B, H, T, D), (B, Hk, S, D) -> (B, T, H, D).

    ``attention_mask`` from transformers is ignored: padding, causality and sliding windows come
    from the gist layout, which records where gists sit.
    """
    view = _take_view(module, kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    recorder = kwargs.get("gsa_recorder")  # training-time capture of queries and keys (router distillation)
    if recorder is not None:
        recorder(view.layer_idx, query, key, view.batch, scaling)
    if view.window is not None:
        out = _window_attention(query, key, value, view, scaling)
    elif view.prefill:
        out = _prefill_attention(query, key, value, view, scaling)
    else:
        out, counts = selective_attention(
            query, view.tiers, view.query_slot, view.config, view.layer_idx, scaling, view.probe
        )
        if view.on_counts is not None:
            view.on_counts(view.layer_idx, counts)
    return out.transpose(1, 2).contiguous(), None


def _take_view(module: torch.nn.Module, kwargs: dict) -> LayerView:
    layer_idx = getattr(module, "layer_idx", None)
    view = _ACTIVE_VIEW.get()
    if view is not None and view.layer_idx == layer_idx:
        _ACTIVE_VIEW.set(None)
        return view
    batch, config = kwargs.get("gist_batch"), kwargs.get("gsa_config")
    if batch is None or config is None:
        raise RuntimeError(
            "gsa attention needs a gist layout: pass a GistCache as the cache, or pass gist_batch= and "
            "gsa_config= to the forward call"
        )
    window = layer_windows(module.config)[layer_idx]
    return LayerView(layer_idx, config, batch, prefill=True, window=window)


def _prefill_attention(query, key, value, view: LayerView, scaling: float) -> torch.Tensor:
    """Context queries under the gist (or causal) mask; suffix queries with selective unfolding."""
    config, batch = view.config, view.batch
    rule = prefill_rule(batch, config.prefill_mask)  # picks the multi-level rule when the batch has levels
    candidates = prefill_candidates(batch, config.prefill_mask)
    out = masked_attention(query, key, value, rule, scaling, naive=config.impl == "naive", candidates=candidates)
    if batch.suffix_index.shape[1] == 0:
        return out

    # Suffix queries recall chunks from this layer's tiers. (B, H, Tq, D)
    tiers = view.tiers if view.tiers is not None else split_tiers(key, value, batch)
    suffix_query = gather_columns(query, batch.suffix_index)
    suffix_out, counts = selective_attention(
        suffix_query, tiers, batch.suffix_slot, config, view.layer_idx, scaling, view.probe
    )
    if view.on_counts is not None:  # the last suffix query produces the first generated token
        view.on_counts(view.layer_idx, KeyCounts(*(c[..., -1:] for c in (counts.attended, counts.raw, counts.full))))
    valid = batch.suffix_index >= 0
    rows, cols = valid.nonzero(as_tuple=True)
    out = out.clone()
    out[rows, :, batch.suffix_index[rows, cols]] = suffix_out[rows, :, cols].to(out.dtype)
    return out


def masked_attention(
    query, key, value, rule, scaling: float, naive: bool = False, q_offset: int = 0,
    candidates: KeyCandidates | None = None, gather: bool = True, block_size: int = QUERY_BLOCK,
) -> torch.Tensor:
    """Attend (B, H, T, D) queries at columns ``q_offset + t`` to (B, Hk, S, D) keys under ``rule``.

    Query rows go in blocks of ``block_size``, so no mask holds T x S at once. With ``gather``
    (the default) a block attends only to the keys that ``candidates`` allows it, a slice when
    they are nearly contiguous and a per-row gather otherwise, and ``rule`` is evaluated on those
    keys alone. ``candidates`` must allow every key that ``rule`` shows to a row of the block;
    extra keys cost time, not accuracy. None allows every key, so each block runs at full width.
    Under ``gist_candidates`` a block reads the sinks, the earlier gists and its local window, so
    gist-mask prefill skips the raw keys the mask hides instead of computing and masking them.

    ``gather=False`` (SDPA) and ``naive=True`` (Python loops) attend every block to all S keys:
    they are the reference twins. All paths give the same output on each query row with at least
    one visible key, and so the same gradients through such rows. A row with no visible key (left
    padding) gets a finite output that differs between paths, which is harmless because training
    excludes padding rows from the loss.
    """
    length = query.shape[2]
    out = torch.empty_like(query)
    for start in range(0, length, block_size):
        stop = min(start + block_size, length)
        block = query[:, :, start:stop]
        if naive or not gather:
            out[:, :, start:stop] = _attend_full_width(block, key, value, rule, scaling, q_offset + start, naive)
        else:
            allowed = candidates(q_offset + start, q_offset + stop) if candidates is not None else None
            out[:, :, start:stop] = _attend_gathered_keys(block, key, value, rule, scaling, q_offset + start, allowed)
    return out


def _attend_full_width(block, key, value, rule, scaling: float, q_start: int, naive: bool) -> torch.Tensor:
    """Attend one query block to all S keys under the dense mask of ``rule``."""
    batch, heads = block.shape[:2]
    mask = dense_mask(rule, batch, block.shape[2], key.shape[2], q_start, device=block.device)
    mask = keep_rows_finite(mask)
    if naive:
        return naive_masked_attention(block, key, value, mask, scaling)
    return F.scaled_dot_product_attention(
        block, key, value, attn_mask=mask, scale=scaling, enable_gqa=heads != key.shape[1]
    )


def _attend_gathered_keys(block, key, value, rule, scaling: float, q_start: int, allowed) -> torch.Tensor:
    """Attend one (B, H, Tb, D) query block to the keys that ``allowed`` (B, S) marks, or to all keys."""
    batch, heads, rows, dim = block.shape
    kv_heads = key.shape[1]
    if allowed is not None and allowed.shape != (batch, key.shape[2]):
        raise ValueError(
            f"key candidates have shape {tuple(allowed.shape)}, expected (B, S) = {(batch, key.shape[2])}; "
            "build the candidates from the layout of the keys being attended"
        )
    columns, valid, window = _key_columns(allowed, key.shape[2], block.device)  # (B or 1, W) each
    if window is not None:
        sub_key, sub_value = key[:, :, window], value[:, :, window]  # views, no copy
    elif columns.shape[0] == 1:
        sub_key, sub_value = key[:, :, columns[0]], value[:, :, columns[0]]
    else:
        rows_of = torch.arange(batch, device=block.device)[:, None]
        sub_key = key[rows_of, :, columns].transpose(1, 2)  # (B, W, Hk, D) -> (B, Hk, W, D)
        sub_value = value[rows_of, :, columns].transpose(1, 2)

    # The rule evaluated on the chosen columns only. (B, 1, Tb, W)
    b = torch.arange(batch, device=block.device).view(-1, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=block.device)
    q_idx = torch.arange(q_start, q_start + rows, device=block.device).view(1, 1, -1, 1)
    mask = rule(b, h, q_idx, columns[:, None, None, :]) & valid[:, None, None, :]
    mask = keep_rows_finite(mask.expand(batch, 1, rows, columns.shape[1]))

    # The G query heads of a KV head share its keys, so fold them into the rows. (B, Hk, G*Tb, D)
    group = heads // kv_heads
    grouped = block.reshape(batch, kv_heads, group * rows, dim)
    mask = mask[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, 1, group * rows, -1)
    out = F.scaled_dot_product_attention(grouped, sub_key, sub_value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, rows, dim)


def _key_columns(allowed: torch.Tensor | None, length: int, device) -> tuple[torch.Tensor, torch.Tensor, slice | None]:
    """Choose the key columns a query block attends: ``(columns, valid, window)``.

    ``columns`` and ``valid`` are (B, W) or (1, W). When the span from the first to the last
    allowed key is at most 1/8 wider than the row with the most allowed keys, every row attends
    that span and ``window`` is its slice. Otherwise ``window`` is None and each row gets its own
    allowed columns in order, padded to the same width W with column 0, which ``valid`` marks False.
    """
    if allowed is None:
        return _span_columns(0, length, device)
    width = int(allowed.sum(1).max())
    if width == 0:  # no row of the block has a visible key, so attend column 0 to keep softmax finite
        columns = torch.zeros(1, 1, dtype=torch.long, device=device)
        return columns, torch.zeros_like(columns, dtype=torch.bool), None
    used = allowed.any(0).nonzero().flatten()
    first, stop = int(used[0]), int(used[-1]) + 1
    if stop - first <= width + width // 8:
        return _span_columns(first, stop, device)
    order = torch.sort(allowed.to(torch.uint8), dim=1, descending=True, stable=True)
    valid = order.values[:, :width].bool()
    return torch.where(valid, order.indices[:, :width], 0), valid, None


def _span_columns(first: int, stop: int, device) -> tuple[torch.Tensor, torch.Tensor, slice]:
    columns = torch.arange(first, stop, device=device)[None, :]
    return columns, torch.ones_like(columns, dtype=torch.bool), slice(first, stop)


def causal_candidates(kind: torch.Tensor, window: int | None = None) -> KeyCandidates:
    """Allow a block the unpadded keys before its end. With ``window``, allow only those fewer than
    ``window`` columns before its first query. ``kind`` is (B, S)."""
    columns = torch.arange(kind.shape[1], device=kind.device)
    unpadded = kind != TokenKind.PAD

    def allowed(start: int, stop: int) -> torch.Tensor:
        keep = unpadded & (columns < stop)
        if window is not None:
            keep = keep & (columns > start - window)
        return keep

    return allowed


def gist_candidates(batch: GistBatch) -> KeyCandidates:
    """Allow a block what the one- and multi-level gist masks can show its rows: the sinks and
    gists before its end, and the raw tokens from P chunks before its lowest query chunk up to its end."""
    kind, chunk = batch.kind, batch.chunk
    columns = torch.arange(kind.shape[1], device=kind.device)
    sinks_and_gists = (kind == TokenKind.SINK) | (kind == TokenKind.GIST)
    no_chunk = torch.iinfo(chunk.dtype).max  # sinks and padding queries open no window

    def allowed(start: int, stop: int) -> torch.Tensor:
        rows = chunk[:, start:stop]  # (B, Tb)
        lowest = torch.where(rows >= 0, rows, no_chunk).amin(1)  # (B,)
        window = (chunk >= (lowest - batch.spec.window_chunks)[:, None]) & (chunk >= 0)
        return (sinks_and_gists | window) & (columns < stop)

    return allowed


def prefill_candidates(batch: GistBatch, name: str) -> KeyCandidates:
    """Return the key candidates of the context-prefill rule ``name`` (see ``prefill_rule``)."""
    if name == "gist":
        return gist_candidates(batch)
    return causal_candidates(batch.kind)  # causal and dense rules: raw tokens see every earlier raw token


def _window_attention(query, key, value, view: LayerView, scaling: float) -> torch.Tensor:
    """Attend causally to the last W stored tokens, gists included as ordinary tokens, with no
    chunk selection: a sliding-window layer keeps its own rule."""
    kind = view.flat_kind if view.flat_kind is not None else view.batch.kind
    q_offset = key.shape[2] - query.shape[2]
    rule = and_masks(causal(), padding(kind), sliding_window(view.window))
    candidates = causal_candidates(kind, window=view.window)
    return masked_attention(
        query, key, value, rule, scaling, naive=view.config.impl == "naive", q_offset=q_offset, candidates=candidates
    )


def register() -> None:
    """Register ``gsa`` in transformers' attention registry (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, gsa_attention)
