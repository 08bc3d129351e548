"""Tests of the gsa command.

Each user mistake must exit with code 2 and print one stderr line that names the value and the fix,
with no traceback. The help text and the --json output on a tiny local model are checked too.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import pytest
from transformers import AutoTokenizer, LlamaConfig, T5Config

from conftest import TINY_POSITIONS
from gsa import cli

QUESTION = "What is it about?"
TEXT = "The annual report covers sales, staff and the new office in Lyon. " * 5
JSON_TYPES = {
    "answer": str, "method": str, "ratio": int, "context_tokens": int, "gist_tokens": int, "decode_steps": int,
    "mean_unfolded_tokens_per_step": float, "mean_attended_kv_fraction": float, "seconds": float, "token_ids": list,
}


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["generate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code: int, err: str, *fragments: str) -> None:
    """Check for exit code 2 and one ``gsa: error:`` line on stderr that contains every fragment."""
    assert code == 2
    assert err.startswith("gsa: error: "), err
    assert err.endswith("\n"), err
    assert "\n" not in err[:-1], err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "report.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def set_stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


# Context files.

def test_context_missing(capsys, tmp_path):
    missing = tmp_path / "nope.txt"
    code, _, err = run(capsys, "--context", str(missing), "--question", QUESTION)
    assert_usage_error(code, err, str(missing), "not found", "pass an existing text file")


def test_context_directory(capsys, tmp_path):
    code, _, err = run(capsys, "--context", str(tmp_path), "--question", QUESTION)
    assert_usage_error(code, err, str(tmp_path), "is a directory", "pass a text file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode, so chmod 000 blocks nothing")
def test_context_unreadable(capsys, text_file):
    text_file.chmod(0)
    code, _, err = run(capsys, "--context", str(text_file), "--question", QUESTION)
    assert_usage_error(code, err, str(text_file), "unreadable", "check its permissions")


def test_context_read_error(capsys, monkeypatch, text_file):
    """The unreadable-file path without chmod, so that it also runs as root."""
    def deny(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(text_file), "read_bytes", deny)
    code, _, err = run(capsys, "--context", str(text_file), "--question", QUESTION)
    assert_usage_error(code, err, str(text_file), "Permission denied", "check its permissions")


BAD_CONTEXTS = {
    "empty": (b"", ["is empty", "pass a file with text"]),
    "whitespace": (b" \n\t\r\n ", ["is empty", "pass a file with text"]),
    "binary": (b"PK\x03\x04\x00\x00text", ["NUL bytes", "pass a UTF-8 text file"]),
    "latin1": (b"\xff\xfe abc", ["not valid UTF-8", "byte 0", "iconv -t UTF-8"]),
}


@pytest.mark.parametrize("case", BAD_CONTEXTS)
def test_context_invalid_file(capsys, tmp_path, case):
    data, fragments = BAD_CONTEXTS[case]
    path = tmp_path / f"{case}.txt"
    path.write_bytes(data)
    code, _, err = run(capsys, "--context", str(path), "--question", QUESTION)
    assert_usage_error(code, err, str(path), *fragments)


@pytest.mark.parametrize("case", BAD_CONTEXTS)
def test_context_invalid_stdin(capsys, monkeypatch, case):
    data, fragments = BAD_CONTEXTS[case]
    set_stdin(monkeypatch, data)
    code, _, err = run(capsys, "--context", "-", "--question", QUESTION)
    assert_usage_error(code, err, "standard input", *fragments)


def test_question_missing(capsys, text_file):
    code, _, err = run(capsys, "--context", str(text_file))
    assert_usage_error(code, err, "--question is missing", "pass the question")


# Options, checked before any model is loaded.

BAD_OPTIONS = {
    "ratio-zero": (["--ratio", "0"], ["--ratio", "got 0", "at least 1"]),
    "ratio-negative": (["--ratio", "-4"], ["--ratio", "got -4", "at least 1"]),
    "ratio-zero-level": (["--ratio", "4x0"], ["--ratio", "got 4x0", "joined by x", "4x4"]),
    "ratio-leading-x": (["--ratio", "x4"], ["--ratio", "got x4", "joined by x"]),
    "ratio-word": (["--ratio", "abc"], ["--ratio", "got abc", "such as 16"]),
    "top-k-zero": (["--top-k", "0"], ["--top-k", "got 0", "at least 1"]),
    "top-p-above-one": (["--top-p", "1.5"], ["--top-p", "got 1.5", "(0, 1]"]),
    "top-p-zero": (["--top-p", "0"], ["--top-p", "got 0.0", "(0, 1]"]),
    "top-k-and-top-p": (["--top-k", "2", "--top-p", "0.5"], ["--top-k and --top-p", "pass one of them"]),
    "method": (["--method", "sparse"], ["--method", "'sparse'", "'gsa', 'gist-only', 'full', 'mean-key'", "--help"]),
    "merge": (["--merge", "max"], ["--merge", "'max'", "'union', 'group-sum'"]),
    "prefill": (["--prefill", "none"], ["--prefill", "'none'", "'gist', 'dense'"]),
    "impl": (["--impl", "cuda"], ["--impl", "'cuda'", "'fast', 'naive'"]),
    "max-new-tokens": (["--max-new-tokens", "0"], ["--max-new-tokens", "got 0", "at least 1"]),
    "sinks": (["--sinks", "-1"], ["--sinks", "got -1", "0 or more"]),
    "window": (["--window", "-1"], ["--window", "got 3 and -1", "0 or more"]),
    "temperature": (["--sample", "--temperature", "0"], ["--temperature", "got 0.0", "omit --sample"]),
    "raw-tier": (["--raw-tier", "gpu"], ["--raw-tier", "'gpu'", "'device', 'host', 'disk'"]),
    "lru-chunks": (["--lru-chunks", "-2"], ["--lru-chunks", "got -2", "0 or more"]),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_option_invalid(capsys, text_file, case):
    options, fragments = BAD_OPTIONS[case]
    code, _, err = run(capsys, "--context", str(text_file), "--question", QUESTION, *options)
    assert_usage_error(code, err, *fragments)


def test_raw_tier_options_reach_config():
    args = cli.build_parser().parse_args(["generate", "--raw-tier", "disk", "--lru-chunks", "3"])
    config = cli._build_config(args)
    assert config.raw_tier == "disk"
    assert config.lru_chunks == 3


# Model paths.

def test_model_missing(capsys, text_file, tmp_path):
    missing = tmp_path / "no-such-model"
    code, _, err = run(capsys, "--context", str(text_file), "--question", QUESTION, "--model", str(missing))
    assert_usage_error(code, err, str(missing), "not found", "pass a local model directory or .gguf file")


def test_model_gguf_missing(capsys, text_file, tmp_path):
    missing = tmp_path / "model.gguf"
    code, _, err = run(capsys, "--context", str(text_file), "--question", QUESTION, "--model", str(missing))
    assert_usage_error(code, err, str(missing), "not found", "pass a local model directory or .gguf file")


def test_model_plain_file(capsys, text_file):
    code, _, err = run(capsys, "--context", str(text_file), "--question", QUESTION, "--model", str(text_file))
    assert_usage_error(code, err, str(text_file), "neither", "pass a local model directory or .gguf file")


def test_model_dir_without_config(capsys, text_file, tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    code, _, err = run(capsys, "--context", str(text_file), "--question", QUESTION, "--model", str(folder))
    assert_usage_error(code, err, str(folder), "no config.json", "pass a Hugging Face model directory")


def test_model_config_invalid_json(capsys, text_file, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json", encoding="utf-8")
    code, _, err = run(capsys, "--context", str(text_file), "--question", QUESTION, "--model", str(folder))
    assert_usage_error(code, err, str(folder), "unreadable config.json", "fix the file")


def test_model_not_causal(capsys, text_file, tmp_path):
    folder = tmp_path / "t5"
    T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4).save_pretrained(folder)
    code, _, err = run(capsys, "--context", str(text_file), "--question", QUESTION, "--model", str(folder))
    assert_usage_error(code, err, str(folder), "'t5' model, not a causal LM", "pass a decoder-only model")


def test_model_without_tokenizer(capsys, text_file, tmp_path):
    """transformers spreads its missing-tokenizer message over several lines, and the CLI must print one."""
    folder = tmp_path / "config-only"
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4).save_pretrained(folder)
    code, _, err = run(capsys, "--context", str(text_file), "--question", QUESTION, "--model", str(folder))
    assert_usage_error(code, err, str(folder), "could not be loaded", "pass a complete model directory")


def test_model_corrupt_weights(capsys, text_file, tmp_path, tiny_model_dir):
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    code, _, err = run(capsys, "--context", str(text_file), "--question", QUESTION, "--model", str(folder))
    assert_usage_error(code, err, str(folder), "could not be loaded", "weights")


def test_model_truncated_gguf(capsys, text_file, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00")
    code, _, err = run(capsys, "--context", str(text_file), "--question", QUESTION, "--model", str(path))
    assert_usage_error(code, err, str(path), "could not be loaded", "intact .gguf file")


def test_model_linear_attention_layers(capsys, text_file, tmp_path, tiny_model_dir):
    folder = tmp_path / "hybrid"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["layer_types"] = ["full_attention", "linear_attention"]
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    code, _, err = run(capsys, "--context", str(text_file), "--question", QUESTION, "--model", str(folder))
    assert_usage_error(code, err, "['linear_attention']", "use a decoder whose layers are all attention layers")


# Errors found after the tiny model is loaded.

def test_context_over_positions(capsys, tmp_path, tiny_model_dir):
    path = tmp_path / "long.txt"
    text = "word " * 400
    path.write_text(text, encoding="utf-8")
    tokens = len(AutoTokenizer.from_pretrained(tiny_model_dir)(text)["input_ids"])
    assert tokens > TINY_POSITIONS

    code, _, err = run(capsys, "--context", str(path), "--question", QUESTION, "--model", str(tiny_model_dir))
    assert_usage_error(code, err, f"has {tokens} tokens", f"{TINY_POSITIONS} positions", "shorten the context")


def test_ratio_over_context(capsys, tmp_path, tiny_model_dir):
    path = tmp_path / "short.txt"
    path.write_text("Just five short words.", encoding="utf-8")
    code, _, err = run(capsys, "--context", str(path), "--question", QUESTION, "--model", str(tiny_model_dir),
                       "--ratio", "16")
    assert_usage_error(code, err, "chunk size 16", "use a smaller --ratio")


# Real exit codes from a separate interpreter.

def run_module(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gsa.cli", "generate", *args], input=stdin, capture_output=True,
                          timeout=120)


def test_process_context_missing(tmp_path):
    missing = tmp_path / "nope.txt"
    result = run_module("--context", str(missing), "--question", QUESTION)
    err = result.stderr.decode()
    assert result.returncode == 2
    assert "Traceback" not in err
    assert err.count("\n") == 1
    assert str(missing) in err


def test_process_stdin_binary():
    result = run_module("--context", "-", "--question", QUESTION, stdin=b"\x00\x01\x02")
    err = result.stderr.decode()
    assert result.returncode == 2
    assert "Traceback" not in err
    assert err.count("\n") == 1
    assert "standard input" in err


def test_process_bad_method(tmp_path):
    result = run_module("--method", "dense", "--question", QUESTION)
    err = result.stderr.decode()
    assert result.returncode == 2
    assert "Traceback" not in err
    assert err.startswith("gsa: error: argument --method: invalid choice: 'dense'")
    assert err.count("\n") == 1


# Help.

def test_help_lists_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "generate" in out
    assert "--verbose" in out


def test_generate_help_lists_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    options = [
        "--context", "--question", "--model", "--ratio", "--method", "--top-k", "--top-p", "--merge", "--prefill",
        "--impl", "--sinks", "--window", "--word-boundary", "--max-new-tokens", "--sample", "--temperature",
        "--seed", "--json",
    ]
    for option in options:
        assert option in out


# Successful runs on the tiny model.

def run_json(capsys, tiny_model_dir, text_file, *options: str) -> dict:
    code, out, _ = run(capsys, "--context", str(text_file), "--question", QUESTION, "--model", str(tiny_model_dir),
                       "--max-new-tokens", "4", "--json", *options)
    assert code == 0
    return json.loads(out)


@pytest.mark.parametrize("method", ["gsa", "full"])
def test_json_keys_and_types(capsys, tiny_model_dir, text_file, method):
    result = run_json(capsys, tiny_model_dir, text_file, "--method", method)
    assert set(result) == set(JSON_TYPES)
    for key, kind in JSON_TYPES.items():
        assert isinstance(result[key], kind), f"{key} is {type(result[key]).__name__}, expected {kind.__name__}"
    assert result["method"] == method
    assert result["ratio"] == 16


def test_json_context_tokens(capsys, tiny_model_dir, text_file):
    result = run_json(capsys, tiny_model_dir, text_file, "--method", "full")
    assert result["context_tokens"] == len(AutoTokenizer.from_pretrained(tiny_model_dir)(TEXT)["input_ids"])


def test_json_full_method(capsys, tiny_model_dir, text_file):
    result = run_json(capsys, tiny_model_dir, text_file, "--method", "full")
    assert result["mean_attended_kv_fraction"] == 1.0
    assert result["gist_tokens"] == 0
    assert result["decode_steps"] >= 1


def test_json_gsa_method(capsys, tiny_model_dir, text_file):
    result = run_json(capsys, tiny_model_dir, text_file, "--ratio", "8")
    assert result["gist_tokens"] == (result["context_tokens"] - 3) // 8
    assert result["gist_tokens"] > 0
    assert result["mean_attended_kv_fraction"] < 1.0
    assert result["mean_attended_kv_fraction"] > 0.0


def test_json_from_stdin(capsys, monkeypatch, tiny_model_dir):
    set_stdin(monkeypatch, TEXT.encode())
    code, out, _ = run(capsys, "--context", "-", "--question", QUESTION, "--model", str(tiny_model_dir),
                       "--max-new-tokens", "2", "--json", "--method", "full")
    assert code == 0
    assert json.loads(out)["context_tokens"] == len(AutoTokenizer.from_pretrained(tiny_model_dir)(TEXT)["input_ids"])


@pytest.mark.parametrize(("ratio", "sizes", "product"), [("16", (16,), 16), ("4x4", (4, 4), 16), ("8x4x4", (8, 4, 4), 128)])
def test_ratio_levels_reach_config(ratio, sizes, product):
    args = cli.build_parser().parse_args(["generate", "--ratio", ratio])
    config = cli._build_config(args)
    assert config.spec.chunk_sizes == sizes
    assert config.ratio == product


def test_eval_ratio_list_levels():
    assert cli._ratio_labels("16, 4x4,8X4x4") == ["16", "4x4", "8x4x4"]


def test_eval_ratio_invalid(capsys, tmp_path):
    code = cli.main(["eval", "--task", "passkey", "--ratio", "16,4x0", "--out", str(tmp_path)])
    _, err = capsys.readouterr()
    assert_usage_error(code, err, "--ratio", "got 4x0")


def test_eval_settings_record_ratio_sizes(tmp_path):
    from gsa.eval.runner import EvalSettings

    settings = EvalSettings(task="passkey", method="gsa", ratio="4x4", out=tmp_path)
    assert settings.gsa_config().spec.chunk_sizes == (4, 4)
    assert settings.run_dir.name == "passkey__gsa__r4x4"


def test_explain_ratio_levels(monkeypatch, tmp_path, tiny_model_dir, text_file):
    from gsa.eval import explain as explain_module

    seen = {}
    real_explain = explain_module.explain

    def recording_explain(generator, context, question, config, max_new_tokens, prefix):
        seen["config"] = config
        return real_explain(generator, context, question, config, max_new_tokens, prefix)

    monkeypatch.setattr(explain_module, "explain", recording_explain)
    code = cli.main(["explain", "--model", str(tiny_model_dir), "--context", str(text_file), "--question", QUESTION,
                     "--ratio", "2X2", "--max-new-tokens", "2", "--out", str(tmp_path / "trace")])
    assert code == 0
    assert seen["config"].spec.chunk_sizes == (2, 2)
    assert seen["config"].ratio == 4
    assert (tmp_path / "trace.png").stat().st_size > 0
    assert (tmp_path / "trace.html").stat().st_size > 0


def test_explain_ratio_invalid(capsys, tmp_path):
    code = cli.main(["explain", "--ratio", "4x0", "--out", str(tmp_path / "trace")])
    _, err = capsys.readouterr()
    assert_usage_error(code, err, "--ratio", "got 4x0")
