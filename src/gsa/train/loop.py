"""The training loop: stage 1 (continued pretraining) and stage 2 (selective fine-tuning).

Both stages run the model with the ``gsa`` attention and no cache, the context under the gist mask.
In stage 2 the suffix (question and answer) also runs with hard top-k selection of chunks, so
gradients flow through attention over what was selected. The loop runs under ``accelerate``, so
the same code serves one CPU process and ``accelerate launch`` on several processes (DDP).

Data order is a pure function of (seed, step): the micro-batch of optimiser step s, accumulation
index a and process rank r is fixed, so a resumed run trains on exactly the batches an uninterrupted
run would have seen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from gsa.config import GSAConfig
from gsa.errors import InvalidInputError
from gsa.layout import GistSpec, parse_ratio
from gsa.train import batches
from gsa.train.checkpoint import (
    check_compatible, latest_checkpoint, load_checkpoint, mark_latest, prune_checkpoints, save_checkpoint,
)
from gsa.train.config import TrainConfig
from gsa.train.data import IGNORE, TrainBatch
from gsa.train.distill import Recorder, router_distill_loss, selecting_layers
from gsa.train.weights import load_trainable, prepare_model, trainable_tensors

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Outcome of a finished or stopped run."""

    out_dir: Path
    step: int
    last_loss: float | None  # None when nothing was trained or logged
    checkpoint: Path | None
    history: list[dict] = field(default_factory=list)
    main_process: bool = True  # False on the other ranks of a multi-process run


def layout_spec(ratio: str, model: TrainConfig) -> GistSpec:
    """Return the gist layout of one ratio string: ``"16"`` for one level, ``"4x4"`` for two.

    Sinks and the local window come from the config's model section.
    """
    sizes = parse_ratio(ratio, "model.ratios")
    return GistSpec.from_sizes(sizes, sinks=model.model.sinks, window_chunks=model.model.window_chunks)


def gist_levels(specs: dict[str, GistSpec]) -> int:
    """Return the gist levels the deepest layout needs: one gist token is trained per level."""
    return max(spec.num_levels for spec in specs.values())


def lr_factor(step: int, steps: int, warmup_fraction: float) -> float:
    """Linear warm-up over the first ``warmup_fraction`` of ``steps``, then cosine decay to zero."""
    warmup = int(round(steps * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def token_loss(model, batch: TrainBatch, gsa_config: GSAConfig, **extra) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the batch's target columns; returns (loss, target count).

    ``extra`` keyword arguments reach the attention function (``gsa_recorder=`` for distillation).
    """
    layout = batch.batch
    logits = model(
        input_ids=layout.input_ids, position_ids=layout.position_ids, gist_batch=layout, gsa_config=gsa_config,
        use_cache=False, **extra,
    ).logits  # (B, L, V)
    count = int((batch.targets != IGNORE).sum())
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=IGNORE)
    return loss, count


class Trainer:
    """One training run, from config to checkpoints, metrics and a loss curve."""

    def __init__(self, config: TrainConfig, resume: bool = False):
        from accelerate import Accelerator

        self.config = config
        self.out_dir = Path(config.run.out_dir)
        self.specs = {ratio: layout_spec(ratio, config) for ratio in config.model.ratios}
        self.levels = gist_levels(self.specs)
        # Without an accelerator, cpu=True makes accelerate join several launched processes over gloo.
        self.accelerator = Accelerator(
            mixed_precision=_mixed_precision(config.optim.precision), cpu=not torch.accelerator.is_available()
        )
        torch.manual_seed(config.run.seed)

        model, self.tokenizer, self.gist_ids, self.fingerprint = prepare_model(
            config.model.base, levels=self.levels, adapter=config.adapter
        )
        if config.run.init_from:
            self._init_weights(model, Path(config.run.init_from))
        if config.optim.gradient_checkpointing:
            _enable_activation_checkpointing(model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=config.optim.lr, betas=tuple(config.optim.betas), weight_decay=config.optim.weight_decay
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.source = batches.build_source(config, self.tokenizer, self.gist_ids, self.specs)

        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        self.history: list[dict] = []
        if resume:
            self._resume()

    def _init_weights(self, model, path: Path) -> None:
        checkpoint = load_checkpoint(path, with_state=False)
        check_compatible(checkpoint.trainer, self.fingerprint, [], checkpoint.path)
        levels = checkpoint.trainer.get("levels", 1)
        if levels != self.levels:
            raise InvalidInputError(
                f"run.init_from: checkpoint {checkpoint.path} has gist tokens for {levels} level(s), but model.ratios "
                f"{self.config.model.ratios} need {self.levels}; list ratios with the same deepest level count, "
                "or leave run.init_from empty"
            )
        load_trainable(model, checkpoint.weights, checkpoint.path)
        logger.info("initialised weights from %s", checkpoint.path)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def run(self, max_steps: int | None = None) -> TrainResult:
        """Train until ``optim.steps`` (or ``max_steps`` steps from here), saving as configured."""
        from tqdm.auto import tqdm

        steps = self.config.optim.steps
        stop = steps if max_steps is None else min(steps, self.step + max_steps)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        progress = tqdm(total=steps, initial=self.step, desc="train", disable=not self.is_main, unit="step")
        last_saved = None
        while self.step < stop:
            record = self._optimizer_step()
            self.history.append(record)
            progress.update(1)
            if self.step % self.config.run.save_every == 0 or self.step == stop:
                last_saved = self.save()
        progress.close()
        if self.is_main and self.history:
            from gsa.train.report import plot_loss

            plot_loss(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")
        if not self.history:  # a resumed run that had already reached optim.steps
            logger.info("the run in %s is already complete at step %d", self.out_dir, self.step)
            last_saved = latest_checkpoint(self.out_dir)
        last = self.history[-1]["loss"] if self.history else _last_logged_loss(self.out_dir / "metrics.jsonl")
        return TrainResult(self.out_dir, self.step, last, last_saved, self.history, self.is_main)

    def _optimizer_step(self) -> dict:
        """Accumulate ``grad_accum`` micro-batches, clip, step; log one line and one JSON record."""
        optim = self.config.optim
        start = time.perf_counter()
        lr = optim.lr * lr_factor(self.step, optim.steps, optim.warmup_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        total_loss, total_distill, total_tokens = 0.0, 0.0, 0
        for micro in range(optim.grad_accum):
            batch, ratio = self.source.micro_batch(self.step, micro, self.accelerator.process_index, self.accelerator.num_processes)
            batch = batch.to(self.accelerator.device)
            gsa_config = GSAConfig(spec=self.specs[ratio], method="gsa", prefill="gist")
            sync = micro == optim.grad_accum - 1
            context = self.accelerator.no_sync(self.model) if not sync else contextlib.nullcontext()
            with context, self.accelerator.autocast():
                loss, distill = self._micro_loss(batch, gsa_config)
                self.accelerator.backward((loss + self.config.distill.weight * distill) / optim.grad_accum)
            total_loss += float(loss.detach()) / optim.grad_accum
            total_distill += float(distill.detach()) / optim.grad_accum
            total_tokens += int(batch.batch.attention_mask.sum())

        if optim.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), optim.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

        seconds = time.perf_counter() - start
        tokens = total_tokens * self.accelerator.num_processes
        self.tokens_seen += tokens
        self.elapsed += seconds
        loss_all = float(self.accelerator.reduce(torch.tensor(total_loss, device=self.accelerator.device), "mean"))
        record = {
            "step": self.step, "loss": loss_all, "lr": lr, "tokens_per_s": tokens / seconds, "seconds": seconds,
            "tokens_seen": self.tokens_seen,
        }
        if self.config.distill.weight > 0:
            record["distill"] = float(self.accelerator.reduce(torch.tensor(total_distill, device=self.accelerator.device), "mean"))
        if self.is_main:
            logger.info(
                "step %d/%d loss %.4f lr %.2e %.0f tok/s %.1f s", self.step, optim.steps, loss_all, lr,
                record["tokens_per_s"], seconds,
            )
            with (self.out_dir / "metrics.jsonl").open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        return record

    def _micro_loss(self, batch: TrainBatch, gsa_config: GSAConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Token loss of one micro-batch, and the router distillation term (zero when it is off)."""
        distill = self.config.distill
        if distill.weight <= 0 or batch.batch.suffix_index.shape[1] == 0:
            loss, _ = token_loss(self.model, batch, gsa_config)
            return loss, torch.zeros((), device=loss.device)
        model = self.accelerator.unwrap_model(self.model)
        student = Recorder(selecting_layers(model.config.num_hidden_layers, gsa_config))
        loss, _ = token_loss(self.model, batch, gsa_config, gsa_recorder=student)
        return loss, router_distill_loss(model, batch.batch, gsa_config, student, distill.temperature)

    def trainer_record(self) -> dict:
        return {
            "step": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed,
            "config": self.config.to_dict(), "ratios": list(self.config.model.ratios), "levels": self.levels,
            "base": self.config.model.base, "base_fingerprint": self.fingerprint,
            "gist_tokens": self.tokenizer.convert_ids_to_tokens(self.gist_ids), "gist_ids": list(self.gist_ids),
            "world_size": self.accelerator.num_processes,
        }

    def save(self) -> Path | None:
        """Write ``step-NNNNNN`` (main process only) and prune old checkpoints."""
        self.accelerator.wait_for_everyone()
        path = None
        if self.is_main:
            model = self.accelerator.unwrap_model(self.model)
            path = save_checkpoint(
                self.out_dir / f"step-{self.step:06d}", trainable_tensors(model), self.trainer_record(),
                _optimizer_state(self.optimizer),
            )
            mark_latest(self.out_dir, path)
            prune_checkpoints(self.out_dir, self.config.run.keep_last)
            logger.info("saved %s", path)
        self.accelerator.wait_for_everyone()
        return path

    def _resume(self) -> None:
        path = latest_checkpoint(self.out_dir) if self.out_dir.is_dir() else None
        if path is None:
            raise InvalidInputError(f"--resume: no checkpoint in {self.out_dir}; start without --resume")
        checkpoint = load_checkpoint(path)
        check_compatible(checkpoint.trainer, self.fingerprint, list(self.config.model.ratios), checkpoint.path)
        changed = _changed_fields(checkpoint.trainer["config"], self.config.to_dict())
        if changed:
            raise InvalidInputError(
                f"--resume: the config differs from the one {checkpoint.path} was trained with ({', '.join(changed)}); "
                "resume with the same config or start a new run in another run.out_dir"
            )
        load_trainable(self.accelerator.unwrap_model(self.model), checkpoint.weights, checkpoint.path)
        _load_optimizer_state(self.optimizer, checkpoint.state, checkpoint.trainer)
        self.step = checkpoint.trainer["step"]
        self.tokens_seen = checkpoint.trainer["tokens_seen"]
        self.elapsed = checkpoint.trainer["elapsed_s"]
        _truncate_metrics(self.out_dir / "metrics.jsonl", self.step)
        logger.info("resumed from %s at step %d", checkpoint.path, self.step)


def _changed_fields(saved: dict, current: dict) -> list[str]:
    """Return ``section.field`` names whose values differ; fields the saved config lacks are skipped."""
    return sorted(
        f"{section}.{name}" for section, fields in saved.items() for name, value in fields.items()
        if current.get(section, {}).get(name, value) != value
    )


def _enable_activation_checkpointing(model) -> None:
    """Recompute decoder-layer activations in the backward pass (non-reentrant checkpointing)."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def _mixed_precision(precision: str) -> str:
    if precision == "bf16":
        return "bf16"
    if precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def _optimizer_state(optimizer) -> dict[str, torch.Tensor]:
    """Flatten AdamW's per-parameter state into named tensors for safetensors."""
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"optimizer.{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    return tensors


def _load_optimizer_state(optimizer, tensors: dict[str, torch.Tensor] | None, trainer: dict) -> None:
    if tensors is None:
        raise InvalidInputError("--resume: the checkpoint has no optimiser state (exports drop it); start a new run from it with run.init_from")
    current = optimizer.state_dict()
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])


def _last_logged_loss(path: Path) -> float | None:
    if not path.is_file():
        return None
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(lines[-1])["loss"] if lines else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric records after ``step``, which the resumed run writes again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def train(config: TrainConfig, resume: bool = False, max_steps: int | None = None) -> TrainResult:
    """Run (or resume) the training described by ``config``."""
    random.seed(config.run.seed)
    trainer = Trainer(config, resume=resume)
    return trainer.run(max_steps=max_steps)
