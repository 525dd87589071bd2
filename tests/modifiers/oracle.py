"""Plain-torch oracles for the modifier tests: dense log_softmax formulas, no losskit code.

``token_stats_dense`` is the readable definition of every ``TokenStats`` field; ``hand_loss`` is the composed loss of
spec/modifiers.md §3.3 written out with a dense target distribution for smoothing.
"""

from __future__ import annotations

import math

import torch

from losskit.contract import TokenStats


def validity(targets, ignore_index=-100, mask=None, pad=None):
    valid = targets != ignore_index
    if mask is not None:
        valid = valid & mask
    if pad is not None:
        valid = valid & (targets != pad)
    return valid


def token_stats_dense(logits, targets, *, ignore_index=-100, mask=None, smoothing_exclude=()):
    """Every TokenStats field from log_softmax (fp64 recommended)."""
    valid = validity(targets, ignore_index, mask)
    v = logits.shape[-1]
    y = torch.where(valid, targets, torch.zeros_like(targets))
    logp = logits.log_softmax(-1)
    lse = logits.logsumexp(-1)
    zy = logits.gather(-1, y[..., None]).squeeze(-1)
    nll = -logp.gather(-1, y[..., None]).squeeze(-1)
    onehot = torch.nn.functional.one_hot(y, v).bool()
    zq = logits.masked_fill(onehot, float("-inf"))
    logq = zq.log_softmax(-1).masked_fill(onehot, 0.0)  # q_y = 0: a 0·(−inf) would poison the gradient
    q = zq.softmax(-1)
    hq = -(q * logq).sum(-1)
    l1m = zq.logsumexp(-1) - lse
    p = logp.exp()
    hp = -(p * logp).sum(-1)
    support = torch.ones(v, dtype=torch.bool)
    if len(smoothing_exclude):
        support[list(smoothing_exclude)] = False
    smean = logits[..., support].mean(-1)
    zero = torch.zeros((), dtype=logits.dtype)
    f = lambda t: torch.where(valid, t, zero)
    am = logits.argmax(-1)
    return TokenStats(valid=valid, lse=f(lse), target_logit=f(zy), nll=f(nll), log1m_target_prob=f(l1m),
                      support_mean_logit=f(smean), entropy=f(hp), wrong_entropy=f(hq),
                      support_gap=f((logits[..., support] - zy[..., None]).mean(-1)),
                      argmax=torch.where(valid, am, -1), correct=valid & (am == targets),
                      bad=valid & ~torch.isfinite(lse))


def dense_smoothed(logits, targets, valid, eps, special=(), convention="torch"):
    """-(q · log p) with the dense target distribution q (test-only)."""
    v = logits.shape[-1]
    logp = logits.log_softmax(-1)
    y = torch.where(valid, targets, torch.zeros_like(targets))
    onehot = torch.nn.functional.one_hot(y, v).to(logits.dtype)
    support = torch.ones(v, dtype=logits.dtype)
    if special:
        support[list(special)] = 0
    k = support.sum()
    if convention == "torch":
        q = (1 - eps) * onehot + eps / k * support
    else:
        q = (1 - eps) * onehot + eps / (k - 1) * support * (1 - onehot)
    hard = torch.zeros_like(valid)
    for s in special:
        hard = hard | (y == s)
    q = torch.where(hard[..., None], onehot, q)
    return torch.where(valid, -(q * logp).sum(-1), torch.zeros((), dtype=logits.dtype))


def hand_loss(logits, targets, *, mask=None, ignore_index=-100, smoothing=None, entropy=None, mask_ratio=None,
              detach=True):
    """The composed loss of spec/modifiers.md §3.3 in plain torch.

    smoothing: dict(factor, special, pad, exclude_padding, convention); entropy: dict(weight, threshold, eps,
    per_sample); mask_ratio: dict(power, min, max, eps).
    """
    pad = None
    if smoothing is not None and smoothing.get("exclude_padding", True):
        pad = smoothing.get("pad", -100)
    valid = validity(targets, ignore_index, mask, pad)
    dt = logits.dtype
    zero = torch.zeros((), dtype=dt)
    if smoothing is not None:
        ell = dense_smoothed(logits, targets, valid, smoothing["factor"], tuple(smoothing.get("special", ())),
                             smoothing.get("convention", "torch"))
    else:
        logp = logits.log_softmax(-1)
        y = torch.where(valid, targets, torch.zeros_like(targets))
        ell = torch.where(valid, -logp.gather(-1, y[..., None]).squeeze(-1), zero)
    n = valid.sum(-1)
    nonempty = n > 0
    beta = torch.ones((), dtype=dt)
    e = torch.ones(n.shape, dtype=dt)
    if entropy is not None:
        src = logits.detach() if detach else logits
        y = torch.where(valid, targets, torch.zeros_like(targets))
        onehot = torch.nn.functional.one_hot(y, logits.shape[-1]).bool()
        zq = src.masked_fill(onehot, float("-inf"))
        logq = zq.log_softmax(-1).masked_fill(onehot, 0.0)
        q = zq.softmax(-1)
        hq = -(q * logq).sum(-1)
        l1m = zq.logsumexp(-1) - src.logsumexp(-1)
        keep = valid
        if entropy.get("eps", 1e-8) > 0:
            keep = keep & (l1m > math.log(entropy.get("eps", 1e-8)))
        h = torch.where(keep, hq, zero)
        hbar = h.sum(-1) / n.clamp_min(1)
        hstar = hbar.clamp_min(entropy.get("threshold", 0.0))
        w = entropy.get("weight", 1.0)
        if entropy.get("per_sample", False):
            e = torch.where(nonempty, w * hstar, zero)
        else:
            beta = w * torch.where(nonempty, hstar, zero).sum() / nonempty.sum().clamp_min(1)
    if mask_ratio is not None:
        t = targets.shape[-1]
        eps = mask_ratio.get("eps", 1e-8)
        r = n.to(dt) / (t + eps)
        wr = (r + eps).pow(-mask_ratio.get("power", 0.5)).clamp(mask_ratio.get("min", 0.1), mask_ratio.get("max", 10.0))
        per_seq = ell.sum(-1) / n.clamp_min(1)
        return beta * torch.where(nonempty, wr * e * per_seq, zero).sum() / nonempty.sum().clamp_min(1)
    return beta * (e[:, None] * ell).sum() / valid.sum().clamp_min(1)
