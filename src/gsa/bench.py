"""Shared pieces of the speed benchmarks (``gsa bench decode`` and ``gsa bench prefill``).

The decode benchmark lives in ``gsa.bench_decode`` and the prefill benchmark in
``gsa.bench_prefill``. This module parses size lists, times calls, measures the machine's copy
bandwidth and matrix-product compute rate, formats tables and draws log-log plots.

Shape legend: B batch, T queries, S keys, H query heads, Hk KV heads, G = H / Hk, D head dim,
C chunk size (the ratio), N chunks, K recalled chunks.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gsa.errors import InvalidInputError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIZE_SUFFIXES = {"": 1, "K": 1024, "M": 1024 ** 2}
COPY_REPEATS = 7
COMPUTE_KEYS = 512  # keys per KV head in the compute benchmark
COMPUTE_FLOPS_PER_CALL = 2e8  # work per timed call of the compute benchmark, a few ms on a CPU core


def parse_sizes(text: str, option: str) -> list[int]:
    """Parse a comma-separated list of positive sizes; ``K`` and ``M`` multiply by 1024 and 1024²."""
    sizes = []
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)([KkMm]?)", part)
        if match is None or int(match.group(1)) == 0:
            raise InvalidInputError(
                f"{option} has an invalid size {part!r}; pass positive integers such as 2048,8K,128K,1M"
            )
        sizes.append(int(match.group(1)) * SIZE_SUFFIXES[match.group(2).upper()])
    return list(dict.fromkeys(sizes))


def parse_names(text: str, option: str) -> list[str]:
    """Parse a comma-separated list of names, dropping blanks and repeats."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise InvalidInputError(f"{option} is empty; pass a comma-separated list")
    return names


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def median_seconds(call: Callable[[], object], repeats: int, warmup: int,
                   before: Callable[[], object] | None = None) -> float:
    """Run ``call`` ``warmup`` times untimed, then ``repeats`` times; return the median in seconds.

    ``before`` runs ahead of every call, outside the timed region (for example to fork a cache).
    """
    times = []
    for index in range(warmup + repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        call()
        elapsed = time.perf_counter() - start
        if index >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def copy_bandwidth_gbps(megabytes: int = 256, repeats: int = COPY_REPEATS) -> float:
    """Measure memory bandwidth by copying a ``megabytes`` MiB tensor into another.

    Returns the median over ``repeats`` copies (after one warm-up) in GB/s (10⁹ bytes per second),
    counting both the bytes read and the bytes written.
    """
    numel = megabytes * 2 ** 20 // 4
    source = torch.rand(numel, dtype=torch.float32)
    target = torch.empty_like(source)
    seconds = median_seconds(lambda: target.copy_(source), repeats, warmup=1)
    return 2 * numel * 4 / seconds / 1e9


def matmul_gflops(kv_heads: int, group: int, dim: int, keys: int = COMPUTE_KEYS, repeats: int = COPY_REPEATS) -> float:
    """Measure the float32 compute rate of a decode step's two matrix products, in GFLOP/s.

    Per KV head it runs keys (L, D) @ queries^T (D, G) and weights (G, L) @ values (L, D), the
    shapes of ``attend_gathered`` with L = ``keys``. The operands are small enough to stay in
    cache (2 MiB each for Hk = 8, D = 128), so the rate is what the arithmetic allows, not memory.
    Each timed call repeats the pair enough times to take a few ms. Returns the median rate.
    """
    generator = torch.Generator().manual_seed(0)
    key_states = torch.randn(kv_heads, keys, dim, generator=generator)
    value_states = torch.randn(kv_heads, keys, dim, generator=generator)
    queries = torch.randn(kv_heads, group, dim, generator=generator)
    weights = torch.randn(kv_heads, group, keys, generator=generator)
    flops_per_pair = 2 * 2 * kv_heads * group * keys * dim  # a multiply and an add per term, two products
    pairs = max(1, int(COMPUTE_FLOPS_PER_CALL // flops_per_pair))

    def products():
        for _ in range(pairs):
            torch.matmul(key_states, queries.transpose(-1, -2))
            torch.matmul(weights, value_states)

    seconds = median_seconds(products, repeats, warmup=1)
    return pairs * flops_per_pair / seconds / 1e9


def size_label(size: int) -> str:
    """Write ``size`` as 128K or 1M when it is a whole multiple of 1024 or 1024², else as digits."""
    for suffix in ("M", "K"):
        if size % SIZE_SUFFIXES[suffix] == 0:
            return f"{size // SIZE_SUFFIXES[suffix]}{suffix}"
    return str(size)


def bound_ms(num_bytes: float, bandwidth_gbps: float) -> float:
    """Time in ms to stream ``num_bytes`` once at ``bandwidth_gbps``: a lower bound on a step that reads them."""
    return num_bytes / (bandwidth_gbps * 1e9) * 1e3


def roofline_ms(num_bytes: float, flops: float, bandwidth_gbps: float, compute_gflops: float) -> float:
    """Lower bound in ms on a step that reads ``num_bytes`` and performs ``flops``: the larger of the
    time to stream the bytes and the time to do the arithmetic at ``compute_gflops``."""
    return max(bound_ms(num_bytes, bandwidth_gbps), flops / (compute_gflops * 1e9) * 1e3)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Format ``rows`` as an aligned text table.

    ``columns`` lists (key, header, format spec) triples. A missing or ``None`` value prints as ``-``.
    """
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([_cell(row.get(key), spec) for key, _, spec in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def new_figure(width: float, height: float):
    """Create a figure drawn by the Agg canvas, so no display and no pyplot state are involved."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_lines(axes, series: dict[str, list[tuple[float, float]]], title: str, ylabel: str,
               xlabel: str = "context length (keys)", styles: dict[str, dict] | None = None) -> None:
    """Draw each named series of (context, value) points on log-log axes with a tick at each context.

    A series whose label starts with ``bound`` is drawn as a dotted grey line without markers.
    ``styles`` maps a label to extra ``Axes.plot`` keyword arguments, such as a color or line style.
    """
    for label, points in series.items():
        points = sorted(points)
        style = {"linestyle": ":", "color": "grey"} if label.startswith("bound") else {"marker": "o"}
        style.update((styles or {}).get(label, {}))
        axes.plot([x for x, _ in points], [y for _, y in points], label=label, **style)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    contexts = sorted({x for points in series.values() for x, _ in points})
    axes.set_xticks(contexts, [size_label(x) for x in contexts])
    axes.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")


def save_figure(figure, path: Path) -> Path:
    path = Path(path)
    if path.parent != Path("."):
        path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    logger.info("wrote %s", path)
    return path
