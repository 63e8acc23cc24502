"""MHA/GQA -> MLA conversion as a pipeline: load -> calibrate -> decompose -> assemble -> verify -> save."""

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedConfig, PreTrainedModel

from mla_modeling import MLAConfig, MLAForCausalLM

from .decompose import SourceAttention, decompose_layer, weight_only_moment
from .errors import MLAConvertError
from .folders import check_output, save_atomically
from .sources import load_source, load_source_config


EXACT_RELATIVE_TOLERANCE = 1e-4
INIT_METHODS = ("pca", "svd")


@dataclass
class ConversionOptions:
    """What to convert to. Give `kv_budget`, or `kv_lora_rank` (with optional `qk_rope_head_dim`)."""

    kv_budget: float | None = 0.5
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    init: str = "pca"
    calibration: str | None = None
    calibration_tokens: int = 32768
    calibration_seq_len: int = 512
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"


@dataclass
class RankPlan:
    """Cache shape of the converted model, and of the source for comparison (numbers per token and layer)."""

    kv_lora_ranks: list[int]
    qk_rope_head_dim: int
    source_cache_per_layer: int
    exact: bool

    @property
    def cache_per_layer(self) -> list[int]:
        return [rank + self.qk_rope_head_dim for rank in self.kv_lora_ranks]

    @property
    def kv_budget(self) -> float:
        return sum(self.cache_per_layer) / (self.source_cache_per_layer * len(self.kv_lora_ranks))


@dataclass
class SourceShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @classmethod
    def from_config(cls, config: PreTrainedConfig) -> "SourceShape":
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return cls(
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            hidden_size=config.hidden_size,
        )

    @property
    def cache_per_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim


def plan_ranks(shape: SourceShape, options: ConversionOptions) -> RankPlan:
    """Turns a budget (or explicit ranks) into latent and RoPE sizes, with the valid range in every error."""
    full = shape.cache_per_layer
    all_rope = shape.num_kv_heads * shape.head_dim
    if options.kv_lora_rank is not None:
        rope_dim = options.qk_rope_head_dim if options.qk_rope_head_dim is not None else min(shape.head_dim, all_rope)
        rank = options.kv_lora_rank
    else:
        budget = options.kv_budget if options.kv_budget is not None else 1.0
        smallest = 3 / full
        if not (budget > 0 and budget <= 1.0) or math.isnan(budget):
            raise MLAConvertError(
                f"--kv-budget must be in ({smallest:.4f}, 1.0] (the fraction of the source's KV cache of "
                f"{full} numbers per token and layer that remains), got {budget}"
            )
        total = round(budget * full)
        if total < 3:
            raise MLAConvertError(
                f"--kv-budget {budget} leaves {total} numbers per token and layer; the smallest valid budget "
                f"for this model is {smallest:.4f}"
            )
        if total == full:
            # The exact form (MLA.md §2): every key dimension keeps its RoPE, the latent is V itself.
            return RankPlan([all_rope] * shape.num_layers, all_rope, full, exact=True)
        rope_dim = options.qk_rope_head_dim
        if rope_dim is None:
            rope_dim = shape.head_dim if total >= shape.head_dim + 16 else max(2, 2 * (total // 4))
        rank = total - rope_dim
    if rope_dim % 2 or not 2 <= rope_dim <= all_rope:
        raise MLAConvertError(
            f"--qk-rope-head-dim must be even and in [2, {all_rope}] for this model "
            f"({shape.num_kv_heads} kv heads x head_dim {shape.head_dim}), got {rope_dim}"
        )
    max_rank = 2 * all_rope - rope_dim
    if not 1 <= rank <= max_rank:
        raise MLAConvertError(
            f"--kv-lora-rank must be in [1, {max_rank}] for this model with --qk-rope-head-dim {rope_dim} "
            f"(latent + RoPE key at most the source's {full} numbers per token and layer), got {rank}"
        )
    exact = rope_dim == all_rope and rank >= all_rope
    if rope_dim == all_rope:
        # With every key dimension rotated the latent only carries V, so more than its size would be wasted.
        rank = min(rank, all_rope)
    return RankPlan([rank] * shape.num_layers, rope_dim, full, exact=exact)


# ---------------------------------------------------------------------------------------------------- calibrate


@torch.no_grad()
def collect_input_moments(model: PreTrainedModel, sequences: torch.LongTensor, batch_size: int = 4) -> torch.Tensor:
    """`E[[x; 1] [x; 1]^T]` of every attention layer's input, accumulated batch by batch: `[layers, hidden + 1, hidden + 1]`."""
    layers = model.model.layers
    hidden = model.config.hidden_size
    moments = torch.zeros(len(layers), hidden + 1, hidden + 1, dtype=torch.float64)
    count = 0

    def make_hook(layer_idx: int):
        def hook(module, args, kwargs):
            hidden_states = kwargs.get("hidden_states", args[0] if args else None)
            # x: [tokens, hidden + 1]
            x = hidden_states.reshape(-1, hidden).float()
            x = torch.cat((x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)), dim=1)
            # float32 within a batch, float64 across batches: fast, and the sum over many batches stays accurate
            moments[layer_idx] += (x.T @ x).cpu().to(torch.float64)

        return hook

    handles = [layer.self_attn.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(sequences), batch_size), desc="calibrating", unit="batch"):
            batch = sequences[start : start + batch_size].to(device)
            # The base model only: the LM head is a fifth of the FLOPs and calibration needs none of it.
            model.model(input_ids=batch, use_cache=False)
            count += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return moments / max(count, 1)


def calibration_sequences(model, tokenizer, options: ConversionOptions) -> tuple[torch.LongTensor, dict]:
    """Calibration tokens: the first 80% of the given text, or (data-free) text sampled from the source itself."""
    from .data import CALIBRATION_PART, load_text, sample_from_model, tokenize_into_sequences

    if tokenizer is None:
        raise MLAConvertError("calibration needs the source's tokenizer, and none was found beside the weights")
    if options.calibration is None:
        seq_len = min(options.calibration_seq_len, 256)
        sequences = sample_from_model(model, tokenizer, options.calibration_tokens, seq_len, seed=options.seed)
        info = {"kind": "sampled", "description": f"sampled from the source model (seed {options.seed})"}
    else:
        text, description = load_text(options.calibration, CALIBRATION_PART)
        sequences = tokenize_into_sequences(tokenizer, text, options.calibration_seq_len, options.calibration_tokens)
        info = {"kind": "text", "description": description}
    info.update(tokens=int(sequences.numel()), seq_len=int(sequences.shape[1]))
    return sequences, info


# ---------------------------------------------------------------------------------------------------- decompose


def source_attention(model: PreTrainedModel, layer_idx: int, shape: SourceShape) -> SourceAttention:
    attention = model.model.layers[layer_idx].self_attn

    def weight(linear):
        return linear.weight.detach().to("cpu", torch.float64)

    def bias(linear):
        return None if linear.bias is None else linear.bias.detach().to("cpu", torch.float64)

    return SourceAttention(
        q_weight=weight(attention.q_proj),
        k_weight=weight(attention.k_proj),
        v_weight=weight(attention.v_proj),
        o_weight=weight(attention.o_proj),
        q_bias=bias(attention.q_proj),
        k_bias=bias(attention.k_proj),
        v_bias=bias(attention.v_proj),
        o_bias=bias(attention.o_proj),
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
    )


def decompose_all(model: PreTrainedModel, shape: SourceShape, moments: torch.Tensor, plan: RankPlan) -> list:
    # The matrices are small (a few hundred wide): one thread is fastest, and multi-threaded LAPACK can slow down a
    # hundredfold when another process competes for the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [
            decompose_layer(
                source_attention(model, layer_idx, shape),
                moments[layer_idx],
                plan.kv_lora_ranks[layer_idx],
                plan.qk_rope_head_dim,
            )
            for layer_idx in tqdm(range(shape.num_layers), desc="decomposing", unit="layer")
        ]
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------- assemble


def mla_config(source_config: PreTrainedConfig, model: PreTrainedModel, plan: RankPlan, layers: list) -> MLAConfig:
    shape = SourceShape.from_config(source_config)
    attention = model.model.layers[0].self_attn
    rope_parameters = dict(source_config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    return MLAConfig(
        vocab_size=source_config.vocab_size,
        hidden_size=source_config.hidden_size,
        intermediate_size=source_config.intermediate_size,
        num_hidden_layers=source_config.num_hidden_layers,
        num_attention_heads=shape.num_heads,
        hidden_act=source_config.hidden_act,
        max_position_embeddings=source_config.max_position_embeddings,
        initializer_range=getattr(source_config, "initializer_range", 0.02),
        rms_norm_eps=source_config.rms_norm_eps,
        pad_token_id=source_config.pad_token_id,
        bos_token_id=source_config.bos_token_id,
        eos_token_id=source_config.eos_token_id,
        tie_word_embeddings=bool(source_config.tie_word_embeddings),
        rope_parameters=rope_parameters,
        attention_dropout=float(getattr(source_config, "attention_dropout", 0.0) or 0.0),
        mlp_bias=bool(getattr(source_config, "mlp_bias", False)),
        kv_lora_ranks=list(plan.kv_lora_ranks),
        qk_nope_head_dim=layers[0].qk_nope_head_dim,
        qk_rope_head_dim=plan.qk_rope_head_dim,
        v_head_dim=shape.head_dim,
        head_dim=shape.head_dim,
        rope_frequency_indices=rope_tables(layers, plan.qk_rope_head_dim, shape.head_dim),
        softmax_scale=float(attention.scaling),
        attention_bias=attention.q_proj.bias is not None or attention.k_proj.bias is not None,
        attention_output_bias=attention.o_proj.bias is not None,
    )


def rope_tables(layers: list, qk_rope_head_dim: int, head_dim: int) -> list[list[int]] | None:
    """Per-layer RoPE frequency tables, or None when every layer uses the plain table (DeepSeek-V3's own layout),
    which spares decoding a gather of the RoPE tables in every layer at every step."""
    tables = [layer.rope_frequency_indices for layer in layers]
    plain = list(range(qk_rope_head_dim // 2))
    if qk_rope_head_dim == head_dim and all(table == plain for table in tables):
        return None
    return tables


def assemble(source_model: PreTrainedModel, config: MLAConfig, layers: list) -> MLAForCausalLM:
    """Copies everything but attention from the source and fills in the MLA projections."""
    state = {key: value for key, value in source_model.state_dict().items() if ".self_attn." not in key}
    for layer_idx, weights in enumerate(layers):
        prefix = f"model.layers.{layer_idx}.self_attn."
        entries = {
            "q_proj.weight": weights.q_weight,
            "q_proj.bias": weights.q_bias,
            "kv_a_proj_with_mqa.weight": weights.kv_a_weight,
            "kv_a_proj_with_mqa.bias": weights.kv_a_bias,
            "kv_b_proj.weight": weights.kv_b_weight,
            "o_proj.weight": weights.o_weight,
            "o_proj.bias": weights.o_bias,
        }
        state.update({prefix + name: tensor for name, tensor in entries.items() if tensor is not None})
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model = MLAForCausalLM(config)
    state = {key: value.to(torch.float32) for key, value in state.items()}
    model.load_state_dict(state, strict=True)
    model.generation_config = source_model.generation_config
    return model.eval()


# ---------------------------------------------------------------------------------------------------- verify


@torch.no_grad()
def compare_logits(source_model: PreTrainedModel, model: PreTrainedModel, input_ids: torch.LongTensor) -> dict:
    """Max relative logit error, KL(source || converted) and top-1 agreement on `input_ids`."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    reference = source_model(input_ids=input_ids, use_cache=False).logits.float()
    logits = model(input_ids=input_ids, use_cache=False).logits.float()
    relative_error = float((logits - reference).abs().max() / reference.abs().max())
    log_p = torch.log_softmax(reference, dim=-1)
    log_q = torch.log_softmax(logits, dim=-1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    top1 = float((reference.argmax(-1) == logits.argmax(-1)).float().mean())
    return {"max_relative_logit_error": relative_error, "kl": kl, "top1_agreement": top1, "tokens": input_ids.numel()}


def verification_ids(vocab_size: int, calibration: torch.LongTensor | None, seed: int) -> torch.LongTensor:
    if calibration is not None and len(calibration):
        return calibration[:2, :128]
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (2, 64), generator=generator)


# ---------------------------------------------------------------------------------------------------- save


def save_converted(model: MLAForCausalLM, tokenizer, report: dict, output: Path) -> None:
    # Every converted folder carries the modeling files and an `auto_map`, so it also loads with
    # `trust_remote_code=True` where mla-convert is not installed.
    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModelForCausalLM")

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        (folder / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")

    save_atomically(output, write)


# ---------------------------------------------------------------------------------------------------- pipeline


def convert(
    source: str,
    output: str | os.PathLike,
    options: ConversionOptions | None = None,
    gguf_file: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Converts `source` (folder, hub id or GGUF) to an MLA checkpoint in `output`; returns the conversion report."""
    options = options or ConversionOptions()
    output = Path(output).absolute()
    if options.init not in INIT_METHODS:
        raise MLAConvertError(f"--init must be one of {', '.join(INIT_METHODS)}, got {options.init!r}")
    if options.dtype not in ("float32", "bfloat16", "float16"):
        raise MLAConvertError(f"--dtype must be float32, bfloat16 or float16, got {options.dtype!r}")
    if options.calibration_tokens < 1:
        raise MLAConvertError(f"--calibration-tokens must be positive, got {options.calibration_tokens}")
    check_output(output, overwrite)
    started = time.perf_counter()

    # load (config first: bad budgets and architectures fail before any weight is read)
    source_config = load_source_config(source, gguf_file)
    shape = SourceShape.from_config(source_config)
    plan = plan_ranks(shape, options)
    source_model, tokenizer = load_source(source, gguf_file, dtype=torch.float32, device=options.device)

    # calibrate: the exact form needs no data, and weight-only SVD ignores it
    sequences, calibration_info = None, {"kind": "none", "description": "not needed", "tokens": 0}
    if not plan.exact and options.init == "pca":
        sequences, calibration_info = calibration_sequences(source_model, tokenizer, options)
        moments = collect_input_moments(source_model, sequences)
    else:
        if options.init == "svd":
            calibration_info["description"] = "weight-only SVD"
        moments = weight_only_moment(shape.hidden_size).expand(shape.num_layers, -1, -1)

    # decompose
    layers = decompose_all(source_model, shape, moments, plan)

    # assemble
    config = mla_config(source_config, source_model, plan, layers)
    model = assemble(source_model, config, layers).to(options.device)

    # verify (in float32, before any cast)
    verification = compare_logits(source_model, model, verification_ids(source_config.vocab_size, sequences, options.seed))
    if plan.exact and verification["max_relative_logit_error"] > EXACT_RELATIVE_TOLERANCE:
        raise RuntimeError(
            f"full-budget conversion is not exact: max relative logit error {verification['max_relative_logit_error']:.2e}"
        )
    model = model.to(getattr(torch, options.dtype))
    model.config.dtype = getattr(torch, options.dtype)

    # save
    bytes_per_number = torch.finfo(getattr(torch, options.dtype)).bits // 8
    report = {
        "source": str(source),
        "gguf_file": gguf_file,
        "source_model_type": source_config.model_type,
        "requested": {key: value for key, value in asdict(options).items() if key not in ("device",)},
        "kv_budget": plan.kv_budget,
        "exact": plan.exact,
        "kv_lora_ranks": plan.kv_lora_ranks,
        "qk_rope_head_dim": plan.qk_rope_head_dim,
        "qk_nope_head_dim": config.qk_nope_head_dim,
        "init": options.init,
        "calibration": calibration_info,
        "cache": {
            "source_numbers_per_token_per_layer": shape.cache_per_layer,
            "mla_numbers_per_token_per_layer": plan.cache_per_layer,
            "source_numbers_per_token": shape.cache_per_layer * shape.num_layers,
            "mla_numbers_per_token": sum(plan.cache_per_layer),
            "source_bytes_per_token": shape.cache_per_layer * shape.num_layers * bytes_per_number,
            "mla_bytes_per_token": sum(plan.cache_per_layer) * bytes_per_number,
            "dtype": options.dtype,
        },
        "layers": [dict(layer=i, kv_lora_rank=plan.kv_lora_ranks[i], **layer.stats) for i, layer in enumerate(layers)],
        "verification": verification,
        "notes": conversion_notes(source_config),
        "seconds": round(time.perf_counter() - started, 1),
    }
    save_converted(model, tokenizer, report, output)
    return report


def conversion_notes(source_config: PreTrainedConfig) -> list[str]:
    notes = []
    window = getattr(source_config, "sliding_window", None)
    if window is not None and getattr(source_config, "use_sliding_window", True):
        notes.append(
            f"the source uses a sliding window of {window} tokens; the MLA model attends to the full context, "
            f"so it matches the source only up to {window} tokens"
        )
    return notes
