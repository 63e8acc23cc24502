"""KV-cache bytes per token of each supported model family, source against its MLA conversions, measured on the
caches themselves.

    python scripts/bench_families.py                       (a few minutes on 2 CPU cores)
    python scripts/bench_families.py --families qwen3-0.6b --budgets 1.0 0.5 0.25

No real Qwen3 / Phi-3 / Gemma-3 checkpoint can be reached here, so each family is a random-weight source with the
real model's attention shape (hidden size, heads, kv heads, head size, QK-norm, sliding window, RoPE) but only
`--layers` decoder layers and a `--vocab`-token vocabulary: the cache per token and layer depends on neither the
vocabulary nor the MLP nor the weights' values (the latent sizes come from `plan_ranks`, which sees only the shape).
Each source is saved to a temporary folder and converted with the library (`convert`): weight-only SVD, uniform
latent sizes, no refinement unless `--calibration` is given (then joint PCA on that many tokens of the text, retokenised
bytewise, still uniform and unrefined). The cache's size depends on none of these: `--rank-allocation spectrum`
moves latent size between layers but keeps the total, and uniform sizes make the 2 measured layers stand for every
real one. What they save is time: Phi-3-mini's [K ; V] is 6144 wide, and its float64 decompositions are most of
the run. Then source and
conversion, both loaded in bfloat16, prefill `--prompt` tokens with a cache, and the bytes the cache's own tensors
hold (`DynamicCache` keys and values; the latent cache's latent, RoPE key and Qwen3's key scales) are divided by the
prompt length and the measured layers and multiplied by the real model's layer count.

Gemma-3 (`gemma3_text`) is not converted (docs/families.md says what stands in its way): its row has the source's
cache only. The prompt is shorter than every sliding window, so every layer holds every token; past a window, local
layers of source and conversion alike hold `sliding_window - 1` tokens.

Prints a markdown table, writes JSON.
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen3Config,
)

import mla_convert  # noqa: F401
from mla_convert.convert import ConversionOptions, convert
from mla_modeling import MLALatentCacheLayer


# name -> (config class, real layer count, the real config's attention shape and what the converter reads besides).
# Vocabulary, layer count and `intermediate_size` are set by the script (see --vocab, --layers, --intermediate).
FAMILIES = {
    "qwen3-0.6b": (Qwen3Config, 28, dict(
        hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128, intermediate_size=3072,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
        max_position_embeddings=40960, tie_word_embeddings=True,
    )),
    "phi-3-mini-4k": (Phi3Config, 32, dict(
        hidden_size=3072, num_attention_heads=32, num_key_value_heads=32, intermediate_size=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5,
        max_position_embeddings=4096, original_max_position_embeddings=4096, sliding_window=2047,
        tie_word_embeddings=False,
    )),
    "llama-3.2-1b": (LlamaConfig, 16, dict(
        hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64, intermediate_size=8192,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
        rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=True,
    )),
    "mistral-7b-v0.1": (MistralConfig, 32, dict(
        hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=14336,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5,
        max_position_embeddings=32768, sliding_window=4096, tie_word_embeddings=False,
    )),
    "gemma-3-1b": (Gemma3TextConfig, 26, dict(
        hidden_size=1152, num_attention_heads=4, num_key_value_heads=1, head_dim=256, intermediate_size=6912,
        query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=32768, rms_norm_eps=1e-6,
    )),
}
# Refused by the converter (docs/families.md): measured as sources only.
UNSUPPORTED = {"gemma-3-1b": "not supported: per-layer-kind RoPE, (1 + w) norms and embedding scaling missing"}
BYTES_PER_NUMBER = 2  # bfloat16


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens + 2 specials: calibration on real text with no download (the tests' tokenizer)."""
    byte_vocab = {token: index for index, token in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab = {**byte_vocab, "<s>": 256, "</s>": 257}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


def build_source(name: str, layers: int, vocab: int, intermediate: int | None, folder: Path) -> None:
    config_class, _, shape = FAMILIES[name]
    shape = dict(shape)
    if intermediate is not None:
        shape["intermediate_size"] = intermediate
    config = config_class(
        num_hidden_layers=layers, vocab_size=vocab, bos_token_id=256, eos_token_id=257, pad_token_id=None, **shape
    )
    if config_class is Gemma3TextConfig:
        # One local and one global layer (the real 5:1 pattern needs 6): both kinds appear in the measurement.
        config.layer_types = ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)


@torch.inference_mode()
def measure_cache(folder: Path, prompt_length: int) -> dict:
    """Bytes per token and layer the cache's own tensors hold after a prefill of `prompt_length` tokens (bfloat16),
    with the latent cache's split into latent, RoPE key and key scales."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_length), generator=torch.Generator().manual_seed(0))
    cache = model(prompt, use_cache=True, logits_to_keep=1).past_key_values
    parts = {"key": 0, "value": 0} if not isinstance(cache.layers[0], MLALatentCacheLayer) else {
        "latent": 0, "k_pe": 0, "key_scales": 0}
    for layer in cache.layers:
        # Every layer must hold every prompt token, or bytes / token would mix in a window.
        assert layer.keys.shape[-2] == prompt_length and layer.keys.shape[0] == 1, layer.keys.shape
        if isinstance(layer, MLALatentCacheLayer):
            # `rope_key` is `[k_pe ; key scales]` on a QK-norm model (cache_mla.py)
            rope = model.config.qk_rope_head_dim
            parts["latent"] += layer.latent.numel() * layer.latent.element_size()
            parts["k_pe"] += layer.rope_key[..., :rope].numel() * layer.rope_key.element_size()
            parts["key_scales"] += layer.rope_key[..., rope:].numel() * layer.rope_key.element_size()
        else:
            parts["key"] += layer.keys.numel() * layer.keys.element_size()
            parts["value"] += layer.values.numel() * layer.values.element_size()
    per_layer = {part: value / (prompt_length * len(cache.layers)) for part, value in parts.items()}
    element_size = next(iter(cache.layers)).keys.element_size()
    assert element_size == BYTES_PER_NUMBER, element_size
    attentions = [module for module in model.modules() if hasattr(module, "fold_query")]
    return {"per_token_per_layer": per_layer, "bytes_per_token_per_layer": sum(per_layer.values()),
            "measured_layers": len(cache.layers),
            # whether absorbed decoding folds W_uk into the query projection (never through QK-norm; elsewhere
            # where it saves multiply-adds): the decode-speed side of the shape, for bench_decode's --unfolded-query
            "folded_query_layers": sum(bool(module.fold_query) for module in attentions)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers built (the real count scales them)")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary of the built sources")
    parser.add_argument("--intermediate", type=int, default=None,
                        help="MLP size of the built sources (default: the real model's)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens prefilled into the cache")
    parser.add_argument("--calibration", help="calibrate on this text (default: weight-only SVD)")
    parser.add_argument("--calibration-tokens", type=int, default=1024)
    parser.add_argument("--json", default="runs/bench_families.json")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.families:
            real_layers = FAMILIES[name][1]
            source = Path(scratch) / name
            started = time.perf_counter()
            build_source(name, args.layers, args.vocab, args.intermediate, source)
            measured = measure_cache(source, args.prompt)
            rows.append({"family": name, "model": "source", "budget": None, "real_layers": real_layers, **measured})
            print(json.dumps(rows[-1]), flush=True)
            if name in UNSUPPORTED:
                continue
            for budget in args.budgets:
                output = Path(scratch) / f"{name}-mla-{budget:g}"
                options = ConversionOptions(
                    kv_budget=budget, init="pca" if args.calibration else "svd", rank_allocation="uniform",
                    calibration=args.calibration, calibration_tokens=args.calibration_tokens,
                    calibration_seq_len=min(256, args.calibration_tokens), refine_steps=0, key_scale=1.0,
                    refine_tokens=args.calibration_tokens,
                )
                report = convert(str(source), output, options)
                measured = measure_cache(output, args.prompt)
                config = json.loads((output / "config.json").read_text())
                rows.append({
                    "family": name, "model": "mla", "budget": budget, "real_layers": real_layers, **measured,
                    "kv_lora_ranks": config["kv_lora_ranks"], "qk_rope_head_dim": config["qk_rope_head_dim"],
                    "planned_numbers_per_token": report["cache"]["mla_numbers_per_token"],
                })
                print(json.dumps(rows[-1]), flush=True)
                # The cache measured must be the one the converter planned (its report counts numbers).
                planned = report["cache"]["mla_numbers_per_token"] * BYTES_PER_NUMBER / args.layers
                assert abs(planned - measured["bytes_per_token_per_layer"]) < 1e-6, (planned, measured)
                # Phi-3-mini's and Mistral's conversions are hundreds of MB each: the scratch folder need not hold them all.
                shutil.rmtree(output)
            print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)

    how = (f"joint PCA on {args.calibration_tokens} tokens of {args.calibration}" if args.calibration
           else "weight-only SVD")
    print(f"\nrandom-weight sources with the real attention shape, {args.layers} layers, vocab {args.vocab}, "
          f"converted by {how}, uniform latent sizes, no refinement; "
          f"bytes measured on the cache after a {args.prompt}-token prefill (bfloat16, {BYTES_PER_NUMBER} bytes per "
          "number), per token and layer, times the real layer count")
    print("\n| family | real layers | model | bytes / token | vs source | latent | k_pe | key scales | folded query |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        total = row["bytes_per_token_per_layer"] * row["real_layers"]
        base = next(r for r in rows if r["family"] == row["family"] and r["model"] == "source")
        base_total = base["bytes_per_token_per_layer"] * base["real_layers"]
        row["bytes_per_token"] = total
        row["vs_source"] = total / base_total
        parts = row["per_token_per_layer"]
        if row["model"] == "source":
            model = "source (K + V)"
            split = [f"K {parts['key'] * row['real_layers']:,.0f} + V {parts['value'] * row['real_layers']:,.0f}", "", "", ""]
        else:
            model = f"MLA {row['budget']:g}"
            split = [f"{parts[part] * row['real_layers']:,.0f}" for part in ("latent", "k_pe", "key_scales")]
            split.append(f"{row['folded_query_layers']}/{row['measured_layers']} layers")
        print(f"| {row['family']} | {row['real_layers']} | {model} | {total:,.0f} | {row['vs_source']:.3f} | "
              + " | ".join(split) + " |")
        if row["model"] == "source" and row["family"] in UNSUPPORTED:
            print(f"| {row['family']} | {row['real_layers']} | MLA | {UNSUPPORTED[row['family']]} | | | | | |")

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "layers_built": args.layers, "vocab": args.vocab, "prompt_tokens": args.prompt,
        "bytes_per_number": BYTES_PER_NUMBER, "calibration": args.calibration,
        "calibration_tokens": args.calibration_tokens if args.calibration else 0,
        "unsupported": UNSUPPORTED, "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
