"""Export of a DeepSeek-constrained MLA folder to DeepSeek-V3's own checkpoint format (vLLM, SGLang).

Re-layout only, no fitting: the exported folder computes what the MLA folder computes, and loads with transformers'
own `DeepseekV3ForCausalLM` (no plugin, no remote code), and so with the engines that serve DeepSeek-V3 checkpoints.
What changes on the way (transformers' `models/deepseek_v3/modeling_deepseek_v3.py` and vLLM's `deepseek_v2.py`):

- the softmax scale: DeepSeek uses `qk_head_dim ** -0.5` (times YaRN's `mscale_all_dim` factor squared); the MLA
  model's own `softmax_scale` is the source's. The ratio goes into `q_proj`'s rows, so every score stays the same;
- RoPE rows: DeepSeek reads `q_pe`/`k_pe` with pair `p` in dims `2p, 2p + 1` (`rope_interleave`, vLLM's
  `is_neox_style=False`), the MLA model in dims `p, p + D/2` (`rotate_half`): the rows of `q_proj`'s RoPE part and of
  `kv_a_proj_with_mqa`'s RoPE part are permuted. After rotation both lay the key out the `rotate_half` way, so the
  cached `k_pe` is the same numbers in both;
- the MLP is dense in every layer (`first_k_dense_replace` = number of layers; the MoE fields only need to be valid),
  the query is full rank (`q_lora_rank=None`: DeepSeek's `q_proj`), there is no multi-token-prediction module, and
  `lm_head` is always written out (untied), whatever the engine does about tying.

Refused (nothing written): per-layer ranks, no latent norm, a RoPE table other than DeepSeek's, attention or MLP
biases. Those are properties of the conversion, not of the layout: convert with the DeepSeek constraints.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from .decompose import deepseek_frequency_indices
from .errors import MLAConvertError
from .folders import prepare_output, save_atomically


# kv_lora_rank + qk_rope_head_dim shapes that MLA kernels serve: (kv_lora_rank, qk_rope_head_dim) -> engines
ENGINE_SHAPES = {
    (512, 64): [
        "vLLM (FlashMLA, FlashInfer MLA, Triton MLA backends)",
        "SGLang (FlashMLA, FlashInfer, TRT-LLM MLA backends)",
    ],
    (256, 64): ["vLLM (Triton MLA backend, recent versions)"],
}

DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def engines_for(kv_lora_rank: int, qk_rope_head_dim: int) -> list[str]:
    """The serving engines whose MLA kernels accept this latent + RoPE key shape (empty: none known)."""
    return list(ENGINE_SHAPES.get((kv_lora_rank, qk_rope_head_dim), []))


def engine_warnings(config) -> list[str]:
    """What keeps engines other than transformers from computing this export exactly (each one line)."""
    notes = []
    rank, rope = config.kv_lora_rank, config.qk_rope_head_dim
    if not engines_for(rank, rope):
        notes.append(
            f"kv_lora_rank + qk_rope_head_dim = {rank} + {rope} fits no known MLA serving kernel (vLLM's backends "
            "want 512 + 64, its Triton backend also 256 + 64; SGLang's 512 + 64): engines may refuse it"
        )
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type not in ("default", "yarn"):
        # vLLM's DeepseekV2Attention turns every non-default rope_type into "deepseek_yarn" (or
        # "deepseek_llama_scaling", which is YaRN's table too), so another scaling's table is not reproduced there.
        notes.append(
            f"the RoPE scaling {rope_type!r} is exact in transformers' DeepseekV3, but vLLM's and SGLang's DeepSeek "
            "path read every scaled RoPE as DeepSeek-YaRN, so positions rotate differently there"
        )
    if config.hidden_act != "silu":
        notes.append(f"vLLM's DeepSeek MLP supports only silu, this model uses {config.hidden_act!r}")
    return notes


def mla_rope_table(config) -> tuple[torch.Tensor, float]:
    """The source frequencies `[head_dim / 2]` and cos/sin scaling the MLA model rotates with."""
    from mla_modeling.modeling_mla import MLARotaryEmbedding

    rotary = MLARotaryEmbedding(config)
    return rotary.inv_freq.detach().to(torch.float64), float(rotary.attention_scaling)


def check_exportable(config, folder: str | os.PathLike) -> list[int]:
    """Refuses, in one line with the reason, an MLA config that DeepSeek-V3's format cannot hold; returns the
    (checked) table of source frequencies its RoPE pairs rotate with."""
    from .deepseek import rope_table_mismatch

    where = f"{folder} cannot be exported to DeepSeek-V3"
    if getattr(config, "qk_norm", False):
        raise MLAConvertError(
            f"{where}: it was converted from a QK-norm source (Qwen3), whose per-head key scales DeepSeek-V3's "
            "attention has no place for"
        )
    if len(set(config.kv_lora_ranks)) != 1:
        raise MLAConvertError(
            f"{where}: its layers have different latent sizes (kv_lora_ranks {sorted(set(config.kv_lora_ranks))}) "
            "and DeepSeek-V3 has one kv_lora_rank for all layers; convert with uniform ranks (--target deepseek)"
        )
    if not config.kv_latent_norm:
        raise MLAConvertError(
            f"{where}: it has no latent norm (kv_a_layernorm), which DeepSeek-V3 always applies and which cannot be "
            "added afterwards without changing the model; convert with --target deepseek"
        )
    if config.attention_bias or config.attention_output_bias:
        raise MLAConvertError(
            f"{where}: it has attention biases (a source with q/k/v biases, such as Qwen2), and DeepSeek-V3 (and "
            "vLLM's DeepSeek path) has none, so they would be dropped and every attention score would change"
        )
    if config.mlp_bias:
        raise MLAConvertError(f"{where}: its MLP has biases, and DeepSeek-V3's dense MLP has none")
    if config.q_lora_rank is not None:
        raise MLAConvertError(f"{where}: a low-rank query (q_lora_rank) is not supported")
    if "sliding_attention" in (getattr(config, "attention_layer_types", None) or []):
        raise MLAConvertError(
            f"{where}: its layers attend over a sliding window of {config.sliding_window} tokens, and DeepSeek-V3 "
            "attends over the whole context, so every position past the window would change"
        )
    try:
        frequencies = deepseek_frequency_indices(config.head_dim, config.qk_rope_head_dim)
    except ValueError as e:
        raise MLAConvertError(f"{where}: {e}") from None
    tables = config.rope_frequency_indices or [list(range(config.qk_rope_head_dim // 2))] * config.num_hidden_layers
    for layer_idx, table in enumerate(tables):
        if list(table) != frequencies:
            raise MLAConvertError(
                f"{where}: layer {layer_idx}'s RoPE key rotates with source frequencies {list(table)}, not "
                f"DeepSeek's table {frequencies} (one per pair, theta^(-2i/{config.qk_rope_head_dim})); convert with "
                "--target deepseek"
            )
    inv_freq, scaling = mla_rope_table(config)
    problem = rope_table_mismatch(
        inv_freq, scaling, frequencies, dict(config.rope_parameters), config.qk_rope_head_dim,
        config.max_position_embeddings,
    )
    if problem is not None:
        raise MLAConvertError(f"{where}: {problem}")
    return frequencies


def check_is_mla_folder(folder: Path) -> None:
    """Refuses, saying what to do, a folder that holds another model than a converted MLA one (an unreadable
    config is left to `load_student_config`, which says why)."""
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return
    if model_type is not None and model_type != "mla":
        raise MLAConvertError(
            f"{folder} holds a {model_type!r} model, not a converted MLA one: convert it first with "
            "`mla-convert convert --target deepseek`, then export that folder"
        )


def deepseek_config(config, dtype: torch.dtype):
    """The DeepseekV3Config of the same model: dense MLP everywhere, full-rank query, interleaved RoPE rows."""
    from transformers import DeepseekV3Config

    deepseek = DeepseekV3Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        # DeepSeek's attention expands the latent into one key head per query head
        num_key_value_heads=config.num_attention_heads,
        kv_lora_rank=config.kv_lora_rank,
        q_lora_rank=None,
        qk_rope_head_dim=config.qk_rope_head_dim,
        qk_nope_head_dim=config.qk_nope_head_dim,
        v_head_dim=config.v_head_dim,
        # Every layer dense: the MoE fields are never read, they only need to make a valid config.
        first_k_dense_replace=config.num_hidden_layers,
        n_routed_experts=1,
        n_shared_experts=1,
        moe_intermediate_size=config.intermediate_size,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=1,
        num_mtp_layers=0,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=False,
        rope_parameters=dict(config.rope_parameters),
        rope_interleave=True,
        attention_bias=False,
        attention_dropout=config.attention_dropout,
    )
    deepseek.architectures = ["DeepseekV3ForCausalLM"]
    deepseek.dtype = dtype
    deepseek.validate()
    return deepseek


def deepseek_softmax_scale(deepseek) -> float:
    """The scale transformers' DeepseekV3Attention multiplies scores by."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    return float(yarn_apply_mscale(deepseek.rope_parameters, deepseek.qk_head_dim ** (-0.5)))


def interleave_permutation(qk_rope_head_dim: int) -> torch.Tensor:
    """Row order that takes a `rotate_half` RoPE block (pair `p` in rows `p`, `p + D/2`) to DeepSeek's interleaved
    one (pair `p` in rows `2p`, `2p + 1`): `interleaved = rotate_half_rows[permutation]`."""
    half = qk_rope_head_dim // 2
    pairs = torch.arange(half)
    # [half, 2] -> [D]: p, p + half for every p
    return torch.stack((pairs, pairs + half), dim=1).reshape(-1)


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, as stored (no dtype change)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MLAConvertError(f"{folder} holds no .safetensors weights")
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def relayout(state: dict[str, torch.Tensor], config, scale_ratio: float) -> dict[str, torch.Tensor]:
    """The MLA state dict in DeepseekV3ForCausalLM's names and layout (see the module docstring)."""
    heads, nope, rope = config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim
    permutation = interleave_permutation(rope)
    out = {}
    for name, tensor in state.items():
        if name.endswith("self_attn.q_proj.weight"):
            dtype = tensor.dtype
            # [heads * (nope + rope), hidden] -> [heads, nope + rope, hidden]
            query = tensor.to(torch.float64).view(heads, nope + rope, -1)
            query = torch.cat((query[:, :nope], query[:, nope:][:, permutation]), dim=1) * scale_ratio
            tensor = query.reshape(heads * (nope + rope), -1).to(dtype)
        elif name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
            # [kv_lora_rank + rope, hidden]: the latent rows as they are, the RoPE key's interleaved
            rank = config.kv_lora_rank
            tensor = torch.cat((tensor[:rank], tensor[rank:][permutation]))
        out[name] = tensor.contiguous()
    if "lm_head.weight" not in out:
        # A tied MLA model stores only the embedding; DeepSeek's lm_head is its own tensor.
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()
    return out


def export_readme(
    source_report: dict | None, config, dtype: torch.dtype, engines: list[str], notes: list[str]
) -> str:
    per_layer = config.kv_lora_rank + config.qk_rope_head_dim
    element = DTYPE_BYTES.get(dtype, torch.finfo(dtype).bits // 8)
    lines = ["# MLA conversion in DeepSeek-V3 format", ""]
    source = (source_report or {}).get("source")
    lines.append(f"- Source: {source or 'unknown (the MLA folder has no conversion report)'}")
    budget = (source_report or {}).get("kv_budget")
    if budget is not None:
        lines.append(f"- KV budget: {budget} of the source's cache")
    lines += [
        f"- Attention: {config.num_attention_heads} heads, kv_lora_rank {config.kv_lora_rank}, qk_rope_head_dim "
        f"{config.qk_rope_head_dim}, qk_nope_head_dim {config.qk_nope_head_dim}, v_head_dim {config.v_head_dim}",
        f"- Cache per token: {per_layer} numbers per layer, {per_layer * config.num_hidden_layers} over "
        f"{config.num_hidden_layers} layers ({per_layer * config.num_hidden_layers * element} bytes in {dtype})",
        "- Loads with `transformers.AutoModelForCausalLM.from_pretrained` as `DeepseekV3ForCausalLM` (no remote code).",
    ]
    if engines:
        lines.append(f"- Fits the MLA kernels of: {'; '.join(engines)}.")
    lines += [f"- Warning: {note}." for note in notes]
    return "\n".join(lines) + "\n"


def export_deepseek_v3(
    mla_folder: str | os.PathLike,
    output: str | os.PathLike,
    overwrite: bool = False,
    force: bool = False,
) -> dict:
    """Writes `mla_folder` (converted with DeepSeek's constraints) to `output` in DeepSeek-V3's format; returns what
    it wrote (shape, cache numbers, engines). Atomic: `output` is the complete export or as it was."""
    from transformers import DeepseekV3ForCausalLM, GenerationConfig

    from .sources import load_student_config, load_student_tokenizer

    folder = Path(mla_folder)
    check_is_mla_folder(folder)
    config = load_student_config(folder)
    check_exportable(config, folder)
    output = prepare_output(output, inputs={"MLA folder": folder}, overwrite=overwrite, force=force)

    state = read_state(folder)
    dtype = next(iter(state.values())).dtype
    deepseek = deepseek_config(config, dtype)
    scale_ratio = float(config.softmax_scale) / deepseek_softmax_scale(deepseek)
    state = relayout(state, config, scale_ratio)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(deepseek)
    # strict: every tensor DeepSeek expects is there with its shape, and nothing else is
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()

    report_path = folder / "conversion.json"
    source_report = json.loads(report_path.read_text()) if report_path.is_file() else None
    engines = engines_for(config.kv_lora_rank, config.qk_rope_head_dim)
    notes = engine_warnings(config)
    for note in notes:
        # Warned, not refused: the export is exact in transformers whatever the engines accept.
        warnings.warn(note, stacklevel=2)
    tokenizer = load_student_tokenizer(folder)
    generation_config = None
    if (folder / "generation_config.json").is_file():
        generation_config = GenerationConfig.from_pretrained(folder)
    summary = {
        "format": "deepseek-v3",
        "mla_folder": str(folder.resolve()),
        "kv_lora_rank": config.kv_lora_rank,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "cache_per_token_per_layer": config.kv_lora_rank + config.qk_rope_head_dim,
        "cache_per_token": (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers,
        "softmax_scale_folded": scale_ratio,
        "engines": engines,
        "warnings": notes,
    }
    # The MLA folder's report, with the export added: also what marks the folder as an mla-convert output.
    report = dict(source_report or {})
    report["export"] = summary
    readme = export_readme(source_report, config, dtype, engines, notes)

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        if generation_config is not None:
            generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(readme)
        (staging / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")

    save_atomically(output, write)
    return summary


__all__ = [
    "ENGINE_SHAPES",
    "check_exportable",
    "engine_warnings",
    "engines_for",
    "export_deepseek_v3",
    "interleave_permutation",
]
