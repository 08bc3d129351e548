#!/usr/bin/env bash
# Run every evaluation task with every method on the embedded model, then build the report.
# Usage: GSA_DATA_DIR=/path/to/data bash scripts/eval_matrix.sh [OUT] [LIMIT]
set -euo pipefail
OUT=${1:-runs/eval}
LIMIT=${2:-1}
METHODS=full,gsa,gist-only,oracle,quest,mean-key,streaming,recent,random
LONGBENCH=longbench:qasper,longbench:multifieldqa_en,longbench:hotpotqa,longbench:2wikimqa,longbench:triviaqa,longbench:passage_retrieval_en,longbench:gov_report,longbench:lcc
LEVAL=leval:natural_question,leval:scientific_qa,leval:multidoc_qa,leval:quality,leval:topic_retrieval_longchat

gsa eval --task "$LONGBENCH,$LEVAL,rag-nq,kv-retrieval" --method "$METHODS" --ratio 16 \
    --limit "$LIMIT" --max-context-tokens 3072 --max-new-tokens 64 --out "$OUT"
gsa eval --task passkey,niah --method "$METHODS" --ratio 16 --lengths 1024,2048,3072 --depths 0,0.5,1 --out "$OUT"
gsa eval --task perplexity --method "$METHODS" --ratio 16 --lengths 2048 --limit "$LIMIT" --out "$OUT"
gsa eval --task rag-nq --method gsa,quest,oracle --ratio 8,32 --limit 4 --out "$OUT"
gsa eval --task rag-nq --method full,gsa,quest,oracle --ratio 16 --limit 4 --diagnostics --out "$OUT/diagnostics"
gsa report "$OUT"
gsa report "$OUT/diagnostics"
