"""Healing: a short distillation fine-tune of a converted MLA model from its source, run by accelerate.

    mla-convert heal ./smollm2-mla ./smollm2-healed --teacher ./SmolLM2-135M --data ../shared/data/wikitext2_valid.txt
    accelerate launch --multi_gpu --num_processes 2 -m mla_convert.heal MLA_FOLDER OUTPUT --teacher ... --data ...

The loss on every predicted position is `kl_weight * KL(teacher || student) + (1 - kl_weight) * CE(next token)`
(pure KL by default), both averaged over positions. The teacher is frozen, in eval mode, and runs on the fly; its
logits are never stored beyond the batch. Training text comes from the first 80% of `data`, evaluation text from
the last 20% of `eval_data` (default: `data`), so the two never overlap.

Data is streamed record by record and packed into fixed-length windows, in one deterministic order. Every process
reads the same stream and takes its own slice of each global batch, so the result does not depend on the number of
processes (for the same global batch), and a checkpoint only has to remember where in the stream the next window
starts.

Modules, in the order a run uses them: `options` (HealOptions, its flags and checks), `models` (student, teacher
and the checks that they belong together), `packing` (training windows), `loss`, `evaluation` (held-out scores),
`checkpoints` (HealState and resumable checkpoints), `report` (healing.json, the plot), `loop` (`heal` itself).
"""

from .checkpoints import HealState, default_checkpoint_dir
from .loop import heal, run_heal
from .loss import distillation_loss, log_softmax_
from .options import HealOptions, add_heal_arguments, options_from_args
from .packing import DataPosition, SequencePacker
from .report import write_plot


__all__ = [
    "DataPosition",
    "HealOptions",
    "HealState",
    "SequencePacker",
    "add_heal_arguments",
    "default_checkpoint_dir",
    "distillation_loss",
    "heal",
    "log_softmax_",
    "options_from_args",
    "run_heal",
    "write_plot",
]
