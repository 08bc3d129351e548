"""Raw-chunk tiers off the device: host memory and disk give the device tier's results, hold fewer
resident bytes, serve repeated recalls from the LRU and remove their files on close."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from conftest import GIST_ID, decode_steps, make_model, relative_error, skip_unavailable
from gsa.cache import GistCache
from gsa.chunk_store import ChunkStore
from gsa.config import GSAConfig
from gsa.errors import InvalidInputError
from gsa.layout import GistSpec, collate, insert_gists

SPEC = GistSpec(chunk_size=4, sinks=2, window_chunks=1)
TIERS = [("device", 0), ("device", 2), ("host", 0), ("host", 2), ("disk", 0), ("disk", 2)]


def context(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, GIST_ID - 1, (length,), generator=generator).tolist()


def gisted(contexts, suffixes):
    return collate([insert_gists(c, s, GIST_ID, SPEC) for c, s in zip(contexts, suffixes)], SPEC, pad_id=0)


def decode(model, batch, config, tokens: list[list[int]]) -> tuple[torch.Tensor, GistCache]:
    """Prefill ``batch``, feed ``tokens`` one step at a time; return the (B, steps + 1, V) logits and the cache."""
    return decode_steps(model, batch, config, tokens)


def generate(model, batch, config, new_tokens: int = 6) -> list[list[int]]:
    cache = GistCache(model.config, batch, config)
    with torch.no_grad():
        output = model.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
            cache=cache, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
        )
    cache.close()
    return output[:, batch.input_ids.shape[1]:].tolist()


@pytest.mark.parametrize("raw_tier,lru_chunks", TIERS)
@pytest.mark.parametrize("family", ["llama", "gemma-sliding"])
def test_generate_equal_across_tiers(family, raw_tier, lru_chunks):
    model = make_model(family)
    batch = gisted([context(57, 1), context(30, 2)], [[3, 4, 5], [6]])
    expected = generate(model, batch, GSAConfig(spec=SPEC, top_k=1))
    config = GSAConfig(spec=SPEC, top_k=1, raw_tier=raw_tier, lru_chunks=lru_chunks)
    assert generate(model, batch, config) == expected


@pytest.mark.parametrize("raw_tier,lru_chunks", TIERS)
@pytest.mark.parametrize("method", ["gsa", "quest", "mean-key", "oracle"])
def test_decode_logits_equal_across_tiers(method, raw_tier, lru_chunks):
    model = make_model("llama", heads=6, kv_heads=2)
    batch = gisted([context(61, 3), context(35, 4)], [[5, 6, 7], [8]])
    steps = [[11, 12, 13, 14], [15, 16, 17, 18]]
    expected, _ = decode(model, batch, GSAConfig(spec=SPEC, method=method), steps)
    config = GSAConfig(spec=SPEC, method=method, raw_tier=raw_tier, lru_chunks=lru_chunks)
    actual, cache = decode(model, batch, config, steps)
    cache.close()
    assert relative_error(actual, expected) < 1e-6


@pytest.mark.parametrize("raw_tier", ["host", "disk"])
def test_cpp_kernel_reads_store_in_place(raw_tier, monkeypatch):
    skip_unavailable("cpp")
    model = make_model("llama", heads=6, kv_heads=2)
    batch = gisted([context(61, 3), context(35, 4)], [[5, 6, 7], [8]])
    steps = [[11, 12, 13], [15, 16, 17]]
    expected, _ = decode(model, batch, GSAConfig(spec=SPEC, recall_kernel="torch"), steps)

    def no_gather(self, index):
        raise AssertionError("the store copied chunks that the kernel can read in place")

    monkeypatch.setattr(ChunkStore, "gather", no_gather)
    actual, cache = decode(model, batch, GSAConfig(spec=SPEC, raw_tier=raw_tier, recall_kernel="cpp"), steps)
    cache.close()
    assert relative_error(actual, expected) < 1e-6


def test_naive_impl_reads_host_tier():
    model = make_model("llama")
    batch = gisted([context(41, 5)], [[5, 6]])
    steps = [[11, 12]]
    expected, _ = decode(model, batch, GSAConfig(spec=SPEC, impl="naive", method="quest"), steps)
    actual, _ = decode(model, batch, GSAConfig(spec=SPEC, impl="naive", method="quest", raw_tier="host"), steps)
    assert relative_error(actual, expected) < 1e-6


def test_disk_tier_resident_bytes_smaller():
    model = make_model("llama")
    batch = gisted([context(80, 6)], [[5]])
    _, device_cache = decode(model, batch, GSAConfig(spec=SPEC), [[9, 10]])
    _, disk_cache = decode(model, batch, GSAConfig(spec=SPEC, raw_tier="disk"), [[9, 10]])
    chunk_bytes = sum(store.stored_bytes() for store in disk_cache.chunk_stores())
    assert chunk_bytes > 0
    assert disk_cache.stored_bytes() == device_cache.stored_bytes()
    assert device_cache.resident_bytes() == device_cache.stored_bytes()
    assert disk_cache.resident_bytes() <= device_cache.resident_bytes() - chunk_bytes
    disk_cache.close()


def test_host_tier_resident_bytes_include_host_copy():
    model = make_model("llama")
    batch = gisted([context(80, 6)], [[5]])
    _, device_cache = decode(model, batch, GSAConfig(spec=SPEC), [[9]])
    _, host_cache = decode(model, batch, GSAConfig(spec=SPEC, raw_tier="host"), [[9]])
    assert host_cache.resident_bytes() == device_cache.resident_bytes()


def test_lru_hits_after_repeated_steps():
    model = make_model("llama")
    batch = gisted([context(80, 7)], [[5]])
    _, cache = decode(model, batch, GSAConfig(spec=SPEC, raw_tier="host", lru_chunks=100), [[9, 10, 11, 12]])
    stores = cache.chunk_stores()
    assert stores
    assert all(store.misses > 0 for store in stores)
    # The local-window chunk is gathered at every step, so every step after the first hits it.
    assert all(store.hits >= 3 for store in stores)


def test_lru_holds_at_most_capacity():
    model = make_model("llama")
    batch = gisted([context(80, 8)], [[5]])
    _, cache = decode(model, batch, GSAConfig(spec=SPEC, raw_tier="disk", lru_chunks=2), [[9, 10, 11]])
    for store in cache.chunk_stores():
        assert len(store._lru) <= 2
    cache.close()


def test_disk_file_removed_on_close(tmp_path):
    model = make_model("llama")
    batch = gisted([context(50, 9)], [[5]])
    _, cache = decode(model, batch, GSAConfig(spec=SPEC, raw_tier="disk", offload_dir=str(tmp_path)), [[9]])
    paths = [store.path for store in cache.chunk_stores()]
    assert paths
    assert all(os.path.exists(path) for path in paths)
    cache.close()
    assert not any(os.path.exists(path) for path in paths)
    assert os.listdir(tmp_path) == []


def test_disk_temp_folder_removed_on_garbage_collection():
    model = make_model("llama")
    batch = gisted([context(50, 10)], [[5]])
    _, cache = decode(model, batch, GSAConfig(spec=SPEC, raw_tier="disk"), [[9]])
    paths = [store.path for store in cache.chunk_stores()]
    folders = {os.path.dirname(path) for path in paths}
    del cache
    gc.collect()
    assert not any(os.path.exists(path) for path in paths)
    assert not any(os.path.exists(folder) for folder in folders)


def test_fork_close_keeps_source_store():
    model = make_model("llama")
    batch = gisted([context(50, 11)], [[5]])
    _, cache = decode(model, batch, GSAConfig(spec=SPEC, raw_tier="disk"), [[9]])
    paths = [store.path for store in cache.chunk_stores()]
    cache.fork().close()
    assert all(os.path.exists(path) for path in paths)
    cache.close()
    assert not any(os.path.exists(path) for path in paths)


def test_invalid_raw_tier_raises():
    with pytest.raises(InvalidInputError, match="raw tier 'gpu'"):
        GSAConfig(raw_tier="gpu")


def test_negative_lru_chunks_raises():
    with pytest.raises(InvalidInputError, match="lru-chunks must be 0 or more, got -1"):
        GSAConfig(lru_chunks=-1)


def test_missing_offload_dir_raises(tmp_path):
    with pytest.raises(InvalidInputError, match="offload directory"):
        GSAConfig(raw_tier="disk", offload_dir=str(tmp_path / "absent"))
