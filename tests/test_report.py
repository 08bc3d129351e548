"""Tests of the evaluation report (markdown tables, figures) and of the ``gsa explain`` renderers.

Every expected table cell below was computed by hand from the summaries written in ``results_dir``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from gsa.errors import InvalidInputError
from gsa.eval.explain_render import STRONG_COLOR, RecallTrace, render_html, render_png, shade_color
from gsa.eval.report import build_report, format_significant, needle_grid

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# (length, depth, score) of the needle samples; the mean of each (length, depth) cell is:
#   1024: depth 0 -> (1 + 0) / 2 = 0.5, depth 0.5 -> 1.0, depth 1 -> (0 + 0 + 1) / 3 = 0.333...
#   2048: depth 0 -> 0.0,              depth 0.5 -> 1.0, depth 1 -> (0.25 + 0.75) / 2 = 0.5
NEEDLE_SAMPLES = [
    (1024, 0.0, 1.0), (1024, 0.0, 0.0), (1024, 0.5, 1.0), (1024, 1.0, 0.0), (1024, 1.0, 0.0), (1024, 1.0, 1.0),
    (2048, 0.0, 0.0), (2048, 0.5, 1.0), (2048, 0.5, 1.0), (2048, 1.0, 0.25), (2048, 1.0, 0.75),
]
NEEDLE_MEANS = [[0.5, 1.0, 1 / 3], [0.0, 1.0, 0.5]]


def needle_predictions(samples=NEEDLE_SAMPLES) -> list[dict]:
    return [
        {"id": f"p{i}", "prediction": "12345", "answers": ["12345"], "score": score, "attended_kv_fraction": 0.06,
         "seconds": 0.1, "extra": {"length": length, "depth": depth}}
        for i, (length, depth, score) in enumerate(samples)
    ]


def write_run(root: Path, name: str, predictions: list[dict] | None = None, **summary) -> Path:
    """Write one run folder with a complete summary.json (fields overridable) and predictions.jsonl."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    record = {"task": "longbench:qasper", "method": "gsa", "ratio": 16, "n": 12, "score": 0.31, "metric": "qa_f1",
              "mean_attended_kv_fraction": 0.07, "seconds": 12.5, "model": "smollm2-135m", "diagnostics": {}}
    record.update(summary)
    (run_dir / "summary.json").write_text(json.dumps(record), encoding="utf-8")
    if predictions is None:
        predictions = [{"id": "q0", "prediction": "x", "answers": ["x"], "score": 1.0, "attended_kv_fraction": 0.07,
                        "seconds": 1.0, "extra": {}}]
    lines = [json.dumps(p) for p in predictions]
    (run_dir / "predictions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return run_dir


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    qasper = "longbench:qasper"
    write_run(root, "full-qasper", task=qasper, method="full", ratio=None, score=0.3456, mean_attended_kv_fraction=1.0)
    write_run(root, "gsa-qasper-8", task=qasper, ratio=8, score=0.31, mean_attended_kv_fraction=0.14,
              diagnostics={"router_recall": 0.4, "kl": 0.3})
    write_run(root, "gsa-qasper-16", task=qasper, ratio=16, score=0.2871, mean_attended_kv_fraction=0.0712,
              diagnostics={"router_recall": 0.45678, "selected_mass": 0.6})
    write_run(root, "quest-qasper-16", task=qasper, method="quest", n=10, score=0.2, mean_attended_kv_fraction=0.0631)
    write_run(root, "streaming-qasper-16", task=qasper, method="streaming", score=0.1, mean_attended_kv_fraction=0.05)
    write_run(root, "zeta-qasper-16", task=qasper, method="zeta", score=0.12, mean_attended_kv_fraction=0.06)
    write_run(root, "alpha-qasper-16", task=qasper, method="alpha", score=0.13, mean_attended_kv_fraction=0.06)
    write_run(root, "random-qasper-16", task=qasper, method="random", score=0.15, mean_attended_kv_fraction=0.06)
    write_run(root, "gsa-hotpotqa-16", task="longbench:hotpotqa", n=5, score=0.5, mean_attended_kv_fraction=0.06)
    write_run(root, "full-kjv", task="corpus:kjv", method="full", ratio=None, metric="perplexity", score=23.456,
              mean_attended_kv_fraction=1.0)
    write_run(root, "gsa-kjv-16", task="corpus:kjv", metric="perplexity", score=1234.5, mean_attended_kv_fraction=0.0654)
    write_run(root, "gsa-passkey-16", needle_predictions(), task="passkey", metric="accuracy", n=11, score=0.5,
              mean_attended_kv_fraction=0.06)
    write_run(root, "full-passkey", needle_predictions(), task="passkey", method="full", ratio=None,
              metric="accuracy", n=11, score=0.75, mean_attended_kv_fraction=1.0)
    broken = root / "broken-run"
    broken.mkdir()
    (broken / "summary.json").write_text("{not json", encoding="utf-8")
    (broken / "predictions.jsonl").write_text("", encoding="utf-8")
    no_predictions = write_run(root, "no-predictions", method="oracle")
    (no_predictions / "predictions.jsonl").unlink()
    return root


def table_lines(markdown: str, heading: str) -> list[str]:
    """Return the table lines that follow the markdown heading ``heading``."""
    lines = markdown.splitlines()
    start = lines.index(heading) + 2
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return lines[start:end]


def test_report_score_table_cells(results_dir: Path):
    markdown = build_report(results_dir).read_text(encoding="utf-8")
    table = table_lines(markdown, "## qa_f1")
    assert table[0] == ("| task | n | full | gsa @8x | gsa @16x | quest @16x | streaming @16x | random @16x "
                        "| alpha @16x | zeta @16x |")
    assert table[2] == "| longbench:hotpotqa | 5 | – | – | 0.500 (6.0%) | – | – | – | – | – |"
    assert table[3] == ("| longbench:qasper | 10–12 | 0.346 (100.0%) | 0.310 (14.0%) | 0.287 (7.1%) | 0.200 (6.3%) "
                        "| 0.100 (5.0%) | 0.150 (6.0%) | 0.130 (6.0%) | 0.120 (6.0%) |")
    assert len(table) == 4


def test_report_perplexity_table(results_dir: Path):
    markdown = build_report(results_dir).read_text(encoding="utf-8")
    table = table_lines(markdown, "## perplexity")
    assert table[0] == "| task | n | full | gsa @16x |"
    assert table[2] == "| corpus:kjv | 12 | 23.5 (100.0%) | 1.23e+03 (6.5%) |"
    assert "Lower perplexity is better." in markdown
    assert "Higher qa_f1 is better." in markdown


def test_report_diagnostics_table(results_dir: Path):
    markdown = build_report(results_dir).read_text(encoding="utf-8")
    table = table_lines(markdown, "### qa_f1: routing diagnostics")
    assert table[0] == "| task | method | router_recall | selected_mass | kl |"
    assert table[2] == "| longbench:qasper | gsa @8x | 0.400 | – | 0.300 |"
    assert table[3] == "| longbench:qasper | gsa @16x | 0.457 | 0.600 | – |"
    assert "Higher is better for router_recall and selected_mass. Lower is better for kl." in markdown
    assert "### perplexity: routing diagnostics" not in markdown


def test_report_files_written(results_dir: Path):
    report = build_report(results_dir)
    assert report == results_dir / "report" / "report.md"
    written = {path.name for path in report.parent.iterdir()}
    assert written == {
        "report.md", "score_vs_ratio_longbench-qasper.png", "needle_passkey_gsa_16.png", "needle_passkey_full.png",
    }
    markdown = report.read_text(encoding="utf-8")
    assert "(score_vs_ratio_longbench-qasper.png)" in markdown
    assert "(needle_passkey_gsa_16.png)" in markdown


def test_report_custom_out_dir(results_dir: Path, tmp_path: Path):
    report = build_report(results_dir, tmp_path / "elsewhere")
    assert report == tmp_path / "elsewhere" / "report.md"
    assert report.is_file()


def test_report_rerun_ignores_report_folder(results_dir: Path, caplog):
    build_report(results_dir)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gsa.eval.report"):
        build_report(results_dir)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert not any(str(results_dir / "report") in message for message in messages)


def test_report_skips_malformed_runs(results_dir: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="gsa.eval.report"):
        markdown = build_report(results_dir).read_text(encoding="utf-8")
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert str(results_dir / "broken-run" / "summary.json") in messages[0]
    assert str(results_dir / "no-predictions" / "predictions.jsonl") in messages[1]
    assert "oracle" not in table_lines(markdown, "## qa_f1")[0]
    assert "- `broken-run`:" in markdown


def test_needle_heatmap_png_valid(results_dir: Path):
    path = build_report(results_dir).parent / "needle_passkey_gsa_16.png"
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])  # IHDR: the first chunk after the signature
    image = matplotlib.image.imread(path)
    assert image.shape == (height, width, 4)
    assert width > 100
    assert height > 100


def test_needle_grid_means():
    lengths, depths, matrix = needle_grid(needle_predictions())
    assert lengths == [1024, 2048]
    assert depths == [0.0, 0.5, 1.0]
    assert matrix.shape == (2, 3)
    np.testing.assert_allclose(matrix, NEEDLE_MEANS)


def test_needle_grid_missing_cell_is_nan():
    _, _, matrix = needle_grid(needle_predictions([(100, 0.0, 1.0), (200, 1.0, 0.5)]))
    assert math.isnan(matrix[0, 1])
    assert math.isnan(matrix[1, 0])
    assert matrix[1, 1] == 0.5


def test_needle_grid_rejects_missing_depth():
    predictions = needle_predictions()
    del predictions[3]["extra"]["depth"]
    with pytest.raises(InvalidInputError, match="p3.*depth"):
        needle_grid(predictions)


def test_needle_run_without_depth_skipped(tmp_path: Path, caplog):
    predictions = needle_predictions()
    del predictions[0]["extra"]["depth"]
    write_run(tmp_path, "bad-needle", predictions, task="passkey", metric="accuracy")
    write_run(tmp_path, "good")
    with caplog.at_level(logging.WARNING, logger="gsa.eval.report"):
        report = build_report(tmp_path)
    assert [r.getMessage().count("predictions.jsonl") for r in caplog.records] == [1]
    assert not list(report.parent.glob("needle_*.png"))


def test_report_duplicate_run_keeps_newer(tmp_path: Path, caplog):
    old = write_run(tmp_path, "a-old", score=0.1)
    write_run(tmp_path, "b-new", score=0.2)
    os.utime(old / "summary.json", (1_000_000, 1_000_000))
    with caplog.at_level(logging.WARNING, logger="gsa.eval.report"):
        markdown = build_report(tmp_path).read_text(encoding="utf-8")
    assert "| longbench:qasper | 12 | 0.200 (7.0%) |" in markdown
    assert len(caplog.records) == 1
    assert "b-new" in caplog.records[0].getMessage()


def test_report_several_models(tmp_path: Path):
    write_run(tmp_path, "small-8", ratio=8, model="small")
    write_run(tmp_path, "small-16", ratio=16, model="small")
    write_run(tmp_path, "large-16", ratio=16, model="large/v1")
    report = build_report(tmp_path)
    markdown = report.read_text(encoding="utf-8")
    assert "## Model large/v1" in markdown
    assert "## Model small" in markdown
    assert (report.parent / "score_vs_ratio_longbench-qasper_small.png").is_file()


def test_report_missing_dir_error(tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(InvalidInputError, match=re.escape(f"{missing} not found")) as error:
        build_report(missing)
    assert f"gsa eval --out {missing}" in str(error.value)


def test_report_empty_dir_error(tmp_path: Path):
    with pytest.raises(InvalidInputError, match="no valid run") as error:
        build_report(tmp_path)
    assert f"gsa eval --out {tmp_path}" in str(error.value)
    assert not (tmp_path / "report").exists()


def test_report_only_malformed_runs_error(tmp_path: Path):
    (tmp_path / "half-written").mkdir()
    with pytest.raises(InvalidInputError, match="no valid run"):
        build_report(tmp_path)


@pytest.mark.parametrize("value, expected", [
    (0.31, "0.310"), (0.3456, "0.346"), (1.0, "1.00"), (0.0, "0.00"), (23.456, "23.5"), (123.4, "123"),
    (1234.5, "1.23e+03"), (-12.0, "-12.0"), (0.0012345, "0.00123"),
])
def test_format_significant(value: float, expected: str):
    assert format_significant(value) == expected


# --------------------------------------------------------------------------------------------------
# gsa explain rendering


def make_trace() -> RecallTrace:
    return RecallTrace(
        chunks=["<s> ", "<script>alert(1)</script> The key is 4821. ", "Unrelated & filler text.\n"],
        steps=[" 48", "21", "."],
        recall=[[0.0, 1.0, 0.5], [0.0, 1.0, 0.25], [0.0, 1.0, 0.0]],
        question="What is the key?", answer="4821.", method="gsa", ratio=16,
    )


def chunk_backgrounds(page: str) -> dict[int, str]:
    """Map each chunk index to the background colour of its span in the rendered page."""
    pattern = r'<span class="chunk" style="background-color:(#[0-9a-f]{6})" title="chunk (\d+): mean recall'
    return {int(index): color for color, index in re.findall(pattern, page)}


def test_recall_trace_json_round_trip():
    trace = make_trace()
    restored = RecallTrace.from_json(trace.to_json())
    assert restored == trace


def test_recall_trace_full_has_no_ratio():
    trace = make_trace()
    trace.method, trace.ratio = "full", None
    restored = RecallTrace.from_json(trace.to_json())
    assert restored.ratio is None
    assert restored.label == "full"


def test_recall_trace_rejects_bad_shape():
    with pytest.raises(InvalidInputError, match="one value per chunk"):
        RecallTrace(chunks=["a", "b"], steps=["x"], recall=[[0.5]], question="q", answer="a", method="gsa", ratio=4)


def test_recall_trace_rejects_out_of_range():
    with pytest.raises(InvalidInputError, match=r"recall\[0\]\[1\]"):
        RecallTrace(chunks=["a", "b"], steps=["x"], recall=[[0.5, 1.5]], question="q", answer="a", method="gsa",
                    ratio=4)


def test_recall_trace_from_json_missing_key():
    data = json.loads(make_trace().to_json())
    del data["steps"]
    with pytest.raises(InvalidInputError, match="missing steps"):
        RecallTrace.from_json(json.dumps(data))


def test_html_escapes_chunk_text(tmp_path: Path):
    page = render_html(make_trace(), tmp_path / "trace.html").read_text(encoding="utf-8")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Unrelated &amp; filler text." in page


def test_html_shading_extremes(tmp_path: Path):
    page = render_html(make_trace(), tmp_path / "trace.html").read_text(encoding="utf-8")
    backgrounds = chunk_backgrounds(page)
    assert backgrounds[0] == "#ffffff"
    assert backgrounds[1] == STRONG_COLOR
    assert backgrounds[2] == shade_color(0.25)
    assert backgrounds[2] not in {"#ffffff", STRONG_COLOR}
    assert 'title="chunk 1: mean recall 1.00"' in page


def test_html_is_standalone(tmp_path: Path):
    page = render_html(make_trace(), tmp_path / "trace.html").read_text(encoding="utf-8")
    assert "<style>" in page
    assert "http://" not in page
    assert "https://" not in page
    assert "src=" not in page


def test_shade_color_range():
    assert shade_color(0.0) == "#ffffff"
    assert shade_color(1.0) == STRONG_COLOR
    assert STRONG_COLOR != "#ffffff"


def test_render_png_written(tmp_path: Path):
    path = render_png(make_trace(), tmp_path / "trace.png")
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert matplotlib.image.imread(path).ndim == 3


def test_render_png_no_steps_error(tmp_path: Path):
    trace = RecallTrace(chunks=["a"], steps=[], recall=[], question="q", answer="", method="gsa", ratio=4)
    with pytest.raises(InvalidInputError, match="0 steps"):
        render_png(trace, tmp_path / "trace.png")


def test_report_levels_get_own_columns(tmp_path: Path):
    write_run(tmp_path, "gsa-8-old", ratio=8, score=0.4)  # written before ratio_sizes existed
    write_run(tmp_path, "gsa-16", ratio=16, ratio_sizes="16", score=0.3)
    write_run(tmp_path, "gsa-4x4", ratio=16, ratio_sizes="4x4", score=0.2, mean_attended_kv_fraction=0.05)
    write_run(tmp_path, "gsa-4x4-passkey", needle_predictions(), task="passkey", metric="accuracy", n=11,
              ratio=16, ratio_sizes="4x4", score=0.5)
    report = build_report(tmp_path)
    markdown = report.read_text(encoding="utf-8")
    table = table_lines(markdown, "## qa_f1")
    assert table[0] == "| task | n | gsa @8x | gsa @16x | gsa @16x (4x4) |"
    assert table[2] == "| longbench:qasper | 12 | 0.400 (7.0%) | 0.300 (7.0%) | 0.200 (5.0%) |"
    assert (report.parent / "needle_passkey_gsa_4x4.png").is_file()
    assert (report.parent / "score_vs_ratio_longbench-qasper.png").is_file()


def test_report_same_sizes_deduplicated(tmp_path: Path, caplog):
    old = write_run(tmp_path, "a-old", ratio=16, ratio_sizes="4X4", score=0.1)
    write_run(tmp_path, "b-new", ratio=16, ratio_sizes="4x4", score=0.2)
    os.utime(old / "summary.json", (1_000_000, 1_000_000))
    with caplog.at_level(logging.WARNING, logger="gsa.eval.report"):
        markdown = build_report(tmp_path).read_text(encoding="utf-8")
    assert table_lines(markdown, "## qa_f1")[2] == "| longbench:qasper | 12 | 0.200 (7.0%) |"
    assert len(caplog.records) == 1


@pytest.mark.parametrize(("sizes", "reason"), [("4x8", "does not multiply to the ratio 16"),
                                               ("4y4", "ratio_sizes must be a chunk size"),
                                               (16, "ratio_sizes must be a string")])
def test_report_skips_bad_ratio_sizes(tmp_path: Path, caplog, sizes, reason):
    write_run(tmp_path, "bad", ratio=16, ratio_sizes=sizes)
    write_run(tmp_path, "good", ratio=8)
    with caplog.at_level(logging.WARNING, logger="gsa.eval.report"):
        markdown = build_report(tmp_path).read_text(encoding="utf-8")
    assert len(caplog.records) == 1
    assert reason in caplog.records[0].getMessage()
    assert table_lines(markdown, "## qa_f1")[0] == "| task | n | gsa @8x |"
