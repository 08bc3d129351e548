"""Raw-chunk KV of one layer kept off the device: in host memory or in a memory-mapped file.

The raw chunks are the largest tier and a decode step reads only the recalled ones, so they can
live in host memory (pinned when CUDA is available) or on disk. ``ChunkStore.gather`` copies only
the recalled chunks to the compute device. An optional LRU keeps recently recalled chunks on the
device. Its entries are keyed by (batch row, chunk) and hold the chunk for every KV head, so one
copy serves all heads that recall the same chunk.

Shape legend: B batch, Hk KV heads, N chunks, Cm max chunk length, D head dim, K recalled chunks
per KV head.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import weakref
from collections import OrderedDict

import numpy as np
import torch

from gsa.errors import InvalidInputError

logger = logging.getLogger(__name__)

RAW_TIERS = ("device", "host", "disk")


class ChunkStore:
    """Raw chunk keys and values (B, Hk, N, Cm, D) of one layer, stored in host memory or on disk.

    Args:
        keys, values: the prefill's chunk tier, on the compute device.
        tier: ``host`` or ``disk``.
        lru_chunks: (row, chunk) entries kept on the device; 0 disables the LRU.
        directory: folder for the disk file; ``None`` makes a temporary folder that is removed
            with the file.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, tier: str, lru_chunks: int = 0,
                 directory: str | None = None):
        if tier not in ("host", "disk"):
            raise InvalidInputError(f"invalid ChunkStore tier {tier!r}; pass host or disk, because the device "
                                    "tier stays in Tiers.chunk_k")
        self.tier = tier
        self.device = keys.device
        self.shape = tuple(keys.shape)
        self.dtype = keys.dtype
        self.lru_chunks = lru_chunks
        self.hits = 0
        self.misses = 0
        self._lru: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.path: str | None = None
        if tier == "host":
            self.keys, self.values = _to_host(keys), _to_host(values)
            self._finalizer = None
        else:
            self.keys, self.values, self.path, owned_dir = _to_disk(keys, values, directory)
            self._finalizer = weakref.finalize(self, _remove_file, self.path, owned_dir)

    @property
    def num_chunks(self) -> int:
        return self.shape[2]

    def in_place(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Return the stored (B, Hk, N, Cm, D) keys and values when a kernel on the compute device can read them where they are.

        That holds when the compute device is the CPU and the LRU is off. A disk tier's tensors are
        then views of the memory-mapped file, so a kernel that reads only the recalled chunks makes
        the operating system load only their pages. Returns None otherwise.
        """
        if self.device.type != "cpu" or self.lru_chunks > 0 or self.keys is None:
            return None
        return self.keys, self.values

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the keys and values of chunks ``index`` (B, Hk, K) as (B, Hk, K, Cm, D) on the device."""
        if self.lru_chunks > 0:
            return self._gather_cached(index)
        host_index = index.cpu()
        rows = torch.arange(self.shape[0])[:, None, None]
        heads = torch.arange(self.shape[1])[None, :, None]
        # NOTE: the gathered copy is not pinned, so the transfer below is synchronous even with
        # non_blocking=True.
        keys = self.keys[rows, heads, host_index].to(self.device, non_blocking=True)  # (B, Hk, K, Cm, D)
        values = self.values[rows, heads, host_index].to(self.device, non_blocking=True)
        return keys, values

    def _gather_cached(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Serve ``gather`` through the LRU: load the missing (row, chunk) entries in one copy."""
        batch, kv_heads, _ = index.shape
        host_index = index.cpu()
        codes = torch.arange(batch)[:, None, None] * self.num_chunks + host_index  # (B, Hk, K)
        unique, inverse = torch.unique(codes, return_inverse=True)  # (U,), (B, Hk, K)

        entries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        missing = []
        for code in unique.tolist():
            if code in self._lru:
                self._lru.move_to_end(code)
                entries[code] = self._lru[code]
            else:
                missing.append(code)
        self.hits += len(entries)
        self.misses += len(missing)
        if missing:
            self._load(missing, entries)

        # Stage the needed entries in ``unique`` order, then pick each head's chunk. (U, Hk, Cm, D)
        codes_in_order = unique.tolist()
        staged_k = torch.stack([entries[code][0] for code in codes_in_order])
        staged_v = torch.stack([entries[code][1] for code in codes_in_order])
        position = inverse.to(self.device)
        heads = torch.arange(kv_heads, device=self.device)[None, :, None]
        return staged_k[position, heads], staged_v[position, heads]  # (B, Hk, K, Cm, D)

    def _load(self, missing: list[int], entries: dict) -> None:
        """Copy the ``missing`` (row, chunk) entries to the device, add them to the LRU, evict the oldest."""
        codes = torch.tensor(missing)
        rows, chunks = codes // self.num_chunks, codes % self.num_chunks
        keys = self.keys[rows, :, chunks].to(self.device, non_blocking=True)  # (M, Hk, Cm, D)
        values = self.values[rows, :, chunks].to(self.device, non_blocking=True)
        for i, code in enumerate(missing):
            entries[code] = (keys[i], values[i])
            # A clone lets an evicted entry free its memory instead of pinning the whole batch copy.
            self._lru[code] = (keys[i].clone(), values[i].clone())
        while len(self._lru) > self.lru_chunks:
            self._lru.popitem(last=False)

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the whole tier (B, Hk, N, Cm, D) on the device, reading every chunk."""
        return self.keys.to(self.device), self.values.to(self.device)

    def resident_bytes(self) -> int:
        """Bytes held in process memory: the host copy, if any, and the LRU entries on the device."""
        lru = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self._lru.values())
        return lru + (self.stored_bytes() if self.tier == "host" else 0)

    def stored_bytes(self) -> int:
        """Bytes of the stored tier, keys and values, wherever it lives."""
        return 2 * math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    def close(self) -> None:
        """Drop the LRU and remove the disk file. A disk store cannot be read afterwards."""
        self._lru.clear()
        if self._finalizer is not None:
            self.keys = self.values = None
            self._finalizer()


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Copy ``tensor`` to host memory, pinned when CUDA is available so device copies can overlap."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=torch.cuda.is_available())
    host.copy_(tensor)
    return host


def _to_disk(keys: torch.Tensor, values: torch.Tensor, directory: str | None):
    """Write keys and values to one memory-mapped file and return tensor views of it.

    The file contains the raw bytes of keys then values in their own dtype, so bfloat16 is stored
    without conversion. Returns (keys, values, path, folder to remove or None).
    """
    owned_dir = None
    if directory is None:
        directory = owned_dir = tempfile.mkdtemp(prefix="gsa-chunks-")
    elif not os.path.isdir(directory):
        raise InvalidInputError(f"offload directory {directory!r} not found; create it or omit offload_dir")
    handle, path = tempfile.mkstemp(prefix="chunks-", suffix=".kv", dir=directory)
    os.close(handle)

    nbytes = keys.numel() * keys.element_size()
    # np.memmap cannot map an empty file, so an empty tier still gets one element per tensor.
    mapped = np.memmap(path, dtype=np.uint8, mode="w+", shape=(2 * max(nbytes, keys.element_size()),))
    flat = torch.from_numpy(mapped).view(keys.dtype)  # a view of the file, nothing is loaded
    stored_k = flat[: keys.numel()].view(keys.shape)  # (B, Hk, N, Cm, D)
    stored_v = flat[keys.numel(): 2 * keys.numel()].view(values.shape)
    stored_k.copy_(keys)
    stored_v.copy_(values)
    mapped.flush()
    logger.info("wrote %d bytes of raw chunk KV to %s", 2 * nbytes, path)
    return stored_k, stored_v, path, owned_dir


def _remove_file(path: str, owned_dir: str | None) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    if owned_dir is not None:
        shutil.rmtree(owned_dir, ignore_errors=True)
