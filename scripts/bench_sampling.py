"""Data-free calibration text on a real source: seconds and peak memory of sampling it with `generate` (the whole
model in memory, `sampling.sample_from_model`), layer by layer from the model in memory, and layer by layer from its
safetensors shards (`sampling.sample_layer_by_layer`, what `convert` runs with `--streaming off` and `on`); whether
the three give the same rows; and what the same sampling would cost at Llama-3.2-1B and Llama-3.1-8B shapes.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python scripts/bench_sampling.py /tmp/smollm2 --tokens 16384 \
        --json runs/bench_sampling.json                           (SmolLM2-135M: about 10 minutes on one core)

Each sampler runs alone in a child process (one after the other, never side by side), which loads the source, then
samples `--tokens` tokens in rows of 256 (the conversion's sampled rows) in batches of `--batch-size` (the
conversion's 64) with seed 0, as `convert` does without `--calibration`. Per sampler: seconds to load, seconds to
sample, generated tokens per second, and the child's peak resident memory (the kernel's high-water mark, `ru_maxrss`)
and its resident memory before sampling. Memory is RSS: a file-backed page counts where the process maps it.

Estimates for larger sources are extrapolations, not measurements: the time from the FLOPs per generated token (2 x
the weights of the layers and the LM head, plus the attention over the cache, at the mean position) at the FLOP rate
measured here, for the conversion's default 32,768 sampled tokens; the memory of the layer-by-layer sampler from its
parts: one layer in float32 (and in its stored bfloat16), the KV cache `batch x seq_len x layers x kv_heads x head_dim
x 2 (K, V) x 4` bytes, the embedding matrix in bfloat16 and the LM head in float32.
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


SAMPLERS = ("generate", "layer by layer, in memory", "layer by layer, from the shards")
SEQ_LEN = 256  # calibration_text.calibration_sequences: sampled rows are min(calibration_seq_len, 256) tokens
CONVERSION_TOKENS = 32768  # ConversionOptions.calibration_tokens

# name -> the shape that sets the cost (as published; bf16 on disk)
SHAPES = {
    "Llama-3.2-1B": dict(layers=16, hidden=2048, heads=32, kv_heads=8, head_dim=64, intermediate=8192, vocab=128256,
                         tied=True),  # fmt: skip
    "Llama-3.1-8B": dict(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256,
                         tied=False),  # fmt: skip
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a model folder with safetensors weights (e.g. /tmp/smollm2)")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens to sample (rows of 256)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per batch (the conversion's 64)")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument("--json", default="runs/bench_sampling.json")
    parser.add_argument("--child", default=None, choices=SAMPLERS, help=argparse.SUPPRESS)
    parser.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args) -> dict:
    """One sampler in this process: load, sample, save the rows; what it measured."""
    import torch

    from mla_convert.convert import ConversionOptions, source_stream
    from mla_convert.sampling import sample_from_model, sample_layer_by_layer
    from mla_convert.sources import load_source

    started = time.perf_counter()
    if args.child == "generate":
        model, tokenizer = load_source(args.source)
    else:
        streaming = "on" if args.child.endswith("shards") else "off"
        stream, tokenizer = source_stream(args.source, ConversionOptions(kv_budget=0.5, streaming=streaming))
    loaded = time.perf_counter()
    rss_before = psutil.Process().memory_info().rss
    if args.child == "generate":
        rows = sample_from_model(model, tokenizer, args.tokens, SEQ_LEN, seed=0, batch_size=args.batch_size)
    else:
        rows = sample_layer_by_layer(stream, tokenizer, args.tokens, SEQ_LEN, seed=0, batch_size=args.batch_size)
    sampled = time.perf_counter()
    torch.save(rows, args.rows)
    generated = rows.shape[0] * (rows.shape[1] - 1)
    return {
        "sampler": args.child,
        "rows": list(rows.shape),
        "generated_tokens": generated,
        "load_seconds": round(loaded - started, 2),
        "sampling_seconds": round(sampled - loaded, 2),
        "tokens_per_second": round(generated / (sampled - loaded), 2),
        "rss_before_sampling_bytes": rss_before,
        "peak_rss_bytes": peak_rss(),
        "threads": torch.get_num_threads(),
    }


def run_child(args, sampler: str, rows: Path) -> dict:
    command = [sys.executable, __file__, args.source, "--child", sampler, "--rows", str(rows), "--tokens",
               str(args.tokens), "--batch-size", str(args.batch_size)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{sampler} failed:\n{result.stderr[-4000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row["load_average"] = round(os.getloadavg()[0], 2)
    return row


def shape_of(config: dict) -> dict:
    return dict(
        layers=config["num_hidden_layers"], hidden=config["hidden_size"], heads=config["num_attention_heads"],
        kv_heads=config["num_key_value_heads"],
        head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        intermediate=config["intermediate_size"], vocab=config["vocab_size"], tied=config["tie_word_embeddings"],
    )  # fmt: skip


def layer_parameters(shape: dict) -> int:
    attention = shape["hidden"] * shape["head_dim"] * (2 * shape["heads"] + 2 * shape["kv_heads"])
    return attention + 3 * shape["hidden"] * shape["intermediate"] + 2 * shape["hidden"]


def flops_per_token(shape: dict, seq_len: int = SEQ_LEN) -> float:
    """Multiply-adds x 2 of one generated token: the layers' and the LM head's weights, and attention (scores and
    values) over the cache at the mean position."""
    weights = shape["layers"] * layer_parameters(shape) + shape["vocab"] * shape["hidden"]
    attention = 4 * shape["layers"] * shape["heads"] * shape["head_dim"] * seq_len / 2
    return 2 * weights + attention


def cache_bytes(shape: dict, batch: int, seq_len: int = SEQ_LEN) -> int:
    """The layer-by-layer sampler's KV cache of one batch, float32."""
    return batch * seq_len * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * 2 * 4


def layer_by_layer_bytes(shape: dict, batch: int, stored_bytes: int = 2) -> int:
    """What the layer-by-layer sampler holds from a source stored in `stored_bytes` per weight: one layer in float32
    (and in its stored dtype), the cache, the embeddings as stored and the LM head in float32."""
    layer = layer_parameters(shape) * (4 + (stored_bytes if stored_bytes != 4 else 0))
    embeddings = shape["vocab"] * shape["hidden"]
    return layer + cache_bytes(shape, batch) + embeddings * stored_bytes + embeddings * 4


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    import torch

    config = json.loads((Path(args.source) / "config.json").read_text())
    shape = shape_of(config)
    rows, results = {}, []
    with tempfile.TemporaryDirectory() as scratch:
        for number, sampler in enumerate(args.samplers):
            path = Path(scratch) / f"rows-{number}.pt"
            print(f"{sampler} ...", flush=True)
            results.append(run_child(args, sampler, path))
            rows[sampler] = torch.load(path)
    first = next(iter(rows.values()))
    same = {sampler: bool(torch.equal(first, value)) for sampler, value in rows.items()}
    batch = min(args.batch_size, math.ceil(args.tokens / SEQ_LEN))
    flops = flops_per_token(shape)
    for row in results:
        row["same_rows_as_first"] = same[row["sampler"]]
        row["gflop_per_second"] = round(row["tokens_per_second"] * flops / 1e9, 2)

    print(f"\n{args.source}: {args.tokens} tokens, rows of {SEQ_LEN}, batches of {batch}, "
          f"{results[0]['threads']} thread(s); GB = 10^9 bytes")  # fmt: skip
    print("| sampler | load (s) | sampling (s) | tokens/s | GFLOP/s | RSS before sampling (GB) | peak RSS (GB) | same rows |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['sampler']} | {row['load_seconds']} | {row['sampling_seconds']} | {row['tokens_per_second']} | "
              f"{row['gflop_per_second']} | {row['rss_before_sampling_bytes'] / 1e9:.2f} | "
              f"{row['peak_rss_bytes'] / 1e9:.2f} | {row['same_rows_as_first']} |")  # fmt: skip

    # extrapolations: the conversion's default sampling (32,768 tokens in batches of 64) at the measured FLOP rates
    estimates = []
    print(f"\nEstimated for {CONVERSION_TOKENS} sampled tokens in batches of 64 (extrapolated by FLOPs per token from "
          "the rates above; memory from the parts, bf16 on disk for the Llama shapes):")  # fmt: skip
    print("| shape | GFLOP/token | cache (GB) | layer-by-layer memory (GB) | " +
          " | ".join(f"{row['sampler']} (h)" for row in results) + " |")  # fmt: skip
    print("|---|---|---|---|" + "---|" * len(results))
    measured = {f"{Path(args.source).name} (measured)": shape, **SHAPES}
    stored = {name: 2 for name in measured}
    stored[next(iter(measured))] = 4 if config.get("dtype", config.get("torch_dtype")) == "float32" else 2
    for name, target in measured.items():
        per_token = flops_per_token(target)
        hours = {row["sampler"]: CONVERSION_TOKENS * per_token / (row["gflop_per_second"] * 1e9) / 3600 for row in results}
        estimate = {
            "shape": name, "gflop_per_token": round(per_token / 1e9, 3),
            "cache_bytes": cache_bytes(target, 64), "layer_by_layer_bytes": layer_by_layer_bytes(target, 64, stored[name]),
            "hours": {key: round(value, 2) for key, value in hours.items()},
        }  # fmt: skip
        estimates.append(estimate)
        print(f"| {name} | {estimate['gflop_per_token']} | {estimate['cache_bytes'] / 1e9:.2f} | "
              f"{estimate['layer_by_layer_bytes'] / 1e9:.2f} | " +
              " | ".join(f"{value:.2f}" for value in hours.values()) + " |")  # fmt: skip
    print("cache = batch x seq_len x layers x kv_heads x head_dim x 2 (K, V) x 4 bytes")
    output = {
        "source": args.source, "tokens": args.tokens, "seq_len": SEQ_LEN, "batch_size": args.batch_size,
        "rows": results, "estimates": estimates,
        "estimate_method": "time: FLOPs per generated token (2 x layer and LM-head weights + attention at the mean "
                           "position) at the measured FLOP rate; memory: one float32 (+ bf16) layer, the float32 "
                           "cache, bf16 embeddings and a float32 LM head",
    }  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(output, indent=2) + "\n")
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
