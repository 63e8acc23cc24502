"""DeepSeek-V3 export: a conversion under DeepSeek's constraints (latent norm, one kv_lora_rank, DeepSeek's
RoPE table), exported, loads in transformers' own `DeepseekV3ForCausalLM` in a process that never imports the plugin,
and computes what the MLA folder computes; folders the format cannot hold are refused with nothing written."""

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import (
    byte_tokenizer,
    leftovers,
    load_causal_lm,
    relative_error,
    run_cli,
    run_without_plugin,
    token_ids,
)

from mla_convert.conversion_options import DEEPSEEK_REFINE_LR
from mla_convert.decompose import deepseek_frequency_indices
from mla_convert.errors import MLAConvertError
from mla_convert.heal.options import DEEPSEEK_LR
from mla_convert.refine import RefineOptions


# Relative max logit difference allowed between the exported folder and the MLA folder (float32): the export's promise
EXPORT_TOLERANCE = 1e-4
# Full cache budget of the pico models (2 * kv heads * head_dim 16) split into latent + RoPE key:
# name -> (kv_lora_rank, qk_rope_head_dim). MHA keeps all 8 frequencies (DeepSeek's plain table); GQA and Mistral
# use qk_rope_head_dim 8 = head_dim / 2, every other source frequency (Llama-3 scaled for llama-gqa).
SHAPES = {"llama-mha": (112, 16), "llama-gqa": (56, 8), "mistral": (56, 8)}

# Run in a fresh interpreter: loads the export natively, reports what it computed and which modules it imported.
NATIVE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM

    folder, ids_path, out_path = sys.argv[1:]
    ids = torch.load(ids_path)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        outputs = model(input_ids=ids[:1], use_cache=True)
        cache = getattr(outputs, "cache", None) or outputs.past_key_values
        greedy = model.generate(ids[:1, :16], max_new_tokens=12, do_sample=False)
    torch.save(
        {
            "class": type(model).__name__,
            "logits": logits,
            "greedy": greedy,
            "cache_latent": cache.layers[0].keys,
            "cache_rope": cache.layers[0].values,
            "plugin_imported": sorted(m for m in sys.modules if m.split(".")[0] in ("mla_convert", "mla_modeling")),
        },
        out_path,
    )
    """
)


def run_native(folder, ids: torch.LongTensor, tmp_path) -> dict:
    """What transformers' own DeepseekV3 computes on `ids` from `folder`, in a process without the plugin."""
    ids_path, out_path = tmp_path / "ids.pt", tmp_path / "native.pt"
    torch.save(ids, ids_path)
    result = subprocess.run(
        [sys.executable, "-c", NATIVE_SCRIPT, str(folder), str(ids_path), str(out_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out_path)


def deepseek_mla(name: str, pico_folders, kv_lora_rank: int, qk_rope_head_dim: int):
    """The pico source `name` and its MLA conversion under DeepSeek's constraints (closed form, with the norm)."""
    from mla_convert.deepseek import build_deepseek_mla

    source = load_causal_lm(pico_folders[name])
    calibration = token_ids(8, 64, seed=1)
    return source, build_deepseek_mla(source, source.config, kv_lora_rank, qk_rope_head_dim, calibration)


def save_mla(model, folder, budget: float = 1.0) -> None:
    from mla_convert.deepseek import save_mla_folder

    save_mla_folder(model, byte_tokenizer(), folder, {"source": "pico", "kv_budget": budget})


@pytest.fixture(scope="module", params=sorted(SHAPES))
def exported(request, pico_folders, tmp_path_factory):
    """(name, MLA folder, exported folder) for each source architecture."""
    from mla_convert.export import export_deepseek_v3

    name = request.param
    root = tmp_path_factory.mktemp(f"export-{name}")
    _, model = deepseek_mla(name, pico_folders, *SHAPES[name])
    save_mla(model, root / "mla")
    with warnings.catch_warnings():
        # The pico shapes fit no serving kernel: the export warns and goes on.
        warnings.simplefilter("ignore", UserWarning)
        # Llama-3 scaling (llama-gqa) is exact in transformers only: engines read it as YaRN
        export_deepseek_v3(root / "mla", root / "deepseek", transformers_only=name == "llama-gqa")
    return name, root / "mla", root / "deepseek"


def test_native_deepseek_matches_mla_folder(exported, tmp_path):
    name, mla_folder, exported_folder = exported
    kv_lora_rank, qk_rope_head_dim = SHAPES[name]
    ids = token_ids(2, 48, seed=7)
    native = run_native(exported_folder, ids, tmp_path)

    assert native["class"] == "DeepseekV3ForCausalLM"
    assert native["plugin_imported"] == []

    mla = load_causal_lm(mla_folder)
    with torch.no_grad():
        logits = mla(input_ids=ids).logits
        outputs = mla(input_ids=ids[:1], use_cache=True)
        greedy = mla.generate(ids[:1, :16], max_new_tokens=12, do_sample=False)
    error = relative_error(native["logits"], logits)
    assert error <= EXPORT_TOLERANCE, f"{name}: exported logits differ by {error:.2e}"
    assert torch.equal(native["greedy"], greedy)

    # The native cache holds kv_lora_rank + qk_rope_head_dim numbers per token and layer: the normalised latent and
    # the rotated RoPE key, the same numbers as the MLA folder's own cache.
    assert native["cache_latent"].shape == (1, 1, ids.shape[1], kv_lora_rank)
    assert native["cache_rope"].shape == (1, 1, ids.shape[1], qk_rope_head_dim)
    cache = getattr(outputs, "cache", None) or outputs.past_key_values
    assert relative_error(native["cache_latent"], cache.layers[0].latent) <= EXPORT_TOLERANCE
    assert relative_error(native["cache_rope"], cache.layers[0].rope_key) <= EXPORT_TOLERANCE


def test_export_folder_contents(exported):
    name, mla_folder, exported_folder = exported
    kv_lora_rank, qk_rope_head_dim = SHAPES[name]
    config = json.loads((exported_folder / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3"
    assert config["first_k_dense_replace"] == config["num_hidden_layers"]
    assert config["q_lora_rank"] is None and config["rope_interleave"] is True
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"]) == (kv_lora_rank, qk_rope_head_dim)
    assert "auto_map" not in config
    assert (exported_folder / "tokenizer.json").is_file()
    assert (exported_folder / "generation_config.json").is_file()
    readme = (exported_folder / "README.md").read_text()
    assert f"{kv_lora_rank + qk_rope_head_dim} numbers per layer" in readme
    assert "fits no known MLA serving kernel" in readme
    if name == "llama-gqa":
        # Llama-3 scaling: exact in transformers, not in engines that read every scaled RoPE as DeepSeek-YaRN
        assert "DeepSeek-YaRN" in readme
    assert not list(exported_folder.glob("*.py")), "the export must not need remote code"


def test_exported_rope_equals_converted_rope(exported):
    """DeepSeek's own table (pair i: theta^(-2i/qk_rope_head_dim), Llama-3 scaling for llama-gqa) rotates each pair
    with the source frequency the converted model uses for it."""
    from transformers import AutoConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    name, mla_folder, exported_folder = exported
    mla = load_causal_lm(mla_folder)
    deepseek = DeepseekV3RotaryEmbedding(AutoConfig.from_pretrained(exported_folder))
    attention = mla.model.layers[0].self_attn
    indices = attention.rope_index[: attention.qk_rope_head_dim // 2] if attention.rope_index is not None else None
    source_table = mla.model.rotary_emb.inv_freq
    expected = source_table if indices is None else source_table[indices]
    assert relative_error(deepseek.inv_freq, expected) <= 1e-6
    if name == "llama-gqa":
        assert mla.config.rope_parameters["rope_type"] == "llama3"


@pytest.mark.parametrize("name", ["llama-gqa"])
def test_deepseek_frequency_table_matches_source(name, pico_folders):
    """`deepseek_frequency_indices` against the source's own (Llama-3-scaled) table, computed by transformers."""
    from mla_convert.deepseek import deepseek_rope_table

    source = load_causal_lm(pico_folders[name])
    inv_freq = source.model.rotary_emb.inv_freq.double()
    for qk_rope_head_dim in (16, 8, 4):
        indices = deepseek_frequency_indices(16, qk_rope_head_dim)
        table, scaling = deepseek_rope_table(source.config.rope_parameters, qk_rope_head_dim, 512)
        assert relative_error(table, inv_freq[indices]) <= 1e-6
        assert scaling == pytest.approx(float(source.model.rotary_emb.attention_scaling))
    with pytest.raises(ValueError):
        deepseek_frequency_indices(16, 6)


def test_constrained_placement_keeps_one_component_per_frequency(pico_folders):
    """The shared key of a GQA source rotates with exactly DeepSeek's frequencies, one component each, in pair order."""
    _, model = deepseek_mla("llama-gqa", pico_folders, 56, 8)
    assert model.config.rope_frequency_indices == [deepseek_frequency_indices(16, 8)] * 2
    assert model.config.kv_latent_norm and len(set(model.config.kv_lora_ranks)) == 1


@pytest.mark.parametrize("kv_lora_rank", [56, 8])
def test_latent_norm_paths_agree_and_start_near_closed_form(pico_folders, kv_lora_rank):
    """With the norm, the absorbed and expanded forms give the same logits; the norm's weight (the mean latent RMS)
    starts the layer nearer the norm-free closed form than the unit weight a fresh norm has. It is not exact: the
    norm rescales each token's K_nope and V by `weight / rms(latent)`, which kv_b_proj cannot undo per token.
    A latent narrower than the NoPE head (8 < 16) folds the query, so `kv_a_proj_with_mqa` never runs alone: the mean
    latent RMS must still be measured (it once came out 0, and the norm's weight 0 made every logit NaN)."""
    from mla_convert.deepseek import deepseek_closed_form, latent_rms, with_latent_norm

    source = load_causal_lm(pico_folders["mistral"])
    calibration = token_ids(8, 64, seed=1)
    plain = deepseek_closed_form(source, source.config, kv_lora_rank, 8, calibration)
    attention = plain.model.layers[0].self_attn
    assert attention.fold_query == (kv_lora_rank < attention.qk_nope_head_dim)
    weights = latent_rms(plain, calibration)
    with torch.no_grad():
        # the mean latent RMS over the calibration tokens, from the first layer's own inputs
        inputs = plain.model.layers[0].input_layernorm(plain.model.embed_tokens(calibration))
        latent = attention.kv_a_proj_with_mqa(inputs)[..., : attention.kv_lora_rank]
    assert weights[0] == pytest.approx(float(latent.pow(2).mean(-1).sqrt().mean()), rel=1e-5)
    model = with_latent_norm(plain, weights)
    unit = with_latent_norm(plain, [1.0] * plain.config.num_hidden_layers)
    ids = token_ids(2, 40, seed=3)
    with torch.no_grad():
        closed_form = plain(input_ids=ids).logits
        logits = {}
        for path in ("expanded", "absorbed"):
            model.config.attention_path = path
            logits[path] = model(input_ids=ids).logits
        model.config.attention_path = "auto"
        unit_logits = unit(input_ids=ids).logits
    assert relative_error(logits["absorbed"], logits["expanded"]) <= 1e-5
    assert relative_error(logits["expanded"], closed_form) < relative_error(unit_logits, closed_form)


def test_latent_norm_is_exact_where_latent_rms_equals_its_weight(pico_folders):
    """What exactness the norm keeps: on tokens whose latent RMS equals the norm's weight (the mean latent RMS the
    conversion sets), the layer with the norm computes exactly what the norm-free closed form computes; on other
    tokens it does not."""
    from mla_convert.deepseek import deepseek_closed_form, latent_rms, with_latent_norm

    source = load_causal_lm(pico_folders["llama-gqa"])
    calibration = token_ids(8, 64, seed=1)
    plain = deepseek_closed_form(source, source.config, 56, 8, calibration)
    weights = latent_rms(plain, calibration)
    model = with_latent_norm(plain, weights)
    plain_attention, norm_attention = plain.model.layers[0].self_attn, model.model.layers[0].self_attn
    rank = plain_attention.kv_lora_rank

    torch.manual_seed(0)
    # hidden: [1, 12, hidden_size]
    hidden = torch.randn(1, 12, source.config.hidden_size)
    position_embeddings = plain.model.rotary_emb(hidden, torch.arange(12)[None])
    with torch.no_grad():
        # latent: [1, 12, kv_lora_rank], linear in the input (no bias), so scaling each token's input by
        # weight / rms(latent) gives it a latent of RMS equal to the weight
        latent = plain_attention.kv_a_proj_with_mqa(hidden)[..., :rank]
        matched = hidden * weights[0] / latent.pow(2).mean(-1, keepdim=True).sqrt()
        for inputs, exact in ((matched, True), (hidden, False)):
            expected, _ = plain_attention(inputs, position_embeddings)
            actual, _ = norm_attention(inputs, position_embeddings)
            error = relative_error(actual, expected)
            assert error <= 1e-5 if exact else error > 1e-3, error


def test_latent_anchor_changes_nothing_without_the_norm(pico_folders):
    """The anchor dimension is read by nothing (kv_b_proj's column is zero): without the norm the anchored model
    computes what the closed form with one latent dimension less computes, with the cache one number wider."""
    from mla_convert.calibrate import collect_input_moments
    from mla_convert.deepseek import add_latent_anchor, deepseek_closed_form

    source = load_causal_lm(pico_folders["llama-gqa"])
    calibration = token_ids(8, 64, seed=1)
    smaller = deepseek_closed_form(source, source.config, 55, 8, calibration, latent_anchor=False)
    moments, _ = collect_input_moments(source, calibration)
    anchored = add_latent_anchor(smaller, moments, [0, 1])
    assert anchored.config.kv_lora_ranks == [56, 56]
    ids = token_ids(2, 40, seed=3)
    with torch.no_grad():
        assert relative_error(anchored(input_ids=ids).logits, smaller(input_ids=ids).logits) <= 1e-5


def test_anchor_direction_finds_the_constant_component():
    """Inputs with a common component of fixed size along `m` plus noise elsewhere: the anchor lies along `m`, and
    its relative spread is the noise's share along it."""
    from mla_convert.deepseek import anchor_direction

    generator = torch.Generator().manual_seed(0)
    hidden, tokens = 16, 4096
    common = torch.zeros(hidden)
    common[3] = 5.0
    # x: [tokens, hidden], constant 5 along dim 3 up to 1% noise, unit noise elsewhere
    x = torch.randn(tokens, hidden, generator=generator, dtype=torch.float64)
    x[:, 3] = 5.0 * (1 + 0.01 * x[:, 3])
    augmented = torch.cat((x, torch.ones(tokens, 1, dtype=torch.float64)), dim=1)
    direction, spread = anchor_direction(augmented.T @ augmented / tokens)
    assert float(direction.abs().argmax()) == 3
    assert spread == pytest.approx(0.01, rel=0.2)


def test_anchor_direction_of_a_constant_input_is_finite():
    """A component that is constant over the calibration tokens: its variance, a difference of moments, can round a
    little below 0 (E[x^2] < E[x]^2), as on random 1B/8B-shaped sources; the spread along it is 0, not a complex
    number or NaN."""
    import math

    from mla_convert.deepseek import anchor_direction

    # E[[x; 1] [x; 1]^T] of x = (1, noise): E[x_0^2] rounded 1e-12 below E[x_0]^2 = 1
    moment = torch.tensor([[1.0 - 1e-12, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    direction, spread = anchor_direction(moment)
    assert float(direction.abs().argmax()) == 0
    assert isinstance(spread, float) and math.isfinite(spread) and spread == 0.0


def test_plain_config_loads_without_norm():
    """Existing folders (no `kv_latent_norm` in config.json) load as before: no norm, no new weight."""
    from mla_modeling import MLAConfig, MLAForCausalLM

    config = MLAConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
    )
    assert config.kv_latent_norm is False
    assert not any("kv_a_layernorm" in key for key in MLAForCausalLM(config).state_dict())
    # (transformers wraps the config's ValueError in its own validation error)
    with pytest.raises(Exception, match="needs one `kv_lora_rank` for all layers"):
        MLAConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            kv_lora_ranks=[8, 4], qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, kv_latent_norm=True,
        )


# ---------------------------------------------------------------------------------------------------- refusals


def plain_folder(name: str, pico_folders, folder, kv_lora_ranks: list[int], qk_rope_head_dim: int, norm: bool):
    """An MLA folder converted without DeepSeek's RoPE table (free RoRoPE), with these ranks, with or without norm."""
    from mla_convert.assemble import assemble, mla_config
    from mla_convert.calibrate import collect_input_moments
    from mla_convert.decompose import DecomposeOptions, decompose_all
    from mla_convert.deepseek import with_latent_norm
    from mla_convert.plan import RankPlan, SourceShape

    source = load_causal_lm(pico_folders[name])
    shape = SourceShape.from_config(source.config)
    plan = RankPlan(kv_lora_ranks, qk_rope_head_dim, shape.cache_per_layer, exact=False)
    moments, _ = collect_input_moments(source, token_ids(4, 64, seed=1))
    layers = decompose_all(source, shape, moments, plan, DecomposeOptions(), progress=False)
    model = assemble(source, mla_config(source.config, source, plan, layers), layers)
    if norm:
        model = with_latent_norm(model, [1.0] * len(kv_lora_ranks))
    save_mla(model, folder, budget=0.5)


@pytest.fixture(scope="module")
def refused_folders(pico_folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("refused")
    plain_folder("llama-gqa", pico_folders, root / "per-layer", [24, 8], 8, norm=False)
    plain_folder("llama-gqa", pico_folders, root / "plain", [24, 24], 8, norm=False)
    plain_folder("llama-gqa", pico_folders, root / "free-rope", [24, 24], 8, norm=True)
    _, qwen = deepseek_mla("qwen2", pico_folders, 56, 8)
    save_mla(qwen, root / "biases")
    return root


@pytest.mark.parametrize(
    "folder, fragments",
    [
        ("per-layer", ("one kv_lora_rank for all layers",)),
        ("plain", ("no latent norm", "--target deepseek")),
        ("free-rope", ("DeepSeek's table",)),
        ("biases", ("attention biases", "Qwen2", "every attention score would change")),
    ],
)
def test_export_refuses_and_writes_nothing(refused_folders, folder, fragments):
    from mla_convert.export import export_deepseek_v3

    output = refused_folders / f"{folder}-exported"
    before = sorted(path.name for path in refused_folders.iterdir())
    with pytest.raises(MLAConvertError) as error:
        export_deepseek_v3(refused_folders / folder, output)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert not output.exists()
    assert sorted(path.name for path in refused_folders.iterdir()) == before
    assert leftovers(refused_folders) == []


def test_engine_shapes():
    from mla_convert.export import engines_for

    assert any("FlashMLA" in engine for engine in engines_for(512, 64))
    assert any("Triton" in engine for engine in engines_for(256, 64))
    assert engines_for(256, 32) == []


# ---------------------------------------------------------------------------------------- through the command line

# name -> (convert's cache-size flags, the uniform kv_lora_rank and qk_rope_head_dim they give). A budget of 0.5 is
# 64 of MHA's 128 numbers (a RoPE key of head_dim 16 and a latent of 48) and 32 of GQA's 64 (a third of the budget,
# rounded down to a size that divides head_dim: 8, and 24); the GQA Llama is given its shape explicitly.
CLI_SHAPES = {
    "llama-mha": (["--kv-budget", "0.5"], 48, 16),
    "llama-gqa": (["--kv-lora-rank", "24", "--qk-rope-head-dim", "8"], 24, 8),
    "mistral": (["--kv-budget", "0.5"], 24, 8),
}


def native_without_plugin(folder, ids: torch.LongTensor, tmp_path) -> dict:
    """What transformers' own DeepseekV3 computes on `ids` from `folder`, in a Python that cannot import the plugin."""
    ids_path, out_path = tmp_path / "ids.pt", tmp_path / "native.pt"
    torch.save(ids, ids_path)
    arguments = f"import sys\nsys.argv = ['-', {str(folder)!r}, {str(ids_path)!r}, {str(out_path)!r}]\n"
    result = run_without_plugin(arguments + NATIVE_SCRIPT, tmp_path / "hf-home")
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out_path)


def cli_convert_and_export(source, root, size_flags: list[str], wikitext, export_flags=()) -> tuple[object, object, str]:
    """`mla-convert convert --target deepseek` then `mla-convert export`, as a user runs them; returns the MLA
    folder, the exported folder and what export printed. `size_flags` come last, so they may override the rest."""
    mla_folder, exported_folder = root / "mla", root / "deepseek"
    converted = run_cli(
        "convert", str(source), str(mla_folder), "--target", "deepseek", "--calibration", str(wikitext),
        "--calibration-tokens", "2048", "--refine-steps", "10", *size_flags,
    )  # fmt: skip
    assert converted.returncode == 0, converted.stderr[-3000:]
    exported = run_cli("export", str(mla_folder), str(exported_folder), "--format", "deepseek-v3", *export_flags)
    assert exported.returncode == 0, exported.stderr[-3000:]
    return mla_folder, exported_folder, exported.stdout


@pytest.fixture(scope="module", params=sorted(CLI_SHAPES))
def cli_exported(request, pico_folders, wikitext, tmp_path_factory):
    """(name, MLA folder, exported folder, export's output) for each source, made through the command line."""
    name = request.param
    root = tmp_path_factory.mktemp(f"cli-export-{name}")
    # Llama-3 scaling (llama-gqa) is exact in transformers only: engines read it as YaRN
    export_flags = ["--transformers-only"] if name == "llama-gqa" else []
    return name, *cli_convert_and_export(pico_folders[name], root, CLI_SHAPES[name][0], wikitext, export_flags)


def test_cli_conversion_is_deepseek_shaped(cli_exported):
    """`--target deepseek` gives one latent size, DeepSeek's RoPE table and the latent norm, whose weight refinement
    trained (it starts the same in every latent dimension); the report says which target it was."""
    name, mla_folder, _, _ = cli_exported
    _, kv_lora_rank, qk_rope_head_dim = CLI_SHAPES[name]
    report = json.loads((mla_folder / "conversion.json").read_text())
    assert report["target"] == "deepseek" and report["exact"] is False
    assert report["kv_lora_ranks"] == [kv_lora_rank] * 2 and report["qk_rope_head_dim"] == qk_rope_head_dim
    # without --refine-lr, the target's own rate (the plain target's makes most constrained layers worse)
    assert report["refine_lr"] == DEEPSEEK_REFINE_LR < RefineOptions.lr
    mla = load_causal_lm(mla_folder)
    assert mla.config.kv_latent_norm
    assert mla.config.rope_frequency_indices in (None, [deepseek_frequency_indices(16, qk_rope_head_dim)] * 2)
    for layer in mla.model.layers:
        weight = layer.self_attn.kv_a_layernorm.weight.detach()
        assert float(weight.max() - weight.min()) > 0, "refinement left the latent norm's weight untrained"


def test_cli_export_loads_natively_and_matches_mla_folder(cli_exported, tmp_path):
    name, mla_folder, exported_folder, printed = cli_exported
    _, kv_lora_rank, qk_rope_head_dim = CLI_SHAPES[name]
    assert f"{kv_lora_rank + qk_rope_head_dim} numbers per token and layer" in printed
    ids = token_ids(2, 48, seed=11)
    native = native_without_plugin(exported_folder, ids, tmp_path)
    assert native["class"] == "DeepseekV3ForCausalLM" and native["plugin_imported"] == []

    mla = load_causal_lm(mla_folder)
    with torch.no_grad():
        logits = mla(input_ids=ids).logits
        greedy = mla.generate(ids[:1, :16], max_new_tokens=12, do_sample=False)
    error = relative_error(native["logits"], logits)
    assert error <= EXPORT_TOLERANCE, f"{name}: exported logits differ from the MLA folder's by {error:.2e}"
    assert torch.equal(native["greedy"], greedy)
    assert native["cache_latent"].shape[-1] == kv_lora_rank and native["cache_rope"].shape[-1] == qk_rope_head_dim


def test_heal_keeps_and_trains_the_latent_norm(pico_folders, wikitext, tmp_path):
    """`heal --train attention` trains DeepSeek's latent norm with the projections; the healed folder still has it,
    still exports, and its export computes what the healed folder computes."""
    source = pico_folders["llama-gqa"]
    mla_folder, _, _ = cli_convert_and_export(source, tmp_path, CLI_SHAPES["llama-gqa"][0], wikitext, ["--transformers-only"])
    healed, exported = tmp_path / "healed", tmp_path / "healed-deepseek"
    result = run_cli(
        "heal", str(mla_folder), str(healed), "--teacher", str(source), "--data", str(wikitext), "--max-tokens",
        "1024", "--seq-len", "64", "--batch-size", "2", "--eval-tokens", "256", "--train", "attention",
        "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # without --lr, the latent norm's own (smaller) healing rate
    assert json.loads((healed / "healing.json").read_text())["settings"]["lr"] == DEEPSEEK_LR
    before, after = load_causal_lm(mla_folder), load_causal_lm(healed)
    assert after.config.kv_latent_norm
    for old, new in zip(before.model.layers, after.model.layers):
        assert not torch.equal(old.self_attn.kv_a_layernorm.weight, new.self_attn.kv_a_layernorm.weight)

    assert run_cli("export", str(healed), str(exported), "--format", "deepseek-v3", "--transformers-only").returncode == 0
    ids = token_ids(2, 40, seed=5)
    native = native_without_plugin(exported, ids, tmp_path)
    with torch.no_grad():
        logits = after(input_ids=ids).logits
    assert relative_error(native["logits"], logits) <= EXPORT_TOLERANCE


@pytest.mark.real_model
def test_real_model_cli_export_matches_natively(smollm2_folder, wikitext, tmp_path):
    """SmolLM2-135M at 256 + 64 (the shape vLLM's Triton MLA backend serves): convert --target deepseek, export,
    and transformers' own DeepseekV3 gives the MLA folder's logits and greedy tokens."""
    flags = ["--kv-lora-rank", "256", "--qk-rope-head-dim", "64", "--refine-steps", "20", "--key-scale", "1"]
    mla_folder, exported_folder, printed = cli_convert_and_export(
        smollm2_folder, tmp_path, [*flags, "--calibration-tokens", "4096"], wikitext
    )
    assert "Triton MLA backend" in printed
    config = json.loads((exported_folder / "config.json").read_text())
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"], config["qk_nope_head_dim"]) == (256, 64, 64)
    ids = token_ids(2, 64, seed=3, vocab=config["vocab_size"])
    native = native_without_plugin(exported_folder, ids, tmp_path)
    mla = load_causal_lm(mla_folder)
    with torch.no_grad():
        logits = mla(input_ids=ids).logits
        greedy = mla.generate(ids[:1, :16], max_new_tokens=12, do_sample=False)
    assert relative_error(native["logits"], logits) <= EXPORT_TOLERANCE
    assert torch.equal(native["greedy"], greedy)


# ------------------------------------------------------------------------------------- one model in every engine


def small_norm_inputs_folder(folder, rms_norm_eps: float = 1e-5) -> torch.nn.Module:
    """An MLA folder (DeepSeek-constrained, from a pico Llama with `rms_norm_eps`) whose every RMSNorm sees inputs
    of mean square near the epsilons (the latent rows scaled by 3e-3, the residual stream by 1e-2): a model whose
    outputs depend on each norm's epsilon, as a real conversion's do on the tokens whose latent RMS is small."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import pico_model
    from mla_convert.deepseek import build_deepseek_mla

    source = pico_model(LlamaConfig, LlamaForCausalLM, num_key_value_heads=4, rms_norm_eps=rms_norm_eps)
    model = build_deepseek_mla(source, source.config, 112, 16, token_ids(8, 64, seed=1))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e-2)
        for layer in model.model.layers:
            layer.self_attn.kv_a_proj_with_mqa.weight[:112].mul_(3e-3)
            layer.self_attn.o_proj.weight.mul_(1e-2)
            layer.mlp.down_proj.weight.mul_(1e-2)
    save_mla(model, folder)
    return load_causal_lm(folder)


def test_export_is_the_same_model_whatever_eps_the_engine_gives_the_latent_norm(tmp_path):
    """transformers' DeepseekV3 builds `kv_a_layernorm` with eps 1e-6, vLLM and SGLang with `rms_norm_eps`: the
    export computes the MLA folder's logits under both readings (its norms' inputs are small enough that a wrong
    epsilon shows), and its `rms_norm_eps` is the latent norm's epsilon, so the two readings are one model."""
    from transformers import DeepseekV3ForCausalLM

    from mla_convert.export import export_deepseek_v3

    mla = small_norm_inputs_folder(tmp_path / "mla")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        export_deepseek_v3(tmp_path / "mla", tmp_path / "deepseek")
    ids = token_ids(2, 40, seed=5)
    with torch.no_grad():
        expected = mla(input_ids=ids).logits
        exported = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "deepseek", dtype=torch.float32).eval()
        as_transformers = exported(input_ids=ids).logits
        # vLLM's reading: every RMSNorm, the latent one included, with config.rms_norm_eps
        for layer in exported.model.layers:
            layer.self_attn.kv_a_layernorm.variance_epsilon = exported.config.rms_norm_eps
        as_vllm = exported(input_ids=ids).logits
    assert relative_error(as_transformers, expected) <= 1e-5
    assert relative_error(as_vllm, expected) <= 1e-5


# ------------------------------------------------------------------------------- streamed, sharded; bad folders


@pytest.fixture(scope="module")
def mla_folder(pico_folders, tmp_path_factory):
    """A DeepSeek-constrained MLA folder of the pico MHA Llama (112 + 16), and its logits on fixed ids."""
    folder = tmp_path_factory.mktemp("streamed") / "mla"
    _, model = deepseek_mla("llama-mha", pico_folders, *SHAPES["llama-mha"])
    save_mla(model, folder)
    return folder


def folder_hashes(folder) -> dict[str, str]:
    import hashlib

    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir()) if path.is_file()}


def test_sharded_export_loads_as_deepseek_with_equal_logits(mla_folder, tmp_path):
    """`export --max-shard-size` writes the tensors into several shards with their index, and the sharded folder
    loads as DeepseekV3ForCausalLM with the MLA folder's logits (and exactly the one-file export's)."""
    from transformers import DeepseekV3ForCausalLM

    sharded, single = tmp_path / "sharded", tmp_path / "single"
    result = run_cli("export", str(mla_folder), str(sharded), "--format", "deepseek-v3", "--max-shard-size", "60KB")
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_cli("export", str(mla_folder), str(single), "--format", "deepseek-v3").returncode == 0
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(path.name for path in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert not (sharded / "model.safetensors").exists() and (single / "model.safetensors").is_file()
    for path in sharded.glob("*.safetensors"):
        # a tensor larger than the limit gets a shard of its own; every other shard keeps under it
        assert path.stat().st_size <= 60_000 + 4096 or len([n for n, f in index["weight_map"].items() if f == path.name]) == 1

    ids = token_ids(2, 40, seed=9)
    with torch.no_grad():
        expected = load_causal_lm(mla_folder)(input_ids=ids).logits
        logits = {}
        for name, folder in (("sharded", sharded), ("single", single)):
            model = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            logits[name] = model(input_ids=ids).logits
    assert relative_error(logits["sharded"], expected) <= EXPORT_TOLERANCE
    assert torch.equal(logits["sharded"], logits["single"])


def broken_copy(mla_folder, tmp_path, damage) -> "Path":
    """A copy of `mla_folder` with `damage(copy)` applied."""
    import shutil

    copy = tmp_path / "broken-mla"
    shutil.copytree(mla_folder, copy)
    damage(copy)
    return copy


def with_nan(folder) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def truncated(folder) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def mismatched_config(folder) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "damage, fragments",
    [
        (with_nan, ("NaN", "model.layers.1.mlp.up_proj.weight")),
        (truncated, ("corrupt or truncated",)),
        (mismatched_config, ("config.json does not match the weights",)),
    ],
    ids=["nan", "truncated", "config-mismatch"],
)
def test_export_refuses_broken_folder_in_one_line(mla_folder, tmp_path, damage, fragments):
    """A NaN weight, a truncated model.safetensors or a config.json that does not match the weights: exit 2, one
    line, nothing written, the folder unchanged."""
    from conftest import assert_clean_failure

    folder = broken_copy(mla_folder, tmp_path, damage)
    before = folder_hashes(folder)
    output = tmp_path / "exported"
    assert_clean_failure(run_cli("export", str(folder), str(output), "--format", "deepseek-v3"), *fragments)
    assert not output.exists() and leftovers(tmp_path) == []
    assert folder_hashes(folder) == before


def test_export_checks_free_space(mla_folder, tmp_path, monkeypatch):
    """Too little free space beside OUTPUT for the weights: refused before anything is written."""
    from collections import namedtuple

    from mla_convert import folders
    from mla_convert.export import export_deepseek_v3

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(folders.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    output = tmp_path / "exported"
    with pytest.raises(MLAConvertError, match="not enough free space"):
        export_deepseek_v3(mla_folder, output)
    assert not output.exists() and leftovers(tmp_path) == []


def test_export_refuses_rope_engines_cannot_read(pico_folders, tmp_path):
    """A Llama-3-scaled source: vLLM and SGLang read every scaled RoPE as DeepSeek-YaRN, so the export is refused in
    one line naming what to do (nothing written), and written with --transformers-only."""
    from conftest import assert_clean_failure

    _, model = deepseek_mla("llama-gqa", pico_folders, *SHAPES["llama-gqa"])
    save_mla(model, tmp_path / "mla")
    before = folder_hashes(tmp_path / "mla")
    refused = run_cli("export", str(tmp_path / "mla"), str(tmp_path / "out"), "--format", "deepseek-v3")
    assert_clean_failure(refused, "'llama3'", "DeepSeek-YaRN", "--transformers-only")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert folder_hashes(tmp_path / "mla") == before
    allowed = run_cli("export", str(tmp_path / "mla"), str(tmp_path / "out"), "--format", "deepseek-v3", "--transformers-only")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "DeepSeek-YaRN" in (tmp_path / "out" / "README.md").read_text()
