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
from gsa.layout import GistBatch
from gsa.masks import and_masks, causal, dense_mask, padding, prefill_rule, sliding_window
from gsa.ops.attend import keep_rows_finite
from gsa.ops.naive import naive_masked_attention
from gsa.sparse import KeyCounts, selective_attention
from gsa.tiers import Tiers, gather_columns, split_tiers

ATTENTION_NAME = "gsa"
QUERY_BLOCK = 1024  # prefill query rows masked at once, bounding the mask to (B, 1, 1024, S)


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
    out = masked_attention(query, key, value, rule, scaling, naive=config.impl == "naive")
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


def masked_attention(query, key, value, rule, scaling: float, naive: bool = False, q_offset: int = 0) -> torch.Tensor:
    """Attend (B, H, T, D) queries at columns ``q_offset + t`` to (B, Hk, S, D) keys under ``rule``.

    Query rows are masked in blocks of ``QUERY_BLOCK`` so the mask never holds T x S at once.
    NOTE: fully masked blocks are still computed, so gist-mask prefill runs about 2x slower than
    causal SDPA on the CPU; the FlexAttention ``block_mask`` of the same rule would skip them.
    """
    batch, heads, length, _ = query.shape
    out = torch.empty_like(query)
    for start in range(0, length, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, length)
        mask = dense_mask(rule, batch, stop - start, key.shape[2], q_offset + start, device=query.device)
        mask = keep_rows_finite(mask)
        block = query[:, :, start:stop]
        if naive:
            out[:, :, start:stop] = naive_masked_attention(block, key, value, mask, scaling)
        else:
            out[:, :, start:stop] = F.scaled_dot_product_attention(
                block, key, value, attn_mask=mask, scale=scaling, enable_gqa=heads != key.shape[1]
            )
    return out


def _window_attention(query, key, value, view: LayerView, scaling: float) -> torch.Tensor:
    """Attend causally to the last W stored tokens, gists included as ordinary tokens, with no
    chunk selection: a sliding-window layer keeps its own rule."""
    kind = view.flat_kind if view.flat_kind is not None else view.batch.kind
    q_offset = key.shape[2] - query.shape[2]
    rule = and_masks(causal(), padding(kind), sliding_window(view.window))
    return masked_attention(query, key, value, rule, scaling, naive=view.config.impl == "naive", q_offset=q_offset)


def register() -> None:
    """Register ``gsa`` in transformers' attention registry (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, gsa_attention)
