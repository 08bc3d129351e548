"""Integration on the embedded SmolLM2-135M-Instruct with a real document of over 4,000 tokens."""

from __future__ import annotations

import json
from importlib import resources

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def generator():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from gsa.engine import GistGenerator
    from gsa.model import load_model

    model, tokenizer = load_model()
    return GistGenerator(model, tokenizer)


@pytest.fixture(scope="module")
def sample():
    data = resources.files("gsa.data")
    document = data.joinpath("sample_document.md").read_text(encoding="utf-8")
    questions = json.loads(data.joinpath("sample_questions.json").read_text(encoding="utf-8"))
    return document, questions


def test_sample_document_is_long(generator, sample):
    document, _ = sample
    assert len(generator.tokenizer(document)["input_ids"]) >= 4000


def test_full_and_gsa_on_sample(generator, sample):
    from gsa.config import GSAConfig
    from gsa.layout import GistSpec

    document, questions = sample
    question, answer = questions[0]["question"], questions[0]["answer"]
    spec = GistSpec(chunk_size=16)
    (full,) = generator.generate([document], [question], GSAConfig(spec=spec, method="full"), max_new_tokens=24)
    (sparse,) = generator.generate([document], [question], GSAConfig(spec=spec, prefill="dense"), max_new_tokens=8)

    assert answer.lower() in full.answer.lower()
    assert full.mean_attended_kv_fraction == 1.0
    assert full.gist_tokens == 0
    assert sparse.gist_tokens == (full.context_tokens - spec.sinks) // spec.chunk_size
    assert sparse.mean_attended_kv_fraction < 0.25
    assert sparse.decode_steps >= 1


def test_essay_fractions_at_ratio_16(generator):
    """On a real essay, gsa at 16x reads under a quarter of the keys full attention reads."""
    import os
    from pathlib import Path

    from gsa.config import GSAConfig
    from gsa.layout import GistSpec

    data = Path(os.environ.get("GSA_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    essay_path = data / "haystack" / "paul_graham_essays" / "apple.txt"
    if not essay_path.is_file():
        pytest.skip(f"essay {essay_path} not found; set GSA_DATA_DIR to the data folder")
    essay = essay_path.read_text(encoding="utf-8")
    question = "Which company is this essay about?"
    spec = GistSpec(chunk_size=16)
    (sparse,) = generator.generate([essay], [question], GSAConfig(spec=spec, prefill="dense"), max_new_tokens=8)
    (full,) = generator.generate([essay], [question], GSAConfig(spec=spec, method="full"), max_new_tokens=8)
    assert sparse.mean_attended_kv_fraction < 0.25
    assert full.mean_attended_kv_fraction == 1.0
    assert "apple" in full.answer.lower()
