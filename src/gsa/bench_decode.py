"""Decode-step benchmark (``gsa bench decode``): time one step of attention against context length.

Two scopes:

- ``layer``: one attention layer over synthetic KV. ``full`` is PyTorch SDPA over the whole cache
  as one (B, Hk, S, D) tensor. Every other method runs ``gsa.sparse.selective_attention`` for one
  query (T = 1, the gathered path) on a ``Tiers`` object cut from the same keys at chunk size
  C = ratio, as layer 1 with the default budget rule (or ``--top-k``). A ratio such as ``4x4``
  or ``4x4x4`` adds random gist tiers above level 1, so ``gsa`` selects top-down.
- ``model``: a whole decode step of a real model (default: the embedded SmolLM2-135M) after a
  prefill of the bundled sample document, repeated or cut to the context length.

Each point records the median step time, the gists scored per step (gist routers only), the keys attended (mean over KV heads, rows and, in the
model scope, global layers) and the bytes of KV those keys hold. A copy benchmark run in the same
process gives the memory bandwidth that bounds a step from below. In the layer scope a point also
counts its FLOPs (``step_flops``) and the bytes its scores read, and a matrix-product benchmark gives
the compute rate, so each point gets a roofline bound: the larger of bytes / bandwidth and
FLOPs / compute rate.

Shape legend: B batch, T queries, S keys, H query heads, Hk KV heads, G = H / Hk, D head dim,
C chunk size, N chunks, R recent tokens, S0 sinks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from gsa.bench import (
    bound_ms, copy_bandwidth_gbps, dtype_name, format_table, matmul_gflops, median_seconds, new_figure, plot_lines,
    roofline_ms, save_figure,
)
from gsa.cache import GistCache
from gsa.chunk_store import RAW_TIERS
from gsa.config import PREFILLS, GSAConfig
from gsa.errors import InvalidInputError
from gsa.layout import GistSpec, collate, insert_gists, parse_ratio
from gsa.methods import get_method
from gsa.ops.recall import KERNELS, kernel_unavailable_reason, resolve_kernel
from gsa.sparse import selective_attention
from gsa.tiers import GistTier, Tiers

logger = logging.getLogger(__name__)

SCOPES = ("layer", "model")
FULL = "full"
LAYER_IDX = 1  # layer 0 of a gist router attends every gist instead of selecting
SAMPLE_DOCUMENT = "sample_document.md"
# Matrix products per (query head, scored candidate) that a method's scores take: one dot product of
# length D with a gist or mean key, two with Quest's min and max keys. Other methods score without them.
# NOTE: oracle scores every raw key and is counted as scoring nothing here.
SCORE_PRODUCTS = {"gsa": 1, "mean-key": 1, "quest": 2}


@dataclass
class DecodeSettings:
    """Settings of ``gsa bench decode``. Sizes are in keys (tokens), times in ms."""

    contexts: list[int] = field(default_factory=lambda: [1024, 4096, 16384, 65536, 131072])
    methods: list[str] = field(default_factory=lambda: [FULL, "gsa", "quest"])
    ratios: list[int | str] = field(default_factory=lambda: [8, 16, 32])  # chunk sizes, or levels such as "4x4"
    scopes: list[str] = field(default_factory=lambda: list(SCOPES))
    model_contexts: list[int] = field(default_factory=lambda: [2048, 4096, 8000])
    kv_heads: int = 8
    head_dim: int = 128
    group: int = 4
    batch: int = 1
    dtype: torch.dtype = torch.float32
    prefill: str = "gist"
    raw_tier: str = "device"  # where the model scope's cache keeps raw chunk KV: device, host or disk
    sinks: int = 3
    window: int = 1
    repeats: int = 20
    warmup: int = 3
    copy_mb: int = 256
    seed: int = 0
    top_k: int | None = None  # chunks (and gists per level) kept per query head; None: the budget rule
    kernels: list[str] = field(default_factory=lambda: ["auto"])  # recall kernels (gsa.ops.recall.KERNELS)

    def validate(self) -> None:
        """Raise ``InvalidInputError`` for a value the benchmark cannot run with."""
        for name in ("kv_heads", "head_dim", "group", "batch", "repeats", "copy_mb"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "sinks", "window"):
            if getattr(self, name) < 0:
                raise InvalidInputError(f"--{name} must be 0 or more, got {getattr(self, name)}")
        unknown = [scope for scope in self.scopes if scope not in SCOPES]
        if unknown or not self.scopes:
            raise InvalidInputError(f"unknown scope {','.join(unknown)!r}; choose layer, model or layer,model")
        if self.raw_tier not in RAW_TIERS:
            raise InvalidInputError(f"unknown raw tier {self.raw_tier!r}; choose one of: {', '.join(RAW_TIERS)}")
        if self.prefill not in PREFILLS:
            raise InvalidInputError(f"unknown prefill {self.prefill!r}; choose one of: {', '.join(PREFILLS)}")
        for ratio in self.ratios:
            parse_ratio(str(ratio), "--ratios")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidInputError(f"--top-k must be at least 1, got {self.top_k}; omit it to use the budget rule")
        for method in self.methods:
            get_method(method)  # raises for an unknown name
        unknown = [kernel for kernel in self.kernels if kernel not in KERNELS]
        if unknown or not self.kernels:
            raise InvalidInputError(f"unknown recall kernel {','.join(unknown)!r}; choose from {', '.join(KERNELS)}")
        for kernel in self.kernels:
            reason = kernel_unavailable_reason(kernel)
            if reason is not None:
                raise InvalidInputError(f"--recall-kernels {kernel} cannot run here: {reason}")
        if "layer" in self.scopes:
            self._check_contexts(self.contexts, "--contexts")
        if "model" in self.scopes:
            self._check_contexts(self.model_contexts, "--model-contexts")

    def _check_contexts(self, contexts: list[int], option: str) -> None:
        if not self.sparse_methods:
            return
        shortest, longest = min(contexts), max(parse_ratio(str(ratio))[0] for ratio in self.ratios)
        needed = self.sinks + longest + 1
        if shortest < needed:
            raise InvalidInputError(
                f"{option} {shortest} is too short for ratio {longest}: it needs at least {needed} keys "
                f"({self.sinks} sinks, one chunk and the query); pass longer contexts or smaller --ratios"
            )

    @property
    def sparse_methods(self) -> list[str]:
        return [method for method in self.methods if method != FULL]

    def config(self, method: str, ratio: int | str | None, kernel: str = "auto") -> GSAConfig:
        sizes = parse_ratio(str(ratio or 16), "--ratios")
        spec = GistSpec.from_sizes(sizes, sinks=self.sinks, window_chunks=self.window)
        return GSAConfig(spec=spec, method=method, prefill=self.prefill, raw_tier=self.raw_tier, top_k=self.top_k,
                         recall_kernel=kernel)

    def runs(self) -> list[tuple[str, int | str | None, str | None]]:
        """Return the (method, ratio, kernel) runs of each context. ``full`` has no ratio or kernel and runs once."""
        runs: list[tuple[str, int | str | None, str | None]] = [(FULL, None, None)] if FULL in self.methods else []
        return runs + [(method, ratio, kernel) for method in self.sparse_methods for ratio in self.ratios
                       for kernel in self.kernels]

    def kernel_name(self, kernel: str | None) -> str | None:
        """Name the kernel that ``kernel`` resolves to for this benchmark's tensors (``auto`` included)."""
        if kernel is None:
            return None
        chunks = torch.empty(0, dtype=self.dtype)
        return resolve_kernel(kernel, torch.empty(0), chunks)


def run_decode_bench(settings: DecodeSettings, generator=None) -> dict:
    """Measure every (scope, context, method, ratio) point and the copy bandwidth.

    ``generator`` is a ``gsa.engine.GistGenerator`` for the model scope; it is loaded with the
    default model when omitted. Returns ``{"bandwidth_gbps", "points", ...}``, ready for JSON.
    """
    settings.validate()
    if "model" in settings.scopes:
        if generator is None:
            from gsa.engine import GistGenerator
            from gsa.model import load_model

            generator = GistGenerator(*load_model(dtype=settings.dtype))
        check_model_contexts(settings, generator)  # before the layer scope, which may take long
    bandwidth = copy_bandwidth_gbps(settings.copy_mb)
    compute = matmul_gflops(settings.kv_heads, settings.group, settings.head_dim)
    logger.info("copy bandwidth %.1f GB/s, matrix-product compute %.1f GFLOP/s", bandwidth, compute)
    result = {
        "bandwidth_gbps": bandwidth, "compute_gflops": compute, "points": [], "dtype": dtype_name(settings.dtype),
        "threads": torch.get_num_threads(), "batch": settings.batch, "repeats": settings.repeats,
        "warmup": settings.warmup, "prefill": settings.prefill, "torch": torch.__version__,
    }
    if "layer" in settings.scopes:
        result["layer"] = {"kv_heads": settings.kv_heads, "query_heads": settings.kv_heads * settings.group,
                           "head_dim": settings.head_dim}
        result["points"] += layer_points(settings)
    if "model" in settings.scopes:
        result["points"] += model_points(settings, generator)
        result["model"] = model_geometry(generator)  # after model_points, which casts the weights to the dtype
    _add_derived_fields(result["points"], bandwidth, compute)
    return result


def _add_derived_fields(points: list[dict], bandwidth: float, compute: float) -> None:
    """Add bytes read, achieved bandwidth and compute rate, both bounds and the speed-up over ``full``.

    ``bytes_read`` counts the attended keys and values plus the keys scored to choose them, because
    a step reads both. ``bound_ms`` is ``bytes_read`` over the copy bandwidth.

    Model-scope points count no FLOPs (their weights dominate and are not counted), so their
    ``roofline_ms`` is ``None``.
    """
    full_ms = {(p["scope"], p["context"]): p["step_ms"] for p in points if p["method"] == FULL}
    for point in points:
        seconds = point["step_ms"] / 1e3
        flops = point.setdefault("step_flops", None)
        point.setdefault("score_bytes_read", None)
        point["bytes_read"] = point["kv_bytes_read"] + (point["score_bytes_read"] or 0.0)
        point["achieved_gbps"] = point["bytes_read"] / seconds / 1e9
        point["bound_ms"] = bound_ms(point["bytes_read"], bandwidth)
        point["achieved_gflops"] = flops / seconds / 1e9 if flops is not None else None
        point["roofline_ms"] = roofline_ms(point["bytes_read"], flops, bandwidth, compute) if flops is not None else None
        full = full_ms.get((point["scope"], point["context"]))
        point["speedup_vs_full"] = full / point["step_ms"] if full is not None else None


# --------------------------------------------------------------------------------------------------
# Layer scope


def synthetic_kv(context: int, settings: DecodeSettings, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random keys and values of one layer, (B, Hk, S, D) each, with S = ``context``."""
    shape = (settings.batch, settings.kv_heads, context, settings.head_dim)
    keys = torch.randn(shape, generator=generator, dtype=settings.dtype)
    values = torch.randn(shape, generator=generator, dtype=settings.dtype)
    return keys, values


def synthetic_tiers(keys: torch.Tensor, values: torch.Tensor, spec: GistSpec,
                    generator: torch.Generator) -> tuple[Tiers, torch.Tensor]:
    """Cut flat (B, Hk, S, D) keys and values into tiers; the chunk tier is a contiguous copy.

    The last key is the query's own token, so the recent tier (the tail after the last full chunk)
    contains at least one key. Gist keys and values are drawn at random, one per chunk. Returns the
    tiers and the query's (B, 1) slot in the recent tier.
    """
    batch, kv_heads, length, dim = keys.shape
    chunk = spec.chunk_size
    sinks = min(spec.sinks, length - 1)
    num_chunks = (length - 1 - sinks) // chunk
    raw_end = sinks + num_chunks * chunk

    def cut(states):
        # A contiguous chunk tier, as GistCache builds it. (B, Hk, N, C, D)
        chunks = states[:, :, sinks:raw_end].reshape(batch, kv_heads, num_chunks, chunk, dim).contiguous()
        return states[:, :, :sinks], chunks, states[:, :, raw_end:]

    sink_k, chunk_k, recent_k = cut(keys)
    sink_v, chunk_v, recent_v = cut(values)
    gist_shape = (batch, kv_heads, num_chunks, dim)  # (B, Hk, N, D)
    gist_k = torch.randn(gist_shape, generator=generator, dtype=keys.dtype)
    gist_v = torch.randn(gist_shape, generator=generator, dtype=keys.dtype)
    recent = length - raw_end

    def ones(*shape):
        return torch.ones(batch, *shape, dtype=torch.bool)

    tiers = Tiers(
        sink_k, sink_v, ones(sinks), chunk_k, chunk_v, ones(num_chunks, chunk), gist_k, gist_v, ones(num_chunks),
        recent_k, recent_v, ones(recent), torch.full((batch,), num_chunks, dtype=torch.long),
        upper=_upper_tiers(num_chunks, spec.fanouts, (batch, kv_heads, dim), keys.dtype, generator),
        fanouts=spec.fanouts,
    )
    return tiers, torch.full((batch, 1), recent - 1, dtype=torch.long)


def _upper_tiers(num_chunks: int, fanouts: tuple[int, ...], shape: tuple[int, int, int], dtype: torch.dtype,
                 generator: torch.Generator) -> list[GistTier]:
    """Random gists of the levels above 1: N_l = N_(l-1) // C_l of them, (B, Hk, N_l, D) each."""
    batch, kv_heads, dim = shape
    tiers, count = [], num_chunks
    for fanout in fanouts:
        count //= fanout
        keys = torch.randn(batch, kv_heads, count, dim, generator=generator, dtype=dtype)
        values = torch.randn(batch, kv_heads, count, dim, generator=generator, dtype=dtype)
        tiers.append(GistTier(keys, values, torch.ones(batch, count, dtype=torch.bool)))
    return tiers


def layer_points(settings: DecodeSettings) -> list[dict]:
    """Time one decode step of one layer for every context, method and ratio."""
    _check_memory(settings)
    generator = torch.Generator().manual_seed(settings.seed)
    heads = settings.kv_heads * settings.group
    points = []
    for context in settings.contexts:
        keys, values = synthetic_kv(context, settings, generator)
        query = torch.randn(settings.batch, heads, 1, settings.head_dim, generator=generator, dtype=settings.dtype)
        for method, ratio, kernel in settings.runs():
            if method == FULL:
                point = _time_full_layer(query, keys, values, settings)
            else:
                # Every run at this context draws the same gists, so methods and kernels face the same choice.
                gists = torch.Generator().manual_seed(settings.seed + context)
                point = _time_sparse_layer(query, keys, values, settings.config(method, ratio, kernel), settings,
                                           gists)
            point.update(method=method, ratio=ratio, kernel=settings.kernel_name(kernel), context=context,
                         scope="layer")
            logger.info("layer %s@%s context %d: %.3f ms", method, ratio, context, point["step_ms"])
            points.append(point)
        del keys, values
    return points


@torch.inference_mode()
def _time_full_layer(query, keys, values, settings: DecodeSettings) -> dict:
    def step():
        return F.scaled_dot_product_attention(query, keys, values, enable_gqa=True)

    seconds = median_seconds(step, settings.repeats, settings.warmup)
    batch, kv_heads, length, dim = keys.shape
    attended = float(length * batch * kv_heads)  # keys over all rows and KV heads
    return {"step_ms": seconds * 1e3, "keys_attended": float(length),
            "kv_bytes_read": attended * 2 * dim * keys.element_size(), "score_bytes_read": 0.0,
            **step_flops(attended, 0.0, settings.group, dim)}


@torch.inference_mode()
def _time_sparse_layer(query, keys, values, config: GSAConfig, settings: DecodeSettings,
                       generator: torch.Generator) -> dict:
    method = config.method
    tiers, query_slot = synthetic_tiers(keys, values, config.spec, generator)
    scaling = settings.head_dim ** -0.5

    def step():
        return selective_attention(query, tiers, query_slot, config, LAYER_IDX, scaling)

    seconds = median_seconds(step, settings.repeats, settings.warmup)
    _, counts = step()
    attended = counts.attended.double()  # (B, Hk, 1)
    dim, element = keys.shape[-1], keys.element_size()
    scored = float(counts.scored.double().mean()) if counts.scored is not None else None
    candidates = _scored_candidates(method, counts, tiers, config)  # over all rows and KV heads
    score_products = candidates * SCORE_PRODUCTS.get(method, 0)
    return {"step_ms": seconds * 1e3, "keys_attended": float(attended.mean()), "gists_scored": scored,
            "levels": config.spec.num_levels, "kv_bytes_read": float(attended.sum()) * 2 * dim * element,
            "score_bytes_read": score_products * dim * element,
            **step_flops(float(attended.sum()), score_products, settings.group, dim)}


def step_flops(attended: float, score_products: float, group: int, dim: int) -> dict:
    """Count the FLOPs of one decode step, one query per row, as a multiply and an add per term.

    ``attended`` is the keys attended summed over rows and KV heads, and ``score_products`` the
    key-length dot products one query head takes to score candidates, summed the same way. Each of
    the G query heads of a KV head takes 2 D FLOPs for q . k and 2 D for the weighted sum of v per
    attended key, and 2 D per scoring product. Softmax, top-k and masks are not counted.
    """
    attend = attended * group * 4 * dim
    score = score_products * group * 2 * dim
    return {"step_flops": attend + score, "score_flops": score}


def _scored_candidates(method: str, counts, tiers: Tiers, config: GSAConfig) -> float:
    """Candidates the method scored in this step, summed over rows and KV heads."""
    if counts.scored is not None:
        return float(counts.scored.double().sum())
    if not get_method(method).selects:
        return 0.0
    outside_window = (tiers.num_chunks - config.spec.window_chunks).clamp(min=0)  # (B,)
    return float(outside_window.sum()) * tiers.num_kv_heads


def _check_memory(settings: DecodeSettings) -> None:
    """Reject contexts whose synthetic KV would not fit in the available memory (Linux only).

    The need is an estimate: gathered chunks and scores add a little more.
    """
    available = _available_memory()
    element = torch.empty(0, dtype=settings.dtype).element_size()
    longest = max(settings.contexts)
    numel = settings.batch * settings.kv_heads * longest * settings.head_dim
    # Keys and values, plus the two float32 copies of every key that quest's min and max take per step.
    needed = 2 * numel * element + 2 * numel * 4
    if available is not None and needed > available:
        raise InvalidInputError(
            f"context {longest} needs about {needed / 2**30:.1f} GiB for its synthetic KV and per-step copies, but only "
            f"{available / 2**30:.1f} GiB is available; pass shorter --contexts or fewer --kv-heads"
        )


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------------------------------
# Model scope


def model_points(settings: DecodeSettings, generator) -> list[dict]:
    """Time one whole-model decode step after a prefill, for every model context, method and ratio."""
    check_model_contexts(settings, generator)
    model, tokenizer = generator.model, generator.tokenizer
    model.to(settings.dtype)
    document = resources.files("gsa.data").joinpath(SAMPLE_DOCUMENT).read_text(encoding="utf-8")
    document_ids = tokenizer(document, add_special_tokens=True)["input_ids"]
    points = []
    for context in settings.model_contexts:
        context_ids = (document_ids * math.ceil(context / len(document_ids)))[:context]
        for method, ratio, kernel in settings.runs():
            point = _time_model_step(generator, context_ids, settings.config(method, ratio, kernel or "auto"), settings)
            point.update(method=method, ratio=ratio, kernel=settings.kernel_name(kernel), context=context,
                         scope="model")
            logger.info("model %s@%s context %d: %.3f ms", method, ratio, context, point["step_ms"])
            points.append(point)
    return points


def check_model_contexts(settings: DecodeSettings, generator) -> None:
    """Reject model contexts that leave the decode token no position in the model."""
    max_positions = generator.max_positions
    longest = max(settings.model_contexts)
    if max_positions and longest + 1 > max_positions:
        raise InvalidInputError(
            f"--model-contexts {longest} leaves no position for the decode token: the model has "
            f"{max_positions} positions; pass contexts up to {max_positions - 1}"
        )


def model_geometry(generator) -> dict:
    """Name, attention geometry and weight bytes of the model timed in the model scope."""
    config = generator.model.config
    return {
        "name": getattr(generator, "model_name", None) or getattr(config, "_name_or_path", ""),
        "layers": config.num_hidden_layers, "kv_heads": config.num_key_value_heads,
        "query_heads": config.num_attention_heads, "head_dim": _head_dim(config),
        "weight_bytes": sum(p.numel() * p.element_size() for p in generator.model.parameters()),
    }


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@torch.inference_mode()
def _time_model_step(generator, context_ids: list[int], config: GSAConfig, settings: DecodeSettings) -> dict:
    """Prefill ``context_ids`` into a ``GistCache``, then time decode steps on forks of it."""
    model = generator.model
    gist_id = generator.gist_ids[0] if config.inserts_gists else None
    sequence = insert_gists(context_ids, [], gist_id, config.spec)
    tokenizer = generator.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = collate([sequence] * settings.batch, config.spec, pad_id).to(model.device)
    cache = GistCache(model.config, batch, config)
    model(input_ids=batch.input_ids, position_ids=batch.position_ids, cache=cache)

    # Each step reads a fork, so the prefilled cache never grows. (B, 1)
    next_token = batch.input_ids[:, -1:]
    position = torch.full_like(next_token, len(context_ids))
    state = {}

    def fork():
        state["cache"] = cache.fork()

    def step():
        return model(input_ids=next_token, position_ids=position, cache=state["cache"])

    seconds = median_seconds(step, settings.repeats, settings.warmup, before=fork)
    stats = state["cache"].stats
    element = next(model.parameters()).element_size()
    point = {"step_ms": seconds * 1e3, "keys_attended": stats.attended / stats.events,
             "kv_bytes_read": stats.attended * 2 * _head_dim(model.config) * element,
             "global_layers": len(stats.per_layer_attended), "raw_tier": config.raw_tier,
             "resident_kv_bytes": cache.resident_bytes(), "stored_kv_bytes": cache.stored_bytes()}
    cache.close()
    return point


# --------------------------------------------------------------------------------------------------
# Output


KERNEL_LINES = {"torch": "--", "cpp": "-", "triton": "-."}  # line style of each recall kernel in the plot

TABLE_COLUMNS = [
    ("scope", "scope", ""), ("context", "context", "d"), ("method", "method", ""), ("ratio", "ratio", ""),
    ("kernel", "kernel", ""),
    ("step_ms", "step ms", ".3f"), ("speedup_vs_full", "full/step", ".2f"), ("gists_scored", "scored", ".0f"),
    ("keys_attended", "keys", ".0f"),
    ("kv_mb", "KV MB", ".2f"), ("achieved_gbps", "GB/s", ".1f"), ("bound_ms", "bound ms", ".3f"),
    ("mflop", "MFLOP", ".1f"), ("achieved_gflops", "GFLOP/s", ".1f"), ("roofline_ms", "roofline ms", ".3f"),
]


def format_decode_table(result: dict) -> str:
    """Format the points of ``run_decode_bench`` as a table, with the copy bandwidth as its title."""
    rows = []
    for point in result["points"]:
        flops = point.get("step_flops")
        rows.append(dict(point, kv_mb=point["kv_bytes_read"] / 1e6, ratio=point["ratio"] or "-",
                         kernel=point.get("kernel") or "-",
                         mflop=flops / 1e6 if flops is not None else None))
    title = (f"decode step, {result['dtype']}, batch {result['batch']}, {result['threads']} threads, "
             f"copy bandwidth {result['bandwidth_gbps']:.1f} GB/s, compute {result['compute_gflops']:.1f} GFLOP/s")
    return title + "\n" + format_table(rows, TABLE_COLUMNS)


def plot_decode(result: dict, path: Path) -> Path:
    """Draw step time against context length on log-log axes, one panel per scope and one line per
    method@ratio. A dotted line marks the time to stream the full KV at the copy bandwidth."""
    scopes = [scope for scope in SCOPES if any(p["scope"] == scope for p in result["points"])]
    figure = new_figure(6.4 * max(len(scopes), 1), 4.6)
    several_kernels = len({point.get("kernel") for point in result["points"] if point.get("kernel")}) > 1
    colors: dict[str, str] = {}  # one color per method@ratio, shared by its kernels
    for index, scope in enumerate(scopes):
        series: dict[str, list[tuple[float, float]]] = {}
        styles: dict[str, dict] = {}
        for point in result["points"]:
            if point["scope"] != scope:
                continue
            label = FULL if point["ratio"] is None else f"{point['method']}@{point['ratio']}"
            color = colors.setdefault(label, f"C{len(colors) % 10}")
            if point.get("kernel") and several_kernels:
                label += f" ({point['kernel']})"
            styles[label] = {"color": color, "linestyle": KERNEL_LINES.get(point.get("kernel"), "-")}
            series.setdefault(label, []).append((point["context"], point["step_ms"]))
            if point["method"] == FULL:
                series.setdefault("bound: full KV at copy bandwidth", []).append((point["context"], point["bound_ms"]))
        axes = figure.add_subplot(1, len(scopes), index + 1)
        plot_lines(axes, series, f"decode step, {scope} scope ({result['dtype']})", "step time (ms)", styles=styles)
    return save_figure(figure, path)
