"""Prefill benchmark (``gsa bench prefill``): time and peak memory of one attention layer's prefill.

Three masks over synthetic queries, keys and values of the same geometry:

- ``causal``: PyTorch SDPA with ``is_causal=True`` over the L context tokens;
- ``gist``: ``gsa.attention.masked_attention`` under ``gsa.masks.gist_mask`` over the gisted
  layout of the same context (L tokens plus one gist per chunk). It runs in query blocks of
  ``QUERY_BLOCK`` rows, and each block attends only to the keys that
  ``gsa.attention.gist_candidates`` allows it: sinks, earlier gists and its local window;
- ``gist-full``: the same call with ``gather=False``, the reference twin, which attends every
  block to all keys.

Each point runs in a fresh Python subprocess (``python -m gsa.bench_prefill POINT_JSON``), because
``ru_maxrss``, the peak resident set size the kernel reports, never decreases within a process.
Memory is measured, not estimated: the subprocess reports its peak RSS and the peak above its RSS
just before the first attention call. The analytic size of the inputs and output is reported
beside them.

Shape legend: B batch, L tokens, H query heads, Hk KV heads, G = H / Hk, D head dim, C chunk size.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import gsa
from gsa.attention import QUERY_BLOCK, gist_candidates, masked_attention
from gsa.bench import DTYPES, format_table, median_seconds, new_figure, plot_lines, save_figure
from gsa.errors import InvalidInputError
from gsa.layout import GistSpec, collate, insert_gists
from gsa.masks import gist_mask

logger = logging.getLogger(__name__)

MASKS = ("causal", "gist", "gist-full")
GIST_TOKEN_ID = 1  # any id: the benchmark never embeds tokens, it only needs the layout
MEMORY_NOTE = (
    "measured: peak_rss_bytes is ru_maxrss of a fresh subprocess per point; peak_extra_bytes is that "
    "peak minus the RSS just before the first attention call (inputs already allocated)"
)


@dataclass
class PrefillSettings:
    """Settings of ``gsa bench prefill``. Sizes are in tokens, times in ms."""

    contexts: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    ratios: list[int] = field(default_factory=lambda: [16])
    masks: list[str] = field(default_factory=lambda: list(MASKS))
    kv_heads: int = 8
    head_dim: int = 128
    group: int = 4
    batch: int = 1
    dtype: str = "float32"
    sinks: int = 3
    window: int = 1
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    threads: int | None = None

    def validate(self) -> None:
        """Raise ``InvalidInputError`` for a value the benchmark cannot run with."""
        for name in ("kv_heads", "head_dim", "group", "batch", "repeats"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "sinks", "window"):
            if getattr(self, name) < 0:
                raise InvalidInputError(f"--{name} must be 0 or more, got {getattr(self, name)}")
        unknown = [mask for mask in self.masks if mask not in MASKS]
        if unknown or not self.masks:
            raise InvalidInputError(
                f"unknown mask {','.join(unknown)!r}; choose from causal, gist and gist-full, such as causal,gist"
            )
        if self.dtype not in DTYPES:
            raise InvalidInputError(f"unknown dtype {self.dtype!r}; choose one of: {', '.join(DTYPES)}")
        if any(ratio < 1 for ratio in self.ratios):
            raise InvalidInputError(f"--ratios must be at least 1, got {self.ratios}; a ratio is the chunk size in tokens")
        needed = self.sinks + max(self.ratios)
        if any(mask != "causal" for mask in self.masks) and min(self.contexts) < needed:
            raise InvalidInputError(
                f"--contexts {min(self.contexts)} is too short for ratio {max(self.ratios)}: the gist layout needs "
                f"at least {needed} tokens ({self.sinks} sinks and one chunk); pass longer contexts or smaller --ratios"
            )

    def runs(self) -> list[tuple[str, int | None]]:
        """(mask, ratio) pairs to measure at each context; ``causal`` has no ratio and runs once."""
        pairs: list[tuple[str, int | None]] = [("causal", None)] if "causal" in self.masks else []
        for mask in MASKS[1:]:
            if mask in self.masks:
                pairs += [(mask, ratio) for ratio in self.ratios]
        return pairs


def run_prefill_bench(settings: PrefillSettings) -> dict:
    """Measure every (context, mask, ratio) point, each in its own subprocess.

    Returns ``{"memory", "points", ...}``, ready for JSON.
    """
    settings.validate()
    threads = settings.threads or torch.get_num_threads()
    points = []
    for context in settings.contexts:
        for mask, ratio in settings.runs():
            request = dict(asdict(settings), threads=threads, mask=mask, ratio=ratio, context=context)
            point = measure_in_subprocess(request)
            point.update(mask=mask, ratio=ratio, context=context)
            logger.info("prefill %s@%s context %d: %.1f ms, peak RSS %.0f MB", mask, ratio, context,
                        point["prefill_ms"], point["peak_rss_bytes"] / 1e6)
            points.append(point)
    causal_ms = {p["context"]: p["prefill_ms"] for p in points if p["mask"] == "causal"}
    for point in points:
        causal = causal_ms.get(point["context"])
        point["time_vs_causal"] = point["prefill_ms"] / causal if causal else None
    return {
        "memory": MEMORY_NOTE, "points": points, "dtype": settings.dtype, "threads": threads,
        "batch": settings.batch, "kv_heads": settings.kv_heads, "query_heads": settings.kv_heads * settings.group,
        "head_dim": settings.head_dim, "repeats": settings.repeats, "warmup": settings.warmup,
        "query_block": QUERY_BLOCK, "torch": torch.__version__,
    }


def measure_in_subprocess(request: dict) -> dict:
    """Run one point in a fresh interpreter and return the JSON object it prints last."""
    package_root = str(Path(gsa.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "gsa.bench_prefill", json.dumps(request)]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        tail = " ".join(completed.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"prefill point {request['mask']} at context {request['context']} failed "
                           f"(exit {completed.returncode}): {tail}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# One point, in the subprocess


def prefill_inputs(request: dict):
    """Build (query, key, value, rule) for one point; ``rule`` is the gist mask, or None for causal.

    Query is (B, H, L, D) and key and value (B, Hk, L, D), where L counts the gists of the gist
    layout.
    """
    return prefill_point(request)[:4]


def prefill_point(request: dict):
    """Build ``prefill_inputs`` and, last, the rule's ``gist_candidates`` (None for causal)."""
    generator = torch.Generator().manual_seed(request["seed"])
    batch_size, context = request["batch"], request["context"]
    rule, candidates, length = None, None, context
    if request["mask"] != "causal":
        spec = GistSpec(chunk_size=request["ratio"], sinks=request["sinks"], window_chunks=request["window"])
        sequence = insert_gists([0] * context, [], GIST_TOKEN_ID, spec)
        layout = collate([sequence] * batch_size, spec, pad_id=0)
        rule, candidates, length = gist_mask(layout), gist_candidates(layout), len(sequence)
    dtype = DTYPES[request["dtype"]]
    heads = request["kv_heads"] * request["group"]

    def draw(num_heads):
        return torch.randn(batch_size, num_heads, length, request["head_dim"], generator=generator, dtype=dtype)

    return draw(heads), draw(request["kv_heads"]), draw(request["kv_heads"]), rule, candidates


@torch.inference_mode()
def run_point(request: dict) -> dict:
    """Time one prefill point and measure its peak RSS; runs inside the subprocess."""
    torch.set_num_threads(request["threads"])
    query, key, value, rule, candidates = prefill_point(request)
    scaling = query.shape[-1] ** -0.5
    gather = request["mask"] == "gist"
    if rule is None:
        def call():
            return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    else:
        def call():
            return masked_attention(query, key, value, rule, scaling, candidates=candidates, gather=gather)

    rss_before, peak_before = _current_rss(), _peak_rss()
    seconds = median_seconds(call, request["repeats"], request["warmup"])
    peak_after = _peak_rss()
    element = query.element_size()
    return {
        "prefill_ms": seconds * 1e3, "tokens": query.shape[2], "peak_rss_bytes": peak_after,
        "peak_extra_bytes": max(0, peak_after - rss_before),
        # The call stayed under an earlier peak, so the true extra may be larger than reported.
        "peak_is_lower_bound": peak_after <= peak_before,
        "input_bytes": (2 * query.numel() + key.numel() + value.numel()) * element,  # q, k, v and the output
    }


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _current_rss() -> int:
    """Resident set size now, from /proc on Linux; elsewhere the peak so far is used instead."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _peak_rss()


# --------------------------------------------------------------------------------------------------
# Output


TABLE_COLUMNS = [
    ("context", "context", "d"), ("mask", "mask", ""), ("ratio", "ratio", ""), ("tokens", "tokens", "d"),
    ("prefill_ms", "prefill ms", ".1f"), ("time_vs_causal", "vs causal", ".2f"),
    ("peak_rss_mb", "peak RSS MB", ".0f"), ("peak_extra_mb", "extra MB", ".0f"), ("input_mb", "q/k/v/out MB", ".0f"),
]


def format_prefill_table(result: dict) -> str:
    """Format the points of ``run_prefill_bench`` as a table."""
    rows = [
        dict(point, ratio=point["ratio"] or "-", peak_rss_mb=point["peak_rss_bytes"] / 1e6,
             peak_extra_mb=point["peak_extra_bytes"] / 1e6, input_mb=point["input_bytes"] / 1e6)
        for point in result["points"]
    ]
    title = (f"prefill of one layer, {result['dtype']}, batch {result['batch']}, {result['threads']} threads; "
             "memory measured per point in a fresh subprocess")
    return title + "\n" + format_table(rows, TABLE_COLUMNS)


def plot_prefill(result: dict, path: Path) -> Path:
    """Draw prefill time and peak extra memory against context length, one line per mask@ratio."""
    times: dict[str, list[tuple[float, float]]] = {}
    memory: dict[str, list[tuple[float, float]]] = {}
    for point in result["points"]:
        label = point["mask"] if point["ratio"] is None else f"{point['mask']}@{point['ratio']}"
        times.setdefault(label, []).append((point["context"], point["prefill_ms"]))
        memory.setdefault(label, []).append((point["context"], max(point["peak_extra_bytes"], 1) / 1e6))
    figure = new_figure(12.8, 4.6)
    axes = figure.add_subplot(1, 2, 1)
    plot_lines(axes, times, f"prefill time, one layer ({result['dtype']})", "time (ms)", xlabel="context length (tokens)")
    axes = figure.add_subplot(1, 2, 2)
    plot_lines(axes, memory, "peak memory above the inputs (measured)", "MB", xlabel="context length (tokens)")
    return save_figure(figure, path)


def main(argv: list[str]) -> int:
    """Entry point of the subprocess: run the point given as JSON and print its result as JSON."""
    print(json.dumps(run_point(json.loads(argv[0]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
