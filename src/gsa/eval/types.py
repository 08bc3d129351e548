"""Records shared by the task loaders, the runner and the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Sample:
    """One evaluation item.

    Attributes:
        id: stable identifier, unique within a task (used to resume interrupted runs).
        context: the long text that is gisted.
        suffix: the raw text after the context (instruction, question and answer cue), sent as is.
        answers: gold answers; a metric scores the prediction against them.
        metric: name of the metric in ``gsa.eval.metrics.METRICS``.
        max_new_tokens: generation budget for this item.
        group: items with the same group share their context, so the runner encodes it once.
        extra: task-specific fields (``all_classes`` for classification, ``depth`` and ``length``
            for needle tasks, ...).
    """

    id: str
    context: str
    suffix: str
    answers: list[str]
    metric: str
    max_new_tokens: int = 32
    group: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class TaskOptions:
    """Settings every task loader receives.

    Attributes:
        data_dir: folder with the data sets (``longbench/``, ``leval/``, ``lost-in-the-middle/``,
            ``haystack/``, ``corpus/``).
        tokenizer: the model's tokenizer, for truncation and for building contexts of a length
            in tokens.
        max_context_tokens: contexts longer than this are truncated in the middle.
        seed: seed of every random choice (distractors, needle values).
        limit: at most this many samples (None for all).
    """

    data_dir: Path
    tokenizer: object
    max_context_tokens: int = 7500
    seed: int = 0
    limit: int | None = None
