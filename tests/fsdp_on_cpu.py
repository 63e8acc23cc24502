"""`heal` under FSDP in CPU processes, for tests: `accelerate launch --config_file configs/accelerate/fsdp.yaml
tests/fsdp_on_cpu.py [--stop-after-steps N] MLA_FOLDER OUTPUT ...`.

accelerate (1.16) never selects FSDP for CPU processes: `AcceleratorState` switches to `DistributedType.FSDP` only
inside its branch for multi-GPU (and NPU, XPU, ...) runs, so a CPU launch with an FSDP config runs as plain
MULTI_CPU data parallelism. torch's FSDP2 itself shards on CPU over gloo; this stands in the accelerator type
accelerate would have chosen on GPUs (after the gloo process group is up, on CPU devices), so that the FSDP code
path of accelerate and of heal (sharded checkpoints, the gathered final state dict) runs here.
"""

import sys


def main(argv: list[str]) -> int:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    PartialState(cpu=True)
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU

    from mla_convert.cli import build_parser
    from mla_convert.heal import heal, options_from_args
    from mla_convert.heal.report import print_summary

    stop = None
    if argv[:1] == ["--stop-after-steps"]:
        stop, argv = int(argv[1]), argv[2:]
    args = build_parser().parse_args(["heal", *argv])
    options = options_from_args(args)
    options.stop_after_steps = stop
    report = heal(args.student, args.output, options)
    if PartialState().is_main_process and not report["stopped"]:
        print_summary(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
