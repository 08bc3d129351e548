"""Loss curve of a training run, drawn from its ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(metrics: Path, out: Path) -> Path:
    """Draw training loss (and its 10-step moving mean) against optimiser step into ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics)
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    window = 10
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(steps, losses, alpha=0.35, label="loss")
    axis.plot(steps, smooth, label=f"mean of last {window}")
    axis.set_xlabel("optimiser step")
    axis.set_ylabel("cross-entropy (nats/token)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
