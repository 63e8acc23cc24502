#!/usr/bin/env bash
# The main job end to end on the real SmolLM2-135M-Instruct: fetch, convert at 50% KV, evaluate, generate.
# Usage: bash scripts/quickstart.sh [WORK_FOLDER]   (default: runs/quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-runs/quickstart}
data=${MLA_DATA:-../shared/data/wikitext2_valid.txt}
mkdir -p "$work"
[ -f "$work/smollm2/config.json" ] || python scripts/fetch_smollm2.py "$work/smollm2"
mla-convert convert "$work/smollm2" "$work/smollm2-mla50" --kv-budget 0.5 --calibration "$data" --overwrite
mla-convert eval "$work/smollm2-mla50" --data "$data" --reference "$work/smollm2" --json "$work/eval-mla50.json"
mla-convert generate "$work/smollm2-mla50" "What is the capital of France?"
