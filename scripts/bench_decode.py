"""Decode speed and memory: the source model and its MLA conversions, side by side in one run.

    python scripts/bench_decode.py runs/smollm2 --budgets 0.5 0.25 --contexts 512 2048 4096 --batch-sizes 1 8

For every model, context and batch size: prefill one row (timed), repeat its cache across the batch with the
cache's own batch method, then time `--steps` greedy decoding steps (prefill excluded). Reports prefill time,
time per decoding step, tokens/s, peak memory during decoding (RSS on CPU, `max_memory_allocated` on CUDA) and
the bytes the cache holds and has allocated, as ratios against the source; writes JSON and a PNG of tokens/s
against context. Speed does not depend on the weights' values, so conversions here are weight-only (`--init svd`)
unless `--calibration` is given. `--long` adds an 8k context.

`--unfolded-query` adds, for each budget, the same conversion with the folded query off on every layer
(`fold_query=False`), measured beside the folded one: the absorbed path a QK-norm (Qwen3) model decodes with, whose
`q_norm` between `q_proj` and W_uk leaves nothing to fold (docs/qk_norm.md). A layer folds its query only where that
saves multiply-adds (`MLAAttention.fold_query`), so the table says how many layers of each model fold it, and a
conversion with none gets no second row. The two differ by a few percent of a step's work, less than a busy
machine's drift between rows, so the ratio is also measured on one model alternating the two step by step.
"""

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from transformers import AutoModelForCausalLM

import mla_convert  # noqa: F401
from mla_convert.convert import ConversionOptions, convert


class PeakMemory:
    """Peak process memory over a region: CUDA's allocator statistics, or RSS sampled by a thread on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._process = psutil.Process()
        self._stop = threading.Event()
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._process.memory_info().rss)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(cache) -> tuple[int, int]:
    """Bytes the cache holds for its tokens, and bytes it has allocated (growth room included)."""
    used = allocated = 0
    for layer in cache.layers:
        used += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        buffer = getattr(layer, "buffer", None)
        allocated += buffer.numel() * buffer.element_size() if buffer is not None else (
            layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        )
    return used, allocated


@torch.inference_mode()
def measure(model, context: int, batch_size: int, steps: int, device: torch.device, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=generator).to(device)
    synchronize(device)
    started = time.perf_counter()
    outputs = model(prompt, use_cache=True, logits_to_keep=1)
    synchronize(device)
    prefill_seconds = time.perf_counter() - started

    cache = outputs.past_key_values
    cache.batch_repeat_interleave(batch_size)
    next_tokens = outputs.logits[:, -1].argmax(-1, keepdim=True).repeat(batch_size, 1)
    step_seconds = []
    with PeakMemory(device) as memory:
        for step in range(steps + 1):
            synchronize(device)
            started = time.perf_counter()
            outputs = model(next_tokens, past_key_values=cache, use_cache=True)
            synchronize(device)
            if step > 0:  # the first step warms up
                step_seconds.append(time.perf_counter() - started)
            next_tokens = outputs.logits[:, -1].argmax(-1, keepdim=True)
    used, allocated = cache_bytes(cache)
    step = statistics.median(step_seconds)
    return {
        "context": context,
        "batch_size": batch_size,
        "prefill_seconds": prefill_seconds,
        "decode_seconds_per_step": step,
        "tokens_per_second": batch_size / step,
        "peak_memory_bytes": memory.peak,
        "cache_bytes": used,
        "cache_allocated_bytes": allocated,
    }


def mla_attentions(model) -> list:
    return [module for module in model.modules() if hasattr(module, "fold_query")]


def unfold_query(model) -> None:
    """Decode with the absorbed query `W_uk^T q_nope` computed at every step, as through QK-norm; the output stays
    folded where it pays, as it does for a QK-norm model."""
    for attention in mla_attentions(model):
        attention.fold_query = False
        attention._drop_folded()


@torch.inference_mode()
def interleaved_query_folding(model, context: int, batch_size: int, steps: int, device: torch.device) -> dict:
    """Seconds per decoding step of `model` with its query folded and unfolded, alternating step by step on one
    cache (each step decodes the same position again): a load that changes during the run, which moves the rows
    measured one after another, falls on both alike."""
    attentions = [attention for attention in mla_attentions(model) if attention.fold_query]
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    outputs = model(prompt.to(device), use_cache=True, logits_to_keep=1)
    cache = outputs.past_key_values
    cache.batch_repeat_interleave(batch_size)
    next_tokens = outputs.logits[:, -1].argmax(-1, keepdim=True).repeat(batch_size, 1)
    model(next_tokens, past_key_values=cache, use_cache=True)  # folds the weights, outside the timing
    cache.crop(-1)
    folded = [(attention.folded_q_weight, attention.folded_q_bias) for attention in attentions]
    seconds = {"folded": [], "unfolded": []}
    for step in range(steps + 1):
        for mode in seconds:
            # Hiding the folded query weights sends the absorbed form down the unfolded path; the folded output stays,
            # and nothing is refolded (the parameters do not change).
            for attention, (weight, bias) in zip(attentions, folded):
                attention.folded_q_weight, attention.folded_q_bias = (weight, bias) if mode == "folded" else (None, None)
            synchronize(device)
            started = time.perf_counter()
            model(next_tokens, past_key_values=cache, use_cache=True)
            synchronize(device)
            if step > 0:
                seconds[mode].append(time.perf_counter() - started)
            cache.crop(-1)
    for attention, (weight, bias) in zip(attentions, folded):
        attention.folded_q_weight, attention.folded_q_bias = weight, bias
    return {mode: statistics.median(values) for mode, values in seconds.items()}


def folded_query_layers(model) -> tuple[int, int]:
    attentions = mla_attentions(model)
    return sum(bool(attention.fold_query) for attention in attentions), len(attentions)


@torch.inference_mode()
def same_greedy_tokens(model, device: torch.device, length: int = 64, new_tokens: int = 24) -> bool:
    """The fast (absorbed) decode must choose the tokens the reference (expanded) form chooses."""
    prompt = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    outputs = {}
    for path in ("auto", "expanded"):
        model.config.attention_path = path
        outputs[path] = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    model.config.attention_path = "auto"
    return bool(torch.equal(outputs["auto"], outputs["expanded"]))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len({row["batch_size"] for row in rows}), figsize=(11, 4), squeeze=False)
    for axis, batch_size in zip(axes[0], sorted({row["batch_size"] for row in rows})):
        for name in dict.fromkeys(row["model"] for row in rows):
            points = [row for row in rows if row["model"] == name and row["batch_size"] == batch_size]
            axis.plot([p["context"] for p in points], [p["tokens_per_second"] for p in points], marker="o", label=name)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context (tokens)")
        axis.set_ylabel("decode tokens/s")
        axis.set_title(f"batch {batch_size}")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="source model folder (e.g. from scripts/fetch_smollm2.py)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--long", action="store_true", help="also measure an 8k context")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=16, help="timed decoding steps per measurement")
    parser.add_argument("--calibration", help="calibrate conversions on this text (default: weight-only)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--unfolded-query", action="store_true",
                        help="also measure each conversion with the query unfolded on every layer (QK-norm's path)")
    parser.add_argument("--json", default="runs/bench_decode.json")
    parser.add_argument("--plot", default="runs/bench_decode.png")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    contexts = args.contexts + ([8192] if args.long else [])

    with tempfile.TemporaryDirectory() as scratch:
        folders = {"source": args.source}
        for budget in args.budgets:
            folders[f"mla {budget:g}"] = Path(scratch) / f"mla-{budget}"
            # Weight-only and unrefined unless --calibration is given: the same shapes, no calibration to wait for.
            options = ConversionOptions(
                kv_budget=budget,
                init="pca" if args.calibration else "svd",
                refine_steps=None if args.calibration else 0,  # None: the default
                calibration=args.calibration,
            )
            convert(args.source, folders[f"mla {budget:g}"], options)
        models = {
            name: AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, attn_implementation=args.attn_implementation
            ).to(device).eval()
            for name, folder in folders.items()
        }
        if args.unfolded_query:
            for budget in args.budgets:
                if folded_query_layers(models[f"mla {budget:g}"])[0] == 0:
                    continue  # nothing folded (a QK-norm model, or shapes where folding does not pay): the same model
                # A second copy, not a switch on the first: each row keeps its own weights and folded buffers.
                model = AutoModelForCausalLM.from_pretrained(
                    folders[f"mla {budget:g}"], dtype=dtype, attn_implementation=args.attn_implementation
                ).to(device).eval()
                unfold_query(model)
                models[f"mla {budget:g} unfolded q"] = model

    checks = {name: same_greedy_tokens(model, device) for name, model in models.items() if name != "source"}
    folded_layers = {name: folded_query_layers(model) for name, model in models.items() if name != "source"}
    rows = []
    for context in contexts:
        for batch_size in args.batch_sizes:
            for name, model in models.items():
                row = {"model": name, **measure(model, context, batch_size, args.steps, device)}
                rows.append(row)
                print(json.dumps(row), flush=True)

    print(f"\ndevice {device}, {args.dtype}, attention {args.attn_implementation}, {args.steps} decoding steps per cell")
    print("greedy tokens of the fast path equal the expanded path's: " + ", ".join(f"{k}: {v}" for k, v in checks.items()))
    print("layers whose absorbed decode uses the folded query: " + ", ".join(
        f"{k}: {v[0]}/{v[1]}" for k, v in folded_layers.items()))
    print("\n| model | context | batch | prefill s | decode ms/step | tokens/s | vs source | peak memory MB | cache MB (allocated) | cache vs source |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["model"] == "source" and r["context"] == row["context"] and r["batch_size"] == row["batch_size"])
        print(
            f"| {row['model']} | {row['context']} | {row['batch_size']} | {row['prefill_seconds']:.2f} | "
            f"{1000 * row['decode_seconds_per_step']:.1f} | {row['tokens_per_second']:.1f} | "
            f"{row['tokens_per_second'] / base['tokens_per_second']:.2f}x | {row['peak_memory_bytes'] / 2**20:.0f} | "
            f"{row['cache_bytes'] / 2**20:.1f} ({row['cache_allocated_bytes'] / 2**20:.1f}) | "
            f"{row['cache_bytes'] / base['cache_bytes']:.3f} |"
        )
    if args.unfolded_query:
        print("\n| budget | context | batch | tokens/s folded q | unfolded q | unfolded / folded | folded / source | "
              "unfolded / source |")
        print("|---|---|---|---|---|---|---|---|")
        for row in rows:
            if row["model"] not in {f"mla {b:g}" for b in args.budgets}:
                continue
            same_cell = [r for r in rows if (r["context"], r["batch_size"]) == (row["context"], row["batch_size"])]
            base = next(r for r in same_cell if r["model"] == "source")
            unfolded = next((r for r in same_cell if r["model"] == row["model"] + " unfolded q"), None)
            if unfolded is None:
                print(f"| {row['model'][4:]} | {row['context']} | {row['batch_size']} | no layer folds its query | "
                      f"{row['tokens_per_second']:.1f} | 1 | | {row['tokens_per_second'] / base['tokens_per_second']:.2f} |")
                continue
            print(
                f"| {row['model'][4:]} | {row['context']} | {row['batch_size']} | {row['tokens_per_second']:.1f} | "
                f"{unfolded['tokens_per_second']:.1f} | {unfolded['tokens_per_second'] / row['tokens_per_second']:.2f} | "
                f"{row['tokens_per_second'] / base['tokens_per_second']:.2f} | "
                f"{unfolded['tokens_per_second'] / base['tokens_per_second']:.2f} |"
            )
    interleaved = []
    if args.unfolded_query:
        for context in contexts:
            for batch_size in args.batch_sizes:
                for budget in args.budgets:
                    name = f"mla {budget:g}"
                    if folded_query_layers(models[name])[0] == 0:
                        continue
                    step = interleaved_query_folding(models[name], context, batch_size, args.steps, device)
                    interleaved.append({"model": name, "context": context, "batch_size": batch_size,
                                        "folded_seconds_per_step": step["folded"],
                                        "unfolded_seconds_per_step": step["unfolded"]})
                    print(json.dumps(interleaved[-1]), flush=True)
        print("\nunfolded / folded query, alternating step by step on one model and cache: none folds its query" if not
              interleaved else "\nunfolded / folded query, alternating step by step on one model and cache: " + ", ".join(
            f"{r['model']} context {r['context']} batch {r['batch_size']}: "
            f"{r['folded_seconds_per_step'] / r['unfolded_seconds_per_step']:.2f}x tokens/s" for r in interleaved))
    per_token = {}
    for name in models:
        row = next(r for r in rows if r["model"] == name)
        per_token[name] = row["cache_bytes"] / (row["batch_size"] * (row["context"] + args.steps + 1))
    print("\ncache bytes per token: " + ", ".join(f"{k}: {v:.0f}" for k, v in per_token.items()))
    print("largest context in the same memory, vs source: " + ", ".join(
        f"{k}: {per_token['source'] / v:.2f}x" for k, v in per_token.items() if k != "source"))

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "device": str(device), "dtype": args.dtype, "attn_implementation": args.attn_implementation,
        "steps": args.steps, "fast_path_matches_expanded": checks, "folded_query_layers": folded_layers,
        "query_folding_interleaved": interleaved, "cache_bytes_per_token": per_token, "rows": rows,
    }, indent=2) + "\n")
    plot(rows, Path(args.plot))
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
