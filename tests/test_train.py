"""Training: targets, data splits, schedule, checkpoints, exact resume, DDP and bad input."""

from __future__ import annotations

import gzip
import math
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import GIST_ID, make_model, relative_error
from gsa.cache import GistCache
from gsa.cli import main
from gsa.config import GSAConfig
from gsa.errors import InvalidInputError
from gsa.layout import GistSpec, TokenKind
from gsa.train.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from gsa.train.config import (
    AdapterSection, DataSection, DistillSection, ModelSection, OptimSection, RunSection, TrainConfig,
)
from gsa.train.data import (
    IGNORE, collate_examples, corpus_tokens, is_heldout, pack, pretrain_example, task_example,
)
from gsa.train.loop import Trainer, lr_factor, token_loss, train
from gsa.train.weights import load_trained_model

WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing in the old garden".split()


def corpus_file(folder: Path, documents: int = 12, words: int = 300) -> Path:
    """A gzip JSONL corpus of seeded random word documents."""
    generator = torch.Generator().manual_seed(1)
    path = folder / "corpus.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for d in range(documents):
            picks = torch.randint(len(WORDS), (words,), generator=generator).tolist()
            handle.write(json.dumps({"path": f"doc{d}", "text": " ".join(WORDS[i] for i in picks)}) + "\n")
    return path


def tiny_config(tmp_path: Path, model_dir: Path, **optim) -> TrainConfig:
    corpus = corpus_file(tmp_path)
    return TrainConfig(
        model=ModelSection(base=str(model_dir), ratios=["8"]),
        data=DataSection(dir=str(tmp_path), corpus=[corpus.name], seq_len=64, heldout_fraction=0.2),
        adapter=AdapterSection(rank=4),
        optim=OptimSection(**{"steps": 4, "lr": 5e-3, "batch_size": 2, "grad_accum": 2, **optim}),
        run=RunSection(out_dir=str(tmp_path / "run"), save_every=2, seed=3),
    )


# --- targets -------------------------------------------------------------------------------------


LEVEL_GIST_IDS = [GIST_ID, GIST_ID - 1, GIST_ID - 2]


@pytest.mark.parametrize("sizes", [(5,), (2, 2), (2, 3, 2)])
@pytest.mark.parametrize("length", [17, 40, 64])
def test_pretrain_targets_skip_gists(length, sizes):
    window = list(range(1000, 1000 + length + 1))  # ids above the gist ids, so no raw token equals a gist
    spec = GistSpec.from_sizes(sizes, sinks=2)
    example = pretrain_example(window, LEVEL_GIST_IDS[: len(sizes)], spec)

    # Reference: walk the columns; a non-gist column predicts the next non-gist input, or the
    # window's extra last token at the end.
    seq = example.sequence
    raw_columns = [i for i, k in enumerate(seq.kind) if k != TokenKind.GIST]
    expected = [IGNORE] * len(seq)
    for n, column in enumerate(raw_columns):
        expected[column] = seq.input_ids[raw_columns[n + 1]] if n + 1 < len(raw_columns) else window[-1]
    assert example.targets == expected
    assert sorted(t for t in example.targets if t != IGNORE) == window[1:]
    gist_columns = [i for i, k in enumerate(seq.kind) if k == TokenKind.GIST]
    assert all(example.targets[i] == IGNORE for i in gist_columns)
    assert not set(LEVEL_GIST_IDS) & set(example.targets)
    if length == 64:  # long enough for a gist of every level
        assert sorted(set(seq.level)) == list(range(len(sizes) + 1))


@pytest.mark.parametrize("sizes", [(2, 2), (2, 3, 2)])
def test_task_targets_multi_level(sizes):
    context, prompt, answer = list(range(10, 60)), [7, 8, 9], [3, 4, 5]
    spec = GistSpec.from_sizes(sizes, sinks=2)
    example = task_example(context, prompt, answer, LEVEL_GIST_IDS[: len(sizes)], spec, context_loss=True)
    seq = example.sequence
    assert max(seq.level) == len(sizes)

    # Reference: every raw token but the first is predicted once, by the raw column before it.
    stream = context + prompt + answer
    raw_columns = [i for i, k in enumerate(seq.kind) if k != TokenKind.GIST]
    assert [seq.input_ids[i] for i in raw_columns] == stream
    expected = [IGNORE] * len(seq)
    for n, column in enumerate(raw_columns[:-1]):
        next_index = n + 1
        if next_index < len(context) or next_index >= len(context) + len(prompt):
            expected[column] = stream[next_index]
    assert example.targets == expected
    assert all(example.targets[i] == IGNORE for i, k in enumerate(seq.kind) if k == TokenKind.GIST)


def test_pack_predicts_each_token_once():
    stream = list(range(1000))
    windows = pack(stream, 64)
    predicted = [t for w in windows for t in w[1:]]
    assert predicted == stream[1:len(predicted) + 1]
    assert all(len(w) == 65 for w in windows)


def test_task_targets_only_answer():
    context, prompt, answer = list(range(10, 60)), [7, 8, 9], [3, 4, 5]
    example = task_example(context, prompt, answer, GIST_ID, GistSpec(chunk_size=8))
    kinds = example.sequence.kind
    predicted = [(i, t) for i, t in enumerate(example.targets) if t != IGNORE]
    assert [t for _, t in predicted] == answer
    # The column before each answer token predicts it: the last prompt token, then answer tokens.
    last_prompt = len(kinds) - len(answer) - 1
    assert [i for i, _ in predicted] == [last_prompt, last_prompt + 1, last_prompt + 2]
    assert all(kinds[i] == TokenKind.SUFFIX for i, _ in predicted)


def test_heldout_split_disjoint(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = corpus_file(tmp_path, documents=40, words=20)
    names = [f"doc{d}" for d in range(40)]
    heldout = {n for n in names if is_heldout(path.name, n, 0.25)}
    assert 0 < len(heldout) < 40
    train_ids = corpus_tokens([path], tokenizer, "train", 0.25, 10**6)[0]
    heldout_ids = corpus_tokens([path], tokenizer, "heldout", 0.25, 10**6)[0]
    eos = tokenizer.eos_token_id
    assert train_ids.count(eos) == 40 - len(heldout)
    assert heldout_ids.count(eos) == len(heldout)


def test_lr_schedule_values():
    assert lr_factor(0, 10, 0.2) == pytest.approx(0.5)
    assert lr_factor(1, 10, 0.2) == pytest.approx(1.0)
    assert lr_factor(2, 10, 0.2) == pytest.approx(1.0)
    assert lr_factor(6, 10, 0.2) == pytest.approx(0.5)
    assert lr_factor(9, 10, 0.2) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 7 / 8)).item()))


# --- the training forward equals cached inference ------------------------------------------------


@pytest.mark.parametrize("sizes", [(4,), (2, 2), (2, 2, 2)])
@pytest.mark.parametrize("top_k", [1, None])
def test_train_forward_matches_cached_inference(top_k, sizes):
    model = make_model("llama", heads=6, kv_heads=2)
    spec = GistSpec.from_sizes(sizes, sinks=2)
    gist_ids = LEVEL_GIST_IDS[: len(sizes)]
    generator = torch.Generator().manual_seed(0)
    examples = [
        task_example(torch.randint(1, 90, (n,), generator=generator).tolist(), [5, 6], [7, 8, 9], gist_ids, spec)
        for n in (37, 22)
    ]
    batch = collate_examples(examples, pad_id=0)
    assert int(batch.batch.level.max()) == len(sizes)
    config = GSAConfig(spec=spec, top_k=top_k)

    with torch.no_grad():
        loss, count = token_loss(model, batch, config)
        layout = batch.batch
        cache = GistCache(model.config, layout, config)
        logits = model(input_ids=layout.input_ids, position_ids=layout.position_ids, cache=cache).logits
    targets = batch.targets.flatten()
    keep = targets != IGNORE
    cached = torch.nn.functional.cross_entropy(logits.flatten(0, 1)[keep], targets[keep])
    assert count == 6
    assert abs(float(loss) - float(cached)) < 1e-5


# --- checkpoints ---------------------------------------------------------------------------------


def test_checkpoint_rejects_corrupt_files(tmp_path):
    weights = {"w": torch.arange(1000.0)}
    path = save_checkpoint(tmp_path / "step-000001", weights, {"step": 1}, {"s": torch.ones(3)})
    assert torch.equal(load_checkpoint(path).weights["w"], weights["w"])

    data = (path / "weights.safetensors").read_bytes()
    (path / "weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInputError, match="corrupt or truncated"):
        load_checkpoint(path)

    path = save_checkpoint(tmp_path / "step-000002", weights, {"step": 2})
    flipped = bytearray((path / "weights.safetensors").read_bytes())
    flipped[-1] ^= 0xFF
    (path / "weights.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(InvalidInputError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_checkpoint_save_replaces_atomically(tmp_path):
    first = save_checkpoint(tmp_path / "ckpt", {"w": torch.zeros(2)}, {"step": 1})
    save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, {"step": 2})
    assert torch.equal(load_checkpoint(first).weights["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_checkpoint_compatibility_errors(tmp_path):
    trainer = {"base": "a", "base_fingerprint": "abc", "ratios": ["16"]}
    check_compatible(trainer, "abc", ["16"], tmp_path)
    with pytest.raises(InvalidInputError, match="another base model"):
        check_compatible(trainer, "xyz", ["16"], tmp_path)
    with pytest.raises(InvalidInputError, match=r"trained for ratios \['16'\], not \['8'\]"):
        check_compatible(trainer, "abc", ["8"], tmp_path)


# --- runs ----------------------------------------------------------------------------------------


def test_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    result = train(tiny_config(tmp_path / "a", tiny_model_dir))

    split = tiny_config(tmp_path / "b", tiny_model_dir)
    first = train(split, max_steps=2)
    assert first.step == 2
    resumed = train(split, resume=True)

    assert resumed.step == result.step == 4
    assert resumed.last_loss == result.last_loss
    a = load_checkpoint(result.checkpoint).weights
    b = load_checkpoint(resumed.checkpoint).weights
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    metrics = [json.loads(line) for line in (Path(split.run.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert (Path(split.run.out_dir) / "loss.png").stat().st_size > 0


def test_trained_checkpoint_loads_for_inference(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, steps=2, grad_accum=1)
    trainer = Trainer(config)
    trainer.run()
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    layout = trainer.source.micro_batch(0, 0, 0, 1)[0]
    gsa = GSAConfig(spec=trainer.specs["8"])
    with torch.no_grad():
        expected = model(input_ids=layout.batch.input_ids, position_ids=layout.batch.position_ids,
                         gist_batch=layout.batch, gsa_config=gsa).logits
        loaded, _, record = load_trained_model(config.run.out_dir, ["8"])
        actual = loaded(input_ids=layout.batch.input_ids, position_ids=layout.batch.position_ids,
                        gist_batch=layout.batch, gsa_config=gsa).logits
    assert record["step"] == 2
    assert relative_error(actual, expected) < 1e-5
    with pytest.raises(InvalidInputError, match="trained for ratios"):
        load_trained_model(config.run.out_dir, ["16"])


def assert_reload_matches(trainer: Trainer, out_dir: str, ratio: str) -> dict:
    """Reload the run's last checkpoint with load_trained_model; its logits must equal the trainer's."""
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    layout = trainer.source.micro_batch(0, 0, 0, 1)[0].batch
    gsa = GSAConfig(spec=trainer.specs[ratio])
    with torch.no_grad():
        expected = model(input_ids=layout.input_ids, position_ids=layout.position_ids,
                         gist_batch=layout, gsa_config=gsa).logits
        loaded, tokenizer, record = load_trained_model(out_dir, [ratio])
        actual = loaded(input_ids=layout.input_ids, position_ids=layout.position_ids,
                        gist_batch=layout, gsa_config=gsa).logits
    assert int(layout.level.max()) == trainer.specs[ratio].num_levels
    assert tokenizer.convert_tokens_to_ids(record["gist_tokens"]) == record["gist_ids"]
    assert relative_error(actual, expected) < 1e-5
    return record


def gist_rows(trainer: Trainer) -> torch.Tensor:
    """The input embedding rows of the trainer's gist tokens, (levels, hidden)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        ids = torch.tensor(trainer.gist_ids)
        return model.get_input_embeddings()(ids).detach().clone()


def test_two_level_pretrain_saves_and_reloads(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, steps=2, grad_accum=1)
    config.model.ratios = ["8", "4x4"]
    config.validate()
    trainer = Trainer(config)
    before = gist_rows(trainer)
    trainer.run()
    after = gist_rows(trainer)

    assert trainer.levels == 2
    assert len(trainer.gist_ids) == 2
    assert not torch.equal(before[1], after[1])  # LoRA trains the level-2 gist row too
    record = assert_reload_matches(trainer, config.run.out_dir, "4x4")
    assert record["levels"] == 2
    assert record["ratios"] == ["8", "4x4"]
    with pytest.raises(InvalidInputError, match="trained for ratios"):
        load_trained_model(config.run.out_dir, ["4x2"])


def finetune_config(tmp_path: Path, model_dir: Path, data_dir: Path, ratio: str) -> TrainConfig:
    return TrainConfig(
        model=ModelSection(base=str(model_dir), ratios=[ratio]),
        data=DataSection(
            dir=str(data_dir), stage="finetune", tasks={"passkey": 1.0}, num_samples=4, context_tokens=[100, 160],
            filler="corpus/python-3.11-docs.jsonl.gz", heldout_fraction=0.0,
        ),
        adapter=AdapterSection(kind="full"),
        optim=OptimSection(steps=2, lr=1e-3, batch_size=2),
        run=RunSection(out_dir=str(tmp_path / "run"), save_every=2, seed=1),
        distill=DistillSection(weight=0.5),
    )


def test_two_level_finetune_saves_and_reloads(tmp_path, tiny_model_dir, fixture_dir):
    config = finetune_config(tmp_path, tiny_model_dir, fixture_dir, "4X4")
    config.validate()
    assert config.model.ratios == ["4x4"]
    trainer = Trainer(config)
    result = trainer.run()

    assert result.step == 2
    assert all(math.isfinite(r["loss"]) and r["distill"] > 0 for r in result.history)
    layout = trainer.source.micro_batch(0, 0, 0, 1)[0].batch
    assert layout.suffix_index.shape[1] > 0
    record = assert_reload_matches(trainer, config.run.out_dir, "4x4")
    assert record["levels"] == 2


def test_init_from_other_level_count_raises(tmp_path, tiny_model_dir):
    first = tiny_config(tmp_path, tiny_model_dir, steps=1, grad_accum=1)
    train(first)
    second = tiny_config(tmp_path, tiny_model_dir, steps=1, grad_accum=1)
    second.model.ratios = ["4x4"]
    second.run.out_dir = str(tmp_path / "second")
    second.run.init_from = first.run.out_dir
    with pytest.raises(InvalidInputError, match="gist tokens for 1 level"):
        Trainer(second)


def test_two_processes_hold_same_weights(tmp_path, tiny_model_dir):
    config = tmp_path / "ddp.toml"
    corpus = corpus_file(tmp_path)
    config.write_text(
        f'[model]\nbase = "{tiny_model_dir}"\nratios = ["8"]\n'
        f'[data]\ndir = "{tmp_path}"\ncorpus = ["{corpus.name}"]\nseq_len = 64\nheldout_fraction = 0.0\n'
        f'[optim]\nsteps = 2\nlr = 1e-2\n[run]\nout_dir = "{tmp_path / "run"}"\n'
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    worker = Path(__file__).parent / "workers" / "train_worker.py"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        str(worker), str(config), str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["after"] == ranks[1]["after"]
    assert ranks[0]["after"] != ranks[0]["before"]


# --- bad input through the CLI -------------------------------------------------------------------


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "body, message",
    [
        ('[optim]\nstepz = 3\n', r"unknown field\(s\) \['stepz'\]"),
        ('[optim]\nsteps = "many"\n', r"steps has the wrong type: got 'many', expected int"),
        ('[optim]\nsteps = 0\n', r"optim.steps must be at least 1"),
        ('[adapter]\nkind = "qlora"\n', r"adapter.kind 'qlora' is not valid"),
        ('[model]\nratios = ["4y"]\n', r"model.ratios must be a chunk size .*; got 4y"),
        ('[model]\nratios = ["4x0"]\n', r"model.ratios must be a chunk size .*; got 4x0"),
        ('[data]\ntasks = {squad = 1.0}\n', r"unknown data.tasks"),
        ('not toml [', r"could not be parsed"),
    ],
)
def test_cli_rejects_bad_config(tmp_path, capsys, body, message):
    path = write_toml(tmp_path / "bad.toml", body)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert re.search(message, err), err


def test_cli_rejects_bad_data(tmp_path, capsys, tiny_model_dir):
    base = f'[model]\nbase = "{tiny_model_dir}"\nratios = ["16"]\n[run]\nout_dir = "{tmp_path / "run"}"\n'
    cases = [
        (f'[data]\ndir = "{tmp_path}"\ncorpus = ["missing.txt"]\n', "corpus path .*missing.txt not found"),
        (f'[data]\ndir = "{tmp_path}"\ncorpus = ["empty.txt"]\n', "has no train text"),
        (f'[data]\ndir = "{tmp_path}"\ncorpus = ["corpus.jsonl.gz"]\nseq_len = 10\n', "sequence length 10 is shorter"),
    ]
    (tmp_path / "empty.txt").write_text("")
    corpus_file(tmp_path)
    for data, message in cases:
        path = write_toml(tmp_path / "c.toml", base + data)
        assert main(["train", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err


def test_cli_resume_without_checkpoint(tmp_path, capsys, tiny_model_dir):
    corpus_file(tmp_path)
    path = write_toml(tmp_path / "c.toml", (
        f'[model]\nbase = "{tiny_model_dir}"\nratios = ["8"]\n'
        f'[data]\ndir = "{tmp_path}"\ncorpus = ["corpus.jsonl.gz"]\nseq_len = 64\n'
        f'[run]\nout_dir = "{tmp_path / "run"}"\n'
    ))
    assert main(["train", "--config", str(path), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_cli_trains_and_overrides(tmp_path, capsys, tiny_model_dir):
    corpus_file(tmp_path)
    path = write_toml(tmp_path / "c.yaml", (
        f"model:\n  base: {tiny_model_dir}\n  ratios: ['8']\n"
        f"data:\n  dir: {tmp_path}\n  corpus: [corpus.jsonl.gz]\n  seq_len: 64\n"
        f"optim:\n  steps: 5\n"
        f"run:\n  out_dir: {tmp_path / 'run'}\n"
    ))
    assert main(["train", "--config", str(path), "--set", "optim.steps=2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2
    record = load_checkpoint(summary["checkpoint"]).trainer
    assert record["config"]["optim"]["steps"] == 2


def test_cli_loss_two_levels(tmp_path, capsys, tiny_model_dir):
    corpus = corpus_file(tmp_path, documents=12, words=300)
    args = ["loss", "--model", str(tiny_model_dir), "--data-dir", str(tmp_path), "--corpus", corpus.name,
            "--methods", "gsa,full", "--ratio", "4X4", "--seq-len", "64", "--sequences", "2", "--heldout-fraction", "0.3"]
    assert main(args) == 0
    gsa, full = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert (gsa["method"], gsa["ratio"], gsa["ratio_sizes"]) == ("gsa", 16, "4x4")
    assert (full["ratio"], full["ratio_sizes"]) == (None, None)
    assert gsa["tokens"] == full["tokens"] == 64 * gsa["sequences"]
    assert gsa["loss"] != full["loss"]


def test_cli_loss_bad_ratio(tmp_path, capsys, tiny_model_dir):
    assert main(["loss", "--model", str(tiny_model_dir), "--ratio", "4x"]) == 2
    assert "--ratio must be a chunk size" in capsys.readouterr().err


# --- router distillation -------------------------------------------------------------------------


def naive_distill(student, teacher, batch, plain, chunk, spec, temperature):
    """Loop-clear KL(teacher chunk mass || softmax of gist scores), averaged like distill_loss."""
    num_chunks = batch.gist_index.shape[1]
    per_layer = []
    for layer in sorted(student.queries):
        values = []
        q_s, k_s = student.queries[layer], student.keys[layer]
        q_t, k_t = teacher.queries[layer], teacher.keys[layer]
        group = q_s.shape[1] // k_s.shape[1]
        for b in range(q_s.shape[0]):
            window_start = int(batch.num_chunks[b]) - spec.window_chunks
            candidates = [n for n in range(num_chunks) if batch.gist_index[b, n] >= 0 and n < window_start]
            if not candidates:
                continue
            for h in range(q_s.shape[1]):
                for t in range(q_s.shape[2]):
                    column = int(plain.suffix_index[b, t])
                    if column < 0:
                        continue
                    visible = [s for s in range(column + 1) if plain.kind[b, s] != TokenKind.PAD]
                    weights = torch.softmax(torch.stack([q_t[b, h, t] @ k_t[b, h // group, s] for s in visible]) * student.scaling, 0)
                    mass = {n: 0.0 for n in candidates}
                    for weight, s in zip(weights.tolist(), visible):
                        if int(chunk[b, s]) in mass:
                            mass[int(chunk[b, s])] += weight
                    total = sum(mass.values())
                    gists = [int(batch.gist_index[b, n]) for n in candidates]
                    scores = torch.stack([q_s[b, h, t] @ k_s[b, h // group, g] for g in gists]) * student.scaling / temperature
                    log_q = torch.log_softmax(scores, 0)
                    kl = sum((m / total) * (math.log(m / total) - float(lq)) for m, lq in zip(mass.values(), log_q) if m > 0)
                    values.append(kl)
        per_layer.append(sum(values) / len(values))
    return sum(per_layer) / len(per_layer)


@pytest.mark.parametrize("sizes", [(4,), (2, 2), (2, 2, 2)])
def test_distill_loss_matches_loops(sizes):
    from gsa.train.distill import Recorder, distill_loss, selecting_layers, teacher_batch

    model = make_model("llama", heads=6, kv_heads=2)
    spec = GistSpec.from_sizes(sizes, sinks=2)
    generator = torch.Generator().manual_seed(2)
    gist_ids = LEVEL_GIST_IDS[: len(sizes)]
    examples = [
        task_example(torch.randint(1, 90, (n,), generator=generator).tolist(), [5, 6], [7, 8, 9], gist_ids, spec)
        for n in (41, 26)
    ]
    batch = collate_examples(examples, pad_id=0).batch
    config = GSAConfig(spec=spec, top_k=2)
    layers = selecting_layers(model.config.num_hidden_layers, config)
    student, teacher = Recorder(layers), Recorder(layers)
    plain, chunk = teacher_batch(batch)
    with torch.no_grad():
        model(input_ids=batch.input_ids, position_ids=batch.position_ids, gist_batch=batch, gsa_config=config,
              gsa_recorder=student)
        model(input_ids=plain.input_ids, position_ids=plain.position_ids, gist_batch=plain,
              gsa_config=GSAConfig(spec=spec, method="full"), gsa_recorder=teacher)
    assert layers == {1, 2}
    fast = float(distill_loss(student, teacher, batch, plain, chunk, config, temperature=0.7))
    naive = naive_distill(student, teacher, batch, plain, chunk, spec, temperature=0.7)
    assert fast > 0
    assert abs(fast - naive) < 1e-4 * max(1.0, naive)


def test_teacher_batch_drops_gists():
    from gsa.train.distill import teacher_batch

    spec = GistSpec(chunk_size=4, sinks=2)
    examples = [task_example(list(range(10, 10 + n)), [5], [6], GIST_ID, spec) for n in (19, 11)]
    batch = collate_examples(examples, pad_id=0).batch
    plain, chunk = teacher_batch(batch)
    for b, n in enumerate((19, 11)):
        real = plain.kind[b] != TokenKind.PAD
        assert plain.input_ids[b, real].tolist() == list(range(10, 10 + n)) + [5, 6]
        assert plain.position_ids[b, real].tolist() == list(range(n + 2))
        raw = batch.kind[b] == TokenKind.RAW
        assert chunk[b, real].tolist()[2:2 + int(raw.sum())] == batch.chunk[b, raw].tolist()


def test_export_drops_optimizer_state(tmp_path, capsys, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, steps=1, grad_accum=1)
    train(config)
    assert main(["export", config.run.out_dir, str(tmp_path / "export")]) == 0
    exported = load_checkpoint(tmp_path / "export")
    source = load_checkpoint(config.run.out_dir)
    assert exported.state is None
    assert exported.weights.keys() == source.weights.keys()
    for name in source.weights:
        assert torch.equal(exported.weights[name], source.weights[name])
    assert exported.trainer["base_fingerprint"] == source.trainer["base_fingerprint"]
    assert not (tmp_path / "export" / "state.safetensors").exists()


def test_gradient_checkpointing_same_update(tmp_path, tiny_model_dir):
    runs = {}
    for flag in (False, True):
        folder = tmp_path / str(flag)
        folder.mkdir()
        config = tiny_config(folder, tiny_model_dir, steps=2, grad_accum=1, gradient_checkpointing=flag)
        result = train(config)
        runs[flag] = (result.history, load_checkpoint(result.checkpoint).weights)
    (plain_history, plain), (checkpointed_history, checkpointed) = runs[False], runs[True]
    for a, b in zip(plain_history, checkpointed_history):
        assert abs(a["loss"] - b["loss"]) < 1e-5
    for name in plain:
        assert relative_error(checkpointed[name], plain[name]) < 1e-5, name


def test_export_refuses_existing_targets(tmp_path, capsys, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, steps=1, grad_accum=1)
    train(config)
    run = config.run.out_dir
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder").mkdir()
    cases = [
        ([run, run], "is the source"),
        ([run, f"{run}/inner"], "is the source"),
        ([run, str(tmp_path / "afile")], "already exists"),
        ([run, str(tmp_path / "afile"), "--force"], "not a checkpoint folder"),
        ([run, str(tmp_path / "folder"), "--force"], "not a checkpoint folder"),
    ]
    for args, message in cases:
        assert main(["export", *args]) == 2, args
        assert message in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "x"
    assert main(["export", run, str(tmp_path / "out")]) == 0
    assert main(["export", run, str(tmp_path / "out")]) == 2
    assert main(["export", run, str(tmp_path / "out"), "--force"]) == 0
    assert sorted(p.name for p in Path(run).iterdir()) == ["latest", "loss.png", "metrics.jsonl", "step-000001"]


def test_resume_finished_run_reports_last(tmp_path, capsys, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, steps=2, grad_accum=1)
    first = train(config)
    again = train(config, resume=True)
    assert again.step == 2
    assert again.last_loss == first.last_loss
    assert again.checkpoint == first.checkpoint


def test_set_errors_name_the_option(tmp_path):
    from gsa.train.config import load_config

    path = write_toml(tmp_path / "c.toml", "[optim]\nsteps = 4\n")
    assert load_config(path, ["adapter.kind=full", "optim.steps=7"]).adapter.kind == "full"
    for override, message in [
        ("optim.nope=1", r"--set optim.nope: unknown field 'nope'"),
        ("optim.steps=ten", r"--set optim.steps has the wrong type: got 'ten'"),
        ("bogus.x=1", r"--set bogus.x: unknown section 'bogus'"),
        ("optim.steps", r"must look like section.field=value"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            load_config(path, [override])


@pytest.mark.parametrize("count", [1, 7, 16, 400])
def test_task_counts_add_up(count):
    from gsa.train.tasks import _apportion

    counts = _apportion(count, {"rag-nq": 0.4, "kv-retrieval": 0.2, "passkey": 0.4})
    assert sum(counts.values()) == count
    assert counts["kv-retrieval"] <= counts["passkey"]
    thirds = _apportion(count, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert sum(thirds.values()) == count
    assert max(thirds.values()) - min(thirds.values()) <= 1
