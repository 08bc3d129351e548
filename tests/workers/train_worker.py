"""Run a few training steps in each process of ``accelerate launch`` and record each rank's weights.

Usage: ``accelerate launch --cpu --num_processes 2 train_worker.py CONFIG OUT_DIR``. Every rank
writes ``rank<r>.json`` with the SHA-256 of its trainable tensors before and after training.
"""

import hashlib
import json
import sys
from pathlib import Path

from gsa.train.config import load_config
from gsa.train.loop import Trainer
from gsa.train.weights import trainable_tensors


def digest(model) -> str:
    sha = hashlib.sha256()
    for name, tensor in sorted(trainable_tensors(model).items()):
        sha.update(name.encode())
        sha.update(tensor.float().contiguous().numpy().tobytes())
    return sha.hexdigest()


def main() -> None:
    config = load_config(sys.argv[1])
    trainer = Trainer(config)
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = digest(model)
    result = trainer.run()
    record = {
        "rank": trainer.accelerator.process_index, "world": trainer.accelerator.num_processes,
        "before": before, "after": digest(model), "step": result.step,
    }
    Path(sys.argv[2], f"rank{record['rank']}.json").write_text(json.dumps(record), encoding="utf-8")


if __name__ == "__main__":
    main()
