"""Triton kernel for ``recalled_attention``: one decode query per row attends its recalled chunks in place.

Each program serves one (b, hk) pair and one contiguous split of its K recalled slots. It reads
every picked chunk straight from the (B, Hk, N, Cm, D) tier through ``index``, so no gather copy
is made, and it keeps an online softmax (running max, sum of exponentials and weighted values)
in float32 across chunks. Each split writes a ``Partial``, and the splits are merged in PyTorch.
The G query heads of a KV head share every key load, and G, Cm and D are padded to powers of two
with masks.

The kernel runs on CUDA tensors. With ``TRITON_INTERPRET=1`` in the environment when this module
is imported, Triton runs it in its NumPy interpreter instead, on CPU tensors too. That mode is
slow and is meant for tests.

Shape legend: B batch, Hk KV heads, G = H / Hk query heads per KV head, D head dim, N chunks,
Cm max chunk length, K recalled chunks per KV head, S splits of K.
"""

from __future__ import annotations

import functools

import torch

from gsa.errors import InvalidInputError
from gsa.ops.recall import Partial, check_picked_range

try:
    import triton
    import triton.language as tl
except ImportError as error:
    triton = None
    tl = None
    _IMPORT_ERROR: ImportError | None = error
else:
    _IMPORT_ERROR = None

CHUNK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Upper bound on BLOCK_G * BLOCK_C * BLOCK_D, the number of query-key products of one chunk tile,
# which is the largest block a program keeps at once. NOTE: an estimate of what fits in registers,
# not tuned on a GPU.
MAX_TILE = 8192
# Fewest recalled slots per split, so that a split's launch and merge cost stays small next to its
# chunk reads. NOTE: an estimate, not tuned on a GPU.
MIN_SLOTS_PER_SPLIT = 4
PROGRAMS_PER_SM = 4


if triton is not None:

    @triton.jit
    def _attend_tile(queries, keys, values, visible, top, total, numer):
        """Fold one tile of keys (BLOCK_C, BLOCK_D) into the running softmax of every query row."""
        logits = tl.sum(queries[:, None, :] * keys[None, :, :], axis=2)  # (BLOCK_G, BLOCK_C)
        logits = tl.where(visible[None, :], logits, float("-inf"))
        new_top = tl.maximum(top, tl.max(logits, axis=1))  # (BLOCK_G,)
        # A row that has seen no visible key keeps top = -inf. Shifting it by 0 keeps exp() at 0
        # instead of exp(-inf - -inf) = NaN.
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)
        rescale = tl.exp(top - shift)
        weights = tl.exp(logits - shift[:, None])  # (BLOCK_G, BLOCK_C), 0 where hidden
        total = total * rescale + tl.sum(weights, axis=1)
        numer = numer * rescale[:, None] + tl.sum(weights[:, :, None] * values[None, :, :], axis=1)
        return new_top, total, numer

    @triton.jit
    def _attend_key(queries, key, value, top, total, numer):
        """Fold one always-visible key (BLOCK_D,), a chunk's gist, into the running softmax."""
        logit = tl.sum(queries * key[None, :], axis=1)  # (BLOCK_G,)
        new_top = tl.maximum(top, logit)
        rescale = tl.exp(top - new_top)
        weight = tl.exp(logit - new_top)
        total = total * rescale + weight
        numer = numer * rescale[:, None] + weight[:, None] * value[None, :]
        return new_top, total, numer

    # NOTE: checked only in Triton's interpreter on the CPU. It has not been compiled or timed on a GPU.
    @triton.jit
    def _recall_kernel(
        query_ptr, key_ptr, value_ptr, valid_ptr, index_ptr, picked_ptr, gist_key_ptr, gist_value_ptr,
        numer_ptr, top_ptr, total_ptr,
        query_sb, query_sh, query_sg, query_sd,
        key_sb, key_sh, key_sn, key_sc, key_sd,
        value_sb, value_sh, value_sn, value_sc, value_sd,
        valid_sb, valid_sn, valid_sc,
        index_sb, index_sh, index_sk,
        picked_sb, picked_sh, picked_sk,
        gist_key_sb, gist_key_sh, gist_key_sn, gist_key_sd,
        gist_value_sb, gist_value_sh, gist_value_sn, gist_value_sd,
        kv_heads, group, dim, num_chunks, chunk_len, num_slots, slots_per_split, num_splits,
        HAS_GIST: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0)  # b * Hk + hk
        split = tl.program_id(1)
        b = (row // kv_heads).to(tl.int64)
        hk = (row % kv_heads).to(tl.int64)

        heads = tl.arange(0, BLOCK_G)
        dims = tl.arange(0, BLOCK_D)
        cols = tl.arange(0, BLOCK_C)
        head_on = heads < group
        dim_on = dims < dim

        query_offsets = b * query_sb + hk * query_sh + heads[:, None] * query_sg + dims[None, :] * query_sd
        queries = tl.load(query_ptr + query_offsets, mask=head_on[:, None] & dim_on[None, :], other=0.0)
        queries = queries.to(tl.float32)  # (BLOCK_G, BLOCK_D), zero in padded rows and columns

        top = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_G,), tl.float32)
        numer = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)

        first = split * slots_per_split
        last = tl.minimum(first + slots_per_split, num_slots)
        for slot in range(first, last):
            chunk = tl.load(index_ptr + b * index_sb + hk * index_sh + slot * index_sk)
            chosen = tl.load(picked_ptr + b * picked_sb + hk * picked_sh + slot * picked_sk) != 0
            # The wrapper rejects picked ids outside [0, N) unless check_index is False, so this test
            # only keeps the reads in bounds.
            attended = chosen & (chunk >= 0) & (chunk < num_chunks)
            if attended:
                key_base = key_ptr + b * key_sb + hk * key_sh + chunk * key_sn
                value_base = value_ptr + b * value_sb + hk * value_sh + chunk * value_sn
                valid_base = valid_ptr + b * valid_sb + chunk * valid_sn
                for start in range(0, chunk_len, BLOCK_C):
                    positions = start + cols
                    visible = tl.load(valid_base + positions * valid_sc, mask=positions < chunk_len, other=0) != 0
                    tile_on = visible[:, None] & dim_on[None, :]  # (BLOCK_C, BLOCK_D)
                    keys = tl.load(key_base + positions[:, None] * key_sc + dims[None, :] * key_sd,
                                   mask=tile_on, other=0.0).to(tl.float32)
                    values = tl.load(value_base + positions[:, None] * value_sc + dims[None, :] * value_sd,
                                     mask=tile_on, other=0.0).to(tl.float32)
                    top, total, numer = _attend_tile(queries, keys, values, visible, top, total, numer)
                if HAS_GIST:
                    gist_key = tl.load(
                        gist_key_ptr + b * gist_key_sb + hk * gist_key_sh + chunk * gist_key_sn + dims * gist_key_sd,
                        mask=dim_on, other=0.0).to(tl.float32)
                    gist_value = tl.load(
                        gist_value_ptr + b * gist_value_sb + hk * gist_value_sh + chunk * gist_value_sn
                        + dims * gist_value_sd,
                        mask=dim_on, other=0.0).to(tl.float32)
                    top, total, numer = _attend_key(queries, gist_key, gist_value, top, total, numer)

        # Outputs are contiguous: numer (B * Hk, S, G, D), top and total (B * Hk, S, G).
        out_row = row.to(tl.int64) * num_splits + split
        stat_offsets = out_row * group + heads
        tl.store(top_ptr + stat_offsets, top, mask=head_on)
        tl.store(total_ptr + stat_offsets, total, mask=head_on)
        numer_offsets = (out_row * group + heads[:, None]) * dim + dims[None, :]
        tl.store(numer_ptr + numer_offsets, numer, mask=head_on[:, None] & dim_on[None, :])


def triton_unavailable_reason() -> str | None:
    """Return why the Triton kernel cannot run here, or None when it can."""
    if _IMPORT_ERROR is not None:
        return (f"the triton recall kernel needs the triton package, which failed to import ({_IMPORT_ERROR}). "
                "Install it with `python -m pip install triton`.")
    if _interpreting():
        return None
    if not torch.cuda.is_available():
        return ("the triton recall kernel needs a CUDA device, and torch finds none. Run on a GPU, "
                "or set TRITON_INTERPRET=1 before importing gsa.ops.triton_recall to run it on the CPU (slow).")
    return None


def triton_available() -> bool:
    """Return True when ``triton_recalled_attention`` can run here."""
    return triton_unavailable_reason() is None


def triton_recalled_attention(
    grouped: torch.Tensor, chunk_k: torch.Tensor, chunk_v: torch.Tensor, chunk_valid: torch.Tensor,
    index: torch.Tensor, picked: torch.Tensor, gist_k: torch.Tensor | None = None,
    gist_v: torch.Tensor | None = None, *, splits: int | None = None, check_index: bool = True,
) -> Partial:
    """``recalled_attention`` with a Triton kernel that reads the recalled chunks in place.

    The arguments and the result follow ``gsa.ops.recall.recalled_attention``. The chunk tier and
    gists may be stored in float32, float16 or bfloat16, and the kernel accumulates in float32.

    Args:
        splits: number of programs that share the K slots of one (b, hk); None picks enough
            programs to fill the GPU.
        check_index: reject picked ids outside [0, N). The check synchronises with the GPU once
            per call. With False, the kernel skips such entries silently.

    Raises:
        InvalidInputError: Triton cannot run here, or the tensors do not fit the contract.
    """
    reason = triton_unavailable_reason()
    if reason is not None:
        raise InvalidInputError(reason)
    _check_inputs(grouped, chunk_k, chunk_v, chunk_valid, index, picked, gist_k, gist_v)
    if check_index:
        check_picked_range(index, picked, chunk_k.shape[2])

    batch, kv_heads, group, dim = grouped.shape
    num_chunks, chunk_len = chunk_k.shape[2], chunk_k.shape[3]
    num_slots = index.shape[2]
    num_splits = _split_count(batch * kv_heads, num_slots, grouped.device, splits)
    slots_per_split = triton.cdiv(num_slots, num_splits) if num_slots else 0

    numer = torch.empty(batch, kv_heads, num_splits, group, dim, dtype=torch.float32, device=grouped.device)
    top = torch.empty(batch, kv_heads, num_splits, group, dtype=torch.float32, device=grouped.device)
    total = torch.empty_like(top)
    if numer.numel() == 0:  # no (b, hk, g) row, or D = 0: nothing to launch
        return Partial(numer[:, :, 0], top[:, :, 0].fill_(float("-inf")), total[:, :, 0].zero_())

    has_gist = gist_k is not None
    gist_key = gist_k if has_gist else grouped  # placeholders, never read when HAS_GIST is false
    gist_value = gist_v if has_gist else grouped
    gist_key_strides = gist_key.stride() if has_gist else (0, 0, 0, 0)
    gist_value_strides = gist_value.stride() if has_gist else (0, 0, 0, 0)
    block_g, block_c, block_d = _block_sizes(group, chunk_len, dim)

    _recall_kernel[(batch * kv_heads, num_splits)](
        grouped, chunk_k, chunk_v, chunk_valid, index, picked, gist_key, gist_value,
        numer, top, total,
        *grouped.stride(), *chunk_k.stride(), *chunk_v.stride(), *chunk_valid.stride(),
        *index.stride(), *picked.stride(), *gist_key_strides, *gist_value_strides,
        kv_heads, group, dim, num_chunks, chunk_len, num_slots, slots_per_split, num_splits,
        HAS_GIST=has_gist, BLOCK_G=block_g, BLOCK_C=block_c, BLOCK_D=block_d,
    )
    return _merge_splits(numer, top, total)


def _interpreting() -> bool:
    """Return True when the kernel was decorated in Triton's interpreter mode (``TRITON_INTERPRET``)."""
    # In triton 3.x, triton.jit returns an InterpretedFunction instead of a JITFunction in that mode.
    return type(_recall_kernel).__name__ == "InterpretedFunction"


def _check_inputs(grouped, chunk_k, chunk_v, chunk_valid, index, picked, gist_k, gist_v) -> None:
    """Raise ``InvalidInputError`` naming the first tensor whose shape, dtype or device breaks the contract."""
    if grouped.dim() != 4 or grouped.dtype != torch.float32:
        raise InvalidInputError(
            f"grouped must be a (B, Hk, G, D) float32 tensor, got {tuple(grouped.shape)} {grouped.dtype}. "
            "Pass the scaled queries reshaped per KV head and cast with .float().")
    batch, kv_heads, _, dim = grouped.shape
    _check_tier(chunk_k, chunk_v, chunk_valid, (batch, kv_heads, dim))

    if index.dim() != 3 or tuple(index.shape[:2]) != (batch, kv_heads) or index.dtype != torch.int64:
        raise InvalidInputError(
            f"index must be a (B, Hk, K) = ({batch}, {kv_heads}, K) int64 tensor, "
            f"got {tuple(index.shape)} {index.dtype}. Convert it with .long().")
    if picked.shape != index.shape or picked.dtype != torch.bool:
        raise InvalidInputError(
            f"picked must be a bool tensor of the shape of index {tuple(index.shape)}, "
            f"got {tuple(picked.shape)} {picked.dtype}.")

    _check_gists(gist_k, gist_v, (batch, kv_heads, chunk_k.shape[2], dim))
    _check_devices(grouped, chunk_k, chunk_v, chunk_valid, index, picked, gist_k, gist_v)


def _check_tier(chunk_k, chunk_v, chunk_valid, leading: tuple[int, int, int]) -> None:
    """Raise ``InvalidInputError`` unless the chunk tier is (B, Hk, N, Cm, D) with a (B, N, Cm) bool mask."""
    batch, kv_heads, dim = leading
    if chunk_k.dim() != 5 or tuple(chunk_k.shape[:2]) != (batch, kv_heads) or chunk_k.shape[4] != dim:
        raise InvalidInputError(
            f"chunk_k must be (B, Hk, N, Cm, D) = ({batch}, {kv_heads}, N, Cm, {dim}) to match grouped, "
            f"got {tuple(chunk_k.shape)}.")
    if chunk_v.shape != chunk_k.shape:
        raise InvalidInputError(
            f"chunk_v must have the shape of chunk_k {tuple(chunk_k.shape)}, got {tuple(chunk_v.shape)}.")
    for name, chunks in (("chunk_k", chunk_k), ("chunk_v", chunk_v)):
        if chunks.dtype not in CHUNK_DTYPES:
            raise InvalidInputError(
                f"{name} has the unsupported dtype {chunks.dtype}. Store the chunk tier as float32, float16 "
                "or bfloat16.")

    num_chunks, chunk_len = chunk_k.shape[2], chunk_k.shape[3]
    if chunk_valid.shape != (batch, num_chunks, chunk_len) or chunk_valid.dtype != torch.bool:
        raise InvalidInputError(
            f"chunk_valid must be a (B, N, Cm) = ({batch}, {num_chunks}, {chunk_len}) bool tensor, "
            f"got {tuple(chunk_valid.shape)} {chunk_valid.dtype}.")


def _check_gists(gist_k, gist_v, shape: tuple[int, ...]) -> None:
    """Raise ``InvalidInputError`` unless the gists are both absent or both (B, Hk, N, D) floats."""
    if (gist_k is None) != (gist_v is None):
        raise InvalidInputError("gist_k and gist_v must be given together. Pass both or neither.")
    if gist_k is None:
        return
    for name, gists in (("gist_k", gist_k), ("gist_v", gist_v)):
        if tuple(gists.shape) != shape:
            raise InvalidInputError(
                f"{name} must be (B, Hk, N, D) = {shape} to match grouped and chunk_k, got {tuple(gists.shape)}.")
        if gists.dtype not in CHUNK_DTYPES:
            raise InvalidInputError(
                f"{name} has the unsupported dtype {gists.dtype}. Store gists as float32, float16 or bfloat16.")


def _check_devices(*tensors) -> None:
    """Raise ``InvalidInputError`` unless all tensors share one device that the kernel can run on."""
    device = tensors[0].device
    names = ("grouped", "chunk_k", "chunk_v", "chunk_valid", "index", "picked", "gist_k", "gist_v")
    for name, tensor in zip(names, tensors):
        if tensor is not None and tensor.device != device:
            raise InvalidInputError(
                f"{name} is on {tensor.device} but grouped is on {device}. Move all inputs to one device.")
    if device.type != "cuda" and not _interpreting():
        raise InvalidInputError(
            f"the triton recall kernel runs on CUDA tensors, got tensors on {device}. Move them to a GPU "
            "or use the torch or cpp recall kernel.")


def _split_count(rows: int, num_slots: int, device: torch.device, requested: int | None) -> int:
    """Return how many programs share the K slots of each (b, hk), with no empty split."""
    if requested is not None:
        if requested < 1:
            raise InvalidInputError(f"splits must be a positive number of programs per (b, hk), got {requested}")
        count = requested
    elif device.type == "cuda":
        target = PROGRAMS_PER_SM * _multiprocessor_count(device)
        count = min(triton.cdiv(target, max(rows, 1)), triton.cdiv(num_slots, MIN_SLOTS_PER_SPLIT))
    else:
        count = 1  # The interpreter runs programs one after another, so splitting only adds work.
    count = max(1, min(count, num_slots))
    # Rounding the slots per split up can leave trailing splits empty, so those are dropped.
    return triton.cdiv(num_slots, triton.cdiv(num_slots, count)) if num_slots else 1


@functools.cache
def _multiprocessor_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _block_sizes(group: int, chunk_len: int, dim: int) -> tuple[int, int, int]:
    """Return power-of-two tiles (BLOCK_G, BLOCK_C, BLOCK_D) that cover G and D, with at most ``MAX_TILE`` products."""
    block_g = triton.next_power_of_2(max(group, 1))
    block_d = triton.next_power_of_2(max(dim, 1))
    room = max(1, MAX_TILE // (block_g * block_d))
    block_c = min(triton.next_power_of_2(max(chunk_len, 1)), 1 << (room.bit_length() - 1))
    return block_g, block_c, block_d


def _merge_splits(numer: torch.Tensor, top: torch.Tensor, total: torch.Tensor) -> Partial:
    """Merge per-split partials (B, Hk, S, G[, D]) into one ``Partial`` over all K slots."""
    if numer.shape[2] == 1:
        return Partial(numer[:, :, 0], top[:, :, 0], total[:, :, 0])
    merged_top = top.amax(dim=2)  # (B, Hk, G)
    # exp(-inf - -inf) is NaN where every split of a row is empty. Such splits contribute nothing.
    scale = torch.exp(top - merged_top[:, :, None]).nan_to_num_(0.0)  # (B, Hk, S, G)
    merged_total = (total * scale).sum(dim=2)
    merged_numer = (numer * scale[..., None]).sum(dim=2)  # (B, Hk, G, D)
    return Partial(merged_numer, merged_top, merged_total)
