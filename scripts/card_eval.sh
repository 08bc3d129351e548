#!/usr/bin/env bash
# Evaluate one model setting for a model card: held-out loss, pass key accuracy at 2K and 4K over
# five needle depths, and multi-document QA accuracy on the first 30 NQ rows (never trained on).
#
# usage: scripts/card_eval.sh NAME CHECKPOINT METHOD [OUT] [RATIO]
#   NAME        label of the run folder, e.g. trained
#   CHECKPOINT  checkpoint folder, or none for the untrained base model
#   METHOD      gsa (gists, gist-mask prefill) or full (dense attention, no gists)
#   RATIO       compression ratio, 16 (default) or 4x4 for two levels
# Needs $GSA_DATA_DIR. Results: OUT/NAME/ (default OUT=runs/card).
set -euo pipefail
name=$1 checkpoint=$2 method=$3 out=${4:-runs/card} ratio=${5:-16}
gsa=${GSA:-.venv/bin/gsa}
mkdir -p "$out/$name"

loss_methods=$([ "$method" = full ] && echo full || echo gsa)
"$gsa" loss --checkpoint "$checkpoint" --methods "$loss_methods" --ratio "$ratio" --sequences 4 > "$out/$name/loss.jsonl"
"$gsa" eval --checkpoint "$checkpoint" --method "$method" --prefill gist --ratio "$ratio" --task passkey \
    --lengths 2048,4096 --depths 0,0.25,0.5,0.75,1 --out "$out/$name"
"$gsa" eval --checkpoint "$checkpoint" --method "$method" --prefill gist --ratio "$ratio" --task rag-nq \
    --limit 30 --out "$out/$name"
