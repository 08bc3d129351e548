"""Fine-tuning samples built from real sources, kept apart from the evaluation's samples.

- ``rag-nq``: a Natural Questions gold passage among other questions' passages at a random
  position (the evaluation's ``rag-nq`` builder, on rows it never reads);
- ``kv-retrieval``: a subset of a row's UUID pairs, asking for one key's value;
- ``passkey``: a five-digit key hidden at a random depth of corpus text.

The evaluation reads the first rows of each task file (``gsa eval --limit N`` takes rows 0 to
N - 1), so training starts at row ``heldout_rows``. Pass key filler comes from the training split
of a corpus, never from the essays the evaluation hides its keys in.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from gsa.errors import InvalidInputError
from gsa.eval import synthetic
from gsa.eval.task_io import read_jsonl
from gsa.eval.tasks import KV_FILE, load_rag_nq
from gsa.eval.types import TaskOptions

logger = logging.getLogger(__name__)

PASSAGE_TOKENS = 160  # rough tokens per NQ passage, to size the distractor count to a context length
RECORD_TOKENS = 48  # rough tokens per key-value line


@dataclass
class TaskSample:
    """Token ids of one fine-tuning sample: context (gisted), prompt and answer (raw suffix)."""

    task: str
    context_ids: list[int]
    prompt_ids: list[int]
    answer_ids: list[int]


def build_task_samples(
    tokenizer, data_dir: Path, weights: dict[str, float], count: int, context_range: list[int],
    heldout_rows: int, filler_ids: list[int], seed: int,
) -> list[TaskSample]:
    """Draw ``count`` samples, each task in proportion to its weight, in a seeded order."""
    total = sum(w for w in weights.values() if w > 0)
    if total <= 0:
        raise InvalidInputError("data.tasks has no positive weight; give at least one task a weight above 0")
    counts = _apportion(count, {name: w / total for name, w in weights.items() if w > 0})
    rng = random.Random(f"tasks:{seed}")
    builders = {"rag-nq": _rag_samples, "kv-retrieval": _kv_samples, "passkey": _passkey_samples}

    samples = []
    for name, n in counts.items():
        made = builders[name](tokenizer, data_dir, n, context_range, heldout_rows, filler_ids, rng)
        logger.info("built %d %s samples", len(made), name)
        samples.extend(made)
    rng.shuffle(samples)
    return samples


def _encode(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _rag_samples(tokenizer, data_dir, n, context_range, heldout_rows, filler_ids, rng) -> list[TaskSample]:
    # One loader call per passage count; sample i reads row heldout_rows + i.
    sizes = _spread(n, context_range[0] // PASSAGE_TOKENS, context_range[1] // PASSAGE_TOKENS)
    options = TaskOptions(data_dir=data_dir, tokenizer=tokenizer, seed=rng.randrange(2**31), limit=heldout_rows + n)
    samples = []
    for passages in sorted(set(sizes)):
        options.num_distractors = max(passages - 1, 1)
        built = load_rag_nq(options)
        for i in (i for i, size in enumerate(sizes) if size == passages):
            sample = built[heldout_rows + i]
            samples.append(TaskSample(
                "rag-nq", _encode(tokenizer, sample.context, True), _encode(tokenizer, sample.suffix),
                _encode(tokenizer, " " + sample.answers[0]),
            ))
    return samples


def _kv_samples(tokenizer, data_dir, n, context_range, heldout_rows, filler_ids, rng) -> list[TaskSample]:
    rows = read_jsonl(Path(data_dir) / KV_FILE)[heldout_rows:]
    if not rows:
        raise InvalidInputError(f"{KV_FILE} has no rows after the first {heldout_rows}; lower data.heldout_rows")
    samples = []
    for records in _spread(n, context_range[0] // RECORD_TOKENS, context_range[1] // RECORD_TOKENS):
        pairs = rng.choice(rows)["ordered_kv_records"]
        keep = sorted(rng.sample(range(len(pairs)), min(records, len(pairs))))
        chosen = [pairs[i] for i in keep]
        key, value = rng.choice(chosen)
        lines = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in chosen]
        samples.append(TaskSample(
            "kv-retrieval", _encode(tokenizer, "{\n" + ",\n".join(lines) + "\n}", True),
            _encode(tokenizer, f'\n\nKey: "{key}"\nThe value associated with the key is: "'),
            _encode(tokenizer, f'{value}"'),
        ))
    return samples


def _passkey_samples(tokenizer, data_dir, n, context_range, heldout_rows, filler_ids, rng) -> list[TaskSample]:
    samples = []
    for length in _spread(n, context_range[0], context_range[1]):
        key = str(rng.randint(10000, 99999))
        start = rng.randrange(max(len(filler_ids) - 2 * length, 1))
        window = filler_ids[start:start + 2 * length]
        depth = rng.random()
        context, _, _ = synthetic._build_context(
            tokenizer, window, length, [(depth, synthetic.PASSKEY_SENTENCE.format(key=key))]
        )
        samples.append(TaskSample(
            "passkey", _encode(tokenizer, context, True), _encode(tokenizer, synthetic.PASSKEY_SUFFIX),
            _encode(tokenizer, f" {key}."),
        ))
    return samples


def _spread(n: int, low: int, high: int) -> list[int]:
    """Return ``n`` sizes spaced evenly from ``low`` to ``high`` (at least 1 each)."""
    if n <= 0:
        return []
    if n == 1:
        return [max(low, 1)]
    return [max(round(low + (high - low) * i / (n - 1)), 1) for i in range(n)]


def _apportion(count: int, shares: dict[str, float]) -> dict[str, int]:
    """Split ``count`` by ``shares`` (summing to 1) into integers that add up to ``count``.

    Each name gets the floor of its share; the remainder goes to the largest fractional parts.
    """
    exact = {name: count * share for name, share in shares.items()}
    counts = {name: int(value) for name, value in exact.items()}
    by_fraction = sorted(exact, key=lambda name: exact[name] - counts[name], reverse=True)
    for name in by_fraction[: count - sum(counts.values())]:
        counts[name] += 1
    return counts
