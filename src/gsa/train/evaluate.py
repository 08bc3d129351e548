"""Held-out next-token loss: the training objective on corpus text that training never saw.

The corpus is split by a stable hash of each document's name (``data.is_heldout``), packed into
windows as in stage 1, and scored with gists under the gist mask (``gsa``) or without gists under
causal attention (``full``). Both score exactly the same raw tokens, so the losses compare.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from gsa.config import GSAConfig
from gsa.errors import InvalidInputError
from gsa.layout import GistSpec
from gsa.train.data import collate_examples, corpus_tokens, pack, pretrain_example
from gsa.train.loop import token_loss

logger = logging.getLogger(__name__)


@dataclass
class LossResult:
    method: str
    ratio: int | None  # the compression ratio, the product of the chunk sizes; None without gists
    loss: float  # mean cross-entropy in nats per predicted token
    tokens: int
    sequences: int
    ratio_sizes: str | None = None  # the chunk sizes of every level, as ``--ratio`` takes them (``4x4``)


@torch.no_grad()
def heldout_loss(
    model, tokenizer, gist_ids: int | list[int], corpus: list[Path], method: str, spec: GistSpec,
    seq_len: int = 1024, sequences: int = 8, heldout_fraction: float = 0.05,
) -> LossResult:
    """Mean next-token loss over the first ``sequences`` held-out windows of each corpus file, in turn.

    ``gist_ids`` is the gist token, or one per level (level 1 first) for a multi-level ``spec``.
    """
    if method not in ("gsa", "full"):
        raise InvalidInputError(f"held-out loss supports the methods gsa and full, got {method!r}")
    streams = corpus_tokens(corpus, tokenizer, "heldout", heldout_fraction, (seq_len + 1) * sequences + 1)
    windows = [w for stream in streams for w in pack(stream, seq_len)[:sequences]]
    if not windows:
        raise InvalidInputError(f"the held-out split has fewer than {seq_len + 1} tokens; lower --seq-len")
    config = GSAConfig(spec=spec, method=method, prefill="gist")

    total, count = 0.0, 0
    for number, window in enumerate(windows, start=1):
        example = pretrain_example(window, gist_ids if method == "gsa" else None, spec)
        batch = collate_examples([example], pad_id=0).to(model.device)
        loss, targets = token_loss(model, batch, config)
        total += float(loss) * targets
        count += targets
        logger.info("held-out window %d/%d: loss %.4f", number, len(windows), float(loss))
    gisted = method == "gsa"
    return LossResult(
        method, spec.ratio if gisted else None, total / count, count, len(windows),
        spec.ratio_label if gisted else None,
    )
