"""`heal`: checks, data and models, then the training loop around a `HealState`, then the healed folder."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..data import CALIBRATION_PART, TextStream, open_text_stream
from ..errors import MLAConvertError
from .checkpoints import (
    HealState,
    check_same_format,
    check_same_settings,
    complete_checkpoints,
    default_checkpoint_dir,
    load_checkpoint,
    read_checkpoint,
    register_weight_hooks,
    remove_checkpoints,
    save_checkpoint,
)
from .evaluation import evaluate_held_out, held_out_sequences
from .loss import distillation_loss, log_softmax_
from .models import (
    CONVERSION_REPORT,
    check_same_tokenizer,
    check_teacher_is_source,
    check_vocabularies,
    load_teacher,
    select_trainable,
    vocab_size,
    warn_beyond_positions,
)
from .options import HealOptions, check_options, heal_lr
from .packing import SequencePacker
from .report import PLOT_FILE, REPORT_FILE, build_report, write_plot


logger = logging.getLogger(__name__)

# Cosine decay ends at this fraction of the peak learning rate.
MIN_LR_RATIO = 0.1


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str) -> Callable[[int], float]:
    """Linear warmup over `warmup_steps`, then constant or a cosine decay to `MIN_LR_RATIO` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_accelerator(options: HealOptions):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # A single process may heal several times with different settings (accelerate's state is a singleton
        # that refuses a second mixed precision); under a launcher the state is the launcher's and stays.
        AcceleratorState._reset_state(reset_partial_state=True)
    # Without cpu=True accelerate runs every process of a multi-process CPU launch as a lone one.
    cpu = not torch.accelerator.is_available()
    try:
        accelerator = Accelerator(cpu=cpu, mixed_precision=options.mixed_precision)
    except ValueError as e:
        raise MLAConvertError(f"accelerate cannot run with --mixed-precision {options.mixed_precision}: {e}") from e
    warn_unsharded(accelerator)
    return accelerator


def warn_unsharded(accelerator) -> None:
    """accelerate (1.16) picks FSDP or DeepSpeed only for GPUs (and other accelerators): with CPU processes a
    sharded config silently becomes plain data parallelism. The result is the same, the memory is not."""
    from accelerate.utils import DistributedType

    asked = [name for name, flag in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
             if os.environ.get(flag, "false").lower() == "true"]  # fmt: skip
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if asked and not sharded and accelerator.is_main_process:
        how = "one process" if accelerator.num_processes == 1 else "plain data parallelism"
        logger.warning(
            "the accelerate config asks for %s, but accelerate runs these %s processes as %s: every process holds "
            "the whole student (accelerate shards only on GPUs and other accelerators)",
            asked[0], accelerator.device.type, how,
        )  # fmt: skip


def checkpoint_format(accelerator) -> str:
    """How this run's checkpoints hold the model: accelerate's sharded FSDP or DeepSpeed state, or our file of the
    trained parameters (any number of plain data-parallel processes). A checkpoint resumes only in its own format."""
    from accelerate.utils import DistributedType

    return {DistributedType.FSDP: "fsdp", DistributedType.DEEPSPEED: "deepspeed"}.get(
        accelerator.distributed_type, "trained-parameters"
    )


def on_main_process(accelerator, check: Callable[[], object]):
    """Runs `check` on the main process only (it may clean up beside OUTPUT) and raises its `MLAConvertError` on
    every process, so that all of them stop with the same line instead of waiting for each other."""
    from accelerate.utils import broadcast_object_list

    outcome = [None, None]
    if accelerator.is_main_process:
        try:
            outcome[0] = check()
        except MLAConvertError as error:
            outcome[1] = str(error)
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    if outcome[1] is not None:
        raise MLAConvertError(outcome[1])
    return outcome[0]


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def prepare_paths(student: str, output, options: HealOptions) -> tuple[Path, Path, list[Path]]:
    """OUTPUT and the checkpoint folder, checked before anything is loaded: neither may be, hold or lie inside an
    input (nor each other), and checkpoints of an earlier run are resumed or discarded only when asked to."""
    from ..folders import check_disjoint, prepare_output
    from ..sources import SIDE_FILES_ALLOWANCE

    inputs = {"student": student, "teacher": options.teacher, "training data": options.data}
    inputs["held-out data"] = options.eval_data
    # the healed folder is the student's size (the same tensors in the same dtype, its tokenizer, configs, modeling
    # files and conversion.json), plus the report and its plot
    files = [path for path in Path(student).iterdir() if path.is_file()] if Path(student).is_dir() else []
    size = sum(path.stat().st_size for path in files) + SIDE_FILES_ALLOWANCE
    output = prepare_output(output, inputs=inputs, overwrite=options.overwrite, force=options.force, required_bytes=size)
    checkpoint_dir = default_checkpoint_dir(output)
    if options.checkpoint_dir:
        checkpoint_dir = Path(options.checkpoint_dir).expanduser().absolute()
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        if not options.checkpoint_dir:
            raise MLAConvertError(
                f"{checkpoint_dir}, where checkpoints go by default (OUTPUT.checkpoints), is a file, not a folder: "
                "move it, or name another folder with --checkpoint-dir"
            )
        raise MLAConvertError(f"--checkpoint-dir {checkpoint_dir} is a file, not a folder: name a folder")
    check_disjoint(checkpoint_dir, inputs, "--checkpoint-dir")
    if _overlaps(checkpoint_dir, output):
        raise MLAConvertError(f"--checkpoint-dir {checkpoint_dir} overlaps OUTPUT {output}: keep them apart")
    existing = complete_checkpoints(checkpoint_dir)
    if options.resume and not existing:
        raise MLAConvertError(
            f"--resume: no checkpoint to resume from in {checkpoint_dir} (checkpoints are written every "
            "--save-every steps; pass --checkpoint-dir if they are elsewhere)"
        )
    if existing and not options.resume and not options.overwrite:
        raise MLAConvertError(
            f"{checkpoint_dir} holds checkpoints of an earlier run (up to {existing[-1].name}): pass --resume to "
            "continue it, or --overwrite to discard them and start over"
        )
    return output, checkpoint_dir, existing


@dataclass
class HealData:
    stream: TextStream
    eval_sequences: torch.LongTensor
    eval_description: str


def prepare_data(tokenizer, options: HealOptions) -> HealData:
    """The training stream (checked to give at least one window) and the held-out sequences."""
    stream = open_text_stream(options.data, CALIBRATION_PART, options.text_column)
    next(iter(SequencePacker(stream, tokenizer, options.seq_len)))  # empty or too short: fail now
    eval_seq_len = options.eval_seq_len or options.seq_len
    eval_data = options.eval_data or options.data
    sequences, description = held_out_sequences(
        tokenizer, eval_data, options.text_column, eval_seq_len, options.eval_tokens,
        "--eval-seq-len" if options.eval_seq_len else "--seq-len",
    )  # fmt: skip
    return HealData(stream, sequences, description)


def trajectory_settings(student: str, options: HealOptions, world: int, eval_tokens: int) -> dict:
    global_batch = options.batch_size * world
    tokens_per_step = options.seq_len * global_batch * options.grad_accum
    total_steps = max(1, math.ceil(options.max_tokens / tokens_per_step))
    warmup = options.warmup_steps if options.warmup_steps is not None else min(100, max(1, round(total_steps / 10)))
    return {
        "student": student,
        "teacher": str(options.teacher),
        "teacher_gguf_file": options.teacher_gguf_file,
        "teacher_dtype": options.teacher_dtype,
        "data": str(options.data),
        "text_column": options.text_column,
        "max_tokens": options.max_tokens,
        "seq_len": options.seq_len,
        "global_batch": global_batch,
        "batch_size": options.batch_size,
        "grad_accum": options.grad_accum,
        "lr": options.lr,
        "warmup_steps": warmup,
        "schedule": options.schedule,
        "weight_decay": options.weight_decay,
        "max_grad_norm": options.max_grad_norm,
        "train": options.train,
        "kl_weight": options.kl_weight,
        "mixed_precision": options.mixed_precision,
        "seed": options.seed,
        "gradient_checkpointing": options.gradient_checkpointing,
        "eval_data": str(options.eval_data or options.data),
        "eval_precision": options.eval_precision,
        "eval_tokens": eval_tokens,
        "eval_seq_len": options.eval_seq_len or options.seq_len,
        "num_processes": world,
        "tokens_per_step": tokens_per_step,
        "total_steps": total_steps,
    }


@dataclass
class Run:
    """The objects of one training run, built once by `prepare_run`."""

    accelerator: object
    options: HealOptions
    settings: dict
    model: torch.nn.Module
    teacher: torch.nn.Module
    eval_teacher: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    trained_parameters: list[torch.nn.Parameter]
    tokenizer: object
    data: HealData
    checkpoint_dir: Path


def prepare_run(accelerator, model, teacher, tokenizer, data: HealData, options: HealOptions, settings: dict,
                checkpoint_dir: Path) -> Run:  # fmt: skip
    from accelerate.utils import set_seed

    set_seed(options.seed)
    trainable = select_trainable(model, options.train)
    model.config.use_cache = False
    if options.gradient_checkpointing:
        # Non-reentrant: correct with frozen embeddings (attention-only healing), under autocast and under FSDP.
        # (transformers 5.24 renamed gradient_checkpointing_enable, which 5.23 still has alone)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    model.train()
    eval_teacher = teacher
    if options.eval_precision == "float32" and teacher.dtype != torch.float32:
        eval_teacher = load_teacher(options, torch.float32, accelerator.device)[0]
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=options.lr, betas=(0.9, 0.95), weight_decay=options.weight_decay)
    # Not passed to prepare(): accelerate would step it once per process. Registered for save_state instead.
    schedule = lr_lambda(settings["total_steps"], settings["warmup_steps"], options.schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    configure_deepspeed(accelerator, options)
    # Only the student is prepared (sharded under FSDP/DeepSpeed). The teacher never goes through prepare():
    # accelerate would count it as a trained model (checkpointed, clipped, synchronised), and sharding it would
    # all-gather every teacher layer at every micro-step. It stays whole on every process, frozen, in
    # --teacher-dtype, run under inference_mode: 2 bytes a parameter in bfloat16 against the 16 (weights,
    # gradients, AdamW moments in float32) a student parameter costs before sharding.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    register_weight_hooks(accelerator, model, trainable)
    trained = [p for p in model.parameters() if p.requires_grad]
    return Run(accelerator, options, settings, model, teacher, eval_teacher, optimizer, scheduler, trained, tokenizer,
               data, checkpoint_dir)  # fmt: skip


def configure_deepspeed(accelerator, options: HealOptions) -> None:
    """What DeepSpeed's config leaves to the script ("auto"), from heal's options: there is no dataloader for
    accelerate to read the batch size from, and clipping is the engine's (heal's own clipping is skipped there)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = options.batch_size
    # heal accumulates by itself (a boundary per optimizer step, below): the engine must not divide again
    config["gradient_accumulation_steps"] = 1
    config["gradient_clipping"] = options.max_grad_norm or 0.0
    config["train_batch_size"] = options.batch_size * accelerator.num_processes


def start_or_resume(run: Run, existing: list[Path]) -> HealState:
    """A fresh state (discarding an earlier run's checkpoints under --overwrite), or the latest checkpoint's."""
    accelerator, options = run.accelerator, run.options
    state = HealState()
    if existing and not options.resume:  # --overwrite
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            remove_checkpoints(run.checkpoint_dir)
        accelerator.wait_for_everyone()
    elif options.resume:
        latest = existing[-1]
        state, saved_settings = read_checkpoint(latest)
        check_same_settings(latest, saved_settings, run.settings)
        check_same_format(latest, saved_settings, run.settings)
        load_checkpoint(accelerator, latest)
        if accelerator.is_main_process:
            logger.warning("resuming from %s (step %d of %d)", latest, state.step, run.settings["total_steps"])
    state.runs.append({"start_step": state.step, "num_processes": accelerator.num_processes,
                       "batch_size": options.batch_size})  # fmt: skip
    return state


def evaluate_now(run: Run, state: HealState) -> None:
    if state.evals and state.evals[-1]["step"] == state.step:
        return
    options = run.options
    result = evaluate_held_out(
        run.accelerator,
        run.model,
        run.eval_teacher,
        run.data.eval_sequences,
        options.eval_batch_size or options.batch_size,
        full_precision=options.eval_precision == "float32",
    )
    state.evals.append({"step": state.step, "tokens_seen": state.step * run.settings["tokens_per_step"], **result})
    if run.accelerator.is_main_process:
        logger.info("step %d: held-out %s", state.step, result)


def evaluation_due(run: Run, step: int) -> bool:
    if step == run.settings["total_steps"] or (run.options.eval_every and step % run.options.eval_every == 0):
        return True
    per_step = run.settings["tokens_per_step"]
    return any(step * per_step - per_step < t <= step * per_step for t in run.options.eval_at_tokens)


def train_step(run: Run, windows: Iterator[list[int]]) -> dict:
    """One optimizer step over `grad_accum` micro-batches; every process takes its slice of each global batch.
    Returns the step's curve row (without step and tokens)."""
    accelerator, options = run.accelerator, run.options
    global_batch, rank, batch_size = run.settings["global_batch"], accelerator.process_index, options.batch_size
    keep = torch.arange(options.seq_len - 1, device=accelerator.device)
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    for micro in range(options.grad_accum):
        rows = [next(windows) for _ in range(global_batch)]
        batch = torch.tensor(rows[rank * batch_size : (rank + 1) * batch_size], device=accelerator.device)
        with torch.inference_mode(), accelerator.autocast():
            teacher_log_probs = log_softmax_(run.teacher(input_ids=batch, use_cache=False, logits_to_keep=keep).logits)
        sync = micro == options.grad_accum - 1
        # Tells DeepSpeed's engine where the accumulation boundary is (it steps there); DDP/FSDP use no_sync
        accelerator.sync_gradients = sync
        with contextlib.nullcontext() if sync else accelerator.no_sync(run.model):
            logits = run.model(input_ids=batch, use_cache=False, logits_to_keep=keep).logits
            loss, kl, ce = distillation_loss(logits, teacher_log_probs, batch[:, 1:], options.kl_weight)
            del logits, teacher_log_probs
            accelerator.backward(loss / options.grad_accum)
        sums += torch.stack([loss.detach().double(), kl, ce]) / options.grad_accum
    grad_norm = None
    if options.max_grad_norm:
        grad_norm = accelerator.clip_grad_norm_(run.trained_parameters, options.max_grad_norm)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    loss, kl, ce = accelerator.reduce(sums, reduction="mean").tolist()
    return {"loss": loss, "kl": kl, "ce": ce, "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm)}


def train(run: Run, state: HealState) -> tuple[bool, SequencePacker]:
    """Optimizer steps from `state.step` to the last, evaluating and checkpointing as asked. Returns whether
    `stop_after_steps` stopped it early, and the packer (where the data ended)."""
    from tqdm.auto import tqdm

    accelerator, options, settings = run.accelerator, run.options, run.settings
    per_step, total_steps = settings["tokens_per_step"], settings["total_steps"]
    packer = SequencePacker(run.data.stream, run.tokenizer, options.seq_len, state.position)

    def announce_epoch(epoch: int, tokens: int) -> None:
        if accelerator.is_main_process:
            logger.warning("read all of %s (%d tokens); starting over from its beginning (pass %d)",
                           run.data.stream.description, tokens, epoch + 1)  # fmt: skip

    packer.on_new_epoch = announce_epoch
    windows = iter(packer)
    if state.step == 0:
        evaluate_now(run, state)
    show = accelerator.is_main_process and options.progress
    bar = tqdm(total=total_steps * per_step, initial=state.step * per_step, unit="tok", unit_scale=True,
               desc="healing", disable=not show)  # fmt: skip
    run_tokens, run_seconds = 0, 0.0
    with bar:
        while state.step < total_steps:
            if options.stop_after_steps is not None and state.step >= options.stop_after_steps:
                break
            started = time.perf_counter()
            row = train_step(run, windows)
            state.step += 1
            seconds = time.perf_counter() - started
            run_tokens += per_step
            run_seconds += seconds
            state.train_seconds += seconds
            state.curve.append({"step": state.step, "tokens": state.step * per_step, **row})
            bar.update(per_step)
            bar.set_postfix(loss=f"{row['loss']:.4f}", kl=f"{row['kl']:.4f}", refresh=False)
            if not math.isfinite(row["loss"]):
                raise MLAConvertError(f"the loss became {row['loss']} at step {state.step}: lower --lr")
            if evaluation_due(run, state.step):
                evaluate_now(run, state)
            if options.save_every and state.step % options.save_every == 0 and state.step < total_steps:
                state.position = packer.position()
                save_checkpoint(accelerator, run.checkpoint_dir, state.step, state.to_json(settings))
    state.position = packer.position()
    state.runs[-1].update(end_step=state.step, tokens=run_tokens, train_seconds=run_seconds)
    return state.step < total_steps, packer


def load_models_and_data(accelerator, student: str, options: HealOptions):
    """Student and teacher, checked to belong together, and the data, tokenized with the student's tokenizer (the
    teacher's if it has none). Data comes first where it can, so that bad data fails before the models load."""
    from ..sources import load_source_config, load_student, load_student_config, load_student_tokenizer

    student_config = load_student_config(student)
    teacher_config = load_source_config(options.teacher, options.teacher_gguf_file)
    check_vocabularies(student, getattr(student_config, "vocab_size", None), options.teacher, teacher_config.vocab_size,
                       options.any_teacher)  # fmt: skip
    if accelerator.is_main_process:
        warn_beyond_positions(student_config, options.seq_len, options.eval_seq_len or options.seq_len)
    tokenizer = load_student_tokenizer(student)
    data = prepare_data(tokenizer, options) if tokenizer is not None else None
    model, _ = load_student(student, dtype=torch.float32)
    teacher, teacher_tokenizer = load_teacher(options, getattr(torch, options.teacher_dtype), accelerator.device)
    check_vocabularies(student, vocab_size(model), options.teacher, vocab_size(teacher), options.any_teacher)
    check_same_tokenizer(tokenizer, teacher_tokenizer, student, options.teacher, options.any_teacher)
    check_teacher_is_source(student, model, teacher, options)
    if tokenizer is None:
        tokenizer = teacher_tokenizer
        if tokenizer is None:
            raise MLAConvertError(f"neither {student} nor the teacher {options.teacher} has a tokenizer")
        data = prepare_data(tokenizer, options)
    return model, teacher, tokenizer, data, student_config


def save_healed(run: Run, student: str, output: Path, report: dict, saved_dtype: torch.dtype) -> None:
    """The healed model, its tokenizer, the student's conversion.json and the report, written atomically."""
    from ..folders import save_atomically

    accelerator = run.accelerator
    state_dict = accelerator.get_state_dict(run.model)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(run.model)
        if run.options.gradient_checkpointing:
            # a training setting, not the healed model's
            getattr(unwrapped, "activation_checkpointing_disable", unwrapped.gradient_checkpointing_disable)()
        unwrapped.config.use_cache = True
        unwrapped.config.dtype = saved_dtype
        state_dict = {key: value.to(saved_dtype) for key, value in state_dict.items()}
        type(unwrapped.config).register_for_auto_class()
        with plain_class(unwrapped):
            type(unwrapped).register_for_auto_class("AutoModelForCausalLM")

        def write(folder: Path) -> None:
            import json

            with plain_class(unwrapped):
                unwrapped.save_pretrained(folder, state_dict=state_dict)
            run.tokenizer.save_pretrained(folder)
            conversion = Path(student) / CONVERSION_REPORT
            if conversion.is_file():
                shutil.copy2(conversion, folder / CONVERSION_REPORT)
            (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
            write_plot(report, folder / PLOT_FILE)

        save_atomically(output, write)
        if not run.options.keep_checkpoints:
            remove_checkpoints(run.checkpoint_dir)
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def plain_class(model):
    """The model as its own class: FSDP2 gives a sharded module a generated subclass (`FSDPMLAForCausalLM`, defined
    in torch), and save_pretrained would name that class in config.json's auto_map and copy torch's FSDP sources in
    place of the MLA modeling files. The weights come from the gathered state dict, so nothing else changes."""
    from torch.distributed.fsdp import FSDPModule

    sharded_class = type(model)
    if not issubclass(sharded_class, FSDPModule):
        yield model
        return
    model.__class__ = next(c for c in sharded_class.__mro__ if not issubclass(c, FSDPModule))
    try:
        yield model
    finally:
        model.__class__ = sharded_class


def _saved_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def heal(student: str | os.PathLike, output: str | os.PathLike, options: HealOptions) -> dict:
    """Distill `options.teacher` into the converted MLA model in `student`, and write the healed model to `output`.

    Returns the report also written to `output/healing.json` (with `"stopped": True` and no model written when
    `stop_after_steps` ends the run early). Runs in one process or under `accelerate launch`; every process must
    call it with the same arguments.
    """
    started = time.perf_counter()
    check_options(options)
    student = str(Path(student).expanduser().absolute())
    accelerator = make_accelerator(options)
    output, checkpoint_dir, existing = on_main_process(accelerator, lambda: prepare_paths(student, output, options))

    model, teacher, tokenizer, data, student_config = load_models_and_data(accelerator, student, options)
    options = replace(options, lr=heal_lr(options, student_config))
    settings = trajectory_settings(student, options, accelerator.num_processes, int(data.eval_sequences.numel()))
    settings["checkpoint_format"] = checkpoint_format(accelerator)
    run = prepare_run(accelerator, model, teacher, tokenizer, data, options, settings, checkpoint_dir)
    state = start_or_resume(run, existing)
    stopped, packer = train(run, state)

    data_report = {
        "train": data.stream.description,
        "eval": f"{data.eval_description}, {data.eval_sequences.shape[0]} sequences of {settings['eval_seq_len']} "
        "tokens",
        "text_column": options.text_column,
        "train_passes": packer.position().epoch + 1,
    }
    trained = int(sum(p.numel() for p in run.trained_parameters))
    report = build_report(student, options, settings, state, data_report, trained, stopped)
    if stopped:
        accelerator.wait_for_everyone()
        return report
    report["seconds"] = round(time.perf_counter() - started, 1)
    save_healed(run, student, output, report, _saved_dtype(student_config))
    return report


def run_heal(args) -> None:
    """The `heal` verb: `mla-convert heal MLA_FOLDER OUTPUT ...`."""
    from accelerate import PartialState

    from .options import options_from_args
    from .report import print_summary

    report = heal(args.student, args.output, options_from_args(args))
    if PartialState().is_main_process:
        print_summary(report, args.output)
