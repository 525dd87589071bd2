"""``LossModifierPipeline``: fixed phases over one statistics pass (seed 000).

One ``kernels.token_stats`` pass over the logits yields every per-token number the built-ins need; the pipeline
then composes them in fixed phases, whatever the order of the config or of the modifier list::

    m    = (targets != ignore_index) ∧ mask ∧ [targets != padding_token]          (the one mask; last factor: smoothing)
    ℓ_it = smoothed CE if TargetSmoothing is on, else CE; 0 where m_it = 0      (phase 1)
    β, e_i, w_i, u_it from the weight producers (detached by default)            (phase 2)
    MaskRatio off:  L = β · Σ_{i,t} m_it e_i u_it ℓ_it / N                       (phase 3, functional/reduce.py)
    MaskRatio on:   L = β · (1/|S|) Σ_{i∈S} w_i e_i (Σ_t m_it u_it ℓ_it / n_i)
    L ← f_K(… f_1(L))                                                           (phase 4, user modify_loss)

Under ``normalize="global_tokens"`` (a ``step_counts`` argument) ``N`` and ``|S|`` are the step's counts.

The loss is built from the differentiable statistics (the kernels' deferred mode): the backward is one more pass
over the logits with per-row coefficients, whatever the combination. With no modifier enabled, ``modify_loss``
returns the very ``loss`` object it was given (no statistics pass, no allocation, no metric, no print).

Plain torch equivalent of the composed loss (the oracle of the tests), for ``(B, T, V)`` logits ``z``::

    logp = z.log_softmax(-1); nll = -logp.gather(-1, y[..., None]).squeeze(-1)
    ell = nll                                     # or (1-ε)·nll + ε·(-logp[..., A].mean(-1)) with smoothing
    L = (beta * w * e * (ell * m).sum(-1) / n)[n > 0].mean()      # MaskRatio on; else beta*(e*ell*m).sum()/m.sum()
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from losskit import kernels
from losskit.contract import (
    ConfigError,
    LossInputError,
    StepCounts,
    check_ignore_index,
    check_logits_target,
    explain_bad_rows,
    validity_mask,
)
from losskit.functional import reduce
from losskit.modifiers.base import BaseLossModifier, ModifiedLoss, ModifierContext, Weights, phase_of

__all__ = [
    "INPUT_CHECKS",
    "MISMATCH_MESSAGE",
    "LossModifierPipeline",
]

INPUT_CHECKS: tuple[str, ...] = ("immediate", "deferred")
MISMATCH_MESSAGE = (
    "the loss given to the loss-modifier pipeline differs from its plain token-mean cross-entropy by more than "
    "1e-3 relative ({given:.6g} vs {raw:.6g}); the built-in modifiers replace it, so add auxiliary terms (e.g. MoE "
    "balance loss) after the pipeline"
)
_RECOGNISED = ("mask", "ignore_index", "step_counts", "iter_num")


def _describe_value(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    return f"{type(out).__name__} {out!r}" if not isinstance(out, dict) else f"a dict with keys {sorted(out)}"


def _combine(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a * b


class LossModifierPipeline:
    """An ordered set of loss modifiers applied in fixed phases over one statistics pass.

    Args:
        modifiers: modifier instances (built-ins and user subclasses of ``BaseLossModifier``).
        input_checks: ``"immediate"`` (default): bad input raises ``LossInputError`` at the call, after one host
            read per call; an all-invalid batch warns ``EmptyBatchWarning``. ``"deferred"``: no host read at all;
            the device flag ``ModifiedLoss.bad`` (or :attr:`last_bad`) is read by the trainer once per step.
        impl: kernels implementation for ``modify_loss`` (``compute`` takes its own).

    Names: a duplicate ``name`` gets the suffix ``_2``, ``_3``, … so that metric keys never collide.

    Under ``torch.compile`` each entry point (``modify_loss``, ``compute``, ``compute_elementwise``) is one graph
    break: it runs eagerly (its one host read and the kernels' own fused code), the code around it compiles.
    """

    def __init__(self, modifiers: Iterable[BaseLossModifier] = (), *, input_checks: str = "immediate",
                 impl: str = "auto"):
        if input_checks not in INPUT_CHECKS:
            raise ConfigError(f"input_checks must be one of 'immediate', 'deferred', got {input_checks!r}")
        self.input_checks = input_checks
        self.impl = impl
        self.modifiers: list[BaseLossModifier] = []
        self._suspended = False
        self._checked_incoming = False
        self.last_bad: torch.Tensor | None = None
        for m in modifiers:
            self.add_modifier(m)

    # ---- membership -------------------------------------------------------------------------------------------
    def add_modifier(self, modifier: BaseLossModifier) -> BaseLossModifier:
        """Append a modifier (duplicate names get ``_2``, ``_3``, …). Returns it."""
        if not isinstance(modifier, BaseLossModifier):
            raise TypeError(f"modifier must be a BaseLossModifier, got {type(modifier).__name__}")
        taken = {m.name for m in self.modifiers}
        if modifier.name in taken:
            base, k = modifier.name, 2
            while f"{base}_{k}" in taken:
                k += 1
            modifier.name = f"{base}_{k}"
        self.modifiers.append(modifier)
        self._producer(self.enabled_modifiers)  # a second per-token producer is a construction error
        return modifier

    @property
    def enabled_modifiers(self) -> list[BaseLossModifier]:
        """Enabled modifiers in canonical order: built-ins (Entropy, TargetSmoothing, MaskRatioWeight, SNRWeight),
        then user modifiers in insertion order."""
        if self._suspended:
            return []
        order = [(m.canonical_rank if m.canonical_rank is not None else 1 << 30, i, m)
                 for i, m in enumerate(self.modifiers) if m.is_enabled()]
        return [m for _, _, m in sorted(order, key=lambda t: (t[0], t[1]))]

    def is_empty(self) -> bool:
        """True when no modifier is enabled (the pipeline is then a no-op)."""
        return not self.enabled_modifiers

    def __len__(self) -> int:
        return len(self.modifiers)

    def __iter__(self) -> Iterator[BaseLossModifier]:
        return iter(self.modifiers)

    def describe(self) -> str:
        """``"Enabled loss modifiers: EntropyModifier, TargetSmoothingModifier"`` (canonical order)."""
        names = [m.name for m in self.enabled_modifiers]
        return "Enabled loss modifiers: " + (", ".join(names) if names else "none")

    def get_all_metrics(self) -> dict[str, Any]:
        """``{"loss_modifiers/<name>.<metric>": value}`` of the last call (detached 0-d tensors for built-ins)."""
        out: dict[str, Any] = {}
        for m in self.enabled_modifiers:
            for k, v in m.get_metrics().items():
                out[f"loss_modifiers/{m.name}.{k}"] = v
        return out

    def reset_all_metrics(self) -> None:
        for m in self.modifiers:
            m.reset_metrics()

    @contextlib.contextmanager
    def temporarily_disabled(self) -> Iterator[LossModifierPipeline]:
        """Within the block every modifier is skipped (``modify_loss`` returns its ``loss``)."""
        previous, self._suspended = self._suspended, True
        try:
            yield self
        finally:
            self._suspended = previous

    # ---- entry points -----------------------------------------------------------------------------------------
    @torch.compiler.disable
    def modify_loss(self, logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor | None = None,
                    **kwargs: Any) -> torch.Tensor:
        """The seed's entry point: return the modified 0-d loss.

        Recognised kwargs: ``mask`` (bool, leading shape), ``ignore_index=-100``, ``step_counts``
        (``StepCounts``: ``normalize="global_tokens"``) and ``iter_num``; others are forwarded to user modifiers.
        ``loss`` is taken to be the plain token-mean CE of ``(logits, targets)`` and is replaced by the built-in
        phases; it may be None. With no modifier enabled, ``loss`` itself is returned (zero overhead).
        """
        mods = self.enabled_modifiers
        if not mods:
            return loss
        known = {k: kwargs.pop(k) for k in _RECOGNISED if k in kwargs}
        out = self._run(mods, logits, targets, incoming=loss, mask=known.get("mask"),
                        ignore_index=known.get("ignore_index", -100), step_counts=known.get("step_counts"),
                        iter_num=known.get("iter_num"), extras=kwargs, impl=self.impl, inplace_grad=False)
        return out.loss

    @torch.compiler.disable
    def compute(self, logits: torch.Tensor, targets: torch.Tensor, *, mask: torch.Tensor | None = None,
                ignore_index: int | None = -100, step_counts: StepCounts | None = None, iter_num: int | None = None,
                impl: str = "auto", inplace_grad: bool = False, **extras: Any) -> ModifiedLoss:
        """The trainer's path: one statistics pass yields the modified loss and the plain CE ``loss_raw``.

        ``impl`` and ``inplace_grad`` go to the kernels. With no modifier enabled this is the plain fused CE
        (``kernels.fused_token_loss``) and ``loss_raw`` is the same tensor.
        """
        mods = self.enabled_modifiers
        if not mods:
            return self._plain(logits, targets, mask=mask, ignore_index=ignore_index, step_counts=step_counts,
                               impl=impl, inplace_grad=inplace_grad)
        return self._run(mods, logits, targets, incoming=None, mask=mask, ignore_index=ignore_index,
                         step_counts=step_counts, iter_num=iter_num, extras=extras, impl=impl,
                         inplace_grad=inplace_grad)

    @torch.compiler.disable
    def compute_elementwise(self, per_token_loss: torch.Tensor, *, mask: torch.Tensor | None = None,
                            step_counts: StepCounts | None = None, iter_num: int | None = None, **extras: Any
                            ) -> ModifiedLoss:
        """Element-wise entry for losses without class logits (regression, diffusion).

        ``per_token_loss`` ``(B, ...)`` is flattened to ``(B, E)``; no statistics pass runs; ``ctx.extras`` carries
        the caller's tensors (e.g. ``log_snr``). ``loss_raw`` is the same reduction without weights; with no modifier
        enabled the result is the plain masked mean and ``loss_raw`` the same tensor. ``bad`` flags a non-finite
        loss at a valid element. Modifiers that need class logits raise ``ConfigError``.
        """
        if not isinstance(per_token_loss, torch.Tensor) or not per_token_loss.is_floating_point():
            got = per_token_loss.dtype if isinstance(per_token_loss, torch.Tensor) else type(per_token_loss).__name__
            raise LossInputError(f"per_token_loss must be a floating-point tensor, got {got}")
        if per_token_loss.dim() < 1:
            raise LossInputError("per_token_loss must have a batch dimension (B, ...), got a 0-d tensor")
        b = per_token_loss.shape[0]
        x = per_token_loss.reshape(b, -1)
        if mask is None:
            valid = torch.ones(x.shape, dtype=torch.bool, device=x.device)
        else:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != per_token_loss.shape:
                got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise LossInputError(
                    f"mask must be a bool tensor of the shape of per_token_loss {tuple(per_token_loss.shape)}, "
                    f"got {got}"
                )
            valid = mask.reshape(b, -1)
        normalize = "global_tokens" if step_counts is not None else "tokens"
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        bad = (valid & ~torch.isfinite(x.detach())).any()
        mods = self.enabled_modifiers
        if not mods:
            loss = reduce.masked_mean(x, valid, normalize=normalize, step_counts=step_counts)
            self._host_checks_elementwise(bad, valid)
            return ModifiedLoss(loss, loss, bad)
        needs_logits = [m.name for m in mods if m.requires_logits or phase_of(m) == 1]
        if needs_logits:
            raise ConfigError(
                f"{', '.join(needs_logits)} need(s) classification logits and cannot run on an element-wise loss "
                "(compute_elementwise); disable them for this task"
            )
        n_i = valid.sum(-1)
        ctx = ModifierContext(
            stats=None, valid=valid, num_valid=n_i.sum(), T=x.shape[1], per_token_loss=torch.where(valid, x, zero),
            ignore_index=None, iter_num=iter_num, targets=None, seq_valid=n_i, nonempty=n_i > 0,
            step_counts=step_counts, num_classes=None, extras=types.MappingProxyType(dict(extras)),
        )
        loss, seq_mean = self._phases_2_3(mods, ctx, normalize)
        with torch.no_grad():
            if seq_mean:
                raw = reduce.sequence_mean(x, valid, normalize=normalize, step_counts=step_counts)
            else:
                raw = reduce.masked_mean(x, valid, normalize=normalize, step_counts=step_counts)
        self._host_checks_elementwise(bad, valid)
        loss = self._phase_4(mods, extras.get("predicted"), extras.get("target"), loss, ctx, extras)
        self.last_bad = bad
        return ModifiedLoss(loss, raw, bad)

    # ---- internals --------------------------------------------------------------------------------------------
    @staticmethod
    def _producer(mods: list[BaseLossModifier]) -> BaseLossModifier | None:
        producers = [m for m in mods if phase_of(m) == 1]
        if len(producers) > 1:
            raise ConfigError(
                "only one per-token loss producer (phase 1) may be enabled, got "
                + " and ".join(f"{m.name} ({type(m).__name__})" for m in producers)
            )
        return producers[0] if producers else None

    def _plain(self, logits, targets, *, mask, ignore_index, step_counts, impl, inplace_grad) -> ModifiedLoss:
        check_logits_target(logits, targets, mask=mask)
        valid = validity_mask(targets, ignore_index=ignore_index, mask=mask)
        normalize = "global_tokens" if step_counts is not None else "tokens"
        out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        denom = reduce.normalizer(valid, normalize=normalize, step_counts=step_counts, dtype=out_dtype)
        fused = kernels.fused_token_loss(logits, targets, ignore_index=ignore_index, mask=mask, normalizer=denom,
                                         reduction="sum", impl=impl, inplace_grad=inplace_grad)
        bad = fused.stats.bad.any()
        if self.input_checks == "immediate":
            reduce.check_once(bad, valid.sum(), lambda: self._raise_bad(logits, targets, valid, []), stacklevel=3)
        self.last_bad = bad
        return ModifiedLoss(fused.loss, fused.loss, bad)

    def _run(self, mods, logits, targets, *, incoming, mask, ignore_index, step_counts, iter_num, extras, impl,
             inplace_grad) -> ModifiedLoss:
        check_logits_target(logits, targets, mask=mask)
        check_ignore_index(ignore_index)
        if step_counts is not None and not isinstance(step_counts, StepCounts):
            raise LossInputError(f"step_counts must be a losskit.contract.StepCounts, got {type(step_counts).__name__}")
        producer = self._producer(mods)
        orig_logits, orig_targets = logits, targets
        if logits.dim() == 2:  # (N, V) is (N, 1, V) where a sequence axis matters
            logits, targets = logits.unsqueeze(1), targets.unsqueeze(1)
            mask = None if mask is None else mask.unsqueeze(1)
        num_classes = logits.shape[-1]
        options: dict[str, Any] = {}
        for m in mods:
            m.check_num_classes(num_classes)
            options.update(m.stats_options())
        stats = kernels.token_stats(logits, targets, ignore_index=ignore_index, mask=mask, impl=impl,
                                    inplace_grad=inplace_grad, **options)
        base_valid = stats.valid
        valid = base_valid
        for m in mods:
            extra = m.restrict_valid(targets)
            if extra is not None:
                valid = valid & extra
        n_i = valid.sum(-1)
        ctx = ModifierContext(
            stats=stats, valid=valid, num_valid=n_i.sum(), T=targets.shape[-1], per_token_loss=None,
            ignore_index=ignore_index, iter_num=iter_num, targets=targets, seq_valid=n_i, nonempty=n_i > 0,
            step_counts=step_counts, num_classes=num_classes, extras=types.MappingProxyType(dict(extras)),
        )
        normalize = "global_tokens" if step_counts is not None else "tokens"
        zero = torch.zeros((), dtype=stats.nll.dtype, device=stats.nll.device)
        # phase 1: the per-token loss
        ell = producer.per_token_loss(ctx) if producer is not None else stats.nll
        ell = torch.where(valid, ell, zero)
        ctx = dataclasses.replace(ctx, per_token_loss=ell)
        # phases 2 and 3: weights, then the one reduction
        loss, _ = self._phases_2_3(mods, ctx, normalize)
        with torch.no_grad():
            # plain CE over the unmodified basis, with the step's count of that basis (not of the padding-
            # excluded positions the modified loss averages over)
            loss_raw = reduce.masked_mean(stats.nll.detach(), base_valid, normalize=normalize,
                                          step_counts=None if step_counts is None else step_counts.base())
            bad = stats.bad
            for m in mods:
                extra_bad = m.bad_rows(ctx)
                if extra_bad is not None:
                    bad = bad | extra_bad
            bad = bad.any()
        if self.input_checks == "immediate":
            self._host_checks(orig_logits, orig_targets, base_valid.reshape(orig_targets.shape), ctx, bad, incoming,
                              mods)
        self.last_bad = bad
        # phase 4: user scalar modifiers, in insertion order
        phase4_mask = valid.reshape(orig_targets.shape)
        loss = self._phase_4(mods, orig_logits, orig_targets, loss, dataclasses.replace(ctx, valid=phase4_mask),
                             extras)
        return ModifiedLoss(loss, loss_raw, bad)

    def _phases_2_3(self, mods, ctx: ModifierContext, normalize: str) -> tuple[torch.Tensor, bool]:
        batch = sample = token = None
        seq_mean = False
        for m in mods:
            if phase_of(m) != 2:
                continue
            w = m.weights(ctx)
            if not isinstance(w, Weights):
                raise TypeError(f"{type(m).__name__}.weights must return a Weights, got {_describe_value(w)}")
            keep = m.differentiable_weights

            def prep(t: torch.Tensor | None, keep: bool = keep) -> torch.Tensor | None:
                return t if t is None or keep else t.detach()

            batch = _combine(batch, prep(w.batch))
            sample = _combine(sample, prep(w.sample))
            token = _combine(token, prep(w.token))
            seq_mean = seq_mean or w.sequence_mean
        ell = ctx.per_token_loss
        assert ell is not None
        x = ell if token is None else ell * token
        if seq_mean:
            loss = reduce.sequence_mean(x, ctx.valid, seq_weight=sample, normalize=normalize,
                                        step_counts=ctx.step_counts)
        else:
            weight = None if sample is None else sample[:, None].expand(x.shape)
            loss = reduce.masked_mean(x, ctx.valid, weight=weight, normalize=normalize, step_counts=ctx.step_counts)
        if batch is not None:
            loss = loss * batch
        return loss, seq_mean

    def _phase_4(self, mods, logits, targets, loss, ctx: ModifierContext, extras) -> torch.Tensor:
        for m in mods:
            if phase_of(m) != 4:
                continue
            out = m.modify_loss(logits, targets, loss, mask=ctx.valid, ignore_index=ctx.ignore_index,
                                iter_num=ctx.iter_num, per_token_loss=ctx.per_token_loss, token_stats=ctx.stats,
                                **extras)
            if not isinstance(out, torch.Tensor) or out.dim() != 0:
                raise TypeError(
                    f"{type(m).__name__}.modify_loss must return a 0-d tensor (the modified scalar loss), got "
                    f"{_describe_value(out)}"
                )
            loss = out
        return loss

    def _host_checks(self, logits, targets, base_valid, ctx, bad, incoming, mods) -> None:
        """Immediate mode: one host read for bad input, the empty batch and (first call) the incoming loss."""
        extra = []
        check_incoming = (not self._checked_incoming and isinstance(incoming, torch.Tensor)
                          and incoming.numel() == 1)
        if check_incoming:
            # The caller's loss is a local token mean whatever the step normalisation, so compare like with like.
            stats = ctx.stats
            local = reduce.masked_mean(stats.nll.detach(), stats.valid)
            given = incoming.detach().reshape(()).to(local.dtype)
            extra = [(given - local).abs() > 1e-3 * local.abs(), given, local]
            self._checked_incoming = True
        values = reduce.check_once(bad, ctx.num_valid, lambda: self._raise_bad(logits, targets, base_valid, mods),
                                   *extra, stacklevel=4)
        if check_incoming and values[0]:
            warnings.warn(MISMATCH_MESSAGE.format(given=values[1], raw=values[2]), UserWarning, stacklevel=5)

    def _host_checks_elementwise(self, bad: torch.Tensor, valid: torch.Tensor) -> None:
        if self.input_checks != "immediate":
            return

        def explain() -> None:
            raise LossInputError("per_token_loss: non-finite values (NaN/inf) at valid elements; expected finite "
                                 "losses")

        reduce.check_once(bad, valid.sum(), explain, stacklevel=3)

    @staticmethod
    def _raise_bad(logits, targets, valid, mods) -> None:
        explain_bad_rows(logits, targets, valid)
        for m in mods:
            m.explain_bad(logits, targets, valid)
        raise LossInputError("logits: non-finite statistics (NaN/inf) in valid rows; expected finite values")
