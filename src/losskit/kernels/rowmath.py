"""Per-row closed forms shared by the streaming implementations.

Everything here acts on per-row vectors of shape ``(n,)`` (never on ``(n, V)`` data): merging two partial
streaming states, turning a final state into the closed-form statistics, and turning upstream gradients into
the per-row coefficients of the one-pass backward. Pure functions, no host syncs.

Notation (one row): logits z, target y, ``m = max_{i≠y} z_i``, ``d = Σ_{i≠y} e^{z_i−m}``,
``s = Σ_{i≠y} e^{z_i−m}(z_i−m)``, ``a = Σ_{i∈A} (z_i − z_y)``, ``L¬ = m + ln d``, ``δ = z_y − L¬``,
``sp₊ = softplus(δ)``, ``sp₋ = softplus(−δ)``.
"""

from __future__ import annotations

import dataclasses

import torch

# Logits at or below this value are treated as −∞. Streaming code clamps −∞ up to it so that every product
# e·(z − m) with e = 0 is an exact 0 instead of 0·(−∞) = NaN (the streaming guard).
NEG_LARGE = -(2.0**100)
# A support sum below this can only come from a clamped −∞ column (finite logits would need |z| ≈ 1e24).
NEG_LARGE_SUM = -(2.0**99)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """``softplus(x) = max(x, 0) + log1p(exp(−|x|))``, accurate for every x (no ``log(1 + ·)`` underflow).

    ``log1p`` keeps ``softplus(−40) = 4.2e-18`` exact where ``log(1 + exp(−40))`` would return 0.
    ``±inf`` give ``inf`` / ``0``; NaN propagates.
    """
    return x.clamp_min(0) + torch.log1p(torch.exp(-x.abs()))


@dataclasses.dataclass
class RowState:
    """Partial streaming state of a set of rows over some columns.

    Attributes:
        m: running max over the absorbed non-target columns (``−inf`` when none was finite).
        d: ``Σ e^{z_i − m}`` (0 when ``m = −inf``).
        s: ``Σ e^{z_i − m}(z_i − m)``.
        a: ``Σ_{i∈A} (z_i − z_y)`` over the absorbed columns (the smoothing gap: exact in shift).
        support_sum: ``Σ_{i∈A, i≠y} z_i`` over the absorbed columns, summed as they are (the support mean: exact
            however far the target logit is from it); below ``NEG_LARGE_SUM`` when a −inf column was absorbed.
        amax_val: the largest value seen (target excluded), with ``amax_idx`` its lowest column index.
    """

    m: torch.Tensor
    d: torch.Tensor
    s: torch.Tensor
    a: torch.Tensor
    support_sum: torch.Tensor
    amax_val: torch.Tensor
    amax_idx: torch.Tensor


def merge_states(x: RowState, y: RowState) -> RowState:
    """Merge two partial streaming states.

    ``m = max(m₁, m₂)``, ``r_k = e^{m_k − m}``, ``d = r₁d₁ + r₂d₂``,
    ``s = r₁(s₁ + (m₁ − m)d₁) + r₂(s₂ + (m₂ − m)d₂)``; ``a`` adds; the argmax keeps the larger value and,
    on ties, the first state's (lower) index. A state with ``m = −inf`` contributes nothing, so
    ``−inf − (−inf)`` is never evaluated.
    """
    m = torch.maximum(x.m, y.m)
    m_ref = torch.where(m == float("-inf"), torch.zeros_like(m), m)

    def part(p: RowState) -> tuple[torch.Tensor, torch.Tensor]:
        r = torch.exp(p.m - m_ref)
        diff = torch.where(p.d > 0, (p.m - m_ref) * p.d, torch.zeros_like(p.d))
        return r * p.d, r * (p.s + diff)

    d1, s1 = part(x)
    d2, s2 = part(y)
    take = (y.amax_val > x.amax_val) | (torch.isnan(y.amax_val) & ~torch.isnan(x.amax_val))
    return RowState(
        m=m,
        d=d1 + d2,
        s=s1 + s2,
        a=x.a + y.a,
        support_sum=x.support_sum + y.support_sum,
        amax_val=torch.where(take, y.amax_val, x.amax_val),
        amax_idx=torch.where(take, y.amax_idx, x.amax_idx),
    )


@dataclasses.dataclass
class RowStats:
    """Closed forms of one pass plus the row constants the backward needs.

    All fields are ``(n,)`` and not yet masked by validity.
    """

    lse: torch.Tensor
    target_logit: torch.Tensor
    nll: torch.Tensor  # sp₋
    log1m: torch.Tensor  # −sp₊
    support_gap: torch.Tensor  # a / K  (support mean minus target logit, exact in shift)
    support_mean: torch.Tensor  # (Σ_{A, i≠y} z_i + [y∈A]·z_y) / K
    entropy: torch.Tensor
    wrong_entropy: torch.Tensor
    argmax: torch.Tensor
    shift: torch.Tensor  # m (0 when no finite non-target logit): the backward forms e^{z − m} exactly
    log_d: torch.Tensor  # ln d (0 when d = 0)
    inv_d: torch.Tensor  # 1/d (0 when d = 0), so q = e^{z − L¬} = e^{z − m}·(1/d)
    p_y: torch.Tensor  # e^{−sp₋}
    one_minus_p_y: torch.Tensor  # e^{−sp₊}


@dataclasses.dataclass(frozen=True)
class RowTargets:
    """Per-row target information a final state is read with: ``z_y``, the clamped target, ``[y∈A]`` (float)
    and ``K = |A|``."""

    target_logit: torch.Tensor
    target: torch.Tensor
    in_support: torch.Tensor
    num_support: int


def finalize(st: RowState, rows: RowTargets) -> RowStats:
    """Statistics from a final streaming state, without cancellation.

    ``lse = L¬ + sp₊`` (written ``max(L¬, z_y) + log1p(e^{−|δ|})`` so that a degenerate row, d = 0, gives
    ``z_y``), ``nll = sp₋``, ``ln(1 − p_y) = −sp₊``, ``H(q) = ln d − s/d``,
    ``H(p) = p_y·sp₋ + (1 − p_y)(sp₊ + H(q))``, support mean − z_y = ``a/K``, support mean
    ``(support_sum + [y∈A]·z_y)/K``.

    ``m`` is the reference the state was accumulated against (0 stands in for −∞ when ``d = 0``). Every
    difference of large quantities is formed exactly: ``δ = −((m − z_y) + ln d)``, never ``z_y − L¬``, so a
    common offset of all logits changes nothing beyond the rounding of the inputs.
    ``target`` is the clamped target (in ``[0, V)``); the argmax compares the best non-target column with
    ``z_y``, lowest index on ties (as ``torch.argmax``).
    """
    m, d, s, a = st.m, st.d, st.s, st.a
    amax_val, amax_idx = st.amax_val, st.amax_idx
    target_logit, target, num_support = rows.target_logit, rows.target, rows.num_support
    zero = torch.zeros_like(d)
    log_d = torch.log(d)
    lneg = m + log_d
    # δ = z_y − L¬ formed as −((m − z_y) + ln d): m − z_y is exact for nearby logits, while L¬ itself rounds
    # to the ulp of a large logit (1e-3 at |z| ≈ 1e4), which would become the absolute error of nll.
    delta = -((m - target_logit) + log_d)
    sp_pos = softplus(delta)
    sp_neg = softplus(-delta)
    lse = torch.maximum(lneg, target_logit) + torch.log1p(torch.exp(-delta.abs()))
    p_y = torch.exp(-sp_neg)
    om = torch.exp(-sp_pos)
    has_wrong = d > 0
    d_safe = torch.where(has_wrong, d, torch.ones_like(d))
    wrong_entropy = torch.where(has_wrong, torch.log(d_safe) - s / d_safe, zero)
    # 0·inf would be NaN when 1 − p_y underflows with sp₊ = inf (no finite non-target logit).
    entropy = p_y * sp_neg + torch.where(om > 0, om * (sp_pos + wrong_entropy), zero)
    support_gap = a / num_support if num_support > 0 else torch.zeros_like(a)
    if num_support > 0:
        raw = st.support_sum + rows.in_support * target_logit.clamp_min(NEG_LARGE)
        support_mean = torch.where(st.support_sum < NEG_LARGE_SUM, torch.full_like(raw, float("-inf")),
                                   raw / num_support)
    else:
        support_mean = target_logit
    zy_c = target_logit.clamp_min(NEG_LARGE)
    y_wins = (zy_c > amax_val) | ((zy_c == amax_val) & (target < amax_idx))
    y_wins = y_wins | (torch.isnan(target_logit) & (~torch.isnan(amax_val) | (target < amax_idx)))
    argmax = torch.where(y_wins, target, amax_idx)
    return RowStats(
        lse=lse,
        target_logit=target_logit,
        nll=sp_neg,
        log1m=-sp_pos,
        support_gap=support_gap,
        support_mean=support_mean,
        entropy=entropy,
        wrong_entropy=wrong_entropy,
        argmax=argmax,
        shift=m,
        log_d=torch.where(has_wrong, torch.log(d_safe), zero),
        inv_d=torch.where(has_wrong, 1.0 / d_safe, zero),
        p_y=p_y,
        one_minus_p_y=om,
    )


def smoothed_nll(nll: torch.Tensor, support_gap: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Label-smoothed CE from the statistics, the one closed form every fast path uses.

    ``CE_ε = nll − ε_t·a/K_t = nll − scale·support_gap`` with ``scale = ε_t·K/K_t`` (ε_t for the "torch"
    convention, ``ε_t·K/(K − [y∈A])`` for "fairseq"; 0 on hard-target rows). ``torch.where``, not the product
    alone: a row with ε_t = 0 keeps its plain nll even where ``support_gap`` is −inf (−inf in the support).
    The dense equivalent is ``−Σ_c q_c·log_softmax(z)_c`` with ``q = (1 − ε_t)·onehot(y) + ε_t/K_t·[c ∈ A_t]``.
    """
    return torch.where(scale > 0, nll - scale * support_gap, nll)


def shifted_coefficients(co: GradCoefficients, rs: RowStats) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rewrite ``q·(α + β·u)`` with ``u = z − L¬`` in terms of ``w = z − m`` (exact near the max).

    ``u = w − ln d`` and ``q = e^{w}/d``, so ``G = e^{w}·(scale + beta'·w)`` with
    ``scale = (α − β·ln d)/d`` and ``beta' = β/d``. Shifting by ``L¬`` itself would round it to the ulp of a
    large logit (1e-3 at |z| ≈ 1e4) and lose that much relative precision in every p_j.
    """
    alpha = co.alpha if co.beta is None else co.alpha - co.beta * rs.log_d
    return alpha * rs.inv_d, None if co.beta is None else co.beta * rs.inv_d


@dataclasses.dataclass
class GradCoefficients:
    """Per-row coefficients of the one-pass backward.

    For every column j ≠ y with ``u_j = z_j − shift`` and ``q_j = e^{u_j}``:
    ``G_j = q_j·(alpha + beta·u_j) + gamma·[j∈A]``; the target column gets ``G_y`` exactly.
    ``beta`` / ``gamma`` are None when statically zero (the term is then skipped).
    """

    alpha: torch.Tensor
    beta: torch.Tensor | None
    gamma: torch.Tensor | None
    g_target: torch.Tensor


def stats_grad_coefficients(
    rs: RowStats,
    in_support: torch.Tensor,
    num_support: int,
    *,
    g_lse: torch.Tensor | None,
    g_zy: torch.Tensor | None,
    g_nll: torch.Tensor | None,
    g_l1m: torch.Tensor | None,
    g_mean: torch.Tensor | None,
    g_h: torch.Tensor | None,
    g_hq: torch.Tensor | None,
) -> GradCoefficients:
    """Coefficients of the one-pass backward of the statistics.

    j ≠ y: ``G_j = p_j(g_lse + g_nll) + [j∈A]g_mean/K − g_H·p_j(z_j − lse + H)
    + q_j(g_l1m·p_y − g_Hq(z_j − L¬ + H_q))``; with ``p_j = q_j(1 − p_y)`` and
    ``z_j − lse = u_j − sp₊`` this is ``q_j(alpha + beta·u_j) + gamma[j∈A]``.

    j = y: ``G_y = (g_lse + g_zy) − (g_lse + g_nll)(1 − p_y) + [y∈A]g_mean/K + g_H·p_y(nll − H)
    − g_l1m·p_y``.

    Each upstream gradient is ``(n,)`` (already 0 at invalid rows) or None when unused.
    ``in_support`` is ``[y∈A]`` per row (float).
    """
    om, p_y = rs.one_minus_p_y, rs.p_y
    zero = torch.zeros_like(om)
    g_lin = zero
    for g in (g_lse, g_nll):
        if g is not None:
            g_lin = g_lin + g
    alpha = om * g_lin
    g_target = g_lin * -om
    if g_lse is not None:
        g_target = g_target + g_lse
    if g_zy is not None:
        g_target = g_target + g_zy
    beta = None
    if g_h is not None:
        # om·(H − sp₊) → 0 as om → 0; where, not the product: sp₊ = inf on a degenerate row (0·inf = NaN)
        alpha = alpha - g_h * torch.where(om > 0, om * (rs.entropy + rs.log1m), zero)  # log1m = −sp₊
        beta = -g_h * om
        g_target = g_target + g_h * p_y * (rs.nll - rs.entropy)
    if g_hq is not None:
        alpha = alpha - g_hq * rs.wrong_entropy
        beta = -g_hq if beta is None else beta - g_hq
    if g_l1m is not None:
        # A degenerate row (no finite non-target logit, d = 0) has ln(1 − p_y) = −inf whatever z_y: gradient 0.
        g_l1m = torch.where(rs.inv_d > 0, g_l1m, zero)
        alpha = alpha + g_l1m * p_y
        g_target = g_target - g_l1m * p_y
    gamma = None
    if g_mean is not None and num_support > 0:
        gamma = g_mean / num_support
        g_target = g_target + in_support * gamma
    return GradCoefficients(alpha=alpha, beta=beta, gamma=gamma, g_target=g_target)


def fused_grad_coefficients(
    rs: RowStats,
    coef: torch.Tensor,
    eps_t: torch.Tensor | None,
    eps_over_kt: torch.Tensor | None,
    target_in_at: torch.Tensor | None,
    z_loss: float,
) -> GradCoefficients:
    """Coefficients of the fused loss gradient for ``c_t = coef``.

    j ≠ y: ``G_j = c_t[(1 + 2λ·lse)·p_j − (ε_t/K_t)[j∈A_t]]``;
    j = y: ``G_y = c_t[ε_t − (1 − p_y) + 2λ·lse·p_y − (ε_t/K_t)[y∈A_t]]``.

    ``eps_over_kt`` is ``ε_t/K_t`` (0 where ε_t = 0), ``target_in_at`` is ``[y∈A_t]`` (float).
    """
    om, p_y = rs.one_minus_p_y, rs.p_y
    zl = 1.0 if z_loss == 0.0 else 1.0 + 2.0 * z_loss * rs.lse
    alpha = coef * zl * om
    g_target = -om
    if z_loss != 0.0:
        g_target = g_target + 2.0 * z_loss * rs.lse * p_y
    gamma = None
    if eps_t is not None:
        g_target = g_target + eps_t - eps_over_kt * target_in_at
        gamma = -coef * eps_over_kt
    return GradCoefficients(alpha=alpha, beta=None, gamma=gamma, g_target=coef * g_target)
