"""Quality per KV byte: MLA conversions of a source at several budgets, each way of converting, and the GQA baseline,
evaluated on held-out text against the source. No fine-tuning: refinement counts, healing does not.

    python scripts/fetch_smollm2.py runs/smollm2
    python scripts/bench_quality.py runs/smollm2                      (under 30 minutes on 2 CPU cores)
    python scripts/bench_quality.py runs/smollm2 --quick              (defaults only, at 0.5 and 0.25)
    python scripts/bench_quality.py runs/smollm2 --cross-domain       (calibration domains, about 30 minutes)

Calibration reads the first 80% of --calibration (32k tokens by default), evaluation the last 20% of --eval-data
(8k tokens in windows of 512): the two never overlap when they are the same file. Every
conversion runs `mla-convert convert`'s own pipeline (calibration included), so each row's time is a whole
conversion's.

Rows:
- `default`: the options `mla-convert convert` uses by default, at every budget;
- `closed form`: the defaults without refinement (`--refine-steps 0`), at every budget: what refinement buys;
- `rope strategy`: each --rope-strategy, and weight-only SVD (--init svd), closed form at K/V balance 1, at the
  comparison budgets;
- `rank allocation`: the other --rank-allocation, closed form, at the comparison budgets;
- `data-free`: the defaults with calibration sampled from the source, at the first comparison budget;
- `calibration tokens`: closed form at K/V balance 1 with 4k..32k calibration tokens, at the first comparison budget;
- `gqa`: the source with mean-pooled KV heads (`mla-convert gqa`), at every budget it can reach.

--cross-domain replaces those rows with one question: how much of calibration's value is its domain? The defaults at
the comparison budgets, calibrated on --calibration, on --other-text and data-free, each scored on the held-out part
of --eval-data and of --other-text (a 3 x 2 table per budget; JSON to runs/bench_quality_domains.json, no plot).

Prints a markdown table, writes JSON and a PNG of perplexity against KV bytes per token.
"""

import argparse
import copy
import json
import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mla_convert  # noqa: F401
from mla_convert.convert import ConversionOptions, convert
from mla_convert.data import EVALUATION_PART, load_text, tokenize_into_sequences
from mla_convert.evaluate import ReferenceLogProbs, evaluate
from mla_convert.gqa import pool_kv_heads, valid_gqa_head_counts
from mla_convert.plan import SourceShape


DEFAULT_BUDGETS = (0.75, 0.5, 1 / 3, 0.25, 0.17)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="source model folder (e.g. from scripts/fetch_smollm2.py)")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS))
    parser.add_argument("--compare-budgets", type=float, nargs="+", default=[0.25, 0.5],
                        help="budgets at which the other ways of converting are compared with the defaults")
    parser.add_argument("--calibration", default="../shared/data/wikitext2_valid.txt")
    parser.add_argument("--calibration-tokens", type=int, default=32768)
    parser.add_argument("--token-sweep", type=int, nargs="*", default=[4096, 8192, 16384, 32768],
                        help="calibration token counts to compare (closed form, at the first comparison budget)")
    parser.add_argument("--eval-data", default="../shared/data/wikitext2_valid.txt")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="only the defaults at the comparison budgets")
    parser.add_argument("--cross-domain", action="store_true",
                        help="calibrate on --calibration, --other-text and data-free; score on both texts")
    parser.add_argument("--other-text", default="../shared/data/tinyshakespeare.txt",
                        help="the second domain of --cross-domain (first 80%% calibrates, last 20%% is held out)")
    parser.add_argument("--json", default=None, help="default: runs/bench_quality.json (--cross-domain: "
                        "runs/bench_quality_domains.json)")
    parser.add_argument("--plot", default="runs/bench_quality.png")
    args = parser.parse_args()
    if args.json is None:
        args.json = "runs/bench_quality_domains.json" if args.cross_domain else "runs/bench_quality.json"
    return args


@dataclass
class HeldOut:
    """Held-out windows of one text and the source's log-probabilities on them, computed once."""

    name: str
    split: str
    sequences: torch.LongTensor
    reference: ReferenceLogProbs

    @classmethod
    def load(cls, path: str, tokenizer, source, seq_len: int, tokens: int) -> "HeldOut":
        text, split = load_text(path, EVALUATION_PART)
        sequences = tokenize_into_sequences(tokenizer, text, seq_len, tokens)
        return cls(Path(path).stem, split, sequences, ReferenceLogProbs(source, sequences, progress=False))


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tokenizer = AutoTokenizer.from_pretrained(args.source)
        self.source = AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.float32).eval()
        self.shape = SourceShape.from_config(self.source.config)
        self.held_outs = [HeldOut.load(args.eval_data, self.tokenizer, self.source, args.seq_len, args.eval_tokens)]
        if args.cross_domain:
            self.held_outs.append(
                HeldOut.load(args.other_text, self.tokenizer, self.source, args.seq_len, args.eval_tokens)
            )
        # calibration kind -> text (None: data-free, sampled from the source)
        self.calibration_texts = {"text": args.calibration, "other text": args.other_text, "data-free": None}
        self.rows = []

    def options(self, **overrides) -> ConversionOptions:
        values = dict(calibration=self.args.calibration, calibration_tokens=self.args.calibration_tokens,
                      refine_tokens=self.args.calibration_tokens)
        values.update(overrides)
        return ConversionOptions(**values)

    def score(self, model, held_out: HeldOut | None = None) -> dict:
        held_out = held_out or self.held_outs[0]
        results = evaluate(model, held_out.sequences, reference=held_out.reference, progress=False)
        results["ratio"] = results["perplexity"] / results["reference_perplexity"]
        results["held_out"] = held_out.split
        return results

    def convert(self, options: ConversionOptions) -> tuple[torch.nn.Module, dict]:
        """One conversion with `mla-convert convert`'s pipeline, loaded back in float32, and its report."""
        with tempfile.TemporaryDirectory() as folder:
            report = convert(self.args.source, Path(folder) / "mla", options, progress=False)
            model = AutoModelForCausalLM.from_pretrained(Path(folder) / "mla", dtype=torch.float32).eval()
        return model, report

    def mla(self, group: str, budget: float, kind: str = "text", tokens: int | None = None, **overrides) -> None:
        """One conversion; with refinement in its options and in the `default` group, also the same conversion
        without it (the `closed form` row)."""
        tokens = tokens or self.args.calibration_tokens
        options = self.options(kv_budget=budget, calibration=self.calibration_texts[kind], calibration_tokens=tokens,
                               refine_tokens=tokens, **overrides)
        label = ", ".join(f"{key}={value}" for key, value in overrides.items()) or "defaults"

        def extra(report: dict) -> dict:
            stages = report["seconds_per_stage"]
            return {
                "kv_lora_ranks": report["kv_lora_ranks"],
                "qk_rope_head_dim": report["qk_rope_head_dim"],
                "kv_numbers_per_token": report["cache"]["mla_numbers_per_token"],
                "calibration_seconds": round(stages.get("calibration text", 0.0) + stages.get("calibrate", 0.0), 1),
                "build_seconds": report["seconds"],
                "refined_layers_kept": sum(bool(layer.get("refine_kept")) for layer in report["layers"]),
            }

        model, report = self.convert(options)
        if report["refine_steps"] > 0 and group == "default":
            closed, closed_report = self.convert(replace(options, refine_steps=0))
            self.add("closed form", budget, "refine_steps=0", kind, tokens, self.score(closed), extra(closed_report))
        for held_out in self.held_outs if group == "cross-domain" else self.held_outs[:1]:
            self.add(group, budget, label, kind, tokens, self.score(model, held_out), extra(report))

    def gqa(self, num_kv_heads: int) -> None:
        model = pool_kv_heads(copy.deepcopy(self.source), num_kv_heads)
        budget = num_kv_heads / self.shape.num_kv_heads
        numbers = 2 * num_kv_heads * self.shape.head_dim * self.shape.num_layers
        self.add("gqa", budget, f"{num_kv_heads} KV heads, mean-pooled", "none", 0, self.score(model),
                 {"kv_numbers_per_token": numbers, "build_seconds": 0.0, "calibration_seconds": 0.0})

    def add(self, group, budget, label, kind, tokens, results, extra) -> None:
        row = {"group": group, "budget": budget, "method": label, "calibration": kind, "calibration_tokens": tokens,
               **extra, **results}
        row["kv_bytes_per_token_fp32"] = 4 * row["kv_numbers_per_token"]
        self.rows.append(row)
        print(f"{group:18s} {budget:.3f} {label:40s} {kind:9s} {tokens:6d}  ppl {row['perplexity']:8.2f}  "
              f"ratio {row['ratio']:.3f}  KL {row['kl']:.3f}  top-1 {row['top1_agreement']:.3f}  "
              f"{row['build_seconds']:.0f} s", flush=True)


CROSS_DOMAIN_KINDS = ("text", "other text", "data-free")


def write_json(path: str, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def cross_domain(bench: Bench, started: float) -> None:
    args = bench.args
    for budget in args.compare_budgets:
        for kind in CROSS_DOMAIN_KINDS:
            bench.mla("cross-domain", budget, kind=kind)
    names = {"text": bench.held_outs[0].name, "other text": bench.held_outs[1].name, "data-free": "data-free"}
    print("\nperplexity / source perplexity, each held-out text (last 20%) against each calibration (first 80%, "
          f"{args.calibration_tokens // 1024}k tokens); default options, refined\n")
    print("| KV budget | calibrated on | " + " | ".join(f"held-out {h.name}" for h in bench.held_outs)
          + " | geometric mean |")
    print("|---|---|" + "---|" * (len(bench.held_outs) + 1))
    for budget in args.compare_budgets:
        for kind in CROSS_DOMAIN_KINDS:
            rows = [row for row in bench.rows if row["budget"] == budget and row["calibration"] == kind]
            ratios = [row["ratio"] for row in rows]
            mean = math.prod(ratios) ** (1 / len(ratios))
            print(f"| {budget:g} | {names[kind]} | " + " | ".join(f"{r:.3f} (KL {row['kl']:.3f})" for r, row in
                                                            zip(ratios, rows)) + f" | {mean:.3f} |")
    write_json(args.json, {
        "held_out": [h.split for h in bench.held_outs], "seq_len": args.seq_len, "calibration_texts": names,
        "rows": bench.rows,
    })
    print(f"\nbench took {time.perf_counter() - started:.0f} s; wrote {args.json}")


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    bench = Bench(args)
    if args.cross_domain:
        cross_domain(bench, started)
        return
    budgets = args.compare_budgets if args.quick else args.budgets
    for budget in budgets:
        bench.mla("default", budget)
    if not args.quick:
        for count in valid_gqa_head_counts(bench.source.config):
            if count < bench.shape.num_kv_heads:
                bench.gqa(count)
        for budget in args.compare_budgets:
            for strategy in ("rorope", "freqfold", "partial"):
                bench.mla("rope strategy", budget, refine_steps=0, key_scale=1.0, rope_strategy=strategy)
            bench.mla("rope strategy", budget, refine_steps=0, key_scale=1.0, init="svd")
            other = "uniform" if ConversionOptions.rank_allocation == "spectrum" else "spectrum"
            bench.mla("rank allocation", budget, refine_steps=0, rank_allocation=other)
        first = args.compare_budgets[0]
        bench.mla("data-free", first, kind="data-free")
        for tokens in sorted(args.token_sweep):
            bench.mla("calibration tokens", first, tokens=tokens, refine_steps=0, key_scale=1.0)

    held_out = bench.held_outs[0]
    print(f"\nheld-out: {held_out.split}, {held_out.sequences.numel()} tokens in windows of {args.seq_len} "
          f"({bench.rows[0]['tokens']} predicted); source perplexity {bench.rows[0]['reference_perplexity']:.2f}; "
          f"KV bytes per token in float32 (the source: {4 * bench.shape.cache_per_layer * bench.shape.num_layers})\n")
    print("| group | KV budget | method | calibration | KV bytes/token | perplexity | ratio to source | KL | top-1 | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in bench.rows:
        calibration = "none" if row["calibration"] == "none" else f"{row['calibration']}, {row['calibration_tokens'] // 1024}k"
        print(f"| {row['group']} | {row['budget']:.3f} | {row['method']} | {calibration} | {row['kv_bytes_per_token_fp32']:,} | "
              f"{row['perplexity']:.2f} | {row['ratio']:.3f} | {row['kl']:.3f} | {row['top1_agreement']:.3f} | "
              f"{row['build_seconds']:.0f} |")
    print(f"\nbench took {time.perf_counter() - started:.0f} s")
    write_json(args.json, {
        "held_out": held_out.split, "seq_len": args.seq_len,
        "source_kv_bytes_per_token_fp32": 4 * bench.shape.cache_per_layer * bench.shape.num_layers,
        "rows": bench.rows,
    })
    plot(bench, args.plot)
    print(f"wrote {args.json} and {args.plot}")


def plot(bench: Bench, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    source_bytes = 4 * bench.shape.cache_per_layer * bench.shape.num_layers
    reference = bench.rows[0]["reference_perplexity"]
    axis.scatter([source_bytes], [reference], color="black", marker="*", s=120, label="source", zorder=3)
    series = {}
    for row in bench.rows:
        if row["group"] in ("default", "closed form", "gqa", "data-free") or (row["group"] == "rope strategy"):
            method = row["method"].replace("refine_steps=0, key_scale=1.0, ", "")
            name = row["group"] if row["group"] != "rope strategy" else f"closed form at K/V balance 1, {method}"
            series.setdefault(name, []).append((row["kv_bytes_per_token_fp32"], row["perplexity"]))
    for name, points in series.items():
        points.sort()
        style = "o-" if name in ("default", "closed form") else ("s" if name == "gqa" else "x--")
        axis.plot([x for x, _ in points], [y for _, y in points], style, label=name)
    axis.set_xlabel("KV cache bytes per token (float32)")
    axis.set_ylabel("held-out perplexity (log scale)")
    axis.set_yscale("log")
    axis.set_title(f"{Path(bench.args.source).name}: perplexity against KV cache size (no fine-tuning)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
