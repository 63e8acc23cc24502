"""Seconds per stage of one conversion, as CPU seconds of this process beside the wall seconds of its report: on
shared cores the wall clock measures the other jobs as much as the conversion, while a single-threaded conversion's
CPU seconds do not (run it with OMP_NUM_THREADS=1 MKL_NUM_THREADS=1).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python scripts/stage_seconds.py SOURCE OUTPUT [convert options ...]

runs `mla-convert convert SOURCE OUTPUT --overwrite [options]` in this process and prints one JSON object: the
report's `seconds_per_stage` ("wall"), the CPU seconds of the same stages ("cpu", with the final check apart from
"verify"), the totals, and the CPU seconds per layer: the stages that run once per conversion (`ONCE`) left out,
the rest over the layers (on 2 layers the last layer's forward, which a conversion skips, is half of them: a
deeper source costs a little more per layer). The figures of
docs/streaming.md ("Time per layer") come from a 2-layer Llama-3.1-8B-shaped source that scripts/bench_scale.py
builds (`build_source(Path("runs/bench_scale"), "8b", 2, 0)`), with its conversion options.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from contextlib import contextmanager


# the stages that run once per conversion, whatever its depth
ONCE = ("load", "calibration text", "embeddings", "final check")


def main(argv: list[str]) -> int:
    import mla_convert.stream as stream
    from mla_convert.cli import main as cli

    cpu: dict[str, float] = defaultdict(float)
    stage = stream.Meter.stage

    @contextmanager
    def timed_stage(self, name):
        started = time.process_time()
        try:
            with stage(self, name):
                yield
        finally:
            cpu[name] += time.process_time() - started

    stream.Meter.stage = timed_stage
    # The final check (the final norm, the LM head and the logits' comparison) runs once per conversion inside the
    # last "verify": timed apart, it leaves that stage's per-layer part
    final_check = stream.final_check

    def timed_final_check(*args, **kwargs):
        started = time.process_time()
        try:
            return final_check(*args, **kwargs)
        finally:
            seconds = time.process_time() - started
            cpu["final check"] += seconds
            cpu["verify"] -= seconds

    stream.final_check = timed_final_check
    source, output, *options = argv
    wall, started = time.perf_counter(), time.process_time()
    code = cli(["convert", source, output, "--overwrite", *options])
    if code:
        return code
    with open(f"{output}/conversion.json") as file:
        report = json.load(file)
    layers = len(report["layers"])
    per_layer = sum(value for name, value in cpu.items() if name not in ONCE) / layers
    print(json.dumps({
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "cpu_seconds": round(time.process_time() - started, 1),
        "layers": layers,
        "cpu_seconds_per_layer": round(per_layer, 1),
        "wall": report["seconds_per_stage"],
        "cpu": {name: round(value, 2) for name, value in cpu.items()},
    }, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
