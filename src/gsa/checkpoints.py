"""Find and load the model that inference commands use: a trained checkpoint or a base model.

Without ``--model`` or ``--checkpoint``, commands use the trained GSA checkpoint of the embedded
model when one is found: ``$GSA_CHECKPOINT``, else ``checkpoints/smollm2-135m-gsa16`` of the
source tree this package runs from (an editable install). Otherwise they fall back to the untrained
embedded model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from gsa.errors import InvalidInputError

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "smollm2-135m-gsa16"
NO_CHECKPOINT = "none"


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    name: str
    trained: bool  # True when gists were trained, so the gist-mask prefill is the right default
    ratios: list[str]


def default_checkpoint() -> Path | None:
    """Return the checkpoint used when none is named, or None if there is none."""
    named = os.environ.get("GSA_CHECKPOINT")
    if named:
        return None if named == NO_CHECKPOINT else Path(named)
    bundled = Path(__file__).resolve().parents[2] / "checkpoints" / DEFAULT_CHECKPOINT
    return bundled if (bundled / "manifest.json").is_file() else None


def resolve_checkpoint(model: str | None, checkpoint: str | None) -> Path | None:
    """Return the checkpoint folder a command will load, or None for an untrained model, without loading it."""
    if model is not None and checkpoint not in (None, NO_CHECKPOINT):
        raise InvalidInputError("--model and --checkpoint both set; a checkpoint names its own base model, so pass one")
    if checkpoint is not None:
        return None if checkpoint == NO_CHECKPOINT else Path(checkpoint)
    return default_checkpoint() if model is None else None


def checkpoint_ratios(path: Path) -> list[str]:
    """Read the ratios a checkpoint was trained for from its ``trainer.json`` (no weights are read)."""
    from gsa.train.checkpoint import load_checkpoint

    record = load_checkpoint(path, with_state=False, weights=False).trainer
    return list(record.get("ratios", []))


def load_for_inference(model: str | None, checkpoint: str | None) -> LoadedModel:
    """Load ``--checkpoint`` (trained), else ``--model`` (untrained), else the default checkpoint or model."""
    from gsa.model import load_model
    from gsa.train.weights import load_trained_model

    path = resolve_checkpoint(model, checkpoint)
    if path is None:
        loaded, tokenizer = load_model(model)
        return LoadedModel(loaded, tokenizer, model or "smollm2-135m", trained=False, ratios=[])
    loaded, tokenizer, record = load_trained_model(path)
    logger.info("using trained checkpoint %s", path)
    return LoadedModel(loaded, tokenizer, str(path), trained=True, ratios=list(record.get("ratios", [])))
