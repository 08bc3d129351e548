"""Summarise a folder of evaluation runs as markdown tables and matplotlib figures (``gsa report DIR``).

The runner writes one folder per run under ``DIR``. Each folder has a ``summary.json`` (task, method,
ratio, ratio_sizes, sample count, mean score, metric, mean attended KV fraction, optional routing
diagnostics) and
a ``predictions.jsonl`` with one scored sample per line. :func:`build_report` reads every run, skips
malformed ones with a logged warning, and writes ``report.md`` plus PNG figures into one folder.

Runs are told apart by their chunk sizes (``ratio_sizes``: ``16``, ``4x4``), not only by the
ratio, because a one-level 16 and a two-level 4x4 run have the same ratio but differ. Summaries
written before ``ratio_sizes`` existed fall back to the ratio as a one-level chunk size.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gsa.errors import InvalidInputError
from gsa.eval.task_io import read_jsonl
from gsa.layout import format_ratio, parse_ratio

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
PREDICTIONS_FILE = "predictions.jsonl"
REPORT_FILE = "report.md"
DEFAULT_OUT_NAME = "report"

FULL = "full"
# Columns follow this order; methods not listed come after them, alphabetically.
METHOD_ORDER = ("full", "gsa", "gist-only", "oracle", "quest", "mean-key", "streaming", "recent", "random")
NEEDLE_TASKS = frozenset({"passkey", "niah"})
LOWER_IS_BETTER_METRICS = frozenset({"perplexity"})
# Known routing diagnostics in column order, each with True where a higher value is better.
DIAGNOSTIC_HIGHER_IS_BETTER = {
    "router_recall": True, "selected_mass": True, "top1_agreement": True, "kl": False, "gold_loglik": True,
}
DEPTH_DECIMALS = 6  # depths that agree to this many decimals share a heatmap row
PNG_DPI = 120
MISSING_CELL = "–"


@dataclass
class Run:
    """One evaluation run: a method at one ratio on one task, read from its folder."""

    path: Path
    task: str
    method: str
    ratio: float | None  # None for full attention, which has no compression ratio
    n: int
    score: float
    metric: str
    mean_attended_kv_fraction: float | None  # None for perplexity, which generates nothing
    seconds: float | None = None
    model: str = ""
    diagnostics: dict[str, float] = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list)
    ratio_sizes: str | None = None  # chunk sizes per level such as "4x4"; None for full attention

    @property
    def label(self) -> str:
        return column_label(self.method, self.ratio, self.ratio_sizes)

    @property
    def column(self) -> tuple[str, str | None]:
        """The (method, chunk sizes) pair that names this run's table column."""
        return self.method, self.ratio_sizes

    @property
    def sort_key(self) -> tuple:
        return method_sort_key(self.method, self.ratio, self.ratio_sizes)

    @property
    def is_needle(self) -> bool:
        return is_needle_task(self.task)


def column_label(method: str, ratio: float | None, sizes: str | None = None) -> str:
    """Return the column label of a method and ratio, such as ``gsa @16x``, or the bare method without a ratio.

    Chunk sizes of several levels follow the ratio: ``gsa @16x (4x4)``.
    """
    if ratio is None:
        return method
    label = f"{method} @{ratio:g}x"
    return f"{label} ({sizes})" if sizes is not None and "x" in sizes else label


def is_needle_task(task: str) -> bool:
    """Check whether ``task`` is a needle task (passkey or niah, alone or as a ``:``-separated part)."""
    return any(part in NEEDLE_TASKS for part in task.split(":"))


def method_sort_key(method: str, ratio: float | None, sizes: str | None = None) -> tuple:
    """Build the key that orders columns: METHOD_ORDER first, other methods by name, then by ratio,
    then by level count (one level first) and chunk sizes."""
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    levels = 0 if sizes is None else sizes.count("x") + 1
    return (rank, method, -1.0 if ratio is None else ratio, levels, sizes or "")


def format_significant(value: float, digits: int = 3) -> str:
    """Format ``value`` with ``digits`` significant digits, keeping trailing zeros (0.31 -> ``0.310``)."""
    text = f"{value:#.{digits}g}"
    if "e" not in text:
        text = text.rstrip(".")  # the '#' flag leaves a bare point after whole numbers such as "123."
    return text


def safe_file_part(text: str) -> str:
    """Replace every character outside letters, digits, dot, underscore and dash with a dash."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "unnamed"


# --------------------------------------------------------------------------------------------------
# Reading runs


def _is_finite_number(value) -> bool:
    """Check for a finite int or float; bools are rejected although Python counts them as ints."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require_number(summary: dict, key: str, path: Path, *, minimum: float | None = None) -> float:
    value = summary.get(key)
    if not _is_finite_number(value):
        raise InvalidInputError(f"{path}: {key} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidInputError(f"{path}: {key} must be at least {minimum}, got {value!r}")
    return float(value)


def _require_text(summary: dict, key: str, path: Path) -> str:
    value = summary.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"{path}: {key} must be a non-empty string, got {value!r}")
    return value


def _read_diagnostics(summary: dict, path: Path) -> dict[str, float]:
    diagnostics = summary.get("diagnostics") or {}
    if not isinstance(diagnostics, dict):
        raise InvalidInputError(f"{path}: diagnostics must be an object, got {diagnostics!r}")
    values = {}
    for name, value in diagnostics.items():
        if value is None:
            continue
        if not _is_finite_number(value):
            raise InvalidInputError(f"{path}: diagnostics.{name} must be a finite number, got {value!r}")
        values[name] = float(value)
    return values


def read_summary(path: Path) -> Run:
    """Parse and validate one ``summary.json`` into a :class:`Run` without predictions."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidInputError(f"{path}: unreadable or invalid JSON ({error})") from error
    if not isinstance(summary, dict):
        raise InvalidInputError(f"{path}: expected a JSON object, got {type(summary).__name__}")

    method = _require_text(summary, "method", path)
    ratio, sizes = None, None
    if method != FULL:
        ratio = _require_number(summary, "ratio", path, minimum=1)
        sizes = _read_ratio_sizes(summary, ratio, path)
    n = summary.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidInputError(f"{path}: n must be a non-negative integer, got {n!r}")
    seconds = summary.get("seconds")
    return Run(
        path=path.parent,
        task=_require_text(summary, "task", path),
        method=method,
        ratio=ratio,
        n=n,
        score=_require_number(summary, "score", path),
        metric=_require_text(summary, "metric", path),
        mean_attended_kv_fraction=(None if summary.get("mean_attended_kv_fraction") is None
                                   else _require_number(summary, "mean_attended_kv_fraction", path, minimum=0)),
        seconds=float(seconds) if _is_finite_number(seconds) else None,
        model=summary.get("model") if isinstance(summary.get("model"), str) else "",
        diagnostics=_read_diagnostics(summary, path),
        ratio_sizes=sizes,
    )


def _read_ratio_sizes(summary: dict, ratio: float, path: Path) -> str:
    """Return the run's chunk sizes as ``16`` or ``4x4``; without ``ratio_sizes``, the ratio itself."""
    text = summary.get("ratio_sizes")
    if text is None:
        return f"{ratio:g}"
    if not isinstance(text, str):
        raise InvalidInputError(f"{path}: ratio_sizes must be a string such as 16 or 4x4, got {text!r}")
    sizes = parse_ratio(text, "ratio_sizes")
    if math.prod(sizes) != ratio:
        raise InvalidInputError(f"{path}: ratio_sizes {text!r} does not multiply to the ratio {ratio:g}")
    return format_ratio(sizes)


def read_predictions(path: Path) -> list[dict]:
    """Parse ``predictions.jsonl``: one JSON object per non-blank line."""
    try:
        return read_jsonl(path)
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"{path}: unreadable ({error})") from error


def load_run(run_dir: Path) -> Run:
    """Read one run folder; raise InvalidInputError naming the file when a file is missing or malformed."""
    summary_path = run_dir / SUMMARY_FILE
    predictions_path = run_dir / PREDICTIONS_FILE
    for path in (summary_path, predictions_path):
        if not path.is_file():
            raise InvalidInputError(f"{path}: file not found")
    run = read_summary(summary_path)
    run.predictions = read_predictions(predictions_path)
    if run.is_needle:
        try:
            lengths, _, _ = needle_grid(run.predictions)
        except InvalidInputError as error:
            raise InvalidInputError(f"{predictions_path}: {error}") from error
        if not lengths:
            raise InvalidInputError(f"{predictions_path}: contains no predictions, so no needle heatmap can be drawn")
    return run


def _written_at(run: Run) -> tuple[float, str]:
    """Order runs by the modification time of their summary.json, then by folder name."""
    return (run.path / SUMMARY_FILE).stat().st_mtime, run.path.name


def _deduplicate(runs: list[Run]) -> list[Run]:
    """Keep one run per (model, task, method, chunk sizes): the one whose summary.json was written last."""
    latest: dict[tuple, Run] = {}
    for run in runs:
        key = (run.model, run.task, *run.column)
        previous = latest.get(key)
        if previous is None:
            latest[key] = run
            continue
        older, newer = sorted((previous, run), key=_written_at)
        logger.warning("runs %s and %s both contain %s on %s; the report shows %s, whose %s is newer",
                       older.path, newer.path, newer.label, newer.task, newer.path, SUMMARY_FILE)
        latest[key] = newer
    return list(latest.values())


def load_runs(results_dir: Path, exclude: Path | None = None) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Read every run folder directly under ``results_dir``.

    Returns the valid runs (one per model, task, method and chunk sizes) and ``(folder, reason)`` for each
    skipped folder. Each skipped folder is logged as one warning. ``exclude`` and any earlier report
    folder (one with report.md but no summary.json) are passed over silently.
    """
    runs, skipped = [], []
    excluded = exclude.resolve() if exclude is not None else None
    for run_dir in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        if excluded is not None and run_dir.resolve() == excluded:
            continue
        if (run_dir / REPORT_FILE).is_file() and not (run_dir / SUMMARY_FILE).exists():
            continue
        try:
            runs.append(load_run(run_dir))
        except InvalidInputError as error:
            logger.warning("skipped run %s: %s. Fix or rerun it to include it in the report.", run_dir, error)
            skipped.append((run_dir, str(error)))
    return _deduplicate(runs), skipped


# --------------------------------------------------------------------------------------------------
# Needle grids


def _needle_fields(record: dict) -> tuple[int, float, float]:
    name = record.get("id", "?")
    extra = record.get("extra")
    if not isinstance(extra, dict):
        raise InvalidInputError(f"prediction {name!r} has no extra object with length and depth")
    length, depth, score = extra.get("length"), extra.get("depth"), record.get("score")
    if not _is_finite_number(length) or length != int(length) or length < 1:
        raise InvalidInputError(f"prediction {name!r}: extra.length must be a positive whole number of tokens, got {length!r}")
    if not _is_finite_number(depth) or not 0 <= depth <= 1:
        raise InvalidInputError(f"prediction {name!r}: extra.depth must be a number in [0, 1], got {depth!r}")
    if not _is_finite_number(score):
        raise InvalidInputError(f"prediction {name!r}: score must be a finite number, got {score!r}")
    return int(length), round(float(depth), DEPTH_DECIMALS), float(score)


def needle_grid(predictions: list[dict]) -> tuple[list[int], list[float], np.ndarray]:
    """Average needle scores over (context length, depth).

    Returns the sorted distinct lengths, the sorted distinct depths and a matrix of shape
    ``(len(lengths), len(depths))`` with the mean score of each pair, NaN where no sample has it.
    Raises InvalidInputError when a prediction lacks ``extra.length``, ``extra.depth`` or ``score``.
    """
    cells = [_needle_fields(record) for record in predictions]
    lengths = sorted({length for length, _, _ in cells})
    depths = sorted({depth for _, depth, _ in cells})
    totals = np.zeros((len(lengths), len(depths)))
    counts = np.zeros((len(lengths), len(depths)))
    for length, depth, score in cells:
        row, column = lengths.index(length), depths.index(depth)
        totals[row, column] += score
        counts[row, column] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix = np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)
    return lengths, depths, matrix


# --------------------------------------------------------------------------------------------------
# Figures


def _new_figure(width: float, height: float):
    """Create a figure drawn by the Agg canvas, so no display and no pyplot state are involved."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_score_vs_ratio(task: str, runs: list[Run], path: Path) -> None:
    """Draw the score of each method against the compression ratio on a log2 axis; full is a dashed line.

    Each method gets one line per gist level count, so a one-level 16 and a two-level 4x4 run are
    separate points.
    """
    figure = _new_figure(6.4, 4.2)
    axes = figure.add_subplot()
    by_line: dict[str, list[Run]] = {}
    for run in sorted(runs, key=lambda r: r.sort_key):
        by_line.setdefault(_line_label(run), []).append(run)
    for label, line_runs in by_line.items():
        if line_runs[0].method == FULL:
            axes.axhline(line_runs[0].score, linestyle="--", color="black", label=FULL)
            continue
        axes.plot([r.ratio for r in line_runs], [r.score for r in line_runs], marker="o", label=label)

    ratios = sorted({r.ratio for r in runs if r.ratio is not None})
    axes.set_xscale("log", base=2)
    axes.set_xticks(ratios, [f"{ratio:g}x" for ratio in ratios])
    axes.minorticks_off()
    metric = runs[0].metric
    direction = "lower" if metric in LOWER_IS_BETTER_METRICS else "higher"
    axes.set_xlabel("compression ratio")
    axes.set_ylabel(f"{metric} ({direction} is better)")
    axes.set_title(task)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=PNG_DPI)


def _line_label(run: Run) -> str:
    """The legend entry of a run's line: the method, with the level count above one level."""
    levels = 1 if run.ratio_sizes is None else run.ratio_sizes.count("x") + 1
    return run.method if levels == 1 else f"{run.method} ({levels} levels)"


def plot_needle(run: Run, path: Path) -> None:
    """Draw the needle heatmap of ``run``: mean score per (context length, depth), annotated in each cell."""
    import matplotlib

    lengths, depths, matrix = needle_grid(run.predictions)
    figure = _new_figure(max(4.5, 2.5 + 0.8 * len(lengths)), max(3.0, 1.8 + 0.45 * len(depths)))
    axes = figure.add_subplot()
    grid = matrix.T  # depth on the y axis, context length on the x axis
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")  # grey marks pairs without samples
    image = axes.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    for row, column in np.ndindex(grid.shape):
        value = grid[row, column]
        text = MISSING_CELL if np.isnan(value) else f"{value:.2f}"
        color = "white" if np.isnan(value) or value < 0.5 else "black"  # viridis is dark below 0.5
        axes.text(column, row, text, ha="center", va="center", color=color, fontsize=9)
    axes.set_xticks(range(len(lengths)), [str(length) for length in lengths])
    axes.set_yticks(range(len(depths)), [f"{depth:.0%}" for depth in depths])
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("needle depth")
    axes.set_title(f"{run.task}: {run.label}")
    figure.colorbar(image, ax=axes, label="mean score")
    figure.savefig(path, dpi=PNG_DPI)


def write_figures(runs: list[Run], out_dir: Path, suffix: str = "") -> dict[str, list[tuple[str, str]]]:
    """Write the score-vs-ratio and needle figures of ``runs`` (one model) into ``out_dir``.

    Returns, per task, ``(caption, file name)`` for each figure written. ``suffix`` is appended to
    file names to keep several models apart.
    """
    figures: dict[str, list[tuple[str, str]]] = {}
    for task in sorted({run.task for run in runs}):
        task_runs = [run for run in runs if run.task == task]
        if len({run.ratio_sizes for run in task_runs if run.ratio_sizes is not None}) > 1:
            name = f"score_vs_ratio_{safe_file_part(task)}{suffix}.png"
            plot_score_vs_ratio(task, task_runs, out_dir / name)
            figures.setdefault(task, []).append((f"{task}: score against compression ratio", name))
        for run in sorted(task_runs, key=lambda r: r.sort_key):
            if not run.is_needle:
                continue
            ratio_part = "" if run.ratio_sizes is None else f"_{run.ratio_sizes}"
            name = f"needle_{safe_file_part(task)}_{safe_file_part(run.method)}{ratio_part}{suffix}.png"
            plot_needle(run, out_dir / name)
            figures.setdefault(task, []).append((f"{task}: {run.label} by context length and depth", name))
    return figures


# --------------------------------------------------------------------------------------------------
# Markdown


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _sample_count(runs: list[Run]) -> str:
    counts = sorted({run.n for run in runs})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def score_table(runs: list[Run]) -> list[str]:
    """Build the markdown score table of one metric: a row per task, a column per method and ratio."""
    first_runs = {}
    for run in sorted(runs, key=lambda r: r.sort_key):
        first_runs.setdefault(run.column, run)
    columns = list(first_runs)
    labels = [first_runs[column].label for column in columns]
    rows = []
    for task in sorted({run.task for run in runs}):
        by_column = {run.column: run for run in runs if run.task == task}
        row = [task, _sample_count(list(by_column.values()))]
        for column in columns:
            run = by_column.get(column)
            row.append(MISSING_CELL if run is None else
                       _score_cell(run))
        rows.append(row)
    return _markdown_table(["task", "n", *labels], rows)


def diagnostics_table(runs: list[Run]) -> list[str]:
    """Build the markdown table of routing diagnostics, a row per run that has any; empty if none has."""
    with_diagnostics = [run for run in runs if run.diagnostics]
    if not with_diagnostics:
        return []
    present = {name for run in with_diagnostics for name in run.diagnostics}
    names = [name for name in DIAGNOSTIC_HIGHER_IS_BETTER if name in present]
    names += sorted(present - set(DIAGNOSTIC_HIGHER_IS_BETTER))
    rows = []
    for run in sorted(with_diagnostics, key=lambda r: (r.task, r.sort_key)):
        values = [run.diagnostics.get(name) for name in names]
        rows.append([run.task, run.label, *(MISSING_CELL if v is None else format_significant(v) for v in values)])
    lines = _markdown_table(["task", "method", *names], rows)
    lines += ["", _diagnostics_directions(names)]
    return lines


def _join_names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _diagnostics_directions(names: list[str]) -> str:
    higher = [name for name in names if DIAGNOSTIC_HIGHER_IS_BETTER.get(name) is True]
    lower = [name for name in names if DIAGNOSTIC_HIGHER_IS_BETTER.get(name) is False]
    unknown = [name for name in names if name not in DIAGNOSTIC_HIGHER_IS_BETTER]
    sentences = []
    if higher:
        sentences.append(f"Higher is better for {_join_names(higher)}.")
    if lower:
        sentences.append(f"Lower is better for {_join_names(lower)}.")
    if unknown:
        sentences.append(f"No direction is defined for {_join_names(unknown)}.")
    return " ".join(sentences)


def metric_section(metric: str, runs: list[Run], figures: dict[str, list[tuple[str, str]]], level: str) -> list[str]:
    """Build the markdown section of one metric: score table, diagnostics table and figure links."""
    direction = "Lower" if metric in LOWER_IS_BETTER_METRICS else "Higher"
    lines = [f"{level} {metric}", ""]
    lines += score_table(runs)
    lines += ["", f"{direction} {metric} is better. Each cell is the mean score, then in parentheses the mean "
              "share of full attention's KV entries read per decoding step; n is the number of samples.", ""]
    diagnostics = diagnostics_table(runs)
    if diagnostics:
        lines += [f"{level}# {metric}: routing diagnostics", "", *diagnostics, ""]
    for task in sorted({run.task for run in runs}):
        lines += [f"![{caption}]({name})" for caption, name in figures.get(task, [])]
    if lines[-1] != "":
        lines.append("")
    return lines


def render_markdown(results_dir: Path, sections: list[tuple[str, list[Run], dict]], skipped: list[tuple[Path, str]]) -> str:
    """Assemble report.md from ``(model, runs, figures)`` sections and the list of skipped runs."""
    run_count = sum(len(runs) for _, runs, _ in sections)
    lines = ["# Evaluation report", "", f"{run_count} runs from `{results_dir}`.", ""]
    for model, runs, figures in sections:
        level = "##"
        if len(sections) > 1:
            lines += [f"## Model {model or 'not recorded'}", ""]
            level = "###"
        for metric in sorted({run.metric for run in runs}):
            lines += metric_section(metric, [run for run in runs if run.metric == metric], figures, level)
    if skipped:
        lines += ["## Skipped runs", ""]
        lines += [f"- `{folder.name}`: {reason}" for folder, reason in skipped]
        lines.append("")
    return "\n".join(lines)


def build_report(results_dir: Path, out_dir: Path | None = None) -> Path:
    """Write report.md and its figures for the runs under ``results_dir``; return the path of report.md.

    ``out_dir`` defaults to ``results_dir / "report"``. Runs with missing or malformed files are
    skipped with one logged warning each. Raises InvalidInputError when ``results_dir`` does not
    exist or contains no valid run.
    """
    results_dir = Path(results_dir)
    hint = f"run `gsa eval --out {results_dir}` first"
    if not results_dir.is_dir():
        raise InvalidInputError(f"results directory {results_dir} not found; {hint}")
    out_dir = Path(out_dir) if out_dir is not None else results_dir / DEFAULT_OUT_NAME
    runs, skipped = load_runs(results_dir, exclude=out_dir)
    if not runs:
        raise InvalidInputError(f"results directory {results_dir} contains no valid run "
                                f"(a folder with {SUMMARY_FILE} and {PREDICTIONS_FILE}); {hint}")

    out_dir.mkdir(parents=True, exist_ok=True)
    models = sorted({run.model for run in runs})
    sections = []
    for model in models:
        model_runs = [run for run in runs if run.model == model]
        suffix = f"_{safe_file_part(model)}" if len(models) > 1 else ""
        sections.append((model, model_runs, write_figures(model_runs, out_dir, suffix)))
    report_path = out_dir / REPORT_FILE
    report_path.write_text(render_markdown(results_dir, sections, skipped), encoding="utf-8")
    logger.info("wrote %s from %d runs (%d skipped)", report_path, len(runs), len(skipped))
    return report_path


def _score_cell(run: Run) -> str:
    """Format a score with the attended KV fraction, when the run generated tokens."""
    if run.mean_attended_kv_fraction is None:
        return format_significant(run.score)
    return f"{format_significant(run.score)} ({run.mean_attended_kv_fraction:.1%})"
