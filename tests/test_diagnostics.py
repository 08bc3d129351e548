"""Router diagnostics: recall@k against the oracle and the dense mass on recalled chunks."""

from __future__ import annotations

import torch

from conftest import GIST_ID, make_model
from gsa.cache import GistCache
from gsa.config import GSAConfig
from gsa.diagnostics import RouterProbe
from gsa.layout import GistSpec, collate, insert_gists
from gsa.methods import SelectionInputs
from gsa.ops.attend import recent_visibility
from gsa.tiers import split_tiers

SPEC = GistSpec(chunk_size=2, sinks=0, window_chunks=0)


def peaked_inputs(target: int):
    """One query whose dense attention mass sits almost entirely on chunk ``target`` of four."""
    batch = collate([insert_gists([1, 2, 3, 4, 5, 6, 7, 8], [9], GIST_ID, SPEC)], SPEC, pad_id=0)
    length = batch.input_ids.shape[1]
    key = torch.zeros(1, 1, length, 4)
    for n in range(4):
        for col in batch.chunk_index[0, n].tolist():
            key[0, 0, col, n] = 1.0  # chunk n's keys point along axis n
    tiers = split_tiers(key, key.clone(), batch)
    query = torch.zeros(1, 1, 1, 4)
    query[0, 0, 0, target] = 30.0
    slot = batch.suffix_slot[:, -1:]
    return SelectionInputs(query, tiers, recent_visibility(tiers, slot), 1.0, slot), batch


def test_recall_one_for_oracle_choice():
    inputs, _ = peaked_inputs(target=2)
    chosen = torch.zeros(1, 1, 1, 4, dtype=torch.bool)
    chosen[..., 2] = True
    probe = RouterProbe()
    probe.observe(1, inputs, chosen, torch.ones(1, 1, 4, dtype=torch.bool), torch.ones(1, 1, dtype=torch.long), "union")
    summary = probe.summary()
    assert summary["router_recall"] == 1.0
    assert summary["selected_mass"] > 0.99


def test_recall_zero_for_wrong_choice():
    inputs, _ = peaked_inputs(target=2)
    chosen = torch.zeros(1, 1, 1, 4, dtype=torch.bool)
    chosen[..., 0] = True
    probe = RouterProbe()
    probe.observe(1, inputs, chosen, torch.ones(1, 1, 4, dtype=torch.bool), torch.ones(1, 1, dtype=torch.long), "union")
    summary = probe.summary()
    assert summary["router_recall"] == 0.0
    assert summary["selected_mass"] < 0.01


def run_with_probe(method: str, **options) -> RouterProbe:
    model = make_model("llama", heads=6, kv_heads=2)
    spec = GistSpec(chunk_size=4, sinks=2)
    generator = torch.Generator().manual_seed(3)
    context = torch.randint(1, GIST_ID - 1, (150,), generator=generator).tolist()
    batch = collate([insert_gists(context, [5, 6], GIST_ID, spec)], spec, pad_id=0)
    probe = RouterProbe(**options)
    cache = GistCache(model.config, batch, GSAConfig(spec=spec, method=method), probe=probe)
    with torch.no_grad():
        model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, cache=cache, max_new_tokens=4, do_sample=False,
                       pad_token_id=0)
    probe.flush_step()
    return probe


def test_oracle_recall_of_itself_is_one():
    summary = run_with_probe("oracle").summary()
    assert summary["router_recall"] == 1.0
    for layer in summary["per_layer"].values():
        assert layer["router_recall"] == 1.0


def test_recent_recall_below_oracle():
    oracle = run_with_probe("oracle").summary()
    recent = run_with_probe("recent").summary()
    assert recent["router_recall"] < 1.0
    assert recent["selected_mass"] <= oracle["selected_mass"] + 1e-6


def test_trace_one_row_per_step():
    probe = run_with_probe("gsa", record_trace=True)
    assert len(probe.trace) == 4
    for shares in probe.trace:
        assert float(shares.min()) >= 0.0
        assert float(shares.max()) <= 1.0
