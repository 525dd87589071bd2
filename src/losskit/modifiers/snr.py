"""``SNRWeightModifier``: per-example diffusion loss weights as a phase-2 weight producer.

Sources: seed 001 (the Sangoi loss modifier) and the SNR weightings of ``losskit.functional.diffusion`` (min-SNR-γ,
debiased, P2, SD3, EDM). The modifier runs on the pipeline's element-wise entry
``LossModifierPipeline.compute_elementwise(per_token_loss, mask=..., log_snr=..., predicted=..., target=...)`` and
contributes ``Weights(sample=w, sequence_mean=True)``, so that phase 3 computes::

    L = (1/|S|) Σ_{i∈S} w_i · (Σ_e m_ie ℓ_ie / n_i)

each example's loss averaged over all its non-batch elements, weighted, then averaged over non-empty examples:
where OneTrainer, sd-scripts, diffusers and the seed apply such weights. Plain torch (no mask)::

    w = loss_weight(scheme, log_snr, prediction_type=..., ...)          # [B], detached
    loss = (w * per_token_loss.flatten(1).mean(1)).mean()
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from losskit.contract import LossInputError
from losskit.functional import reduce
from losskit.functional.diffusion import SNR_GUARD, loss_weight, sangoi_mape, sangoi_weight_from_mape
from losskit.modifiers.base import BaseLossModifier, ModifierContext, Weights, masked_summary
from losskit.modifiers.config_keys import SNRSettings
from losskit.modifiers.standalone import standalone_pipeline

__all__ = ["SNRWeightModifier"]

_LOG_GUARD = math.log(SNR_GUARD)
_SANGOI_MIN_SNR, _SANGOI_MAX_SNR = 1e-4, 100.0


class SNRWeightModifier(BaseLossModifier):
    """Phase-2 weight producer: per-example weights ``w_i`` from the log-SNR (and, for Sangoi, the prediction).

    Config: ``SNRSettings``, or a dict of the flat keys (unstripped): ``loss_weighting="constant"`` (``constant``, ``sangoi``,
    ``min_snr``, ``debiased``, ``p2``, ``sd3_sigma_sqrt``, ``sd3_cosmap``, ``edm``), ``min_snr_gamma=5.0``,
    ``p2_gamma=1.0``, ``p2_k=1.0``, ``snr_clamp_min=None``, ``snr_clamp_max=None``, ``prediction_type="epsilon"``,
    ``weighting_convention="reference"``, ``edm_sigma_data=0.5``, ``loss_weighting_differentiable_weights=False``.
    ``enabled = (loss_weighting != "constant")``. Bad values, and scheme/space/convention cells that the named
    trainer does not define, raise ``ConfigError`` at construction.

    Extras read from the pipeline call: ``log_snr`` ``[B]`` (or ``snr``), and for Sangoi ``predicted`` and
    ``target`` (shaped like ``per_token_loss``; the pipeline's mask also masks the MAPE).

    Metrics over non-empty examples (detached 0-d tensors, no sync): ``mean_weight``, ``min_weight``,
    ``max_weight``, ``mean_snr`` (``exp(λ)`` with λ clamped to ±ln 1e10) and, for Sangoi, ``mean_mape``.
    """

    needs = ()
    requires_logits = False
    canonical_rank = 3

    def __init__(self, config: SNRSettings | Mapping[str, Any] | None = None):
        s = self.bind_settings(SNRSettings, config)
        self.scheme: str = s.loss_weighting
        self.prediction_type: str = s.prediction_type
        self.convention: str = s.weighting_convention
        self.differentiable_weights = s.loss_weighting_differentiable_weights
        self.last_weights = None
        lo, hi = s.snr_clamp_min, s.snr_clamp_max
        common = {"snr_clamp_min": lo, "snr_clamp_max": hi}
        self._params: dict[str, Any] = {
            "constant": common,
            "min_snr": {"gamma": s.min_snr_gamma, **common},
            "debiased": common,
            "p2": {"gamma": s.p2_gamma, "k": s.p2_k, **common},
            "edm": {"sigma_data": s.edm_sigma_data, **common},
            "sd3_sigma_sqrt": common,
            "sd3_cosmap": common,
            "sangoi": common,
        }[self.scheme]

    # ---- phase 2 ----------------------------------------------------------------------------------------------
    def weights(self, ctx: ModifierContext) -> Weights:
        batch = ctx.valid.shape[0]
        if batch == 0:
            raise LossInputError("SNRWeightModifier: empty batch (B = 0); expected at least one example")
        lam = self._log_snr(ctx.extras, batch)
        dtype = ctx.per_token_loss.dtype if ctx.per_token_loss is not None else torch.float32
        mape = None
        if self.scheme == "sangoi":
            predicted, target = self._pair(ctx)
            mask = ctx.valid.reshape(predicted.shape)
            if not self.differentiable_weights:
                predicted, target = predicted.detach(), target.detach()
            mape = sangoi_mape(predicted, target, mask=mask)
            lo, hi = self._params["snr_clamp_min"], self._params["snr_clamp_max"]
            snr = torch.exp(lam.detach().double() if lam.device.type != "mps" else lam.detach())
            w = sangoi_weight_from_mape(
                snr,
                mape,
                min_snr=_SANGOI_MIN_SNR if lo is None else lo,
                max_snr=_SANGOI_MAX_SNR if hi is None else hi,
                dtype=dtype,
            )
        else:
            w = loss_weight(
                self.scheme,
                lam,
                prediction_type=self.prediction_type,
                convention=self.convention,
                dtype=dtype,
                **self._params,
            )
        keep = ctx.nonempty
        wd = w.detach()
        ws = masked_summary(wd, keep)
        snr_shown = torch.exp(lam.detach().to(wd.dtype).clamp(-_LOG_GUARD, _LOG_GUARD))
        metrics = {
            "mean_weight": ws.mean,
            "min_weight": ws.min,
            "max_weight": ws.max,
            "mean_snr": reduce.masked_mean(snr_shown, keep),
        }
        if mape is not None:
            metrics["mean_mape"] = reduce.masked_mean(mape.detach().to(wd.dtype), keep)
        self._metrics = metrics
        self.last_weights = wd  # [B], detached: for per-bucket logging by the diffusion task
        return Weights(sample=w, sequence_mean=True)

    @staticmethod
    def _log_snr(extras: Mapping[str, Any], batch: int) -> torch.Tensor:
        lam, snr = extras.get("log_snr"), extras.get("snr")
        if (lam is None) == (snr is None):
            raise LossInputError(
                "SNRWeightModifier needs exactly one of log_snr / snr ([B] per example) as a keyword of "
                f"compute_elementwise, got log_snr={'given' if lam is not None else None}, "
                f"snr={'given' if snr is not None else None}"
            )
        name, value = ("log_snr", lam) if lam is not None else ("snr", snr)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise LossInputError(f"{name} must be a floating-point tensor [B], got {got}")
        if value.numel() != batch:
            raise LossInputError(
                f"{name} must hold one value per example (shape [{batch}]), got {tuple(value.shape)}"
            )
        value = value.reshape(batch)
        return value if name == "log_snr" else torch.log(value)

    @staticmethod
    def _pair(ctx: ModifierContext) -> tuple[torch.Tensor, torch.Tensor]:
        predicted, target = ctx.extras.get("predicted"), ctx.extras.get("target")
        if not isinstance(predicted, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise LossInputError(
                "loss_weighting='sangoi' needs the predicted and target tensors as keywords of compute_elementwise, "
                f"got predicted={type(predicted).__name__}, target={type(target).__name__}"
            )
        if predicted.numel() != ctx.valid.numel() or predicted.shape[:1] != ctx.valid.shape[:1]:
            raise LossInputError(
                "predicted must have the elements of per_token_loss (one relative error per loss element), got "
                f"predicted {tuple(predicted.shape)} for per_token_loss with {tuple(ctx.valid.shape)} (B, E)"
            )
        return predicted, target

    # ---- standalone -------------------------------------------------------------------------------------------
    def modify_loss(
        self,
        predicted: torch.Tensor,
        target: torch.Tensor,
        loss: torch.Tensor | None = None,
        *,
        log_snr: torch.Tensor | None = None,
        snr: torch.Tensor | None = None,
        per_token_loss: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Standalone use: equals a pipeline holding only this modifier (``compute_elementwise``).

        Args:
            predicted, target: ``[B, ...]`` network output and regression target.
            loss: unused (kept for the seed's signature).
            log_snr, snr: exactly one, ``[B]``.
            per_token_loss: ``[B, ...]``; default ``(predicted − target)²`` in float32 (float64 inputs stay
                float64).
            mask: optional bool mask of the shape of ``per_token_loss``.

        Returns:
            The weighted 0-d loss.
        """
        del loss
        for name, x in (("predicted", predicted), ("target", target)):
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
                raise LossInputError(f"{name} must be a floating-point tensor, got {got}")
        if predicted.dim() == 0 or predicted.shape[0] == 0:
            raise LossInputError(
                f"predicted must be a non-empty batch [B, ...] with B >= 1, got shape {tuple(predicted.shape)}"
            )
        if per_token_loss is None:
            if predicted.shape != target.shape:
                raise LossInputError(
                    f"target must have the shape of predicted {tuple(predicted.shape)}, got {tuple(target.shape)}"
                )
            c = torch.promote_types(torch.promote_types(predicted.dtype, target.dtype), torch.float32)
            per_token_loss = (predicted.to(c) - target.to(c)) ** 2
        extras: dict[str, Any] = {"predicted": predicted, "target": target, **kwargs}
        if log_snr is not None:
            extras["log_snr"] = log_snr
        if snr is not None:
            extras["snr"] = snr
        if self.enabled:
            self._log_snr(extras, predicted.shape[0])  # the same error with or without the pipeline
        return standalone_pipeline(self).compute_elementwise(per_token_loss, mask=mask, **extras).loss

    def get_metrics(self) -> dict[str, Any]:
        return dict(self._metrics)
