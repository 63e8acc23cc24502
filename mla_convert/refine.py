"""Layer-wise refinement: after the closed-form start, fit each MLA attention layer to its source layer by gradient
descent on calibration activations.

One layer at a time, with inputs recorded from the source model (so no full-model backward pass is needed), the MLA
projections are trained to minimise the relative squared error between the MLA layer's attention output and the
source layer's on the same hidden states. Sequential refinement gives the MLA layer the converted model's own
hidden states on the same tokens instead, and (optionally) adds to the target what the earlier layers left wrong in
the residual stream (`target_offset`). After the steps, the output projection is solved outright: with the rest
of the layer fixed, the output is linear in it (`solve_output_projection`). Minutes on a CPU, where healing takes
hours. The same measurement, without training, scores candidate decompositions (`AttentionTargets`).
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .families import layer_windows


# The output solve needs at least this many training tokens per input of o_proj (heads x v_head_dim)
SOLVE_TOKENS_PER_INPUT = 4


@dataclass
class RefineOptions:
    # SmolLM2 at 0.25: 100 steps 1.717x the source's perplexity, 300 steps 1.586x (docs/results.md); in bfloat16
    # (`precision`) the 300 take 1.2x the time float32's 100 took
    steps: int = 300
    lr: float = 3e-4
    # windows of recorded inputs per step
    batch_size: int = 8
    # tokens per training window: the recorded sequences are cut into windows of this length, each attending only
    # within itself (source and MLA alike), which keeps attention cheap next to the projections
    # (128 measured best on SmolLM2 at 25% budget: 256 and 512 fit worse in the same time)
    window: int = 128
    # windows held out of training, to measure what refinement bought
    eval_windows: int = 8
    # the training steps' arithmetic: "bfloat16" (autocast: the products in bfloat16, the weights, Adam and the loss
    # in float32) or "float32"; the held-out scores are float32 either way
    precision: str = "float32"
    # after the steps, o_proj solved by least squares on the training windows (`solve_output_projection`), kept
    # where the held-out windows agree
    solve_output: bool = True


def relative_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)


def windows(inputs: torch.Tensor, window: int) -> torch.Tensor:
    """Recorded attention inputs `[sequences, seq, hidden]` -> windows `[sequences * (seq // w), w, hidden]`, in the
    recorded dtype (the caller casts what it uses)."""
    window = min(window, inputs.shape[1])
    usable = inputs.shape[1] // window * window
    return inputs[:, :usable].reshape(-1, window, inputs.shape[-1])


@contextmanager
def attention_implementation(models: list[nn.Module], device: torch.device):
    """Eager attention on the CPU while refining: for these short windows it trains faster than sdpa there."""
    previous = [model.config._attn_implementation for model in models]
    if device.type == "cpu":
        for model in models:
            model.set_attn_implementation("eager")
    try:
        yield
    finally:
        for model, implementation in zip(models, previous):
            model.set_attn_implementation(implementation)


def position_embeddings(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's RoPE tables for positions `0 .. window - 1` of `inputs` `[batch, window, hidden]`."""
    return rope_tables(model.model.rotary_emb, inputs)


def rope_tables(rotary_emb: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_emb`'s tables for positions `0 .. window - 1` of `inputs` `[batch, window, hidden]`."""
    position_ids = torch.arange(inputs.shape[1], device=inputs.device)[None]
    return rotary_emb(inputs[:1], position_ids)


def causal_mask(inputs: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """Additive causal mask `[1, 1, window, window]` for `inputs` `[batch, window, hidden]`; with `sliding_window`,
    each position sees only the last `sliding_window` positions (itself included), as a local layer attends."""
    window = inputs.shape[1]
    hidden = torch.ones(window, window, dtype=torch.bool, device=inputs.device).triu(1)
    if sliding_window is not None:
        hidden |= torch.ones_like(hidden).tril(-sliding_window)
    return torch.zeros(window, window, dtype=inputs.dtype, device=inputs.device).masked_fill(
        hidden, torch.finfo(inputs.dtype).min
    )[None, None]


def _attend(attention: nn.Module, inputs: torch.Tensor, rope, sliding_window: int | None = None) -> torch.Tensor:
    # The mask spelled out: eager attention reads a missing mask as no mask at all (bidirectional), sdpa as causal.
    mask = causal_mask(inputs, sliding_window)
    return attention(hidden_states=inputs, position_embeddings=rope, attention_mask=mask)[0]


@torch.no_grad()
def attention_outputs(
    attention: nn.Module, inputs: torch.Tensor, rope, batch_size: int, sliding_window: int | None = None
) -> torch.Tensor:
    """`attention` applied to `inputs` `[windows, window, hidden]`, batch by batch: `[windows, window, hidden]`."""
    return torch.cat([_attend(attention, batch, rope, sliding_window) for batch in inputs.split(batch_size)])


class AttentionTargets:
    """The source's attention outputs on the first `count` windows of every layer's recorded inputs, computed once,
    to score candidate conversions against (`errors`)."""

    def __init__(self, source_model: nn.Module, layer_inputs: list[torch.Tensor], window: int = 256, count: int = 8):
        self.device = next(source_model.parameters()).device
        # per layer: [count, window, hidden]
        self.inputs = [target_inputs(inputs, self.device, window, count) for inputs in layer_inputs]
        # Local layers attend within their window, the source's and the MLA model's alike
        self.sliding_windows = layer_windows(source_model.config)
        with torch.no_grad(), attention_implementation([source_model], self.device):
            rope = position_embeddings(source_model, self.inputs[0])
            self.targets = [
                attention_outputs(
                    source_model.model.layers[layer_idx].self_attn, inputs, rope, count, self.sliding_windows[layer_idx]
                )
                for layer_idx, inputs in enumerate(self.inputs)
            ]

    @torch.no_grad()
    def errors(self, model: nn.Module) -> list[float]:
        """Per layer, the relative error of `model`'s attention output against the source's."""
        with attention_implementation([model], self.device):
            rope = position_embeddings(model, self.inputs[0])
            return [
                attention_error(model.model.layers[i].self_attn, inputs, target, rope, self.sliding_windows[i])
                for i, (inputs, target) in enumerate(zip(self.inputs, self.targets))
            ]


def target_inputs(inputs: torch.Tensor, device: torch.device, window: int = 256, count: int = 8) -> torch.Tensor:
    """The windows of one layer's recorded inputs that candidates are scored on: `[count, window, hidden]` float32."""
    return windows(inputs, window)[:count].to(device, torch.float32)


@contextmanager
def expanded_form(attention: nn.Module):
    """An `MLAAttention` (anything else passes through) computing in its expanded form: for a one-off score, the
    absorbed form would first fold its weights in float64 (`MLAAttention._fold`), which costs more than the score
    at the 8B shape and is dropped at the next training step or candidate."""
    config = getattr(attention, "config", None)
    previous = getattr(config, "attention_path", None)
    if previous is None:
        yield
        return
    config.attention_path = "expanded"
    try:
        yield
    finally:
        config.attention_path = previous


@torch.no_grad()
def attention_error(
    attention: nn.Module, inputs: torch.Tensor, target: torch.Tensor, rope, sliding_window: int | None = None
) -> float:
    """The relative error of one attention layer's output on `inputs` against the source's `target`."""
    with expanded_form(attention):
        output = attention_outputs(attention, inputs, rope, len(inputs), sliding_window)
    return float(relative_error(output, target))


def refine_layer(
    source_attention: nn.Module,
    attention: nn.Module,
    inputs: torch.Tensor,
    source_rope: tuple[torch.Tensor, torch.Tensor],
    rope: tuple[torch.Tensor, torch.Tensor],
    options: RefineOptions,
    generator: torch.Generator,
    source_inputs: torch.Tensor | None = None,
    target_offset: torch.Tensor | None = None,
) -> dict:
    """Trains `attention` (an `MLAAttention`) in place so that its output on `inputs` reproduces `source_attention`'s
    output on `source_inputs` (None: on `inputs` too).

    `inputs`: `[windows, window, hidden]` attention inputs (after the layer norm) that the MLA layer is fitted on:
    recorded from the source model, or from the converted model (sequential refinement), whose windows then hold
    the same tokens as `source_inputs`' windows. `target_offset` (same shape; None: none) is added to the source's
    output: the residual stream's error that the layer should undo. Returns the relative output error on the
    held-out windows before and after; the weights are restored when training made that error worse.
    """
    source_inputs = inputs if source_inputs is None else source_inputs
    held_out = min(options.eval_windows, len(inputs) - 1)
    split = len(inputs) - held_out
    train_inputs, eval_inputs = inputs[:split], inputs[split:]
    train_source, eval_source = source_inputs[:split], source_inputs[split:]
    train_offset, eval_offset = (None, None) if target_offset is None else (target_offset[:split], target_offset[split:])
    if held_out == 0:
        # A single window: judge on what was trained on rather than on nothing.
        eval_inputs, eval_source, eval_offset = train_inputs, train_source, train_offset
    batch_size = min(options.batch_size, len(train_inputs))
    # A local layer (the MLA layer mirrors its source layer's window) is fitted as it attends.
    sliding_window = getattr(attention, "sliding_window", None)
    # targets: [windows, window, hidden]
    train_targets = attention_outputs(source_attention, train_source, source_rope, batch_size, sliding_window)
    eval_targets = attention_outputs(source_attention, eval_source, source_rope, batch_size, sliding_window)
    if target_offset is not None:
        train_targets, eval_targets = train_targets + train_offset, eval_targets + eval_offset

    def held_out_error() -> float:
        with expanded_form(attention):
            output = attention_outputs(attention, eval_inputs, rope, batch_size, sliding_window)
        return float(relative_error(output, eval_targets))

    before = held_out_error()
    snapshot = {name: tensor.detach().clone() for name, tensor in attention.state_dict().items()}
    parameters = list(attention.parameters())
    requires_grad = {parameter: parameter.requires_grad for parameter in parameters}
    for parameter in parameters:
        parameter.requires_grad_(True)
    # fused: one pass over each parameter per step and no temporaries (the foreach form allocates the second
    # moments' square roots, 4 bytes per parameter, every step: 8% of refinement at the 8B shape on a CPU); the
    # same update, rounded differently in the last bits
    optimizer = torch.optim.Adam(parameters, lr=options.lr, fused=True)
    # Cosine decay to zero: the last steps polish instead of jittering around the optimum.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / max(options.steps, 1)))
    )
    low_precision = options.precision == "bfloat16"
    attention.train()
    try:
        for _ in range(options.steps):
            index = torch.randint(len(train_inputs), (batch_size,), generator=generator).to(train_inputs.device)
            with torch.autocast(train_inputs.device.type, dtype=torch.bfloat16, enabled=low_precision):
                # output: [batch_size, window, hidden]
                output = _attend(attention, train_inputs[index], rope, sliding_window)
            loss = relative_error(output.float(), train_targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    finally:
        attention.eval()
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)
            parameter.grad = None
    after = held_out_error()
    solved = False
    # Fewer tokens than a few per o_proj input and the fit follows the windows' noise (kept out by the held-out
    # check, but with weights grown along directions the windows barely excite)
    enough = train_inputs.shape[0] * train_inputs.shape[1] >= SOLVE_TOKENS_PER_INPUT * attention.o_proj.in_features
    if options.solve_output and enough:
        trained = {name: tensor.clone() for name, tensor in attention.o_proj.state_dict().items()}
        solve_output_projection(attention, train_inputs, train_targets, rope, batch_size, sliding_window)
        solved_error = held_out_error()
        solved = solved_error <= after
        if solved:
            after = solved_error
        else:
            attention.o_proj.load_state_dict(trained)
    kept = after <= before
    if not kept:
        # A too-large learning rate or too few recorded inputs: never hand back a layer worse than the start.
        attention.load_state_dict(snapshot)
    return {
        "refine_error_before": before, "refine_error_after": min(after, before), "refine_kept": kept,
        "refine_output_solved": solved and kept,
    }  # fmt: skip


@torch.no_grad()
def solve_output_projection(
    attention: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, rope, batch_size: int,
    sliding_window: int | None = None, ridge: float = 1e-3,
) -> None:
    """Sets `attention.o_proj` (weight, and bias if any) to the least-squares fit of `targets` `[windows, window,
    hidden]` from what the rest of the layer hands it on `inputs`: with everything before it fixed, the layer's
    output is linear in `o_proj`, so the optimum Adam only approaches in a few hundred steps is one solve. `ridge`
    (relative to the mean of the normal matrix's diagonal) keeps the weights on directions the windows hardly excite
    small: on SmolLM2 at 0.25, 1e-6 gave o_proj up to 4x Adam's norm for 1.524x the source's perplexity, 1e-3 at
    most 1.3x for 1.529x, 1e-2 less than Adam's for 1.557x (docs/results.md)."""
    projection = attention.o_proj
    width = projection.in_features + (projection.bias is not None)
    # the normal equations, accumulated batch by batch in float64: gram [width, width], cross [width, hidden]
    gram = torch.zeros(width, width, dtype=torch.float64, device=inputs.device)
    cross = torch.zeros(width, projection.out_features, dtype=torch.float64, device=inputs.device)
    captured = []
    hook = projection.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    try:
        with expanded_form(attention):
            for batch, target in zip(inputs.split(batch_size), targets.split(batch_size)):
                _attend(attention, batch, rope, sliding_window)
                # features: [batch * window, heads * v_head_dim (+ 1 for the bias)]
                features = captured.pop().reshape(-1, projection.in_features).float()
                if projection.bias is not None:
                    features = torch.cat([features, features.new_ones(len(features), 1)], dim=1)
                gram += (features.T @ features).double()
                cross += (features.T @ target.reshape(-1, projection.out_features).float()).double()
    finally:
        hook.remove()
    gram.diagonal().add_(ridge * gram.diagonal().mean().clamp_min(1e-30))
    # solution: [width, hidden], o_proj's weight transposed (and its bias as the last row)
    solution = torch.linalg.solve(gram, cross)
    projection.weight.copy_(solution[: projection.in_features].T)
    if projection.bias is not None:
        projection.bias.copy_(solution[-1])
