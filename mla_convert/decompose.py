"""Closed-form decomposition of one MHA/GQA attention layer into MLA weights (../shared/MLA.md §2-4).

Everything here is float64 linear algebra on one layer's weights and the second moment of that layer's attention
input, `E[[x; 1] [x; 1]^T]` (the trailing 1 carries the projection biases). Nothing holds activations.

Layout conventions (transformers' `rotate_half` RoPE): in a source head of size `d`, frequency `i` rotates dims
`i` and `i + d/2`. In the shared RoPE key of size `D`, pair `p` is dims `p` and `p + D/2`.

`decompose_all` runs `decompose_layer` over a loaded source model's layers (the conversion's decompose step).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .conversion_options import ROPE_STRATEGIES
from .families import attention_projections, source_inv_freq


if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .plan import RankPlan, SourceShape


@dataclass
class SourceAttention:
    """One source attention layer, float64. Weights are `[out, in]` as in `nn.Linear`."""

    q_weight: torch.Tensor  # [heads * head_dim, hidden]
    k_weight: torch.Tensor  # [kv_heads * head_dim, hidden]
    v_weight: torch.Tensor  # [kv_heads * head_dim, hidden]
    o_weight: torch.Tensor  # [hidden, heads * head_dim]
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    o_bias: torch.Tensor | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    # QK-norm (Qwen3): the weights `[head_dim]` of the per-head RMSNorms applied to queries and keys before RoPE
    q_norm_weight: torch.Tensor | None = None
    k_norm_weight: torch.Tensor | None = None

    @property
    def hidden_size(self) -> int:
        return self.q_weight.shape[1]

    @property
    def qk_norm(self) -> bool:
        return self.k_norm_weight is not None


@dataclass
class NormalisedMoments:
    """One QK-norm layer's calibration moments: `query` `E[q_h q_h^T]` `[heads, head_dim, head_dim]` and `key`
    `E[k k^T]` `[kv_heads * head_dim, kv_heads * head_dim]` of the normalised queries and keys (pre-RoPE), and
    `key_scale_sq` `E[s_g^2]` `[kv_heads]` of every kv head's key scale `s_g = 1 / rms(k_g)`."""

    query: torch.Tensor
    key: torch.Tensor
    key_scale_sq: torch.Tensor




@dataclass
class RopePlacement:
    """Which key components keep RoPE in the shared key (MLA.md §3), and how they mix the source's key slices.

    The source key's 2-D slices are grouped by frequency: one frequency per group (RoRoPE, partial RoPE) or several
    adjacent ones (FreqFold). Within group `b`, slot `s = f * kv_heads + g` is kv head `g` at the group's `f`-th
    frequency; a component is an orthonormal mix of the slots, the same for both coordinates of the slices.
    """

    # groups[b]: the source frequencies of group b, each group the same size
    groups: list[list[int]]
    # mix[b, j]: component j of group b as a unit vector over the group's slots
    mix: torch.Tensor  # [groups, slots, slots]
    # energy[b, j]: calibration energy E|k_j|^2 of component j of group b, descending in j
    energy: torch.Tensor  # [groups, slots]
    # error[b, j]: expected squared attention-score error if component j of group b loses RoPE
    error: torch.Tensor  # [groups, slots]
    # kept[p] = (component j, group b, frequency) of RoPE pair p of the shared key; it rotates with `frequency`
    kept: list[tuple[int, int, int]]

    @property
    def frequency_indices(self) -> list[int]:
        return [frequency for _, _, frequency in self.kept]

    @property
    def rope_energy_kept(self) -> float:
        total = float(self.energy.sum())
        kept = sum(float(self.energy[b, j]) for j, b, _ in self.kept)
        return kept / total if total > 0 else 1.0

    @property
    def score_error_kept(self) -> float:
        """Of the score error that losing RoPE everywhere would cause, the part the kept components avoid."""
        total = float(self.error.sum())
        kept = sum(float(self.error[b, j]) for j, b, _ in self.kept)
        return kept / total if total > 0 else 1.0


@dataclass
class MLAAttentionWeights:
    """One MLA layer, float64, in `MLAAttention`'s parameter layout."""

    q_weight: torch.Tensor  # [heads * (qk_nope + qk_rope), hidden]
    q_bias: torch.Tensor | None
    kv_a_weight: torch.Tensor  # [kv_lora_rank + qk_rope, hidden]
    kv_a_bias: torch.Tensor | None
    kv_b_weight: torch.Tensor  # [heads * (qk_nope + v_head_dim), kv_lora_rank]
    o_weight: torch.Tensor  # [hidden, heads * v_head_dim]
    o_bias: torch.Tensor | None
    qk_nope_head_dim: int
    rope_frequency_indices: list[int]
    # eigenvalues of the weighted `[k_nope ; v]` moment, descending: what each further latent dimension would keep
    spectrum: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)
    # QK-norm: the query norm's weight `[head_dim]`, the source's pre-norm key rows `[kv_heads * head_dim, hidden]`
    # (and bias) for the key scales, and the kv head whose key scale multiplies each RoPE pair
    q_norm_weight: torch.Tensor | None = None
    k_weight: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    rope_key_heads: list[int] | None = None
    # DeepSeek's latent norm (`kv_a_layernorm`) weight `[kv_lora_rank]`; None: no norm
    kv_a_norm_weight: torch.Tensor | None = None

    @property
    def kv_lora_rank(self) -> int:
        return self.kv_b_weight.shape[1]


def augment(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`[out, in]` weight and `[out]` bias -> `[out, in + 1]`, acting on `[x; 1]`."""
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias
    return torch.cat((weight, bias[:, None]), dim=1)


def split_augmented(weight: torch.Tensor, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    return weight[:, :-1].contiguous(), (weight[:, -1].contiguous() if has_bias else None)


def weight_only_moment(hidden_size: int) -> torch.Tensor:
    """The input moment that makes every decomposition weight-only (plain SVD): isotropic `x`, no bias direction."""
    moment = torch.eye(hidden_size + 1, dtype=torch.float64)
    moment[-1, -1] = 0.0
    return moment


def slot_moments(moment: torch.Tensor, num_slots_per_frequency: int, head_dim: int, groups: list[list[int]]) -> torch.Tensor:
    """Rotation-invariant moments between the 2-D slices of a group's slots: `[groups, slots, slots]`.

    `moment` is `[n * head_dim, n * head_dim]` over `n` heads (kv heads for keys); entry `(s, s')` is
    `E[k_s . k_s']`, the sum over both coordinates of the slices (what an orthogonal mix acting alike on both sees).
    """
    half = head_dim // 2
    n = num_slots_per_frequency
    blocks = moment.view(n, head_dim, n, head_dim)
    # frequencies: [groups, per_group] -> dims of the slots' first coordinate, slot order (f, g)
    frequencies = torch.tensor(groups)
    per_group = frequencies.shape[1]
    first = frequencies[:, :, None].expand(-1, -1, n).reshape(len(groups), -1)
    heads = torch.arange(n).repeat(per_group)[None].expand(len(groups), -1)
    result = []
    for b in range(len(groups)):
        g, d = heads[b], first[b]
        result.append(blocks[g[:, None], d[:, None], g[None, :], d[None, :]] + blocks[g[:, None], d[:, None] + half, g[None, :], d[None, :] + half])
    return torch.stack(result)


def rope_loss_factor(inv_freq: torch.Tensor, context: int) -> torch.Tensor:
    """`E[1 - cos(theta * delta)]` per frequency: the part of a component's attention score that is lost when it is
    no longer rotated (for isotropic queries and keys), averaged over the query-key distances `delta` of causal
    attention in windows of `context` tokens. Distance `delta` occurs `context - delta` times, and attention
    decays with distance, here as `1 / (1 + delta)`. Near 0 for frequencies whose wavelength is much longer than
    the context, near 1 for fast ones."""
    delta = torch.arange(context, dtype=torch.float64)
    weight = (context - delta) / (1 + delta)
    weight = weight / weight.sum()
    return ((1 - torch.cos(inv_freq.to(torch.float64)[:, None] * delta[None, :])) * weight).sum(-1)


def deepseek_frequency_indices(head_dim: int, qk_rope_head_dim: int) -> list[int]:
    """The source frequencies a DeepSeek-V3 shared RoPE key can rotate with, pair `i` first (MLA.md §6b).

    DeepSeek rotates pair `i` of its `qk_rope_head_dim`-sized key with `theta ** (-2i / qk_rope_head_dim)`; the
    source's frequency `j` is `theta ** (-2j / head_dim)`. With the same base they agree for `j = i * head_dim /
    qk_rope_head_dim`, so every `head_dim / qk_rope_head_dim`-th source frequency is available, each exactly once
    (all of them when the sizes are equal). Sizes that do not divide have no such table.
    """
    if qk_rope_head_dim % 2 or qk_rope_head_dim < 2 or head_dim % qk_rope_head_dim:
        raise ValueError(
            f"a DeepSeek RoPE key of size {qk_rope_head_dim} has no table of source frequencies for head_dim "
            f"{head_dim}: it must be even and divide head_dim"
        )
    stride = head_dim // qk_rope_head_dim
    return [pair * stride for pair in range(qk_rope_head_dim // 2)]


def rope_placement(
    key_moment: torch.Tensor,
    query_moment: torch.Tensor,
    num_kv_heads: int,
    head_dim: int,
    qk_rope_head_dim: int,
    inv_freq: torch.Tensor | None = None,
    strategy: str = "rorope",
    context: int = 2048,
    fold: int = 2,
    frequencies: list[int] | None = None,
    head_local: bool = False,
) -> RopePlacement:
    """Chooses the components of the key that keep RoPE, `qk_rope_head_dim / 2` of them.

    `key_moment` is `E[k k^T]` `[kv_heads * head_dim, kv_heads * head_dim]` and `query_moment` `E[q_h q_h^T]`
    `[heads, head_dim, head_dim]` over calibration tokens (pre-RoPE); `inv_freq` the source's RoPE frequencies
    `[head_dim / 2]` (without them every frequency counts as fast).

    - `rorope`: per frequency, a PCA of the key slices across kv heads, weighed by the query energy that reads each
      head; the components whose loss of RoPE would cost the most attention-score error keep it (the error of a
      component is `sum_h E|q_h,j|^2 E|k_j|^2 E[1 - cos(theta delta)]`), however many that makes per frequency.
    - `freqfold`: the same over groups of `fold` adjacent frequencies, each kept component rotating with the
      group's frequency that carries most of it: more energy per kept component, at the price of rotating
      slightly wrong.
    - `partial`: no mixing; each kv head's slice at each frequency is a component, and those with the largest
      `sum_h |q_h^(i)| |k_g^(i)|` (MHA2MLA's 2-norm rule, RMS norms) keep RoPE.

    `frequencies` constrains the table (an export format's fixed RoPE, e.g. `deepseek_frequency_indices`): pair `p`
    of the shared key rotates with source frequency `frequencies[p]`, and at each of them exactly one component
    keeps RoPE, the one the strategy's criterion ranks first (for `rorope`, the largest score error); every other
    component, at those frequencies and all others, goes to the NoPE key. `freqfold` does not apply.

    `head_local` (QK-norm sources, `docs/qk_norm.md`): no mixing across kv heads; each head's slice at each frequency
    is a component, ranked by `rorope`'s score error. A component then belongs to one kv head, whose key scale it
    takes, and the NoPE key of each kv head stays that head's own key (so one scale per head covers it).
    """
    if strategy not in ROPE_STRATEGIES:
        raise ValueError(f"unknown RoPE strategy {strategy!r}; choose one of {', '.join(ROPE_STRATEGIES)}")
    half = head_dim // 2
    num_pairs = qk_rope_head_dim // 2
    heads = query_moment.shape[0]
    group_size = heads // num_kv_heads
    if frequencies is not None:
        check_frequency_table(frequencies, num_pairs, half, strategy)
    if head_local and strategy == "freqfold":
        raise ValueError("freqfold mixes key heads: not with head-local components (QK-norm)")
    if strategy == "freqfold" and num_pairs < num_kv_heads * half and half % fold == 0:
        groups = [list(range(start, start + fold)) for start in range(0, half, fold)]
    else:
        groups = [[i] for i in range(half)]
    per_group = len(groups[0])
    slots = per_group * num_kv_heads

    # key: [groups, slots, slots]; query energy per slot, summed over the heads of its kv group: [groups, slots, slots]
    key = slot_moments(key_moment, num_kv_heads, head_dim, groups)
    # group_query: [kv_heads, head_dim, head_dim], the summed query moment of each kv group's heads; it sits on the
    # slots of its own kv head only (queries read their own group), hence block-diagonal over kv heads
    group_query = query_moment.view(num_kv_heads, group_size, head_dim, head_dim).sum(1)
    query = slot_moments(torch.block_diag(*group_query), num_kv_heads, head_dim, groups)

    mix, energy, error = score_components(key, query, groups, strategy, inv_freq, context, head_local)
    if frequencies is not None:
        # One group per frequency: pair p keeps group frequencies[p]'s component of largest error, in pair order.
        kept = [(int(torch.argmax(error[frequency])), frequency, frequency) for frequency in frequencies]
        return RopePlacement(groups=groups, mix=mix, energy=energy, error=error, kept=kept)
    order = torch.argsort(error.flatten(), descending=True, stable=True)[:num_pairs]
    kept = []
    for index in sorted(int(i) for i in order):
        b, j = divmod(index, slots)
        # the frequency the component rotates with: the one of its group that carries most of it
        share = mix[b, j].pow(2).view(per_group, num_kv_heads).sum(-1)
        kept.append((j, b, groups[b][int(share.argmax())]))
    return RopePlacement(groups=groups, mix=mix, energy=energy, error=error, kept=kept)


def check_frequency_table(frequencies: list[int], num_pairs: int, half: int, strategy: str) -> None:
    """Refuses a constrained RoPE table that is not one distinct source frequency per pair, or a strategy that
    mixes frequencies."""
    if len(frequencies) != num_pairs or not all(0 <= f < half for f in frequencies):
        raise ValueError(f"a constrained RoPE table needs {num_pairs} source frequencies in [0, {half}), got {frequencies}")
    if len(set(frequencies)) != len(frequencies):
        raise ValueError(f"a constrained RoPE table uses each frequency once, got {frequencies}")
    if strategy == "freqfold":
        raise ValueError("a constrained RoPE table rotates each pair with one source frequency: not freqfold")


def score_components(
    key: torch.Tensor,
    query: torch.Tensor,
    groups: list[list[int]],
    strategy: str,
    inv_freq: torch.Tensor | None,
    context: int,
    head_local: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The key components of every frequency group and what losing RoPE would cost each (`rope_placement`).

    `key`, `query`: per group the key moment and the summed query moment over its slots `[groups, slots, slots]`.
    Returns the components `mix` `[groups, components, slots]` (rows), their key energy `[groups, components]` and
    their error `[groups, components]`, the criterion that ranks them (`head_local`: every slot its own
    component)."""
    slots = key.shape[-1]
    if strategy == "partial" or head_local:
        mix = torch.eye(slots, dtype=key.dtype).expand(len(groups), -1, -1).clone()
    else:
        # Weighted PCA: a key direction matters as much as the queries that read it.
        weights = torch.diagonal(query, dim1=-2, dim2=-1).clamp_min(0).sqrt()
        weighted = weights[:, :, None] * key * weights[:, None, :]
        _, eigenvectors = torch.linalg.eigh(weighted)
        mix = eigenvectors.flip(-1).transpose(1, 2).contiguous()
    # per component: E|k_j|^2 and sum_h E|q_h,j|^2
    energy = torch.einsum("bjs,bst,bjt->bj", mix, key, mix).clamp_min(0.0)
    query_energy = torch.einsum("bjs,bst,bjt->bj", mix, query, mix).clamp_min(0.0)
    if strategy == "partial":
        return mix, energy, query_energy.sqrt() * energy.sqrt()
    half = sum(len(group) for group in groups)
    loss = torch.ones(half, dtype=key.dtype) if inv_freq is None else rope_loss_factor(inv_freq, context)
    # a group's components rotate together, with the group's mean loss factor
    group_loss = torch.stack([loss[group].mean() for group in groups])
    return mix, energy, query_energy * energy * group_loss[:, None]


def split_rope(
    source: SourceAttention, placement: RopePlacement
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Folds the RoPE mix into the projections.

    Returns augmented weights `(q_nope, q_pe, k_pe, k_nope, qk_nope_head_dim)`:
    `q_nope` `[heads * dn, hidden + 1]`, `q_pe` `[heads * D, hidden + 1]`, `k_pe` `[D, hidden + 1]` (shared by all
    heads) and `k_nope` `[kv_heads * dn, hidden + 1]`. The per-group NoPE key is the source key with its kept
    components projected out, so `q_nope` is simply the unrotated source query; `dn` is 0 when every component
    keeps RoPE (the exact full-budget form).
    """
    heads, kv_heads, head_dim = source.num_heads, source.num_kv_heads, source.head_dim
    half = head_dim // 2
    group_size = heads // kv_heads
    # q: [heads, head_dim, hidden + 1]; k: [kv_heads, head_dim, hidden + 1]
    q = augment(source.q_weight, source.q_bias).view(heads, head_dim, -1)
    k = augment(source.k_weight, source.k_bias).view(kv_heads, head_dim, -1)
    num_pairs = len(placement.kept)
    rope_dim = 2 * num_pairs
    groups = torch.tensor(placement.groups)
    per_group = groups.shape[1]
    slot_heads = torch.arange(kv_heads).repeat(per_group)
    head_groups = torch.arange(heads) // group_size

    k_pe = q.new_zeros(rope_dim, q.shape[-1])
    q_pe = q.new_zeros(heads, rope_dim, q.shape[-1])
    kept_mask = torch.zeros(len(placement.groups), kv_heads * per_group, dtype=torch.bool)
    for pair, (component, b, _) in enumerate(placement.kept):
        kept_mask[b, component] = True
        # u: [per_group, kv_heads], the component's mix of the group's slots
        u = placement.mix[b, component].view(per_group, kv_heads)
        for offset, coordinate in ((0, 0), (num_pairs, half)):
            dims = groups[b] + coordinate
            # k_pe = sum over slots (f, g) of u[f, g] k[g, dim f]
            k_pe[pair + offset] = torch.einsum("fg,gfx->x", u, k[:, dims])
            # head h reads the slots of its own kv group: sum over f of u[f, g(h)] q[h, dim f]
            q_pe[:, pair + offset] = torch.einsum("fh,hfx->hx", u[:, head_groups], q[:, dims])

    if bool(kept_mask.all()):
        q_nope = q.new_zeros(0, q.shape[-1])
        k_nope = q.new_zeros(0, q.shape[-1])
        return q_nope, q_pe.reshape(heads * rope_dim, -1), k_pe, k_nope, 0

    # Projector onto the components that lose RoPE, per group: [groups, slots, slots]
    dropped = (~kept_mask).to(q.dtype)
    projector = torch.einsum("bjs,bj,bjt->bst", placement.mix, dropped, placement.mix)
    # k_nope at slot s = sum over slots t of projector[s, t] k_t, for both coordinates: [kv_heads, head_dim, hidden + 1]
    k_nope = torch.zeros_like(k)
    for b in range(len(placement.groups)):
        for coordinate in (0, half):
            dims = groups[b] + coordinate
            # slices: [slots, hidden + 1], slot order (f, g)
            slices = k[slot_heads, dims.repeat_interleave(kv_heads)]
            k_nope[slot_heads, dims.repeat_interleave(kv_heads)] = projector[b] @ slices
    return q.reshape(heads * head_dim, -1), q_pe.reshape(heads * rope_dim, -1), k_pe, k_nope.reshape(kv_heads * head_dim, -1), head_dim


def symmetric_sqrt(matrix: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """`M^(1/2)` of a PSD matrix, with eigenvalues floored at `floor x mean` so that it stays invertible."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    eigenvalues = eigenvalues.clamp_min(floor * float(eigenvalues.clamp_min(0).mean()) + 1e-30)
    return (eigenvectors * eigenvalues.sqrt()) @ eigenvectors.T


def block_diagonal_metric(blocks: torch.Tensor) -> torch.Tensor:
    """`[groups, d, d]` per-group metrics -> `[groups * d, groups * d]` square-root factor."""
    return torch.block_diag(*[symmetric_sqrt(block) for block in blocks])


@dataclass
class PreparedLatent:
    """What `joint_latent` computes before the latent size and the K/V balance enter: the augmented `z = [k_nope ;
    v]` weights `w_z` `[nk + nv, hidden + 1]`, their moment (with its ridge) `[nk + nv, nk + nv]`, the metrics and
    the blocks' weighted energies. Every candidate balance and size of a layer reuses it (`solve`), and one
    eigendecomposition per balance (`eigen`) serves every size.

    The metrics are block-diagonal (keys, values), and the balance only scales the key block: the moment in the
    metrics is formed once per layer (`weighted_moment`) and each balance rescales its blocks, and the metrics are
    factorized once (`metric_factors`) for every balance's up-projection."""

    w_z: torch.Tensor
    moment: torch.Tensor
    key_metric: torch.Tensor
    value_metric: torch.Tensor
    k_energy: float
    v_energy: float
    num_k: int
    # the last balance's (key_scale_factor, (key_scale, eigenvalues ascending, eigenvectors)): one is
    # held at a time, as candidates are tried one after the other
    last_eigen: tuple | None = None
    # derived from the fields above on first use (not saved: `PreparedLayer.saved`)
    _weighted: torch.Tensor | None = field(default=None, init=False, repr=False)
    _factors: tuple | None = field(default=None, init=False, repr=False)

    @classmethod
    def of(
        cls,
        k_nope: torch.Tensor,
        v: torch.Tensor,
        input_moment: torch.Tensor,
        key_metric: torch.Tensor | None = None,
        value_metric: torch.Tensor | None = None,
    ) -> "PreparedLatent":
        num_k, num_v = k_nope.shape[0], v.shape[0]
        dtype = v.dtype
        w_z = torch.cat((k_nope, v), dim=0)
        moment = w_z @ input_moment @ w_z.T
        # A ridge along the weights' own row space keeps every direction the layer can produce: without it, a
        # direction the calibration text never excited could lose to a zero one, and the full-rank case would not
        # be exact.
        weight_gram = w_z[:, :-1] @ w_z[:, :-1].T
        ridge = 1e-7 * float(moment.trace()) / max(float(weight_gram.trace()), 1e-30)
        moment = moment + ridge * weight_gram

        key_metric = torch.eye(num_k, dtype=dtype) if key_metric is None else key_metric
        value_metric = torch.eye(num_v, dtype=dtype) if value_metric is None else value_metric
        prepared = cls(w_z, moment, key_metric, value_metric, 0.0, 0.0, num_k)
        weighted = prepared.weighted_moment()
        prepared.k_energy = float(weighted[:num_k, :num_k].trace())
        prepared.v_energy = float(weighted[num_k:, num_k:].trace())
        return prepared

    def weighted_moment(self) -> torch.Tensor:
        """`[nk + nv, nk + nv]`: the moment of the weighted z = diag(key_metric, value_metric) @ z, at balance 1."""
        if self._weighted is None:
            num_k, moment = self.num_k, self.moment
            key_metric, value_metric = self.key_metric, self.value_metric
            key_rows = key_metric @ moment[:num_k]  # [nk, nk + nv]
            value_rows = value_metric @ moment[num_k:]  # [nv, nk + nv]
            key_key = key_rows[:, :num_k] @ key_metric.T
            key_value = key_rows[:, num_k:] @ value_metric.T
            value_value = value_rows[:, num_k:] @ value_metric.T
            self._weighted = torch.cat(
                (torch.cat((key_key, key_value), dim=1), torch.cat((key_value.T, value_value), dim=1))
            )
        return self._weighted

    def metric_factors(self) -> tuple:
        """The LU factorizations of the key and value metrics (None for an empty key block)."""
        if self._factors is None:
            key = torch.linalg.lu_factor(self.key_metric) if self.num_k else None
            self._factors = (key, torch.linalg.lu_factor(self.value_metric))
        return self._factors

    def untransform(self, basis: torch.Tensor, key_scale: float) -> torch.Tensor:
        """`diag(key_scale x key_metric, value_metric)^-1 @ basis` `[nk + nv, rank]`: latent -> z."""
        key_factors, value_factors = self.metric_factors()
        num_k = self.num_k
        up_v = torch.linalg.lu_solve(*value_factors, basis[num_k:])
        if key_factors is None:
            return up_v
        return torch.cat((torch.linalg.lu_solve(*key_factors, basis[:num_k]) / key_scale, up_v))

    def eigen(self, key_scale_factor: float) -> tuple[float, torch.Tensor, torch.Tensor]:
        """The weighted moment's eigendecomposition at one K/V balance (computed once per balance): `key_scale`,
        the eigenvalues (ascending) and the eigenvectors."""
        if self.last_eigen is None or self.last_eigen[0] != key_scale_factor:
            self.last_eigen = None  # frees the previous balance's before this one's is computed
            k_energy, v_energy, num_k = self.k_energy, self.v_energy, self.num_k
            key_scale = key_scale_factor * ((v_energy / k_energy) ** 0.5 if k_energy > 0 else 1.0)
            # diag(a K, V) C diag(a K, V)^T: the key block scaled by a^2, the cross blocks by a
            weighted = self.weighted_moment().clone()
            weighted[:num_k, :num_k] *= key_scale**2
            weighted[:num_k, num_k:] *= key_scale
            weighted[num_k:, :num_k] *= key_scale
            eigenvalues, eigenvectors = torch.linalg.eigh(weighted)
            self.last_eigen = (key_scale_factor, (key_scale, eigenvalues, eigenvectors))
        return self.last_eigen[1]

    def spectrum(self, key_scale_factor: float = 1.0) -> torch.Tensor:
        """The weighted spectrum `[nk + nv]` (descending) at one K/V balance: what each latent dimension keeps."""
        return self.eigen(key_scale_factor)[1].flip(-1).clamp_min(0.0)

    def solve(
        self, kv_lora_rank: int, key_scale_factor: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """`joint_latent`'s result at one latent size and K/V balance."""
        key_scale, eigenvalues, eigenvectors = self.eigen(key_scale_factor)
        num_k, moment = self.num_k, self.moment
        # basis: [nk + nv, rank], the top principal directions of the weighted z
        basis = eigenvectors.flip(-1)[:, :kv_lora_rank]
        # projection: [rank, nk + nv], z -> latent: basis^T diag(a K, V)
        projection = torch.cat(
            (key_scale * (basis[:num_k].T @ self.key_metric), basis[num_k:].T @ self.value_metric), dim=1
        )
        down = projection @ self.w_z
        # up: [nk + nv, rank], latent -> z
        up = self.untransform(basis, key_scale)

        # Residual moment of z after reconstruction through the latent, R C R^T with R = I - up @ projection; only
        # its diagonal is needed, and it takes products of the latent's width alone:
        # diag(C) - 2 diag(up (P C)) + diag(up (P C P^T) up^T)
        projected = projection @ moment  # [rank, nk + nv]
        latent_moment = projected @ projection.T  # [rank, rank]
        residual_energy = (
            moment.diagonal() - 2 * (up * projected.T).sum(-1) + ((up @ latent_moment) * up).sum(-1)
        )
        raw_k, raw_v = float(moment[:num_k, :num_k].trace()), float(moment[num_k:, num_k:].trace())
        # clamped: what cancels to zero at full rank may round to a tiny negative
        k_residual = max(float(residual_energy[:num_k].sum()), 0.0)
        v_residual = max(float(residual_energy[num_k:].sum()), 0.0)
        stats = {
            "key_scale_factor": key_scale_factor,
            "key_scale": key_scale,
            "k_nope_rel_error": k_residual / raw_k if raw_k > 0 else 0.0,
            "v_rel_error": v_residual / raw_v if raw_v > 0 else 0.0,
        }
        return down, up[:num_k], up[num_k:], eigenvalues.flip(-1).clamp_min(0.0), stats


def joint_latent(
    k_nope: torch.Tensor,
    v: torch.Tensor,
    input_moment: torch.Tensor,
    kv_lora_rank: int,
    key_metric: torch.Tensor | None = None,
    value_metric: torch.Tensor | None = None,
    key_scale_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Activation-aware PCA of `z = [k_nope ; v]` (MLA.md §4), in the metric that the layer's output feels.

    `k_nope` `[nk, hidden + 1]` and `v` `[nv, hidden + 1]` are augmented weights; `input_moment` is `E[[x;1][x;1]^T]`.
    `key_metric` / `value_metric` (`[nk, nk]` / `[nv, nv]` square-root factors, identity when None) weigh the
    reconstruction error: the query moment for keys (an error `dk` costs `E[(q . dk)^2]`), `o_proj`'s Gram for
    values. The key block is scaled by `a` = `key_scale_factor` x the scale that equalises the two blocks'
    weighted energies.
    Returns augmented `down` `[rank, hidden + 1]`, `up_k` `[nk, rank]`, `up_v` `[nv, rank]`, the weighted
    spectrum `[nk + nv]` (descending) and error stats.
    """
    prepared = PreparedLatent.of(k_nope, v, input_moment, key_metric, value_metric)
    return prepared.solve(kv_lora_rank, key_scale_factor)


def query_moments(source: SourceAttention, input_moment: torch.Tensor) -> torch.Tensor:
    """`E[q_h q_h^T]` of every query head over calibration tokens (pre-RoPE): `[heads, head_dim, head_dim]`."""
    q = augment(source.q_weight, source.q_bias).view(source.num_heads, source.head_dim, -1)
    return torch.einsum("hdx,xy,hey->hde", q, input_moment, q)


def output_metrics(
    source: SourceAttention, query_moment: torch.Tensor, qk_nope_head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Square-root metrics in which latent errors are measured, per kv group.

    Keys: an error `dk` in group g's NoPE key shifts head h's score by `q_h . dk`, so its cost is
    `dk^T (sum_h E[q_h q_h^T]) dk` over the heads of the group. Values: an error `dv` reaches the output as
    `W_o,h dv`, so its cost is `dv^T (sum_h W_o,h^T W_o,h) dv`.
    """
    heads, kv_heads, head_dim = source.num_heads, source.num_kv_heads, source.head_dim
    group_size = heads // kv_heads
    group_query = query_moment.view(kv_heads, group_size, head_dim, head_dim).sum(1)
    o = source.o_weight.view(source.o_weight.shape[0], heads, head_dim)
    output_gram = torch.einsum("ohd,ohe->hde", o, o).view(kv_heads, group_size, head_dim, head_dim).sum(1)
    key_metric = block_diagonal_metric(group_query) if qk_nope_head_dim else torch.zeros(0, 0, dtype=o.dtype)
    return key_metric, block_diagonal_metric(output_gram)


@dataclass
class DecomposeOptions:
    """How one layer is decomposed (the `mla-convert convert` options of the same names)."""

    # "pca": activation-aware, in the metric the layer's output feels; "svd": weight-only
    init: str = "pca"
    rope_strategy: str = "rorope"
    # context over which losing RoPE is judged (query-key distances up to this)
    rope_context: int = 2048
    # multiplier on the K/V balance of the joint latent (1.0: equal weighted energies)
    key_scale: float = 1.0
    # a fixed RoPE table (pair p rotates with source frequency rope_frequencies[p], one component each), as an
    # export format requires (`deepseek_frequency_indices`); None: the strategy chooses freely
    rope_frequencies: list[int] | None = None
    # scale each frequency's NoPE key by E[cos(theta delta)] over the same distances as `rope_context`: the best
    # stand-in, for isotropic queries and keys, for a component that no longer rotates (`nope_shrink_factors`)
    nope_shrink: bool = False


def nope_shrink_factors(inv_freq: torch.Tensor, context: int) -> torch.Tensor:
    """Per source frequency, the factor `c = E[cos(theta delta)]` that scales a key component which loses RoPE:
    `[head_dim / 2]`.

    A rotated score term `|q||k| cos(a + theta delta)` replaced by `c |q||k| cos(a)` is wrong by, on average over
    the phase `a`, `(1 - 2 c E[cos] + c^2) / 2`: `1 - E[cos]` for the unrotated term (`c = 1`), `1 / 2` for none
    (`c = 0`), and least, `(1 - E[cos]^2) / 2`, at `c = E[cos]`. Slow frequencies keep their term (`c` near 1); fast
    ones, whose rotation averages out, shrink towards 0, which also leaves the latent less to carry."""
    return 1.0 - rope_loss_factor(inv_freq, context)


def norm_folded(source: SourceAttention) -> SourceAttention:
    """A QK-norm layer with the norms' weights folded into its query and key rows: its queries and keys are then
    `g ⊙ (W x + b)`, the normalised ones divided by the per-head scales `s` that the MLA model applies at run time
    (`docs/qk_norm.md`)."""

    def scaled(weight, bias, norm_weight, count):
        rows = norm_weight.repeat(count)
        return rows[:, None] * weight, None if bias is None else rows * bias

    q_weight, q_bias = scaled(source.q_weight, source.q_bias, source.q_norm_weight, source.num_heads)
    k_weight, k_bias = scaled(source.k_weight, source.k_bias, source.k_norm_weight, source.num_kv_heads)
    return replace(source, q_weight=q_weight, q_bias=q_bias, k_weight=k_weight, k_bias=k_bias)


def decompose_layer(
    source: SourceAttention,
    input_moment: torch.Tensor,
    kv_lora_rank: int,
    qk_rope_head_dim: int,
    inv_freq: torch.Tensor | None = None,
    options: DecomposeOptions | None = None,
    key_scale: float | None = None,
    normalised: NormalisedMoments | None = None,
) -> MLAAttentionWeights:
    """Source attention + calibration moment -> MLA weights for one layer (`key_scale`: this layer's K/V balance
    multiplier, overriding `options.key_scale`).

    QK-norm layers (`source.qk_norm`, `docs/qk_norm.md`): the RoPE placement reads the normalised query and key
    moments (`normalised`, from calibration), its components are head-local, and the joint latent reconstructs each
    head's norm-weighted pre-norm key `g ⊙ k`, its errors weighted by `E[s_g^2]`: in the normalised key that the
    scores read, an error `dk` is `s_g dk`."""
    prepared = prepare_layer(source, input_moment, qk_rope_head_dim, inv_freq, options, normalised)
    return prepared.weights(kv_lora_rank, key_scale)


@dataclass
class PreparedLayer:
    """One layer's decomposition up to the latent size and the K/V balance (`prepare_layer`): the RoPE placement,
    the query rows and the shared RoPE key, and the joint latent's factorizations. `weights` finishes it for one
    size and balance; every candidate of a layer (the key-scale search, the spectrum and the main pass's size)
    reuses what is here instead of recomputing it."""

    source: SourceAttention
    options: DecomposeOptions
    placement: RopePlacement
    q_nope: torch.Tensor
    q_pe: torch.Tensor
    k_pe: torch.Tensor
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    latent: PreparedLatent

    def spectrum(self, key_scale: float | None = None) -> torch.Tensor:
        """The weighted `[k_nope ; v]` spectrum at one K/V balance (`MLAAttentionWeights.spectrum`), without the
        weights."""
        return self.latent.spectrum(self.options.key_scale if key_scale is None else key_scale)

    def saved(self) -> dict:
        """What `prepare_layer(..., saved=...)` needs to rebuild this layer's preparation without the input moment:
        the RoPE placement and the joint latent's moment, metrics and last eigendecomposition (matrices of the
        latent's width, not the weights')."""
        latent = self.latent
        return {
            "placement": self.placement,
            "latent": dict(
                moment=latent.moment, key_metric=latent.key_metric, value_metric=latent.value_metric,
                k_energy=latent.k_energy, v_energy=latent.v_energy, num_k=latent.num_k, last_eigen=latent.last_eigen,
            ),
        }  # fmt: skip

    def weights(self, kv_lora_rank: int, key_scale: float | None = None) -> MLAAttentionWeights:
        source, placement = self.source, self.placement
        heads, kv_heads, head_dim = source.num_heads, source.num_kv_heads, source.head_dim
        group_size = heads // kv_heads
        qk_nope_head_dim, qk_rope_head_dim = self.qk_nope_head_dim, self.qk_rope_head_dim
        key_scale = self.options.key_scale if key_scale is None else key_scale
        down, up_k, up_v, spectrum, stats = self.latent.solve(kv_lora_rank, key_scale)

        # q_proj rows per head: [q_nope (dn) ; q_pe (D)]
        width = source.hidden_size + 1
        q_nope = self.q_nope.view(heads, qk_nope_head_dim, width)
        q_pe = self.q_pe.view(heads, qk_rope_head_dim, width)
        q_weight = torch.cat((q_nope, q_pe), dim=1).reshape(heads * (qk_nope_head_dim + qk_rope_head_dim), width)
        # kv_b_proj rows per head: [W_uk of its group (dn) ; W_uv of its group (head_dim)]
        groups = torch.arange(heads) // group_size
        up_k = up_k.view(kv_heads, qk_nope_head_dim, kv_lora_rank)[groups]
        up_v = up_v.view(kv_heads, head_dim, kv_lora_rank)[groups]
        kv_b_weight = torch.cat((up_k, up_v), dim=1).reshape(heads * (qk_nope_head_dim + head_dim), kv_lora_rank)

        has_q_bias = source.q_bias is not None
        has_kv_bias = source.k_bias is not None or source.v_bias is not None
        q_weight, q_bias = split_augmented(q_weight, has_q_bias)
        qk_norm_fields = {}
        if source.qk_norm:
            # Head-local components: component j of a frequency is kv head j's slice there.
            qk_norm_fields = dict(
                q_norm_weight=source.q_norm_weight,
                k_weight=source.k_weight,
                k_bias=source.k_bias,
                rope_key_heads=[component % kv_heads for component, _, _ in placement.kept],
            )
        kv_a_weight, kv_a_bias = split_augmented(torch.cat((down, self.k_pe), dim=0), has_kv_bias)
        stats["rope_energy_kept"] = placement.rope_energy_kept
        stats["rope_score_error_kept"] = placement.score_error_kept
        return MLAAttentionWeights(
            q_weight=q_weight,
            q_bias=q_bias,
            kv_a_weight=kv_a_weight,
            kv_a_bias=kv_a_bias,
            kv_b_weight=kv_b_weight,
            o_weight=source.o_weight,
            o_bias=source.o_bias,
            qk_nope_head_dim=qk_nope_head_dim,
            rope_frequency_indices=placement.frequency_indices,
            spectrum=spectrum,
            stats=stats,
            **qk_norm_fields,
        )


def prepare_layer(
    source: SourceAttention,
    input_moment: torch.Tensor,
    qk_rope_head_dim: int,
    inv_freq: torch.Tensor | None = None,
    options: DecomposeOptions | None = None,
    normalised: NormalisedMoments | None = None,
    saved: dict | None = None,
) -> PreparedLayer:
    """`decompose_layer` up to the latent size and the K/V balance: everything that does not depend on them.

    `saved` (`PreparedLayer.saved` of an earlier preparation of the same layer on the same moment) skips every
    product with the input moment (`input_moment` is then not read): the result is the same, bit for bit."""
    options = options or DecomposeOptions()
    weighted = options.init == "pca"
    heads, kv_heads, head_dim = source.num_heads, source.num_kv_heads, source.head_dim
    linear = norm_folded(source) if source.qk_norm else source
    k_aug = augment(linear.k_weight, linear.k_bias)
    if saved is not None:
        placement = saved["placement"]
    else:
        if normalised is not None and weighted:
            key_moment = normalised.key
        else:
            key_moment = k_aug @ input_moment @ k_aug.T
        if weighted:
            query_moment = normalised.query if normalised is not None else query_moments(linear, input_moment)
        else:
            # Weight-only: every query direction counts alike.
            query_moment = torch.eye(head_dim, dtype=key_moment.dtype).expand(heads, -1, -1)
        placement = rope_placement(
            key_moment,
            query_moment,
            kv_heads,
            head_dim,
            qk_rope_head_dim,
            inv_freq=inv_freq,
            strategy=options.rope_strategy,
            context=options.rope_context,
            frequencies=options.rope_frequencies,
            head_local=source.qk_norm,
        )
    q_nope, q_pe, k_pe, k_nope, qk_nope_head_dim = split_rope(linear, placement)
    if options.nope_shrink and inv_freq is not None and qk_nope_head_dim == head_dim and not source.qk_norm:
        # per dim of a head (rotate-half layout: dims i and i + head_dim / 2 share frequency i): [head_dim]
        factors = nope_shrink_factors(inv_freq, options.rope_context).repeat(2).to(k_nope.dtype)
        k_nope = (k_nope.view(kv_heads, head_dim, -1) * factors[None, :, None]).view(kv_heads * head_dim, -1)
    if source.qk_norm:
        # The NoPE query is the source's pre-norm query: the model normalises it (and scales q_pe by the same
        # factor). The NoPE key is each head's own key minus what keeps RoPE; at full budget nothing is left of it.
        q_nope = augment(source.q_weight, source.q_bias)
        if qk_nope_head_dim == 0:
            k_nope = k_aug.new_zeros(kv_heads * head_dim, k_aug.shape[1])
        qk_nope_head_dim = head_dim

    v_aug = augment(source.v_weight, source.v_bias)
    if saved is not None:
        latent = PreparedLatent(w_z=torch.cat((k_nope, v_aug), dim=0), **saved["latent"])
    else:
        key_metric, value_metric = output_metrics(source, query_moment, qk_nope_head_dim) if weighted else (None, None)
        if weighted and normalised is not None:
            # Per kv head, the mean squared key scale: the first-order weight of an error in the pre-norm key as the
            # normalised key carries it (exact per token would need E[s_g s_g' x x^T] for every pair of kv heads).
            head_weights = normalised.key_scale_sq.clamp_min(0).sqrt().repeat_interleave(head_dim)
            key_metric = head_weights[:, None] * key_metric
        latent = PreparedLatent.of(k_nope, v_aug, input_moment, key_metric, value_metric)
    return PreparedLayer(
        source=source,
        options=options,
        placement=placement,
        q_nope=q_nope,
        q_pe=q_pe,
        k_pe=k_pe,
        qk_nope_head_dim=qk_nope_head_dim,
        qk_rope_head_dim=qk_rope_head_dim,
        latent=latent,
    )


def decompose_all(
    model: PreTrainedModel,
    shape: SourceShape,
    moments: torch.Tensor,
    plan: RankPlan,
    options: DecomposeOptions,
    key_scales: list[float] | None = None,
    progress: bool = True,
    normalised: list[NormalisedMoments] | None = None,
) -> list[MLAAttentionWeights]:
    """Every layer of `model` decomposed for `plan` (`moments`: per layer `E[[x; 1] [x; 1]^T]`; `key_scales`: per
    layer K/V balance multipliers, None: `options.key_scale`; `normalised`: per layer, a QK-norm source's
    normalised moments)."""
    # The source's RoPE frequencies (scaled ones included), to judge what losing RoPE costs at each; pass-through
    # dims of a partial RoPE are pairs of frequency 0
    inv_freq = source_inv_freq(model)
    with single_thread():
        return [
            decompose_layer(
                source_attention(model, layer_idx, shape),
                moments[layer_idx],
                plan.kv_lora_ranks[layer_idx],
                plan.qk_rope_head_dim,
                inv_freq=inv_freq,
                options=options,
                key_scale=None if key_scales is None else key_scales[layer_idx],
                normalised=None if normalised is None else normalised[layer_idx],
            )
            for layer_idx in tqdm(range(shape.num_layers), desc="decomposing", unit="layer", disable=not progress)
        ]


@contextmanager
def single_thread():
    """The matrices are small (a few hundred wide): one thread is fastest, and multi-threaded LAPACK can slow down a
    hundredfold when another process competes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def source_attention(model: PreTrainedModel, layer_idx: int, shape: SourceShape) -> SourceAttention:
    return attention_weights(model.model.layers[layer_idx].self_attn, model.config, shape)


def attention_weights(attention: torch.nn.Module, config, shape: SourceShape) -> SourceAttention:
    """One loaded source attention module's weights, float64 on the CPU (also a single layer's, when streaming)."""
    # Fused projections split and partial RoPE laid out over the whole head (`families`): Llama's layout for all.
    projections = attention_projections(attention, config)
    (q_weight, q_bias), (k_weight, k_bias), (v_weight, v_bias), (o_weight, o_bias) = (
        projections[name] for name in "qkvo"
    )

    def norm_weight(name):
        norm = getattr(attention, name, None)
        return None if norm is None else norm.weight.detach().to("cpu", torch.float64)

    return SourceAttention(
        q_weight=q_weight,
        k_weight=k_weight,
        v_weight=v_weight,
        o_weight=o_weight,
        q_bias=q_bias,
        k_bias=k_bias,
        v_bias=v_bias,
        o_bias=o_bias,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        q_norm_weight=norm_weight("q_norm"),
        k_norm_weight=norm_weight("k_norm"),
    )
