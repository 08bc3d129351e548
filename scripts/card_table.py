"""Print the model-card table from the folders written by scripts/card_eval.sh.

usage: python scripts/card_table.py runs/card NAME [NAME ...]

One row per NAME (a folder under the results root): held-out loss, pass key accuracy
at each context length, multi-document QA accuracy, and the mean share of full attention's keys
read per generated token.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def row(folder: Path) -> dict:
    cells: dict[str, str] = {}
    for record in read_jsonl(folder / "loss.jsonl"):
        cells["held-out loss"] = f"{record['loss']:.3f}"
        cells["loss tokens"] = str(record["tokens"])

    for run in sorted(folder.glob("passkey__*")):
        by_length = defaultdict(list)
        for prediction in read_jsonl(run / "predictions.jsonl"):
            by_length[prediction["extra"]["length"]].append(prediction["score"])
        for length, scores in sorted(by_length.items()):
            cells[f"pass key {length // 1024}K"] = f"{sum(scores) / len(scores):.0%} ({len(scores)})"

    for run in sorted(folder.glob("rag-nq__*")):
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
        cells["NQ 10 docs"] = f"{summary['score']:.0%} ({summary['n']})"
        cells["keys read"] = f"{summary['mean_attended_kv_fraction']:.1%}"
    return cells


def main() -> None:
    root, names = Path(sys.argv[1]), sys.argv[2:]
    rows = {name: row(root / name) for name in names}
    columns = [c for c in ("held-out loss", "pass key 2K", "pass key 4K", "NQ 10 docs", "keys read") if any(c in r for r in rows.values())]
    print("| model | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells.get(c, "–") for c in columns) + " |")


if __name__ == "__main__":
    main()
