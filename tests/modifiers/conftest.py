"""Shared inputs of the modifier tests: the spec's worked batches, the flat configs, a pipeline builder and the
seed's ``CustomModifier``. Imported by the test modules (``from .conftest import ...``); the oracles live in
``oracle.py``.
"""

from __future__ import annotations

import importlib.util
import math

import torch

from losskit.modifiers import BaseLossModifier, create_loss_modifier_pipeline

F64 = torch.float64
HAS_TRITON = (importlib.util.find_spec("triton") is not None
              and importlib.util.find_spec("losskit.kernels.triton") is not None)
IMPLS_F64 = ["torch", "chunked"]
IMPLS_F32 = ["torch", "chunked"] + (["triton"] if HAS_TRITON else [])

ENT = {"entropy_modifier_enabled": True, "entropy_modifier_threshold": 0.5}
SMO = {"target_smoothing_enabled": True, "target_smoothing_factor": 0.1}
MR = {"mask_ratio_weight_enabled": True}


def pipe_of(*parts, input_checks="immediate", **extra):
    cfg = {"loss_modifiers_enabled": bool(parts)}
    for p in parts:
        cfg.update(p)
    cfg.update(extra)
    return create_loss_modifier_pipeline(cfg, verbose=False, input_checks=input_checks)


def seed_logits(dtype=F64, grad=False):
    x = torch.tensor([[[2, 1, 4, .5], [0, 3, 0, 0]], [[1, 0, 0, 5], [.5, .5, .5, .5]]], dtype=dtype)
    return x.requires_grad_(grad)


SEED_TARGETS = torch.tensor([[2, 1], [0, 3]])
COMPOSE_TARGETS = torch.tensor([[2, 1], [0, -100]])


def mask_ratio_example(dtype=F64):
    """Acceptance 4: V = 8, each valid row's CE is exactly L (2.0 in row 1, 1.0 in row 2)."""
    targets = torch.tensor([[5, -100, -100, -100], [3, 4, 1, 2]])
    logits = torch.zeros(2, 4, 8, dtype=dtype)
    for i, big_l in enumerate([2.0, 1.0]):
        other = math.log((math.exp(big_l) - 1) / 7)
        logits[i] = other
        for t in range(4):
            if targets[i, t] >= 0:
                logits[i, t, targets[i, t]] = 0.0
    return logits, targets


PARTS = {"E": ENT, "S": SMO, "M": MR}


def random_batch(dtype, seed=0, b=6, t=9, v=37):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g, dtype=F64) * 2).to(dtype)
    targets = torch.randint(0, v, (b, t), generator=g)
    counts = [0, 1, 3, 5, 9, 7][:b]
    for i, c in enumerate(counts):
        targets[i, c:] = -100
    targets[3, 1] = 0  # the padding token (excluded by smoothing's exclude_padding)
    targets[4, 2] = 1  # special (hard) targets
    targets[4, 5] = 2
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[5, 0] = False
    mask[4, 8] = False
    return logits, targets, mask


def _bad_case(kind):
    logits = torch.randn(2, 3, 6, dtype=F64)
    targets = torch.tensor([[1, 2, 3], [4, 5, -100]])
    if kind == "nan":
        logits[1, 1, 0] = float("nan")
    elif kind == "pinf":
        logits[1, 1, 0] = float("inf")
    elif kind == "ninf_target":
        logits[1, 1, 5] = float("-inf")
    elif kind == "ninf_other":
        logits[1, 1, 0] = float("-inf")
    elif kind == "target_range":
        targets[1, 1] = 6
    logits[1, 2] = float("nan")  # ignored row: never an error
    return logits, targets


class CustomModifier(BaseLossModifier):
    """Verbatim from seed 000 (only the import path differs)."""

    def __init__(self, config):
        super().__init__(config)
        self.custom_param = config.get('custom_param', 1.0)

    def modify_loss(self, logits, targets, loss, **kwargs):
        if not self.enabled:
            return loss

        # Your custom loss modification logic here
        modified_loss = loss * self.custom_param

        # Store metrics for monitoring
        self._metrics = {
            'custom_metric': modified_loss.item(),
        }

        return modified_loss

    def get_metrics(self):
        return self._metrics.copy()
