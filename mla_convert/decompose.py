"""Closed-form decomposition of one MHA/GQA attention layer into MLA weights (../shared/MLA.md §2-4).

Everything here is float64 linear algebra on one layer's weights and the second moment of that layer's attention
input, `E[[x; 1] [x; 1]^T]` (the trailing 1 carries the projection biases). Nothing holds activations.

Layout conventions (transformers' `rotate_half` RoPE): in a source head of size `d`, frequency `i` rotates dims
`i` and `i + d/2`. In the shared RoPE key of size `D`, pair `p` is dims `p` and `p + D/2`.
"""

from dataclasses import dataclass, field

import torch


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

    @property
    def hidden_size(self) -> int:
        return self.q_weight.shape[1]


@dataclass
class RopePlacement:
    """Which mixed key components keep RoPE (RoRoPE, MLA.md §3)."""

    # mix[i]: [kv_heads, kv_heads], row j is the j-th principal mix of the kv heads at frequency i
    mix: torch.Tensor  # [head_dim / 2, kv_heads, kv_heads]
    # energy[i, j]: calibration energy of component j at frequency i, descending in j
    energy: torch.Tensor  # [head_dim / 2, kv_heads]
    # kept[p] = (component j, frequency i) of RoPE pair p of the shared key
    kept: list[tuple[int, int]]

    @property
    def frequency_indices(self) -> list[int]:
        return [frequency for _, frequency in self.kept]

    @property
    def rope_energy_kept(self) -> float:
        total = float(self.energy.sum())
        kept = sum(float(self.energy[i, j]) for j, i in self.kept)
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
    stats: dict = field(default_factory=dict)


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


def rope_placement(
    key_moment: torch.Tensor,
    num_kv_heads: int,
    head_dim: int,
    qk_rope_head_dim: int,
    query_energy: torch.Tensor | None = None,
) -> RopePlacement:
    """PCA of the pre-RoPE keys across kv heads, per frequency; keep the strongest components rotated.

    `key_moment` is `E[k k^T]` over calibration tokens, `[kv_heads * head_dim, kv_heads * head_dim]`.
    Each frequency keeps `qk_rope_head_dim // head_dim` components; the remaining pairs go to the frequencies whose
    next component carries the most energy.
    """
    half = head_dim // 2
    num_pairs = qk_rope_head_dim // 2
    # per-dim blocks: [kv_heads, head_dim, kv_heads, head_dim] -> energy across heads of both dims of pair i
    blocks = key_moment.view(num_kv_heads, head_dim, num_kv_heads, head_dim)
    dims = torch.arange(half)
    # moments: [half, kv_heads, kv_heads]
    moments = blocks[:, dims, :, dims] + blocks[:, dims + half, :, dims + half]
    if query_energy is not None:
        # A key component matters as much as the queries that read it: weigh each kv head by its heads' query energy.
        weights = query_energy.clamp_min(0).sqrt()
        moments = weights[:, :, None] * moments * weights[:, None, :]
    eigenvalues, eigenvectors = torch.linalg.eigh(moments)
    # descending order; mix[i, j] is component j's unit vector over kv heads
    energy = eigenvalues.flip(-1).clamp_min(0.0)
    mix = eigenvectors.flip(-1).transpose(1, 2).contiguous()

    per_frequency, remainder = divmod(num_pairs, half)
    kept = [(j, i) for j in range(per_frequency) for i in range(half)]
    if remainder:
        next_energy = energy[:, per_frequency]
        frequencies = torch.argsort(next_energy, descending=True)[:remainder].sort().values
        kept += [(per_frequency, int(i)) for i in frequencies]
    return RopePlacement(mix=mix, energy=energy, kept=kept)


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

    k_pe = q.new_zeros(rope_dim, q.shape[-1])
    q_pe = q.new_zeros(heads, rope_dim, q.shape[-1])
    kept_mask = torch.zeros(half, kv_heads, dtype=torch.bool)
    groups = torch.arange(heads) // group_size
    for pair, (component, frequency) in enumerate(placement.kept):
        kept_mask[frequency, component] = True
        # u: [kv_heads], the component's mix of the kv heads at this frequency
        u = placement.mix[frequency, component]
        for offset, dim in ((0, frequency), (num_pairs, frequency + half)):
            k_pe[pair + offset] = torch.einsum("g,gx->x", u, k[:, dim])
            q_pe[:, pair + offset] = u[groups, None] * q[:, dim]

    if bool(kept_mask.all()):
        q_nope = q.new_zeros(0, q.shape[-1])
        k_nope = q.new_zeros(0, q.shape[-1])
        return q_nope, q_pe.reshape(heads * rope_dim, -1), k_pe, k_nope, 0

    # Projector onto the components that lose RoPE, per frequency: [half, kv_heads, kv_heads]
    dropped = (~kept_mask).to(q.dtype)
    projector = torch.einsum("ijg,ij,ijh->igh", placement.mix, dropped, placement.mix)
    # k_nope[g, dim] = sum_h projector[dim % half][g, h] k[h, dim]: [kv_heads, head_dim, hidden + 1]
    per_dim = torch.cat((projector, projector), dim=0)
    k_nope = torch.einsum("dgh,hdx->gdx", per_dim, k)
    return q.reshape(heads * head_dim, -1), q_pe.reshape(heads * rope_dim, -1), k_pe, k_nope.reshape(kv_heads * head_dim, -1), head_dim


def symmetric_sqrt(matrix: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """`M^(1/2)` of a PSD matrix, with eigenvalues floored at `floor x mean` so that it stays invertible."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    eigenvalues = eigenvalues.clamp_min(floor * float(eigenvalues.clamp_min(0).mean()) + 1e-30)
    return (eigenvectors * eigenvalues.sqrt()) @ eigenvectors.T


def block_diagonal_metric(blocks: torch.Tensor) -> torch.Tensor:
    """`[groups, d, d]` per-group metrics -> `[groups * d, groups * d]` square-root factor."""
    return torch.block_diag(*[symmetric_sqrt(block) for block in blocks])


def joint_latent(
    k_nope: torch.Tensor,
    v: torch.Tensor,
    input_moment: torch.Tensor,
    kv_lora_rank: int,
    key_metric: torch.Tensor | None = None,
    value_metric: torch.Tensor | None = None,
    key_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Activation-aware PCA of `z = [k_nope ; v]` (MLA.md §4), in the metric that the layer's output feels.

    `k_nope` `[nk, hidden + 1]` and `v` `[nv, hidden + 1]` are augmented weights; `input_moment` is `E[[x;1][x;1]^T]`.
    `key_metric` / `value_metric` (`[nk, nk]` / `[nv, nv]` square-root factors, identity when None) weigh the
    reconstruction error: the query moment for keys (an error `dk` costs `E[(q . dk)^2]`), `o_proj`'s Gram for
    values. `key_scale` (`a`) balances the two blocks; by default it equalises their weighted energies.
    Returns augmented `down` `[rank, hidden + 1]`, `up_k` `[nk, rank]`, `up_v` `[nv, rank]` and error stats.
    """
    num_k, num_v = k_nope.shape[0], v.shape[0]
    dtype = v.dtype
    w_z = torch.cat((k_nope, v), dim=0)
    moment = w_z @ input_moment @ w_z.T
    # A ridge along the weights' own row space keeps every direction the layer can produce: without it, a direction
    # the calibration text never excited could lose to a zero one, and the full-rank case would not be exact.
    weight_gram = w_z[:, :-1] @ w_z[:, :-1].T
    ridge = 1e-7 * float(moment.trace()) / max(float(weight_gram.trace()), 1e-30)
    moment = moment + ridge * weight_gram

    key_metric = torch.eye(num_k, dtype=dtype) if key_metric is None else key_metric
    value_metric = torch.eye(num_v, dtype=dtype) if value_metric is None else value_metric
    k_energy = float((key_metric @ moment[:num_k, :num_k] @ key_metric.T).trace())
    v_energy = float((value_metric @ moment[num_k:, num_k:] @ value_metric.T).trace())
    if key_scale is None:
        key_scale = (v_energy / k_energy) ** 0.5 if k_energy > 0 else 1.0
    # transform: weighted z = transform @ z
    transform = torch.block_diag(key_scale * key_metric, value_metric)

    weighted = transform @ moment @ transform.T
    eigenvalues, eigenvectors = torch.linalg.eigh(weighted)
    # basis: [nk + nv, rank], the top principal directions of the weighted z
    basis = eigenvectors.flip(-1)[:, :kv_lora_rank]
    down = basis.T @ transform @ w_z
    up = torch.linalg.solve(transform, basis)

    # Residual moment of z after reconstruction through the latent: R C R^T with R = I - up @ basis^T @ transform
    residual = torch.eye(num_k + num_v, dtype=dtype) - up @ basis.T @ transform
    residual_moment = residual @ moment @ residual.T
    raw_k, raw_v = float(moment[:num_k, :num_k].trace()), float(moment[num_k:, num_k:].trace())
    stats = {
        "key_scale": key_scale,
        "k_nope_rel_error": float(residual_moment[:num_k, :num_k].trace()) / raw_k if raw_k > 0 else 0.0,
        "v_rel_error": float(residual_moment[num_k:, num_k:].trace()) / raw_v if raw_v > 0 else 0.0,
    }
    return down, up[:num_k], up[num_k:], stats


def output_metrics(source: SourceAttention, input_moment: torch.Tensor, qk_nope_head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Square-root metrics in which latent errors are measured, per kv group.

    Keys: an error `dk` in group g's NoPE key shifts head h's score by `q_h . dk`, so its cost is
    `dk^T (sum_h E[q_h q_h^T]) dk` over the heads of the group. Values: an error `dv` reaches the output as
    `W_o,h dv`, so its cost is `dv^T (sum_h W_o,h^T W_o,h) dv`.
    """
    heads, kv_heads, head_dim = source.num_heads, source.num_kv_heads, source.head_dim
    group_size = heads // kv_heads
    q = augment(source.q_weight, source.q_bias).view(heads, head_dim, -1)
    # query_moment: [heads, head_dim, head_dim]
    query_moment = torch.einsum("hdx,xy,hey->hde", q, input_moment, q)
    query_moment = query_moment.view(kv_heads, group_size, head_dim, head_dim).sum(1)
    o = source.o_weight.view(source.o_weight.shape[0], heads, head_dim)
    output_gram = torch.einsum("ohd,ohe->hde", o, o).view(kv_heads, group_size, head_dim, head_dim).sum(1)
    key_metric = block_diagonal_metric(query_moment) if qk_nope_head_dim else torch.zeros(0, 0, dtype=q.dtype)
    return key_metric, block_diagonal_metric(output_gram)


def group_query_energy(source: SourceAttention, input_moment: torch.Tensor) -> torch.Tensor:
    """`E[|q^(i)|^2]` summed over the query heads of each kv group, per frequency: `[head_dim / 2, kv_heads]`."""
    heads, kv_heads, head_dim = source.num_heads, source.num_kv_heads, source.head_dim
    q = augment(source.q_weight, source.q_bias).view(heads, head_dim, -1)
    # per_dim: [heads, head_dim], E[q_h[dim]^2]
    per_dim = torch.einsum("hdx,xy,hdy->hd", q, input_moment, q)
    per_frequency = per_dim[:, : head_dim // 2] + per_dim[:, head_dim // 2 :]
    return per_frequency.view(kv_heads, heads // kv_heads, head_dim // 2).sum(1).T.contiguous()


def decompose_layer(
    source: SourceAttention,
    input_moment: torch.Tensor,
    kv_lora_rank: int,
    qk_rope_head_dim: int,
    weighted: bool = True,
) -> MLAAttentionWeights:
    """Source attention + calibration moment -> MLA weights for one layer."""
    heads, kv_heads, head_dim = source.num_heads, source.num_kv_heads, source.head_dim
    group_size = heads // kv_heads
    k_aug = augment(source.k_weight, source.k_bias)
    key_moment = k_aug @ input_moment @ k_aug.T
    query_energy = group_query_energy(source, input_moment) if weighted else None
    placement = rope_placement(key_moment, kv_heads, head_dim, qk_rope_head_dim, query_energy)
    q_nope, q_pe, k_pe, k_nope, qk_nope_head_dim = split_rope(source, placement)

    v_aug = augment(source.v_weight, source.v_bias)
    key_metric, value_metric = output_metrics(source, input_moment, qk_nope_head_dim) if weighted else (None, None)
    down, up_k, up_v, stats = joint_latent(k_nope, v_aug, input_moment, kv_lora_rank, key_metric, value_metric)

    # q_proj rows per head: [q_nope (dn) ; q_pe (D)]
    width = source.hidden_size + 1
    q_nope = q_nope.view(heads, qk_nope_head_dim, width)
    q_pe = q_pe.view(heads, qk_rope_head_dim, width)
    q_weight = torch.cat((q_nope, q_pe), dim=1).reshape(heads * (qk_nope_head_dim + qk_rope_head_dim), width)
    # kv_b_proj rows per head: [W_uk of its group (dn) ; W_uv of its group (head_dim)]
    groups = torch.arange(heads) // group_size
    up_k = up_k.view(kv_heads, qk_nope_head_dim, kv_lora_rank)[groups]
    up_v = up_v.view(kv_heads, head_dim, kv_lora_rank)[groups]
    kv_b_weight = torch.cat((up_k, up_v), dim=1).reshape(heads * (qk_nope_head_dim + head_dim), kv_lora_rank)

    has_q_bias = source.q_bias is not None
    has_kv_bias = source.k_bias is not None or source.v_bias is not None
    q_weight, q_bias = split_augmented(q_weight, has_q_bias)
    kv_a_weight, kv_a_bias = split_augmented(torch.cat((down, k_pe), dim=0), has_kv_bias)
    stats["rope_energy_kept"] = placement.rope_energy_kept
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
        stats=stats,
    )
