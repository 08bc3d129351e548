"""A transformers ``Cache`` that stores each layer's KV by tier and feeds the ``gsa`` attention.

Per global-attention layer, ``GistLayer`` keeps the sinks, the raw chunks (B, Hk, N, Cm, D), the
gists (B, Hk, N, D) and the recent tokens (context tail, suffix and everything generated). The raw
KV of every chunk is kept so that any chunk can be recalled later, on the device or, with
``GSAConfig.raw_tier``, in host memory or a memory-mapped file. Sliding-window layers keep a flat KV
and their own window rule.

The first ``update()`` of a layer receives the whole gisted prompt and splits it into tiers; later
updates append decode tokens to the recent tier. Each update publishes the layer's view for the
attention call that follows it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from gsa.attention import LayerView, layer_windows, publish_view
from gsa.chunk_store import ChunkStore
from gsa.config import GSAConfig
from gsa.layout import GistBatch, TokenKind
from gsa.sparse import KeyCounts
from gsa.tiers import Tiers, split_tiers

@dataclass
class DecodeStats:
    """Keys read per generated token, summed over global-attention layers, KV heads and steps.

    Each step is the query that produces one token: the last prompt token, then each decode token.
    """

    steps: int = 0
    events: int = 0
    attended: int = 0
    raw: int = 0
    full: int = 0
    per_layer_attended: dict[int, int] = field(default_factory=dict)

    def add(self, layer_idx: int, counts: KeyCounts) -> None:
        self.events += counts.attended.numel()
        self.attended += int(counts.attended.sum())
        self.raw += int(counts.raw.sum())
        self.full += int(counts.full.sum())
        self.per_layer_attended[layer_idx] = self.per_layer_attended.get(layer_idx, 0) + int(counts.attended.sum())

    @property
    def mean_attended_fraction(self) -> float:
        return self.attended / self.full if self.full else float("nan")

    @property
    def mean_raw_per_step(self) -> float:
        """Raw tokens attended per decode step, layer and KV head, averaged."""
        return self.raw / self.events if self.events else float("nan")


class GistLayer(CacheLayerMixin):
    """One layer of a ``GistCache``."""

    is_sliding = False
    is_compileable = False

    def __init__(self, layer_idx: int, owner: GistCache, window: int | None):
        super().__init__()
        self.layer_idx = layer_idx
        self.owner = owner
        self.window = window
        self.tiers: Tiers | None = None
        self.keys: torch.Tensor | None = None  # flat KV of a sliding-window layer
        self.values: torch.Tensor | None = None
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store new (B, Hk, T, D) states and publish this layer's view.

        Returns the new states unchanged, except in a sliding-window layer, which returns its flat KV.
        """
        owner, prefill = self.owner, not self.is_initialized
        if prefill:
            self.lazy_initialization(key_states, value_states)
        owner.check_batch(key_states.shape[0])
        self.length += key_states.shape[2]
        view = LayerView(self.layer_idx, owner.config, owner.batch, prefill=prefill, window=self.window,
                         probe=owner.probe)
        if self.window is not None:
            key_states, value_states = self._update_flat(key_states, value_states, view)
        elif prefill:
            self.tiers = split_tiers(key_states, value_states, owner.batch)
            owner.offload_chunks(self.tiers)
            view.tiers, view.on_counts = self.tiers, owner.stats.add
        else:
            start = self.tiers.recent_valid.shape[1]
            self.tiers.append_recent(key_states, value_states)
            slots = torch.arange(start, start + key_states.shape[2], device=key_states.device)
            view.tiers, view.query_slot = self.tiers, slots[None].expand(key_states.shape[0], -1)
            view.on_counts = owner.stats.add
        publish_view(view)
        owner.report_layer(self.layer_idx, prefill)
        return key_states, value_states

    def _update_flat(self, key_states, value_states, view: LayerView):
        if self.keys is None:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=2)
            self.values = torch.cat([self.values, value_states], dim=2)
        view.flat_kind = self.owner.flat_kind(self.keys.shape[2])
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.tiers, self.keys, self.values, self.length = None, None, None, 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("GistCache does not support beam search; use greedy decoding or sampling")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("GistCache cannot be cropped (assisted decoding is not supported)")

    def copy_for(self, owner: GistCache) -> GistLayer:
        """Copy this layer for ``owner``; tensors are shared until one copy appends."""
        twin = GistLayer(self.layer_idx, owner, self.window)
        twin.__dict__.update({k: v for k, v in self.__dict__.items() if k != "owner"})
        if self.tiers is not None:
            twin.tiers = dataclasses.replace(self.tiers)
        return twin

    def nbytes(self) -> int:
        """Bytes of KV stored by this layer, wherever its raw chunks live."""
        if self.tiers is not None:
            return self.tiers.nbytes()
        return self._flat_nbytes()

    def resident_bytes(self) -> int:
        """Bytes of KV held in process memory (device and host), without a disk tier's file."""
        if self.tiers is not None:
            return self.tiers.resident_nbytes()
        return self._flat_nbytes()

    def _flat_nbytes(self) -> int:
        flat = (self.keys, self.values)
        return sum(t.numel() * t.element_size() for t in flat if t is not None)


class GistCache(Cache):
    """KV cache for a batch gisted by ``gsa.layout``; pass it to ``model.generate(cache=...)``.

    Args:
        model_config: the model's ``PretrainedConfig`` (layer count, sliding windows).
        batch: the gisted prompt batch the cache will be filled with.
        config: attention settings (method, top-k, merge, kernel).
        on_layer: optional callback ``(layer_idx, prefill)`` after each layer's update, for
            progress bars.
        probe: optional ``RouterProbe`` that collects routing diagnostics.
    """

    def __init__(self, model_config, batch: GistBatch, config: GSAConfig, on_layer=None, probe=None):
        windows = layer_windows(model_config)
        super().__init__(layers=[GistLayer(i, self, w) for i, w in enumerate(windows)])
        self.batch = batch
        self.config = config
        self.stats = DecodeStats()
        self.on_layer = on_layer
        self.probe = probe
        self.owns_stores = True  # False in a fork, which shares its source's raw-chunk stores

    def check_batch(self, size: int) -> None:
        if size != self.batch.batch_size:
            raise ValueError(
                f"GistCache was built for a batch of {self.batch.batch_size} rows but got {size}; "
                "num_return_sequences > 1 and beam search are not supported"
            )

    def flat_kind(self, length: int) -> torch.Tensor:
        """Token kinds of the first ``length`` stored columns: the prompt, then generated tokens."""
        kind = self.batch.kind
        extra = length - kind.shape[1]
        if extra > 0:
            generated = torch.full((kind.shape[0], extra), int(TokenKind.SUFFIX), dtype=kind.dtype, device=kind.device)
            kind = torch.cat([kind, generated], dim=1)
        return kind[:, :length]

    def report_layer(self, layer_idx: int, prefill: bool) -> None:
        if layer_idx == 0:
            self.stats.steps += 1
        if self.on_layer is not None:
            self.on_layer(layer_idx, prefill)

    def fork(self) -> GistCache:
        """Return an independent copy, so a prefilled context can serve several suffixes."""
        twin = GistCache.__new__(GistCache)
        twin.__dict__.update(self.__dict__)
        twin.stats, twin.probe, twin.owns_stores = DecodeStats(), None, False
        twin.layers = [layer.copy_for(twin) for layer in self.layers]
        return twin

    def offload_chunks(self, tiers: Tiers) -> None:
        """Move the raw chunks of freshly split ``tiers`` to the configured host or disk tier."""
        config = self.config
        if config.raw_tier == "device":
            return
        store = ChunkStore(tiers.chunk_k, tiers.chunk_v, config.raw_tier, config.lru_chunks, config.offload_dir)
        tiers.offload(store)

    def nbytes(self) -> int:
        """Bytes of KV stored by every layer, the same as ``stored_bytes``."""
        return self.stored_bytes()

    def stored_bytes(self) -> int:
        """Bytes of KV stored by every layer, wherever it lives (device, host or disk)."""
        return sum(layer.nbytes() for layer in self.layers)

    def resident_bytes(self) -> int:
        """Bytes of KV held in device and host memory, without the disk tier's files."""
        return sum(layer.resident_bytes() for layer in self.layers)

    def chunk_stores(self) -> list[ChunkStore]:
        """Return the host or disk stores of the raw chunks, one per prefilled global-attention layer."""
        return [layer.tiers.store for layer in self.layers if layer.tiers is not None and layer.tiers.store is not None]

    def close(self) -> None:
        """Release the raw-chunk stores and remove their disk files; the cache is empty afterwards.

        A cache made by ``fork`` shares the stores of its source, so closing a fork only drops its
        own layers, and closing the source also ends every fork's access to the raw chunks.
        """
        if self.owns_stores:
            for store in self.chunk_stores():
                store.close()
        for layer in self.layers:
            layer.reset()
