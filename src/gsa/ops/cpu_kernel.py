"""Build and call the C++ CPU kernels of a decode step's recall (``gsa/csrc``).

- ``recall_attention.cpp`` attends the recalled chunks (``recalled_attention``). It reads them in
  place, where the PyTorch path first copies them into a buffer and then reads that copy twice.
- ``select_chunks.cpp`` picks the chunks to recall: it scores the gists (or takes any method's
  scores), keeps the top k per head and returns the sorted chunk list that the first kernel
  reads, without building (B, Hk, G, N) masks.

Both are compiled into one extension with ``torch.utils.cpp_extension`` on first
use (about 20 s on two cores) and cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``. ``python -m gsa.ops.cpu_kernel`` builds it ahead of time.

When the build fails (no C++ compiler, for example), ``cpp_available`` is false, one warning
gives the reason, and ``recalled_attention`` falls back to the PyTorch path. Set
``GSA_RECALL_KERNEL=torch`` to skip the kernel altogether.

Shape legend: B batch, Hk KV heads, G query heads per KV head, D head dim, N chunks, Cm max chunk
length, K recalled chunks per KV head.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from gsa.errors import InvalidInputError
from gsa.ops.recall import Partial

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).resolve().parent.parent / "csrc" / name
           for name in ("recall_attention.cpp", "select_chunks.cpp")]


def cpp_supports(grouped: torch.Tensor, chunk_k: torch.Tensor) -> bool:
    """Tell whether the kernel can serve these tensors: float32 on the CPU, with a contiguous chunk tier."""
    return (grouped.device.type == "cpu" and chunk_k.device.type == "cpu" and grouped.dtype == torch.float32
            and chunk_k.dtype == torch.float32 and chunk_k.is_contiguous())


def cpp_available() -> bool:
    """Tell whether the kernel is built and loaded, building it on the first call."""
    return cpp_unavailable_reason() is None


@functools.cache
def cpp_unavailable_reason() -> str | None:
    """Build and load the kernel once. Return None on success, or the reason it cannot run."""
    capability = torch.backends.cpu.get_cpu_capability()
    # at::parallel_for is an OpenMP region compiled into the extension, so without -fopenmp it runs
    # on one thread. The extension then needs libgomp.so.1, which resolves to the copy that torch
    # has already loaded, so torch and the kernel share one thread pool.
    flags = ["-O3", "-fopenmp"]
    if capability.startswith("AVX"):  # AVX2 and AVX512 machines both run AVX2 with FMA
        flags += ["-mavx2", "-mfma"]
    name = f"gsa_recall_{capability.lower()}"
    try:
        from torch.utils.cpp_extension import get_default_build_root, load

        _put_ninja_on_path()
        # One folder per Python and torch version, under the root torch.utils.cpp_extension uses.
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
        tag = f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__}"
        directory = os.path.join(root, f"{name}_{tag}")
        os.makedirs(directory, exist_ok=True)
        with _build_lock(directory):
            if not os.path.exists(os.path.join(directory, f"{name}.so")):
                logger.info("compiling the CPU recall kernel, once per machine (about 20 s)")
            load(name=name, sources=[str(source) for source in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                 build_directory=directory, is_python_module=False, verbose=False)
    except Exception as error:  # a missing compiler or failed build surfaces as several exception types
        reason = f"the CPU recall kernel failed to build ({type(error).__name__}: {error})"
        logger.warning("%s; falling back to the PyTorch path. Set GSA_RECALL_KERNEL=torch to skip the build.",
                       reason.splitlines()[0])
        return reason
    return None


@contextlib.contextmanager
def _build_lock(directory: str):
    """Hold an exclusive lock on ``directory`` for one build, and clear a lock file left by a killed one.

    torch.utils.cpp_extension guards a build with a ``lock`` file and waits, without a time limit,
    for it to disappear, so a build killed midway would block every later load. The operating
    system releases this ``fcntl`` lock when its process dies, so while it is held, a ``lock``
    file can only come from a build that no longer runs. Without ``fcntl`` (Windows) nothing is checked.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(os.path.join(directory, "gsa-build.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        stale = os.path.join(directory, "lock")
        if os.path.exists(stale):
            logger.warning("removing %s, left by an interrupted build of the CPU recall kernel", stale)
            os.remove(stale)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _put_ninja_on_path() -> None:
    """Append the folder of the ``ninja`` Python package to PATH when no ninja is on it.

    torch.utils.cpp_extension runs ``ninja`` from PATH, which lacks the virtual environment's
    ``bin`` folder when a program such as ``.venv/bin/gsa`` is started without activating it.
    """
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = os.pathsep.join(filter(None, [os.environ.get("PATH"), ninja.BIN_DIR]))


def cpp_recalled_attention(grouped, chunk_k, chunk_v, chunk_valid, index, picked, gist_k=None, gist_v=None) -> Partial:
    """Run ``recalled_attention`` with the C++ kernel (arguments as in ``gsa.ops.recall.recalled_attention``)."""
    _check_inputs(grouped, chunk_k, chunk_v, chunk_valid, index, picked, gist_k, gist_v)
    reason = cpp_unavailable_reason()
    if reason is not None:
        raise InvalidInputError(f"{reason}; use the torch recall kernel instead")
    if gist_k is None:
        gist_k = gist_v = grouped.new_empty(0)
    try:
        numer, top, total = torch.ops.gsa_cpu.recall_attention(
            grouped.contiguous(), chunk_k, chunk_v.contiguous(), chunk_valid.contiguous(), index.contiguous(),
            picked.contiguous(), gist_k.float().contiguous(), gist_v.float().contiguous())
    except RuntimeError as error:  # the operator raises only from its input checks, such as the index range
        raise InvalidInputError(f"{str(error).splitlines()[0]}; pick indices in [0, N) or mark the entry as not "
                                "picked") from error
    return Partial(numer, top, total)


def _check_inputs(grouped, chunk_k, chunk_v, chunk_valid, index, picked, gist_k, gist_v) -> None:
    """Raise ``InvalidInputError`` naming the first tensor the kernel cannot take.

    ``index`` and ``picked`` may both be None for a call that chooses the chunks itself.
    """
    if not cpp_supports(grouped, chunk_k):
        layout = "contiguous" if chunk_k.is_contiguous() else "non-contiguous"
        raise InvalidInputError(
            f"the CPU recall kernel takes float32 CPU queries and a contiguous float32 CPU chunk tier, got "
            f"{grouped.dtype} queries on {grouped.device} and {layout} {chunk_k.dtype} chunks on {chunk_k.device}; "
            "use the torch recall kernel for other tensors")
    batch, kv_heads, group, dim = grouped.shape
    num_chunks, chunk_len = chunk_k.shape[2], chunk_k.shape[3]
    expected = {
        "chunk_k": (chunk_k, (batch, kv_heads, num_chunks, chunk_len, dim), torch.float32),
        "chunk_v": (chunk_v, (batch, kv_heads, num_chunks, chunk_len, dim), torch.float32),
        "chunk_valid": (chunk_valid, (batch, num_chunks, chunk_len), torch.bool),
    }
    if index is not None:
        expected["index"] = (index, (batch, kv_heads, index.shape[-1]), torch.int64)
        expected["picked"] = (picked, tuple(index.shape), torch.bool)
    if (gist_k is None) != (gist_v is None):
        raise InvalidInputError("pass both gist_k and gist_v, or neither")
    if gist_k is not None:
        expected["gist_k"] = (gist_k, (batch, kv_heads, num_chunks, dim), gist_k.dtype)
        expected["gist_v"] = (gist_v, (batch, kv_heads, num_chunks, dim), gist_v.dtype)
    for name, (tensor, shape, dtype) in expected.items():
        if tuple(tensor.shape) != shape or tensor.dtype != dtype or tensor.device.type != "cpu":
            raise InvalidInputError(f"{name} is {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}; "
                                    f"the CPU recall kernel expects {shape} {dtype} on the CPU")


def cpp_gist_top_chunks(grouped: torch.Tensor, gist_k: torch.Tensor, gist_valid: torch.Tensor,
                        window_start: torch.Tensor, k: torch.Tensor, merge: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Score the gists and pick the chunks to recall in one C++ call.

    Args:
        grouped: (B, Hk, G, D) float32 queries, already multiplied by the attention scaling.
        gist_k: (B, Hk, N, D) float32 level-1 gist keys.
        gist_valid: (B, N) bool.
        window_start: (B,) first chunk of the local window. Valid chunks before it are candidates,
            and valid chunks from it on are always recalled.
        k: (B,) chunks each query head keeps (each KV head with ``merge="group-sum"``).
        merge: ``union`` or ``group-sum``, as in ``gsa.ops.select.select_chunks``.

    Returns:
        (B, Hk, K) int64 chosen chunks in ascending order, padded with chunk 0, and the (B, Hk, K)
        bool flags that are false on the padding.
    """
    batch, kv_heads, _, dim = grouped.shape
    _check_tensor("grouped", grouped, tuple(grouped.shape), torch.float32)
    _check_tensor("gist_k", gist_k, (batch, kv_heads, gist_k.shape[2], dim), torch.float32)
    rows = _row_arguments(gist_valid, window_start, k, batch, gist_k.shape[2])
    return _call("gist_top_chunks", grouped.contiguous(), gist_k.contiguous(), *rows,
                 _group_sum(merge))


def cpp_top_chunks(scores: torch.Tensor, gist_valid: torch.Tensor, window_start: torch.Tensor, k: torch.Tensor,
                   merge: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the chunks to recall from any method's (B, Hk, G, N) float32 scores, as ``cpp_gist_top_chunks``."""
    _check_tensor("scores", scores, tuple(scores.shape), torch.float32)
    rows = _row_arguments(gist_valid, window_start, k, scores.shape[0], scores.shape[-1])
    return _call("top_chunks", scores.contiguous(), *rows, _group_sum(merge))


def cpp_select_and_attend(grouped: torch.Tensor, gist_k: torch.Tensor, gist_v: torch.Tensor,
                          gist_valid: torch.Tensor, window_start: torch.Tensor, k: torch.Tensor, merge: str,
                          chunk_k: torch.Tensor, chunk_v: torch.Tensor, chunk_valid: torch.Tensor,
                          with_gists: bool, sinks: tuple, recent: tuple) -> tuple[torch.Tensor, torch.Tensor, Partial]:
    """Pick the chunks as ``cpp_gist_top_chunks`` does, then attend the sinks, the recent tokens and
    the recalled chunks in one softmax, in one C++ call that runs both for each (batch row, KV head).

    With ``with_gists`` each recalled chunk's gist is attended too. ``sinks`` and
    ``recent`` are (keys, values, valid) triples of (B, Hk, L, D) float32 states and (B, L) bool
    flags. Returns the (B, Hk, K) chunk list with its flags and the ``Partial`` softmax over every
    attended key.
    """
    batch, kv_heads, _, dim = grouped.shape
    _check_inputs(grouped, chunk_k, chunk_v, chunk_valid, None, None, gist_k, gist_v)
    _check_tensor("gist_k", gist_k, tuple(gist_k.shape), torch.float32)
    _check_tensor("gist_v", gist_v, tuple(gist_v.shape), torch.float32)
    dense = []
    for name, (keys, values, valid) in (("sink", sinks), ("recent", recent)):
        _check_tensor(f"{name} keys", keys, (batch, kv_heads, keys.shape[2], dim), torch.float32)
        _check_tensor(f"{name} values", values, tuple(keys.shape), torch.float32)
        _check_tensor(f"{name} flags", valid, (batch, keys.shape[2]), torch.bool)
        dense += [keys.contiguous(), values.contiguous(), valid.contiguous()]
    rows = _row_arguments(gist_valid, window_start, k, batch, chunk_k.shape[2])
    index, picked, numer, top, total = _call(
        "select_and_attend", grouped.contiguous(), gist_k.contiguous(), *rows, _group_sum(merge), chunk_k,
        chunk_v.contiguous(), chunk_valid.contiguous(), gist_v.contiguous(), with_gists, *dense)
    return index, picked, Partial(numer, top, total)


def _row_arguments(gist_valid, window_start, k, batch: int, num_chunks: int) -> tuple[torch.Tensor, ...]:
    _check_tensor("gist_valid", gist_valid, (batch, num_chunks), torch.bool)
    _check_tensor("window_start", window_start, (batch,), torch.int64)
    _check_tensor("k", k, (batch,), torch.int64)
    return gist_valid.contiguous(), window_start.contiguous(), k.contiguous()


def _group_sum(merge: str) -> bool:
    if merge not in ("union", "group-sum"):
        raise InvalidInputError(f"invalid merge {merge!r}; choose union or group-sum")
    return merge == "group-sum"


def _check_tensor(name: str, tensor: torch.Tensor, shape: tuple, dtype: torch.dtype) -> None:
    if tuple(tensor.shape) != shape or tensor.dtype != dtype or tensor.device.type != "cpu":
        raise InvalidInputError(f"{name} is {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}; "
                                f"the CPU selection kernel expects {shape} {dtype} on the CPU. Use the torch "
                                "recall kernel (or auto) for other tensors")


def _call(operator: str, *arguments):
    """Build the extension if needed, then run its ``operator``."""
    reason = cpp_unavailable_reason()
    if reason is not None:
        raise InvalidInputError(f"{reason}; use the torch recall kernel instead")
    return getattr(torch.ops.gsa_cpu, operator)(*arguments)


def main() -> int:
    """Build the kernel now, so that the first decode step does not wait for the compiler."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if cpp_unavailable_reason() is not None:  # the warning above gives the reason
        print("the CPU recall kernel is unavailable, so decoding uses the PyTorch path", file=sys.stderr)
        return 1
    print("the CPU recall kernel is built and loads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
