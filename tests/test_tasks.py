"""Tests of the task loaders on small self-made fixtures and, when present, on the real data sets.

The real data directory is ``$GSA_DATA_DIR``, by default ``shared/data`` in the folder that
contains the repository; its tests are skipped when it is absent. The tokenizer is SmolLM2's, read
from the embedded GGUF file.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from gsa.errors import InvalidInputError
from gsa.eval import synthetic, tasks
from gsa.eval.task_io import count_tokens
from gsa.eval.tasks import TASKS, load_task
from gsa.eval.types import TaskOptions

REPO_ROOT = Path(__file__).resolve().parent.parent
REAL_DATA = Path(os.environ.get("GSA_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tasks"
KNOWN_METRICS = {
    "qa_f1", "rouge_l", "classification", "retrieval", "count", "code_sim", "contains", "exact_match", "choice",
    "perplexity",
}
BIG_BUDGET = 10**9


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer, loaded offline from the embedded GGUF file."""
    from transformers import AutoTokenizer

    from gsa.model import embedded_model_path

    try:
        path = embedded_model_path()
    except InvalidInputError as error:
        pytest.skip(f"embedded model not installed: {error}")
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="session")
def real_dir() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data directory {REAL_DATA} not found; set GSA_DATA_DIR to run these tests")
    return REAL_DATA


def make_options(data_dir: Path, tokenizer, **settings) -> TaskOptions:
    """Build TaskOptions; settings that are not TaskOptions fields become extra attributes."""
    fields = {key: settings.pop(key) for key in ("max_context_tokens", "seed", "limit") if key in settings}
    options = TaskOptions(data_dir=data_dir, tokenizer=tokenizer, **fields)
    for key, value in settings.items():
        setattr(options, key, value)
    return options


def check_ids_and_metrics(samples) -> None:
    ids = [sample.id for sample in samples]
    assert len(ids) == len(set(ids))
    assert {sample.metric for sample in samples} <= KNOWN_METRICS


# Registry and errors


def test_registry_lists_every_task():
    expected = {f"longbench:{task}" for task in (
        "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "triviaqa", "passage_retrieval_en", "gov_report", "lcc",
    )}
    expected |= {f"leval:{task}" for task in tasks.LEVAL_TASKS}
    expected |= {"rag-nq", "kv-retrieval", "passkey", "niah", "perplexity"}
    assert set(TASKS) == expected


def test_unknown_task_lists_choices(tmp_path):
    with pytest.raises(InvalidInputError) as caught:
        load_task("longbench:narrativeqa", make_options(tmp_path, None))
    message = str(caught.value)
    assert "'longbench:narrativeqa'" in message
    assert "longbench:qasper" in message
    assert "passkey" in message


@pytest.mark.parametrize("name", sorted(TASKS))
def test_missing_file_names_path(tmp_path, name):
    with pytest.raises(InvalidInputError) as caught:
        load_task(name, make_options(tmp_path, None))
    message = str(caught.value)
    assert "not found" in message
    assert str(tmp_path) in message


@pytest.mark.parametrize("name, settings", [
    ("longbench:hotpotqa", {"limit": -1}),
    ("longbench:hotpotqa", {"max_context_tokens": 0}),
    ("leval:quality", {"limit": "3"}),
    ("rag-nq", {"gold_position": 4, "num_distractors": 3}),
    ("rag-nq", {"num_distractors": 8}),
    ("passkey", {"depths": [1.5]}),
    ("niah", {"lengths": [0]}),
    ("passkey", {"depths": [0.5, 0.501]}),
    ("perplexity", {"continuation_tokens": 0}),
])
def test_invalid_settings_raise(fixture_dir, tokenizer, name, settings):
    with pytest.raises(InvalidInputError):
        load_task(name, make_options(fixture_dir, tokenizer, **settings))


def test_unsplittable_prompt_names_sample(fixture_dir, tokenizer, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(fixture_dir / "longbench", folder / "longbench")
    broken = {"7": {"origin_prompt": "no template", "gold": []}}
    (folder / "longbench/mini/hotpotqa.json").write_text(json.dumps(broken))
    with pytest.raises(InvalidInputError, match="sample '7'"):
        load_task("longbench:hotpotqa", make_options(folder, tokenizer))


# LongBench on fixtures


def fixture_prompts(task: str) -> dict[str, str]:
    records = json.loads((FIXTURES / "longbench/mini" / f"{task}.json").read_text())
    return {key: record["origin_prompt"] for key, record in records.items()}


def test_longbench_fixture_split(fixture_dir, tokenizer):
    samples = load_task("longbench:hotpotqa", make_options(fixture_dir, tokenizer, max_context_tokens=BIG_BUDGET))
    prompts = fixture_prompts("hotpotqa")

    assert [sample.id for sample in samples] == ["hotpotqa:0", "hotpotqa:1"]
    assert samples[0].context.startswith("Read the notes and reply in a few words.\n\nNotes:\nNote 1:\nThe lighthouse")
    assert samples[0].context.endswith("where she kept bees.")
    assert samples[0].suffix == (
        "\n\nReply in a few words.\n\nQuestion: Where did the keeper who painted the lighthouse move?\nAnswer:"
    )
    # The second context imitates the template text, so only its last occurrence starts the suffix.
    assert samples[1].suffix == "\n\nReply in a few words.\n\nQuestion: How many cars does the ferry carry?\nAnswer:"
    for sample in samples:
        assert sample.context + sample.suffix == prompts[sample.id.split(":")[1]]
        assert sample.metric == "qa_f1"
        assert sample.max_new_tokens == 32
    assert samples[1].answers == ["forty", "40"]


def test_longbench_fixture_borrowed_template(fixture_dir, tokenizer):
    samples = load_task("longbench:2wikimqa", make_options(fixture_dir, tokenizer))
    assert len(samples) == 1
    assert samples[0].extra["template"] == "hotpotqa"
    assert samples[0].context + samples[0].suffix == fixture_prompts("2wikimqa")["0"]
    assert samples[0].suffix == "\n\nReply in a few words.\n\nQuestion: What grows in the orchard?\nAnswer:"


def test_longbench_fixture_without_input(fixture_dir, tokenizer):
    samples = load_task("longbench:gov_report", make_options(fixture_dir, tokenizer, max_context_tokens=BIG_BUDGET))
    assert samples[0].suffix == "\n\nSummary:"
    assert samples[0].context + samples[0].suffix == fixture_prompts("gov_report")["0"]
    assert samples[0].metric == "rouge_l"
    assert samples[0].max_new_tokens == 300


def test_longbench_fixture_triviaqa_input(fixture_dir, tokenizer):
    sample = load_task("longbench:triviaqa", make_options(fixture_dir, tokenizer))[0]
    assert sample.context.endswith("Answer:\nOn stones\n")
    assert sample.suffix.startswith("\n\nPassage:\nThe kettle whistles.")
    assert sample.context + sample.suffix == fixture_prompts("triviaqa")["0"]
    assert sample.extra["first_line"] is True


def test_longbench_fixture_jsonl_format(fixture_dir, tokenizer):
    samples = load_task("longbench:qasper", make_options(fixture_dir, tokenizer, max_context_tokens=BIG_BUDGET))
    assert [sample.id for sample in samples] == ["qasper:0", "qasper:1"]
    assert samples[0].context == "Paper: We train on the Lantern corpus of letters."
    assert samples[0].suffix == "\n\nQuestion: Which corpus do the authors use?\n\nAnswer:"
    assert samples[0].answers == ["the Lantern corpus"]
    assert samples[0].extra["_id"] == "fixture-a"
    assert "all_classes" not in samples[0].extra
    assert samples[1].extra["all_classes"] == ["yes", "no"]
    assert samples[1].max_new_tokens == 128


def test_longbench_fixture_truncation(fixture_dir, tokenizer):
    full = load_task("longbench:gov_report", make_options(fixture_dir, tokenizer, max_context_tokens=BIG_BUDGET))[0]
    cut = load_task("longbench:gov_report", make_options(fixture_dir, tokenizer, max_context_tokens=40))[0]
    assert count_tokens(tokenizer, full.context) > 40
    assert count_tokens(tokenizer, cut.context) <= 40
    assert cut.extra["truncated"] is True
    assert cut.context.startswith("Summarize the memo.\n\nMemo:\nThe parks office")
    assert cut.context.endswith("at three lakes in the spring.")
    assert cut.suffix == full.suffix


def test_longbench_fixture_limit(fixture_dir, tokenizer):
    samples = load_task("longbench:hotpotqa", make_options(fixture_dir, tokenizer, limit=1))
    assert [sample.id for sample in samples] == ["hotpotqa:0"]


# LongBench on the real data


@pytest.mark.parametrize("task", sorted(tasks.LONGBENCH_METRICS))
def test_longbench_real_task(real_dir, tokenizer, task):
    records = json.loads((real_dir / "longbench/mini" / f"{task}.json").read_text())
    max_new_tokens = json.loads((real_dir / "longbench/config/dataset2maxlen.json").read_text())
    full = load_task(f"longbench:{task}", make_options(real_dir, tokenizer, max_context_tokens=BIG_BUDGET))
    cut = load_task(f"longbench:{task}", make_options(real_dir, tokenizer))

    assert len(full) == len(records)
    check_ids_and_metrics(full)
    for whole, short in zip(full, cut):
        key = whole.id.split(":")[1]
        assert whole.context + whole.suffix == records[key]["origin_prompt"]
        assert whole.metric == tasks.LONGBENCH_METRICS[task]
        assert whole.max_new_tokens == max_new_tokens[task]
        assert count_tokens(tokenizer, short.context) <= 7500
        assert short.suffix == whole.suffix
        assert short.context[:200] == whole.context[:200]
        assert short.context[-200:] == whole.context[-200:]


# L-Eval


def test_leval_fixture_quality(fixture_dir, tokenizer):
    samples = load_task("leval:quality", make_options(fixture_dir, tokenizer))
    assert [sample.id for sample in samples] == ["quality:0:0", "quality:0:1", "quality:1:0"]
    assert [sample.group for sample in samples] == ["leval:quality:0", "leval:quality:0", "leval:quality:1"]
    assert samples[0].context == samples[1].context
    assert [sample.answers for sample in samples] == [["B"], ["C"], ["A"]]
    assert samples[1].extra["gold_text"] == "(C) Barley"
    assert samples[0].extra["choices"] == ["A", "B", "C", "D"]
    assert {sample.metric for sample in samples} == {"choice"}
    assert samples[2].suffix == (
        "\n\nWhen did the clock stop?\n\n (A) At noon \n (B) At midnight"
        "\nAnswer with the letter of the correct option.\nAnswer:"
    )


def test_leval_fixture_open_questions(fixture_dir, tokenizer):
    questions = load_task("leval:natural_question", make_options(fixture_dir, tokenizer))
    assert [sample.metric for sample in questions] == ["qa_f1", "qa_f1", "rouge_l"]
    assert questions[0].suffix == "\n\nQuestion: where does the river oswin rise\nAnswer:"
    assert questions[0].answers == ["the Tarn hills"]

    topics = load_task("leval:topic_retrieval_longchat", make_options(fixture_dir, tokenizer))
    assert [sample.metric for sample in topics] == ["contains", "contains"]
    assert topics[1].answers == ["paper kites"]
    assert topics[1].suffix == "\n\nQuestion: What is the second topic we discussed?\nAnswer:"


def test_leval_fixture_truncation(fixture_dir, tokenizer):
    document = json.loads((FIXTURES / "leval/quality.jsonl").read_text().splitlines()[0])["input"]
    samples = load_task("leval:quality", make_options(fixture_dir, tokenizer, max_context_tokens=30))
    assert count_tokens(tokenizer, samples[0].context) <= 30
    assert samples[0].context == samples[1].context
    assert samples[0].extra["truncated"] is True
    assert samples[0].context[:40] == document[:40]
    assert samples[0].context[-40:] == document[-40:]


def test_leval_fixture_limit(fixture_dir, tokenizer):
    samples = load_task("leval:quality", make_options(fixture_dir, tokenizer, limit=2))
    assert [sample.id for sample in samples] == ["quality:0:0", "quality:0:1"]


@pytest.mark.parametrize("task", tasks.LEVAL_TASKS)
def test_leval_real_task(real_dir, tokenizer, task):
    documents = [json.loads(line) for line in (real_dir / "leval" / f"{task}.jsonl").read_text().splitlines()]
    samples = load_task(f"leval:{task}", make_options(real_dir, tokenizer))

    assert len(samples) == sum(len(document["instructions"]) for document in documents)
    check_ids_and_metrics(samples)
    contexts: dict[str, str] = {}
    for sample in samples:
        assert contexts.setdefault(sample.group, sample.context) == sample.context
    for group, context in contexts.items():
        document = documents[int(group.rsplit(":", 1)[1])]["input"]
        assert count_tokens(tokenizer, context) <= 7500
        assert context[:100] == document[:100]
        assert context[-100:] == document[-100:]
    if task == "quality":
        assert all(re.fullmatch("[A-D]", sample.answers[0]) for sample in samples)


# rag-nq


def read_nq(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def nq_document(rows: list[dict], index: int, number: int) -> str:
    passage = rows[index]["ctxs"][0]
    return f"Document [{number}](Title: {passage['title']}) {passage['text']}"


def check_rag(samples, rows: list[dict], distractors: int, position: int | None) -> None:
    """Check that each context lists the gold passage at its position among distinct distractors."""
    check_ids_and_metrics(samples)
    for index, sample in enumerate(samples):
        indices = sample.extra["passage_indices"]
        gold_position = sample.extra["gold_position"]
        assert len(indices) == sample.extra["num_passages"] == distractors + 1
        if position is None:
            assert 0 <= gold_position <= distractors
        else:
            assert gold_position == position
        assert indices[gold_position] == index
        expected = [nq_document(rows, item, number) for number, item in enumerate(indices, start=1)]
        assert sample.context == "\n\n".join(expected)

        gold = rows[index]["ctxs"][0]
        others = [rows[item]["ctxs"][0] for item in indices[:gold_position] + indices[gold_position + 1:]]
        assert not any(other["text"] == gold["text"] for other in others)
        assert len({(other["title"], other["text"]) for other in others}) == distractors
        assert sample.suffix == f"\n\nQuestion: {rows[index]['question']}\nAnswer:"
        assert sample.answers == rows[index]["answers"]
        assert sample.metric == "contains"
        assert sample.max_new_tokens == 32


@pytest.mark.parametrize("position", [0, 1, 3])
def test_rag_fixture_gold_position(fixture_dir, tokenizer, position):
    rows = read_nq(FIXTURES / "lost-in-the-middle/nq-open-oracle.jsonl")
    samples = load_task("rag-nq", make_options(fixture_dir, tokenizer, num_distractors=3, gold_position=position))
    assert len(samples) == len(rows)
    check_rag(samples, rows, 3, position)
    assert samples[0].context.split("\n\n")[position] == nq_document(rows, 0, position + 1)
    # Questions 0 and 1 share one gold passage, so neither may use the other as a distractor.
    assert 1 not in samples[0].extra["passage_indices"]
    assert 0 not in samples[1].extra["passage_indices"]


def test_rag_fixture_seeds(fixture_dir, tokenizer):
    rows = read_nq(FIXTURES / "lost-in-the-middle/nq-open-oracle.jsonl")
    first = load_task("rag-nq", make_options(fixture_dir, tokenizer, num_distractors=3, seed=1))
    check_rag(first, rows, 3, None)
    assert first == load_task("rag-nq", make_options(fixture_dir, tokenizer, num_distractors=3, seed=1))
    other = load_task("rag-nq", make_options(fixture_dir, tokenizer, num_distractors=3, seed=2))
    first_indices = [sample.extra["passage_indices"] for sample in first]
    assert first_indices != [sample.extra["passage_indices"] for sample in other]


def test_rag_real(real_dir, tokenizer):
    rows = read_nq(real_dir / tasks.NQ_FILE)
    for position in (0, 4, 9):
        samples = load_task("rag-nq", make_options(real_dir, tokenizer, limit=40, gold_position=position))
        assert len(samples) == 40
        check_rag(samples, rows, 9, position)

    seeded = load_task("rag-nq", make_options(real_dir, tokenizer, limit=40, seed=0))
    check_rag(seeded, rows, 9, None)
    assert seeded == load_task("rag-nq", make_options(real_dir, tokenizer, limit=40, seed=0))
    reseeded = load_task("rag-nq", make_options(real_dir, tokenizer, limit=40, seed=1))
    assert all(a.context != b.context for a, b in zip(seeded, reseeded))


# kv-retrieval


def check_kv(samples, rows) -> None:
    check_ids_and_metrics(samples)
    for sample, row in zip(samples, rows):
        assert json.loads(sample.context) == dict(row["ordered_kv_records"])
        assert len(sample.context.splitlines()) == len(row["ordered_kv_records"]) + 2
        assert sample.answers == [row["value"]]
        assert sample.suffix == f'\n\nKey: "{row["key"]}"\nThe value associated with the key is: "'
        assert sample.metric == "contains"
        assert sample.max_new_tokens == 48
        assert row["ordered_kv_records"][sample.extra["gold_position"]][0] == row["key"]


def test_kv_fixture(fixture_dir, tokenizer):
    lines = (FIXTURES / "lost-in-the-middle/kv-retrieval-75_keys.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    samples = load_task("kv-retrieval", make_options(fixture_dir, tokenizer))
    assert len(samples) == 3
    check_kv(samples, rows)
    assert len(load_task("kv-retrieval", make_options(fixture_dir, tokenizer, limit=2))) == 2


def test_kv_real(real_dir, tokenizer):
    with gzip.open(real_dir / tasks.KV_FILE, "rt") as handle:
        rows = [json.loads(line) for _, line in zip(range(20), handle)]
    samples = load_task("kv-retrieval", make_options(real_dir, tokenizer, limit=20))
    assert len(samples) == 20
    check_kv(samples, rows)
    assert all(sample.extra["num_records"] == 75 for sample in samples)


# passkey and niah


def check_length_and_depth(tokenizer, sample, needle: str, depth: float) -> None:
    tokens = count_tokens(tokenizer, sample.context)
    assert abs(tokens - sample.extra["length"]) <= 0.01 * sample.extra["length"]
    assert sample.context.count(needle) == 1
    ratio = sample.context.index(needle) / len(sample.context)
    assert abs(ratio - depth) <= 0.1


def check_passkey(tokenizer, samples, lengths, depths) -> None:
    expected_ids = [f"passkey:{length}:{depth:.2f}" for length in lengths for depth in depths]
    assert [sample.id for sample in samples] == expected_ids
    check_ids_and_metrics(samples)
    for sample in samples:
        key = sample.answers[0]
        assert re.fullmatch(r"\d{5}", key)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        check_length_and_depth(tokenizer, sample, needle, sample.extra["depth"])
        assert sample.suffix == "\n\nWhat is the pass key? The pass key is"
        assert sample.metric == "contains"
        assert sample.max_new_tokens == 10


def test_passkey_fixture(fixture_dir, tokenizer):
    options = make_options(fixture_dir, tokenizer, lengths=[200, 400], depths=[0.0, 0.5, 1.0])
    check_passkey(tokenizer, load_task("passkey", options), [200, 400], [0.0, 0.5, 1.0])


def test_passkey_real(real_dir, tokenizer):
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    check_passkey(tokenizer, load_task("passkey", make_options(real_dir, tokenizer)), [2048, 4096], depths)


def test_passkey_seeds(fixture_dir, tokenizer):
    settings = {"lengths": [200], "depths": [0.0, 0.5, 1.0]}
    first = load_task("passkey", make_options(fixture_dir, tokenizer, seed=3, **settings))
    assert first == load_task("passkey", make_options(fixture_dir, tokenizer, seed=3, **settings))
    other = load_task("passkey", make_options(fixture_dir, tokenizer, seed=4, **settings))
    assert [sample.answers for sample in first] != [sample.answers for sample in other]
    assert len(load_task("passkey", make_options(fixture_dir, tokenizer, limit=2, **settings))) == 2


def check_niah(tokenizer, samples) -> None:
    check_ids_and_metrics(samples)
    for sample in samples:
        needles = sample.extra["needles"]
        assert len({needle["word"] for needle in needles}) == len(needles) == synthetic.NEEDLE_COUNT
        assert sorted(needle["number"] for needle in needles) == [1, 2, 3]
        for needle in needles:
            sentence = f"The secret ingredient number {needle['number']} for the recipe is {needle['word']}."
            assert sample.context.index(sentence) == needle["offset"]
        queried = next(needle for needle in needles if needle["number"] == sample.extra["queried_number"])
        assert sample.answers == [queried["word"]]
        sentence = f"The secret ingredient number {queried['number']} for the recipe is {queried['word']}."
        check_length_and_depth(tokenizer, sample, sentence, sample.extra["depth"])
        assert f"What is secret ingredient number {queried['number']} for the recipe?" in sample.suffix
        assert sample.metric == "contains"


def test_niah_fixture(fixture_dir, tokenizer):
    samples = load_task("niah", make_options(fixture_dir, tokenizer, lengths=[300], depths=[0.0, 0.25, 0.5, 1.0]))
    assert [sample.id for sample in samples] == ["niah:300:0.00", "niah:300:0.25", "niah:300:0.50", "niah:300:1.00"]
    check_niah(tokenizer, samples)


def test_niah_real(real_dir, tokenizer):
    samples = load_task("niah", make_options(real_dir, tokenizer))
    assert len(samples) == 10
    check_niah(tokenizer, samples)


def test_niah_seeds(fixture_dir, tokenizer):
    settings = {"lengths": [300], "depths": [0.0, 0.5, 1.0]}
    first = load_task("niah", make_options(fixture_dir, tokenizer, seed=5, **settings))
    assert first == load_task("niah", make_options(fixture_dir, tokenizer, seed=5, **settings))
    other = load_task("niah", make_options(fixture_dir, tokenizer, seed=6, **settings))
    assert [sample.extra["needles"] for sample in first] != [sample.extra["needles"] for sample in other]


# perplexity


def check_perplexity(tokenizer, samples, texts: dict[str, str], length: int, continuation: int) -> None:
    check_ids_and_metrics(samples)
    for sample in samples:
        path = sample.extra["path"]
        assert sample.id == f"perplexity:{path}"
        assert texts[path].startswith(sample.context + sample.answers[0])
        assert abs(count_tokens(tokenizer, sample.context) - length) <= 0.01 * length + 1
        assert abs(count_tokens(tokenizer, sample.answers[0]) - continuation) <= 0.01 * continuation + 1
        assert sample.suffix == ""
        assert sample.metric == "perplexity"
        assert sample.max_new_tokens == 0


def test_perplexity_fixture(fixture_dir, tokenizer):
    rows = [json.loads(line) for line in (FIXTURES / "corpus/python-3.11-docs.jsonl").read_text().splitlines()]
    texts = {row["path"]: row["text"] for row in rows}
    settings = {"lengths": [64], "continuation_tokens": 16}
    samples = load_task("perplexity", make_options(fixture_dir, tokenizer, **settings))
    assert sorted(sample.extra["path"] for sample in samples) == ["howto/kites.rst.txt", "library/teapot.rst.txt"]
    check_perplexity(tokenizer, samples, texts, 64, 16)
    assert samples == load_task("perplexity", make_options(fixture_dir, tokenizer, **settings))
    limited = load_task("perplexity", make_options(fixture_dir, tokenizer, limit=1, **settings))
    assert limited == samples[:1]


def test_perplexity_real(real_dir, tokenizer):
    with gzip.open(real_dir / synthetic.DOCS_FILE, "rt") as handle:
        texts = {row["path"]: row["text"] for row in map(json.loads, handle)}
    samples = load_task("perplexity", make_options(real_dir, tokenizer, limit=3))
    assert len(samples) == 3
    check_perplexity(tokenizer, samples, texts, 2048, 256)
    other = load_task("perplexity", make_options(real_dir, tokenizer, limit=3, seed=1))
    assert [sample.id for sample in samples] != [sample.id for sample in other]
