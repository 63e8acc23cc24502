"""`mla-convert`: convert, evaluate and generate. A thin layer over the library functions."""

import argparse
import json
import os
import re
import sys
from pathlib import Path

from .errors import MLAConvertError


EPILOG = """examples:
  mla-convert convert ./SmolLM2-135M ./smollm2-mla --kv-budget 0.5 --calibration ../shared/data/wikitext2_valid.txt
  mla-convert convert ./SmolLM2-135M ./smollm2-exact --kv-budget 1.0        (exact: same logits as the source)
  mla-convert gqa ./SmolLM2-135M ./smollm2-gqa --kv-budget 0.3333          (GQA baseline: 1 of 3 KV heads)
  mla-convert eval ./smollm2-mla --data ../shared/data/wikitext2_valid.txt --reference ./SmolLM2-135M
  mla-convert heal ./smollm2-mla ./smollm2-mla-healed --teacher ./SmolLM2-135M --data ../shared/data/wikitext2_valid.txt
  mla-convert generate ./smollm2-mla "What is the capital of France?"
"""


class HelpFormatter(argparse.HelpFormatter):
    """Says an option's default once, and only where there is one to say (not for flags or unset values)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "(default" in help_text or "%(default)" in help_text or action.default is None or isinstance(action.default, bool):
            return help_text
        if action.default is argparse.SUPPRESS or not action.option_strings:
            return help_text
        return f"{help_text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with the house rules: an error is the usage line and one line saying what is wrong, and negative
    numbers are values (`--lr -1e-4` reaches the validator, which says why it is refused)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        # argparse's own pattern knows -1 and -.5 but not -1e-4
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUTPUT if it is an earlier mla-convert output (the old one stays until the new one is complete)",
    )
    parser.add_argument(
        "--force", action="store_true", help="with --overwrite: replace OUTPUT even if it is not an mla-convert output"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mla-convert",
        description="Turn an MHA/GQA model (Llama, Mistral, Qwen2) into Multi-head Latent Attention with a latent "
        "KV cache, then evaluate it and generate with it through transformers.",
        epilog=EPILOG,
        formatter_class=type("ExamplesFormatter", (argparse.RawDescriptionHelpFormatter, HelpFormatter), {}),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser(
        "convert",
        help="convert a checkpoint to MLA",
        usage="%(prog)s SOURCE OUTPUT [--kv-budget F] [--calibration DATA] [options]",
        description="Convert SOURCE (a local folder, a hub id, or a .gguf file) into an MLA checkpoint in OUTPUT. "
        "At --kv-budget 1.0 the result computes exactly what the source computes. Below it, the shared RoPE key and "
        "the latent are chosen from calibration activations (closed form: RoRoPE and a joint PCA), then every "
        "layer is refined by a few gradient steps to reproduce its source layer's attention output, so the choice "
        "of --calibration matters. OUTPUT is written atomically: on any error nothing is left behind.",
    )
    convert.add_argument("source", metavar="SOURCE", help="folder with config.json and weights, hub id, or .gguf file")
    convert.add_argument("output", metavar="OUTPUT", help="folder to write the MLA checkpoint to")
    convert.add_argument("--gguf-file", metavar="NAME", help="GGUF file name inside SOURCE (weights are dequantized)")
    size = convert.add_argument_group("cache size (give --kv-budget, or --kv-lora-rank with --qk-rope-head-dim)")
    size.add_argument(
        "--kv-budget",
        type=float,
        metavar="F",
        help="fraction of the source's KV cache that remains, in (0, 1]; 1.0 is exact (default: 0.5)",
    )
    size.add_argument("--kv-lora-rank", type=int, metavar="R", help="latent size per token and layer")
    size.add_argument(
        "--qk-rope-head-dim",
        type=int,
        metavar="D",
        help="size of the shared RoPE key (even); default with --kv-budget: a third of the budget, at most the "
        "source's head_dim; with --kv-lora-rank: the source's head_dim",
    )
    size.add_argument(
        "--rank-allocation",
        choices=("uniform", "spectrum"),
        default="spectrum",
        help="uniform: the same latent size in every layer; spectrum: with --kv-budget, latent sizes per layer where the "
        "calibration spectra need them (the total cache stays exactly the same; the config carries the per-layer "
        "sizes); an explicit --kv-lora-rank is used in every layer as given",
    )
    convert.add_argument(
        "--calibration",
        metavar="DATA",
        help="calibration text: a .txt/.jsonl/.parquet file or folder (its first 80%% is used), or a datasets name "
        "NAME[:CONFIG]. Without it, calibration text is sampled from the source model itself (data-free)",
    )
    convert.add_argument("--calibration-tokens", type=int, default=32768, metavar="N", help="calibration tokens")
    method = convert.add_argument_group("method (the defaults are the best measured; the rest are for comparison)")
    method.add_argument(
        "--init",
        choices=("pca", "svd"),
        default="pca",
        help="pca: joint PCA of [K_nope ; V] on calibration activations, in the metric the layer's output feels; "
        "svd: weight-only SVD",
    )
    method.add_argument(
        "--rope-strategy",
        choices=("rorope", "freqfold", "partial"),
        default="rorope",
        help="which key components keep RoPE in the shared key. rorope: PCA of the key heads per frequency, keeping "
        "the components whose loss of RoPE would cost the most attention-score error; freqfold: the same over pairs "
        "of adjacent frequencies; partial: no mixing, MHA2MLA's 2-norm rule",
    )
    method.add_argument(
        "--key-scale",
        default="search",
        metavar="search|A",
        help="weight of the keys against the values in the joint latent, as a multiple of the weight that balances "
        "their energies: 'search' tries 0.5, 1, 2 and 4 per layer and keeps the one that reproduces the source "
        "layer's attention output best on calibration data",
    )
    method.add_argument(
        "--refine-steps",
        type=int,
        default=100,
        metavar="N",
        help="after the closed-form start, Adam steps per layer fitting each layer's attention output to the "
        "source layer's on calibration activations (one layer at a time, no full-model backward); 0 turns it off",
    )
    method.add_argument("--refine-lr", type=float, default=3e-4, metavar="LR", help="learning rate of refinement")
    method.add_argument(
        "--refine-tokens",
        type=int,
        default=32768,
        metavar="N",
        help="calibration tokens whose attention inputs are kept for refinement (bfloat16, hidden_size x layers x "
        "2 bytes each: lower it for large models)",
    )
    convert.add_argument("--seed", type=int, default=0, help="seed for data-free calibration sampling")
    convert.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="saved dtype")
    convert.add_argument("--device", default="cpu", help="device for conversion (cpu, cuda, cuda:1, ...)")
    add_output_arguments(convert)

    gqa = commands.add_parser(
        "gqa",
        help="pool KV heads: the GQA baseline that MLA is compared against",
        usage="%(prog)s SOURCE OUTPUT (--num-kv-heads N | --kv-budget F) [options]",
        description="Make the baseline for MLA at equal KV-cache size: SOURCE with fewer KV heads, each the mean of "
        "a group of adjacent KV heads (k_proj and v_proj, weights and biases), as in the GQA paper (Ainslie et al. "
        "2023, without its uptraining). Query heads and o_proj are unchanged. At --kv-budget F the KV cache per "
        "token is the same as `mla-convert convert --kv-budget F`, so `mla-convert eval` of both against SOURCE "
        "compares the two methods at equal cache size. Only budgets N / (source KV heads) exist, for N dividing "
        "both the query and the KV head counts; a wrong value is answered with the valid ones. OUTPUT is an "
        "ordinary model folder of SOURCE's architecture (loads with AutoModelForCausalLM, no mla-convert needed) "
        "in float32, with the tokenizer and conversion.json; it is written atomically.",
    )
    gqa.add_argument("source", metavar="SOURCE", help="folder with config.json and weights, hub id, or .gguf file")
    gqa.add_argument("output", metavar="OUTPUT", help="folder to write the pooled checkpoint to")
    heads = gqa.add_mutually_exclusive_group(required=True)
    heads.add_argument("--num-kv-heads", type=int, metavar="N", help="KV heads after pooling")
    heads.add_argument(
        "--kv-budget",
        type=float,
        metavar="F",
        help="fraction of the source's KV cache that remains (N / source KV heads, e.g. 0.5 for half the heads)",
    )
    gqa.add_argument("--gguf-file", metavar="NAME", help="GGUF file name inside SOURCE (weights are dequantized)")
    add_output_arguments(gqa)

    evaluate = commands.add_parser(
        "eval",
        help="perplexity, and KL / top-1 agreement against a reference",
        usage="%(prog)s MODEL --data FILE_OR_DATASET [--reference SOURCE] [options]",
        description="Held-out perplexity of MODEL on DATA; with --reference, also KL(reference || MODEL) and top-1 "
        "agreement on the same tokens. By default the last 20% of DATA is used, the part that calibration "
        "never reads.",
    )
    evaluate.add_argument("model", metavar="MODEL", help="model folder (MLA or any supported source)")
    evaluate.add_argument("--data", required=True, metavar="FILE_OR_DATASET", help="evaluation text")
    evaluate.add_argument("--reference", metavar="SOURCE", help="the source model to compare against")
    evaluate.add_argument("--reference-gguf-file", metavar="NAME", help="GGUF file name inside the reference folder")
    evaluate.add_argument("--seq-len", type=int, default=512, metavar="L", help="tokens per evaluated sequence")
    evaluate.add_argument("--max-tokens", type=int, default=16384, metavar="N", help="evaluate at most this many tokens")
    evaluate.add_argument("--batch-size", type=int, default=4, metavar="B", help="sequences per forward pass")
    evaluate.add_argument("--json", metavar="FILE", help="also write the results to FILE")

    heal = commands.add_parser(
        "heal",
        help="fine-tune a converted model by distillation from its source",
        usage="%(prog)s MLA_FOLDER OUTPUT --teacher SOURCE --data DATA [options]",
        description="Heal MLA_FOLDER by distillation from --teacher (KL to the teacher's logits; with --kl-weight "
        "below 1, plus next-token loss) on --data, with accelerate: one CPU, one GPU, or `accelerate launch` for "
        "several processes (DDP, FSDP), bf16 with --mixed-precision. Checkpoints every --save-every steps; --resume continues the latest. "
        "OUTPUT is written atomically and loads like any converted folder.",
    )
    from .heal import add_heal_arguments

    add_heal_arguments(heal)

    generate = commands.add_parser(
        "generate",
        help="generate text",
        usage="%(prog)s MODEL PROMPT [options]",
        description="Generate a reply to PROMPT (through the chat template when the tokenizer has one).",
    )
    generate.add_argument("model", metavar="MODEL", help="model folder")
    generate.add_argument("prompt", metavar="PROMPT")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--sample", action="store_true", help="sample (temperature 0.7) instead of greedy decoding")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--no-chat-template", action="store_true", help="feed PROMPT as plain text")
    return parser


def parse_key_scale(value: str) -> str | float:
    if value == "search":
        return value
    try:
        return float(value)
    except ValueError:
        raise MLAConvertError(f"--key-scale must be 'search' or a positive number, got {value!r}") from None


def run_convert(args: argparse.Namespace) -> None:
    from .convert import ConversionOptions, convert

    if args.kv_budget is not None and args.kv_lora_rank is not None:
        raise MLAConvertError("give either --kv-budget or --kv-lora-rank, not both")
    if args.kv_lora_rank is None and args.kv_budget is None:
        args.kv_budget = 0.5
    options = ConversionOptions(
        kv_budget=args.kv_budget,
        kv_lora_rank=args.kv_lora_rank,
        qk_rope_head_dim=args.qk_rope_head_dim,
        init=args.init,
        rope_strategy=args.rope_strategy,
        key_scale=parse_key_scale(args.key_scale),
        rank_allocation=args.rank_allocation,
        refine_steps=args.refine_steps,
        refine_lr=args.refine_lr,
        refine_tokens=args.refine_tokens,
        calibration=args.calibration,
        calibration_tokens=args.calibration_tokens,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
    )
    report = convert(
        args.source, args.output, options, gguf_file=args.gguf_file, overwrite=args.overwrite, force=args.force
    )
    cache = report["cache"]
    print(f"wrote {Path(args.output).absolute()}")
    print(
        f"KV cache per token: {cache['mla_numbers_per_token']} numbers ({cache['mla_bytes_per_token']} bytes in "
        f"{cache['dtype']}) vs. {cache['source_numbers_per_token']} for the source "
        f"(budget {report['kv_budget']:.3f}); calibration: {report['calibration']['description']}"
    )
    verification = report["verification"]
    print(
        f"check against the source on {verification['tokens']} tokens: max relative logit error "
        f"{verification['max_relative_logit_error']:.2e}, KL {verification['kl']:.4f}, "
        f"top-1 agreement {verification['top1_agreement']:.3f}; took {report['seconds']} s"
    )
    refined = [layer for layer in report["layers"] if "refine_error_before" in layer]
    if refined:
        before = sum(layer["refine_error_before"] for layer in refined) / len(refined)
        after = sum(layer["refine_error_after"] for layer in refined) / len(refined)
        print(
            f"refinement ({report['refine_steps']} steps per layer): mean relative attention-output error on held-out "
            f"calibration windows {before:.4f} -> {after:.4f}"
        )
    for note in report["notes"]:
        print(f"note: {note}")


def run_gqa(args: argparse.Namespace) -> None:
    from .gqa import convert_to_gqa

    report = convert_to_gqa(
        args.source,
        args.output,
        num_kv_heads=args.num_kv_heads,
        kv_budget=args.kv_budget,
        gguf_file=args.gguf_file,
        overwrite=args.overwrite,
        force=args.force,
    )
    cache = report["cache"]
    print(f"wrote {Path(args.output).absolute()}")
    print(
        f"KV heads: {report['num_kv_heads_before']} -> {report['num_kv_heads_after']} (groups of "
        f"{report['heads_pooled_per_kv_head']} mean-pooled); KV cache per token: {cache['gqa_numbers_per_token']} "
        f"numbers ({cache['gqa_bytes_per_token']} bytes in {cache['dtype']}) vs. {cache['source_numbers_per_token']} "
        f"for the source (budget {report['kv_budget']:.3f})"
    )


def check_json_output(path: str, inputs: dict) -> Path:
    """`--json FILE`: checked before the work, so an hour of evaluation is never lost to a typo in its path."""
    from .folders import check_disjoint

    target = Path(path).expanduser().absolute()
    if not path.strip() or target.is_dir():
        raise MLAConvertError(f"--json {path!r} must name a file, not a folder")
    if not target.parent.is_dir():
        raise MLAConvertError(f"--json {path}: the folder {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise MLAConvertError(f"--json {path}: cannot write in {target.parent} (permission denied)")
    check_disjoint(target, inputs, "--json")
    return target


def warn_if_longer_than_trained(model, seq_len: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        print(
            f"warning: --seq-len {seq_len} is longer than the model's max_position_embeddings ({limit}): positions "
            "past it were never trained, so the figures say little about the model",
            file=sys.stderr,
        )


def run_eval(args: argparse.Namespace) -> None:
    from .data import EVALUATION_PART, load_text, tokenize_into_sequences
    from .evaluate import evaluate
    from .folders import write_text_atomically
    from .sources import load_model

    if args.seq_len < 2:
        raise MLAConvertError(f"--seq-len must be at least 2 (a context and a token to predict), got {args.seq_len}")
    if args.max_tokens < args.seq_len:
        raise MLAConvertError(f"--max-tokens ({args.max_tokens}) must be at least --seq-len ({args.seq_len})")
    if args.batch_size < 1:
        raise MLAConvertError(f"--batch-size must be at least 1, got {args.batch_size}")
    inputs = {"model": args.model, "reference": args.reference, "data": args.data}
    json_path = check_json_output(args.json, inputs) if args.json is not None else None
    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise MLAConvertError(f"no tokenizer found in {args.model}")
    warn_if_longer_than_trained(model, args.seq_len)
    reference = None
    if args.reference:
        reference, _ = load_model(args.reference, gguf_file=args.reference_gguf_file)
    text, description = load_text(args.data, EVALUATION_PART)
    sequences = tokenize_into_sequences(tokenizer, text, args.seq_len, args.max_tokens)
    results = evaluate(model, sequences, reference=reference, batch_size=args.batch_size)
    results = {"model": args.model, "reference": args.reference, "data": description, **results}
    print(f"data: {description}, {results['tokens']} predicted tokens in sequences of {args.seq_len}")
    print(f"perplexity: {results['perplexity']:.3f}")
    if reference is not None:
        ratio = results["perplexity"] / results["reference_perplexity"]
        print(f"reference perplexity: {results['reference_perplexity']:.3f} (ratio {ratio:.3f})")
        print(f"KL(reference || model): {results['kl']:.4f} nats/token, top-1 agreement: {results['top1_agreement']:.4f}")
    if json_path is not None:
        write_text_atomically(json_path, json.dumps(results, indent=2) + "\n")


def run_generate(args: argparse.Namespace) -> None:
    import torch

    from .sources import load_model

    if not args.prompt.strip():
        raise MLAConvertError("PROMPT is empty: give the text to reply to")
    if args.max_new_tokens < 1:
        raise MLAConvertError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise MLAConvertError(f"no tokenizer found in {args.model}")
    if tokenizer.chat_template and not args.no_chat_template:
        messages = [{"role": "user", "content": args.prompt}]
        input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    else:
        input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    torch.manual_seed(args.seed)
    sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.9} if args.sample else {"do_sample": False}
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=args.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **sampling,
    )
    print(tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip())


def run_heal(args: argparse.Namespace) -> None:
    from .heal import run_heal as heal_command

    heal_command(args)


COMMANDS = {"convert": run_convert, "gqa": run_gqa, "eval": run_eval, "heal": run_heal, "generate": run_generate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except MLAConvertError as error:
        print(f"mla-convert: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mla-convert: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
