"""Run one task with one method and write per-sample predictions and a summary.

Each run writes to ``OUT/<task>__<method>__r<ratio>/``:

- ``predictions.jsonl``: one line per finished sample, appended and flushed as it completes, so
  an interrupted run resumes where it stopped (finished ids are skipped);
- ``summary.json``: task, method, ratio (the product of the chunk sizes), ratio_sizes (the ratio as
  given, such as ``4x4``), n, score, metric, mean attended KV fraction, seconds and, with
  diagnostics on, routing recall and agreement with full attention. It is written
  atomically after every sample.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from gsa.config import GSAConfig
from gsa.diagnostics import RouterProbe
from gsa.errors import InvalidInputError
from gsa.eval.metrics import score_sample
from gsa.eval.tasks import load_task
from gsa.eval.types import Sample, TaskOptions
from gsa.layout import GistSpec, parse_ratio

logger = logging.getLogger(__name__)

NEWLINE_FREE_METRICS = ("rouge_l",)  # long-form answers; every other metric stops at a newline


@dataclass
class EvalSettings:
    """One evaluation run.

    Attributes:
        task: task name, e.g. ``longbench:qasper`` or ``passkey``.
        method: method name from ``gsa.methods.METHODS``.
        ratio: compression ratio: a chunk size in tokens, or chunk sizes per gist level joined by x
            (``"4x4"``).
        out: folder that receives the run folder.
        data_dir: folder with the data sets.
        limit: at most this many samples.
        max_context_tokens: longer contexts are truncated in the middle.
        prefill: ``gist`` or ``dense`` for methods built on gists.
        top_k: fixed chunks per head, or None for the budget rule.
        diagnostics: also measure router recall and agreement with full attention (three
            extra forward passes per sample).
        seed: seed of the tasks' random choices and of the ``random`` method.
        max_new_tokens: cap on every sample's generation budget, or None for each task's own.
        task_options: extra task settings (``lengths``, ``depths``, ``num_distractors``, ...).
    """

    task: str
    method: str
    ratio: int | str = 16
    out: Path = Path("runs/eval")
    data_dir: Path = Path("data")
    limit: int | None = None
    max_context_tokens: int = 7500
    prefill: str = "dense"
    top_k: int | None = None
    diagnostics: bool = False
    seed: int = 0
    max_new_tokens: int | None = None
    task_options: dict = field(default_factory=dict)

    def gsa_config(self, method: str | None = None) -> GSAConfig:
        return GSAConfig(spec=GistSpec.from_sizes(parse_ratio(str(self.ratio))), method=method or self.method,
                         top_k=self.top_k, prefill=self.prefill, seed=self.seed)

    @property
    def run_dir(self) -> Path:
        return self.out / f"{self.task.replace(':', '-')}__{self.method}__r{self.ratio}"


def run_eval(settings: EvalSettings, generator, progress=None) -> dict:
    """Evaluate ``settings.method`` on ``settings.task``; returns the summary."""
    if not settings.data_dir.is_dir():
        raise InvalidInputError(f"data directory {settings.data_dir} not found; pass --data-dir with the data sets")
    config = settings.gsa_config()
    options = TaskOptions(settings.data_dir, generator.tokenizer, settings.max_context_tokens, settings.seed,
                          settings.limit)
    for name, value in settings.task_options.items():
        setattr(options, name, value)
    samples = load_task(settings.task, options)

    settings.run_dir.mkdir(parents=True, exist_ok=True)
    predictions_path = settings.run_dir / "predictions.jsonl"
    records = _read_records(predictions_path)
    done = {record["id"] for record in records}
    logger.info("%s: %d samples, %d already done", settings.run_dir.name, len(samples), len(done))

    prefilled = {}
    for sample in samples:
        if sample.id in done:
            continue
        record = _evaluate_sample(sample, settings, config, generator, prefilled)
        with predictions_path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        records.append(record)
        _write_json_atomic(settings.run_dir / "summary.json", summarize(settings, samples, records, generator))
        if progress is not None:
            progress(record)
    summary = summarize(settings, samples, records, generator)
    _write_json_atomic(settings.run_dir / "summary.json", summary)
    return summary


def _evaluate_sample(sample: Sample, settings: EvalSettings, config: GSAConfig, generator, prefilled: dict) -> dict:
    start = time.perf_counter()
    record = {"id": sample.id, "answers": sample.answers, "extra": sample.extra}
    if sample.metric == "perplexity":
        log_probs, targets = generator.continuation_logprobs(sample.context, sample.suffix, sample.answers[0], config)
        nll = -log_probs.gather(1, targets[:, None]).squeeze(1)
        record.update(prediction="", nll=float(nll.sum()), tokens=int(targets.numel()),
                      score=math.exp(float(nll.mean())), attended_kv_fraction=None)
    else:
        probe = RouterProbe() if settings.diagnostics else None
        cache = _group_cache(sample, config, generator, prefilled)
        budget = sample.max_new_tokens if settings.max_new_tokens is None else min(sample.max_new_tokens, settings.max_new_tokens)
        (result,) = generator.generate(
            [sample.context], [sample.suffix], config, max_new_tokens=budget, template=None,
            stop_at_newline=sample.metric not in NEWLINE_FREE_METRICS, probe=probe, prefilled=cache,
        )
        record.update(prediction=result.answer, attended_kv_fraction=result.mean_attended_kv_fraction,
                      score=score_sample(sample.metric, result.answer, sample.answers, sample.extra))
        if probe is not None:
            record["diagnostics"] = {**probe.summary(), **_agreement(sample, settings, generator)}
    record["seconds"] = time.perf_counter() - start
    return record


def _group_cache(sample: Sample, config: GSAConfig, generator, prefilled: dict):
    """Encode a shared context once per group; only the latest group's cache is kept."""
    if sample.group is None:
        return None
    if sample.group not in prefilled:
        prefilled.clear()
        prefilled[sample.group] = generator.prefill(sample.context, config)
    return prefilled[sample.group]


def _agreement(sample: Sample, settings: EvalSettings, generator) -> dict:
    """Compare the method with full attention on the gold answer tokens (teacher forcing)."""
    gold = sample.answers[0] if sample.answers else ""
    if not gold.strip():
        return {}
    ours, targets = generator.continuation_logprobs(sample.context, sample.suffix, " " + gold.strip(), settings.gsa_config())
    full, _ = generator.continuation_logprobs(sample.context, sample.suffix, " " + gold.strip(), settings.gsa_config("full"))
    kl = (full.exp() * (full - ours).nan_to_num(0.0, 0.0, 0.0)).sum(-1)  # KL(full || method) per token
    return {
        "top1_agreement": float((ours.argmax(-1) == full.argmax(-1)).float().mean()),
        "kl": float(kl.mean()),
        "gold_loglik": float(ours.gather(1, targets[:, None]).sum()),
    }


def summarize(settings: EvalSettings, samples: list[Sample], records: list[dict], generator) -> dict:
    """Aggregate per-sample records into the run summary."""
    metric = samples[0].metric if samples else None
    fractions = [r["attended_kv_fraction"] for r in records if r.get("attended_kv_fraction") is not None]
    if metric == "perplexity":
        tokens = sum(r["tokens"] for r in records)
        score = math.exp(sum(r["nll"] for r in records) / tokens) if tokens else None
    else:
        score = sum(r["score"] for r in records) / len(records) if records else None
    summary = {
        "task": settings.task, "method": settings.method, "ratio": settings.gsa_config().ratio,
        "ratio_sizes": str(settings.ratio), "n": len(records),
        "total": len(samples), "score": score, "metric": metric,
        "mean_attended_kv_fraction": sum(fractions) / len(fractions) if fractions else None,
        "seconds": sum(r["seconds"] for r in records), "prefill": settings.prefill,
        "top_k": settings.top_k, "model": getattr(generator, "model_name", None),
    }
    diagnostics = [r["diagnostics"] for r in records if r.get("diagnostics")]
    if diagnostics:
        summary["diagnostics"] = {
            key: _mean([d.get(key) for d in diagnostics])
            for key in ("router_recall", "selected_mass", "top1_agreement", "kl", "gold_loglik")
        }
    return summary


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _read_records(path: Path) -> list[dict]:
    """Read finished samples; a torn last line (the run was killed mid-write) is dropped."""
    if not path.exists():
        return []
    records, torn = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s line %d is incomplete; that sample will run again", path, number)
            torn = True
    if torn:  # rewrite without the broken line so later appends stay valid JSON lines
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, path)
    return records


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def default_data_dir() -> Path:
    """Data folder from ``GSA_DATA_DIR``, else ``data`` in the working directory."""
    return Path(os.environ.get("GSA_DATA_DIR", "data"))

