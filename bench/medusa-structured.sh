#!/usr/bin/env bash
# Medusa on the project's structured model (assets/structured-model), end to end through the CLI:
# self-distill 512 training prompts of the structured corpus (greedy), MEDUSA-1 heads (configs/tiny.yaml
# with 4 heads), then `eval --speed` on the 64 held-out prompts (data/prompts/structured.jsonl,
# distilled the same way) for several tree budgets.
#
#   bash bench/medusa-structured.sh [work dir, default /tmp/medusa-structured] [engine auto|tfjs|onnx]
# Needs `npm run build` first. Prints eval's report; JSON and chart land in <work>/run/eval/.
set -euo pipefail
W=${1:-/tmp/medusa-structured}
ENGINE=${2:-auto}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLI="node $ROOT/dist/src/bin.js"
MODEL=$ROOT/assets/structured-model
rm -rf "$W" && mkdir -p "$W"
node --input-type=module -e "
import { trainingSamples } from '$ROOT/dist/src/model/structured-corpus.js';
import * as fs from 'node:fs';
const rows = trainingSamples(512, 1234).map((s) => JSON.stringify({ prompt: s.prompt }));
fs.writeFileSync('$W/train-prompts.jsonl', rows.join('\n') + '\n');
"
$CLI distill --model "$MODEL" --input "$W/train-prompts.jsonl" --out "$W/train-data" --temperature 0 --max-new-tokens 256 --no-progress
$CLI distill --model "$MODEL" --input "$ROOT/data/prompts/structured.jsonl" --out "$W/eval-data" --temperature 0 --max-new-tokens 256 --no-progress
$CLI train --config "$ROOT/configs/tiny.yaml" --set model.path="$MODEL" --set model.engine=$ENGINE --set "data.train=[$W/train-data]" \
  --set heads.num_heads=4 --set train.epochs=3 --set run.dir="$W" --set run.name=run --no-progress
$CLI eval --run "$W/run" --data "$W/eval-data" --budgets 1,2,4,8,16,32,64 --speed 16 --new-tokens 128 --live 16
