"""Shared fixtures: tiny random models of several families and a relative-error metric."""

from __future__ import annotations

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
