#!/usr/bin/env bash
# Everything that needs a GPU, in one command, under 10 minutes on one GPU; prints one summary at the end.
#
#   bash scripts/gpu_check.sh [--source DIR] [--data FILE] [--out DIR] [--dry-run]
#
# 1. tests on CUDA: tests/test_gpu.py (bf16 and fp16 where supported; sdpa, and flash attention if installed)
# 2. the decode bench at 2k and 8k context (bf16), source against its 0.25 conversion
# 3. convert SOURCE at 0.25 on the GPU, then a short heal with --mixed-precision bf16 (one process)
# 4. the same heal under configs/accelerate/fsdp.yaml (FSDP2, one GPU): sharded checkpoint, gathered folder
#
# SOURCE (default runs/smollm2): a model folder, e.g. `python scripts/fetch_smollm2.py runs/smollm2`.
# DATA (default ../shared/data/wikitext2_valid.txt). OUT (default runs/gpu_check): logs, JSON, models.
# Missing CUDA, SOURCE or DATA stops it before anything runs or is written (exit 2). A failing step does not stop
# the others; the exit code is 1 if any failed. PYTHON picks the interpreter (default: python).
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check: error: $*" >&2; exit 2; }

source_dir=runs/smollm2
data=../shared/data/wikitext2_valid.txt
out=runs/gpu_check
dry_run=0
python=${PYTHON:-python}
while [ $# -gt 0 ]; do
    case $1 in
        --source) [ $# -ge 2 ] || die "--source needs a folder"; source_dir=$2; shift 2 ;;
        --data) [ $# -ge 2 ] || die "--data needs a file"; data=$2; shift 2 ;;
        --out) [ $# -ge 2 ] || die "--out needs a folder"; out=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

# ---- preflight: nothing is written before these pass
[ -f "$source_dir/config.json" ] || die "no model folder at $source_dir (no config.json): pass --source DIR, or \
write one with: $python scripts/fetch_smollm2.py $source_dir"
[ -f "$data" ] || die "no text at $data: pass --data FILE"
if [ $dry_run = 0 ]; then
    cuda=$($python -c "import torch; print(torch.cuda.is_available())" 2>&1) \
        || die "$python cannot import torch: $(echo "$cuda" | tail -n 1)"
    [ "$cuda" = True ] || die "torch sees no CUDA device ($($python -c 'import torch; print(torch.__version__)'); \
nvidia-smi: $(nvidia-smi -L 2>&1 | head -1))"
    $python -c "import mla_convert, accelerate" 2>/dev/null || die "mla_convert is not installed: pip install -e '.[test]'"
fi

steps=()
declare -A status seconds
run_step() {  # NAME LIMIT_SECONDS COMMAND...: runs it under a time limit, logs to OUT/NAME.log
    local name=$1 limit=$2; shift 2
    steps+=("$name")
    if [ $dry_run = 1 ]; then
        echo "[$name, ${limit}s] $*"
        status[$name]=dry-run; seconds[$name]=0
        return
    fi
    echo "== $name (at most ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    seconds[$name]=$((SECONDS - start))
    case $rc in
        0) status[$name]=ok ;;
        124) status[$name]="TIMEOUT after ${limit}s" ;;
        *) status[$name]="FAILED (exit $rc)"; tail -n 25 "$out/$name.log" | sed 's/^/    /' ;;
    esac
    echo "   ${status[$name]} in ${seconds[$name]}s (log: $out/$name.log)"
}

[ $dry_run = 1 ] || mkdir -p "$out"
export HF_HUB_OFFLINE=1

run_step tests 240 env MLA_TEST_DEVICE=cuda $python -m pytest tests/test_gpu.py -q -rs -p no:cacheprovider

run_step bench_decode 150 $python scripts/bench_decode.py "$source_dir" --budgets 0.25 --contexts 2048 \
    --long --batch-sizes 1 --steps 16 --device cuda --dtype bfloat16 --json "$out/bench_decode.json" \
    --plot "$out/bench_decode.png"

run_step convert 90 $python -m mla_convert convert "$source_dir" "$out/mla" --kv-budget 0.25 --calibration "$data" \
    --calibration-tokens 8192 --refine-steps 20 --device cuda --overwrite

heal_args=(--teacher "$source_dir" --data "$data" --max-tokens 32768 --seq-len 512 --batch-size 4 --lr 5e-5
           --mixed-precision bf16 --teacher-dtype bfloat16 --eval-tokens 4096 --eval-every 0 --save-every 4
           --keep-checkpoints --no-progress --overwrite)
run_step heal_bf16 90 $python -m mla_convert heal "$out/mla" "$out/healed" "${heal_args[@]}"

run_step heal_fsdp 120 $python -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml \
    --num_processes 1 --main_process_port 29533 -m mla_convert.heal "$out/mla" "$out/healed-fsdp" \
    "${heal_args[@]}" --gradient-checkpointing

# ---- summary
echo
echo "==================== gpu_check summary ===================="
[ $dry_run = 1 ] || $python - "$out" <<'EOF'
import json, subprocess, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
    name = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip()
except OSError:
    name = "?"
import torch
print(f"GPU: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}")
log = out / "tests.log"
if log.is_file():
    lines = [l for l in log.read_text().splitlines() if " passed" in l or " failed" in l or "SKIPPED" in l]
    print("tests: " + ("; ".join(lines[-4:]) or "no result line"))
bench = out / "bench_decode.json"
if bench.is_file():
    rows = json.loads(bench.read_text())
    rows = rows.get("rows", rows) if isinstance(rows, dict) else rows
    for row in rows:
        print(f"decode: {row['model']}, context {row['context']}, batch {row['batch_size']}: "
              f"{row['decode_seconds_per_step'] * 1000:.1f} ms/step, {row['tokens_per_second']:.0f} tokens/s, "
              f"peak {row['peak_memory_bytes'] / 2**20:.0f} MB, cache {row['cache_bytes'] / 2**20:.1f} MB")
for run in ("healed", "healed-fsdp"):
    report = out / run / "healing.json"
    if report.is_file():
        r = json.loads(report.read_text())
        first, last = r["eval"][0], r["eval"][-1]
        print(f"{run}: {r['tokens_seen']} tokens, {r['tokens_per_second'] or 0:.0f} tokens/s, held-out KL "
              f"{first['kl']:.4f} -> {last['kl']:.4f}, checkpoints {r['settings'].get('checkpoint_format')}")
checkpoints = sorted((out / "healed-fsdp.checkpoints").glob("step-*/pytorch_model_fsdp_0"))
print(f"FSDP sharded checkpoints: {len(checkpoints)}")
EOF
failed=0
for name in "${steps[@]}"; do
    printf '%-14s %-24s %ss\n' "$name" "${status[$name]}" "${seconds[$name]}"
    case ${status[$name]} in ok|dry-run) ;; *) failed=1 ;; esac
done
if [ $dry_run = 0 ] && [ -f "$out/healed-fsdp/healing.json" ] \
    && ! grep -q '"checkpoint_format": "fsdp"' "$out/healed-fsdp/healing.json"; then
    echo "heal_fsdp      NOT SHARDED: accelerate did not run FSDP (see $out/heal_fsdp.log)"
    failed=1
fi
if [ $dry_run = 1 ]; then
    echo "gpu_check: dry run, nothing was run"
elif [ $failed = 0 ]; then
    echo "gpu_check: all passed"
else
    echo "gpu_check: SOME STEPS FAILED"
fi
exit $failed
