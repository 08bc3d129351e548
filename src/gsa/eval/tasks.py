"""Task loaders that turn the data sets under ``TaskOptions.data_dir`` into ``Sample`` lists.

``TASKS`` maps each task name to its loader and ``load_task`` looks a name up. The tasks are:

- ``longbench:<task>``: LongBench v1 English tasks, from ``longbench/data/<task>.jsonl`` (the
  original release) or else from ``longbench/mini/<task>.json`` (filled-in prompts).
- ``leval:<task>``: L-Eval long documents with several questions each, one Sample per question.
- ``rag-nq``: Natural Questions with the gold passage placed among other questions' passages.
- ``kv-retrieval``: find the value of a UUID key in a JSON object of 75 pairs.
- ``passkey``, ``niah`` and ``perplexity``: built in ``gsa.eval.synthetic``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from random import Random
from typing import Callable

from gsa.errors import InvalidInputError
from gsa.eval import synthetic
from gsa.eval.task_io import (
    check_limit, check_token_budget, data_file, limit_items, read_json, read_jsonl, require_field, seeded_rng,
    task_option, truncate_middle,
)
from gsa.eval.metrics import LONGBENCH_METRICS
from gsa.eval.types import Sample, TaskOptions

logger = logging.getLogger(__name__)

LONGBENCH_PROMPTS = "longbench/config/dataset2prompt.json"
LONGBENCH_MAX_NEW_TOKENS = "longbench/config/dataset2maxlen.json"

# Text that starts the question part of a task's prompt, for templates whose separator before
# ``{input}`` ("\n\n" for triviaqa) also occurs inside the context. The triviaqa context contains
# few-shot examples, and its input is the final "Passage: ... Question: ... Answer:" block.
LONGBENCH_INPUT_STARTS = {"triviaqa": "Passage:"}

LEVAL_TASKS = ("natural_question", "scientific_qa", "multidoc_qa", "quality", "topic_retrieval_longchat")
# L-Eval names how each document is scored. LLM- and human-judged answers are scored with
# ROUGE-L here, because no judge model is available offline.
LEVAL_METRICS = {"exam": "choice", "f1": "qa_f1", "rouge": "rouge_l", "LLM": "rouge_l", "human": "rouge_l"}
LEVAL_MAX_NEW_TOKENS = {"choice": 8, "contains": 32, "qa_f1": 64, "rouge_l": 256}
CHOICE_GOLD = re.compile(r"\(([A-Z])\)")

NQ_FILE = "lost-in-the-middle/nq-open-oracle.jsonl.gz"
KV_FILE = "lost-in-the-middle/kv-retrieval-75_keys.jsonl.gz"
# How many random draws rag-nq tries before it lists every usable distractor and samples from that.
DISTRACTOR_DRAWS_PER_SLOT = 20


@dataclass(frozen=True)
class PromptTemplate:
    """A LongBench prompt split at its slots: ``prefix{context}middle{input}ending``.

    ``middle`` is None for templates without ``{input}`` (gov_report, lcc), whose ``ending``
    is the text after ``{context}``.
    """

    name: str
    prefix: str
    middle: str | None
    ending: str


def parse_template(name: str, text: str) -> PromptTemplate:
    """Split a LongBench template at its ``{context}`` and ``{input}`` slots."""
    if text.count("{context}") != 1 or text.count("{input}") > 1:
        raise InvalidInputError(f"LongBench template {name!r} must contain {{context}} once and {{input}} at most once")
    prefix, rest = text.split("{context}")
    if "{input}" not in rest:
        return PromptTemplate(name, prefix, None, rest)
    middle, ending = rest.split("{input}")
    return PromptTemplate(name, prefix, middle, ending)


def split_prompt(prompt: str, template: PromptTemplate) -> tuple[str, str] | None:
    """Split a filled-in prompt into ``(context, suffix)``, or return None if it does not fit the template.

    The context runs from the start of the prompt (template prefix included) to the end of the
    filled-in context, and the suffix is the rest, so ``context + suffix == prompt``. The suffix
    starts at the last occurrence of the middle text followed by the task's input start, because
    a context may quote the template text but the short question after it rarely does.
    """
    body_end = len(prompt) - len(template.ending)
    if body_end < len(template.prefix):
        return None
    if not prompt.startswith(template.prefix) or not prompt.endswith(template.ending):
        return None
    if template.middle is None:
        return prompt[:body_end], prompt[body_end:]

    marker = template.middle + LONGBENCH_INPUT_STARTS.get(template.name, "")
    split = prompt.rfind(marker, len(template.prefix), body_end)
    if split < 0:
        return None
    return prompt[:split], prompt[split:]


def _split_with_any_template(
    prompt: str, task: str, templates: dict[str, PromptTemplate], where: str
) -> tuple[str, str, str]:
    """Split ``prompt`` with the task's template, or else with the first other template that fits.

    Some republished prompts use another task's template: the MiniLongBench qasper prompts are
    written with the hotpotqa template. Returns the context, the suffix and the template name.
    """
    names = [task] + [name for name in templates if name != task]
    for name in names:
        parts = split_prompt(prompt, templates[name])
        if parts is not None:
            return parts[0], parts[1], name
    raise InvalidInputError(f"the prompt of {where} fits no template in {LONGBENCH_PROMPTS}")


def _longbench_jsonl_rows(path: Path, template: PromptTemplate) -> list[dict]:
    """Read the original LongBench JSONL release, filling the template around each context and input."""
    rows = []
    for index, record in enumerate(read_jsonl(path)):
        where = f"line {index + 1} of {path}"
        context = template.prefix + require_field(record, "context", where)
        suffix = template.ending
        if template.middle is not None:
            suffix = template.middle + require_field(record, "input", where) + template.ending
        extra = {key: record[key] for key in ("_id", "length") if key in record}
        if record.get("all_classes") is not None:
            extra["all_classes"] = record["all_classes"]
        answers = require_field(record, "answers", where)
        rows.append({"key": str(index), "context": context, "suffix": suffix, "answers": answers, "extra": extra})
    return rows


def _longbench_mini_rows(path: Path, task: str, templates: dict[str, PromptTemplate]) -> list[dict]:
    """Read a mini JSON file of filled-in prompts, splitting each prompt back into context and suffix."""
    records = read_json(path)
    if not isinstance(records, dict):
        raise InvalidInputError(f"{path} must contain a JSON object keyed by sample id")
    rows = []
    for key, record in records.items():
        where = f"sample {key!r} of {path}"
        prompt = require_field(record, "origin_prompt", where)
        context, suffix, template = _split_with_any_template(prompt, task, templates, where)
        answers = require_field(record, "gold", where)
        extra = {} if template == task else {"template": template}
        rows.append({"key": str(key), "context": context, "suffix": suffix, "answers": answers, "extra": extra})

    borrowed = sorted({row["extra"]["template"] for row in rows if "template" in row["extra"]})
    if borrowed:
        logger.info("some prompts in %s do not fit the %s template; they were split with: %s", path, task, borrowed)
    return rows


def _longbench_rows(task: str, options: TaskOptions, templates: dict[str, PromptTemplate]) -> list[dict]:
    """Read a LongBench task as rows of ``key``, ``context``, ``suffix``, ``answers`` and ``extra``.

    The original JSONL release (``longbench/data/<task>.jsonl``) is read when present, else the
    mini JSON of filled-in prompts (``longbench/mini/<task>.json``).
    """
    jsonl = Path(options.data_dir) / "longbench" / "data" / f"{task}.jsonl"
    if jsonl.is_file():
        return _longbench_jsonl_rows(jsonl, templates[task])
    mini = Path(options.data_dir) / "longbench" / "mini" / f"{task}.json"
    if not mini.is_file():
        raise InvalidInputError(
            f"data file for longbench:{task} not found: expected {mini} or the original release at {jsonl}; "
            "set TaskOptions.data_dir to the data directory that contains it"
        )
    return _longbench_mini_rows(mini, task, templates)


def load_longbench(task: str, options: TaskOptions) -> list[Sample]:
    """Load a LongBench task, truncating each context in the middle to ``options.max_context_tokens``.

    Without truncation ``context + suffix`` is the full LongBench prompt.
    """
    prompts = read_json(data_file(options, LONGBENCH_PROMPTS))
    templates = {name: parse_template(name, text) for name, text in prompts.items()}
    max_new_tokens = read_json(data_file(options, LONGBENCH_MAX_NEW_TOKENS))
    for table, path in ((templates, LONGBENCH_PROMPTS), (max_new_tokens, LONGBENCH_MAX_NEW_TOKENS)):
        if task not in table:
            raise InvalidInputError(f"{options.data_dir / path} has no entry for LongBench task {task!r}")
    budget = check_token_budget(options.max_context_tokens)

    samples = []
    for row in limit_items(_longbench_rows(task, options, templates), options):
        context, truncated = truncate_middle(options.tokenizer, row["context"], budget)
        answers = row["answers"]
        extra = {**row["extra"], "truncated": truncated}
        if task == "triviaqa":
            # LongBench's scorer keeps only the first line of predictions for its few-shot
            # tasks (trec, triviaqa, samsum, lsht), where models tend to go on with more examples.
            extra["first_line"] = True
        samples.append(Sample(
            id=f"{task}:{row['key']}", context=context, suffix=row["suffix"],
            answers=[answers] if isinstance(answers, str) else list(answers),
            metric=LONGBENCH_METRICS[task], max_new_tokens=int(max_new_tokens[task]), extra=extra,
        ))
    return samples


def _leval_question(task: str, evaluation: str, question: str, gold: str) -> tuple[str, str, list[str], dict]:
    """Return the metric, suffix, answers and extra fields of one L-Eval question."""
    if evaluation not in LEVAL_METRICS:
        raise InvalidInputError(
            f"unknown L-Eval evaluation {evaluation!r} in leval/{task}.jsonl; expected one of {sorted(LEVAL_METRICS)}"
        )
    question = question.strip()
    open_suffix = f"\n\nQuestion: {question}\nAnswer:"
    if evaluation != "exam":
        return LEVAL_METRICS[evaluation], open_suffix, [gold], {}

    letter = re.match(r"\s*\(([A-Z])\)", gold)
    if letter is None:
        # Closed-ended questions without options (topic_retrieval_longchat) have a short gold
        # text, so the prediction is checked for containing it.
        return "contains", open_suffix, [gold], {}
    suffix = f"\n\n{question}\nAnswer with the letter of the correct option.\nAnswer:"
    choices = sorted(set(CHOICE_GOLD.findall(question)))
    return "choice", suffix, [letter.group(1)], {"gold_text": gold, "choices": choices}


def load_leval(task: str, options: TaskOptions) -> list[Sample]:
    """Load an L-Eval task as one Sample per question; the questions of a document share its group."""
    path = data_file(options, f"leval/{task}.jsonl")
    budget = check_token_budget(options.max_context_tokens)
    limit = check_limit(options.limit)

    samples: list[Sample] = []
    for doc_index, record in enumerate(read_jsonl(path)):
        if limit is not None and len(samples) >= limit:
            break
        where = f"line {doc_index + 1} of {path}"
        questions = require_field(record, "instructions", where)
        golds = require_field(record, "outputs", where)
        if len(questions) != len(golds):
            raise InvalidInputError(f"{where} has {len(questions)} instructions but {len(golds)} outputs")
        evaluation = require_field(record, "evaluation", where)
        context, truncated = truncate_middle(options.tokenizer, require_field(record, "input", where), budget)

        for question_index, (question, gold) in enumerate(zip(questions, golds)):
            metric, suffix, answers, extra = _leval_question(task, evaluation, question, gold)
            extra.update(evaluation=evaluation, source=record.get("source"), truncated=truncated)
            samples.append(Sample(
                id=f"{task}:{doc_index}:{question_index}", context=context, suffix=suffix, answers=answers,
                metric=metric, max_new_tokens=LEVAL_MAX_NEW_TOKENS[metric], group=f"leval:{task}:{doc_index}",
                extra=extra,
            ))
    return limit_items(samples, options)


def _distractors(
    passages: list[tuple[str, str]], answers: list[list[str]], index: int, count: int, rng: Random
) -> list[int]:
    """Pick ``count`` distinct passages of other questions that neither repeat the gold passage nor contain an answer.

    A passage that repeats question ``index``'s own gold passage, or that contains one of its
    answers, would be a second gold passage, so it is never chosen.
    """
    gold = passages[index]
    # Answers are matched as whole words, because short answers such as "S" or "14" occur
    # inside other words and numbers of almost every passage.
    words = [re.escape(answer.strip()) for answer in answers[index] if answer.strip()]
    answer_pattern = re.compile(rf"(?<!\w)(?:{'|'.join(words)})(?!\w)", re.IGNORECASE) if words else None

    def usable(candidate: int, chosen: set[tuple[str, str]]) -> bool:
        passage = passages[candidate]
        if candidate == index or passage == gold or passage in chosen:
            return False
        return answer_pattern is None or answer_pattern.search(passage[1]) is None

    picked: list[int] = []
    seen: set[tuple[str, str]] = set()
    for _ in range(DISTRACTOR_DRAWS_PER_SLOT * count):
        if len(picked) == count:
            return picked
        candidate = rng.randrange(len(passages))
        if usable(candidate, seen):
            picked.append(candidate)
            seen.add(passages[candidate])
    if len(picked) == count:
        return picked

    # Rare: random draws kept failing, so sample from the full list of usable passages.
    remaining = [candidate for candidate in range(len(passages)) if usable(candidate, seen)]
    unique = list({passages[candidate]: candidate for candidate in remaining}.values())
    if len(picked) + len(unique) < count:
        raise InvalidInputError(
            f"rag-nq question {index} has only {len(picked) + len(unique)} usable distractor passages; "
            f"lower num_distractors (now {count})"
        )
    return picked + rng.sample(unique, count - len(picked))


def load_rag_nq(options: TaskOptions) -> list[Sample]:
    """Build multi-document QA inputs: each gold passage among ``num_distractors`` other passages.

    The gold passage goes to index ``gold_position`` (0-based) of the list, or to a seeded random
    index when ``gold_position`` is None.
    """
    path = data_file(options, NQ_FILE)
    rows = read_jsonl(path)
    count = task_option(options, "num_distractors", 9)
    gold_position = task_option(options, "gold_position", None)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count < len(rows):
        raise InvalidInputError(f"num_distractors must be an integer from 0 to {len(rows) - 1}, got {count!r}")
    if gold_position is not None and (isinstance(gold_position, bool) or gold_position not in range(count + 1)):
        raise InvalidInputError(f"gold_position must be None or an integer from 0 to {count}, got {gold_position!r}")

    passages, answers, questions = [], [], []
    for number, row in enumerate(rows, start=1):
        where = f"line {number} of {path}"
        contexts = require_field(row, "ctxs", where)
        if not contexts:
            raise InvalidInputError(f"{where} has no gold passage in 'ctxs'")
        passages.append((contexts[0]["title"], contexts[0]["text"]))
        answers.append(list(require_field(row, "answers", where)))
        questions.append(require_field(row, "question", where))

    samples = []
    for index in limit_items(range(len(rows)), options):
        rng = seeded_rng("rag-nq", options.seed, index)
        position = rng.randint(0, count) if gold_position is None else gold_position
        order = _distractors(passages, answers, index, count, rng)
        order.insert(position, index)
        documents = [
            f"Document [{number}](Title: {passages[item][0]}) {passages[item][1]}"
            for number, item in enumerate(order, start=1)
        ]
        samples.append(Sample(
            id=f"rag-nq:{index}", context="\n\n".join(documents),
            suffix=f"\n\nQuestion: {questions[index]}\nAnswer:", answers=answers[index], metric="contains",
            max_new_tokens=32, extra={"gold_position": position, "num_passages": count + 1, "passage_indices": order},
        ))
    return samples


def load_kv_retrieval(options: TaskOptions) -> list[Sample]:
    """Load the key-value retrieval task: a JSON object of UUID pairs, one pair per line."""
    path = data_file(options, KV_FILE)
    samples = []
    for index, row in enumerate(limit_items(read_jsonl(path), options)):
        where = f"line {index + 1} of {path}"
        records = require_field(row, "ordered_kv_records", where)
        key = require_field(row, "key", where)
        value = require_field(row, "value", where)
        keys = [pair[0] for pair in records]
        if key not in keys:
            raise InvalidInputError(f"{where}: the key {key!r} is not among its ordered_kv_records")
        lines = [f"{json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}" for k, v in records]
        samples.append(Sample(
            id=f"kv-retrieval:{index}", context="{\n" + ",\n".join(lines) + "\n}",
            suffix=f'\n\nKey: "{key}"\nThe value associated with the key is: "', answers=[value],
            metric="contains", max_new_tokens=48,
            extra={"gold_position": keys.index(key), "num_records": len(records)},
        ))
    return samples


TASKS: dict[str, Callable[[TaskOptions], list[Sample]]] = {
    **{f"longbench:{task}": partial(load_longbench, task) for task in LONGBENCH_METRICS},
    **{f"leval:{task}": partial(load_leval, task) for task in LEVAL_TASKS},
    "rag-nq": load_rag_nq,
    "kv-retrieval": load_kv_retrieval,
    "passkey": synthetic.load_passkey,
    "niah": synthetic.load_niah,
    "perplexity": synthetic.load_perplexity,
}


def load_task(name: str, options: TaskOptions) -> list[Sample]:
    """Load the samples of task ``name``, raising InvalidInputError for an unknown name."""
    loader = TASKS.get(name)
    if loader is None:
        raise InvalidInputError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    samples = loader(options)
    logger.info("loaded %d samples of task %s from %s", len(samples), name, options.data_dir)
    return samples
