"""Shared fixtures: tiny random models of several families and a relative-error metric."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
    Qwen2Config, Qwen2ForCausalLM,
)

from gsa import attention

VOCAB = 128
GIST_ID = VOCAB - 1


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Frobenius-norm error of ``actual`` relative to ``expected``."""
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm().clamp(min=1e-12))


def skip_unavailable(kernel: str) -> None:
    """Skip the calling test, with the reason, when the recall ``kernel`` cannot run here."""
    if kernel == "cpp":
        from gsa.ops.cpu_kernel import cpp_unavailable_reason

        reason = cpp_unavailable_reason()
        if reason is not None:
            pytest.skip(reason)


def _common(heads: int, kv_heads: int) -> dict:
    return dict(
        vocab_size=VOCAB, hidden_size=16 * heads, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=1024,
    )


def make_model(family: str = "llama", heads: int = 4, kv_heads: int = 2, seed: int = 0):
    """A tiny random causal LM of ``family`` with the ``gsa`` attention switched on."""
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_common(heads, kv_heads)))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_common(heads, kv_heads)))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**_common(heads, kv_heads), sliding_window=None))
    elif family == "gemma-sliding":
        config = Gemma3TextConfig(
            **_common(heads, kv_heads), sliding_window=12,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
        model = Gemma3ForCausalLM(config)
    else:
        raise ValueError(family)
    attention.register()
    model.set_attn_implementation("gsa")
    return model.eval()


@pytest.fixture
def tiny_llama():
    return make_model("llama")


TINY_POSITIONS = 256


def tiny_llama_config(vocab_size: int, tie_word_embeddings: bool = True) -> LlamaConfig:
    """A 2-layer GQA Llama config (4 query heads, 2 KV heads) with 256 positions."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=TINY_POSITIONS, tie_word_embeddings=tie_word_embeddings,
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A directory with a tiny random Llama and the real SmolLM2 tokenizer, loadable with ``--model``.

    The tokenizer comes from the embedded GGUF file, so no hub is contacted. It is saved without
    the gist token; each load adds its own.
    """
    from transformers import AutoTokenizer

    from gsa.model import embedded_model_path

    gguf = embedded_model_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory) -> Path:
    """A data directory made from the fixtures, with the files that loaders read as gzip compressed."""
    folder = tmp_path_factory.mktemp("task-data") / "data"
    shutil.copytree(FIXTURES, folder)
    for plain in [*folder.glob("lost-in-the-middle/*.jsonl"), *folder.glob("corpus/*.jsonl")]:
        with gzip.open(plain.with_name(plain.name + ".gz"), "wb") as handle:
            handle.write(plain.read_bytes())
        plain.unlink()
    return folder

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"


def decode_steps(model, batch, config, tokens: list[list[int]]):
    """Prefill ``batch`` into a GistCache, then feed ``tokens`` one step at a time.

    Returns the logits of the last prompt token followed by those of each step, (B, steps + 1, V),
    and the cache.
    """
    from gsa.cache import GistCache

    cache = GistCache(model.config, batch, config)
    outputs = []
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, cache=cache)
        outputs.append(out.logits[:, -1])
        position = batch.position_ids[:, -1:]
        for step in range(len(tokens[0])):
            position = position + 1
            ids = torch.tensor([[row[step]] for row in tokens])
            outputs.append(model(input_ids=ids, position_ids=position, cache=cache).logits[:, -1])
    return torch.stack(outputs, dim=1), cache
