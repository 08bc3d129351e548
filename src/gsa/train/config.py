"""Typed training configs: YAML or TOML files that map onto dataclasses, field by field.

A config file has one table per section (``model``, ``data``, ``adapter``, ``optim``, ``run``,
``distill``). Unknown fields, wrong types and out-of-range values raise ``InvalidInputError``
naming the field, the value and what is accepted. Example (TOML)::

    [model]
    base = "smollm2-135m"
    ratios = ["16"]

    [data]
    stage = "pretrain"
    corpus = ["corpus/kjv.jsonl.gz"]
    seq_len = 1024

    [optim]
    steps = 100
    lr = 2e-4

    [run]
    out_dir = "runs/train/stage1"
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from gsa.errors import InvalidInputError
from gsa.layout import format_ratio, parse_ratio

STAGES = ("pretrain", "finetune")
ADAPTERS = ("lora", "full")
PRECISIONS = ("auto", "fp32", "bf16")
TASK_NAMES = ("rag-nq", "kv-retrieval", "passkey")


@dataclass
class ModelSection:
    """The base model and the gist layout it is trained for.

    Attributes:
        base: ``smollm2-135m`` (the embedded default), a local model directory or a ``.gguf`` file.
        ratios: compression ratios, each a chunk size in tokens (``"16"``) or one chunk size per gist
            level joined by x (``"4x4"``: two levels, 16x). Several entries are mixed within the
            run, one ratio drawn per optimiser micro-batch; one gist token is trained per level of
            the deepest ratio.
        sinks: leading tokens never chunked (tokens).
        window_chunks: previous chunks kept raw-visible to every token (chunks).
    """

    base: str = "smollm2-135m"
    ratios: list[str] = field(default_factory=lambda: ["16"])
    sinks: int = 3
    window_chunks: int = 1


@dataclass
class DataSection:
    """Training data.

    Attributes:
        dir: data directory; the corpus and task files are read relative to it. Empty means
            ``$GSA_DATA_DIR``, else ``data`` in the working directory.
        stage: ``pretrain`` (next-token loss on packed corpus text under the gist mask) or
            ``finetune`` (task samples; loss on the answer, hard top-k selection for the suffix).
        corpus: corpus files relative to ``dir`` (plain text, ``.jsonl`` with a ``text`` field,
            either gzip-compressed with ``.gz``) or folders of ``.txt`` files; for ``pretrain``.
        seq_len: raw tokens per packed pretraining sequence (tokens).
        max_corpus_tokens: stop reading a corpus file (and the pass key filler) after this many
            tokens (tokens).
        heldout_fraction: share of corpus documents kept out of training, chosen by a stable hash
            of each document's name, for held-out loss.
        tasks: mixture weights of the fine-tuning tasks by name (``rag-nq``, ``kv-retrieval``,
            ``passkey``); samples are drawn in proportion.
        num_samples: fine-tuning samples built in all.
        context_tokens: ``[low, high]`` range of fine-tuning context lengths (tokens).
        heldout_rows: the first rows of each task file that training never uses, because the
            evaluation draws its samples from them (rows).
        filler: corpus file (relative to ``dir``) whose training split fills pass key contexts;
            not the essays the evaluation hides its keys in.
    """

    dir: str = ""
    stage: str = "pretrain"
    corpus: list[str] = field(default_factory=lambda: ["corpus/kjv.jsonl.gz"])
    seq_len: int = 1024
    max_corpus_tokens: int = 2_000_000
    heldout_fraction: float = 0.05
    tasks: dict[str, float] = field(default_factory=lambda: {"rag-nq": 1.0, "kv-retrieval": 1.0, "passkey": 1.0})
    num_samples: int = 512
    context_tokens: list[int] = field(default_factory=lambda: [1024, 2048])
    heldout_rows: int = 100
    filler: str = "corpus/debian-reference.en.txt.gz"


@dataclass
class AdapterSection:
    """Trained weights.

    Attributes:
        kind: ``lora`` (low-rank adapters on every linear layer; the gist embedding rows are always
            trained too) or ``full`` (every weight).
        rank: LoRA rank r.
        alpha: LoRA scaling numerator; the update is scaled by alpha / r.
        dropout: LoRA dropout probability.
        target_modules: module names that get adapters, or ``all-linear``.
    """

    kind: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"


@dataclass
class OptimSection:
    """Optimiser and schedule.

    Attributes:
        steps: optimiser steps in the run.
        lr: peak learning rate.
        warmup_fraction: share of ``steps`` with linear warm-up, before the cosine decay to zero.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        batch_size: sequences per micro-batch per process.
        grad_accum: micro-batches accumulated per optimiser step.
        max_grad_norm: gradient clipping threshold (L2 norm); 0 disables clipping.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        precision: ``auto`` (bf16 autocast where the accelerator supports it, else fp32), ``fp32``
            or ``bf16``.
    """

    steps: int = 100
    lr: float = 2e-4
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    precision: str = "auto"


@dataclass
class RunSection:
    """Outputs and bookkeeping.

    Attributes:
        out_dir: folder for checkpoints, ``metrics.jsonl`` and ``loss.png``.
        seed: seed of the data order, the ratio draws and initialisation.
        save_every: optimiser steps between checkpoints; the last step is always saved.
        keep_last: checkpoints kept in ``out_dir``; older ones are deleted.
        init_from: a checkpoint folder whose weights start this run (for example stage 1's final
            checkpoint for stage 2); its optimiser state is not loaded.
    """

    out_dir: str = "runs/train"
    seed: int = 0
    save_every: int = 25
    keep_last: int = 2
    init_from: str = ""


@dataclass
class DistillSection:
    """Router distillation: pull gist scores towards the chunk mass of a dense teacher pass.

    Attributes:
        weight: weight of the distillation term in the loss; 0 turns it off.
        temperature: softmax temperature of the student's gist scores.
    """

    weight: float = 0.0
    temperature: float = 1.0


@dataclass
class TrainConfig:
    """A whole training run; see each section for its fields."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    distill: DistillSection = field(default_factory=DistillSection)

    def validate(self) -> None:
        """Raise InvalidInputError for values outside their range, and normalise ``model.ratios``."""
        _choice("data.stage", self.data.stage, STAGES)
        _choice("adapter.kind", self.adapter.kind, ADAPTERS)
        _choice("optim.precision", self.optim.precision, PRECISIONS)

        if not self.model.ratios:
            raise InvalidInputError("model.ratios is empty; list at least one ratio, for example [\"16\"]")
        # Written as parse_ratio reads them (lower case, no spaces), so checkpoints compare by string.
        self.model.ratios = [format_ratio(parse_ratio(ratio, "model.ratios")) for ratio in self.model.ratios]

        for name, value in (
            ("data.seq_len", self.data.seq_len), ("data.num_samples", self.data.num_samples),
            ("adapter.rank", self.adapter.rank), ("optim.steps", self.optim.steps),
            ("optim.batch_size", self.optim.batch_size), ("optim.grad_accum", self.optim.grad_accum),
            ("run.save_every", self.run.save_every), ("run.keep_last", self.run.keep_last),
        ):
            if value < 1:
                raise InvalidInputError(f"{name} must be at least 1, got {value}")

        if not 0.0 <= self.data.heldout_fraction < 1.0:
            raise InvalidInputError(f"data.heldout_fraction must be in [0, 1), got {self.data.heldout_fraction}")
        if not 0.0 <= self.optim.warmup_fraction < 1.0:
            raise InvalidInputError(f"optim.warmup_fraction must be in [0, 1), got {self.optim.warmup_fraction}")
        if self.optim.lr <= 0:
            raise InvalidInputError(f"optim.lr must be positive, got {self.optim.lr}")
        if self.distill.weight < 0 or self.distill.temperature <= 0:
            raise InvalidInputError(
                f"distill.weight must be 0 or more and distill.temperature positive, got {self.distill.weight} "
                f"and {self.distill.temperature}"
            )

        unknown = sorted(set(self.data.tasks) - set(TASK_NAMES))
        if unknown:
            raise InvalidInputError(f"unknown data.tasks {unknown}; choose from: {', '.join(TASK_NAMES)}")
        low_high = self.data.context_tokens
        if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1]:
            raise InvalidInputError(f"data.context_tokens must be [low, high] with 0 < low <= high, got {low_high}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidInputError(f"{name} {value!r} is not valid; choose one of: {', '.join(choices)}")


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file into a validated ``TrainConfig``.

    ``overrides`` are ``section.field=value`` strings applied on top, the value parsed as TOML
    (``optim.steps=10``, ``run.out_dir="runs/x"``).
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"config file {path} not found; pass the path of a .toml or .yaml file")
    config = from_dict(TrainConfig, _read_mapping(path), where=str(path))
    for override in overrides or []:
        _apply_override(config, override)
    config.validate()
    return config


def _read_mapping(path: Path) -> dict:
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise InvalidInputError(f"config file {path} must end in .toml, .yaml or .yml; rename it or convert it")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, ValueError) as error:  # yaml.YAMLError is caught below
        raise InvalidInputError(f"config file {path} could not be parsed: {error}") from error
    except Exception as error:
        if type(error).__module__.startswith("yaml"):
            raise InvalidInputError(f"config file {path} could not be parsed: {' '.join(str(error).split())}") from error
        raise
    if not isinstance(data, dict):
        raise InvalidInputError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _apply_override(config: TrainConfig, override: str) -> None:
    """Set one ``section.field=value`` on ``config``, the value parsed as a TOML value or taken as a bare word."""
    key, sep, value = override.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot:
        raise InvalidInputError(f"--set {override!r} must look like section.field=value, for example optim.steps=10")
    where = f"--set {key.strip()}"
    target = getattr(config, section, None) if section in {f.name for f in dataclasses.fields(config)} else None
    if target is None:
        raise InvalidInputError(f"{where}: unknown section {section!r}; valid sections: {', '.join(f.name for f in dataclasses.fields(config))}")
    fields = {f.name for f in dataclasses.fields(target)}
    if name not in fields:
        raise InvalidInputError(f"{where}: unknown field {name!r} in [{section}]; valid fields: {', '.join(sorted(fields))}")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()  # a bare word such as lora is taken as a string; the type check follows
    setattr(target, name, _check_type(parsed, typing.get_type_hints(type(target))[name], where))


def from_dict(cls, data: object, where: str):
    """Build dataclass ``cls`` from ``data``, checking every field's name and type."""
    if not isinstance(data, dict):
        raise InvalidInputError(f"{where} must be a table of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InvalidInputError(f"unknown field(s) {unknown} in {where}; valid fields: {', '.join(sorted(names))}")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = from_dict(hint, value, f"{where} [{name}]")
        else:
            values[name] = _check_type(value, hint, f"{where}: {name}")
    return cls(**values)


def _check_type(value: object, hint, where: str):
    """Return ``value`` (ints widened to float where a float is expected) or raise for a wrong type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_type(value, option, where)
            except InvalidInputError:
                continue
        raise InvalidInputError(f"{where} has the wrong type: got {value!r}, expected {_type_name(hint)}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise InvalidInputError(f"{where} must be a list of {_type_name(item)}, got {value!r}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise InvalidInputError(f"{where} must be a table, got {value!r}")
        return {_check_type(k, key_type, where): _check_type(v, item, f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise InvalidInputError(f"{where} has the wrong type: got {value!r}, expected {_type_name(hint)}")
    return value


def _type_name(hint) -> str:
    return getattr(hint, "__name__", str(hint))
