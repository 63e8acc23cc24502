"""Checkpoints of a healing run: accelerate's state (trained weights only, optimizer, scheduler, RNG) plus the run's
own state (`HealState`: step, data position, curves), written so that a kill never leaves a half-written one, and
read back with one clear line when a file is damaged."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import MLAConvertError
from .packing import DataPosition


STATE_FILE = "heal_state.json"
TRAINABLE_FILE = "trainable.safetensors"
CHECKPOINT_PREFIX = "step-"
PARTIAL_SUFFIX = ".partial"
# Inside every checkpoint heal writes, before anything else: only folders with it (and our exact names) are ever
# resumed from or deleted, whatever else a user keeps in --checkpoint-dir.
CHECKPOINT_MARKER = ".mla-convert-checkpoint"
CHECKPOINT_MARKER_TEXT = '{"written_by": "mla-convert heal", "what": "a healing checkpoint"}\n'
# What `save_checkpoint` names a checkpoint: step-00000020
CHECKPOINT_NAME = re.compile(rf"{re.escape(CHECKPOINT_PREFIX)}(\d{{8}})")
# Settings that decide the training trajectory: a resumed run must use the same ones.
TRAJECTORY_SETTINGS = (
    "student",
    "teacher",
    "teacher_gguf_file",
    "teacher_dtype",
    "data",
    "text_column",
    "max_tokens",
    "seq_len",
    "global_batch",
    "grad_accum",
    "lr",
    "warmup_steps",
    "schedule",
    "weight_decay",
    "max_grad_norm",
    "train",
    "kl_weight",
    "mixed_precision",
    "seed",
)
# Settings that are paths (or hub names): the same file written relative once and absolute once is the same.
PATH_SETTINGS = ("student", "teacher", "data", "eval_data")


@dataclass
class HealState:
    """What a run has done so far: all a checkpoint holds beside accelerate's state, and what the report shows."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    curve: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    runs: list[dict] = field(default_factory=list)

    def to_json(self, settings: dict) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.step * settings["tokens_per_step"],
            "position": asdict(self.position),
            "settings": settings,
            "curve": self.curve,
            "eval": self.evals,
            "train_seconds": self.train_seconds,
            "runs": self.runs,
        }

    @classmethod
    def from_json(cls, state: dict) -> HealState:
        return cls(
            state["step"],
            DataPosition(**state["position"]),
            state["curve"],
            state["eval"],
            state["train_seconds"],
            state["runs"],
        )


def default_checkpoint_dir(output: str | os.PathLike) -> Path:
    output = Path(output).absolute()
    return output.parent / f"{output.name}.checkpoints"


def is_our_checkpoint(path: Path) -> bool:
    """Whether `path` is a folder heal wrote as a checkpoint: it holds our marker (or, written before the marker
    existed, a heal_state.json with a step and the run's settings). A user's folder of a similar name is not."""
    if path.is_symlink() or not path.is_dir():
        return False
    marker = path / CHECKPOINT_MARKER
    try:
        if marker.is_file() and not marker.is_symlink() and marker.stat().st_size < 4096:
            return marker.read_text(encoding="utf-8") == CHECKPOINT_MARKER_TEXT
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("settings"), dict)


def _checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_NAME.fullmatch(path.name)
    if match is None or not (path / STATE_FILE).is_file() or not is_our_checkpoint(path):
        return None
    return int(match.group(1))


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Checkpoints that were written in full, oldest first (a save cut short is left as a `.partial` folder)."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(step, p) for p in checkpoint_dir.iterdir() if p.is_dir() and (step := _checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


def save_checkpoint(accelerator, checkpoint_dir: Path, step: int, state: dict) -> None:
    """accelerate's state (trained weights, optimizer, scheduler, RNG) plus our `heal_state.json`, written under a
    `.partial` name and renamed once complete, so a kill during the save leaves the previous checkpoint usable."""
    final = checkpoint_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    if accelerator.is_main_process:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for path in (partial, final):
            if path.exists() and not is_our_checkpoint(path):
                raise MLAConvertError(
                    f"{path} is in the way of a checkpoint and was not written by heal: move it, or pass another "
                    "--checkpoint-dir"
                )
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        # first, so that a save killed half-way leaves a folder the next run may remove
        (partial / CHECKPOINT_MARKER).write_text(CHECKPOINT_MARKER_TEXT, encoding="utf-8")
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps(state) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in complete_checkpoints(checkpoint_dir):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def remove_checkpoints(checkpoint_dir: Path) -> None:
    """Removes the checkpoints heal wrote there, complete or cut short (our names, our marker), and the folder if
    nothing else is in it: never anything else a user put there."""
    if not checkpoint_dir.is_dir():
        return
    for path in checkpoint_dir.iterdir():
        name = path.name.removesuffix(PARTIAL_SUFFIX)
        if CHECKPOINT_NAME.fullmatch(name) and is_our_checkpoint(path):
            shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        checkpoint_dir.rmdir()


def register_weight_hooks(accelerator, model, trainable: list[str]) -> None:
    """Checkpoints hold only the trained parameters (a tenth of the model for attention-only healing), by name of
    the unwrapped model, so a checkpoint resumes under any number of processes. Not under FSDP/DeepSpeed, whose
    own sharded formats accelerate writes."""
    from accelerate.utils import DistributedType
    from safetensors.torch import load_file, save_file

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return
    unwrapped = accelerator.unwrap_model(model)

    def ours(candidate) -> bool:  # accelerate keeps the model it was given, not the DDP wrapper it returned
        return accelerator.unwrap_model(candidate) is unwrapped

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            parameters = dict(unwrapped.named_parameters())
            tensors = OrderedDict((name, parameters[name].detach().cpu().contiguous()) for name in trainable)
            save_file(tensors, os.path.join(output_dir, TRAINABLE_FILE), metadata={"format": "pt"})
        # Leave `models` alone (it is accelerate's own list); without its weights accelerate writes no model file,
        # which would repeat the frozen weights.
        weights.pop(next(i for i, m in enumerate(models) if ours(m)))

    def load_hook(models, input_dir):
        tensors = load_file(os.path.join(input_dir, TRAINABLE_FILE))
        if sorted(tensors) != sorted(trainable):
            raise MLAConvertError(
                f"the checkpoint in {input_dir} holds other parameters than this run trains: was it made with "
                "another --train setting or student?"
            )
        parameters = dict(unwrapped.named_parameters())
        with torch.no_grad():
            for name, tensor in tensors.items():
                parameters[name].copy_(tensor)
        models[:] = [m for m in models if not ours(m)]

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _start_over(checkpoint_dir: Path) -> str:
    return f"delete {checkpoint_dir} (or pass --overwrite instead of --resume) to start over"


def read_checkpoint(checkpoint: Path) -> tuple[HealState, dict]:
    """The run state and settings of a checkpoint, after checking that every file in it is whole: a damaged file
    is named in one line, with how to start over, instead of failing deep inside accelerate or torch."""
    from safetensors import SafetensorError, safe_open

    start_over = _start_over(checkpoint.parent)
    # sharded checkpoints keep their files in folders (pytorch_model_fsdp_0/__0_0.distcp, ...)
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        damaged = None
        if path.stat().st_size == 0:
            damaged = "it is empty"
        elif path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    f.keys()
            except (SafetensorError, OSError) as e:
                damaged = str(e)
        elif path.suffix in (".bin", ".pkl", ".pt") and not zipfile.is_zipfile(path):
            damaged = "it is truncated or not a torch file"
        if damaged:
            raise MLAConvertError(f"--resume: the checkpoint file {path} is damaged ({damaged}): {start_over}")
    path = checkpoint / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        return HealState.from_json(state), state["settings"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise MLAConvertError(f"--resume: the checkpoint file {path} is damaged ({e!r}): {start_over}") from e


def same_path(a, b) -> bool:
    """Whether two settings name the same file or folder (resolved where they exist here), or the same hub name."""

    def resolved(value):
        path = Path(os.fspath(value)).expanduser() if isinstance(value, (str, os.PathLike)) else None
        return str(path.resolve()) if path is not None and path.exists() else value

    return resolved(a) == resolved(b)


def check_same_settings(checkpoint: Path, saved: dict, settings: dict) -> None:
    changed = [
        f"{key} ({saved.get(key)!r} -> {settings[key]!r})"
        for key in TRAJECTORY_SETTINGS
        if not (same_path(saved.get(key), settings[key]) if key in PATH_SETTINGS else saved.get(key) == settings[key])
    ]
    if changed:
        raise MLAConvertError(
            f"--resume: the checkpoint {checkpoint} was made with other settings: {', '.join(changed)}; resume "
            "with the same ones (the batch size per process may change with the number of processes)"
        )


# How checkpoints written before the format was recorded hold the model.
DEFAULT_CHECKPOINT_FORMAT = "trained-parameters"
FORMAT_NAMES = {
    "fsdp": "FSDP's sharded state",
    "deepspeed": "DeepSpeed's sharded state",
    "trained-parameters": "the trained parameters of a data-parallel run",
}


def check_same_format(checkpoint: Path, saved: dict, settings: dict) -> None:
    """A sharded checkpoint resumes only under the same sharding (FSDP or DeepSpeed), and a data-parallel one only
    without sharding: the files are different, and accelerate would fail deep inside torch or DeepSpeed."""
    saved_format = saved.get("checkpoint_format", DEFAULT_CHECKPOINT_FORMAT)
    if saved_format != settings["checkpoint_format"]:
        raise MLAConvertError(
            f"--resume: the checkpoint {checkpoint} holds {FORMAT_NAMES.get(saved_format, saved_format)} and this "
            f"run is set up for {FORMAT_NAMES[settings['checkpoint_format']]}: resume with the accelerate config "
            "that wrote it"
        )


def load_checkpoint(accelerator, checkpoint: Path) -> None:
    """accelerate's state from a checkpoint whose files `read_checkpoint` found whole; what still fails to load
    (a file cut short inside a valid archive) gets the same one line."""
    import pickle

    from safetensors import SafetensorError
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        accelerator.load_state(str(checkpoint))
    except MLAConvertError:
        raise
    except CheckpointException as e:  # a sharded checkpoint (FSDP); a BaseException, and its text is tracebacks
        # torch keeps each process's failure as (exception, frames)
        failures = "; ".join(
            f"process {rank}: {_first_line(error[0] if isinstance(error, tuple) else error)}"
            for rank, error in sorted(e.failures.items())
        )
        raise MLAConvertError(
            f"--resume: the sharded checkpoint {checkpoint} could not be loaded ({failures}): "
            f"{_start_over(checkpoint.parent)}"
        ) from e
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, SafetensorError, pickle.UnpicklingError) as e:
        raise MLAConvertError(
            f"--resume: the checkpoint {checkpoint} could not be loaded ({_first_line(e)}): "
            f"{_start_over(checkpoint.parent)}"
        ) from e


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
