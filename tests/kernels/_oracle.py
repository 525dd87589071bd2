"""Test helpers for losskit.kernels: the fp64 oracle and the tolerance rule of spec/kernels.md §5.

Oracle: the ``torch`` implementation in fp64 on the same (already rounded) inputs. For implementation X in
dtype d: ``err(X) <= err(torch impl in d) + tol`` with ``tol = c_d·max(1, |ref|)`` elementwise for values and
``c_d·max_j |G_ref|`` per row for gradients.
"""

from __future__ import annotations

import torch

C_D = {torch.float64: 1e-10, torch.float32: 4e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
FLOAT_FIELDS = (
    "lse",
    "target_logit",
    "nll",
    "log1m_target_prob",
    "support_mean_logit",
    "entropy",
    "wrong_entropy",
    "support_gap",
)


def _err(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|x − ref| with equal infinities and NaN-vs-NaN counting as 0 error, NaN-vs-number as inf."""
    x, ref = x.double(), ref.double()
    same = (x == ref) | (torch.isnan(x) & torch.isnan(ref))
    diff = (x - ref).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return torch.where(same, torch.zeros_like(diff), diff)


def assert_values_close(
    x: torch.Tensor, ref: torch.Tensor, base: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    """Elementwise rule: err(x) ≤ err(base) + c_d·max(1, |ref|)."""
    ref64 = ref.double()
    scale = torch.where(torch.isfinite(ref64), ref64.abs().clamp_min(1.0), torch.ones_like(ref64))
    tol = _err(base, ref) + C_D[dtype] * scale
    err = _err(x, ref)
    bad = err > tol
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0, 0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} element(s) out of tolerance; first flat index {i}: got "
            f"{x.reshape(-1)[i].item()!r}, ref {ref.reshape(-1)[i].item()!r}, base {base.reshape(-1)[i].item()!r}, "
            f"err {err.reshape(-1)[i].item():.3g} > tol {tol.reshape(-1)[i].item():.3g}"
        )


def assert_grad_close(
    g: torch.Tensor, ref: torch.Tensor, base: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    """Per-row rule for gradients: err(g) ≤ err(base) + c_d·max_j |G_ref| (elementwise within the row)."""
    v = ref.shape[-1]
    g2, r2, b2 = (t.reshape(-1, v).double() for t in (g, ref, base))
    row_scale = r2.abs().amax(dim=1, keepdim=True).nan_to_num(0.0, 0.0, 0.0)
    tol = _err(b2, r2) + C_D[dtype] * row_scale.clamp_min(1e-30)
    err = _err(g2, r2)
    bad = err > tol
    if bool(bad.any()):
        r, c = (int(k) for k in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} gradient element(s) out of tolerance; first row {r} col {c}: got "
            f"{g2[r, c].item()!r}, ref {r2[r, c].item()!r}, base {b2[r, c].item()!r}, tol {tol[r, c].item():.3g}"
        )


def assert_stats_close(stats, ref, base, dtype: torch.dtype, what: str = "") -> None:
    """Every float field by the value rule; valid/argmax/correct/bad exactly."""
    for name in FLOAT_FIELDS:
        assert_values_close(
            getattr(stats, name), getattr(ref, name), getattr(base, name), dtype, f"{what}{name}"
        )
        assert getattr(stats, name).dtype == (torch.float64 if dtype == torch.float64 else torch.float32), (
            name
        )
    assert torch.equal(stats.valid, ref.valid), f"{what}valid"
    assert torch.equal(stats.bad, ref.bad), f"{what}bad"
