#!/usr/bin/env bash
# Run every evaluation task with every method on the untrained embedded model (gists only route,
# dense prefill), then hierarchical gsa (4x4) and the trained checkpoint, and build the reports.
# Usage: GSA_DATA_DIR=/path/to/data bash scripts/eval_matrix.sh [OUT] [LIMIT]
set -euo pipefail
OUT=${1:-runs/eval}
LIMIT=${2:-1}
METHODS=full,gsa,gist-only,oracle,quest,mean-key,streaming,recent,random
LONGBENCH=longbench:qasper,longbench:multifieldqa_en,longbench:hotpotqa,longbench:2wikimqa,longbench:triviaqa,longbench:passage_retrieval_en,longbench:gov_report,longbench:lcc
LEVAL=leval:natural_question,leval:scientific_qa,leval:multidoc_qa,leval:quality,leval:topic_retrieval_longchat

UNTRAINED="--checkpoint none --prefill dense"
TRAINED="--checkpoint checkpoints/smollm2-135m-gsa16 --prefill gist"

gsa eval $UNTRAINED --task "$LONGBENCH,$LEVAL,rag-nq,kv-retrieval" --method "$METHODS" --ratio 16 \
    --limit "$LIMIT" --max-context-tokens 3072 --max-new-tokens 64 --out "$OUT"
gsa eval $UNTRAINED --task passkey,niah --method "$METHODS" --ratio 16 --lengths 1024,2048,3072 --depths 0,0.5,1 --out "$OUT"
gsa eval $UNTRAINED --task perplexity --method "$METHODS" --ratio 16 --lengths 2048 --limit "$LIMIT" --out "$OUT"
gsa eval $UNTRAINED --task rag-nq --method gsa,quest,oracle --ratio 8,32 --limit 4 --out "$OUT"
gsa eval $UNTRAINED --task rag-nq --method full,gsa,quest,oracle --ratio 16 --limit 4 --diagnostics --out "$OUT/diagnostics"
gsa report "$OUT"
gsa report "$OUT/diagnostics"

# Hierarchical gsa (two levels, 4x4 = 16x) and the trained checkpoint, each in its own folder.
for setting in hierarchical trained; do
    if [ "$setting" = hierarchical ]; then args="$UNTRAINED --method gsa --ratio 4x4"; else args="$TRAINED --method gsa --ratio 16"; fi
    gsa eval $args --task "$LONGBENCH,$LEVAL,rag-nq,kv-retrieval" --limit "$LIMIT" --max-context-tokens 3072 \
        --max-new-tokens 64 --out "$OUT-$setting"
    gsa eval $args --task passkey,niah --lengths 1024,2048,3072 --depths 0,0.5,1 --out "$OUT-$setting"
    gsa eval $args --task perplexity --lengths 2048 --limit "$LIMIT" --out "$OUT-$setting"
    gsa report "$OUT-$setting"
done
