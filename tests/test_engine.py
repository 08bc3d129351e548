"""Tests of GistGenerator on a tiny random Llama with the real SmolLM2 tokenizer.

They cover the gist token and its embedding rows, its suppression in generation, batching, input
checks and word-boundary chunking.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from conftest import tiny_llama_config
from gsa.cache import GistCache
from gsa.config import GSAConfig
from gsa.engine import GistGenerator
from gsa.errors import InvalidInputError
from gsa.layout import GistSpec, TokenKind
from gsa.model import GIST_TOKEN, load_model

SPEC = GistSpec(chunk_size=4)
CONTEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat. " * 3
QUESTION = "Who sleeps?"


def fresh_tokenizer(folder):
    """Load the tokenizer without a gist token, because GistGenerator adds one to the object it gets."""
    return AutoTokenizer.from_pretrained(folder)


def tiny_model(tokenizer, tie_word_embeddings: bool, seed: int = 0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(len(tokenizer), tie_word_embeddings)).eval()


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    return GistGenerator(model, tokenizer)


class RecordingStreamer:
    """A ``generate`` streamer that keeps every generated token id and skips the prompt."""

    def __init__(self):
        self.prompt_seen = False
        self.ids: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def test_gist_token_added_once(tiny_model_dir):
    tokenizer = fresh_tokenizer(tiny_model_dir)
    model = tiny_model(tokenizer, tie_word_embeddings=False)
    vocab = len(tokenizer)

    first = GistGenerator(model, tokenizer)
    assert len(tokenizer) == vocab + 1
    assert first.gist_ids == [tokenizer.convert_tokens_to_ids(GIST_TOKEN)]
    assert first.gist_ids == [vocab]
    assert model.get_input_embeddings().weight.shape[0] == vocab + 1
    assert model.get_output_embeddings().weight.shape[0] == vocab + 1

    second = GistGenerator(model, tokenizer)
    assert len(tokenizer) == vocab + 1
    assert second.gist_ids == first.gist_ids
    assert model.get_input_embeddings().weight.shape[0] == vocab + 1
    assert model.get_output_embeddings().weight.shape[0] == vocab + 1


def test_gist_rows_are_mean_untied(tiny_model_dir):
    tokenizer = fresh_tokenizer(tiny_model_dir)
    model = tiny_model(tokenizer, tie_word_embeddings=False)
    old_input = model.get_input_embeddings().weight.detach().clone()
    old_output = model.get_output_embeddings().weight.detach().clone()

    (gist,) = GistGenerator(model, tokenizer).gist_ids
    new_input = model.get_input_embeddings().weight.detach()
    new_output = model.get_output_embeddings().weight.detach()
    torch.testing.assert_close(new_input[gist], old_input.mean(dim=0))
    torch.testing.assert_close(new_output[gist], old_output.mean(dim=0))
    torch.testing.assert_close(new_input[:gist], old_input)
    torch.testing.assert_close(new_output[:gist], old_output)


def test_gist_row_is_mean_tied(tiny_model_dir):
    tokenizer = fresh_tokenizer(tiny_model_dir)
    model = tiny_model(tokenizer, tie_word_embeddings=True)
    old_input = model.get_input_embeddings().weight.detach().clone()

    (gist,) = GistGenerator(model, tokenizer).gist_ids
    torch.testing.assert_close(model.get_input_embeddings().weight[gist].detach(), old_input.mean(dim=0))
    torch.testing.assert_close(model.get_output_embeddings().weight[gist].detach(), old_input.mean(dim=0))


def test_second_enable_keeps_gist_row(tiny_model_dir):
    """Enabling again must not reset a gist embedding that was changed (for example by training)."""
    tokenizer = fresh_tokenizer(tiny_model_dir)
    model = tiny_model(tokenizer, tie_word_embeddings=False)
    (gist,) = GistGenerator(model, tokenizer).gist_ids
    with torch.no_grad():
        model.get_input_embeddings().weight[gist] = 1.0

    GistGenerator(model, tokenizer)
    assert torch.all(model.get_input_embeddings().weight[gist] == 1.0)


@pytest.mark.parametrize("do_sample", [False, True])
def test_gist_never_generated(tiny_model_dir, do_sample):
    tokenizer = fresh_tokenizer(tiny_model_dir)
    model = tiny_model(tokenizer, tie_word_embeddings=False)
    generator = GistGenerator(model, tokenizer)
    (gist,) = generator.gist_ids
    config = GSAConfig(spec=SPEC)
    batch = generator.build_batch([CONTEXT], [QUESTION], config, max_new_tokens=8)

    # Point the gist's output row along the last prompt token's final hidden state, 10^4 long,
    # so that its logit dwarfs every other one.
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, gist_batch=batch,
                    gsa_config=config, output_hidden_states=True)
        hidden = out.hidden_states[-1][0, -1]
        model.get_output_embeddings().weight[gist] = 1e4 * hidden / hidden.norm()
        unsuppressed = model.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
            cache=GistCache(model.config, batch, config), max_new_tokens=8, do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    assert unsuppressed[0, batch.input_ids.shape[1]] == gist

    streamer = RecordingStreamer()
    torch.manual_seed(0)
    generator.generate([CONTEXT], [QUESTION], config, max_new_tokens=8, do_sample=do_sample, streamer=streamer,
                       stop_at_newline=False)
    assert len(streamer.ids) == 8
    assert gist not in streamer.ids


@pytest.mark.parametrize("method", ["gsa", "full"])
def test_batch_equals_single(generator, method):
    config = GSAConfig(spec=SPEC, method=method)
    contexts = [CONTEXT, "A short note about the weather, which is mild and dry today."]
    questions = [QUESTION, "How is the weather?"]

    options = dict(max_new_tokens=6, stop_at_newline=False)
    together = generator.generate(contexts, questions, config, **options)
    for row in range(2):
        (alone,) = generator.generate([contexts[row]], [questions[row]], config, **options)
        assert together[row].answer == alone.answer
        assert together[row].context_tokens == alone.context_tokens
        assert together[row].gist_tokens == alone.gist_tokens


def test_batch_rows_differ_in_length(generator):
    """Guards the test above: its two contexts must need left padding."""
    config = GSAConfig(spec=SPEC)
    contexts = [CONTEXT, "A short note about the weather, which is mild and dry today."]
    batch = generator.build_batch(contexts, [QUESTION, "How is the weather?"], config)
    assert int((batch.kind[1] == TokenKind.PAD).sum()) > 0


@pytest.mark.parametrize("context", ["", " \n\t "])
def test_build_batch_empty_context(generator, context):
    with pytest.raises(InvalidInputError, match="context is empty"):
        generator.build_batch([context], [QUESTION], GSAConfig(spec=SPEC))


def test_build_batch_count_mismatch(generator):
    with pytest.raises(InvalidInputError, match="2 contexts but 1 questions"):
        generator.build_batch([CONTEXT, CONTEXT], [QUESTION], GSAConfig(spec=SPEC))


def test_generate_context_too_long(generator):
    with pytest.raises(InvalidInputError, match="over the model's 256 positions"):
        generator.generate(["word " * 300], [QUESTION], GSAConfig(spec=SPEC), max_new_tokens=4)


# Words of one to four tokens each, so every chunk end at C = 6 is at most C // 2 = 3 tokens before
# a word start; plain chunking splits several of them.
WORDY = (
    "Internationalization unbelievably hypothetically reorganized photosynthesis questionnaires "
    "extraordinary misunderstandings antidisestablishment counterproductive "
) * 3


def chunk_ends(generator, word_boundary: bool) -> tuple[list[int], list[str]]:
    """Return the context index after each chunk, and the context's tokens."""
    config = GSAConfig(spec=GistSpec(chunk_size=6, word_boundary=word_boundary))
    batch = generator.build_batch([WORDY], [QUESTION], config)
    kind, positions = batch.kind[0], batch.position_ids[0]
    ends = [int(p) + 1 for p in positions[kind == TokenKind.GIST]]
    context_ids = generator.tokenizer(WORDY, add_special_tokens=True)["input_ids"]
    return ends, generator.tokenizer.convert_ids_to_tokens(context_ids)


def starts_word(token: str) -> bool:
    return token.startswith("Ġ") or not token[:1].isalnum()


def test_word_boundary_text_has_short_words(generator):
    """Guards the test below: no word is longer than the C // 2 + 1 tokens a shift can cross."""
    _, tokens = chunk_ends(generator, word_boundary=False)
    word_lengths, length = [], 0
    for token in tokens:
        if starts_word(token) and length:
            word_lengths.append(length)
            length = 0
        length += 1
    word_lengths.append(length)
    assert max(word_lengths) <= 4


def test_plain_chunks_split_words(generator):
    ends, tokens = chunk_ends(generator, word_boundary=False)
    assert any(not starts_word(tokens[end]) for end in ends if end < len(tokens))


def test_word_boundary_chunk_ends(generator):
    ends, tokens = chunk_ends(generator, word_boundary=True)
    inside = [end for end in ends if end < len(tokens)]
    assert len(inside) >= 5
    for end in inside:
        assert starts_word(tokens[end]), f"chunk ends before {tokens[end]!r} at {end}, inside a word"


def test_word_boundary_chunk_lengths(generator):
    ends, _ = chunk_ends(generator, word_boundary=True)
    lengths = [b - a for a, b in zip([3] + ends[:-1], ends)]
    assert min(lengths) >= 6
    assert max(lengths) <= 9
