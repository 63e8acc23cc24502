"""`heal` under FSDP in CPU processes, for tests: `accelerate launch --config_file configs/accelerate/fsdp.yaml
tests/fsdp_on_cpu.py [--stop-after-steps N] MLA_FOLDER OUTPUT ...`.

accelerate (1.16) never selects FSDP for CPU processes: `AcceleratorState` switches to `DistributedType.FSDP` only
inside its branch for multi-GPU (and NPU, XPU, ...) runs, so a CPU launch with an FSDP config runs as plain
MULTI_CPU data parallelism. torch's FSDP2 itself shards on CPU over gloo; this stands in the accelerator type
accelerate would have chosen on GPUs (after the gloo process group is up, on CPU devices), so that the FSDP code
path of accelerate and of heal (sharded checkpoints, the gathered final state dict) runs here.
"""

import sys
from dataclasses import replace


def main(argv: list[str]) -> int:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    PartialState(cpu=True)
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU

    from mla_convert import cli
    from mla_convert.heal import options as heal_options

    if argv[:1] == ["--stop-after-steps"]:
        stop, argv = int(argv[1]), argv[2:]
        read = heal_options.options_from_args
        # the command line has no such flag: it is a planned "kill" for tests
        heal_options.options_from_args = lambda args: replace(read(args), stop_after_steps=stop)
    return cli.main(["heal", *argv])  # as `mla-convert heal`: its one-line errors, its exit codes


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
