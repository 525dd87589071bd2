"""LabelSmoothedCrossEntropy: seed 004's module, corrected (spec/modifiers.md §2, acceptance 7)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from losskit.contract import EmptyBatchWarning, LossInputError
from losskit.losses import LabelSmoothedCrossEntropy


def test_seed_004_usage_equals_torch():
    # The notebook's example usage: batch 2, seq 5, vocab 10, ignore_index=0.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 10, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 10, (2, 5), generator=g)
    target[0, 1] = 0  # make sure some positions are ignored
    loss = LabelSmoothedCrossEntropy(epsilon=0.1, ignore_index=0)(logits, target)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(ref_logits.flatten(0, 1), target.flatten(), ignore_index=0, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_minus_100_targets_work_and_match_torch(reduction):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 11, generator=g)
    target = torch.randint(0, 11, (3, 7), generator=g)
    target[1, 2:] = -100
    loss = LabelSmoothedCrossEntropy(0.2, reduction=reduction)(logits, target)
    ref = F.cross_entropy(logits.flatten(0, 1), target.flatten(), label_smoothing=0.2, reduction=reduction)
    torch.testing.assert_close(loss.reshape(ref.shape), ref, rtol=1e-5, atol=1e-6)


def test_notebook_comment_numbers():
    # p = [0.8, 0.1, 0.1], y = 0, eps = 0.1: the loss is 0.361773 (torch) / 0.431088 (fairseq), not 4.82.
    logits = torch.tensor([[0.8, 0.1, 0.1]], dtype=torch.float64).log()
    target = torch.tensor([0])
    torch_conv = LabelSmoothedCrossEntropy(0.1)(logits, target)
    fairseq = LabelSmoothedCrossEntropy(0.1, smoothing_convention="fairseq")(logits, target)
    assert math.isclose(float(torch_conv), 0.361773, abs_tol=5e-7)
    assert math.isclose(float(fairseq), 0.431088, abs_tol=5e-7)
    plain = LabelSmoothedCrossEntropy(0.0)(logits, target)
    assert math.isclose(float(plain), -math.log(0.8), rel_tol=1e-12)


def test_ignore_index_none_means_mean_over_all_tokens():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 6, generator=g, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 0])
    loss = LabelSmoothedCrossEntropy(0.1, ignore_index=None)(logits, target)
    ref = F.cross_entropy(logits, target, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)


def test_excluded_ids_receive_no_mass():
    logits = torch.tensor([[2.0, 1.0, 4.0, 0.5]], dtype=torch.float64)
    target = torch.tensor([2])
    loss = LabelSmoothedCrossEntropy(0.1, smoothing_exclude=(0,))(logits, target)
    assert math.isclose(float(loss), 0.411674, abs_tol=5e-7)  # spec/modifiers.md §4 item 8


def test_all_padding_batch_is_zero_with_warning_not_nan():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    target = torch.zeros(2, 3, dtype=torch.long)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = LabelSmoothedCrossEntropy(0.1, ignore_index=0)(logits, target)
    assert float(loss) == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert sum(issubclass(w.category, EmptyBatchWarning) for w in caught) == 1


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"epsilon": 1.0}, "epsilon"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"reduction": "avg"}, "reduction"),
        ({"smoothing_convention": "hf"}, "smoothing_convention"),
    ],
)
def test_bad_settings_raise_naming_the_argument(kwargs, needle):
    with pytest.raises(LossInputError, match=needle):
        LabelSmoothedCrossEntropy(**kwargs)


def test_target_out_of_range_raises_naming_target():
    with pytest.raises(LossInputError, match="target"):
        LabelSmoothedCrossEntropy(0.1)(torch.randn(2, 4), torch.tensor([1, 4]))
