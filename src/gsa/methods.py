"""Chunk-selection methods, each a small class registered by name.

Every method scores the chunks outside the local window for each query and recalls the top ones.
All methods share the layout, the cache and the attention code, so they differ only in how they
score. Each method has a vectorised ``scores`` and a loop-by-loop ``scores_naive`` twin.

Budget: per-head methods recall k chunks per query head and merge the choices of a GQA group.
Per-group methods (``streaming``, ``random``) recall k * G chunks per KV head, the most a per-head
method can reach after the union, so every method reads at most the same number of keys.

Shape legend: B batch, T queries, H query heads, Hk KV heads, G = H / Hk, D head dim, N chunks,
Cm max chunk length. Scores are (B, Hk, G, T, N) for per-head methods and (B, Hk, 1, T, N) for
per-group ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from gsa.errors import InvalidInputError
from gsa.ops.select import grouped_products, score_gists
from gsa.tiers import Tiers

METHODS: dict[str, Method] = {}  # name -> the shared instance; methods hold no state


@dataclass
class SelectionInputs:
    """Queries and tiers of one layer call, with what each query may see."""

    query: torch.Tensor  # (B, H, T, D)
    tiers: Tiers
    recent_on: torch.Tensor  # (B, T, R)
    scaling: float
    query_slot: torch.Tensor | None = None  # (B, T) recent slots of the queries
    seed: int = 0
    layer_idx: int = 0


class Method:
    """Base class: a chunk scorer plus how it uses gists.

    Attributes:
        name: registry name.
        inserts_gists: whether the layout gets gist tokens (False only for ``full``).
        reads_gist_content: whether gists carry trained content that queries attend. Methods that
            do not (the training-free baselines) run the context with the dense prefill mask, so
            their raw KV equals the model's without gists, and never attend a gist.
        gist_router: whether scores come from gist keys; such methods skip layer 0 by default.
        scores_gist_products: whether ``scores`` is exactly the scaled dot product of each query
            head with the level-1 gist keys, which lets the C++ selection kernel compute it itself.
        per_group: one choice per KV head (k * G chunks) instead of per query head.
        selects: whether the method recalls chunks at all.
        needs_gist_prefill: run under the gist mask even when ``prefill="dense"`` is set, because
            attending the gists is the whole method (``gist-only``).
    """

    name: ClassVar[str] = ""
    inserts_gists: ClassVar[bool] = True
    reads_gist_content: ClassVar[bool] = False
    gist_router: ClassVar[bool] = False
    scores_gist_products: ClassVar[bool] = False
    per_group: ClassVar[bool] = False
    selects: ClassVar[bool] = True
    needs_gist_prefill: ClassVar[bool] = False

    def scores(self, inputs: SelectionInputs) -> torch.Tensor:
        raise NotImplementedError

    def scores_naive(self, inputs: SelectionInputs) -> torch.Tensor:
        return self.scores(inputs)


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    """Return the method registered as ``name``; every layer call shares the one instance."""
    if name not in METHODS:
        raise InvalidInputError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


@register
class GistSparse(Method):
    """Gist sparse attention: score each chunk by its gist key and recall the top-k per head."""

    name = "gsa"
    reads_gist_content = True
    gist_router = True
    scores_gist_products = True

    def scores(self, inputs):
        return score_gists(inputs.query, inputs.tiers.gist_k, inputs.scaling)

    def scores_naive(self, inputs):
        return _loop_scores(inputs.query, inputs.tiers.gist_k, inputs.scaling)


@register
class GistOnly(Method):
    """Compression without recall: every gist, no old raw chunk (as in Activation Beacon)."""

    name = "gist-only"
    reads_gist_content = True
    selects = False
    needs_gist_prefill = True


@register
class Full(Method):
    """Dense attention over the raw context, with no gist inserted."""

    name = "full"
    inserts_gists = False
    selects = False


@register
class MeanKey(Method):
    """Score each chunk by the mean of its raw keys (as in MoBA and InfLLM)."""

    name = "mean-key"

    def scores(self, inputs):
        tiers = inputs.tiers
        if "mean-key" not in tiers.summaries:
            chunk_k, _ = tiers.raw_chunks()  # (B, Hk, N, Cm, D)
            weights = tiers.chunk_valid[:, None, :, :, None].to(chunk_k.dtype)  # (B, 1, N, Cm, 1)
            tiers.summaries["mean-key"] = (chunk_k * weights).sum(3) / weights.sum(3).clamp(min=1)
        return score_gists(inputs.query, tiers.summaries["mean-key"], inputs.scaling)  # keys (B, Hk, N, D)

    def scores_naive(self, inputs):
        tiers = inputs.tiers
        chunk_k, _ = tiers.raw_chunks()
        batch, kv_heads, num_chunks, _, dim = chunk_k.shape
        mean = torch.zeros(batch, kv_heads, num_chunks, dim)
        for b in range(batch):
            for n in range(num_chunks):
                slots = [c for c in range(tiers.chunk_valid.shape[2]) if tiers.chunk_valid[b, n, c]]
                for c in slots:
                    mean[b, :, n] += chunk_k[b, :, n, c].float() / len(slots)
        return _loop_scores(inputs.query, mean, inputs.scaling)


@register
class Quest(Method):
    """Score each chunk by an upper bound of q . k over its keys, from per-dimension min and max
    keys (Quest, Tang et al. 2024): sum over d of max(q_d * min_d, q_d * max_d)."""

    name = "quest"

    def scores(self, inputs):
        tiers = inputs.tiers
        if "quest" not in tiers.summaries:
            chunk_k = tiers.raw_chunks()[0].float()  # (B, Hk, N, Cm, D)
            valid = tiers.chunk_valid[:, None, :, :, None]  # (B, 1, N, Cm, 1)
            key_max = chunk_k.masked_fill(~valid, float("-inf")).amax(3)  # (B, Hk, N, D)
            key_min = chunk_k.masked_fill(~valid, float("inf")).amin(3)
            tiers.summaries["quest"] = (key_max.nan_to_num(0.0, 0.0, 0.0), key_min.nan_to_num(0.0, 0.0, 0.0))
        key_max, key_min = tiers.summaries["quest"]
        batch, heads, length, dim = inputs.query.shape
        kv_heads = tiers.num_kv_heads
        query = inputs.query.float().view(batch, kv_heads, heads // kv_heads, length, dim)  # (B, Hk, G, T, D)
        # max(q_d * min_d, q_d * max_d) is q_d * max_d where q_d >= 0 and q_d * min_d elsewhere,
        # so the bound is two matrix products instead of a (B, Hk, G, T, N, D) intermediate.
        upper = grouped_products(query.clamp(min=0), key_max) + grouped_products(query.clamp(max=0), key_min)
        return upper * inputs.scaling  # (B, Hk, G, T, N)

    def scores_naive(self, inputs):
        tiers, query = inputs.tiers, inputs.query
        batch, heads, length, dim = query.shape
        kv_heads, num_chunks = tiers.num_kv_heads, tiers.chunk_valid.shape[1]
        group = heads // kv_heads
        chunk_k, _ = tiers.raw_chunks()  # (B, Hk, N, Cm, D)
        out = torch.zeros(batch, kv_heads, group, length, num_chunks)
        for b in range(batch):
            for h in range(heads):
                for n in range(num_chunks):
                    slots = [c for c in range(tiers.chunk_valid.shape[2]) if tiers.chunk_valid[b, n, c]]
                    if not slots:
                        continue
                    keys = torch.stack([chunk_k[b, h // group, n, c].float() for c in slots])
                    low, high = keys.min(0).values, keys.max(0).values
                    for t in range(length):
                        q = query[b, h, t].float()
                        bound = sum(max(float(q[d] * low[d]), float(q[d] * high[d])) for d in range(dim))
                        out[b, h // group, h % group, t, n] = bound * inputs.scaling
        return out


@register
class Recent(Method):
    """Recall the most recent chunks before the local window, k per head."""

    name = "recent"

    def scores(self, inputs):
        return _recency(inputs, group=inputs.query.shape[1] // inputs.tiers.num_kv_heads)

    def scores_naive(self, inputs):
        return _loop_recency(inputs, group=inputs.query.shape[1] // inputs.tiers.num_kv_heads)


@register
class Streaming(Method):
    """Sinks plus a recent window grown to the budget, as in StreamingLLM: the k * G most recent
    chunks per KV head."""

    name = "streaming"
    per_group = True

    def scores(self, inputs):
        return _recency(inputs, group=1)

    def scores_naive(self, inputs):
        return _loop_recency(inputs, group=1)


@register
class Random(Method):
    """Recall k * G uniformly random chunks per KV head (a floor for routing quality).

    Each draw is a hash of (seed, layer, KV head, query slot, chunk), so runs repeat exactly and a
    decode step draws what the parallel pass draws for the same query.
    """

    name = "random"
    per_group = True

    def scores(self, inputs):
        batch, _, length, _ = inputs.query.shape
        kv_heads, num_chunks = inputs.tiers.num_kv_heads, inputs.tiers.gist_valid.shape[1]
        device = inputs.query.device
        slot = inputs.query_slot if inputs.query_slot is not None else torch.zeros(batch, length, dtype=torch.long)
        slot = slot.to(device) - (~inputs.tiers.recent_valid).sum(-1, keepdim=True)  # independent of left padding
        head = torch.arange(kv_heads, device=device).view(1, kv_heads, 1, 1, 1)
        chunk = torch.arange(num_chunks, device=device).view(1, 1, 1, 1, num_chunks)
        key = (((inputs.seed * 1_000_003 + inputs.layer_idx) * 1_000_003 + head) * 1_000_003
               + slot.view(batch, 1, 1, length, 1)) * 1_000_003 + chunk
        return _hash_uniform(key)  # (B, Hk, 1, T, N)

    def scores_naive(self, inputs):
        batch, _, length, _ = inputs.query.shape
        kv_heads, num_chunks = inputs.tiers.num_kv_heads, inputs.tiers.gist_valid.shape[1]
        out = torch.zeros(batch, kv_heads, 1, length, num_chunks)
        for b in range(batch):
            padding = int((~inputs.tiers.recent_valid[b]).sum())
            for t in range(length):
                slot = (int(inputs.query_slot[b, t]) if inputs.query_slot is not None else 0) - padding
                for h in range(kv_heads):
                    for n in range(num_chunks):
                        key = (((inputs.seed * 1_000_003 + inputs.layer_idx) * 1_000_003 + h) * 1_000_003 + slot)
                        out[b, h, 0, t, n] = _scalar_hash_uniform(key * 1_000_003 + n)
        return out


@register
class Oracle(Method):
    """Recall the chunks that dense attention gives the most mass, per query head: an upper bound
    for routing, which reads every key."""

    name = "oracle"

    def scores(self, inputs):
        tiers, query = inputs.tiers, inputs.query
        batch, heads, length, dim = query.shape
        kv_heads = tiers.num_kv_heads
        num_chunks, chunk_len = tiers.chunk_valid.shape[1:]
        grouped = query.float().view(batch, kv_heads, heads // kv_heads, length, dim)

        # Logits over sinks, chunk tokens and visible recent tokens, softmax, mass per chunk.
        # NOTE: oracle reads every raw key each step, so with a host or disk tier it copies the whole tier.
        chunk_k, _ = tiers.raw_chunks()  # (B, Hk, N, Cm, D)
        chunk_logits = torch.einsum("bkgtd,bkncd->bkgtnc", grouped, chunk_k.float()) * inputs.scaling
        chunk_logits = chunk_logits.masked_fill(~tiers.chunk_valid[:, None, None, None], float("-inf"))
        other = torch.cat([tiers.sink_k, tiers.recent_k], dim=2).float()
        other_logits = torch.einsum("bkgtd,bksd->bkgts", grouped, other) * inputs.scaling
        other_on = torch.cat([tiers.sink_valid[:, None, :].expand(-1, length, -1), inputs.recent_on], dim=-1)
        other_logits = other_logits.masked_fill(~other_on[:, None, None], float("-inf"))
        logits = torch.cat([chunk_logits.flatten(-2), other_logits], dim=-1)
        probs = torch.softmax(logits, dim=-1)[..., : num_chunks * chunk_len]
        return probs.reshape(batch, kv_heads, heads // kv_heads, length, num_chunks, chunk_len).sum(-1)

    def scores_naive(self, inputs):
        tiers, query = inputs.tiers, inputs.query
        batch, heads, length, _ = query.shape
        group, num_chunks = heads // tiers.num_kv_heads, tiers.chunk_valid.shape[1]
        chunk_k, _ = tiers.raw_chunks()
        out = torch.zeros(batch, tiers.num_kv_heads, group, length, num_chunks)
        for b in range(batch):
            for h in range(heads):
                hk = h // group
                for t in range(length):
                    q = query[b, h, t].double()
                    # (chunk or -1, logit) for every key the query can see
                    logits = [(-1, float(q @ tiers.sink_k[b, hk, s].double()) * inputs.scaling)
                              for s in range(tiers.sink_valid.shape[1]) if tiers.sink_valid[b, s]]
                    logits += [(n, float(q @ chunk_k[b, hk, n, c].double()) * inputs.scaling)
                               for n in range(num_chunks) for c in range(tiers.chunk_valid.shape[2])
                               if tiers.chunk_valid[b, n, c]]
                    logits += [(-1, float(q @ tiers.recent_k[b, hk, r].double()) * inputs.scaling)
                               for r in range(tiers.recent_valid.shape[1]) if inputs.recent_on[b, t, r]]
                    if not logits:  # a padding query has no visible key and scores every chunk 0
                        continue
                    top = max(x for _, x in logits)
                    total = sum(math.exp(x - top) for _, x in logits)
                    for n, x in logits:
                        if n >= 0:
                            out[b, hk, h % group, t, n] += math.exp(x - top) / total
        return out


def _loop_recency(inputs: SelectionInputs, group: int) -> torch.Tensor:
    batch, _, length, _ = inputs.query.shape
    kv_heads, num_chunks = inputs.tiers.num_kv_heads, inputs.tiers.gist_valid.shape[1]
    out = torch.zeros(batch, kv_heads, group, length, num_chunks)
    for n in range(num_chunks):
        out[..., n] = float(n)  # a later chunk is more recent
    return out


def _recency(inputs: SelectionInputs, group: int) -> torch.Tensor:
    batch, _, length, _ = inputs.query.shape
    num_chunks = inputs.tiers.gist_valid.shape[1]
    order = torch.arange(num_chunks, dtype=torch.float32, device=inputs.query.device)
    return order.expand(batch, inputs.tiers.num_kv_heads, group, length, num_chunks)


def _loop_scores(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Loop twin of ``score_gists``: one dot product per (row, head, query, chunk)."""
    batch, heads, length, _ = query.shape
    kv_heads, num_chunks = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    out = torch.zeros(batch, kv_heads, group, length, num_chunks)
    for b in range(batch):
        for h in range(heads):
            for t in range(length):
                for n in range(num_chunks):
                    out[b, h // group, h % group, t, n] = float(query[b, h, t].float() @ keys[b, h // group, n].float()) * scaling
    return out


def _hash_uniform(key: torch.Tensor) -> torch.Tensor:
    """Map int64 keys to floats in [0, 1) with the splitmix64 finaliser (wrapping arithmetic)."""
    x = key.to(torch.int64)
    x = x ^ (x >> 30)
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9 as a signed 64-bit integer
    x = x ^ (x >> 27)
    x = x * -7723592293110705685  # 0x94d049bb133111eb
    x = x ^ (x >> 31)
    return (x & 0xFFFFFF).to(torch.float32) / float(1 << 24)


def _scalar_hash_uniform(key: int) -> float:
    """Loop twin of ``_hash_uniform`` for one key, emulating signed 64-bit wrapping in Python."""

    def wrap(x: int) -> int:
        return ((x + (1 << 63)) % (1 << 64)) - (1 << 63)

    x = wrap(key)
    x = wrap((x ^ (x >> 30)) * -4658895280553007687)
    x = wrap((x ^ (x >> 27)) * -7723592293110705685)
    x = x ^ (x >> 31)
    return (x & 0xFFFFFF) / float(1 << 24)
