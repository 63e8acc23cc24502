"""Peak memory of `mla-convert export --format deepseek-v3` against the size of the model it exports.

    python scripts/bench_export.py --work runs/bench-export --json docs/bench_export.json

Builds a DeepSeek-constrained MLA folder (closed form, no calibration text) of a Llama shape large enough that the
model and its largest tensor differ by far (by default hidden 1024, 8 heads of head_dim 128, 4 KV heads, 4 layers,
a 32k vocabulary, at 512 + 64: about 0.5 GB in float32, the embedding 131 MB), then runs the export as a user
does, in a child process, and reports its peak RSS (sampled) beside the model's and the largest
tensor's bytes, for one file and for 100 MB shards.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def build_mla_folder(folder: Path, args) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import byte_tokenizer

    from mla_convert.deepseek import build_deepseek_mla, save_mla_folder

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=128, max_position_embeddings=2048, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    source = LlamaForCausalLM(config).eval()
    calibration = torch.randint(0, args.vocab, (4, 128), generator=torch.Generator().manual_seed(1))
    model = build_deepseek_mla(source, source.config, 512, 64, calibration)
    del source
    save_mla_folder(model, byte_tokenizer(), folder, {"source": "bench_export random Llama", "kv_budget": None})
    state = model.state_dict()
    return {
        "model_bytes": sum(t.numel() * t.element_size() for t in state.values()),
        "largest_tensor_bytes": max(t.numel() * t.element_size() for t in state.values()),
    }


def export_peak(mla: Path, output: Path, *flags: str) -> dict:
    """Runs the export as a user does, in a child process, sampling its RSS every 20 ms (`ru_maxrss` would not do:
    Linux carries it over from the parent through fork and exec, and this parent built the model)."""
    arguments = ["export", str(mla), str(output), "--format", "deepseek-v3", "--overwrite", *flags]
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "mla_convert", *arguments], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    process, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            peak = max(peak, process.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    _, stderr = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(stderr[-2000:])
    return {
        "command": " ".join(["mla-convert", *arguments]),
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_bytes": peak,
        "files": sorted(p.name for p in output.glob("*.safetensors")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-export"))
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    mla = args.work / "mla"
    sizes = build_mla_folder(mla, args) if not (mla / "config.json").is_file() else {}
    report = {"shape": vars(args) | {"work": str(args.work), "json": str(args.json)}, **sizes}
    report["one_file"] = export_peak(mla, args.work / "deepseek")
    report["sharded_100MB"] = export_peak(mla, args.work / "deepseek-sharded", "--max-shard-size", "100MB")
    for name, value in report.items():
        print(f"{name}: {value}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
