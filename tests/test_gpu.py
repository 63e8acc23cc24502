"""On a CUDA device, in bfloat16 and float16 (where the device supports them), with sdpa and, where installed,
flash attention: a converted pico model against its source, absorbed against expanded decoding, generation over
the latent cache, and a few healing steps with `--mixed-precision bf16`. Skipped without CUDA; `MLA_TEST_DEVICE`
picks the device (scripts/gpu_check.sh runs these)."""

import importlib.util

import pytest
import torch

import mla_modeling  # noqa: F401  (registers the MLA model with the Auto classes)
from mla_convert.convert import ConversionOptions, convert
from mla_convert.heal import HealOptions, heal

from conftest import device_under_test, load_causal_lm, relative_error, token_ids


DEVICE = device_under_test()
pytestmark = pytest.mark.skipif(
    DEVICE.type != "cuda", reason="needs a CUDA device (scripts/gpu_check.sh runs these on a GPU machine)"
)


def supported_dtypes() -> list:
    if DEVICE.type != "cuda":
        return [torch.bfloat16, torch.float16]  # skipped anyway; the ids stay the same everywhere
    return [torch.float16] + ([torch.bfloat16] if torch.cuda.is_bf16_supported() else [])


IMPLEMENTATIONS = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
# Relative error of logits in 16 bits against float32 on the pico model: a few units of the format's epsilon
# times the depth, with room. float16 has 3 more mantissa bits than bfloat16.
TOLERANCE = {torch.bfloat16: 6e-2, torch.float16: 1e-2}


@pytest.fixture(scope="module")
def exact(pico_folders, tmp_path_factory):
    """llama-gqa converted at the full budget (the exact form), calibrated on samples from the source itself."""
    out = tmp_path_factory.mktemp("gpu-exact") / "mla"
    convert(str(pico_folders["llama-gqa"]), out, ConversionOptions(kv_budget=1.0, refine_steps=0))
    return out


def on_device(folder, dtype, implementation="sdpa"):
    model = load_causal_lm(folder, attn_implementation=implementation).to(DEVICE, dtype)
    return model


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", supported_dtypes(), ids=str)
def test_converted_logits_match_the_source(exact, pico_folders, dtype, implementation):
    input_ids = token_ids(2, 48).to(DEVICE)
    with torch.no_grad():
        reference = load_causal_lm(pico_folders["llama-gqa"]).to(DEVICE)(input_ids).logits.float()
        logits = on_device(exact, dtype, implementation)(input_ids).logits.float()
        source = on_device(pico_folders["llama-gqa"], dtype, implementation)(input_ids).logits.float()
    assert torch.isfinite(logits).all()
    # the conversion adds no more error than running the source itself in this dtype
    error, source_error = relative_error(logits, reference), relative_error(source, reference)
    assert error < TOLERANCE[dtype] and error < 3 * source_error + 1e-3, (error, source_error)


@torch.no_grad()
def decode(model, input_ids, prefill: int) -> torch.Tensor:
    outputs = model(input_ids[:, :prefill], use_cache=True)
    cache, logits = outputs.past_key_values, [outputs.logits[:, -1]]
    for position in range(prefill, input_ids.shape[1]):
        outputs = model(input_ids[:, position : position + 1], past_key_values=cache, use_cache=True)
        logits.append(outputs.logits[:, -1])
    return torch.stack(logits, dim=1).float()


@pytest.mark.parametrize("dtype", supported_dtypes(), ids=str)
def test_absorbed_decoding_equals_expanded(exact, dtype):
    input_ids = token_ids(2, 40).to(DEVICE)
    model = on_device(exact, dtype)
    model.config.attention_path = "absorbed"
    absorbed = decode(model, input_ids, prefill=16)
    model.config.attention_path = "expanded"
    expanded = decode(model, input_ids, prefill=16)
    with torch.no_grad():
        full = model(input_ids, use_cache=False).logits[:, 15:].float()
    assert torch.isfinite(absorbed).all()
    assert relative_error(absorbed, expanded) < TOLERANCE[dtype]
    assert relative_error(absorbed, full) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", supported_dtypes(), ids=str)
def test_generate_over_the_latent_cache(exact, dtype):
    model = on_device(exact, dtype)
    input_ids = token_ids(1, 12).to(DEVICE)
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=12, do_sample=False,
                         eos_token_id=None, return_dict_in_generate=True, output_scores=True)  # fmt: skip
    assert out.sequences.shape == (1, 24) and torch.equal(out.sequences[:, :12], input_ids)
    assert type(out.past_key_values.layers[0]).__name__.startswith("MLA")  # the latent cache, not a K/V one
    with torch.no_grad():
        logits = model(out.sequences[:, :-1], use_cache=False).logits[:, 11:].float()
    # greedy picks over the cache agree with a forward without it (within 16-bit rounding of the scores)
    scores = torch.stack(out.scores, dim=1).float()
    assert relative_error(scores, logits) < TOLERANCE[dtype]


def test_a_few_healing_steps_in_bf16(pico_folders, wikitext, tmp_path_factory):
    if not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name(DEVICE)} has no bfloat16")
    student = tmp_path_factory.mktemp("gpu-heal") / "mla"
    convert(str(pico_folders["llama-gqa"]), student, ConversionOptions(kv_budget=0.25, calibration=str(wikitext),
            calibration_tokens=2048, calibration_seq_len=128, refine_steps=0, key_scale=1.0,
            rank_allocation="uniform"))  # fmt: skip
    options = HealOptions(teacher=str(pico_folders["llama-gqa"]), data=str(wikitext), max_tokens=8 * 4 * 64,
                          seq_len=64, batch_size=4, lr=1e-3, eval_every=4, eval_tokens=2048, save_every=3,
                          mixed_precision="bf16", teacher_dtype="bfloat16", gradient_checkpointing=True,
                          progress=False)  # fmt: skip
    report = heal(student, tmp_path_factory.mktemp("gpu-healed") / "healed", options)
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in report["curve"])
    assert report["eval"][-1]["kl"] < 0.9 * report["eval"][0]["kl"], [e["kl"] for e in report["eval"]]
