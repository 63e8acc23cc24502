"""The price of DeepSeek-V3 compatibility, constraint by constraint: closed-form conversions at one budget, each adding
one of `--target deepseek`'s constraints to the plain MLA conversion, scored on held-out text against the source.

    python scripts/fetch_smollm2.py runs/smollm2
    python scripts/bench_deepseek.py runs/smollm2                      (about 10 minutes on 2 quiet CPU cores)

Rows (all closed form, `--refine-steps 0`, K/V balance 1, one latent size in every layer, `rorope` placement):
- `mla`: the plain target with uniform ranks (free RoPE placement: any key component of any frequency);
- `deepseek table`: DeepSeek's RoPE table (one key component per frequency), no latent norm;
- `+ anchor`: one latent dimension given to the anchor (`deepseek.add_latent_anchor`), no norm yet;
- `+ anchor + norm`: the closed form of `--target deepseek` with its anchor and norm measured on the whole MLA
  model's activations (each layer sees the converted layers before it);
- `convert --target deepseek`: what `convert --target deepseek --refine-steps 0 --key-scale 1` builds, layer by
  layer, its anchor and norm measured on the source's activations;
- `norm, no anchor`: the latent norm on the plain latent, to show what the anchor is for;
- `... --nope-shrink on`: the plain target, the table alone and the full closed form again, with each frequency's
  NoPE key shrunk by E[cos(theta delta)] (`decompose.nope_shrink_factors`).

Calibration reads the first 80% of --calibration, evaluation the last 20% of --eval-data (same file by default: the
two never overlap). Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mla_convert  # noqa: F401
from mla_convert.calibration_text import calibration_sequences
from mla_convert.conversion_options import ConversionOptions
from mla_convert.convert import convert
from mla_convert.data import EVALUATION_PART, load_text, tokenize_into_sequences
from mla_convert.deepseek import deepseek_closed_form, latent_rms, with_latent_norm
from mla_convert.evaluate import ReferenceLogProbs, evaluate
from mla_convert.plan import SourceShape, plan_ranks


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="source model folder (e.g. from scripts/fetch_smollm2.py)")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--calibration", default="../shared/data/wikitext2_valid.txt")
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--eval-data", default="../shared/data/wikitext2_valid.txt")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--json", default="runs/bench_deepseek.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.source)
    source = AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.float32).eval()
    shape = SourceShape.from_config(source.config)
    text, split = load_text(args.eval_data, EVALUATION_PART)
    held_out = tokenize_into_sequences(tokenizer, text, args.seq_len, args.eval_tokens)
    reference = ReferenceLogProbs(source, held_out, progress=False)

    options = ConversionOptions(
        kv_budget=args.budget, calibration=args.calibration, calibration_tokens=args.calibration_tokens,
        refine_steps=0, key_scale=1.0, rank_allocation="uniform",
    )  # fmt: skip
    plan = plan_ranks(shape, options)
    kv_lora_rank, qk_rope_head_dim = plan.kv_lora_ranks[0], plan.qk_rope_head_dim
    sequences, calibration_info = calibration_sequences(source, tokenizer, options)
    rows = []

    def converted(conversion: ConversionOptions):
        """`mla-convert convert`'s model for `conversion`, loaded back in float32."""
        with tempfile.TemporaryDirectory() as folder:
            convert(args.source, Path(folder) / "mla", conversion, progress=False)
            return AutoModelForCausalLM.from_pretrained(Path(folder) / "mla", dtype=torch.float32).eval()

    def score(name: str, model) -> None:
        started = time.perf_counter()
        results = evaluate(model, held_out, reference=reference, progress=False)
        row = {
            "row": name,
            "perplexity_ratio": results["perplexity"] / results["reference_perplexity"],
            "kl": results["kl"],
            "top1_agreement": results["top1_agreement"],
        }
        rows.append(row)
        print(f"{name}: {row['perplexity_ratio']:.3f}x, KL {row['kl']:.3f} ({time.perf_counter() - started:.0f} s)",
              flush=True)  # fmt: skip

    score("mla", converted(options))
    score("mla, --nope-shrink on", converted(replace(options, nope_shrink="on")))
    table_only = deepseek_closed_form(
        source, source.config, kv_lora_rank, qk_rope_head_dim, sequences, latent_anchor=False
    )
    score("deepseek table", table_only)
    score("norm, no anchor", with_latent_norm(table_only, latent_rms(table_only, sequences)))
    del table_only
    anchored = deepseek_closed_form(source, source.config, kv_lora_rank, qk_rope_head_dim, sequences)
    score("+ anchor", anchored)
    score("+ anchor + norm", with_latent_norm(anchored, latent_rms(anchored, sequences)))
    del anchored
    score("convert --target deepseek", converted(replace(options, target="deepseek")))
    shrunk_table = deepseek_closed_form(
        source, source.config, kv_lora_rank, qk_rope_head_dim, sequences, latent_anchor=False, nope_shrink=True
    )
    score("deepseek table, --nope-shrink on", shrunk_table)
    del shrunk_table
    shrunk = deepseek_closed_form(source, source.config, kv_lora_rank, qk_rope_head_dim, sequences, nope_shrink=True)
    score("+ anchor + norm, --nope-shrink on", with_latent_norm(shrunk, latent_rms(shrunk, sequences)))

    print(f"\nbudget {args.budget:g}: {kv_lora_rank} + {qk_rope_head_dim} per layer; held-out: {split}, "
          f"{held_out.numel()} tokens in windows of {args.seq_len}; calibration: {calibration_info['description']}\n")  # fmt: skip
    print("| conversion (closed form) | perplexity / source | KL | top-1 |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['row']} | {row['perplexity_ratio']:.3f} | {row['kl']:.3f} | {row['top1_agreement']:.3f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "source": args.source, "budget": args.budget, "shape": [kv_lora_rank, qk_rope_head_dim],
        "held_out": split, "calibration": calibration_info, "rows": rows,
    }, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
