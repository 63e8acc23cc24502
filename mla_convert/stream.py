"""The conversion's one pipeline: a loop over the decoder layers of a *layer source*, in memory bounded by one layer
beside what the source itself holds.

A layer source gives the source's tensors by name: `LazySource` reads them from the safetensors shards one at a
time in their stored dtype (only the layer at hand is ever cast to float32); `ModelSource` holds a loaded model
(GGUF files, hub ids, folders without safetensors, or simply a source that fits in memory). Data-free calibration
samples its text from either, layer by layer (`sampling.sample_layer_by_layer`, through `RepeatedLayers`).
Which one is used is a speed and memory choice (`settings.choose_layer_source`): both give the same weights.

The embeddings and the calibration sequences first; then, per layer: run the calibration hidden states carried
from the previous layer through the source layer, take its input moment, decompose (with the K/V balance search),
assemble the MLA layer, add DeepSeek's latent norm (`--target deepseek`, measured on the same activations), refine
it, carry the hidden states on, write the layer's tensors to the output shard, free the layer.

The hidden states carried from layer to layer are the SOURCE's (`tokens x hidden`, float32): every layer is
decomposed on the source's own activations, and its target is the source layer's output on them. With
`--refine-inputs converted` or `residual` a second stream, the CONVERTED model's hidden states on the sequences kept
for refinement, is carried too (each layer applied once it is refined), and the layer is refined on it: it learns
to reproduce its target from the inputs it will get at run time. The check against the source carries two more
streams (source and MLA) on the verification sequences, and compares their logits at the end as `verify` does.

Rank allocation by spectrum needs every layer's spectrum before the first rank is fixed: a first pass reads and runs
every source layer and decomposes it once (about the cost of the main pass without refinement and key-scale search).
"""

from __future__ import annotations

import copy
import json
import os
import resource
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedConfig, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from mla_modeling import MLAConfig, MLAForCausalLM
from mla_modeling.attention_mla import qk_norm_indices, rope_gather_index
from mla_modeling.modeling_mla import MLADecoderLayer, MLARotaryEmbedding

from .assemble import attention_entries, mla_config, rope_tables as mla_rope_tables
from .calibrate import moment_sum, normalised_moment_sums
from .decompose import (
    MLAAttentionWeights, NormalisedMoments, PreparedLayer, attention_weights, prepare_layer, single_thread,
    weight_only_moment,
)  # fmt: skip
from .deepseek import with_layer_latent_norm
from .errors import MLAConvertError
from .families import layer_windows, llama_layout_state, source_inv_freq
from .plan import RankPlan, SourceShape
from .refine import attention_error, attention_outputs, refine_layer, rope_tables, target_inputs, windows
from .settings import Settings
from .sources import check_finite_tensor, read_checked_tensor
from .verify import logit_agreement


# Sequences per forward batch, as `calibrate.collect_input_moments` (the moments are summed in the same order)
BATCH_SIZE = 4
# Calibration sequences whose latent RMS sets the norm of each key-scale candidate of --target deepseek (4096 tokens
# at the default 512 per sequence: the norm's weight is a mean, and the search runs four candidates)
KEY_SCALE_SEARCH_NORM_SEQUENCES = 8


# ------------------------------------------------------------------------------------------ memory and time


def rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """The process's peak resident memory so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class Meter:
    """Seconds per stage and the peak resident memory sampled at every stage's end."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    peak: int = 0
    last: float = field(default_factory=time.perf_counter)

    @contextmanager
    def stage(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started
            self.peak = max(self.peak, rss())

    def lap(self, name: str) -> None:
        """Ends stage `name`, which began at the previous lap (or when the meter was made)."""
        now = time.perf_counter()
        self.seconds[name] += now - self.last
        self.last = now
        self.peak = max(self.peak, rss())

    def report(self) -> dict:
        return {
            # sampled at the end of every stage (and every layer); beside it the kernel's high-water mark of the
            # process since it started (a CLI run: the conversion's), which sees what fell between the samples
            "peak_rss_bytes": max(self.peak, rss()),
            "process_peak_rss_bytes": peak_rss(),
            "seconds_per_stage": {name: round(value, 2) for name, value in self.seconds.items()},
        }


# ------------------------------------------------------------------------------------------- reading the source


class LazySource:
    """The source's safetensors shards, read one tensor at a time in the stored dtype (nothing is read up front)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        else:
            self.weight_map = {}
            for path in sorted(folder.glob("*.safetensors")):
                with safe_open(path, framework="pt") as f:
                    self.weight_map.update({name: path.name for name in f.keys()})
        self._locations: dict[str, TensorLocation] = {}

    def read(self, name: str) -> torch.Tensor:
        return read_checked_tensor(self.folder / self.weight_map[name], name, self.folder)

    def layer_state(self, layer_idx: int) -> dict[str, torch.Tensor]:
        """One decoder layer's tensors, named within the layer (`self_attn.q_proj.weight`, ...)."""
        prefix = f"model.layers.{layer_idx}."
        return {name[len(prefix) :]: self.read(name) for name in self.weight_map if name.startswith(prefix)}

    def generation_config(self, source_config: PreTrainedConfig) -> GenerationConfig:
        try:
            return GenerationConfig.from_pretrained(self.folder)
        except OSError:
            return GenerationConfig.from_model_config(source_config)

    def location(self, name: str) -> TensorLocation:
        """Where tensor `name`'s bytes lie in its shard (from the file's header, read once per file)."""
        if name not in self._locations:
            path = self.folder / self.weight_map[name]
            try:
                with open(path, "rb") as f:
                    size = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(size))
            except (OSError, ValueError) as e:
                raise MLAConvertError(f"the weights file {path} is corrupt or truncated: {e}") from e
            for key, entry in header.items():
                if key != "__metadata__":
                    begin, end = entry["data_offsets"]
                    start = 8 + size  # the data follow the header's length and the header
                    self._locations[key] = TensorLocation(
                        path, entry["dtype"], tuple(entry["shape"]), start + begin, start + end
                    )
        return self._locations[name]


@dataclass(frozen=True)
class TensorLocation:
    """A stored tensor's bytes: `path[begin:end]`, in safetensors dtype `dtype` ("F32", "BF16", ...)."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class ModelSource:
    """A source model held in memory (float32, on the CPU), read by name as `LazySource` reads the shards."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.state = model.state_dict()

    def read(self, name: str) -> torch.Tensor:
        return self.state[name]

    def layer_state(self, layer_idx: int) -> dict[str, torch.Tensor]:
        prefix = f"model.layers.{layer_idx}."
        return {name[len(prefix) :]: tensor for name, tensor in self.state.items() if name.startswith(prefix)}

    def generation_config(self, source_config: PreTrainedConfig) -> GenerationConfig:
        return self.model.generation_config


class RepeatedLayers:
    """The source's decoder layers run again and again, in order, as data-free sampling does (every layer at every
    generated token). From the shards (`LazySource`), each tensor is read through its file, kept open, into a buffer
    reused from layer to layer (one layer in its stored dtype, and its float32 copy where that dtype is another), and
    is checked for NaN or inf the first time only: no shard is mapped into memory and nothing is allocated per step.
    From the model in memory (`ModelSource`) the layer is built around the model's own tensors, as `Stream` does.
    Each layer's module is built once and used again while it still holds the very tensors just read (on the CPU:
    the buffers, or the model's tensors); on another device it is built at every read, from the tensors moved there.
    Use as a context manager (it closes the files)."""

    DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}

    def __init__(self, stream: Stream):
        self.stream = stream
        self.files: dict[Path, object] = {}
        self.stored: dict[str, torch.Tensor] = {}
        self.floats: dict[str, torch.Tensor] = {}
        self.checked: set[str] = set()
        self.modules: dict[int, nn.Module] = {}

    def __enter__(self) -> RepeatedLayers:
        return self

    def __exit__(self, *exc) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()

    def layer(self, layer_idx: int) -> nn.Module:
        """Source decoder layer `layer_idx` in float32 on the stream's device; valid until the next call."""
        reader = self.stream.reader
        if isinstance(reader, LazySource):
            prefix = f"model.layers.{layer_idx}."
            state = {
                name[len(prefix) :]: self.read(reader, name, name[len(prefix) :])
                for name in reader.weight_map
                if name.startswith(prefix)
            }
        else:
            state = reader.layer_state(layer_idx)
        module = self.modules.get(layer_idx)
        if module is None or not holds(module, state):
            module = self.modules[layer_idx] = self.stream.source_layer(layer_idx, state)
        return module

    def read(self, reader: LazySource, name: str, slot: str) -> torch.Tensor:
        """Tensor `name` in float32, in the buffers of `slot` (its name within the layer)."""
        where = reader.location(name)
        dtype = self.DTYPES.get(where.dtype)
        if dtype is None:  # a dtype this reader does not know: read it the plain way
            return reader.read(name)
        buffer = self.stored.get(slot)
        if buffer is None or buffer.shape != where.shape or buffer.dtype != dtype:
            buffer = self.stored[slot] = torch.empty(where.shape, dtype=dtype)
        target = buffer.reshape(-1).view(torch.uint8).numpy()
        if target.nbytes != where.end - where.begin:
            raise MLAConvertError(f"the weights file {where.path} is corrupt: {name} does not have the size of its shape")
        if where.path not in self.files:
            self.files[where.path] = open(where.path, "rb", buffering=0)
        f, view, done = self.files[where.path], memoryview(target), 0
        f.seek(where.begin)
        while done < len(view):
            count = f.readinto(view[done:])
            if not count:
                raise MLAConvertError(f"the weights file {where.path} is truncated (in {name})")
            done += count
        if name not in self.checked:
            check_finite_tensor(buffer, name, reader.folder)
            self.checked.add(name)
        if dtype == torch.float32:
            return buffer
        floats = self.floats.get(slot)
        if floats is None or floats.shape != buffer.shape:
            floats = self.floats[slot] = torch.empty(buffer.shape, dtype=torch.float32)
        return floats.copy_(buffer)


def holds(module: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Whether `module`'s weights are the tensors of `state` themselves (the same memory, not copies)."""
    own = module.state_dict()
    return own.keys() == state.keys() and all(own[name].data_ptr() == t.data_ptr() for name, t in state.items())


def load_module(module: nn.Module, state: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """`module` (built on the meta device) holding `state` in float32 on `device`."""
    module.load_state_dict({name: t.to(device, torch.float32) for name, t in state.items()}, strict=True, assign=True)
    return module.eval()


@dataclass
class Stream:
    """What every layer's step needs: the layer source, its skeleton (on the meta device: the modules' classes and
    config, no weights), the RoPE modules, and the settings."""

    reader: LazySource | ModelSource
    source_config: PreTrainedConfig
    skeleton: nn.Module
    rotary: nn.Module
    shape: SourceShape
    settings: Settings
    device: torch.device
    meter: Meter
    progress: bool = True

    @classmethod
    def open(
        cls, reader: LazySource | ModelSource, source_config, settings: Settings, meter: Meter, progress: bool
    ) -> Stream:
        device = torch.device(settings.options.device)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(source_config)
        # RoPE tables are computed from the config, not read: a real module on the conversion's device
        rotary = type(skeleton.model.rotary_emb)(config=skeleton.config).to(device)
        skeleton.model.rotary_emb = rotary
        shape = SourceShape.from_config(source_config)
        return cls(reader, source_config, skeleton, rotary, shape, settings, device, meter, progress)

    @property
    def inv_freq(self) -> torch.Tensor:
        return source_inv_freq(self.skeleton)

    @property
    def normalises(self) -> bool:
        """Whether calibration takes a QK-norm source's normalised moments (not for weight-only SVD)."""
        return self.shape.qk_norm and self.settings.init != "svd"

    @property
    def windows(self) -> list[int | None]:
        """Per layer, the window the source attends over (None: the whole context); the MLA layer mirrors it."""
        return layer_windows(self.source_config)

    def source_layer(self, layer_idx: int, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """The source decoder layer in float32 on the device, from `state` (read from the source when None)."""
        with torch.device("meta"):
            layer = type(self.skeleton.model.layers[layer_idx])(self.skeleton.config, layer_idx)
        return load_module(layer, self.reader.layer_state(layer_idx) if state is None else state, self.device)

    def embed(self, ids: torch.LongTensor, weight: torch.Tensor) -> torch.Tensor:
        """Hidden states `[sequences, seq, hidden]` float32 of `ids` `[sequences, seq]` (only their rows are cast)."""
        return weight[ids].to(torch.float32)


# --------------------------------------------------------------------------------------------- one layer's steps


@dataclass
class LayerPass:
    """What one pass of the calibration hidden states through a source layer gives (`run_layer`)."""

    # [sequences, seq, hidden] float32 on the CPU: the next layer's input (None for the last layer)
    output: torch.Tensor | None
    # E[[x; 1] [x; 1]^T] of the attention input [hidden + 1, hidden + 1] float64
    moment: torch.Tensor | None = None
    # the attention inputs of the first sequences [keep, seq, hidden] bfloat16, for refinement and the search
    kept: torch.Tensor | None = None
    # a QK-norm layer's normalised query and key moments
    normalised: NormalisedMoments | None = None


def run_layer(
    layer: nn.Module, hidden: torch.Tensor, config, rotary: nn.Module, device: torch.device, window: int | None,
    moment: bool = False, keep: int = 0, forward: bool = True, normalised: bool = False,
) -> LayerPass:
    """`layer` over `hidden` `[sequences, seq, hidden]` (CPU) in batches, as the whole model runs it, with what
    calibration takes from its attention input on request: the moment, the first `keep` sequences and (QK-norm)
    the normalised moments. `window`: the layer's sliding window (None: it attends to the whole context).
    `forward=False` (the last layer: nothing reads its output) skips the layer itself."""
    outputs, kept = [], []
    size = hidden.shape[-1] + 1
    total = torch.zeros(size, size, dtype=torch.float64) if moment else None
    sums = None
    count = 0
    with torch.no_grad():
        for batch in hidden.split(BATCH_SIZE):
            batch = batch.to(device)
            position_ids = torch.arange(batch.shape[1], device=device)[None]
            if moment or normalised or len(kept) * BATCH_SIZE < keep:
                normed = layer.input_layernorm(batch)
                count += batch.shape[0] * batch.shape[1]
                if moment:
                    total += moment_sum(normed)
                if normalised:
                    attention = layer.self_attn
                    heads = attention.q_proj.out_features // attention.head_dim
                    kv_heads = attention.k_proj.out_features // attention.head_dim
                    part = normalised_moment_sums(attention, normed, heads, kv_heads, attention.head_dim)
                    sums = part if sums is None else tuple(a + b for a, b in zip(sums, part))
                still_needed = keep - sum(len(part) for part in kept)
                if still_needed > 0:
                    kept.append(normed[:still_needed].to("cpu", torch.bfloat16))
            if not forward:
                continue
            # the mask the whole model builds for this kind of layer (local layers: the sliding-window one)
            mask_function = create_causal_mask if window is None else create_sliding_window_causal_mask
            mask = mask_function(config, batch, None, None, position_ids)
            output = layer(batch, attention_mask=mask, position_embeddings=rotary(batch, position_ids), position_ids=position_ids)
            outputs.append((output[0] if isinstance(output, tuple) else output).to("cpu", torch.float32))
    count = max(count, 1)
    return LayerPass(
        output=torch.cat(outputs) if forward else None,
        moment=total / count if moment else None,
        kept=torch.cat(kept) if kept else None,
        normalised=NormalisedMoments(*(value / count for value in sums)) if normalised else None,
    )


def attention_inputs(layer: nn.Module, hidden: torch.Tensor, device: torch.device) -> Iterator[torch.Tensor]:
    """`layer`'s attention inputs (after its input norm) on `hidden` `[sequences, seq, hidden]`, batch by batch."""
    with torch.no_grad():
        for batch in hidden.split(BATCH_SIZE):
            yield layer.input_layernorm(batch.to(device))


@contextmanager
def eager_on_cpu(configs: list, device: torch.device):
    """`refine.attention_implementation` for layer modules: eager attention on the CPU while scoring and refining."""
    previous = [config._attn_implementation for config in configs]
    if device.type == "cpu":
        for config in configs:
            config._attn_implementation = "eager"
    try:
        yield
    finally:
        for config, implementation in zip(configs, previous):
            config._attn_implementation = implementation


@dataclass
class MLAStream:
    """The MLA side: the working config (each layer's RoPE table filled in as it is decomposed), its RoPE module."""

    config: MLAConfig
    rotary: nn.Module

    @classmethod
    def start(cls, stream: Stream, plan: RankPlan, first: MLAAttentionWeights, source_layer: nn.Module) -> MLAStream:
        # `mla_config` reads the attention's biases and scaling off the first layer: the loaded one stands in for it
        holder = SimpleNamespace(model=SimpleNamespace(layers=[source_layer]))
        config = mla_config(stream.source_config, holder, plan, [first] * stream.shape.num_layers)
        config.rope_frequency_indices = [list(first.rope_frequency_indices) for _ in range(stream.shape.num_layers)]
        # DeepSeek's latent norm: every layer's weights carry its weight
        config.kv_latent_norm = first.kv_a_norm_weight is not None
        if config.qk_norm:
            config.rope_key_heads = [list(first.rope_key_heads) for _ in range(stream.shape.num_layers)]
        with torch.device("meta"):
            MLAForCausalLM(config)  # resolves the attention implementation on the config, as the whole model does
        return cls(config, MLARotaryEmbedding(config).to(stream.device))

    def layer(self, layer_idx: int, source_state: dict, weights: MLAAttentionWeights, device: torch.device) -> nn.Module:
        """The MLA decoder layer: the source layer's norms and MLP, the decomposed attention (float32, on `device`)."""
        self.config.rope_frequency_indices[layer_idx] = list(weights.rope_frequency_indices)
        if self.config.qk_norm:
            self.config.rope_key_heads[layer_idx] = list(weights.rope_key_heads)
        # Phi-3's fused gate/up projection split into the MLA layer's (Llama's) two, as `assemble` does
        state = {name: t for name, t in llama_layout_state(source_state).items() if not name.startswith("self_attn.")}
        state.update({"self_attn." + name: t for name, t in attention_entries(weights).items()})
        with torch.device("meta"):
            layer = MLADecoderLayer(self.config, layer_idx)
        layer = load_module(layer, state, device)
        # non-persistent: rebuilt from the table, as `MLAPreTrainedModel._init_weights` does
        layer.self_attn.rope_index = rope_gather_index(weights.rope_frequency_indices).to(device)
        if self.config.qk_norm:
            head_groups, rope_key_head_index = qk_norm_indices(self.config, layer_idx)
            layer.self_attn.head_groups, layer.self_attn.rope_key_head_index = head_groups.to(device), rope_key_head_index.to(device)
        return layer


def prepare_streamed(
    stream: Stream, layer: nn.Module, moment: torch.Tensor | None, plan: RankPlan,
    normalised: NormalisedMoments | None = None, saved: dict | None = None,
) -> PreparedLayer:
    """`layer`'s decomposition up to the latent size and the K/V balance, computed once for all its candidates
    (`saved`: the spectrum pass's, which needs no moment)."""
    with single_thread():
        return prepare_layer(
            attention_weights(layer.self_attn, stream.skeleton.config, stream.shape),
            moment,
            plan.qk_rope_head_dim,
            inv_freq=stream.inv_freq,
            options=stream.settings.decompose(plan),
            normalised=normalised,
            saved=saved,
        )


def decompose_streamed(
    stream: Stream, prepared: PreparedLayer, plan: RankPlan, layer_idx: int, key_scale: float
) -> MLAAttentionWeights:
    """The layer's MLA weights at its planned latent size and one K/V balance (`decompose.decompose_layer`)."""
    with single_thread():
        return prepared.weights(plan.kv_lora_ranks[layer_idx], key_scale)


def search_key_scale(
    grid: tuple[float, ...], start: float, score: Callable[[float], tuple[float, Any]]
) -> tuple[float, Any]:
    """The balance of `grid` (ascending) with the least error, and what `score` returned beside that error (the
    candidate; only the best so far is held). `score(factor)` -> (error, candidate). Found by walking from `start`:
    down the grid while the error falls, else up it while it falls; ties go to the smaller balance, as a full scan
    keeps the first.

    The error is unimodal along the grid in nearly every layer (SmolLM2-135M, `--refine-steps 0`: the walk lands on
    the grid's minimum in 89 of 90 layers over plain 0.25 and 0.5 and DeepSeek 0.5; in the other it keeps an error
    of 0.0868 where the grid's least is 0.0862), so it scores three of the four balances in the usual case."""
    index = grid.index(start)
    best_error, best = score(start)
    chosen = start
    for step in (-1, 1):
        position = index + step
        while 0 <= position < len(grid):
            error, candidate = score(grid[position])
            if error < best_error or (step < 0 and error == best_error):
                best_error, best, chosen = error, candidate, grid[position]
                position += step
            else:
                break
        if chosen != start:
            # the error fell downwards: no need to look upwards
            break
    return chosen, best


@dataclass
class KeyScaleTarget:
    """`refine.AttentionTargets` for one layer: the first windows of its recorded inputs `[count, window, hidden]`
    (float32, on the device), the source attention's output on them and the MLA RoPE tables for them."""

    inputs: torch.Tensor
    target: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]
    # the layer's sliding window: local layers are scored as they attend
    window: int | None
    # the query projection's weight, bias and output on `inputs`, from the first candidate scored: the K/V balance
    # changes the latent's projections only, so the next candidates reuse the product (where their weights are
    # equal: checked, not assumed), the largest of the score at the 8B shape
    query: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None

    @classmethod
    def of(
        cls, stream: Stream, mla: MLAStream, source_layer: nn.Module, kept: torch.Tensor, window: int | None
    ) -> KeyScaleTarget:
        inputs = target_inputs(kept, stream.device)
        with eager_on_cpu([stream.skeleton.config], stream.device):
            rope = rope_tables(stream.rotary, inputs)
            target = attention_outputs(source_layer.self_attn, inputs, rope, len(inputs), window)
        return cls(inputs, target, rope_tables(mla.rotary, inputs), window)

    def error(self, stream: Stream, mla: MLAStream, layer_idx: int, source_state: dict, candidate) -> float:
        """The relative attention-output error of `candidate`, as `convert.choose_key_scales` scores it."""
        layer = mla.layer(layer_idx, source_state, candidate, stream.device)
        with eager_on_cpu([mla.config], stream.device), self.reused_query(layer.self_attn):
            return attention_error(layer.self_attn, self.inputs, self.target, self.rope, self.window)

    @contextmanager
    def reused_query(self, attention: nn.Module):
        """`attention.q_proj` answering `inputs` with the product kept from an earlier candidate of equal weights."""
        projection = attention.q_proj
        weight, bias = projection.weight, projection.bias
        kept = self.query
        if kept is None or not (torch.equal(kept[0], weight) and (bias is None or torch.equal(kept[1], bias))):
            with torch.no_grad():
                # [count, window, heads * qk_head_dim]
                self.query = kept = (weight, bias, projection(self.inputs))
        attention.q_proj = KnownOutput(projection, self.inputs, kept[2])
        try:
            yield
        finally:
            attention.q_proj = projection


class KnownOutput(nn.Module):
    """`projection`, except on the tensor `inputs` itself (the same memory and shape), whose output is known."""

    def __init__(self, projection: nn.Module, inputs: torch.Tensor, output: torch.Tensor):
        super().__init__()
        self.projection, self.inputs, self.output = projection, inputs, output

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        inputs = self.inputs
        same = (hidden_states.data_ptr(), hidden_states.shape, hidden_states.stride()) == (
            inputs.data_ptr(), inputs.shape, inputs.stride()
        )
        return self.output if same else self.projection(hidden_states)


# ------------------------------------------------------------------------------------------------ the output


class ShardWriter:
    """Writes tensors into `model-0000x-of-0000N.safetensors` shards of at most `max_bytes` (a tensor larger than
    that gets a shard of its own) plus `model.safetensors.index.json`, or one `model.safetensors`, as transformers'
    `save_pretrained` does.

    Nothing is held in memory: each tensor's bytes go to the open shard's data file at once, and a full shard gets
    its safetensors header written in front of them (the header needs every offset, so it comes last)."""

    DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}

    def __init__(self, folder: Path, max_bytes: int, dtype: torch.dtype):
        self.folder, self.max_bytes, self.dtype = folder, max_bytes, dtype
        self.shards: list[tuple[Path, list[str]]] = []
        self.header: dict[str, dict] = {}
        self.data = None
        self.offset = 0
        self.total_bytes = self.total_parameters = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu", self.dtype).contiguous()
        size = tensor.numel() * tensor.element_size()
        if self.header and self.offset + size > self.max_bytes:
            self.flush()
        if self.data is None:
            self.data = open(self.folder / f".shard-{len(self.shards)}.data", "wb")
        self.data.write(tensor.view(-1).view(torch.uint8).numpy().data)
        entry = {"dtype": self.DTYPES[self.dtype], "shape": list(tensor.shape), "data_offsets": [self.offset, self.offset + size]}
        self.header[name] = entry
        self.offset += size
        self.total_bytes += size
        self.total_parameters += tensor.numel()

    def flush(self) -> None:
        if self.data is None:
            return
        self.data.close()
        data_path = Path(self.data.name)
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        path = self.folder / f".shard-{len(self.shards)}.safetensors"
        with open(path, "wb") as shard, open(data_path, "rb") as data:
            shard.write(len(header).to_bytes(8, "little"))
            shard.write(header)
            shutil.copyfileobj(data, shard, 16 * 2**20)
        data_path.unlink()
        self.shards.append((path, list(self.header)))
        self.header, self.data, self.offset = {}, None, 0

    def finish(self) -> None:
        self.flush()
        if len(self.shards) == 1:
            # a rename within the fresh staging folder (nothing is there to replace); `os.replace` stays the
            # final swap's alone
            os.rename(self.shards[0][0], self.folder / "model.safetensors")
            return
        weight_map = {}
        for number, (path, names) in enumerate(self.shards, start=1):
            name = f"model-{number:05d}-of-{len(self.shards):05d}.safetensors"
            os.rename(path, self.folder / name)
            weight_map.update({tensor: name for tensor in names})
        index = {
            "metadata": {"total_parameters": self.total_parameters, "total_size": self.total_bytes},
            "weight_map": weight_map,
        }
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_model_files(folder: Path, stream: Stream, working: MLAConfig, plan: RankPlan, layers: list, dtype: str) -> None:
    """config.json (with `auto_map`), the modeling files and generation_config.json, as
    `save_pretrained` writes them. `working`: the config the layers were built with, whose RoPE tables
    become `assemble.rope_tables` of the converted layers (None where every layer uses the plain one)."""
    config = copy.deepcopy(working)
    config.rope_frequency_indices = mla_rope_tables(layers, plan.qk_rope_head_dim, stream.shape.head_dim)
    if config.qk_norm:
        config.rope_key_heads = [layer.rope_key_heads for layer in layers]
    with torch.device("meta"):
        model = MLAForCausalLM(config)
    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModelForCausalLM")
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    custom_object_save(model, folder, config=config)
    config.save_pretrained(folder)
    stream.reader.generation_config(stream.source_config).save_pretrained(folder)


# ------------------------------------------------------------------------------------------------- the passes


class LayerCache:
    """What the spectrum pass computes of every layer that the main pass would compute again, one file per layer
    in a scratch folder on disk (nothing of it stays in memory): the calibration pass through the source layer (its
    output, the kept attention inputs, QK-norm's normalised moments) and the layer's decomposition up to the latent
    size (`PreparedLayer.saved`: the RoPE placement, the joint latent's moment, metrics and eigendecomposition).
    The main pass reads them back instead of running the layer and the products with the input moment again; the
    numbers are the same, so are the weights. About `tokens x hidden x 4` bytes plus four matrices of the width of
    `[k_nope ; v]` (8 bytes per entry) per layer."""

    def __init__(self, folder: Path):
        self.folder = folder

    @staticmethod
    def disk_bytes(config: PreTrainedConfig, calibration_tokens: int, kept_tokens: int) -> int:
        """What the files of every layer take at most (the spectrum pass writes them all before the main pass
        reads and removes them), for the free-space check."""
        shape = SourceShape.from_config(config)
        width = 2 * shape.num_kv_heads * shape.head_dim
        per_layer = calibration_tokens * shape.hidden_size * 4 + kept_tokens * shape.hidden_size * 2 + 4 * width**2 * 8
        return shape.num_layers * per_layer

    def path(self, layer_idx: int) -> Path:
        return self.folder / f"layer-{layer_idx:05d}.pt"

    def save(self, layer_idx: int, calibrated: LayerPass, prepared: PreparedLayer) -> None:
        state = {"output": calibrated.output, "kept": calibrated.kept, "normalised": calibrated.normalised}
        torch.save({"calibrated": state, "prepared": prepared.saved()}, self.path(layer_idx))

    def load(self, layer_idx: int) -> tuple[LayerPass, dict] | None:
        """The layer's calibration pass (without the moment, which the saved preparation replaces) and saved
        preparation; None when the spectrum pass did not keep it. The file is removed once read."""
        path = self.path(layer_idx)
        if not path.is_file():
            return None
        state = torch.load(path, weights_only=False)
        path.unlink()
        return LayerPass(**state["calibrated"]), state["prepared"]


@dataclass
class LayerRecord:
    """What the report and the config keep of a converted layer once its weights are written and freed."""

    qk_nope_head_dim: int
    rope_frequency_indices: list[int]
    stats: dict
    rope_key_heads: list[int] | None = None


def layer_moment(stream: Stream, moment: torch.Tensor | None) -> torch.Tensor:
    # Weight-only SVD decomposes in the isotropic moment whatever was calibrated: in the text's moments it would be
    # activation-aware PCA, not the SVD baseline.
    if moment is None or stream.settings.init == "svd":
        return weight_only_moment(stream.shape.hidden_size)
    return moment


def collect_spectra(
    stream: Stream, plan: RankPlan, sequences: torch.LongTensor | None, cache: LayerCache | None = None
) -> list[torch.Tensor]:
    """First pass for `--rank-allocation spectrum`: every layer's spectrum at the uniform rank, in the balanced
    metric, layer by layer (reads and runs each source layer once). With `cache`, what the main pass can reuse of
    each layer is written there."""
    hidden = None
    keep = 0
    if sequences is not None:
        hidden = stream.embed(sequences, stream.reader.read("model.embed_tokens.weight"))
        keep = stream.settings.kept_sequences(sequences.shape[1])
    spectra = []
    bar = tqdm(range(stream.shape.num_layers), desc="spectra (pass 1)", unit="layer", disable=not stream.progress)
    for layer_idx in bar:
        layer = stream.source_layer(layer_idx)
        moment = normalised = calibrated = None
        if hidden is not None:
            last = layer_idx == stream.shape.num_layers - 1
            config, window = stream.skeleton.config, stream.windows[layer_idx]
            calibrated = run_layer(
                layer, hidden, config, stream.rotary, stream.device, window, moment=True, keep=keep,
                forward=not last, normalised=stream.normalises,
            )
            hidden, moment, normalised = calibrated.output, calibrated.moment, calibrated.normalised
        moment = layer_moment(stream, moment)
        prepared = prepare_streamed(stream, layer, moment, plan, normalised)
        with single_thread():
            # the spectrum alone: the weights at this size are never used
            spectra.append(prepared.spectrum(stream.settings.first_key_scale))
        if cache is not None and calibrated is not None:
            cache.save(layer_idx, calibrated, prepared)
        del layer, prepared, calibrated, moment
        bar.set_postfix(rss=f"{rss() / 2**30:.2f}GiB")
    return spectra


def convert_layers(
    stream: Stream, plan: RankPlan, sequences: torch.LongTensor | None, check_ids: torch.LongTensor, writer: ShardWriter,
    cache: LayerCache | None = None,
) -> tuple[list[LayerRecord], list[dict], dict, MLAConfig]:
    """The main pass: every layer converted, written and freed in turn (`cache`: what the spectrum pass kept of
    each layer, read instead of computed again). Returns the layers' records, their refinement stats, the check
    against the source and the MLA config the layers were built with."""
    settings, meter, device = stream.settings, stream.meter, stream.device
    config = stream.skeleton.config
    deepseek = settings.target == "deepseek"
    keep = settings.kept_sequences(sequences.shape[1]) if sequences is not None else 0
    refine_options = settings.refine
    generator = torch.Generator().manual_seed(settings.options.seed)

    with meter.stage("embeddings"):
        embed = stream.reader.read("model.embed_tokens.weight")
        writer.add("model.embed_tokens.weight", embed)
        # hidden: [sequences, seq, hidden]; the check streams: [2, check_seq, hidden]
        hidden = stream.embed(sequences, embed) if sequences is not None else None
        source_check = stream.embed(check_ids, embed)
        mla_check = source_check.clone()
        # sequential refinement: the converted model's hidden states on the kept sequences [keep, seq, hidden]
        mla_hidden = hidden[:keep].clone() if settings.sequential and hidden is not None else None
        del embed

    mla: MLAStream | None = None
    records, refine_stats = [], []
    bar = tqdm(range(stream.shape.num_layers), desc="converting", unit="layer", disable=not stream.progress)
    for layer_idx in bar:
        window = stream.windows[layer_idx]
        with meter.stage("read"):
            source_layer = stream.source_layer(layer_idx)
            # float32 views of the source layer's tensors: the MLA layer shares its norms and MLP with it
            source_state = source_layer.state_dict()
        moment = kept = normalised = layer_input = source_hidden = saved = None
        if hidden is not None:
            with meter.stage("calibrate"):
                last = layer_idx == stream.shape.num_layers - 1
                cached = cache.load(layer_idx) if cache is not None else None
                if cached is not None:
                    calibrated, saved = cached
                else:
                    calibrated = run_layer(
                        source_layer, hidden, config, stream.rotary, device, window, moment=True, keep=keep,
                        forward=not last, normalised=stream.normalises,
                    )
                # DeepSeek's latent norm is measured on this layer's inputs: they are kept until it is
                layer_input = hidden if deepseek else None
                # the residual target: the source's hidden states entering this layer on the kept sequences
                if mla_hidden is not None and settings.refine_inputs == "residual":
                    source_hidden = hidden[:keep].clone()
                hidden, moment, kept, normalised = calibrated.output, calibrated.moment, calibrated.kept, calibrated.normalised
                del calibrated
        if saved is None:
            moment = layer_moment(stream, moment)

        def with_norm(weights: MLAAttentionWeights, sequences: int | None = None) -> MLAAttentionWeights:
            """`weights` under DeepSeek's latent norm, measured on the first `sequences` (None: all)."""
            if not deepseek:
                return weights
            inputs = layer_input if sequences is None else layer_input[:sequences]
            with meter.stage("latent norm"):
                return with_layer_latent_norm(
                    weights, moment, lambda: attention_inputs(source_layer, inputs, device), layer_idx
                )

        # One candidate per K/V balance (`--key-scale search`), decomposed and scored in turn along the grid from
        # the balanced one (`search_key_scale`): only the best is kept. Each is scored as it will be used: with its
        # anchor and latent norm in place (on the first sequences).
        with meter.stage("decompose"):
            prepared = prepare_streamed(stream, source_layer, moment, plan, normalised, saved)
            del saved
        target = None

        def score(factor: float) -> tuple[float, MLAAttentionWeights]:
            nonlocal mla, target
            with meter.stage("decompose"):
                candidate = decompose_streamed(stream, prepared, plan, layer_idx, factor)
            scored = with_norm(candidate, KEY_SCALE_SEARCH_NORM_SEQUENCES)
            mla = mla or MLAStream.start(stream, plan, scored, source_layer)
            with meter.stage("key-scale search"):
                target = target or KeyScaleTarget.of(stream, mla, source_layer, kept, window)
                return target.error(stream, mla, layer_idx, source_state, scored), candidate

        if settings.searches_key_scale:
            _, weights = search_key_scale(settings.key_scale_grid, settings.first_key_scale, score)
        else:
            with meter.stage("decompose"):
                weights = decompose_streamed(stream, prepared, plan, layer_idx, settings.key_scale_grid[0])
        del target, prepared
        weights = with_norm(weights)
        mla = mla or MLAStream.start(stream, plan, weights, source_layer)
        mla_layer = mla.layer(layer_idx, source_state, weights, device)
        stats = {}
        if refine_options.steps > 0:
            with meter.stage("refine"), eager_on_cpu([config, mla.config], device):
                source_inputs = windows(kept, refine_options.window).to(device, torch.float32)
                inputs = source_inputs
                if mla_hidden is not None:
                    # the converted model's attention inputs on the same tokens, rounded as the source's are kept
                    mla_kept = torch.cat(
                        [part.to("cpu", torch.bfloat16) for part in attention_inputs(mla_layer, mla_hidden, device)]
                    )
                    inputs = windows(mla_kept, refine_options.window).to(device, torch.float32)
                    del mla_kept
                offset = None
                if source_hidden is not None:
                    offset = windows(source_hidden - mla_hidden, refine_options.window).to(device, torch.float32)
                stats = refine_layer(
                    source_layer.self_attn,
                    mla_layer.self_attn,
                    inputs,
                    rope_tables(stream.rotary, source_inputs),
                    rope_tables(mla.rotary, inputs),
                    refine_options,
                    generator,
                    source_inputs=source_inputs,
                    target_offset=offset,
                )
                del inputs, source_inputs, offset, source_hidden
        if mla_hidden is not None and layer_idx < stream.shape.num_layers - 1:
            with meter.stage("refine"):
                mla_hidden = run_layer(mla_layer, mla_hidden, mla.config, mla.rotary, device, window).output
        with meter.stage("verify"):
            source_check = run_layer(source_layer, source_check, config, stream.rotary, device, window).output
            mla_check = run_layer(mla_layer, mla_check, mla.config, mla.rotary, device, window).output
        with meter.stage("write"):
            for name, tensor in mla_layer.state_dict().items():
                writer.add(f"model.layers.{layer_idx}.{name}", tensor)
        records.append(
            LayerRecord(weights.qk_nope_head_dim, list(weights.rope_frequency_indices), weights.stats, weights.rope_key_heads)
        )
        refine_stats.append(stats)
        del source_state, source_layer, mla_layer, weights, kept, moment, layer_input
        bar.set_postfix(rss=f"{rss() / 2**30:.2f}GiB")

    with meter.stage("verify"):
        verification = final_check(stream, writer, source_check, mla_check)
    return records, refine_stats, verification, mla.config


def final_check(stream: Stream, writer: ShardWriter, source_check: torch.Tensor, mla_check: torch.Tensor) -> dict:
    """The final norm and the LM head (written too), then `verify`'s comparison of the two streams' logits."""
    with torch.device("meta"):
        norm = type(stream.skeleton.model.norm)(stream.shape.hidden_size, eps=stream.source_config.rms_norm_eps)
    norm_weight = stream.reader.read("model.norm.weight")
    writer.add("model.norm.weight", norm_weight)
    norm = load_module(norm, {"weight": norm_weight}, torch.device("cpu"))
    tied = bool(stream.source_config.tie_word_embeddings)
    head = stream.reader.read("model.embed_tokens.weight" if tied else "lm_head.weight")
    if not tied:
        writer.add("lm_head.weight", head)
    with torch.no_grad():
        # logits: [2, check_seq, vocab], the head cast to float32 a slice of the vocabulary at a time
        logits = [
            torch.cat([nn.functional.linear(norm(states), part.to(torch.float32)) for part in head.split(8192)], dim=-1)
            for states in (mla_check, source_check)
        ]
    return logit_agreement(*logits)
