"""Which model inference commands load: explicit, default and missing checkpoints."""

from __future__ import annotations

import argparse

import pytest

from gsa import cli
from gsa.checkpoints import NO_CHECKPOINT, load_for_inference, resolve_checkpoint
from gsa.errors import InvalidInputError
from gsa.train.loop import train
from test_train import tiny_config


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("trained")
    config = tiny_config(folder, tiny_model_dir, steps=1, grad_accum=1)
    train(config)
    return config.run.out_dir


def namespace(**values) -> argparse.Namespace:
    return argparse.Namespace(**{"model": None, "checkpoint": None, "prefill": None, **values})


def test_explicit_checkpoint_sets_gist_prefill(trained_dir):
    args = namespace(checkpoint=trained_dir)
    cli._resolve_prefill(args, ["8"], ["gsa"])
    assert args.prefill == "gist"


def test_default_checkpoint_from_environment(trained_dir, monkeypatch):
    monkeypatch.setenv("GSA_CHECKPOINT", trained_dir)
    assert str(resolve_checkpoint(None, None)) == trained_dir
    assert resolve_checkpoint("some/model", None) is None
    args = namespace()
    cli._resolve_prefill(args, ["8"], ["gsa"])
    assert args.prefill == "gist"


def test_default_checkpoint_other_ratio_falls_back(trained_dir, monkeypatch, capsys):
    monkeypatch.setenv("GSA_CHECKPOINT", trained_dir)
    args = namespace()
    cli._resolve_prefill(args, ["32"], ["gsa"])
    assert args.prefill == "dense"
    assert args.checkpoint == NO_CHECKPOINT
    assert "not ['32']" in capsys.readouterr().err


def test_explicit_checkpoint_other_ratio_rejected(trained_dir):
    with pytest.raises(InvalidInputError, match=r"trained for ratios \['8'\], not \['32'\]"):
        cli._resolve_prefill(namespace(checkpoint=trained_dir), ["32"], ["gsa"])


def test_full_method_ignores_checkpoint_ratio(trained_dir):
    args = namespace(checkpoint=trained_dir)
    cli._resolve_prefill(args, ["32"], ["full"])
    assert args.prefill == "gist"


def test_model_and_checkpoint_conflict(trained_dir, tiny_model_dir, capsys):
    code = cli.main(["generate", "--model", str(tiny_model_dir), "--checkpoint", trained_dir, "--question", "Why?"])
    assert code == 2
    assert "--model and --checkpoint both set" in capsys.readouterr().err


def test_checkpoint_none_loads_base(monkeypatch, tiny_model_dir, trained_dir):
    monkeypatch.setenv("GSA_CHECKPOINT", trained_dir)
    loaded = load_for_inference(str(tiny_model_dir), None)
    assert not loaded.trained
    assert load_for_inference(None, trained_dir).trained


def test_corrupt_checkpoint_rejected_before_load(tmp_path, trained_dir, capsys):
    import shutil

    from gsa.train.checkpoint import latest_checkpoint

    copy = tmp_path / "copy"
    shutil.copytree(latest_checkpoint(trained_dir), copy)
    data = (copy / "weights.safetensors").read_bytes()
    (copy / "weights.safetensors").write_bytes(data[:100])
    code = cli.main(["generate", "--checkpoint", str(copy), "--question", "Why?", "--ratio", "8"])
    assert code == 2
    assert "corrupt or truncated" in capsys.readouterr().err
