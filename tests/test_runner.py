"""The eval runner on a tiny model and the task fixtures: records, summary, resume, explain."""

from __future__ import annotations

import json

import pytest

from gsa import cli
from gsa.eval.runner import EvalSettings, run_eval


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    from gsa.engine import GistGenerator
    from gsa.model import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    return GistGenerator(model, tokenizer)


def settings(fixture_dir, tmp_path, **overrides) -> EvalSettings:
    values = dict(task="rag-nq", method="gsa", ratio=4, out=tmp_path, data_dir=fixture_dir, limit=2,
                  max_context_tokens=200, max_new_tokens=3, task_options={"num_distractors": 3})
    values.update(overrides)
    return EvalSettings(**values)


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_writes_records_and_summary(generator, fixture_dir, tmp_path):
    run = settings(fixture_dir, tmp_path)
    summary = run_eval(run, generator)
    records = read_lines(run.run_dir / "predictions.jsonl")
    assert len(records) == 2
    assert summary["n"] == 2
    assert summary["score"] == sum(r["score"] for r in records) / 2
    assert json.loads((run.run_dir / "summary.json").read_text()) == summary
    assert 0.0 < summary["mean_attended_kv_fraction"] < 1.0


def test_run_resumes_without_redoing(generator, fixture_dir, tmp_path):
    first = run_eval(settings(fixture_dir, tmp_path, limit=1), generator)
    run = settings(fixture_dir, tmp_path, limit=2)
    seen = []
    summary = run_eval(run, generator, progress=seen.append)
    assert first["n"] == 1
    assert len(seen) == 1  # only the second sample ran
    assert summary["n"] == 2


def test_run_drops_torn_last_line(generator, fixture_dir, tmp_path):
    run = settings(fixture_dir, tmp_path, limit=2)
    run_eval(run, generator)
    path = run.run_dir / "predictions.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    summary = run_eval(run, generator)
    assert summary["n"] == 2
    assert len(read_lines(path)) == 2


def test_perplexity_run_scores_tokens(generator, fixture_dir, tmp_path):
    run = settings(fixture_dir, tmp_path, task="perplexity", limit=1, task_options={"lengths": [64], "continuation_tokens": 16})
    summary = run_eval(run, generator)
    (record,) = read_lines(run.run_dir / "predictions.jsonl")
    assert record["tokens"] == 16
    assert summary["score"] == pytest.approx(2.718281828 ** (record["nll"] / 16))
    assert summary["score"] > 1.0


def test_full_method_fraction_is_one(generator, fixture_dir, tmp_path):
    summary = run_eval(settings(fixture_dir, tmp_path, method="full", diagnostics=True), generator)
    assert summary["mean_attended_kv_fraction"] == 1.0
    assert summary["diagnostics"]["top1_agreement"] == 1.0
    assert summary["diagnostics"]["kl"] == pytest.approx(0.0, abs=1e-6)


def test_oracle_diagnostics_recall_one(generator, fixture_dir, tmp_path):
    summary = run_eval(settings(fixture_dir, tmp_path, method="oracle", diagnostics=True), generator)
    assert summary["diagnostics"]["router_recall"] == 1.0


def test_leval_group_reuses_context(generator, fixture_dir, tmp_path, monkeypatch):
    calls = []
    original = generator.prefill
    monkeypatch.setattr(generator, "prefill", lambda *args: calls.append(1) or original(*args))
    run = settings(fixture_dir, tmp_path, task="leval:natural_question", limit=3)
    run_eval(run, generator)
    records = read_lines(run.run_dir / "predictions.jsonl")
    groups = {r["id"].rsplit(":", 1)[0] for r in records}
    assert len(calls) == len(groups)


def test_eval_cli_unknown_task(capsys, fixture_dir, tmp_path):
    code = cli.main(["eval", "--task", "bogus", "--data-dir", str(fixture_dir), "--out", str(tmp_path)])
    assert code == 2
    assert "unknown task 'bogus'" in capsys.readouterr().err


def test_explain_writes_png_and_html(tiny_model_dir, tmp_path, capsys):
    context = tmp_path / "doc.txt"
    context.write_text("The harbour master logs every ship. " * 12)
    code = cli.main(["explain", "--context", str(context), "--question", "Who logs ships?", "--model",
                     str(tiny_model_dir), "--ratio", "4", "--max-new-tokens", "3", "--out", str(tmp_path / "x")])
    assert code == 0
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "harbour master" in (tmp_path / "x.html").read_text()
