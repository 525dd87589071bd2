"""The losses the cross-entropy benchmark times, and the fp64 plain-torch oracles they are checked against.

The benchmark (docs/losses.md, "Benchmarks") has four families; every function here takes logits ``(B, T, V)``
and targets ``(B, T)`` (``ignore_index`` = -100) and returns a 0-d loss to back-propagate:

* **Seed naive pipeline** (``seed_naive_pipeline``): seed 004's label smoothing (fp32 ``log_softmax``, a dense
  one-hot smoothed target distribution) times seed 000's entropy weight (softmax, zero the target, renormalise with
  ``eps``, entropy, per-sample mean, clamp at the threshold, mean).
* **Careful torch pipeline** (``careful_torch_pipeline``): ``F.cross_entropy(label_smoothing=ε)`` times a detached
  wrong-answer-entropy weight computed from ``log_softmax``.
* **losskit all features**, "all features" being ε = 0.1 (torch convention) with the last 256 ids excluded from the
  support (and hard targets for them), z-loss λ = 1e-4, per-token weights, ignored positions, and H(p), H(q)
  returned by the pass. *Pipeline* mode (``losskit_pipeline``, deferred) builds the per-token loss and the seed-000
  weights (batch scalar β from this pass's H(q), mask-ratio weights w_i) from ``kernels.token_stats`` and reduces
  with ``functional.reduce.sequence_mean``; *eager* mode (``losskit_eager``) passes the same weights up front to
  ``kernels.fused_token_loss``.
* Plain and smoothed CE (``F.cross_entropy`` / ``kernels.fused_token_loss``) need no helper.

The all-features loss, with m the validity mask, n_i = Σ_t m_it, S the non-empty samples, u the per-token weights::

    ε_t  = 0 if y_t ∈ E else ε                      (E = the last 256 ids)
    ℓ_t  = nll_t − ε_t·(mean_{c∉E} z_c − z_y) + λ·lse_t²
    β    = mean_{i∈S} max(Σ_t m_it H(q)_it / n_i, τ)          (detached)
    w_i  = clamp((n_i/(T + eps) + eps)^(−power), min, max)
    L    = β · (1/|S|) Σ_{i∈S} w_i · Σ_t m_it u_it ℓ_t / n_i

``all_features_reference`` is exactly that in plain torch (the oracle, run in fp64); ``seed_pipeline_reference`` is
the oracle of both seed pipelines (``F.cross_entropy(label_smoothing=ε)`` × β, with exact H(q)).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from losskit.contract import ConfigError

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class AllFeatures:
    """The settings of the "all features" losses and of the seed pipelines' weights.

    Attributes:
        label_smoothing: ε, torch convention.
        excluded_tail: how many of the last ids form the excluded set E (hard targets for them too).
        z_loss: λ of the z-loss λ·lse².
        entropy_weight: seed 000's ``entropy_modifier_weight``.
        entropy_threshold: seed 000's ``entropy_modifier_threshold`` τ (the seed pipeline's "clamp at 0.1").
        entropy_eps: seed 000's ``entropy_modifier_eps`` (only the naive pipeline uses it).
        mask_ratio_power, mask_ratio_min, mask_ratio_max, mask_ratio_eps: seed 000's mask-ratio weight keys.
    """

    label_smoothing: float = 0.1
    excluded_tail: int = 256
    z_loss: float = 1e-4
    entropy_weight: float = 1.0
    entropy_threshold: float = 0.1
    entropy_eps: float = 1e-8
    mask_ratio_power: float = 0.5
    mask_ratio_min: float = 0.1
    mask_ratio_max: float = 10.0
    mask_ratio_eps: float = 1e-8

    def excluded_ids(self, num_classes: int) -> tuple[int, ...]:
        """The excluded set E = the last ``excluded_tail`` ids of a vocabulary of ``num_classes``."""
        if num_classes <= self.excluded_tail:
            raise ConfigError(
                f"V must exceed excluded_tail={self.excluded_tail} so the smoothing support is not empty, "
                f"got V={num_classes}"
            )
        return tuple(range(num_classes - self.excluded_tail, num_classes))


# ---------------------------------------------------------------------------------------------------------------
# Weights shared by every pipeline: pure functions of (B, T) tensors, cheap next to the (B, T, V) pass.
# ---------------------------------------------------------------------------------------------------------------


def entropy_batch_weight(wrong_entropy: torch.Tensor, valid: torch.Tensor, cfg: AllFeatures) -> torch.Tensor:
    """Seed 000's batch scalar β = weight · mean_{i∈S} max(H̄_i, τ), H̄_i = Σ_t m_it H(q)_it / n_i (0-d).

    Empty samples are left out of the mean (as the entropy modifier does); nothing syncs.
    """
    m = valid.to(wrong_entropy.dtype)
    n = m.sum(-1)
    per_sample = (wrong_entropy * m).sum(-1) / n.clamp_min(1)
    nonempty = (n > 0).to(wrong_entropy.dtype)
    floored = per_sample.clamp_min(cfg.entropy_threshold)
    return cfg.entropy_weight * (floored * nonempty).sum() / nonempty.sum().clamp_min(1)


def mask_ratio_weight(valid: torch.Tensor, cfg: AllFeatures, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Seed 000's per-sample weight w_i = clamp((n_i/(T + eps) + eps)^(−power), min, max), shape ``(B,)``."""
    ratio = valid.to(dtype).sum(-1) / (valid.shape[-1] + cfg.mask_ratio_eps)
    return (ratio + cfg.mask_ratio_eps).pow(-cfg.mask_ratio_power).clamp(cfg.mask_ratio_min, cfg.mask_ratio_max)


def eager_coefficients(
    wrong_entropy: torch.Tensor, valid: torch.Tensor, token_weight: torch.Tensor, cfg: AllFeatures
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token coefficients c_it = β·w_i·u_it/n_i and denominator |S| that turn a weighted sum into ``L``.

    ``Σ_t m_t c_t ℓ_t / |S|`` equals the pipeline's sequence mean, so eager mode (weights up front) computes the
    same loss as pipeline mode when given the same H(q).
    """
    dtype = token_weight.dtype
    beta = entropy_batch_weight(wrong_entropy.to(dtype), valid, cfg)
    w = mask_ratio_weight(valid, cfg, dtype)
    n = valid.sum(-1)
    coeff = beta * token_weight * (w / n.clamp_min(1).to(dtype))[:, None]
    return coeff.detach(), (n > 0).sum().clamp_min(1).to(dtype)


def wrong_entropy_torch(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """H(q): entropy of softmax over the non-target logits, by ``log_softmax`` with the target column at −∞.

    Plain torch (the careful pipeline's weight and the oracle's)::

        lq = log_softmax(logits.scatter(-1, y[..., None], -inf), -1)
        H  = -(lq.exp() * lq.clamp_min(finfo.min)).sum(-1)      # 0·(−inf) never formed
    """
    y = target.clamp_min(0)[..., None]
    lq = F.log_softmax(logits.scatter(-1, y, float("-inf")), dim=-1)
    return -(lq.exp() * lq.clamp_min(torch.finfo(lq.dtype).min)).sum(-1)


# ---------------------------------------------------------------------------------------------------------------
# The timed pipelines.
# ---------------------------------------------------------------------------------------------------------------


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 upcast to fp32 (the seeds' fp32 math); fp32 and fp64 unchanged, so the oracle tests run in fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def seed_naive_pipeline(logits: torch.Tensor, target: torch.Tensor, cfg: AllFeatures) -> torch.Tensor:
    """Seed 004's smoothing × seed 000's entropy weight, written the way the seeds wrote them.

    Only what stops the seeds from running is changed: ``target`` is clamped before ``scatter_`` (the notebook
    crashed on −100), the notebook's ``oss`` typo is fixed, and the per-sample mean skips empty samples. The weight
    is computed under ``no_grad`` like the careful pipeline's, so both back-propagate the same loss.
    """
    num_classes = logits.shape[-1]
    eps = cfg.label_smoothing
    y = target.clamp_min(0)
    x = _at_least_fp32(logits)
    log_probs = F.log_softmax(x, dim=-1)
    with torch.no_grad():
        true_dist = torch.zeros_like(log_probs)
        true_dist.scatter_(-1, y.unsqueeze(-1), 1.0)
        true_dist = (1 - eps) * true_dist + eps / num_classes
    loss = (-true_dist * log_probs).sum(dim=-1)
    mask = target != IGNORE_INDEX
    loss = (loss * mask).sum() / mask.sum()
    with torch.no_grad():
        probs = F.softmax(x, dim=-1)
        probs = probs.scatter(-1, y.unsqueeze(-1), 0.0)
        wrong_mass = probs.sum(dim=-1, keepdim=True)
        q = probs / (wrong_mass + cfg.entropy_eps)
        entropy = -(q * torch.log(q + cfg.entropy_eps)).sum(dim=-1)
        entropy = torch.where(wrong_mass.squeeze(-1) > cfg.entropy_eps, entropy, torch.zeros_like(entropy))
        beta = entropy_batch_weight(entropy, mask, cfg)
    return loss * beta


def careful_torch_pipeline(logits: torch.Tensor, target: torch.Tensor, cfg: AllFeatures) -> torch.Tensor:
    """``F.cross_entropy(label_smoothing=ε)`` × a detached H(q) weight from ``log_softmax`` (fp32)."""
    x = _at_least_fp32(logits)
    loss = F.cross_entropy(
        x.reshape(-1, x.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, label_smoothing=cfg.label_smoothing
    )
    with torch.no_grad():
        beta = entropy_batch_weight(wrong_entropy_torch(x, target), target != IGNORE_INDEX, cfg)
    return loss * beta


def smoothing_per_token(target: torch.Tensor, num_classes: int, cfg: AllFeatures, dtype: torch.dtype) -> torch.Tensor:
    """ε_t: ε, or 0 where the target is one of the excluded (hard) ids."""
    return (target < num_classes - cfg.excluded_tail).to(dtype) * cfg.label_smoothing


def losskit_pipeline(
    logits: torch.Tensor,
    target: torch.Tensor,
    token_weight: torch.Tensor,
    cfg: AllFeatures,
    *,
    impl: str,
    inplace_grad: bool = False,
) -> torch.Tensor:
    """All features, deferred: one ``token_stats`` pass, loss and weights from its stats, backward through them.

    Plain torch equivalent: ``all_features_reference(logits, target, token_weight, cfg)``.
    """
    from losskit.functional import reduce
    from losskit.kernels import token_stats

    num_classes = logits.shape[-1]
    st = token_stats(
        logits, target, ignore_index=IGNORE_INDEX, smoothing_exclude=cfg.excluded_ids(num_classes), impl=impl,
        inplace_grad=inplace_grad,
    )
    eps_t = smoothing_per_token(target, num_classes, cfg, st.nll.dtype)
    token_loss = st.nll - eps_t * st.support_gap + cfg.z_loss * st.lse.square()
    with torch.no_grad():
        beta = entropy_batch_weight(st.wrong_entropy, st.valid, cfg)
        w = mask_ratio_weight(st.valid, cfg, st.nll.dtype)
    # token_weight first: a 0-d fp64 beta times an fp32 tensor would round the product to fp32.
    return reduce.sequence_mean(token_weight.to(token_loss.dtype) * beta * token_loss, st.valid, seq_weight=w)


def modifier_pipeline(cfg: AllFeatures, num_classes: int):
    """seed 000's ``LossModifierPipeline`` with smoothing (ε, special tokens E), entropy (τ) and mask-ratio weights,
    plus a user phase-2 modifier that contributes the per-token weights (passed as the ``token_weight`` extra).

    It cannot express the z-loss (no modifier adds one), so its oracle is ``all_features_reference`` at λ = 0.
    Deferred input checks: the trainer's path, with no host read inside the step.
    """
    from losskit.modifiers import (
        EntropyModifier,
        LossModifierPipeline,
        MaskRatioWeightModifier,
        TargetSmoothingModifier,
    )
    from losskit.modifiers.base import BaseLossModifier, Weights

    class TokenWeightModifier(BaseLossModifier):
        """Phase 2: the caller's per-token weights u_it, read from ``ctx.extras['token_weight']``."""

        def modify_loss(self, logits, targets, loss, **kwargs):
            return loss

        def get_metrics(self):
            return {}

        def weights(self, ctx):
            return Weights(token=ctx.extras["token_weight"])

    return LossModifierPipeline(
        [
            TargetSmoothingModifier({"enabled": True, "factor": cfg.label_smoothing,
                                     "special_tokens": list(cfg.excluded_ids(num_classes)), "convention": "torch"}),
            EntropyModifier({"enabled": True, "weight": cfg.entropy_weight, "threshold": cfg.entropy_threshold,
                             "eps": cfg.entropy_eps}),
            MaskRatioWeightModifier({"enabled": True, "power": cfg.mask_ratio_power, "min": cfg.mask_ratio_min,
                                     "max": cfg.mask_ratio_max, "eps": cfg.mask_ratio_eps}),
            TokenWeightModifier({"enabled": True}),
        ],
        input_checks="deferred",
    )


def seed_pipeline(cfg: AllFeatures):
    """Seed 000's pipeline as a user configures it: target smoothing ε (no special ids) and the entropy weight
    (weight, τ; eps rule off, as the careful torch pipeline has none). Deferred input checks (the trainer's path).

    Plain torch equivalent: ``careful_torch_pipeline(logits, target, cfg)``.
    """
    from losskit.modifiers import create_loss_modifier_pipeline

    return create_loss_modifier_pipeline({
        "loss_modifiers_enabled": True,
        "target_smoothing_enabled": True, "target_smoothing_factor": cfg.label_smoothing,
        "entropy_modifier_enabled": True, "entropy_modifier_weight": cfg.entropy_weight,
        "entropy_modifier_threshold": cfg.entropy_threshold, "entropy_modifier_eps": 0.0,
    }, verbose=False, input_checks="deferred")


def losskit_modifier_pipeline(
    pipeline, logits: torch.Tensor, target: torch.Tensor, token_weight: torch.Tensor, *, impl: str,
    inplace_grad: bool = False,
) -> torch.Tensor:
    """``pipeline.compute(...)`` (the trainer's path) on the pipeline built by ``modifier_pipeline``.

    Plain torch equivalent: ``all_features_reference(logits, target, token_weight, replace(cfg, z_loss=0))``.
    """
    return pipeline.compute(
        logits, target, ignore_index=IGNORE_INDEX, impl=impl, inplace_grad=inplace_grad, token_weight=token_weight
    ).loss


def losskit_eager(
    logits: torch.Tensor,
    target: torch.Tensor,
    coeff: torch.Tensor,
    denominator: torch.Tensor,
    cfg: AllFeatures,
    *,
    impl: str,
    inplace_grad: bool = False,
) -> torch.Tensor:
    """All features, eager: ``fused_token_loss`` with the coefficients of ``eager_coefficients`` given up front.

    Plain torch equivalent: ``eager_reference(logits, target, coeff, denominator, cfg)``.
    """
    from losskit.kernels import fused_token_loss

    num_classes = logits.shape[-1]
    return fused_token_loss(
        logits, target, ignore_index=IGNORE_INDEX, token_weight=coeff, label_smoothing=cfg.label_smoothing,
        smoothing_convention="torch", smoothing_exclude=cfg.excluded_ids(num_classes), z_loss=cfg.z_loss,
        normalizer=denominator, reduction="sum", impl=impl, inplace_grad=inplace_grad,
    ).loss


def losskit_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, label_smoothing: float, impl: str, inplace_grad: bool = False
) -> torch.Tensor:
    """Token-mean (smoothed) CE through ``fused_token_loss``: like-for-like with ``F.cross_entropy``.

    Plain torch equivalent: ``F.cross_entropy(logits.flatten(0, -2), target.flatten(), label_smoothing=...)``.
    """
    from losskit.functional import reduce
    from losskit.kernels import fused_token_loss

    denominator = reduce.normalizer(target != IGNORE_INDEX, dtype=torch.float32)
    return fused_token_loss(
        logits, target, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, normalizer=denominator,
        reduction="sum", impl=impl, inplace_grad=inplace_grad,
    ).loss


# ---------------------------------------------------------------------------------------------------------------
# Oracles (plain torch; the benchmark's --check runs them in fp64).
# ---------------------------------------------------------------------------------------------------------------


def all_features_token_loss(logits: torch.Tensor, target: torch.Tensor, cfg: AllFeatures) -> torch.Tensor:
    """ℓ_t = nll − ε_t·(mean_{c∉E} z_c − z_y) + λ·lse², 0 at ignored positions (plain torch, any dtype)."""
    num_classes = logits.shape[-1]
    valid = target != IGNORE_INDEX
    y = target.clamp_min(0)[..., None]
    lse = torch.logsumexp(logits, dim=-1)
    z_y = logits.gather(-1, y).squeeze(-1)
    support_mean = logits[..., : num_classes - cfg.excluded_tail].mean(-1)
    eps_t = smoothing_per_token(target, num_classes, cfg, logits.dtype)
    token_loss = (lse - z_y) - eps_t * (support_mean - z_y) + cfg.z_loss * lse.square()
    return torch.where(valid, token_loss, torch.zeros_like(token_loss))


def all_features_reference(
    logits: torch.Tensor, target: torch.Tensor, token_weight: torch.Tensor, cfg: AllFeatures
) -> torch.Tensor:
    """The all-features pipeline loss L of the module docstring, in plain torch (weights from exact H(q))."""
    valid = target != IGNORE_INDEX
    token_loss = all_features_token_loss(logits, target, cfg)
    with torch.no_grad():
        beta = entropy_batch_weight(wrong_entropy_torch(logits, target), valid, cfg)
        w = mask_ratio_weight(valid, cfg, logits.dtype)
    n = valid.sum(-1)
    per_sample = (token_weight.to(logits.dtype) * token_loss).sum(-1) / n.clamp_min(1)
    nonempty = n > 0
    return beta * torch.where(nonempty, w * per_sample, torch.zeros_like(per_sample)).sum() / nonempty.sum().clamp_min(1)


def eager_reference(
    logits: torch.Tensor, target: torch.Tensor, coeff: torch.Tensor, denominator: torch.Tensor, cfg: AllFeatures
) -> torch.Tensor:
    """``Σ_t m_t c_t ℓ_t / denominator`` in plain torch: the eager loss for given coefficients."""
    token_loss = all_features_token_loss(logits, target, cfg)
    return (coeff.to(logits.dtype) * token_loss).sum() / denominator.to(logits.dtype)


def seed_pipeline_reference(logits: torch.Tensor, target: torch.Tensor, cfg: AllFeatures) -> torch.Tensor:
    """Both seed pipelines' loss: ``F.cross_entropy(label_smoothing=ε)`` × β with exact H(q)."""
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
        label_smoothing=cfg.label_smoothing,
    )
    with torch.no_grad():
        beta = entropy_batch_weight(wrong_entropy_torch(logits, target), target != IGNORE_INDEX, cfg)
    return loss * beta
