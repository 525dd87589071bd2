"""functional.reduce: normalisers, masked and sequence means, step counts (spec/modifiers.md §1.6, acceptance 9, 23)."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from losskit.contract import EmptyBatchWarning, LossInputError, StepCounts
from losskit.functional import (
    cross_entropy,
    masked_mean,
    masked_sum,
    normalizer,
    sequence_mean,
    step_counts,
    warn_empty,
)

F64 = {"rtol": 1e-12, "atol": 1e-14}
F32 = {"rtol": 1e-5, "atol": 1e-7}


def counts(tokens, sequences):
    return StepCounts(tokens=torch.tensor(tokens), sequences=torch.tensor(sequences))


def lengths_mask(lengths, t):
    return torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]


# --------------------------------------------------------------------------------------------------------
# masked_mean / masked_sum / normalizer
# --------------------------------------------------------------------------------------------------------


def test_seed_004_reduction_example():
    # Acceptance 9: 6 and 3 valid positions give 3.1 / 9.
    x = torch.tensor(
        [[0.5, 0.2, 0.3, 0.1, 0.6, 0.4, 0.8, 0.9], [0.7, 0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8]],
        dtype=torch.float64,
    )
    valid = lengths_mask([6, 3], 8)
    got = masked_mean(x, valid)
    torch.testing.assert_close(got, torch.tensor(3.1 / 9, dtype=torch.float64), **F64)
    assert round(got.item(), 6) == 0.344444
    torch.testing.assert_close(masked_sum(x, valid), torch.tensor(3.1, dtype=torch.float64), **F64)


def test_masked_mean_weighted_and_normalizers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    w = torch.rand(3, 5, generator=g, dtype=torch.float64)
    valid = torch.rand(3, 5, generator=g) > 0.3
    num = (x * w)[valid].sum()
    torch.testing.assert_close(masked_mean(x, valid, weight=w), num / valid.sum(), **F64)
    torch.testing.assert_close(
        masked_mean(x, valid, weight=w, normalize="weights"), num / w[valid].sum(), **F64
    )
    torch.testing.assert_close(
        masked_mean(x, valid, weight=w, normalize="global_tokens", step_counts=counts(40, 3)), num / 40, **F64
    )
    torch.testing.assert_close(masked_mean(x, valid, denominator=7), x[valid].sum() / 7, **F64)
    torch.testing.assert_close(masked_mean(x, valid, denominator=2.5), x[valid].sum() / 2.5, **F64)
    torch.testing.assert_close(masked_mean(x, valid, denominator=torch.tensor(6)), x[valid].sum() / 6, **F64)
    torch.testing.assert_close(
        masked_mean(x, valid, denominator=torch.tensor(0.5, dtype=torch.float64)), x[valid].sum() / 0.5, **F64
    )


def test_normalizer_values_and_dtypes():
    valid = lengths_mask([2, 0, 3], 4)
    w = torch.tensor([[1.0, 2.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0], [0.5, 0.5, 0.5, float("nan")]])
    assert normalizer(valid).item() == 5.0
    assert normalizer(valid, dtype=torch.float64).dtype == torch.float64
    assert normalizer(valid).dtype == torch.get_default_dtype()
    d = normalizer(valid, weight=w, normalize="weights")
    assert d.item() == 4.5 and d.dtype == torch.float32  # NaN at an invalid position is ignored
    assert normalizer(valid, weight=w, normalize="tokens").item() == 5.0
    assert normalizer(valid, normalize="weights").item() == 5.0  # no weight: counts tokens
    assert normalizer(valid, normalize="global_tokens", step_counts=counts(11, 2)).item() == 11.0
    # Clamps: nothing valid, zero weights, zero step tokens.
    none = torch.zeros(2, 3, dtype=torch.bool)
    assert normalizer(none).item() == 1.0
    assert normalizer(valid, weight=torch.zeros(3, 4), normalize="weights").item() == 1.0
    assert normalizer(none, normalize="global_tokens", step_counts=counts(0, 0)).item() == 1.0


def test_empty_batch_is_graph_connected_zero_without_nan():
    x = torch.full((2, 3), float("nan"), dtype=torch.float64, requires_grad=True)
    w = torch.full((2, 3), float("inf"), dtype=torch.float64, requires_grad=True)
    none = torch.zeros(2, 3, dtype=torch.bool)
    outs = [
        masked_mean(x, none),
        masked_mean(x, none, weight=w, normalize="weights"),
        masked_mean(x, none, normalize="global_tokens", step_counts=counts(0, 0)),
        masked_mean(x, none, denominator=0),
        masked_mean(x, none, denominator=torch.tensor(0)),
        sequence_mean(x, none),
    ]
    for out in outs:
        assert out.item() == 0.0 and out.requires_grad
    sum(outs).backward()
    assert (x.grad == 0).all() and (w.grad == 0).all()


def test_nan_at_invalid_positions_never_leaks():
    x = torch.tensor([[1.0, float("nan")], [2.0, float("inf")]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[2.0, float("nan")], [1.0, float("-inf")]], dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True, False], [True, False]])
    out = masked_mean(x, valid, weight=w, normalize="weights")
    torch.testing.assert_close(out, torch.tensor(4.0 / 3.0, dtype=torch.float64), **F64)
    out.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    assert x.grad[0, 1] == 0 and w.grad[1, 1] == 0
    torch.testing.assert_close(x.grad[:, 0], torch.tensor([2.0, 1.0], dtype=torch.float64) / 3, **F64)
    # d/dw of (Σ w x)/(Σ w) = (x - mean)/Σw
    torch.testing.assert_close(
        w.grad[:, 0], (torch.tensor([1.0, 2.0], dtype=torch.float64) - 4.0 / 3.0) / 3.0, **F64
    )


def test_denominator_tensor_zero_and_gradient():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([True, True])
    n = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    out = masked_mean(x, valid, denominator=n)
    assert out.item() == 0.0
    out.backward()
    assert (x.grad == 0).all() and n.grad == 0


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda x, v: masked_mean(x, v, normalize="batch"), r"normalize.*'batch'"),
        (lambda x, v: masked_mean(x, v, normalize="global_tokens"), r"step_counts.*None"),
        (
            lambda x, v: masked_mean(x, v, normalize="global_tokens", step_counts=(3, 1)),
            r"step_counts.*tuple",
        ),
        (lambda x, v: masked_mean(x, v.float()), r"valid.*bool.*float32"),
        (lambda x, v: masked_mean(x[:, :2], v), r"x.*\(2, 3\).*\(2, 2\)"),
        (lambda x, v: masked_mean(x, v, weight=torch.ones(3)), r"weight.*\(2, 3\).*\(3,\)"),
        (lambda x, v: masked_mean(x, v, denominator=-1), r"denominator.*>= 0.*-1"),
        (lambda x, v: masked_mean(x, v, denominator="3"), r"denominator.*str"),
        (lambda x, v: masked_mean(x, v, denominator=torch.ones(2)), r"denominator.*0-d.*\(2,\)"),
        (lambda x, v: normalizer(v, normalize="x"), r"normalize"),
        (lambda x, v: sequence_mean(x, v, normalize="weights"), r"normalize.*'weights'"),
        (lambda x, v: sequence_mean(x, v, normalize="global_tokens"), r"step_counts.*None"),
        (lambda x, v: sequence_mean(x, v, seq_weight=torch.ones(3)), r"seq_weight.*\(2,\).*\(3,\)"),
        (lambda x, v: sequence_mean(x[None], v[None]), r"x.*\(B, T\).*\(1, 2, 3\)"),
    ],
)
def test_bad_arguments(call, pattern):
    x = torch.ones(2, 3)
    valid = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(LossInputError, match=pattern):
        call(x, valid)


# --------------------------------------------------------------------------------------------------------
# sequence_mean
# --------------------------------------------------------------------------------------------------------


def test_sequence_mean_with_empty_rows():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    valid = lengths_mask([3, 0, 6, 1], 6)
    w = torch.tensor([2.0, 100.0, 0.5, 1.0], dtype=torch.float64)
    row_means = [x[i, : int(valid[i].sum())].mean() for i in (0, 2, 3)]
    ref = (2.0 * row_means[0] + 0.5 * row_means[1] + 1.0 * row_means[2]) / 3
    torch.testing.assert_close(sequence_mean(x, valid, seq_weight=w), ref, **F64)
    torch.testing.assert_close(sequence_mean(x, valid), sum(row_means) / 3, **F64)
    # The empty row never enters: dropping it changes nothing.
    keep = [0, 2, 3]
    torch.testing.assert_close(
        sequence_mean(x, valid, seq_weight=w), sequence_mean(x[keep], valid[keep], seq_weight=w[keep]), **F64
    )
    torch.testing.assert_close(
        sequence_mean(x, valid, seq_weight=w, normalize="global_tokens", step_counts=counts(10, 5)),
        ref * 3 / 5,
        **F64,
    )


def test_sequence_mean_1d_is_n_by_1():
    x = torch.tensor([1.0, 5.0, float("nan"), 3.0], dtype=torch.float64)
    valid = torch.tensor([True, True, False, True])
    torch.testing.assert_close(sequence_mean(x, valid), torch.tensor(3.0, dtype=torch.float64), **F64)


def test_sequence_mean_gradient_is_finite_with_nan_in_empty_rows():
    x = torch.randn(3, 4, dtype=torch.float64)
    x[1] = float("nan")
    x.requires_grad_(True)
    w = torch.tensor([1.0, float("nan"), 2.0], dtype=torch.float64, requires_grad=True)
    valid = lengths_mask([2, 0, 4], 4)
    assert torch.autograd.gradcheck(
        lambda a, b: sequence_mean(
            torch.where(valid, a, 0.0), valid, seq_weight=torch.where(valid.any(-1), b, 1.0)
        ),
        (x.detach().nan_to_num().requires_grad_(True), w.detach().nan_to_num().requires_grad_(True)),
    )
    out = sequence_mean(x, valid, seq_weight=w)
    assert torch.isfinite(out)
    out.backward()
    assert torch.isfinite(x.grad).all() and (x.grad[1] == 0).all()
    assert torch.isfinite(w.grad).all() and w.grad[1] == 0


# --------------------------------------------------------------------------------------------------------
# step_counts
# --------------------------------------------------------------------------------------------------------


def test_step_counts_sums_micro_batches():
    a = torch.tensor([[1, 2, -100], [-100, -100, -100]])
    b = torch.tensor([[0, -100, 4], [3, 3, 3], [5, -100, -100]])
    sc = step_counts([a, b])
    assert isinstance(sc, StepCounts)
    assert sc.tokens.dtype == torch.int64 and sc.tokens.dim() == 0 and sc.sequences.dim() == 0
    assert (int(sc.tokens), int(sc.sequences)) == (2 + 6, 1 + 3)
    single = step_counts(a)
    assert (int(single.tokens), int(single.sequences)) == (2, 1)
    flat = step_counts([torch.tensor([1, -100, 2, 3])])  # (N,): each position is a sequence
    assert (int(flat.tokens), int(flat.sequences)) == (3, 3)


def test_step_counts_masks_ignore_index_and_padding_token():
    a = torch.tensor([[1, 0, 0], [2, 2, 0]])
    b = torch.tensor([[7, 0, -1]])
    masks = [torch.tensor([[True, True, False], [False, False, True]]), None]
    sc = step_counts([a, b], ignore_index=-1, masks=masks, padding_token=0)
    # a: row 0 keeps only the 1; row 1 keeps nothing (masked twos, padding zero). b: keeps the 7.
    assert (int(sc.tokens), int(sc.sequences)) == (2, 2)
    sc = step_counts([a, b], ignore_index=None, masks=masks)
    assert (int(sc.tokens), int(sc.sequences)) == (3 + 3, 2 + 1)
    sc = step_counts(a, masks=masks[0])  # one batch with one mask tensor
    assert (int(sc.tokens), int(sc.sequences)) == (3, 2)


def test_step_counts_base_tokens_count_the_positions_before_the_padding_exclusion():
    a = torch.tensor([[1, 0, 0], [2, 2, 0]])
    b = torch.tensor([[7, 0, -1], [0, 0, 0]])
    masks = [torch.tensor([[True, True, False], [False, False, True]]), None]
    # valid before padding: a keeps 1, 0 (row 0) and the last 0 (row 1); b keeps 7, 0 and its second row
    for pad, want_tokens, want_base in ((0, 2, 3 + 5), (2, 3 + 5, 3 + 5), (7, 3 + 4, 3 + 5)):
        sc = step_counts([a, b], ignore_index=-1, masks=masks, padding_token=pad)
        assert (int(sc.tokens), int(sc.base_tokens)) == (want_tokens, want_base), pad
        assert int(sc.base().tokens) == want_base and sc.base().base_tokens is None
    plain = step_counts([a, b], ignore_index=-1, masks=masks)
    assert plain.base_tokens is None and plain.base() is plain


def test_step_counts_errors():
    with pytest.raises(LossInputError, match="micro_targets.*empty"):
        step_counts([])
    with pytest.raises(LossInputError, match=r"micro_targets\[1\].*integer.*float32"):
        step_counts([torch.zeros(2, dtype=torch.long), torch.zeros(2)])
    with pytest.raises(LossInputError, match=r"micro_targets\[0\].*\(B, T\).*\(1, 2, 3\)"):
        step_counts([torch.zeros(1, 2, 3, dtype=torch.long)])
    with pytest.raises(LossInputError, match=r"masks.*2.*1"):
        step_counts([torch.zeros(2, dtype=torch.long)] * 2, masks=[None])
    with pytest.raises(LossInputError, match=r"masks\[0\].*bool.*\(2,\)"):
        step_counts([torch.zeros(2, dtype=torch.long)], masks=[torch.ones(2)])


def test_step_counts_all_reduces_once_when_distributed(monkeypatch):
    calls = []

    def fake_all_reduce(tensor, op=None, group=None):
        calls.append((tensor.clone(), op, group))
        tensor.mul_(3)  # as if three identical ranks

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    a = torch.tensor([[1, -100], [2, 3]])
    sc = step_counts([a, a])
    assert len(calls) == 1
    packed, op, group = calls[0]
    # [tokens, sequences, base tokens] in one all-reduce
    assert packed.tolist() == [6, 4, 6] and op == dist.ReduceOp.SUM and group is None
    assert (int(sc.tokens), int(sc.sequences)) == (18, 12) and sc.base_tokens is None
    sc = step_counts([a, a], padding_token=3)
    assert calls[-1][0].tolist() == [4, 4, 6] and (int(sc.tokens), int(sc.base_tokens)) == (12, 18)
    del calls[1:]
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    marker = object()
    step_counts([a], group=marker)  # an explicit group all-reduces even without a default group
    assert len(calls) == 2 and calls[1][2] is marker
    step_counts([a])
    assert len(calls) == 2


def _two_rank_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        targets = (
            [torch.tensor([[1, -100, -100], [2, 2, 2]])] if rank == 0 else [torch.tensor([[-100, 5, 5]])] * 2
        )
        sc = step_counts(targets)
        if rank == 1:
            torch.save(torch.stack([sc.tokens, sc.sequences]), out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_step_counts_real_two_rank_gloo(tmp_path):
    out = tmp_path / "counts.pt"
    mp.spawn(_two_rank_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    assert torch.load(out).tolist() == [4 + 4, 2 + 2]


def test_warn_empty():
    with pytest.warns(EmptyBatchWarning, match="no valid target positions; loss is 0"):
        warn_empty(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_empty(3)
        warn_empty(torch.tensor(2))


# --------------------------------------------------------------------------------------------------------
# normalize="global_tokens": split invariance (acceptance 23, functional part)
# --------------------------------------------------------------------------------------------------------

LENGTHS = [0, 1, 3, 5, 8, 11, 16, 16]  # B = 8, T = 16


def _split_batch(dtype, seed=2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(8, 16, 50, generator=g, dtype=torch.float64).to(dtype)
    target = torch.randint(0, 50, (8, 16), generator=g)
    target[~lengths_mask(LENGTHS, 16)] = -100
    return logits, target


def _accumulate(logits, target, splits, loss_fn):
    """Run loss_fn over micro-batches of rows; return the summed loss and the accumulated logits gradient."""
    z = logits.clone().requires_grad_(True)
    total = 0.0
    start = 0
    for size in splits:
        part = loss_fn(z[start : start + size], target[start : start + size])
        part.backward()
        total = total + part.detach()
        start += size
    return total, z.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.1, "smoothing_exclude": (0, 1)},
        {"z_loss": 1e-3, "smoothing_convention": "fairseq"},
    ],
)
def test_global_tokens_shares_sum_to_whole_batch(options, dtype):
    logits, target = _split_batch(dtype)
    tol = F64 if dtype == torch.float64 else F32
    whole_loss, whole_grad = _accumulate(logits, target, [8], lambda z, t: cross_entropy(z, t, **options))
    for splits in ([3, 5], [1, 2, 5], [2, 2, 2, 2]):
        bounds = [sum(splits[:k]) for k in range(len(splits) + 1)]
        sc = step_counts([target[a:b] for a, b in itertools.pairwise(bounds)])
        assert int(sc.tokens) == sum(LENGTHS) and int(sc.sequences) == 7

        def share(z, t, sc=sc):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", EmptyBatchWarning)  # the first row is empty
                return cross_entropy(z, t, normalize="global_tokens", step_counts=sc, **options)

        loss, grad = _accumulate(logits, target, splits, share)
        torch.testing.assert_close(loss, whole_loss, **tol)
        torch.testing.assert_close(grad, whole_grad, **tol)
    # Negative control: per-micro-batch token means divided by the number of micro-batches differ.
    naive, _ = _accumulate(logits, target, [1, 2, 5], lambda z, t: _quiet_mean(z, t, options) / 3)
    assert abs(naive.item() - whole_loss.item()) > 1e-3 * abs(whole_loss.item())


def _quiet_mean(z, t, options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyBatchWarning)
        return cross_entropy(z, t, **options)


def test_global_sequence_mean_shares_sum_to_whole_batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 16, generator=g, dtype=torch.float64)
    valid = lengths_mask(LENGTHS, 16)
    w = torch.rand(8, generator=g, dtype=torch.float64) + 0.5
    whole = sequence_mean(x, valid, seq_weight=w)
    sc = counts(sum(LENGTHS), 7)
    shares = sum(
        sequence_mean(x[a:b], valid[a:b], seq_weight=w[a:b], normalize="global_tokens", step_counts=sc)
        for a, b in ((0, 1), (1, 3), (3, 8))
    )
    torch.testing.assert_close(shares, whole, **F64)
