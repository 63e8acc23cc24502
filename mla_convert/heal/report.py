"""What a healing run reports: `healing.json` (data parts, tokens seen, loss and eval curves), the plot
`healing.png`, and the summary the command prints."""

from __future__ import annotations

import logging
from pathlib import Path

from .checkpoints import HealState
from .options import HealOptions


logger = logging.getLogger(__name__)

REPORT_FILE = "healing.json"
PLOT_FILE = "healing.png"


def build_report(
    student: str,
    options: HealOptions,
    settings: dict,
    state: HealState,
    data: dict,
    trained_parameters: int,
    stopped: bool,
) -> dict:
    tokens = state.step * settings["tokens_per_step"]
    return {
        "student": student,
        "teacher": str(options.teacher),
        "data": data,
        "loss": f"{options.kl_weight} * KL(teacher || student) + {1 - options.kl_weight:g} * next-token CE",
        "settings": settings,
        "trained_parameters": trained_parameters,
        "tokens_seen": tokens,
        "optimizer_steps": state.step,
        "stopped": stopped,
        "train_seconds": state.train_seconds,
        "tokens_per_second": tokens / state.train_seconds if state.train_seconds else None,
        "runs": state.runs,
        "curve": state.curve,
        "eval": state.evals,
        "seconds": None,
    }


def print_summary(report: dict, output: Path) -> None:
    print(f"wrote {Path(output).absolute()}")
    print(
        f"trained on {report['tokens_seen']} tokens of {report['data']['train']} in {report['optimizer_steps']} "
        f"steps ({report['tokens_per_second'] or 0:.0f} tokens/s)"
    )
    if report["eval"]:
        first, last = report["eval"][0], report["eval"][-1]
        print(
            f"held out ({report['data']['eval']}): KL {first['kl']:.4f} -> {last['kl']:.4f}, perplexity "
            f"{first['perplexity']:.3f} -> {last['perplexity']:.3f} (teacher {last['teacher_perplexity']:.3f})"
        )


def write_plot(report: dict, path: Path) -> bool:
    """Training loss/KL and held-out KL/perplexity against training tokens, as a PNG. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no %s (pip install matplotlib)", path.name)
        return False
    curve, evals = report["curve"], report["eval"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if curve:
        tokens = [row["tokens"] for row in curve]
        left.plot(tokens, [row["loss"] for row in curve], label="loss")
        left.plot(tokens, [row["kl"] for row in curve], label="KL(teacher || student)")
        left.plot(tokens, [row["ce"] for row in curve], label="next-token CE", alpha=0.6)
    left.set_xlabel("training tokens")
    left.set_title(f"training ({report['data']['train']})", fontsize=9)
    left.legend()
    if evals:
        tokens = [row["tokens_seen"] for row in evals]
        right.plot(tokens, [row["kl"] for row in evals], "o-", color="C1", label="held-out KL")
        right.set_ylabel("KL(teacher || student)")
        right.set_xlabel("training tokens")
        twin = right.twinx()
        twin.plot(tokens, [row["perplexity"] for row in evals], "s--", color="C2", label="student perplexity")
        twin.axhline(evals[0]["teacher_perplexity"], color="gray", linestyle=":", label="teacher perplexity")
        twin.set_ylabel("perplexity")
        lines = right.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        right.legend(lines[0] + more[0], lines[1] + more[1])
    right.set_title(f"held out ({report['data']['eval']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
