"""Trainable weights: which ones train, how they are saved, and how a checkpoint is put back on a model.

With LoRA (peft), the trained tensors are the adapters plus the gist token rows (peft's trainable
token indices, which also cover a tied output embedding). With full fine-tuning they are every
weight. Either way a checkpoint stores exactly ``trainable_tensors(model)``, and applying it
rebuilds the same structure on a fresh base model before loading them.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from gsa.errors import InvalidInputError
from gsa.model import enable_gsa, load_model
from gsa.train.checkpoint import check_compatible, load_checkpoint, model_fingerprint
from gsa.train.config import AdapterSection

logger = logging.getLogger(__name__)


def prepare_model(base: str, levels: int, adapter: AdapterSection):
    """Load the base model, add gist tokens, and wrap it for training.

    Returns ``(model, tokenizer, gist_ids, fingerprint)``. The fingerprint is taken before the
    gist rows are added, so it identifies the base model alone.
    """
    model, tokenizer = load_model(base)
    fingerprint = model_fingerprint(model)
    gist_ids = enable_gsa(model, tokenizer, levels=levels)
    if adapter.kind == "lora":
        model = _add_lora(model, adapter, gist_ids)
    else:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    return model, tokenizer, gist_ids, fingerprint


def _add_lora(model, adapter: AdapterSection, gist_ids: list[int]):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules, trainable_token_indices=list(gist_ids), task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            # peft 0.21 calls a transformers method that transformers 5 marks deprecated.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, config)
    except ValueError as error:
        raise InvalidInputError(f"LoRA could not be added ({error}); check adapter.target_modules") from error
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("LoRA rank %d: %d trainable parameters", adapter.rank, trainable)
    return model


def trainable_tensors(model) -> dict[str, torch.Tensor]:
    """Return the trained tensors by parameter name (the contents of ``weights.safetensors``)."""
    return {name: p.detach() for name, p in _unwrap(model).named_parameters() if p.requires_grad}


def load_trainable(model, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Copy checkpoint tensors into the model's trainable parameters; every name must match."""
    params = dict(p for p in _unwrap(model).named_parameters() if p[1].requires_grad)
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise InvalidInputError(
            f"checkpoint {path} does not fit this model ({len(missing)} tensors missing, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}); use the adapter settings it was trained with"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            if params[name].shape != tensor.shape:
                raise InvalidInputError(f"checkpoint {path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}")
            params[name].copy_(tensor)


def _unwrap(model):
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module


def load_trained_model(path: str | Path, ratios: list[str] | None = None):
    """Load a trained GSA checkpoint for inference: base model, gist tokens and trained weights.

    Returns ``(model, tokenizer, trainer)`` where ``trainer`` is the checkpoint's record (config,
    steps, tokens seen). LoRA adapters are merged into the base weights for speed. ``ratios``
    (for example ``["16"]``) must be among the ratios the checkpoint was trained for.
    """
    checkpoint = load_checkpoint(path, with_state=False)
    trainer = checkpoint.trainer
    config = trainer["config"]
    adapter = AdapterSection(**config["adapter"])
    model, tokenizer, _, fingerprint = prepare_model(config["model"]["base"], trainer.get("levels", 1), adapter)
    check_compatible(trainer, fingerprint, ratios or [], checkpoint.path)
    load_trainable(model, checkpoint.weights, checkpoint.path)
    if adapter.kind == "lora":
        model = model.merge_and_unload()
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    logger.info("loaded trained checkpoint %s (step %s)", checkpoint.path, trainer.get("step"))
    return model, tokenizer, trainer
