"""Record which chunks a method unfolds while answering, and draw it over the document."""

from __future__ import annotations

from pathlib import Path

import torch

from gsa.config import GSAConfig
from gsa.diagnostics import RouterProbe
from gsa.eval.explain_render import RecallTrace, render_html, render_png
from gsa.layout import TokenKind


def trace_answer(generator, context: str, question: str, config: GSAConfig, max_new_tokens: int) -> RecallTrace:
    """Answer ``question`` and return, per generated token, the share of KV heads and layers that
    unfolded each chunk. The first column is the sink tokens, which every step reads."""
    probe = RouterProbe(record_trace=True)
    (result,) = generator.generate([context], [question], config, max_new_tokens=max_new_tokens, probe=probe)
    probe.flush_step()

    batch = generator.build_batch([context], [question], config)
    ids, kind = batch.input_ids[0], batch.kind[0]
    sinks = generator.tokenizer.decode(ids[kind == TokenKind.SINK])
    chunks = [sinks] + [generator.tokenizer.decode(ids[row[row >= 0]]) for row in batch.chunk_index[0]]
    steps = [generator.tokenizer.decode([token]) for token in result.token_ids]

    recall = []
    for shares in probe.trace[: len(steps)]:
        recall.append([1.0] + [float(x) for x in shares[: len(chunks) - 1]])
    while len(recall) < len(steps):  # steps served without a global layer report nothing
        recall.append([1.0] + [0.0] * (len(chunks) - 1))
    return RecallTrace(chunks=chunks, steps=steps, recall=recall, question=question, answer=result.answer,
                       method=config.method, ratio=config.ratio)


def explain(generator, context: str, question: str, config: GSAConfig, max_new_tokens: int, prefix: Path):
    """Write ``PREFIX.png`` and ``PREFIX.html`` for one answer; returns both paths."""
    with torch.no_grad():
        trace = trace_answer(generator, context, question, config, max_new_tokens)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    png, html = prefix.with_suffix(".png"), prefix.with_suffix(".html")
    render_png(trace, png)
    render_html(trace, html)
    return png, html
