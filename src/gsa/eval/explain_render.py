"""Render which context chunks were recalled at each generation step (``gsa explain``).

A :class:`RecallTrace` stores, for every generated token, the share of (layer, head) pairs that
recalled each context chunk. :func:`render_png` draws it as a steps × chunks heatmap and
:func:`render_html` writes a standalone page that shades each chunk of the document by its mean
recall over the steps.
"""

from __future__ import annotations

import html
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gsa.errors import InvalidInputError

logger = logging.getLogger(__name__)

WHITE = (255, 255, 255)
STRONG_RGB = (255, 128, 0)  # orange, on which black text has a WCAG contrast ratio of about 8.3:1
RECALL_TOLERANCE = 1e-6  # values this far outside [0, 1] are float noise and are clipped
PNG_DPI = 120
MAX_TICK_LABELS = 64  # above this many steps, only every k-th step is labelled
TOKEN_LABEL_CHARS = 18
TOP_CHUNKS_PER_STEP = 3


@dataclass
class RecallTrace:
    """Recall of each context chunk at each generation step of one answer.

    Attributes:
        chunks: text of each context chunk, in document order; the first entry may be the sink tokens.
        steps: generated token text of each decoding step.
        recall: ``len(steps)`` rows of ``len(chunks)`` values, each the share of (layer, head) pairs
            that recalled the chunk at that step, in [0, 1].
        question: the question that was answered.
        answer: the generated answer.
        method: the method name, such as ``gsa`` or ``quest``.
        ratio: the compression ratio, or None for full attention.
    """

    chunks: list[str]
    steps: list[str]
    recall: list[list[float]]
    question: str
    answer: str
    method: str
    ratio: int | None

    def __post_init__(self) -> None:
        for name in ("chunks", "steps"):
            values = getattr(self, name)
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise InvalidInputError(f"RecallTrace.{name} must be a list of strings")
        for name in ("question", "answer", "method"):
            if not isinstance(getattr(self, name), str):
                raise InvalidInputError(f"RecallTrace.{name} must be a string, got {getattr(self, name)!r}")
        if self.ratio is not None and (isinstance(self.ratio, bool) or not isinstance(self.ratio, int) or self.ratio < 1):
            raise InvalidInputError(f"RecallTrace.ratio must be a positive integer or None, got {self.ratio!r}")
        self.recall = self.recall_matrix().tolist()

    def recall_matrix(self) -> np.ndarray:
        """Validate ``recall`` and return it as a float array of shape (steps, chunks), clipped to [0, 1]."""
        shape = (len(self.steps), len(self.chunks))
        if not isinstance(self.recall, list) or len(self.recall) != shape[0]:
            raise InvalidInputError(f"RecallTrace.recall must have one row per step ({shape[0]} rows)")
        for step, row in enumerate(self.recall):
            if not isinstance(row, list) or len(row) != shape[1]:
                raise InvalidInputError(f"RecallTrace.recall row {step} must have one value per chunk ({shape[1]})")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row):
                raise InvalidInputError(f"RecallTrace.recall row {step} must contain only numbers")
        matrix = np.asarray(self.recall, dtype=float).reshape(shape)
        bad = ~np.isfinite(matrix) | (matrix < -RECALL_TOLERANCE) | (matrix > 1 + RECALL_TOLERANCE)
        if bad.any():
            step, chunk = (int(i) for i in np.argwhere(bad)[0])
            raise InvalidInputError(
                f"RecallTrace.recall[{step}][{chunk}] is {matrix[step, chunk]!r}; recall is a share in [0, 1]"
            )
        return np.clip(matrix, 0.0, 1.0)

    def mean_recall(self) -> np.ndarray:
        """Return each chunk's recall averaged over the steps; zeros when there are no steps."""
        if not self.steps:
            return np.zeros(len(self.chunks))
        return self.recall_matrix().mean(axis=0)

    @property
    def label(self) -> str:
        """Method and ratio as ``gsa @16x``, or the bare method without a ratio."""
        return self.method if self.ratio is None else f"{self.method} @{self.ratio}x"

    def to_json(self) -> str:
        """Serialise the trace as one JSON object with the field names as keys."""
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> RecallTrace:
        """Parse a trace written by :meth:`to_json`; unknown keys are ignored."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise InvalidInputError(f"recall trace is not valid JSON ({error.msg} at line {error.lineno})") from error
        if not isinstance(data, dict):
            raise InvalidInputError(f"recall trace must be a JSON object, got {type(data).__name__}")
        names = ("chunks", "steps", "recall", "question", "answer", "method", "ratio")
        missing = [name for name in names if name not in data]
        if missing:
            raise InvalidInputError(f"recall trace is missing {', '.join(missing)}; write it with RecallTrace.to_json")
        return cls(**{name: data[name] for name in names})


def shade_color(value: float) -> str:
    """Map a recall share in [0, 1] to a hex colour from white (0) to STRONG_RGB (1), linearly per channel."""
    if not math.isfinite(value):
        raise InvalidInputError(f"recall share must be a finite number, got {value!r}")
    share = min(max(value, 0.0), 1.0)
    channels = [round(low + (high - low) * share) for low, high in zip(WHITE, STRONG_RGB)]
    return "#" + "".join(f"{channel:02x}" for channel in channels)


STRONG_COLOR = shade_color(1.0)


def _token_label(step: int, token: str) -> str:
    text = repr(token)
    if len(text) > TOKEN_LABEL_CHARS:
        text = text[: TOKEN_LABEL_CHARS - 1] + "…"
    return f"{step}: {text}"


def render_png(trace: RecallTrace, path: Path) -> Path:
    """Draw the steps × chunks recall heatmap of ``trace`` to a PNG at ``path`` and return ``path``.

    The figure grows with the number of chunks and steps and is sized for up to about 600 chunks
    and 64 labelled steps. Raises InvalidInputError when the trace has no steps or no chunks.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    steps, chunks = len(trace.steps), len(trace.chunks)
    if steps == 0 or chunks == 0:
        raise InvalidInputError(f"recall trace has {steps} steps and {chunks} chunks; a heatmap needs at least one of each")
    width = min(24.0, max(8.0, 4.0 + 0.025 * chunks))
    height = min(18.0, max(3.5, 1.8 + 0.18 * min(steps, MAX_TICK_LABELS)))
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(trace.recall_matrix(), cmap="Oranges", vmin=0.0, vmax=1.0, aspect="auto",
                        interpolation="nearest")

    stride = math.ceil(steps / MAX_TICK_LABELS)
    rows = list(range(0, steps, stride))
    axes.set_yticks(rows, [_token_label(row, trace.steps[row]) for row in rows],
                    fontsize=7 if steps > 24 else 9, parse_math=False)
    axes.xaxis.set_major_locator(MaxNLocator(nbins=min(chunks, 24), integer=True))
    axes.set_xlabel("context chunk")
    axes.set_ylabel("generation step: token")
    question = trace.question if len(trace.question) <= 80 else trace.question[:79] + "…"
    axes.set_title(f"{trace.label}: {question}", parse_math=False)
    figure.colorbar(image, ax=axes, label="share of layers and heads recalling the chunk")
    path = Path(path)
    figure.savefig(path, dpi=PNG_DPI)
    logger.info("wrote recall heatmap %s (%d steps, %d chunks)", path, steps, chunks)
    return path


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 64rem; margin: 2rem auto; padding: 0 1rem; color: #1a1a1a; }
dt { font-weight: bold; margin-top: 0.5rem; }
dd { margin-left: 1rem; white-space: pre-wrap; }
.legend .swatch { display: inline-block; width: 2rem; height: 1rem; border: 1px solid #bbb; vertical-align: middle; }
.document { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.9rem; line-height: 1.6;
            border: 1px solid #ddd; padding: 1rem; }
.chunk { border-radius: 2px; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ddd; padding: 0.2rem 0.5rem; text-align: left; vertical-align: top; }
"""


def _document_html(trace: RecallTrace, means: np.ndarray) -> str:
    spans = []
    for index, (text, mean) in enumerate(zip(trace.chunks, means)):
        title = html.escape(f"chunk {index}: mean recall {mean:.2f}")
        spans.append(f'<span class="chunk" style="background-color:{shade_color(float(mean))}" '
                     f'title="{title}">{html.escape(text)}</span>')
    return "".join(spans)


def _steps_html(trace: RecallTrace) -> str:
    if not trace.steps:
        return "<p>No tokens were generated.</p>"
    rows = ["<tr><th>step</th><th>token</th><th>most recalled chunks (share)</th></tr>"]
    for step, (token, recall) in enumerate(zip(trace.steps, trace.recall_matrix())):
        top = [int(i) for i in np.argsort(-recall, kind="stable")[:TOP_CHUNKS_PER_STEP] if recall[i] > 0]
        recalled = ", ".join(f"{i} ({recall[i]:.2f})" for i in top) or "none"
        rows.append(f"<tr><td>{step}</td><td><code>{html.escape(repr(token))}</code></td><td>{recalled}</td></tr>")
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def render_html(trace: RecallTrace, path: Path) -> Path:
    """Write a standalone HTML page that shades each chunk by its mean recall; return ``path``.

    The page has inline CSS only, no scripts and no external assets. All trace text is escaped.
    """
    means = trace.mean_recall()
    label = html.escape(trace.label)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>gsa explain: {label}</title>
<style>{PAGE_STYLE}</style>
</head>
<body>
<h1>Recalled chunks: {label}</h1>
<dl>
<dt>Question</dt><dd>{html.escape(trace.question)}</dd>
<dt>Answer</dt><dd>{html.escape(trace.answer)}</dd>
</dl>
<p class="legend">Background: share of layers and heads that recalled the chunk, averaged over
{len(trace.steps)} generation steps.
<span class="swatch" style="background-color:{shade_color(0.0)}"></span> 0 (never)
<span class="swatch" style="background-color:{shade_color(0.5)}"></span> 0.5
<span class="swatch" style="background-color:{STRONG_COLOR}"></span> 1 (always).
Hover over a chunk for its index and mean recall.</p>
<h2>Document ({len(trace.chunks)} chunks)</h2>
<div class="document">{_document_html(trace, means)}</div>
<h2>Steps</h2>
{_steps_html(trace)}
</body>
</html>
"""
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    logger.info("wrote recall page %s (%d chunks)", path, len(trace.chunks))
    return path
