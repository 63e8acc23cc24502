"""Conversion at the sizes people serve: synthetic Llama-3.2-1B- and Llama-3.1-8B-shaped sources (real shapes, random
bf16 weights) converted layer by layer (`--streaming on`), one subprocess per conversion, with its peak memory and
time; and SmolLM2's streamed conversion against the whole-model one.

    python scripts/bench_scale.py --shapes tiny --layers full 1 --calibration-tokens 1024 --work runs/bench_scale_tiny \
        --json runs/bench_scale_tiny.json                                    (end-to-end check, about a minute)
    python scripts/bench_scale.py --shapes 1b --keep                          (about 10-20 minutes on 2 busy cores)
    python scripts/bench_scale.py --shapes 8b --layers full 16 --keep         (about 1.5-3 hours; 16 GB of source)
    python scripts/bench_scale.py --smollm2 runs/smollm2 --shapes             (about 10 minutes: two conversions, two
                                                                               held-out evaluations)
    python scripts/bench_scale.py --shapes 1b --target deepseek --kv-lora-rank 512 --qk-rope-head-dim 64
                                                                              (the serving engines' DeepSeek shape)
    python scripts/bench_scale.py --shapes 8b --layers 4 2 --target deepseek --kv-lora-rank 512 --qk-rope-head-dim 64 \
        --export                                                              (and each DeepSeek-V3 export's memory)

Sources are built by the script under --work (default runs/bench_scale, which git ignores), shard by shard: one
safetensors file per decoder layer, one for the embeddings, one for the final norm (and the LM head when it is not
tied), written with `save_file` and listed in `model.safetensors.index.json`, so building never holds more than one
layer. Weights are N(0, 0.02) (norms 1), fixed by seed per tensor, so a source with fewer layers (`--layers 16`) is
the first layers of the full one: its shards are hard links to those of a source of that shape with more layers when
one exists (no extra disk).
The tokenizer is byte-level (256 bytes, <s>, </s>), its vocabulary padded with unused tokens to the model's size, so
calibration text tokenizes offline. `--keep` keeps the sources for the next run (rebuilt only when missing);
without it they are deleted at the end. Outputs are deleted after their size is measured unless `--keep-outputs`.

Each conversion: `python -m mla_convert convert SRC OUT --streaming on --kv-budget 0.25 --calibration DATA
--calibration-tokens 2048 --refine-tokens 2048 --refine-steps 10 --dtype bfloat16` (the defaults otherwise:
key-scale search, spectrum rank allocation, so a spectrum pass first) in a child process. Seconds per layer are the
conversion's own (from its report) less calibration text and embeddings, divided by the layers; the load average
at the end of each conversion is recorded beside it. When other work shares the cores, `--threads 1` (the
children's OMP threads) is much faster: multi-threaded LAPACK slows down many times under contention. Its resident memory,
children included, is sampled every 0.2 s (psutil); beside it the conversion report's `process_peak_rss_bytes` (the
kernel's high-water mark of the child) and `peak_rss_bytes` (sampled by the conversion at every stage). GB here is
10^9 bytes.

`--streaming off|auto` converts the synthetic sources with that option instead (off holds the source in float32:
twice its bf16 size). `--export` (with `--target deepseek`) also runs `mla-convert export OUT EXP --format
deepseek-v3 --transformers-only` on each conversion in a child process and reports its peak RSS (sampled) and
seconds. Every row has the peak that `mla_convert.memory.estimate_peak` gives for it (for the layer source the
conversion used) and its error against the measured peak, recomputed from the row's sizes whenever the table is
printed; the targets say whether every row is within 15%.

`--smollm2 FOLDER` (a float source folder, e.g. from scripts/fetch_smollm2.py) converts it with `--streaming on`
and `--streaming off` at the same options (saved in float32) and reports the held-out perplexity of both on the
last 20% of the calibration text (windows of 512, --eval-tokens), the largest weight difference between the two
outputs, and their peak memory and time.

Rows are merged into --json (default runs/bench_scale.json) across runs (`--fresh` starts over), so the 1B, 8B and
8B-half rows may come from separate runs; the table and the scale targets are printed over all of them:
8B-shaped peak RSS at most 6 GB, peak RSS not growing with the number of layers (rows of one shape, different
--layers), SmolLM2 streamed = whole-model perplexity to 3 decimals. Figures are never invented: a target without its
rows is reported as not measured.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil


# name -> the source's config (Llama-3.2-1B and Llama-3.1-8B as published; tiny: for checking the script)
SHAPES = {
    "1b": dict(
        num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    "8b": dict(
        num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    "tiny": dict(
        num_hidden_layers=3, hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
        intermediate_size=512, vocab_size=1024, tie_word_embeddings=True, max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=1024),
    ),
}
INIT_STD = 0.02
GB = 10**9
RSS_TARGET_GB = 6.0  # the scale target: the 8B-shaped source converts with peak RSS at most 6 GB
# peak RSS of rows of one shape with different layer counts: "not growing with layers" when within this share
FLAT_TOLERANCE = 0.10
SAMPLE_SECONDS = 0.2
# mla_convert.memory's estimate of a row's peak RSS: within this share of the measured peak
ESTIMATE_TOLERANCE = 0.15


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=["1b", "8b"], choices=sorted(SHAPES),
                        help="synthetic sources to convert (none: only --smollm2)")
    parser.add_argument("--layers", nargs="+", default=["full"],
                        help="decoder layers of each shape: 'full' (the shape's own) and/or numbers, e.g. full 16")
    parser.add_argument("--smollm2", default=None, metavar="FOLDER",
                        help="also convert this float source folder streamed and whole-model and compare them")
    parser.add_argument("--work", default="runs/bench_scale", help="folder for the sources and outputs")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic sources (rebuilt only when missing)")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the converted folders")
    parser.add_argument("--calibration", default="../shared/data/wikitext2_valid.txt")
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--refine-steps", type=int, default=10)
    parser.add_argument("--kv-budget", type=float, default=0.25)
    parser.add_argument("--target", default="mla", choices=("mla", "deepseek"),
                        help="convert's --target (deepseek: the serving engines' shape with --kv-lora-rank 512 "
                        "--qk-rope-head-dim 64)")
    parser.add_argument("--kv-lora-rank", type=int, default=None, help="convert's --kv-lora-rank (replaces --kv-budget)")
    parser.add_argument("--qk-rope-head-dim", type=int, default=None, help="convert's --qk-rope-head-dim")
    parser.add_argument("--streaming", default="on", choices=("on", "off", "auto"),
                        help="convert's --streaming for the synthetic sources (SmolLM2 runs on and off)")
    parser.add_argument("--export", action="store_true",
                        help="also export each conversion with `mla-convert export --format deepseek-v3` (--target "
                        "deepseek; --transformers-only: the synthetic sources' Llama-3 RoPE scaling is one the "
                        "engines cannot read) and report its peak RSS and seconds")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                        help="saved dtype of the synthetic conversions (SmolLM2's are saved in float32)")
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of the conversion processes")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="SmolLM2: held-out tokens")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights")
    parser.add_argument("--json", default="runs/bench_scale.json")
    parser.add_argument("--fresh", action="store_true", help="drop the rows of earlier runs from --json")
    args = parser.parse_args(argv)
    for value in args.layers:
        if value != "full" and not (value.isdigit() and int(value) > 0):
            parser.error(f"--layers takes 'full' or positive numbers, got {value!r}")
    if not args.shapes and args.smollm2 is None:
        parser.error("nothing to do: give --shapes and/or --smollm2")
    if args.export and args.target != "deepseek":
        parser.error("--export writes a DeepSeek-V3 checkpoint: it needs --target deepseek")
    return args


# ------------------------------------------------------------------------------------------- synthetic sources


def layer_count(shape: str, value: str) -> int:
    return SHAPES[shape]["num_hidden_layers"] if value == "full" else int(value)


def layer_tensors(config: dict, layer_idx: int, seed: int):
    """The decoder layer's tensors, bf16, N(0, INIT_STD) for the projections and ones for the norms (name, shape)."""
    hidden, heads, kv_heads, head_dim = (config[k] for k in ("hidden_size", "num_attention_heads",
                                                             "num_key_value_heads", "head_dim"))
    inter = config["intermediate_size"]
    prefix = f"model.layers.{layer_idx}."
    return {
        prefix + "self_attn.q_proj.weight": (heads * head_dim, hidden),
        prefix + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        prefix + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        prefix + "self_attn.o_proj.weight": (hidden, heads * head_dim),
        prefix + "mlp.gate_proj.weight": (inter, hidden),
        prefix + "mlp.up_proj.weight": (inter, hidden),
        prefix + "mlp.down_proj.weight": (hidden, inter),
        prefix + "input_layernorm.weight": (hidden,),
        prefix + "post_attention_layernorm.weight": (hidden,),
    }


def make_tensors(shapes: dict, seed: int) -> dict:
    """Deterministic per tensor: the same name and seed give the same values in every source."""
    import zlib

    import torch

    tensors = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            continue
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        tensor = torch.empty(shape, dtype=torch.bfloat16)
        for rows in tensor.split(1024):  # float32 one slab at a time: building holds little beyond the shard
            rows.copy_(torch.randn(rows.shape, generator=generator).mul_(INIT_STD))
        tensors[name] = tensor
    return tensors


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """Byte-level BPE without merges (as tests/conftest.py's byte_tokenizer), padded to `vocab_size` entries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257})
    vocab.update({f"<unused_{i}>": i for i in range(258, vocab_size)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def source_folder(work: Path, shape: str, layers: int) -> Path:
    return work / f"source-{shape}-L{layers}"


def build_source(work: Path, shape: str, layers: int, seed: int) -> tuple[Path, float]:
    """The synthetic source (built shard by shard unless it is complete already); returns it and seconds taken."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder = source_folder(work, shape, layers)
    if (folder / "model.safetensors.index.json").is_file():
        return folder, 0.0
    started = time.perf_counter()
    config = {**SHAPES[shape], "num_hidden_layers": layers}
    # a complete source of this shape with more layers holds the same shards (same names and seed): link them
    donors = sorted((p for p in work.glob(f"source-{shape}-L*") if (p / "model.safetensors.index.json").is_file()
                     and p.name.removeprefix(f"source-{shape}-L").isdigit()
                     and int(p.name.removeprefix(f"source-{shape}-L")) > layers),
                    key=lambda p: int(p.name.removeprefix(f"source-{shape}-L")))
    donor = donors[-1] if donors else None
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    shards = {"embed.safetensors": {"model.embed_tokens.weight": (vocab, hidden)}}
    for layer_idx in range(layers):
        shards[f"layer-{layer_idx:05d}.safetensors"] = layer_tensors(config, layer_idx, seed)
    head = {"model.norm.weight": (hidden,)}
    if not config["tie_word_embeddings"]:
        head["lm_head.weight"] = (vocab, hidden)
    shards["head.safetensors"] = head
    weight_map, total = {}, 0
    for file, shapes in shards.items():
        if donor is not None and (donor / file).is_file():
            os.link(donor / file, staging / file)  # the same tensors (same names and seed): no new bytes
        else:
            save_file(make_tensors(shapes, seed), staging / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shapes})
        total += sum(2 * math.prod(s) for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    LlamaConfig(**config, bos_token_id=256, eos_token_id=257, dtype="bfloat16",
                architectures=["LlamaForCausalLM"]).save_pretrained(staging)
    write_tokenizer(staging, vocab)
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    seconds = time.perf_counter() - started
    print(f"  built {folder} ({folder_bytes(folder) / GB:.2f} GB) in {seconds:.0f} s", flush=True)
    return folder, seconds


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------- conversions


def sample_peak(process: subprocess.Popen) -> tuple[threading.Event, dict]:
    """Samples the child's RSS (its own children included) every SAMPLE_SECONDS until the event is set."""
    stop, result = threading.Event(), {"peak": 0, "samples": 0}

    def sample():
        try:
            parent = psutil.Process(process.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.is_set():
            try:
                total = parent.memory_info().rss
                for child in parent.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                return
            result["peak"] = max(result["peak"], total)
            result["samples"] += 1
            stop.wait(SAMPLE_SECONDS)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    result["thread"] = thread
    return stop, result


def cache_arguments(args) -> list[str]:
    """The cache size flags of the conversions: --kv-lora-rank (with --qk-rope-head-dim) or --kv-budget."""
    if args.kv_lora_rank is not None:
        sizes = ["--kv-lora-rank", str(args.kv_lora_rank)]
    else:
        sizes = ["--kv-budget", str(args.kv_budget)]
    if args.qk_rope_head_dim is not None:
        sizes += ["--qk-rope-head-dim", str(args.qk_rope_head_dim)]
    return sizes


def cache_label(args) -> str:
    """What a row's cache size is called: `512+64` for explicit ranks, else the budget."""
    if args.kv_lora_rank is not None:
        return f"{args.kv_lora_rank}+{args.qk_rope_head_dim or 'head_dim'}"
    return f"{args.kv_budget:g}"


def run_child(command: list[str], args, log: Path) -> dict:
    """One command in a child process, its RSS sampled (children included); the peak, samples and wall time."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_MININTERVAL="5")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    print(f"  $ {' '.join(command[1:])}  (log: {log})", flush=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        stop, sampled = sample_peak(process)
        code = process.wait()
        stop.set()
        sampled["thread"].join()
    seconds = time.perf_counter() - started
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{command[3]} failed (exit {code}); the end of {log}:\n{tail}")
    return {"wall_seconds": round(seconds, 1), "sampled_peak_rss_bytes": sampled["peak"], "rss_samples": sampled["samples"]}


def run_export(args, converted: Path, output: Path, log: Path) -> dict:
    """`mla-convert export --format deepseek-v3` of a conversion in a child process: its peak RSS and seconds."""
    command = [sys.executable, "-m", "mla_convert", "export", str(converted), str(output), "--format", "deepseek-v3",
               "--transformers-only", "--overwrite"]
    run = run_child(command, args, log)
    return {
        "export_peak_rss_gb": round(run["sampled_peak_rss_bytes"] / GB, 3),
        "export_seconds": run["wall_seconds"],
        "export_gb": round(folder_bytes(output) / GB, 3),
    }


def run_conversion(args, source: Path, output: Path, streaming: str, dtype: str, log: Path) -> dict:
    """One `mla-convert convert` in a child process; its report plus the sampled peak RSS and wall time."""
    command = [
        sys.executable, "-m", "mla_convert", "convert", str(source), str(output),
        "--streaming", streaming, "--target", args.target, *cache_arguments(args),
        "--calibration", args.calibration, "--calibration-tokens", str(args.calibration_tokens),
        "--refine-tokens", str(args.calibration_tokens), "--refine-steps", str(args.refine_steps),
        "--dtype", dtype, "--max-shard-size", args.max_shard_size, "--overwrite",
    ]
    run = run_child(command, args, log)
    return {
        "report": json.loads((output / "conversion.json").read_text()),
        # the machine's load when the conversion ended (1, 5, 15 minutes): times on a busy machine say little
        "load_average": [round(value, 2) for value in os.getloadavg()],
        **run,
    }


def synthetic_sizes(shape: str, layers: int) -> dict:
    """What `mla_convert.memory.SourceSizes` reads from a synthetic source's headers, from its shape (bf16)."""
    config = SHAPES[shape]
    layer = sum(math.prod(size) for size in layer_tensors(config, 0, 0).values())
    embed = config["vocab_size"] * config["hidden_size"]
    params = embed * (1 if config["tie_word_embeddings"] else 2) + layers * layer + config["hidden_size"]
    return {"stored_bytes": 2 * params, "parameters": params, "largest_layer_params": layer,
            "largest_embedding_bytes": 2 * embed}


def estimate_fields(args, source: Path, report: dict) -> dict:
    """What the peak memory estimate of a row is computed from (`row_estimate`), and what the conversion estimated."""
    from mla_convert.memory import SourceSizes

    return {
        "sizes": vars(SourceSizes.of(source)),
        "requested_calibration_tokens": args.calibration_tokens,
        "kept_tokens": report["settings"]["kept_tokens"],
        "estimated_peak_bytes": report.get("estimated_peak_bytes"),
    }


def row_estimate(row: dict) -> float | None:
    """The peak RSS (GB) `mla_convert.memory.estimate_peak` gives now for the row's conversion, for the layer source
    it used (synthetic sources: sizes from the shape, which rows of earlier runs lack; None when unknown)."""
    from mla_convert.memory import SourceSizes, estimate_peak

    sizes = row.get("sizes")
    if row["kind"] == "synthetic" and row["shape"] in SHAPES:
        sizes = synthetic_sizes(row["shape"], row["layers"])
    if sizes is None:
        return None
    tokens = row.get("requested_calibration_tokens", row["calibration_tokens"])
    estimate = estimate_peak(SourceSizes(**sizes), row["hidden"], tokens, row.get("kept_tokens", tokens),
                             row.get("target", "mla"))
    return (estimate.streamed if row.get("streaming", True) else estimate.in_memory) / GB


def memory_fields(run: dict) -> dict:
    report = run["report"]
    peak = max(run["sampled_peak_rss_bytes"], report.get("process_peak_rss_bytes", 0))
    return {
        "peak_rss_gb": round(peak / GB, 3),
        "sampled_peak_rss_gb": round(run["sampled_peak_rss_bytes"] / GB, 3),
        "process_peak_rss_gb": round(report.get("process_peak_rss_bytes", 0) / GB, 3),
        "report_peak_rss_gb": round(report.get("peak_rss_bytes", 0) / GB, 3),
        "seconds": run["wall_seconds"],
        "conversion_seconds": report.get("seconds"),
        "seconds_per_stage": report.get("seconds_per_stage"),
        "streaming": report.get("streaming"),
        "verification": report.get("verification"),
        "load_average": run["load_average"],
    }


# stages of a streamed conversion that are not per layer (the final check and the writing of the files are counted
# with the layers: they are small beside them)
FIXED_STAGES = ("calibration text", "embeddings")


def seconds_per_layer(report: dict, layers: int) -> float:
    """The conversion's own seconds (no process start, no imports) less its fixed stages, per layer; the spectrum
    pass counts (it is per layer too). The whole-model path has no per-layer stages: its total per layer."""
    stages = report.get("seconds_per_stage") or {}
    total = report.get("seconds") or sum(stages.values())
    if report.get("streaming"):
        total -= sum(stages.get(name, 0.0) for name in FIXED_STAGES)
    return round(total / layers, 2)


def synthetic_row(args, work: Path, shape: str, layers: int) -> dict:
    print(f"{shape}-shaped source, {layers} layers", flush=True)
    source, build_seconds = build_source(work, shape, layers, args.seed)
    name = f"{shape}-L{layers}-{args.target}-{args.streaming}"
    output = work / f"mla-{name}"
    run = run_conversion(args, source, output, args.streaming, args.dtype, work / f"convert-{name}.log")
    config = SHAPES[shape]
    row = {
        "kind": "synthetic",
        "shape": shape,
        "layers": layers,
        "streaming_option": args.streaming,
        "hidden": config["hidden_size"],
        "intermediate": config["intermediate_size"],
        "vocab": config["vocab_size"],
        "calibration_tokens": run["report"]["calibration"]["tokens"],
        "refine_steps": args.refine_steps,
        "kv_budget": args.kv_budget,
        "target": args.target,
        "cache": cache_label(args),
        "dtype": args.dtype,
        "threads": args.threads,
        **memory_fields(run),
        **estimate_fields(args, source, run["report"]),
        "source_gb": round(folder_bytes(source) / GB, 3),
        "output_gb": round(folder_bytes(output) / GB, 3),
        "build_seconds": round(build_seconds, 1),
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    row["seconds_per_layer"] = seconds_per_layer(run["report"], layers)
    if args.export:
        exported = work / f"deepseek-v3-{name}"
        row.update(run_export(args, output, exported, work / f"export-{name}.log"))
        print(f"  export: peak RSS {row['export_peak_rss_gb']:.2f} GB, {row['export_seconds']:.0f} s", flush=True)
        if not args.keep_outputs:
            shutil.rmtree(exported)
    if not args.keep_outputs:
        shutil.rmtree(output)
    print(f"  peak RSS {row['peak_rss_gb']:.2f} GB (estimated {row_estimate(row):.2f} GB), {row['seconds']:.0f} s in "
          f"all, {row['seconds_per_layer']:.1f} s per layer", flush=True)
    return row


def weight_difference(first: Path, second: Path) -> float:
    """The largest absolute difference between two folders' weights (tensor by tensor, any sharding)."""
    import torch
    from safetensors import safe_open

    def files(folder):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        out = {}
        for path in folder.glob("*.safetensors"):
            with safe_open(path, framework="pt") as f:
                out.update({name: path for name in f.keys()})
        return out

    a, b = files(first), files(second)
    if set(a) != set(b):
        return float("inf")
    worst = 0.0
    for name in sorted(a):
        with safe_open(a[name], framework="pt") as f, safe_open(b[name], framework="pt") as g:
            x, y = f.get_tensor(name).float(), g.get_tensor(name).float()
        if x.shape != y.shape:
            return float("inf")
        worst = max(worst, float((x - y).abs().max()) if x.numel() else 0.0)
    return worst


def smollm2_rows(args, work: Path) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    import mla_convert  # noqa: F401
    import mla_modeling  # noqa: F401  (registers the MLA model with the Auto classes)
    from mla_convert.data import EVALUATION_PART, load_text, tokenize_into_sequences
    from mla_convert.evaluate import evaluate

    transformers_logging.disable_progress_bar()
    source = Path(args.smollm2)
    tokenizer = AutoTokenizer.from_pretrained(source)
    text, split = load_text(args.calibration, EVALUATION_PART)
    sequences = tokenize_into_sequences(tokenizer, text, args.eval_seq_len, args.eval_tokens)
    rows, outputs = [], {}
    for streaming in ("on", "off"):
        print(f"{source.name}: --streaming {streaming}", flush=True)
        output = work / f"mla-{source.name}-streaming-{streaming}"
        run = run_conversion(args, source, output, streaming, "float32", work / f"convert-{source.name}-{streaming}.log")
        model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
        results = evaluate(model, sequences, progress=False)
        del model
        outputs[streaming] = output
        config = json.loads((source / "config.json").read_text())
        rows.append({
            "kind": "smollm2",
            "shape": source.name,
            "streaming_option": streaming,
            "layers": config["num_hidden_layers"],
            "hidden": config["hidden_size"],
            "calibration_tokens": run["report"]["calibration"]["tokens"],
            "refine_steps": args.refine_steps,
            "kv_budget": args.kv_budget,
            "dtype": "float32",
            "threads": args.threads,
            "target": args.target,
            "cache": cache_label(args),
            **memory_fields(run),
            **estimate_fields(args, source, run["report"]),
            "source_gb": round(folder_bytes(source) / GB, 3),
            "output_gb": round(folder_bytes(output) / GB, 3),
            "perplexity": results["perplexity"],
            "held_out": split,
            "held_out_tokens": results["tokens"],
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        })
        rows[-1]["seconds_per_layer"] = seconds_per_layer(run["report"], rows[-1]["layers"])
        print(f"  perplexity {results['perplexity']:.3f}, peak RSS {rows[-1]['peak_rss_gb']:.2f} GB, "
              f"{rows[-1]['seconds']:.0f} s", flush=True)
    difference = weight_difference(outputs["on"], outputs["off"])
    for row in rows:
        row["max_weight_difference"] = difference
    if not args.keep_outputs:
        for output in outputs.values():
            shutil.rmtree(output)
    return rows


# -------------------------------------------------------------------------------------------------- reporting


def row_key(row: dict) -> tuple:
    return (row["kind"], row["shape"], row["layers"], row.get("streaming_option", "on"), row["calibration_tokens"],
            row["refine_steps"], row["kv_budget"], row["dtype"], row.get("target", "mla"), row.get("cache"))


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    rows = {row_key(row): row for row in old}
    rows.update({row_key(row): row for row in new})
    order = {"1b": 1, "8b": 2, "tiny": 0}
    return sorted(rows.values(), key=lambda r: (r["kind"] != "synthetic", order.get(r["shape"], 9), r["shape"],
                                                -r["layers"], r.get("streaming_option", "on")))


def table(rows: list[dict]) -> str:
    lines = [
        "| shape | target | cache | streaming | layers | hidden | calibration tokens | peak RSS (GB) | estimate (GB) "
        "| error | seconds | s/layer | source (GB) | output (GB) | export peak RSS (GB) | held-out ppl |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ppl = f"{row['perplexity']:.3f}" if "perplexity" in row else ""
        estimate = row_estimate(row)
        estimated = "" if estimate is None else f"{estimate:.2f} | {estimate / row['peak_rss_gb'] - 1:+.0%}"
        estimated = estimated or " | "
        export = f"{row['export_peak_rss_gb']:.2f}" if "export_peak_rss_gb" in row else ""
        lines.append(
            f"| {row['shape']} | {row.get('target', 'mla')} | {row.get('cache', row['kv_budget'])} | "
            f"{row.get('streaming_option', 'on')} | {row['layers']} | {row['hidden']} | "
            f"{row['calibration_tokens']:,} | {row['peak_rss_gb']:.2f} | {estimated} | {row['seconds']:.0f} | "
            f"{row['seconds_per_layer']:.1f} | {row['source_gb']:.2f} | {row['output_gb']:.2f} | {export} | {ppl} |"
        )
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    """The scale targets, as far as these rows show them."""
    lines = []
    synthetic = [r for r in rows if r["kind"] == "synthetic"]
    # the scale targets are the streamed conversion's (rows with --streaming on, or auto that chose it)
    streamed = [r for r in synthetic if r.get("streaming", True)]
    eight = [r for r in streamed if r["shape"] == "8b"]
    if not eight:
        lines.append(f"- 8B-shaped source, peak RSS <= {RSS_TARGET_GB:g} GB: not measured (no 8B row)")
    for target in sorted({r.get("target", "mla") for r in eight}):
        mine = [r for r in eight if r.get("target", "mla") == target]
        worst = max(mine, key=lambda r: r["peak_rss_gb"])
        verdict = "met" if worst["peak_rss_gb"] <= RSS_TARGET_GB else "NOT met"
        depths = ", ".join(str(n) for n in sorted({r["layers"] for r in mine}))
        lines.append(f"- 8B-shaped source (--target {target}), peak RSS <= {RSS_TARGET_GB:g} GB: {verdict} "
                     f"({worst['peak_rss_gb']:.2f} GB at most, rows of {depths} layers)")
    shown = False
    groups = sorted({(r["shape"], r.get("target", "mla"), r["calibration_tokens"]) for r in streamed})
    for shape, target, tokens in groups:
        mine = sorted((r for r in streamed if (r["shape"], r.get("target", "mla"), r["calibration_tokens"])
                       == (shape, target, tokens)), key=lambda r: r["layers"])
        if len({r["layers"] for r in mine}) < 2:
            continue
        shown = True
        low, high = mine[0], mine[-1]
        growth = high["peak_rss_gb"] / low["peak_rss_gb"] - 1
        verdict = "flat" if growth <= FLAT_TOLERANCE else "GROWS"
        lines.append(
            f"- {shape} (--target {target}), peak RSS against layers ({tokens:,} calibration tokens): {verdict} "
            f"({low['layers']} layers {low['peak_rss_gb']:.2f} GB, {high['layers']} layers "
            f"{high['peak_rss_gb']:.2f} GB, {growth:+.1%}; flat means within {FLAT_TOLERANCE:.0%})"
        )
    if not shown:
        lines.append("- peak RSS against layers: not measured (no shape with two --layers rows)")
    errors = [(row_estimate(r) / r["peak_rss_gb"] - 1, r) for r in rows if row_estimate(r) is not None]
    if errors:
        error, worst = max(errors, key=lambda pair: abs(pair[0]))
        verdict = "met" if abs(error) <= ESTIMATE_TOLERANCE else "NOT met"
        lines.append(
            f"- peak RSS estimate (mla_convert.memory) within {ESTIMATE_TOLERANCE:.0%} of every measured peak: "
            f"{verdict} ({len(errors)} rows; worst {error:+.1%}: {worst['shape']}, {worst['layers']} layers, "
            f"--target {worst.get('target', 'mla')}, --streaming {worst.get('streaming_option', 'on')})"
        )
    by_shape = {}
    for r in synthetic:
        if r["layers"] == SHAPES.get(r["shape"], {}).get("num_hidden_layers"):
            by_shape[r["shape"]] = r
    if "1b" in by_shape and "8b" in by_shape:
        lines.append(f"- peak RSS against hidden size: 1B-shaped (2048) {by_shape['1b']['peak_rss_gb']:.2f} GB, "
                     f"8B-shaped (4096) {by_shape['8b']['peak_rss_gb']:.2f} GB")
    smol = {r.get("streaming_option"): r for r in rows if r["kind"] == "smollm2"}
    if "on" in smol and "off" in smol:
        on, off = smol["on"]["perplexity"], smol["off"]["perplexity"]
        verdict = "met" if f"{on:.3f}" == f"{off:.3f}" else "NOT met"
        lines.append(f"- SmolLM2 streamed = whole-model held-out perplexity to 3 decimals: {verdict} "
                     f"({on:.3f} vs {off:.3f}; largest weight difference {smol['on']['max_weight_difference']:.2e})")
    else:
        lines.append("- SmolLM2 streamed = whole-model perplexity: not measured (no --smollm2 rows)")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json)
    old = []
    if json_path.is_file() and not args.fresh:
        old = json.loads(json_path.read_text()).get("rows", [])
    rows = []
    built = set()
    try:
        for shape in args.shapes:
            # the full source first, so that fewer-layer sources hard-link its shards
            counts = sorted({layer_count(shape, value) for value in args.layers}, reverse=True)
            for layers in counts:
                if not source_folder(work, shape, layers).is_dir():
                    built.add(source_folder(work, shape, layers))
                rows.append(synthetic_row(args, work, shape, layers))
        if args.smollm2:
            rows.extend(smollm2_rows(args, work))
    finally:
        if not args.keep:
            for folder in built:
                shutil.rmtree(folder, ignore_errors=True)
    all_rows = merge(old, rows)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({
        "note": "peak RSS: max of the child's RSS sampled every 0.2 s and its kernel high-water mark; GB = 1e9 bytes",
        "machine": {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / GB, 1)},
        "rows": all_rows,
    }, indent=2) + "\n")
    print("\n" + table(all_rows))
    print("\nthe scale targets, as these rows show them:")
    print("\n".join(targets(all_rows)))
    print(f"\nthis run: {len(rows)} rows in {time.perf_counter() - started:.0f} s; wrote {json_path} "
          f"({len(all_rows)} rows in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
