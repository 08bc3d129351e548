"""Training checkpoints: safetensors files written atomically and verified before loading.

A checkpoint is a folder::

    step-000100/
        weights.safetensors   trained tensors: LoRA adapters and gist rows, or every weight
        state.safetensors     optimiser moments and the torch RNG state (absent in exports)
        trainer.json          step, resolved config, schedule, gist tokens, base-model fingerprint
        manifest.json         size and SHA-256 of every other file, written last

It is written under a temporary name and renamed into place, so a run killed while saving leaves
no half-written checkpoint under the final name. Loading checks the manifest (sizes and hashes)
before reading any tensor, so a truncated or corrupt file is rejected without loading half of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gsa.errors import InvalidInputError

logger = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"
STATE = "state.safetensors"
TRAINER = "trainer.json"
MANIFEST = "manifest.json"
LATEST = "latest"  # text file in the run folder naming the newest complete checkpoint
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A verified checkpoint: its folder, trained tensors, trainer record and optional state."""

    path: Path
    weights: dict[str, torch.Tensor]
    trainer: dict
    state: dict[str, torch.Tensor] | None


def model_fingerprint(model) -> str:
    """Hash the base model's architecture and a few weights, to recognise checkpoints made from it.

    The hash covers the config's shape fields, the input embedding rows of the original vocabulary
    and the first linear weight. Gist rows added later are left out.
    """
    config = model.config
    fields = {k: getattr(config, k, None) for k in (
        "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "intermediate_size", "max_position_embeddings",
    )}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    embed = model.get_input_embeddings().weight.detach()
    digest.update(embed[: getattr(config, "vocab_size", embed.shape[0])].float().contiguous().numpy().tobytes())
    first_linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    digest.update(first_linear.weight.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    folder: Path, weights: dict[str, torch.Tensor], trainer: dict, state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint to ``folder`` atomically and return it.

    An existing folder of the same name is replaced only after the new one is complete.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
    if state is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / STATE))
    _write_json(tmp / TRAINER, {"format_version": FORMAT_VERSION, **trainer})
    files = sorted(p.name for p in tmp.iterdir())
    manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in files}
    _write_json(tmp / MANIFEST, manifest)
    _fsync_dir(tmp)

    # Swap the complete folder in: the old copy (if any) moves aside first and is removed after.
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)
    _fsync_dir(folder.parent)
    return folder


def _write_json(path: Path, data: dict) -> None:
    with path.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def mark_latest(run_dir: Path, checkpoint: Path) -> None:
    """Point the run folder's ``latest`` file at ``checkpoint``, atomically."""
    tmp = run_dir / (LATEST + ".tmp")
    tmp.write_text(checkpoint.name + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / LATEST)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Return the newest complete checkpoint of a run folder, or None if it has none."""
    marker = Path(run_dir) / LATEST
    if marker.is_file():
        candidate = Path(run_dir) / marker.read_text(encoding="utf-8").strip()
        if (candidate / MANIFEST).is_file():
            return candidate
    complete = sorted(p for p in Path(run_dir).glob("step-*") if (p / MANIFEST).is_file())
    return complete[-1] if complete else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints of a run folder."""
    complete = sorted(p for p in Path(run_dir).glob("step-*") if p.is_dir() and not p.name.endswith((".tmp", ".old")))
    for old in complete[:-keep]:
        shutil.rmtree(old)


def load_checkpoint(path: str | Path, with_state: bool = True, weights: bool = True) -> Checkpoint:
    """Verify and read a checkpoint folder (or a run folder, meaning its latest checkpoint).

    ``weights=False`` reads only ``trainer.json`` (still verified), leaving ``weights`` empty.
    """
    path = Path(path)
    if path.is_dir() and not (path / MANIFEST).exists():
        found = latest_checkpoint(path)
        if found is None:
            raise InvalidInputError(f"{path} contains no complete checkpoint (no {MANIFEST}); pass a checkpoint folder")
        path = found
    if not (path / MANIFEST).is_file():
        raise InvalidInputError(f"checkpoint {path} not found or incomplete (no {MANIFEST}); pass a checkpoint folder")

    manifest = _read_json(path / MANIFEST, path)
    for name, entry in manifest.items():
        file = path / name
        if not file.is_file():
            raise InvalidInputError(f"checkpoint {path} is missing {name}; it is incomplete, use an earlier checkpoint")
        if file.stat().st_size != entry["bytes"] or _sha256(file) != entry["sha256"]:
            raise InvalidInputError(
                f"checkpoint file {file} is corrupt or truncated (size or SHA-256 differs from {MANIFEST}); "
                "use an earlier checkpoint or retrain"
            )
    trainer = _read_json(path / TRAINER, path)
    tensors = load_file(str(path / WEIGHTS)) if weights else {}
    state = load_file(str(path / STATE)) if with_state and weights and (path / STATE).is_file() else None
    return Checkpoint(path, tensors, trainer, state)


def _read_json(file: Path, checkpoint: Path) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise InvalidInputError(f"checkpoint {checkpoint}: {file.name} is unreadable ({error}); use an earlier checkpoint") from error


def check_compatible(trainer: dict, fingerprint: str, ratios: list[str], path: Path) -> None:
    """Raise InvalidInputError if a checkpoint was trained from another base model or not for every ratio in ``ratios``."""
    if trainer.get("base_fingerprint") != fingerprint:
        raise InvalidInputError(
            f"checkpoint {path} was trained from another base model ({trainer.get('base')!r}, fingerprint "
            f"{trainer.get('base_fingerprint')}, this model's is {fingerprint}); load it with its own base model"
        )
    trained = list(trainer.get("ratios", []))
    missing = [ratio for ratio in ratios if ratio not in trained]
    if missing:
        raise InvalidInputError(
            f"checkpoint {path} was trained for ratios {trained}, not {missing}; "
            f"use --ratio {','.join(trained)} or a checkpoint trained for {','.join(missing)}"
        )


def export_checkpoint(source: str | Path, target: str | Path, overwrite: bool = False) -> Path:
    """Copy a checkpoint's trained weights and record to ``target`` without the optimiser state.

    The export is what inference needs (and what a later run's ``run.init_from`` reads); it
    cannot be resumed with ``--resume``. ``target`` must not exist, unless ``overwrite`` is set
    and it is itself a checkpoint folder. It may not be the source run or lie inside it.
    """
    checkpoint = load_checkpoint(source, with_state=False)
    target = Path(target)
    _check_export_target(Path(source), target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in checkpoint.trainer.items() if k != "format_version"}
    record["exported_from"] = checkpoint.path.name
    return save_checkpoint(target, checkpoint.weights, record)


def _check_export_target(source: Path, target: Path, overwrite: bool) -> None:
    source, resolved = source.resolve(), target.resolve()
    if resolved == source or source in resolved.parents:
        raise InvalidInputError(f"export target {target} is the source {source} or inside it; pass a new folder")
    if not target.exists():
        return
    if not overwrite:
        raise InvalidInputError(f"export target {target} already exists; pass a new folder (or --force to replace a checkpoint)")
    if not (target.is_dir() and (target / MANIFEST).is_file()):
        raise InvalidInputError(f"export target {target} exists and is not a checkpoint folder; pass a new folder")
