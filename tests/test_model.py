"""End-to-end invariances on tiny random models: decode equals the parallel pass, batch equals
per-sample, cached equals uncached generation, and recalling every chunk equals dense attention."""

from __future__ import annotations

import pytest
import torch

from conftest import GIST_ID, decode_steps, make_model, relative_error
from gsa.cache import GistCache
from gsa.config import GSAConfig
from gsa.layout import GistSpec, TokenKind, collate, insert_gists
from gsa.masks import dense_mask, gist_mask

FAMILIES = ["llama", "qwen2", "mistral", "gemma-sliding"]
SPEC = GistSpec(chunk_size=4, sinks=2, window_chunks=1)


def context(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, GIST_ID - 1, (length,), generator=generator).tolist()


def gisted(contexts, suffixes, spec=SPEC, gist_id=GIST_ID):
    return collate([insert_gists(c, s, gist_id, spec) for c, s in zip(contexts, suffixes)], spec, pad_id=0)


def uncached_logits(model, batch, config):
    with torch.no_grad():
        return model(input_ids=batch.input_ids, position_ids=batch.position_ids, gist_batch=batch,
                     gsa_config=config).logits


def cached_steps(model, batch, config, tokens: list[list[int]]):
    """Logits of the last prompt token and of each fed token, (B, steps + 1, V)."""
    return decode_steps(model, batch, config, tokens)[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["gsa", "gist-only"])
def test_decode_equals_parallel_pass(family, method):
    model = make_model(family)
    config = GSAConfig(spec=SPEC, method=method)
    contexts, suffix, steps = [context(45, 1)], [[5, 6, 7]], [[11, 12, 13, 14]]
    decoded = cached_steps(model, gisted(contexts, suffix), config, steps)
    parallel = uncached_logits(model, gisted(contexts, [suffix[0] + steps[0]]), config)[:, -5:]
    assert relative_error(decoded, parallel) < 1e-4


@pytest.mark.parametrize("prefill", ["gist", "dense"])
def test_decode_equals_parallel_gqa3(prefill):
    model = make_model("llama", heads=6, kv_heads=2)
    config = GSAConfig(spec=SPEC, prefill=prefill, merge="group-sum")
    contexts, suffix, steps = [context(61, 2)], [[5, 6]], [[9, 10, 11]]
    decoded = cached_steps(model, gisted(contexts, suffix), config, steps)
    parallel = uncached_logits(model, gisted(contexts, [suffix[0] + steps[0]]), config)[:, -4:]
    assert relative_error(decoded, parallel) < 1e-4


@pytest.mark.parametrize("family", ["llama", "gemma-sliding"])
def test_ragged_batch_equals_each_row(family):
    model = make_model(family)
    config = GSAConfig(spec=SPEC)
    contexts, suffixes, steps = [context(50, 3), context(23, 4)], [[5, 6, 7], [8]], [[11, 12], [13, 14]]
    together = cached_steps(model, gisted(contexts, suffixes), config, steps)
    for row in range(2):
        alone = cached_steps(model, gisted([contexts[row]], [suffixes[row]]), config, [steps[row]])
        assert relative_error(together[row], alone[0]) < 1e-4


def greedy_uncached(model, context_ids, suffix_ids, config, new_tokens: int) -> list[int]:
    generated = []
    for _ in range(new_tokens):
        logits = uncached_logits(model, gisted([context_ids], [suffix_ids + generated]), config)
        generated.append(int(logits[0, -1].argmax()))
    return generated


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generate_equals_uncached(family):
    model = make_model(family)
    config = GSAConfig(spec=SPEC)
    context_ids, suffix_ids = context(39, 5), [3, 4]
    batch = gisted([context_ids], [suffix_ids])
    with torch.no_grad():
        output = model.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
            cache=GistCache(model.config, batch, config), max_new_tokens=6, do_sample=False, pad_token_id=0,
        )
    cached = output[0, batch.input_ids.shape[1]:].tolist()
    assert cached == greedy_uncached(model, context_ids, suffix_ids, config, 6)


def test_batched_generate_equals_single():
    model = make_model("qwen2")
    config = GSAConfig(spec=SPEC, top_k=1)
    contexts, suffixes = [context(57, 6), context(30, 7)], [[3, 4, 5], [6]]

    def generate(batch):
        with torch.no_grad():
            out = model.generate(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                cache=GistCache(model.config, batch, config), max_new_tokens=5, do_sample=False, pad_token_id=0,
            )
        return out[:, batch.input_ids.shape[1]:].tolist()

    together = generate(gisted(contexts, suffixes))
    for row in range(2):
        assert together[row] == generate(gisted([contexts[row]], [suffixes[row]]))[0]


def test_recall_all_with_dense_prefill_equals_full():
    """Recalling every chunk in every layer with gists only routing reproduces plain attention."""
    model = make_model("llama")
    every = GSAConfig(spec=SPEC, top_k=1000, prefill="dense", select_first_layer=True)
    full = GSAConfig(spec=SPEC, method="full")
    context_ids, suffix_ids, steps = context(44, 8), [7, 8, 9], [[20, 21, 22]]
    sparse = cached_steps(model, gisted([context_ids], [suffix_ids]), every, steps)
    dense = cached_steps(model, gisted([context_ids], [suffix_ids], gist_id=None), full, steps)
    assert relative_error(sparse, dense) < 1e-4


def test_recall_all_equals_gist_masked_sdpa():
    """With every chunk recalled, gsa equals stock SDPA under the gist mask for the context and
    causal attention for the suffix."""
    model = make_model("llama", heads=4, kv_heads=1)
    config = GSAConfig(spec=SPEC, top_k=1000, select_first_layer=True)
    batch = gisted([context(41, 9)], [[4, 5, 6]])
    ours = uncached_logits(model, batch, config)

    length = batch.input_ids.shape[1]
    mask = dense_mask(gist_mask(batch), 1, length, length).clone()
    suffix_rows = batch.kind[0] == TokenKind.SUFFIX
    mask[0, 0, suffix_rows] = torch.arange(length)[None, :] <= torch.arange(length)[suffix_rows][:, None]
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        reference = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask).logits
    assert relative_error(ours, reference) < 1e-4


def test_full_method_fraction_is_one():
    model = make_model("llama")
    batch = gisted([context(40, 10)], [[5]], gist_id=None)
    cache = GistCache(model.config, batch, GSAConfig(spec=SPEC, method="full"))
    with torch.no_grad():
        model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, cache=cache, max_new_tokens=4, do_sample=False,
                       pad_token_id=0)
    assert cache.stats.mean_attended_fraction == 1.0
    assert cache.stats.steps == 4


def test_gsa_reads_fewer_keys_than_full():
    model = make_model("llama", heads=4, kv_heads=4)
    batch = gisted([context(400, 11)], [[5]], spec=GistSpec(chunk_size=8, sinks=2))
    cache = GistCache(model.config, batch, GSAConfig(spec=GistSpec(chunk_size=8, sinks=2)))
    with torch.no_grad():
        model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, cache=cache, max_new_tokens=3, do_sample=False,
                       pad_token_id=0)
    # Layer 0 reads sinks, the window and 49 gists; later layers recall k = 400 // 64 + 1 = 7 chunks.
    assert cache.stats.mean_attended_fraction < 0.35
    assert cache.stats.mean_attended_fraction > 0.05


def test_missing_layout_raises():
    model = make_model("llama")
    with pytest.raises(RuntimeError, match="gist layout"):
        model(input_ids=torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("method", ["streaming", "quest", "mean-key", "random", "recent", "oracle"])
def test_baseline_decode_equals_parallel(method):
    model = make_model("llama", heads=6, kv_heads=2)
    config = GSAConfig(spec=SPEC, method=method)
    contexts, suffix, steps = [context(66, 12)], [[5, 6]], [[9, 10, 11]]
    decoded = cached_steps(model, gisted(contexts, suffix), config, steps)
    parallel = uncached_logits(model, gisted(contexts, [suffix[0] + steps[0]]), config)[:, -4:]
    assert relative_error(decoded, parallel) < 1e-4


@pytest.mark.parametrize("method", ["streaming", "quest", "mean-key", "random", "recent", "oracle"])
def test_baselines_never_attend_gists(method):
    """Baselines route on raw keys, so the gist tokens in the prompt must not change any logit."""
    model = make_model("llama")
    config = GSAConfig(spec=SPEC, method=method, top_k=100, select_first_layer=True)
    context_ids, suffix_ids = context(45, 13), [4, 5]
    with_gists = uncached_logits(model, gisted([context_ids], [suffix_ids]), config)[:, -2:]
    other_gist = uncached_logits(model, gisted([context_ids], [suffix_ids], gist_id=GIST_ID - 3), config)[:, -2:]
    assert relative_error(with_gists, other_gist) < 1e-5


def test_budget_equal_across_methods():
    """Per-group methods recall k * G chunks, the most a per-head method reaches after the union."""
    model = make_model("llama", heads=6, kv_heads=2)
    spec = GistSpec(chunk_size=4, sinks=2)
    keys = {}
    for method in ["gsa", "streaming", "random", "quest"]:
        config = GSAConfig(spec=spec, method=method, top_k=2, prefill="dense")
        batch = gisted([context(120, 14)], [[5]], spec=spec)
        cache = GistCache(model.config, batch, config)
        with torch.no_grad():
            model(input_ids=batch.input_ids, position_ids=batch.position_ids, cache=cache)
        keys[method] = cache.stats.attended / cache.stats.events
    assert keys["streaming"] == keys["random"]
    assert keys["gsa"] <= keys["streaming"]
    assert keys["quest"] <= keys["streaming"]


@pytest.mark.parametrize("method", ["random", "quest", "oracle"])
def test_baseline_batch_equals_each_row(method):
    model = make_model("llama")
    config = GSAConfig(spec=SPEC, method=method)
    contexts, suffixes, steps = [context(70, 15), context(31, 16)], [[5, 6, 7], [8]], [[11, 12], [13, 14]]
    together = cached_steps(model, gisted(contexts, suffixes), config, steps)
    for row in range(2):
        alone = cached_steps(model, gisted([contexts[row]], [suffixes[row]]), config, [steps[row]])
        assert relative_error(together[row], alone[0]) < 1e-4
