"""``kernels.call``: ``describe`` checks every argument once (``LossInputError`` naming it) and builds a frozen
``Call``; ``fused`` takes the gradient mode of the eager/deferred policy in the module docstring.

Every value is checked against plain torch (``F.cross_entropy`` in float64), never against another losskit path.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools

import pytest
import torch
import torch.nn.functional as F

from losskit.contract import LossInputError
from losskit.kernels import call as calls

F64 = torch.float64


def args(v=5, n=4, *, grad=False, dtype=F64):
    g = torch.Generator().manual_seed(v * n)
    logits = torch.randn(n, v, generator=g, dtype=dtype)
    if grad:
        logits = (logits.requires_grad_(True) * 1.0)  # produced by an operation (inplace_grad is allowed)
    target = torch.randint(0, v, (n,), generator=g)
    return logits, target


# ---- every bad argument, named -----------------------------------------------------------------------------

BAD = [
    ({"impl": "cuda"}, "impl must be one of 'auto', 'torch', 'chunked', 'triton', got 'cuda'"),
    ({"reduction": "mean"}, "reduction must be one of 'sum', 'none', got 'mean'"),
    ({"reduction": None}, "reduction must be one of"),
    ({"grad_mode": "eager"}, "grad_mode must be one of 'auto', 'forward', 'backward', got 'eager'"),
    ({"grad_mode": "forward", "reduction": "none"}, 'grad_mode="forward" \\(eager\\) needs reduction="sum"'),
    ({"label_smoothing": 1.0}, r"label_smoothing must be a number in \[0, 1\), got 1.0"),
    ({"label_smoothing": -0.1}, "label_smoothing must be a number in"),
    ({"label_smoothing": True}, "label_smoothing must be a number in"),
    ({"label_smoothing": "0.1"}, "label_smoothing must be a number in"),
    ({"label_smoothing": 0.1, "smoothing_convention": "hf"}, "smoothing_convention must be one of"),
    ({"smoothing_convention": "hf"}, "smoothing_convention must be one of"),  # checked even without smoothing
    ({"smoothing_exclude": [5]}, r"smoothing_exclude: class id 5 is outside \[0, V\) with V=5"),
    ({"smoothing_exclude": [0.5]}, "smoothing_exclude must hold integer class ids"),
    ({"label_smoothing": 0.1, "smoothing_exclude": [0, 1, 2, 3, 4]}, "smoothing_exclude leaves K=0"),
    ({"label_smoothing": 0.1, "smoothing_convention": "fairseq", "smoothing_exclude": [0, 1, 2, 3]},
     "smoothing_exclude leaves K=1"),
    ({"label_smoothing": 0.1, "hard_target_ids": [7]}, r"hard_target_ids: class id 7 is outside \[0, V\)"),
    ({"label_smoothing": 0.1, "hard_target_ids": "1"}, "hard_target_ids must be a list"),
    ({"z_loss": -1e-4}, "z_loss must be a finite number >= 0, got -0.0001"),
    ({"z_loss": float("inf")}, "z_loss must be a finite number >= 0"),
    ({"z_loss": True}, "z_loss must be a finite number >= 0"),
    ({"z_loss": "0"}, "z_loss must be a finite number >= 0"),
    ({"normalizer": 2.0, "reduction": "none"}, 'normalizer applies to reduction="sum" only'),
    ({"normalizer": torch.tensor(2.0, dtype=F64), "reduction": "none"}, 'normalizer applies to reduction="sum"'),
    ({"normalizer": "4"}, "normalizer must be a finite number or a 0-d tensor, got '4'"),
    ({"normalizer": float("nan")}, "normalizer must be a finite number or a 0-d tensor, got nan"),
    ({"normalizer": True}, "normalizer must be a finite number or a 0-d tensor, got True"),
    ({"normalizer": torch.ones(2)}, r"normalizer must be a 0-d float tensor, got torch.float32 \(2,\)"),
    ({"normalizer": torch.tensor(True)}, "normalizer must be a 0-d float tensor, got torch.bool"),
    ({"normalizer": torch.tensor(2.0, device="meta")}, r"normalizer must be on the device of logits \(cpu\)"),
    ({"grad_scale": 0}, "grad_scale must be non-zero .* got 0.0"),
    ({"grad_scale": 0.0}, "grad_scale must be non-zero"),
    ({"grad_scale": None}, "grad_scale must be a number or a 0-d tensor, got None"),
    ({"grad_scale": float("inf")}, "grad_scale must be a finite number or a 0-d tensor, got inf"),
    ({"grad_scale": torch.ones(3)}, "grad_scale must be a 0-d float tensor"),
    ({"inplace_grad": 1}, "inplace_grad must be a bool, got 1"),
    ({"inplace_grad": "yes"}, "inplace_grad must be a bool, got 'yes'"),
    ({"inplace_grad": None}, "inplace_grad must be a bool, got None"),
    ({"chunk_bytes": 0}, r"chunk_bytes must be a positive int \(bytes\) or None, got 0"),
    ({"chunk_bytes": -4096}, "chunk_bytes must be a positive int"),
    ({"chunk_bytes": 4096.0}, "chunk_bytes must be a positive int"),
    ({"chunk_bytes": True}, "chunk_bytes must be a positive int"),
    ({"chunk_bytes": "4MiB"}, "chunk_bytes must be a positive int"),
    ({"ignore_index": 1.5}, "ignore_index must be an int or None, got 1.5"),
    ({"mask": torch.ones(4)}, "mask must be a bool tensor"),
    ({"token_weight": torch.ones(3, dtype=F64)}, r"token_weight must have the leading shape of logits \(4,\)"),
]


@pytest.mark.parametrize(("kwargs", "needle"), BAD, ids=lambda x: "+".join(x) if isinstance(x, dict) else None)
def test_describe_rejects_every_bad_argument_naming_it(kwargs, needle):
    logits, target = args()
    with pytest.raises(LossInputError, match=needle):
        calls.describe(logits, target, **kwargs)


def test_describe_rejects_bad_logits_and_target():
    logits, target = args()
    with pytest.raises(LossInputError, match=r"logits must have shape \(N, V\) or \(B, T, V\)"):
        calls.describe(logits[0], target)
    with pytest.raises(LossInputError, match="logits must be a torch.Tensor, got list"):
        calls.describe([[0.0, 1.0]], target)
    with pytest.raises(LossInputError, match="target must be an integer tensor"):
        calls.describe(logits, target.double())
    with pytest.raises(LossInputError, match=r"target must have the leading shape of logits \(4,\), got \(3,\)"):
        calls.describe(logits, target[:3])


@pytest.mark.parametrize("view", [False, True])
def test_inplace_grad_is_refused_on_a_leaf_or_a_view_of_one(view):
    leaf = torch.randn(4, 5, dtype=F64, requires_grad=True)
    _, target = args()
    logits = leaf[:, :] if view else leaf
    what = "a view of a leaf tensor" if view else "a leaf tensor"
    with pytest.raises(LossInputError, match=f"inplace_grad=True needs logits produced by an operation.*got {what}"):
        calls.describe(logits, target, inplace_grad=True)
    # allowed where nothing is written (no gradient wanted), or on an operation's output
    with torch.no_grad():
        assert calls.describe(logits, target, inplace_grad=True).inplace_grad is True
    assert calls.describe(leaf.detach(), target, inplace_grad=True).inplace_grad is True
    assert calls.describe(leaf * 1.0, target, inplace_grad=True).inplace_grad is True
    assert calls.describe(logits, target, inplace_grad=False).inplace_grad is False


# ---- one order ---------------------------------------------------------------------------------------------

# Pairs (earlier, later) of bad arguments in the order describe checks them: the earlier one is reported.
ORDER = [
    ({"ignore_index": "x"}, "ignore_index"),
    ({"impl": "x"}, "impl"),
    ({"reduction": "x"}, "reduction"),
    ({"grad_mode": "x"}, "grad_mode"),
    ({"label_smoothing": 2.0}, "label_smoothing"),
    ({"label_smoothing": 0.1, "hard_target_ids": [99]}, "hard_target_ids"),
    ({"z_loss": -1.0}, "z_loss"),
    ({"normalizer": "x"}, "normalizer"),
    ({"grad_scale": 0.0}, "grad_scale"),
    ({"inplace_grad": "x"}, "inplace_grad"),
    ({"chunk_bytes": 0}, "chunk_bytes"),
]


@pytest.mark.parametrize(("earlier", "later"), list(itertools.pairwise(ORDER)),
                         ids=[f"{a[1]}<{b[1]}" for a, b in itertools.pairwise(ORDER)])
def test_describe_checks_in_one_order(earlier, later):
    (first, name), (second, _) = earlier, later
    logits, target = args()
    with pytest.raises(LossInputError) as info:
        calls.describe(logits, target, **{**second, **first})
    assert str(info.value).startswith(name), str(info.value)
    # shapes come before everything
    with pytest.raises(LossInputError, match="target must have the leading shape"):
        calls.describe(logits, target[:2], **{**second, **first})


# ---- the Call it builds ------------------------------------------------------------------------------------


def test_describe_builds_the_final_form_of_every_option():
    logits, target = args(grad=True)
    c = calls.describe(logits, target, normalizer=3, grad_scale=2, z_loss=1, label_smoothing=0.2,
                       smoothing_exclude=[4, 0, 4])
    assert c.logits is logits and c.impl == "chunked"  # "auto" on CPU
    assert c.normalizer.dtype == F64 and c.normalizer.dim() == 0 and c.normalizer.item() == 3.0
    assert c.grad_scale == 2.0 and type(c.grad_scale) is float
    assert c.z_loss == 1.0 and type(c.z_loss) is float
    assert c.reduction == "sum" and c.grad_mode == "auto" and c.inplace_grad is False
    assert c.chunk_bytes == 4 * 2**20  # the CPU default
    assert c.prep.support.ids == (0, 4) and c.prep.num_support == 3
    assert c.smoothing.eps == 0.2 and c.smoothing.eps_t is not None and c.grad_wanted
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.reduction = "none"
    norm = torch.tensor(7.0, dtype=F64)
    c2 = c.with_normalizer(norm)
    assert c2.normalizer is norm and c.normalizer.item() == 3.0
    assert dataclasses.replace(c2, normalizer=c.normalizer) == c
    tensor_norm = torch.tensor(5, dtype=torch.int64)
    assert calls.describe(logits, target, normalizer=tensor_norm).normalizer is tensor_norm  # 0-d device tensors pass
    assert calls.describe(logits, target, impl="torch").impl == "torch"
    with torch.no_grad():
        assert not calls.describe(logits, target).grad_wanted
    assert not calls.describe(logits.detach(), target).grad_wanted


# ---- the eager/deferred policy -----------------------------------------------------------------------------

# eager   = impl is "chunked" or "triton", reduction == "sum" and a gradient is wanted, and
#           grad_mode == "forward", or grad_mode == "auto" and (impl == "triton" or not on CUDA)
HAS_TRITON = (importlib.util.find_spec("triton") is not None  # without importing triton at collection
              and importlib.util.find_spec("losskit.kernels.triton") is not None)
POLICY = [
    ("chunked", "sum", "auto", True, True),
    ("chunked", "sum", "forward", True, True),
    ("chunked", "sum", "backward", True, False),
    ("chunked", "none", "auto", True, False),
    ("chunked", "none", "backward", True, False),
    ("chunked", "sum", "auto", False, False),
    ("chunked", "sum", "forward", False, False),
    ("torch", "sum", "forward", True, False),
    ("torch", "sum", "auto", True, False),
    ("auto", "sum", "auto", True, True),  # "auto" is "chunked" on CPU
]


def _is_eager(loss: torch.Tensor) -> bool:
    # eager mode applies the implementation's fused Function, which holds G from the forward
    return loss.grad_fn is not None and type(loss.grad_fn).__name__ == "FusedTokenLossFunctionBackward"


@pytest.mark.parametrize(("impl", "reduction", "grad_mode", "want_grad", "eager"), POLICY)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_eager_deferred_policy(impl, reduction, grad_mode, want_grad, eager, smoothing):
    check_policy(impl, reduction, grad_mode, want_grad, eager, smoothing)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(("grad_mode", "eager"), [("auto", True), ("backward", False)])
def test_eager_deferred_policy_triton(grad_mode, eager):
    """Through the interpreter on CPU, in fp32 (fp64 logits are served by "chunked")."""
    check_policy("triton", "sum", grad_mode, True, eager, 0.1)


def check_policy(impl, reduction, grad_mode, want_grad, eager, smoothing):
    dtype = torch.float32 if impl == "triton" else F64
    tol = {"rtol": 2e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
    base, target = args(v=7, n=6)
    target[1] = -100
    x = base.to(dtype).requires_grad_(want_grad)
    logits = x * 1.0
    c = calls.describe(logits, target, impl=impl, reduction=reduction, grad_mode=grad_mode, normalizer=None
                       if reduction == "none" else 4.0, label_smoothing=smoothing)
    assert c.impl == ("chunked" if impl == "auto" else impl)
    out = calls.fused(c)
    assert _is_eager(out.loss) is eager
    # both modes compute the same thing: the plain-torch smoothed CE (sum / 4, or per token)
    ref_x = base.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_x, target, label_smoothing=smoothing, reduction="none")
    ref = ref if reduction == "none" else ref.sum() / 4.0
    torch.testing.assert_close(out.loss.detach().double(), ref.detach(), **tol)
    if want_grad:
        upstream = torch.linspace(0.5, 2.0, 6, dtype=F64) if reduction == "none" else torch.tensor(3.0, dtype=F64)
        (g,) = torch.autograd.grad(out.loss, x, upstream.to(dtype))
        (g_ref,) = torch.autograd.grad(ref, ref_x, upstream)
        torch.testing.assert_close(g.double(), g_ref, **tol)
    else:
        assert not out.loss.requires_grad


def test_no_grad_mode_is_deferred_even_when_forward_is_asked():
    base, target = args(v=7, n=6)
    x = base.clone().requires_grad_(True)
    with torch.no_grad():
        out = calls.fused(calls.describe(x * 1.0, target, impl="chunked", grad_mode="forward"))
    assert out.loss.grad_fn is None
    torch.testing.assert_close(out.loss, F.cross_entropy(base, target, reduction="sum"), rtol=1e-12, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_auto_keeps_chunked_deferred_and_triton_eager():
    base, target = (t.cuda() for t in args(v=7, n=6, dtype=torch.float32))
    x = base.clone().requires_grad_(True)
    assert not _is_eager(calls.fused(calls.describe(x * 1.0, target, impl="chunked")).loss)
    assert _is_eager(calls.fused(calls.describe(x * 1.0, target, impl="chunked", grad_mode="forward")).loss)
    if HAS_TRITON:
        assert _is_eager(calls.fused(calls.describe(x * 1.0, target, impl="triton")).loss)
        assert not _is_eager(calls.fused(calls.describe(x * 1.0, target, impl="triton", grad_mode="backward")).loss)


# ---- running a call ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "chunked"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_token_weight_is_zeroed_at_invalid_rows_before_it_multiplies(impl, reduction):
    """``cw[target]`` is NaN at an ignored row (e.g. a class-weight table read at -100): it must not leak."""
    base, target = args(v=6, n=5)
    target[2] = -100
    w = torch.tensor([0.5, 2.0, float("nan"), 1.5, 1.0], dtype=F64)
    x = base.clone().requires_grad_(True)
    out = calls.fused(calls.describe(x * 1.0, target, token_weight=w, impl=impl, reduction=reduction,
                                     grad_mode="backward"))
    keep = target != -100
    per = torch.where(keep, F.cross_entropy(base, target.clamp_min(0), reduction="none") * w.nan_to_num(0.0), 0.0)
    torch.testing.assert_close(out.loss.detach(), per if reduction == "none" else per.sum(), rtol=1e-12, atol=0)
    out.loss.sum().backward()
    assert bool(torch.isfinite(x.grad).all()) and torch.equal(x.grad[2], torch.zeros(6, dtype=F64))
    assert torch.equal(out.token_loss[2], torch.tensor(0.0, dtype=F64))


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_parts_flags_a_non_finite_support_mean_only_with_smoothing(impl):
    base, target = args(v=6, n=3)
    base[0, (target[0] + 1) % 6] = float("-inf")  # −inf outside the target column, inside the support
    _, f = calls.parts(calls.describe(base, target, impl=impl))
    assert not bool(f.bad.any())
    _, f = calls.parts(calls.describe(base, target, impl=impl, label_smoothing=0.1))
    assert f.bad.tolist() == [True, False, False]
    col = int((target[0] + 1) % 6)
    _, f = calls.parts(calls.describe(base, target, impl=impl, label_smoothing=0.1, smoothing_exclude=[col]))
    assert not bool(f.bad.any())
