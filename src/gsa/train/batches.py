"""Micro-batches as a pure function of (seed, step): the items, their order and the ratio drawn.

Items are packed corpus windows (stage 1) or task samples (stage 2), gisted when a micro-batch is
built, because the layout depends on the ratio drawn for that micro-batch. Epoch e visits the items
in a permutation seeded by (seed, e). The global micro-batch m on rank r of W processes takes items
``(m * W + r) * B`` to ``(m * W + r + 1) * B - 1`` of that endless sequence.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from gsa.errors import InvalidInputError
from gsa.eval.runner import default_data_dir
from gsa.layout import GistSpec
from gsa.train.config import TrainConfig
from gsa.train.data import (
    TrainBatch, check_seq_len, collate_examples, corpus_tokens, pack, pretrain_example, task_example,
)
from gsa.train.tasks import TaskSample, build_task_samples

logger = logging.getLogger(__name__)


@dataclass
class BatchSource:
    """Builds the micro-batch of any (step, accumulation index, rank)."""

    items: list  # token windows (list[int]) or TaskSample
    specs: dict[str, GistSpec]
    gist_ids: list[int]  # one per level, level 1 first; a layout takes as many as it has levels
    pad_id: int
    batch_size: int
    grad_accum: int
    seed: int
    _orders: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def micro_batch(self, step: int, micro: int, rank: int, world: int) -> tuple[TrainBatch, str]:
        """Return the micro-batch and its ratio for optimiser ``step``, accumulation index ``micro``."""
        index = step * self.grad_accum + micro
        ratios = sorted(self.specs)
        ratio = random.Random(f"ratio:{self.seed}:{index}").choice(ratios)
        spec = self.specs[ratio]
        first = (index * world + rank) * self.batch_size
        examples = [self._example(self._item(first + b), spec) for b in range(self.batch_size)]
        return collate_examples(examples, self.pad_id), ratio

    def _item(self, position: int):
        epoch, offset = divmod(position, len(self.items))
        return self.items[self._order(epoch)[offset]]

    def _order(self, epoch: int) -> list[int]:
        """Return the item order of ``epoch``, a permutation seeded by (seed, epoch), built once."""
        if epoch not in self._orders:
            order = list(range(len(self.items)))
            random.Random(f"order:{self.seed}:{epoch}").shuffle(order)
            self._orders = {epoch: order}  # one epoch at a time: micro-batches move forward
        return self._orders[epoch]

    def _example(self, item, spec: GistSpec):
        if isinstance(item, TaskSample):
            return task_example(item.context_ids, item.prompt_ids, item.answer_ids, self.gist_ids, spec)
        return pretrain_example(item, self.gist_ids, spec)


def build_source(config: TrainConfig, tokenizer, gist_ids: list[int], specs: dict[str, GistSpec]) -> BatchSource:
    """Read and tokenise the configured data into a ``BatchSource``."""
    data = config.data
    data_dir = Path(data.dir) if data.dir else default_data_dir()
    if data.stage == "pretrain":
        for spec in specs.values():
            check_seq_len(data.seq_len, spec)
        paths = [_data_path(data_dir, name) for name in data.corpus]
        streams = corpus_tokens(paths, tokenizer, "train", data.heldout_fraction, data.max_corpus_tokens)
        items = [window for stream in streams for window in pack(stream, data.seq_len)]
        if not items:
            raise InvalidInputError(
                f"the corpus is shorter than one sequence of {data.seq_len} tokens; add text or lower data.seq_len"
            )
        logger.info("packed %d training sequences of %d tokens", len(items), data.seq_len)
    else:
        filler = corpus_tokens(
            [_data_path(data_dir, data.filler)], tokenizer, "train", data.heldout_fraction, data.max_corpus_tokens
        )[0]
        items = build_task_samples(
            tokenizer, data_dir, data.tasks, data.num_samples, data.context_tokens, data.heldout_rows, filler,
            config.run.seed,
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return BatchSource(items, specs, list(gist_ids), pad_id, config.optim.batch_size, config.optim.grad_accum, config.run.seed)


def _data_path(data_dir: Path, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else data_dir / path
