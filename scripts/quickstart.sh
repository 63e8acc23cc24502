#!/usr/bin/env bash
# The main job end to end on the real SmolLM2-135M-Instruct: fetch, convert at 50% KV, evaluate, generate.
# Usage: bash scripts/quickstart.sh [WORK_FOLDER]   (default: runs/quickstart)
#
# Text: MLA_DATA (a file, a folder, or a datasets name NAME[:CONFIG][@SPLIT] where the hub is reachable) calibrates
# the conversion on its first 80% and evaluates it on its last 20%. Unset, it is ../shared/data/wikitext2_valid.txt
# where that exists. Where it does not (this repository cloned alone), or with MLA_DATA set empty, the conversion
# calibrates data-free, on text sampled from the model itself, and the evaluation, which needs held-out text, is
# skipped with a message saying how to run it.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-runs/quickstart}
shared=../shared/data/wikitext2_valid.txt
if [ -n "${MLA_DATA+set}" ]; then
    data=$MLA_DATA
elif [ -e "$shared" ]; then
    data=$shared
else
    echo "quickstart: no $shared beside this repository"
    data=
fi
mkdir -p "$work"
[ -f "$work/smollm2/config.json" ] || python scripts/fetch_smollm2.py "$work/smollm2"

if [ -n "$data" ]; then
    echo "quickstart: calibrating on the first 80% of $data, evaluating on its last 20%"
    mla-convert convert "$work/smollm2" "$work/smollm2-mla50" --kv-budget 0.5 --calibration "$data" --overwrite
    mla-convert eval "$work/smollm2-mla50" --data "$data" --reference "$work/smollm2" --json "$work/eval-mla50.json"
else
    echo "quickstart: calibrating data-free (text sampled from the model itself, seeded; no text file needed)"
    mla-convert convert "$work/smollm2" "$work/smollm2-mla50" --kv-budget 0.5 --overwrite
    rm -f "$work/eval-mla50.json"  # a previous run's evaluation would not be of this model
    echo "quickstart: evaluation skipped: perplexity needs held-out text, and there is none here. To evaluate, rerun"
    echo "  with MLA_DATA=FILE (or a datasets name, e.g. MLA_DATA=Salesforce/wikitext:wikitext-2-raw-v1@validation)"
    echo "  or run: mla-convert eval $work/smollm2-mla50 --data FILE_OR_DATASET --reference $work/smollm2"
fi
mla-convert generate "$work/smollm2-mla50" "What is the capital of France?"
