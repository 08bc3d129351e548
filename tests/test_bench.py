"""Tests of the speed benchmarks (``gsa bench decode`` and ``gsa bench prefill``).

Sizes are tiny and nothing asserts a time: the checks cover the JSON schema, the key counts
against the budget rule, the byte and FLOP formulas, size parsing, user errors and the plot files.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import skip_unavailable
from gsa import cli
from gsa.bench import parse_sizes, size_label
from gsa.bench import roofline_ms
from gsa.bench_decode import DecodeSettings, layer_points, run_decode_bench, step_flops, synthetic_kv, synthetic_tiers
from gsa.bench_prefill import prefill_inputs
from gsa.errors import InvalidInputError
from gsa.layout import GistSpec
from gsa.ops.select import budget

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
POINT_KEYS = {"method", "ratio", "context", "scope", "step_ms", "keys_attended", "kv_bytes_read"}
TINY_LAYER = ["--kv-heads", "2", "--head-dim", "16", "--group", "4", "--repeats", "1", "--warmup", "0",
              "--copy-mb", "1", "--threads", "1"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["bench", *args])
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def assert_usage_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert err.startswith("gsa: error: "), err
    assert "\n" not in err.strip(), err
    for fragment in fragments:
        assert fragment in err


def tiny_settings(**changes) -> DecodeSettings:
    options = dict(contexts=[4096], methods=["gsa"], ratios=[16], scopes=["layer"], kv_heads=2, head_dim=16,
                   group=4, repeats=1, warmup=0, copy_mb=1)
    options.update(changes)
    return DecodeSettings(**options)


# Size parsing.

@pytest.mark.parametrize("text, expected", [
    ("128K", [131072]), ("1M", [1048576]), ("8000", [8000]), ("8k,2048", [8192, 2048]), ("4K, 4096", [4096]),
])
def test_parse_sizes_suffixes(text, expected):
    assert parse_sizes(text, "--contexts") == expected


@pytest.mark.parametrize("text", ["12Q", "", "0", "-5", "1.5K", "4K,,8K"])
def test_parse_sizes_invalid(text):
    with pytest.raises(InvalidInputError, match="--contexts"):
        parse_sizes(text, "--contexts")


def test_size_label_round_trip():
    for size in (1024, 131072, 1048576, 8000):
        assert parse_sizes(size_label(size), "--contexts") == [size]


# User errors through the command line.

def test_cli_bad_context(capsys):
    code, _, err = run_cli(capsys, "decode", "--contexts", "12Q", "--scope", "layer")
    assert_usage_error(code, err, "'12Q'", "128K")


def test_cli_unknown_method(capsys):
    code, _, err = run_cli(capsys, "decode", "--methods", "full,fast", "--scope", "layer")
    assert_usage_error(code, err, "'fast'", "gsa")


def test_cli_unknown_scope(capsys):
    code, _, err = run_cli(capsys, "decode", "--scope", "layers")
    assert_usage_error(code, err, "'layers'", "layer,model")


def test_cli_context_shorter_than_chunk(capsys):
    code, _, err = run_cli(capsys, "decode", "--contexts", "16", "--ratios", "32", "--scope", "layer")
    assert_usage_error(code, err, "16", "ratio 32", "smaller --ratios")


def test_cli_zero_threads(capsys):
    code, _, err = run_cli(capsys, "decode", "--scope", "layer", "--threads", "0")
    assert_usage_error(code, err, "--threads", "0")


def test_cli_missing_bench_kind(capsys):
    code, _, err = run_cli(capsys)
    assert_usage_error(code, err, "gsa bench --help")


def test_cli_prefill_unknown_mask(capsys):
    code, _, err = run_cli(capsys, "prefill", "--masks", "dense")
    assert_usage_error(code, err, "'dense'", "causal,gist")


# Decode benchmark, layer scope.

def test_decode_layer_json_and_plot(capsys, tmp_path):
    plot = tmp_path / "decode.png"
    code, out, err = run_cli(capsys, "decode", "--scope", "layer", "--contexts", "1K,2K", "--methods",
                             "full,gsa,quest", "--ratios", "8,16", "--plot", str(plot), *TINY_LAYER)
    assert code == 0, err
    assert "step ms" in out
    result = last_json(out)
    assert result["bandwidth_gbps"] > 0
    assert result["layer"] == {"kv_heads": 2, "query_heads": 8, "head_dim": 16}
    assert len(result["points"]) == 2 * (1 + 2 * 2)
    for point in result["points"]:
        assert POINT_KEYS <= set(point), point
        assert point["scope"] == "layer"
        assert point["step_ms"] > 0
    assert plot.read_bytes().startswith(PNG_MAGIC)
    assert result["plot"] == str(plot)


def test_decode_full_reads_every_key(capsys):
    code, out, err = run_cli(capsys, "decode", "--scope", "layer", "--contexts", "1000,2K", "--methods", "full",
                             "--no-plot", *TINY_LAYER)
    assert code == 0, err
    points = last_json(out)["points"]
    assert [p["context"] for p in points] == [1000, 2048]
    for point in points:
        assert point["keys_attended"] == point["context"]
        assert point["ratio"] is None
        assert point["speedup_vs_full"] == 1.0
        assert point["kv_bytes_read"] == point["context"] * 2 * 2 * 16 * 4


def test_decode_gsa_keys_follow_budget_rule():
    """S = 4096 keys, C = 16, G = 4: k = 5 chunks per query head, at most 20 per KV head after the union."""
    settings = tiny_settings()
    sinks, chunk, group, window = settings.sinks, 16, settings.group, settings.window
    num_chunks = (4096 - 1 - sinks) // chunk  # the last key is the query's own token
    recent = 4096 - sinks - num_chunks * chunk
    stored = sinks + num_chunks * (chunk + 1) + recent  # raw keys, gists and recent keys
    k = int(budget(torch.tensor([[stored]]), torch.tensor([num_chunks]), chunk, group, chunk))
    assert k == stored // (chunk * group * chunk) + 1 == 5

    (point,) = layer_points(settings)
    # gsa attends each recalled or window chunk's C raw keys and its gist.
    low = sinks + (k + window) * (chunk + 1) + recent
    high = sinks + (k * group + window) * (chunk + 1) + recent
    assert low <= point["keys_attended"] <= high
    assert point["kv_bytes_read"] == pytest.approx(point["keys_attended"] * 2 * 2 * 16 * 4, rel=1e-12)


def test_decode_quest_reads_no_gists():
    settings = tiny_settings(methods=["quest"])
    (point,) = layer_points(settings)
    num_chunks = (4096 - 1 - 3) // 16
    recent = 4096 - 3 - num_chunks * 16
    assert 3 + (5 + 1) * 16 + recent <= point["keys_attended"] <= 3 + (20 + 1) * 16 + recent


def test_decode_bfloat16_bytes():
    (point,) = layer_points(tiny_settings(methods=["full"], contexts=[512], dtype=torch.bfloat16))
    assert point["kv_bytes_read"] == 512 * 2 * 2 * 16 * 2


def test_step_flops_counting_rule():
    # 10 keys x G = 4 heads x (2 D for q . k + 2 D for p . v), then 5 products x 4 heads x 2 D.
    assert step_flops(10.0, 5.0, group=4, dim=8) == {"step_flops": 10 * 4 * 32 + 5 * 4 * 16, "score_flops": 5 * 4 * 16}


def test_decode_flops_and_bytes_by_hand():
    """S = 4096, C = 16, Hk = 2, D = 16, G = 1, top-k 2, float32.

    The tiers hold 3 sinks, N = (4096 - 1 - 3) // 16 = 255 chunks and 4096 - 3 - 255 * 16 = 13
    recent keys. The window is the last chunk, so 254 chunks are candidates. With G = 1 each KV
    head recalls exactly 2 chunks.
    """
    settings = tiny_settings(methods=["full", "gsa", "quest"], group=1, top_k=2)
    full, gsa, quest = run_decode_bench(settings)["points"]

    assert full["keys_attended"] == 4096
    assert full["kv_bytes_read"] == 4096 * 2 * 2 * 16 * 4  # keys x (K, V) x Hk x D x 4 bytes
    assert full["score_bytes_read"] == 0
    assert full["step_flops"] == 4096 * 2 * 1 * 4 * 16  # keys x Hk x G x 4 D
    assert full["score_flops"] == 0

    # gsa: 3 sinks + (2 recalled + 1 window) chunks x (16 raw keys + 1 gist) + 13 recent = 67 keys.
    assert gsa["keys_attended"] == 67
    assert gsa["gists_scored"] == 254
    assert gsa["kv_bytes_read"] == 67 * 2 * 2 * 16 * 4 == 17152
    assert gsa["score_bytes_read"] == 254 * 2 * 16 * 4 == 32512  # one gist key per candidate and KV head
    assert gsa["score_flops"] == 254 * 2 * 1 * 2 * 16 == 16256
    assert gsa["step_flops"] == 67 * 2 * 1 * 4 * 16 + 16256 == 24832

    # quest attends no gist: 3 + 3 x 16 + 13 = 64 keys, and scores with two products (min and max keys).
    assert quest["keys_attended"] == 64
    assert quest["kv_bytes_read"] == 64 * 2 * 2 * 16 * 4
    assert quest["score_bytes_read"] == 2 * 254 * 2 * 16 * 4
    assert quest["score_flops"] == 2 * 254 * 2 * 1 * 2 * 16
    assert quest["step_flops"] == 64 * 2 * 1 * 4 * 16 + 2 * 254 * 2 * 1 * 2 * 16


def test_decode_roofline_is_larger_bound():
    result = run_decode_bench(tiny_settings(methods=["full", "gsa"], group=1, top_k=2))
    bandwidth, compute = result["bandwidth_gbps"], result["compute_gflops"]
    assert compute > 0
    for point in result["points"]:
        memory_ms = (point["kv_bytes_read"] + point["score_bytes_read"]) / (bandwidth * 1e9) * 1e3
        compute_ms = point["step_flops"] / (compute * 1e9) * 1e3
        assert point["roofline_ms"] == pytest.approx(max(memory_ms, compute_ms), rel=1e-12)
        assert point["roofline_ms"] >= point["bound_ms"]
        assert point["achieved_gflops"] == pytest.approx(point["step_flops"] / point["step_ms"] / 1e6, rel=1e-12)


def test_decode_kernels_same_work():
    skip_unavailable("cpp")
    result = run_decode_bench(tiny_settings(methods=["full", "gsa"], kernels=["torch", "cpp"], top_k=2))
    by_kernel = {point["kernel"]: point for point in result["points"]}
    assert set(by_kernel) == {None, "torch", "cpp"}
    for field in ("keys_attended", "kv_bytes_read", "score_bytes_read", "step_flops"):
        assert by_kernel["torch"][field] == by_kernel["cpp"][field]
    for point in result["points"]:
        read = point["kv_bytes_read"] + (point["score_bytes_read"] or 0.0)
        assert point["bytes_read"] == read
        assert point["bound_ms"] == pytest.approx(read / (result["bandwidth_gbps"] * 1e9) * 1e3, rel=1e-12)


def test_decode_rejects_unknown_kernel():
    with pytest.raises(InvalidInputError, match="unknown recall kernel 'gpu'"):
        run_decode_bench(tiny_settings(kernels=["torch", "gpu"]))


def test_decode_rejects_unavailable_kernel(monkeypatch):
    monkeypatch.setattr("gsa.ops.cpu_kernel.cpp_unavailable_reason", lambda: "no compiler")
    with pytest.raises(InvalidInputError, match="--recall-kernels cpp cannot run here: no compiler"):
        run_decode_bench(tiny_settings(kernels=["cpp"]))


def test_roofline_ms_picks_slower_limit():
    assert roofline_ms(2e9, 1e9, bandwidth_gbps=1.0, compute_gflops=1.0) == pytest.approx(2000.0)
    assert roofline_ms(1e9, 4e9, bandwidth_gbps=1.0, compute_gflops=2.0) == pytest.approx(2000.0)


def test_synthetic_tiers_share_keys():
    settings = tiny_settings(batch=2)
    generator = torch.Generator().manual_seed(0)
    keys, values = synthetic_kv(100, settings, generator)
    tiers, slot = synthetic_tiers(keys, values, GistSpec(chunk_size=16), generator)
    assert tiers.chunk_k.shape == (2, 2, 6, 16, 16)  # (100 - 1 - 3) // 16 = 6 chunks
    assert tiers.gist_k.shape == (2, 2, 6, 16)
    assert tiers.recent_k.shape[2] == 100 - 3 - 6 * 16
    assert torch.equal(tiers.chunk_k[1, 1, 2, 5], keys[1, 1, 3 + 2 * 16 + 5])
    assert torch.equal(tiers.recent_v[:, :, -1], values[:, :, -1])
    assert slot.tolist() == [[0], [0]]


# Decode benchmark, model scope on a tiny local model.

def test_decode_model_scope(capsys, tiny_model_dir):
    code, out, err = run_cli(capsys, "decode", "--scope", "model", "--model", str(tiny_model_dir), "--model-contexts",
                             "128", "--methods", "full,gsa", "--ratios", "16", "--repeats", "1", "--warmup", "0",
                             "--copy-mb", "1", "--no-plot")
    assert code == 0, err
    result = last_json(out)
    model = result["model"]
    assert (model["layers"], model["kv_heads"], model["head_dim"]) == (2, 2, 8)
    full, gsa = result["points"]
    assert (full["method"], gsa["method"]) == ("full", "gsa")
    assert full["keys_attended"] == 128 + 1  # the context and the decode token itself
    assert gsa["keys_attended"] < full["keys_attended"]
    for point in (full, gsa):
        assert POINT_KEYS <= set(point)
        assert point["global_layers"] == 2
        per_layer = point["keys_attended"] * 2 * 2 * 8 * 4  # keys x (K and V) x Hk x D x float32 bytes
        assert point["kv_bytes_read"] == pytest.approx(per_layer * 2, rel=1e-12)


def test_decode_model_scope_disk_tier_bytes(capsys, tiny_model_dir):
    code, out, err = run_cli(capsys, "decode", "--scope", "model", "--model", str(tiny_model_dir), "--model-contexts",
                             "128", "--methods", "gsa", "--ratios", "16", "--repeats", "1", "--warmup", "0",
                             "--copy-mb", "1", "--no-plot", "--raw-tier", "disk")
    assert code == 0, err
    (point,) = last_json(out)["points"]
    assert point["raw_tier"] == "disk"
    assert 0 < point["resident_kv_bytes"] < point["stored_kv_bytes"]


def test_decode_model_context_over_positions(capsys, tiny_model_dir):
    code, _, err = run_cli(capsys, "decode", "--scope", "model", "--model", str(tiny_model_dir), "--model-contexts",
                           "256", "--copy-mb", "1", "--no-plot")
    assert_usage_error(code, err, "256", "up to 255")


# Prefill benchmark.

def test_prefill_json_and_plot(capsys, tmp_path):
    plot = tmp_path / "prefill.png"
    code, out, err = run_cli(capsys, "prefill", "--contexts", "128", "--ratios", "16", "--kv-heads", "1",
                             "--head-dim", "8", "--group", "2", "--repeats", "1", "--warmup", "0", "--threads", "1",
                             "--plot", str(plot))
    assert code == 0, err
    result = last_json(out)
    assert result["memory"].startswith("measured")
    causal, gist = result["points"]
    assert (causal["mask"], causal["ratio"], causal["tokens"]) == ("causal", None, 128)
    assert (gist["mask"], gist["ratio"], gist["tokens"]) == ("gist", 16, 128 + (128 - 3) // 16)
    for point in (causal, gist):
        assert point["context"] == 128
        assert point["prefill_ms"] > 0
        assert point["peak_rss_bytes"] > 0
        assert point["peak_extra_bytes"] >= 0
    assert gist["input_bytes"] == (2 * 2 + 1 + 1) * gist["tokens"] * 8 * 4
    assert plot.read_bytes().startswith(PNG_MAGIC)


def test_prefill_inputs_shapes():
    request = {"seed": 0, "batch": 2, "context": 64, "mask": "gist", "ratio": 8, "sinks": 3, "window": 1,
               "dtype": "bfloat16", "kv_heads": 2, "group": 3, "head_dim": 4}
    query, key, value, rule = prefill_inputs(request)
    tokens = 64 + (64 - 3) // 8
    assert query.shape == (2, 6, tokens, 4)
    assert key.shape == value.shape == (2, 2, tokens, 4)
    assert query.dtype == torch.bfloat16
    assert rule is not None
