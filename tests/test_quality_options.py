"""The conversion options that trade quality per KV byte: where RoPE goes, the K/V balance, per-layer latent sizes,
and layer-wise refinement. Each against the source model, on pico checkpoints."""

import json
from dataclasses import replace

import pytest
import torch

import mla_convert  # noqa: F401  (registers the MLA model with the Auto classes)
from mla_convert.calibrate import collect_input_moments
from mla_convert.calibration_text import calibration_sequences
from mla_convert.conversion_options import DEEPSEEK_REFINE_STEPS, KEY_SCALE_GRID
from mla_convert.convert import ConversionOptions, convert
from mla_convert.data import EVALUATION_PART, load_text
from mla_convert.decompose import (
    DecomposeOptions,
    SourceAttention,
    decompose_layer,
    joint_latent,
    nope_shrink_factors,
    rope_placement,
    split_rope,
)
from mla_convert.errors import MLAConvertError
from mla_convert.plan import SourceShape, allocate_ranks
from mla_convert.refine import (
    AttentionTargets,
    RefineOptions,
    _attend,
    attention_outputs,
    position_embeddings,
    refine_layer,
    relative_error,
    solve_output_projection,
)
from mla_convert.settings import fast_bfloat16, refine_precision
from mla_convert.sources import load_source
from mla_convert.stream import KnownOutput, search_key_scale

from conftest import byte_tokenizer, load_causal_lm as load


STRATEGIES = ("rorope", "freqfold", "partial")


def held_out_ids(wikitext, length: int = 128, rows: int = 4) -> torch.LongTensor:
    text, _ = load_text(str(wikitext), EVALUATION_PART)
    ids = byte_tokenizer()(text[: 4 * length * rows], add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: length * rows]).view(rows, length)


def options(wikitext, **overrides) -> ConversionOptions:
    values = dict(calibration=str(wikitext), calibration_tokens=2048, calibration_seq_len=128, refine_tokens=2048)
    values.update(overrides)
    return ConversionOptions(**values)


# ---------------------------------------------------------------------------------------------------- full budget


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_option_is_exact_at_full_budget(tmp_path, pico_folders, wikitext, strategy):
    """Full budget keeps every key dimension rotated and the latent as wide as V: whatever the options, the
    converted model computes what the source computes."""
    output = tmp_path / strategy
    settings = options(wikitext, kv_budget=1.0, rope_strategy=strategy, rank_allocation="spectrum", refine_steps=20)
    report = convert(str(pico_folders["qwen2"]), output, settings)
    assert report["exact"] and report["refine_steps"] == 0
    source, model = load(pico_folders["qwen2"]), load(output)
    input_ids = held_out_ids(wikitext, rows=2)
    with torch.no_grad():
        expected, actual = source(input_ids).logits, model(input_ids).logits
    assert float((actual - expected).abs().max() / expected.abs().max()) < 1e-4


# ---------------------------------------------------------------------------------------------------- RoPE placement


def random_source(num_heads=4, num_kv_heads=2, head_dim=16, hidden=32, seed=0) -> SourceAttention:
    generator = torch.Generator().manual_seed(seed)

    def weight(rows, cols):
        return torch.randn(rows, cols, generator=generator, dtype=torch.float64)

    return SourceAttention(
        q_weight=weight(num_heads * head_dim, hidden),
        k_weight=weight(num_kv_heads * head_dim, hidden),
        v_weight=weight(num_kv_heads * head_dim, hidden),
        o_weight=weight(hidden, num_heads * head_dim),
        q_bias=None, k_bias=None, v_bias=None, o_bias=None,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
    )


def moments(source: SourceAttention, input_moment: torch.Tensor):
    k = torch.cat((source.k_weight, torch.zeros(source.k_weight.shape[0], 1, dtype=torch.float64)), dim=1)
    q = torch.cat((source.q_weight, torch.zeros(source.q_weight.shape[0], 1, dtype=torch.float64)), dim=1)
    q = q.view(source.num_heads, source.head_dim, -1)
    return k @ input_moment @ k.T, torch.einsum("hdx,xy,hey->hde", q, input_moment, q)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_split_rope_reproduces_every_unrotated_score(strategy):
    """Before rotation, the kept components (shared key) and the rest (NoPE key) add up to the source's scores:
    the mix is orthonormal and folded into the query, for every strategy and RoPE size."""
    source = random_source()
    x = torch.randn(50, source.hidden_size + 1, dtype=torch.float64)
    x[:, -1] = 1
    key_moment, query_moment = moments(source, x.T @ x / len(x))
    for rope_dim in (2, 8, 16, 30):
        placement = rope_placement(key_moment, query_moment, 2, 16, rope_dim, strategy=strategy)
        assert len(placement.kept) == rope_dim // 2
        q_nope, q_pe, k_pe, k_nope, nope_dim = split_rope(source, placement)
        # per head: [tokens, dims]
        q = (x[:, :-1] @ source.q_weight.T).view(50, 4, 16)
        k = (x[:, :-1] @ source.k_weight.T).view(50, 2, 16)
        scores = torch.einsum("thd,shd->hts", q, k.repeat_interleave(2, dim=1))
        qn, qp = (x @ q_nope.T).view(50, 4, nope_dim), (x @ q_pe.T).view(50, 4, rope_dim)
        kn, kp = (x @ k_nope.T).view(50, 2, nope_dim).repeat_interleave(2, dim=1), x @ k_pe.T
        split = torch.einsum("thd,shd->hts", qn, kn) + torch.einsum("thd,sd->hts", qp, kp)
        torch.testing.assert_close(split, scores, rtol=1e-9, atol=1e-9)


def test_rorope_keeps_rope_where_losing_it_costs_score_error():
    """A slow frequency barely rotates over the context, so its key energy is no reason to keep its RoPE: the
    score-error rule spends the shared key on fast frequencies, the energy rule (no frequencies) does not."""
    source = random_source(num_kv_heads=1, num_heads=2)
    key_moment = torch.eye(16, dtype=torch.float64)
    # the slowest frequency (pair 7: dims 7 and 15) carries ten times the energy of the others
    key_moment[7, 7] = key_moment[15, 15] = 10.0
    query_moment = torch.eye(16, dtype=torch.float64).expand(2, -1, -1)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    by_energy = rope_placement(key_moment, query_moment, 1, 16, 4, inv_freq=None)
    by_error = rope_placement(key_moment, query_moment, 1, 16, 4, inv_freq=inv_freq, context=64)
    assert 7 in by_energy.frequency_indices
    assert by_error.frequency_indices == [0, 1]


def test_partial_rope_keeps_whole_heads_and_freqfold_rotates_within_its_group():
    source = random_source()
    x = torch.randn(60, source.hidden_size + 1, dtype=torch.float64)
    key_moment, query_moment = moments(source, x.T @ x / len(x))
    partial = rope_placement(key_moment, query_moment, 2, 16, 8, strategy="partial")
    assert torch.equal(partial.mix, torch.eye(2, dtype=torch.float64).expand_as(partial.mix))
    folded = rope_placement(key_moment, query_moment, 2, 16, 8, strategy="freqfold")
    assert all(len(group) == 2 for group in folded.groups)
    for _, group, frequency in folded.kept:
        assert frequency in folded.groups[group]


def test_nope_shrink_is_the_stand_in_with_least_score_error():
    """A component that loses RoPE contributes `c q.k` in place of `q.R(theta delta)k`. Over 2-D queries and keys
    at all relative angles and at every causal distance of a window (near distances weighing more, as the placement judges them), the
    factor `--nope-shrink` uses errs least: less than keeping the term unrotated (c = 1, what the conversion did
    before) and than dropping it (c = 0), and a nudge either way makes it worse."""
    context = 256
    inv_freq = torch.tensor([1.0, 0.1, 0.01, 0.0001], dtype=torch.float64)
    factors = nope_shrink_factors(inv_freq, context)
    # the weight of distance delta: how often it occurs in causal windows, times attention's decay with distance
    delta = torch.arange(context, dtype=torch.float64)
    weight = (context - delta) / (1 + delta)
    weight = weight / weight.sum()
    # isotropic pairs: unit queries at evenly spread angles `a` to the key, q.k = cos a, q x k = -sin a
    angle = torch.arange(64, dtype=torch.float64) * 2 * torch.pi / 64
    unrotated, cross = torch.cos(angle), -torch.sin(angle)
    # q . R(phi) k = cos(phi) q.k + sin(phi) (q x k)
    for frequency, factor in zip(inv_freq, factors):
        phi = frequency * delta

        def error(c: float) -> float:
            rotated = torch.cos(phi)[:, None] * unrotated + torch.sin(phi)[:, None] * cross
            return float((weight[:, None] * (rotated - c * unrotated).pow(2)).sum(0).mean())

        best = error(float(factor))
        assert best <= min(error(1.0), error(0.0)) + 1e-12
        assert best < error(float(factor) + 0.05) and best < error(float(factor) - 0.05)
    # slow frequencies keep their term, fast ones shrink
    assert factors[-1] > 0.99 and factors[0] < 0.5


def test_nope_shrink_scales_only_the_nope_key_per_frequency():
    """With a latent wide enough to be lossless, the shrunk conversion's NoPE key is the unshrunk one times each
    dimension's frequency factor; the shared RoPE key, the query and the values are untouched."""
    source = random_source()
    x = torch.randn(80, source.hidden_size + 1, dtype=torch.float64)
    x[:, -1] = 1
    input_moment = x.T @ x / len(x)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    lossless = source.hidden_size + 1

    def convert(shrink: bool):
        options = DecomposeOptions(rope_frequencies=[0, 2, 4, 6], nope_shrink=shrink)
        return decompose_layer(source, input_moment, lossless, 8, inv_freq=inv_freq, options=options)

    plain, shrunk = convert(False), convert(True)
    torch.testing.assert_close(shrunk.q_weight, plain.q_weight)
    torch.testing.assert_close(shrunk.kv_a_weight[-8:], plain.kv_a_weight[-8:])

    def nope_key_and_value(layer):
        # per query head [NoPE key (16); value (16)] from the latent: [heads, 32, hidden]
        return (layer.kv_b_weight @ layer.kv_a_weight[:-8]).view(4, 32, -1)

    factors = nope_shrink_factors(inv_freq, DecomposeOptions.rope_context).repeat(2)
    expected_key = factors[:, None] * nope_key_and_value(plain)[:, :16]
    torch.testing.assert_close(nope_key_and_value(shrunk)[:, :16], expected_key, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(nope_key_and_value(shrunk)[:, 16:], nope_key_and_value(plain)[:, 16:])


# ---------------------------------------------------------------------------------------------------- ranks


def test_allocate_ranks_spends_the_exact_total_where_the_spectrum_is_flat():
    sharp = torch.tensor([100.0] + [0.01] * 31)
    flat = torch.ones(32)
    ranks = allocate_ranks([sharp, flat, sharp], total_rank=48, min_rank=4)
    assert sum(ranks) == 48 and min(ranks) >= 4
    assert ranks[1] > ranks[0] and ranks[0] == ranks[2]
    with pytest.raises(MLAConvertError, match="cannot spread"):
        allocate_ranks([sharp, flat], total_rank=70)


def test_spectrum_allocation_keeps_the_total_cache_and_round_trips(tmp_path, pico_folders, wikitext):
    output = tmp_path / "spectrum"
    report = convert(
        str(pico_folders["llama-mha"]), output, options(wikitext, kv_budget=0.3, rank_allocation="spectrum")
    )
    # llama-mha: 4 kv heads x head_dim 16 x (K, V) = 128 numbers per token and layer
    ranks, rope_dim = report["kv_lora_ranks"], report["qk_rope_head_dim"]
    assert sum(rank + rope_dim for rank in ranks) == 2 * round(0.3 * 128)
    assert len(set(ranks)) > 1
    assert json.loads((output / "conversion.json").read_text())["kv_lora_ranks"] == ranks
    model = load(output)
    assert model.config.kv_lora_ranks == ranks
    input_ids = held_out_ids(wikitext, length=20, rows=2)
    with torch.no_grad():
        cache = model(input_ids, use_cache=True).past_key_values
    assert [layer.latent.shape[-1] for layer in cache.layers] == ranks
    generated = model.generate(input_ids[:1, :8], max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert torch.equal(generated, model.generate(input_ids[:1, :8], max_new_tokens=8, do_sample=False,
                                                 eos_token_id=None, use_cache=False))


# ---------------------------------------------------------------------------------------------------- search, refine


def test_key_scale_search_picks_per_layer_the_balance_closest_to_the_source(tmp_path, pico_folders, wikitext):
    """The search keeps, per layer, the K/V balance whose conversion reproduces the source layer's attention output
    best: each layer of the searched model is the best of the conversions at every fixed factor of the grid."""
    source_model, tokenizer = load_source(str(pico_folders["llama-gqa"]))
    shape = SourceShape.from_config(source_model.config)
    # uniform ranks: every fixed factor then converts to the same latent sizes as the search
    settings = options(wikitext, kv_budget=0.25, refine_steps=0, rank_allocation="uniform")
    # the windows the search scores on: the source's attention inputs on the first calibration sequences
    sequences, _ = calibration_sequences(None, tokenizer, settings)
    _, layer_inputs = collect_input_moments(source_model, sequences, keep_sequences=len(sequences))
    targets = AttentionTargets(source_model, layer_inputs)

    def build(key_scale):
        output = tmp_path / f"key-scale-{key_scale}"
        report = convert(str(pico_folders["llama-gqa"]), output, replace(settings, key_scale=key_scale), progress=False)
        return targets.errors(load(output)), [layer["key_scale_factor"] for layer in report["layers"]]

    # errors[factor][layer]: each layer's attention-output error against the source's, converted at that factor
    errors = {}
    for factor in KEY_SCALE_GRID:
        errors[factor], used = build(factor)
        assert used == [factor] * shape.num_layers
    searched_errors, chosen = build("search")
    for layer_idx in range(shape.num_layers):
        by_factor = {factor: errors[factor][layer_idx] for factor in KEY_SCALE_GRID}
        # the grid matters here: otherwise any choice would pass
        assert max(by_factor.values()) > 1.05 * min(by_factor.values()), by_factor
        assert chosen[layer_idx] == min(by_factor, key=by_factor.get), (layer_idx, by_factor, chosen)
        assert searched_errors[layer_idx] == pytest.approx(min(by_factor.values()), rel=1e-5)


@pytest.mark.parametrize(
    "errors, chosen, scored",
    [
        # x1 is the minimum: x0.5 and x2 are scored to know it, x4 is not
        ({0.5: 3.0, 1.0: 1.0, 2.0: 2.0, 4.0: 5.0}, 1.0, 3),
        # falling towards x0.5: the walk goes down and never looks up
        ({0.5: 1.0, 1.0: 2.0, 2.0: 3.0, 4.0: 4.0}, 0.5, 2),
        # falling towards x4: up to the end of the grid
        ({0.5: 4.0, 1.0: 3.0, 2.0: 2.0, 4.0: 1.0}, 4.0, 4),
        # the minimum at x2, past which the error rises again
        ({0.5: 4.0, 1.0: 3.0, 2.0: 1.0, 4.0: 2.0}, 2.0, 4),
        # ties go to the smaller balance, as a scan of the whole grid keeps the first
        ({0.5: 1.0, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0}, 0.5, 2),
    ],
)
def test_key_scale_search_finds_the_grid_minimum_of_a_single_valley(errors, chosen, scored):
    """The walk from the balanced x1 lands where a scan of every balance would, scoring only those it needs."""
    calls = []

    def score(factor):
        calls.append(factor)
        return errors[factor], f"candidate at x{factor}"

    factor, candidate = search_key_scale(KEY_SCALE_GRID, 1.0, score)
    assert factor == chosen and candidate == f"candidate at x{chosen}"
    assert len(calls) == len(set(calls)) == scored
    assert min(errors, key=lambda factor: (errors[factor], factor)) == chosen


def test_a_kept_query_product_answers_only_the_tensor_it_was_computed_on():
    """The key-scale search reuses the query projection's product across candidates (`KeyScaleTarget`): only for
    the scored windows themselves; any other tensor, a copy or a slice included, goes through the projection."""
    generator = torch.Generator().manual_seed(0)
    projection = torch.nn.Linear(8, 12)
    inputs = torch.randn(3, 5, 8, generator=generator)
    known = KnownOutput(projection, inputs, torch.zeros(3, 5, 12))
    assert torch.equal(known(inputs.split(len(inputs))[0]), torch.zeros(3, 5, 12))
    with torch.no_grad():
        for other in (inputs.clone(), inputs[:2], inputs.transpose(0, 1), torch.randn(3, 5, 8, generator=generator)):
            assert torch.equal(known(other), projection(other))


def test_joint_latent_reports_the_reconstruction_error_it_leaves():
    """The K and V errors in the stats are what reconstructing z = [k_nope ; v] through the latent actually loses on
    the calibration inputs, and they fall to zero at full rank."""
    generator = torch.Generator().manual_seed(0)
    hidden, tokens = 20, 400
    k_nope = torch.randn(16, hidden + 1, generator=generator, dtype=torch.float64)
    v = torch.randn(24, hidden + 1, generator=generator, dtype=torch.float64)
    # inputs: [tokens, hidden + 1], correlated, with the bias's 1 appended
    x = torch.randn(tokens, hidden, generator=generator, dtype=torch.float64)
    x = x @ torch.randn(hidden, hidden, generator=generator, dtype=torch.float64)
    x = torch.cat((x, torch.ones(tokens, 1, dtype=torch.float64)), dim=1)
    input_moment = x.T @ x / tokens
    key_metric = torch.linalg.qr(torch.randn(16, 16, generator=generator, dtype=torch.float64))[0] * 2
    z = x @ torch.cat((k_nope, v)).T  # [tokens, 40]
    previous = None
    for rank in (3, 10, hidden + 1):
        for key_scale in (0.5, 1.0, 4.0):
            down, up_k, up_v, _, stats = joint_latent(k_nope, v, input_moment, rank, key_metric, None, key_scale)
            latent = x @ down.T  # [tokens, rank]
            k_error = (latent @ up_k.T - z[:, :16]).pow(2).sum() / z[:, :16].pow(2).sum()
            v_error = (latent @ up_v.T - z[:, 16:]).pow(2).sum() / z[:, 16:].pow(2).sum()
            # the ridge (1e-7 of the moment's trace) is all that separates the stats from the direct errors
            assert stats["k_nope_rel_error"] == pytest.approx(float(k_error), rel=1e-4, abs=1e-9)
            assert stats["v_rel_error"] == pytest.approx(float(v_error), rel=1e-4, abs=1e-9)
        total = stats["k_nope_rel_error"] + stats["v_rel_error"]
        if previous is not None:
            assert total < previous
        previous = total
    # every direction x can reach is kept: nothing is lost
    assert total < 1e-9


def exact_conversion(tmp_path, pico_folders, wikitext):
    """llama-gqa and its full-budget (exact) conversion, both computing eager attention."""
    output = tmp_path / "exact"
    convert(str(pico_folders["llama-gqa"]), output, options(wikitext, kv_budget=1.0))
    source, model = load(pico_folders["llama-gqa"]), load(output)
    source.set_attn_implementation("eager")
    model.set_attn_implementation("eager")
    return source, model


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_refinement_recovers_a_disturbed_layer(tmp_path, pico_folders, wikitext, precision):
    # The exact conversion, disturbed by noise in every MLA projection, is a layer whose best fit is known (error 0):
    # refinement must take most of the way back to it. Closed-form starts on random pico weights leave too little
    # to gain for a margin that holds on every CPU; tests/test_real_model.py holds refined SmolLM2 to its targets.
    source, model = exact_conversion(tmp_path, pico_folders, wikitext)
    generator = torch.Generator().manual_seed(0)
    # inputs: [windows, window, hidden], unit-scale like the post-norm hidden states the layer sees
    inputs = torch.randn(40, 32, source.config.hidden_size, generator=generator)
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.add_(0.3 * parameter.std() * torch.randn(parameter.shape, generator=generator))
    rope = position_embeddings(source, inputs)
    stats = refine_layer(source.model.layers[0].self_attn, attention, inputs, rope, position_embeddings(model, inputs),
                         RefineOptions(steps=150, lr=3e-3, precision=precision), generator)
    assert stats["refine_kept"]
    assert stats["refine_error_after"] < 0.3 * stats["refine_error_before"], stats
    # bfloat16 is the arithmetic of the steps only: the weights Adam updates stay float32
    assert {parameter.dtype for parameter in attention.parameters()} == {torch.float32}


@pytest.mark.parametrize("bias", [False, True])
def test_the_output_projection_is_solved_to_its_least_squares_optimum(tmp_path, pico_folders, wikitext, bias):
    """With the rest of the layer fixed, the solve puts o_proj where the training loss has no slope left, and no
    other o_proj near it does better; a disturbed layer gets most of its error back from o_proj alone."""
    source, model = exact_conversion(tmp_path, pico_folders, wikitext)
    generator = torch.Generator().manual_seed(0)
    # inputs: [windows, window, hidden]
    inputs = torch.randn(24, 32, source.config.hidden_size, generator=generator)
    rope = position_embeddings(source, inputs)
    targets = attention_outputs(source.model.layers[0].self_attn, inputs, rope, 8)
    attention = model.model.layers[0].self_attn
    if bias:
        attention.o_proj = torch.nn.Linear(attention.o_proj.in_features, attention.o_proj.out_features, bias=True)
    with torch.no_grad():
        attention.o_proj.weight.add_(0.5 * attention.o_proj.weight.std() * torch.randn(
            attention.o_proj.weight.shape, generator=generator))

    def loss() -> torch.Tensor:
        return relative_error(_attend(attention, inputs, rope), targets)

    before = float(loss())
    solve_output_projection(attention, inputs, targets, rope, batch_size=8)
    solved = loss()
    solved.backward()
    slope = attention.o_proj.weight.grad.norm() / attention.o_proj.weight.norm()
    assert float(solved) < 0.1 * before, (float(solved), before)
    assert slope < 1e-4, float(slope)
    with torch.no_grad():
        for _ in range(3):
            nudge = 1e-2 * attention.o_proj.weight.std() * torch.randn(attention.o_proj.weight.shape, generator=generator)
            attention.o_proj.weight.add_(nudge)
            assert float(loss()) > float(solved)
            attention.o_proj.weight.sub_(nudge)


def test_refine_precision_is_resolved_for_the_device_and_recorded(tmp_path, pico_folders, wikitext, closed_form):
    """auto takes bfloat16 exactly where the device multiplies it fast; an explicit choice wins, and conversion.json
    records the arithmetic refinement ran in. The two arithmetics train to different weights."""
    assert refine_precision("auto", "cpu") == ("bfloat16" if fast_bfloat16(torch.device("cpu")) else "float32")
    assert refine_precision("float32", "cpu") == "float32" and refine_precision("bfloat16", "cpu") == "bfloat16"
    reports, states = {}, {}
    for precision in ("float32", "bfloat16"):
        settings = refine_settings(wikitext, refine_steps=20, refine_lr=3e-3, refine_precision=precision)
        reports[precision] = convert(str(pico_folders["llama-gqa"]), tmp_path / precision, settings)
        states[precision] = load(tmp_path / precision).state_dict()
        recorded = json.loads((tmp_path / precision / "conversion.json").read_text())
        assert recorded["refine_precision"] == recorded["settings"]["refine_precision"] == precision
    assert any(layer["refine_kept"] for layer in reports["bfloat16"]["layers"])
    assert not all(torch.equal(tensor, states["float32"][name]) for name, tensor in states["bfloat16"].items())


def refine_settings(wikitext, **overrides) -> ConversionOptions:
    return options(wikitext, kv_budget=0.25, calibration_tokens=4096, refine_tokens=4096, **overrides)


@pytest.fixture(scope="module")
def closed_form(tmp_path_factory, pico_folders, wikitext):
    """llama-gqa at 0.25, closed form: the start that refinement begins from."""
    output = tmp_path_factory.mktemp("closed-form") / "mla"
    report = convert(str(pico_folders["llama-gqa"]), output, refine_settings(wikitext, refine_steps=0))
    assert report["nope_shrink"] is False
    return output, report


def test_refinement_is_reported_and_lowers_the_layer_errors(tmp_path, pico_folders, wikitext, closed_form):
    settings = refine_settings(wikitext, refine_steps=100, refine_lr=3e-3)
    report = convert(str(pico_folders["llama-gqa"]), tmp_path / "refined", settings)
    assert report["refine_steps"] == 100
    # the output projection is solved after the steps (default), kept where the held-out windows agree
    assert report["solve_output"] is True and any(layer["refine_output_solved"] for layer in report["layers"])
    assert json.loads((tmp_path / "refined" / "conversion.json").read_text())["layers"] == report["layers"]
    # Held-out calibration windows: training must have bought something on the whole.
    assert sum(layer["refine_error_after"] for layer in report["layers"]) < 0.95 * sum(
        layer["refine_error_before"] for layer in report["layers"])
    _, unrefined = closed_form
    assert unrefined["refine_steps"] == 0
    assert all("refine_error_after" not in layer for layer in unrefined["layers"])


def test_each_target_refines_for_its_own_number_of_steps_unless_told(tmp_path, pico_folders, wikitext):
    """Each target refines by default for the steps measured best for it (DeepSeek's latent norm at its smaller
    rate: SmolLM2 at 0.5 1.182x the source's perplexity after 100, 1.115x after 300), and `--refine-steps` wins."""
    settings = options(wikitext, target="deepseek", kv_budget=0.5, key_scale=1.0)
    report = convert(str(pico_folders["llama-gqa"]), tmp_path / "deepseek", settings)
    assert report["refine_steps"] == DEEPSEEK_REFINE_STEPS
    assert report["settings"]["refine_steps"] == DEEPSEEK_REFINE_STEPS
    assert all("refine_error_after" in layer for layer in report["layers"])


def test_a_layer_that_refinement_makes_worse_is_handed_back_as_it_was(tmp_path, pico_folders, wikitext, closed_form):
    """A learning rate far too large wrecks every layer in training: held-out windows catch it, and the converted
    model is the closed-form one, weight for weight."""
    report = convert(str(pico_folders["llama-gqa"]), tmp_path / "wrecked",
                     refine_settings(wikitext, refine_steps=20, refine_lr=10.0))
    assert not any(layer["refine_kept"] for layer in report["layers"]), report["layers"]
    expected = load(closed_form[0]).state_dict()
    actual = load(tmp_path / "wrecked").state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in actual.items():
        assert torch.equal(tensor, expected[name]), name


def last_layer_errors(source, folder, ids) -> tuple[float, float]:
    """The relative errors against the source, each model run whole on `ids`, of the last layer's attention output
    and of the last hidden states (after the final norm)."""

    def run(model):
        attention = {}
        hook = model.model.layers[-1].self_attn.register_forward_hook(lambda m, i, o: attention.update(output=o[0]))
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states[-1]
        hook.remove()
        return attention["output"], hidden

    def error(actual, expected) -> float:
        return float((actual - expected).pow(2).sum() / expected.pow(2).sum())

    expected, actual = run(source), run(load(folder))
    return error(actual[0], expected[0]), error(actual[1], expected[1])


def test_sequential_refinement_corrects_what_an_earlier_layer_got_wrong(tmp_path, pico_folders, wikitext, monkeypatch):
    """A first layer converted badly on purpose (noise on its output projection; refinement cannot undo it all):
    the last layer refined on the converted model's own hidden states reproduces the source layer's attention
    output better, in the converted model as it runs, than the same layer refined on the source's hidden states;
    fitted to what restores the source's residual stream (`residual`), the last hidden states come closer too."""
    import mla_convert.stream as stream

    decompose = stream.decompose_streamed

    def worse_first_layer(stream_, prepared, plan, layer_idx, *args, **kwargs):
        weights = decompose(stream_, prepared, plan, layer_idx, *args, **kwargs)
        if layer_idx == 0:
            o_weight = weights.o_weight
            noise = torch.randn(o_weight.shape, generator=torch.Generator().manual_seed(1), dtype=o_weight.dtype)
            weights = replace(weights, o_weight=o_weight + 2.0 * o_weight.std() * noise)
        return weights

    monkeypatch.setattr(stream, "decompose_streamed", worse_first_layer)
    source_path = pico_folders["llama-gqa"]
    # without the output solve, which would take the damage on the output projection out of the first layer
    settings = refine_settings(wikitext, key_scale=1.0, refine_steps=100, refine_lr=3e-3, solve_output="off")
    errors = {}
    for inputs in ("source", "converted", "residual"):
        report = convert(str(source_path), tmp_path / inputs, replace(settings, refine_inputs=inputs), progress=False)
        assert report["settings"]["refine_inputs"] == inputs
        errors[inputs] = last_layer_errors(load(source_path), tmp_path / inputs, held_out_ids(wikitext))
    (source_attention, source_hidden), (attention, hidden) = errors["source"], errors["converted"]
    assert attention < 0.85 * source_attention, errors
    assert hidden < source_hidden, errors
    assert errors["residual"][1] < 0.95 * source_hidden, errors


def test_refinement_targets_causal_attention(pico_folders):
    # Eager attention reads a missing mask as bidirectional: the targets must be causal whatever the implementation.
    source = load(pico_folders["llama-gqa"])
    inputs = torch.randn(2, 12, source.config.hidden_size)
    rope = position_embeddings(source, inputs)
    outputs = {}
    for implementation in ("eager", "sdpa"):
        source.set_attn_implementation(implementation)
        outputs[implementation] = attention_outputs(source.model.layers[0].self_attn, inputs, rope, batch_size=2)
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], rtol=1e-4, atol=1e-5)
    source.set_attn_implementation("eager")
    changed = inputs.clone()
    changed[:, -1] += 1.0
    later = attention_outputs(source.model.layers[0].self_attn, changed, rope, batch_size=2)
    torch.testing.assert_close(later[:, :-1], outputs["sdpa"][:, :-1])


def test_weight_only_svd_is_the_same_whether_or_not_text_was_calibrated(tmp_path, pico_folders, wikitext):
    """`--init svd` is the weight-only baseline: a conversion that reads calibration text (to refine; here a rate so
    large that every layer is handed back as it was) decomposes to the weights of one that reads none."""
    without_text = options(wikitext, kv_budget=0.5, init="svd", refine_steps=0)
    with_text = replace(without_text, refine_steps=2, refine_lr=10.0)
    plain = convert(str(pico_folders["llama-gqa"]), tmp_path / "without", without_text, progress=False)
    read = convert(str(pico_folders["llama-gqa"]), tmp_path / "with", with_text, progress=False)
    assert plain["calibration"]["kind"] == "none" and read["calibration"]["kind"] == "text"
    assert not any(layer["refine_kept"] for layer in read["layers"])
    expected = load(tmp_path / "without").state_dict()
    for name, tensor in load(tmp_path / "with").state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_bad_quality_options_are_refused(tmp_path, pico_folders, wikitext):
    for overrides, fragment in (
        ({"rope_strategy": "spiral"}, "--rope-strategy must be one of rorope, freqfold, partial"),
        ({"rank_allocation": "random"}, "--rank-allocation must be one of uniform, spectrum"),
        ({"key_scale": -1.0}, "--key-scale must be 'search' or a positive number"),
        ({"refine_steps": -5}, "--refine-steps must be 0 (off) or positive"),
        ({"nope_shrink": "yes"}, "--nope-shrink must be one of off, on"),
        ({"refine_inputs": "target"}, "--refine-inputs must be one of source, converted, residual"),
    ):
        with pytest.raises(MLAConvertError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            convert(str(pico_folders["llama-gqa"]), tmp_path / "bad", options(wikitext, **overrides))
        assert not (tmp_path / "bad").exists()
