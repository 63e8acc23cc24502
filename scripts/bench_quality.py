"""Quality per KV byte: convert a source at several budgets, evaluate each on held-out text against the source.

    python scripts/bench_quality.py runs/smollm2 --budgets 1.0 0.5 0.25 --calibration ../shared/data/wikitext2_valid.txt

Calibration reads the first 80% of the text, evaluation the last 20%. Prints a markdown table and writes JSON.
`--calibration sampled` uses data-free calibration (text sampled from the source).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mla_convert  # noqa: F401
from mla_convert.convert import ConversionOptions, convert
from mla_convert.data import EVALUATION_PART, load_text, tokenize_into_sequences
from mla_convert.evaluate import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="source model folder (e.g. from scripts/fetch_smollm2.py)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--calibration", nargs="+", default=["../shared/data/wikitext2_valid.txt"],
                        help="calibration text(s); 'sampled' for data-free")
    parser.add_argument("--calibration-tokens", type=int, default=32768)
    parser.add_argument("--init", nargs="+", default=["pca"], choices=("pca", "svd"))
    parser.add_argument("--eval-data", default="../shared/data/wikitext2_valid.txt")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--json", default="runs/bench_quality.json")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.source)
    source = AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.float32).eval()
    text, split = load_text(args.eval_data, EVALUATION_PART)
    held_out = tokenize_into_sequences(tokenizer, text, args.seq_len, args.eval_tokens)

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for calibration in args.calibration:
            for init in args.init:
                for budget in args.budgets:
                    options = ConversionOptions(
                        kv_budget=budget,
                        init=init,
                        calibration=None if calibration == "sampled" else calibration,
                        calibration_tokens=args.calibration_tokens,
                    )
                    output = Path(scratch) / f"mla-{budget}"
                    started = time.perf_counter()
                    report = convert(args.source, output, options, overwrite=True)
                    seconds = time.perf_counter() - started
                    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
                    results = evaluate(model, held_out, reference=source)
                    rows.append({
                        "budget": budget,
                        "init": init,
                        "calibration": report["calibration"]["description"],
                        "kv_lora_rank": report["kv_lora_ranks"][0],
                        "qk_rope_head_dim": report["qk_rope_head_dim"],
                        "kv_bytes_per_token": report["cache"]["mla_bytes_per_token"],
                        "source_kv_bytes_per_token": report["cache"]["source_bytes_per_token"],
                        "conversion_seconds": round(seconds, 1),
                        **results,
                    })
                    print(json.dumps(rows[-1]), flush=True)

    print(f"\nheld-out: {split}, {rows[0]['tokens']} predicted tokens, sequences of {args.seq_len}\n")
    print("| KV budget | init | calibration | rank + rope | KV bytes/token (fp32) | perplexity | ratio | KL | top-1 | convert s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['budget']:.2f} | {row['init']} | {row['calibration']} | {row['kv_lora_rank']} + "
            f"{row['qk_rope_head_dim']} | {row['kv_bytes_per_token']} / {row['source_kv_bytes_per_token']} | "
            f"{row['perplexity']:.2f} | {row['perplexity'] / row['reference_perplexity']:.3f} | {row['kl']:.3f} | "
            f"{row['top1_agreement']:.3f} | {row['conversion_seconds']} |"
        )
    print(f"| source | | | | {rows[0]['source_kv_bytes_per_token']} | {rows[0]['reference_perplexity']:.2f} | 1.000 | 0 | 1 | |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"held_out": split, "seq_len": args.seq_len, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
