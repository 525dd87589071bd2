"""EnergyLoss, its hooks and BaseLoss.apply_reduction (spec/temporal.md §1, §3; acceptance 1, 5-8)."""

from __future__ import annotations

import copy
import gc
import math
import warnings

import pytest
import torch
from torch import nn

from losskit.contract import EmptyBatchWarning, LossInputError
from losskit.functional.temporal import combine_energy, energy_term
from losskit.hooks import monitor_energy, select_modules
from losskit.losses import ActivityLoss, BaseLoss, EnergyLoss

X0 = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
X1 = torch.tensor([[2.0, 0.0], [-1.0, 1.0]])


def hand_model(dtype=torch.float32) -> nn.Sequential:
    lin1, lin2 = nn.Linear(2, 3), nn.Linear(3, 2)
    with torch.no_grad():
        lin1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
        lin1.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
        lin2.weight.copy_(torch.tensor([[1.0, 1.0, 0.0], [0.0, -1.0, 2.0]]))
        lin2.bias.zero_()
    return nn.Sequential(lin1, nn.ReLU(), lin2).to(dtype)


def run_window(loss: EnergyLoss, model: nn.Module, dtype=torch.float32) -> torch.Tensor:
    with loss.recording(model):
        model(X0.to(dtype))
        model(X1.to(dtype))
    return loss()


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def plain_energy(acts: dict[str, list[torch.Tensor]], p: float, unit_norm: str) -> torch.Tensor:
    """The docstring's plain-torch formula, the oracle."""
    per_module = []
    for outputs in acts.values():
        terms = []
        for a in outputs:
            n = a[0].numel()
            d = n if unit_norm == "n_units" else n ** (1 / p)
            terms.append(a.flatten(1).abs().pow(p).sum(1).pow(1 / p) / d)
        per_module.append(sum(terms) / len(terms))
    return sum(per_module) / len(per_module)


# -- acceptance 1: apply_reduction ----------------------------------------------------------------------------


def test_apply_reduction_values():
    loss = torch.tensor([1.0, 2.0, 3.0, 0.0])
    assert BaseLoss("mean").apply_reduction(loss, 3).item() == pytest.approx(2.0)
    assert BaseLoss("mean").apply_reduction(loss, torch.tensor(3)).item() == pytest.approx(2.0)
    assert BaseLoss("sum").apply_reduction(loss).item() == pytest.approx(6.0)
    assert BaseLoss("none").apply_reduction(loss) is loss
    assert BaseLoss("mean").apply_reduction(loss).item() == pytest.approx(1.5)


@pytest.mark.parametrize("count", [0, -2, None])
def test_apply_reduction_empty_is_graph_connected_zero(count):
    loss = torch.zeros(4 if count is not None else 0, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = BaseLoss("mean").apply_reduction(loss, count)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(loss.grad, torch.zeros_like(loss))
    assert [type(w.message) for w in caught] == [EmptyBatchWarning]


def test_apply_reduction_tensor_zero_count_no_nan():
    loss = torch.tensor([0.0, 0.0], requires_grad=True)
    out = BaseLoss("mean").apply_reduction(loss, torch.tensor(0))
    out.backward()
    assert out.item() == 0.0 and torch.equal(loss.grad, torch.zeros(2))


def test_bad_reduction():
    with pytest.raises(ValueError, match="'mean', 'sum', 'none'|'none', 'sum', 'mean'"):
        BaseLoss("avg")


# -- acceptance 5: energy by hand ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "unit_norm", "expected"),
    [
        (1, "n_units", [55 / 24, 5 / 4]),
        (1, "root", [55 / 24, 5 / 4]),
        (2, "n_units", [1.728065, 1.007453]),
        (2, "root", [2.598577, 1.529855]),
    ],
)
def test_energy_by_hand(p, unit_norm, expected):
    model = hand_model()
    none = run_window(EnergyLoss("none", p, unit_norm=unit_norm), model)
    assert none.shape == (2,)
    torch.testing.assert_close(none, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    mean = run_window(EnergyLoss("mean", p, unit_norm=unit_norm), model)
    total = run_window(EnergyLoss("sum", p, unit_norm=unit_norm), model)
    assert mean.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert total.item() == pytest.approx(sum(expected), rel=1e-6)


def test_energy_by_hand_exact_p1_and_p2_means():
    model = hand_model()
    assert run_window(EnergyLoss("mean", 1), model).item() == pytest.approx(85 / 48, rel=1e-6)
    assert run_window(EnergyLoss("sum", 1), model).item() == pytest.approx(3.541667, rel=1e-6)
    assert run_window(EnergyLoss("mean", 2), model).item() == pytest.approx(1.367759, rel=1e-6)
    assert run_window(EnergyLoss("mean", 2, unit_norm="root"), model).item() == pytest.approx(2.064216, rel=1e-6)


@pytest.mark.parametrize(("p", "unit_norm"), [(1, "n_units"), (2, "n_units"), (2, "root"), (3.5, "root")])
def test_energy_gradient_equals_plain_formula_float64(p, unit_norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Conv1d(1, 2, 3, padding=1)).double()
    model[2] = nn.Conv1d(1, 2, 3, padding=1).double()
    net = nn.Sequential(model[0], model[1], nn.Unflatten(1, (1, 6)), model[2])
    xs = [torch.randn(3, 4, dtype=torch.float64) for _ in range(3)]
    loss = EnergyLoss("mean", p, unit_norm=unit_norm)
    with loss.recording(net):
        for x in xs:
            net(x)
    got = loss()
    grads = torch.autograd.grad(got, list(net.parameters()))
    acts = {"0": [], "3": []}
    for x in xs:
        h = net[0](x)
        acts["0"].append(h)
        acts["3"].append(net[3](net[2](net[1](h))))
    ref = plain_energy(acts, p, unit_norm).mean()
    ref_grads = torch.autograd.grad(ref, list(net.parameters()))
    assert got.dtype == torch.float64  # float64 activations are not narrowed
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_energy_gradcheck_of_the_formula():
    a = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    # energy_term computes in float32; gradcheck the float64 composition of the same pure pieces.
    def f(x):
        e = x.abs().sum(dim=(1, 2)) / 10 + torch.linalg.vector_norm(x, 2, dim=(1, 2)) / 10
        return combine_energy([e, 2 * e], [2, 3])

    assert torch.autograd.gradcheck(f, (a,))
    assert torch.autograd.gradcheck(lambda x: energy_term(x, 2.5, "root"), (a,))
    assert torch.autograd.gradcheck(lambda x: energy_term(x, 1), (a,))
    assert energy_term(a.float(), 2).dtype == torch.float32
    assert energy_term(a.half(), 2).dtype == torch.float32


def test_energy_gradient_wrt_bias():
    model = hand_model()
    loss = run_window(EnergyLoss("mean", 1), model)
    loss.backward()
    torch.testing.assert_close(model[2].bias.grad, torch.tensor([0.1875, 0.0]))


def test_half_precision_activations_are_normed_in_float32():
    model = hand_model(torch.bfloat16)
    out = run_window(EnergyLoss("none", 1), model, torch.bfloat16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([55 / 24, 5 / 4]), rtol=1e-2, atol=1e-2)


# -- acceptance 6: n_units for convolutions -------------------------------------------------------------------


def const_conv(cls, **kw) -> nn.Module:
    conv = cls(1, 2, 3, padding=1, **kw)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([1.0, -2.0]))
    return conv


@pytest.mark.parametrize(
    ("cls", "spatial"),
    [(nn.Conv1d, (16,)), (nn.Conv2d, (4, 4)), (nn.Conv3d, (2, 2, 4)), (nn.ConvTranspose2d, (4, 4))],
)
def test_n_units_convolutions(cls, spatial):
    conv = const_conv(cls)
    x = torch.randn(3, 1, *spatial)
    cases = [(1, "n_units", 1.5), (2, "n_units", math.sqrt(80) / 32), (2, "root", math.sqrt(2.5))]
    for p, unit_norm, expected in cases:
        loss = EnergyLoss("none", p, unit_norm=unit_norm)
        with loss.recording(conv):
            conv(x)
        torch.testing.assert_close(loss(), torch.full((3,), expected), rtol=1e-6, atol=0)


def test_n_units_recomputed_when_shape_changes():
    conv = const_conv(nn.Conv2d)
    loss = EnergyLoss("none", 2)
    with loss.recording(conv):
        conv(torch.randn(2, 1, 4, 4))  # n = 32: sqrt(80)/32
        conv(torch.randn(2, 1, 2, 2))  # n = 8: sqrt(20)/8
    expected = (math.sqrt(80) / 32 + math.sqrt(20) / 8) / 2
    torch.testing.assert_close(loss(), torch.full((2,), expected), rtol=1e-6, atol=0)


def test_linear_on_3d_input_counts_every_element():
    lin = nn.Linear(2, 3)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.fill_(2.0)
    loss = EnergyLoss("none", 2)
    with loss.recording(lin):
        lin(torch.randn(2, 5, 2))  # n = 15, ||a|| = sqrt(15 * 4)
    torch.testing.assert_close(loss(), torch.full((2,), math.sqrt(60) / 15), rtol=1e-6, atol=0)


# -- acceptance 7: per-module counts ----------------------------------------------------------------------------


def test_per_module_counts():
    model = hand_model()
    loss = EnergyLoss("none", 1)
    with loss.recording(model):
        model(X0)
        model[0](X1)
    with pytest.warns(UserWarning, match="unequal") as record:
        none = loss()
    torch.testing.assert_close(none, torch.tensor([23 / 12, 1.5]))
    assert "0=2" in str(record[0].message) and "2=1" in str(record[0].message)
    assert none.mean().item() == pytest.approx(41 / 24, rel=1e-6)
    assert loss.last_stats.calls == {"0": 2, "2": 1}


def test_unequal_count_warning_once_per_distinct_set():
    model = hand_model()
    loss = EnergyLoss("mean", 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            with loss.recording(model):
                model(X0)
                model[0](X1)
            loss()
    assert sum("unequal" in str(w.message) for w in caught) == 1


# -- acceptance 8: hook hygiene -----------------------------------------------------------------------------------


def test_exception_inside_recording_removes_hooks_and_clears():
    model = hand_model()
    loss = EnergyLoss()
    with pytest.raises(RuntimeError, match="boom"), loss.recording(model):
        model(X0)
        assert all_hooks(model) == 2
        raise RuntimeError("boom")
    assert all_hooks(model) == 0
    assert all(not m._forward_hooks for m in model.modules())
    assert not loss._recorder.recorded
    with pytest.warns(UserWarning, match="nothing was recorded"):
        assert loss().item() == 0.0


def test_second_call_without_forward_is_zero_with_warning():
    model = hand_model()
    loss = EnergyLoss()
    first = run_window(loss, model)
    assert first.item() > 0
    with pytest.warns(UserWarning, match="nothing was recorded"):
        second = loss()
    assert second.shape == () and second.item() == 0.0
    second.backward()  # connected to the first hooked parameter
    assert torch.equal(model[0].weight.grad, torch.zeros_like(model[0].weight))
    none = EnergyLoss("none")
    run_window(none, model)
    with pytest.warns(UserWarning, match="nothing was recorded"):
        assert none().shape == (0,)


def test_forward_outside_recording_leaves_no_trace():
    model = hand_model()
    loss = EnergyLoss()
    reference = run_window(loss, model).item()
    model(torch.randn(7, 2))
    with loss.recording(model):
        model(X0)
        model(X1)
    model(torch.randn(5, 2))
    assert loss().item() == pytest.approx(reference)


def test_batch_size_change_in_window_raises():
    model = hand_model()
    loss = EnergyLoss()
    with pytest.raises(LossInputError, match=r"'0'.*batch size 3, expected 2.*another forward"), \
            loss.recording(model):
        model(torch.randn(2, 2))
        model(torch.randn(3, 2))
    assert all_hooks(model) == 0
    loss.register_hooks(model)
    model(torch.randn(2, 2))
    with pytest.raises(LossInputError):
        model(torch.randn(3, 2))
    loss.remove_hooks()


def test_remove_hooks_idempotent_and_del_removes():
    model = hand_model()
    loss = EnergyLoss()
    loss.register_hooks(model)
    assert all_hooks(model) == 2
    loss.remove_hooks()
    loss.remove_hooks()
    assert all_hooks(model) == 0
    loss.register_hooks(model)
    assert all_hooks(model) == 2
    del loss
    gc.collect()
    assert all_hooks(model) == 0


def test_dropped_loss_hook_is_inert_even_if_handle_survives():
    model = hand_model()
    loss = EnergyLoss()
    loss.register_hooks(model)
    hook = next(iter(model[0]._forward_hooks.values()))
    recorder = loss._recorder
    recorder._handles.clear()  # simulate a leaked hook whose owner dies
    del loss, recorder
    gc.collect()
    assert hook(model[0], (X0,), model[0](X0)) is None  # weak reference is dead: the output is left as it is
    model[0]._forward_hooks.clear()


def test_zero_modules_warning():
    model = nn.Sequential(nn.ReLU(), nn.Tanh())
    loss = EnergyLoss()
    with pytest.warns(UserWarning, match="no module of Sequential is selected"):
        loss.register_hooks(model)
    model(X0)
    with pytest.warns(UserWarning, match="nothing was recorded"):
        out = loss()
    assert out.item() == 0.0 and out.shape == ()


class StatefulCell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 3)

    def forward(self, x):
        h = self.lin(x)
        return h, h.detach() * 0 + 1


def test_tuple_output_uses_element_zero():
    cell = monitor_energy(StatefulCell())
    loss = EnergyLoss("none", exclude=["lin"])
    with loss.recording(cell):
        h, _ = cell(X0)
    assert loss.hooked_modules == ("",)
    torch.testing.assert_close(loss(), h.detach().abs().mean(1))


def test_non_float_output_skipped_with_one_warning():
    class Argmax(nn.Module):
        def forward(self, x):
            return x.argmax(-1)

    model = nn.Sequential(nn.Linear(2, 3), monitor_energy(Argmax()))
    loss = EnergyLoss()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with loss.recording(model):
            model(X0)
            model(X0)
        loss()
    assert sum("its calls are skipped" in str(w.message) for w in caught) == 1
    assert loss.last_stats.calls == {"0": 2}


@pytest.mark.parametrize("p", [1, 2, 3])
def test_all_zero_activation_zero_gradient(p):
    lin = nn.Linear(2, 3)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    loss = EnergyLoss("mean", p)
    with loss.recording(lin):
        lin(X0)
    out = loss()
    out.backward()
    assert out.item() == 0.0
    for g in (lin.weight.grad, lin.bias.grad):
        assert torch.isfinite(g).all() and torch.equal(g, torch.zeros_like(g))


def test_deepcopy_inside_window_does_not_change_energy():
    model = hand_model()
    loss = EnergyLoss()
    reference = run_window(loss, model).item()
    with loss.recording(model):
        twin = copy.deepcopy(model)
        model(X0)
        twin(torch.randn(5, 2))  # another batch size: would raise if counted
        model(X1)
    assert loss().item() == pytest.approx(reference)
    assert all_hooks(model) == 0


def test_nested_recording_and_recording_over_registered_hooks_raise():
    model = hand_model()
    loss = EnergyLoss()
    with loss.recording(model) as handle:
        assert handle is loss
        with pytest.raises(RuntimeError, match="nested"), loss.recording(model):
            pass
        with pytest.raises(RuntimeError, match="inside recording"):
            loss.register_hooks(model)
    loss.register_hooks(model)
    with pytest.raises(RuntimeError, match="register_hooks"), loss.recording(model):
        pass
    loss.remove_hooks()
    assert all_hooks(model) == 0


def test_seed_mode_accumulates_until_loss_call():
    model = hand_model()
    loss = EnergyLoss(reduction="mean", p=1)
    loss.register_hooks(model)
    model(X0)
    model(X1)
    assert loss(outputs=None, targets=None).item() == pytest.approx(85 / 48, rel=1e-6)
    model(X0)
    model(X1)
    assert loss(None, None).item() == pytest.approx(85 / 48, rel=1e-6)
    loss.remove_hooks()


def test_loss_call_clears_even_when_it_raises(monkeypatch):
    model = hand_model()
    loss = EnergyLoss()
    with loss.recording(model):
        model(X0)
    import losskit.hooks as hooks_module

    def broken(*args, **kwargs):
        raise ArithmeticError("combine failed")

    monkeypatch.setattr(hooks_module, "combine_energy", broken)
    with pytest.raises(ArithmeticError):
        loss()
    assert not loss._recorder.recorded


def test_grad_and_no_grad_mixed_warns():
    model = hand_model()
    loss = EnergyLoss()
    with loss.recording(model):
        model(X0)
        with torch.no_grad():
            model(X1)
    with pytest.warns(UserWarning, match="with and without grad"):
        loss()


# -- selection ---------------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(1, 2, 3, padding=1)
        self.conv_rec = nn.Conv2d(2, 2, 3, padding=1)
        self.norm = nn.BatchNorm2d(2)
        self.readout = nn.Linear(2, 3)
        self.block = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))


def test_selection_rules():
    net = Net()
    names = lambda **kw: [n for n, _ in select_modules(net, **kw)]
    assert names() == ["conv_in", "conv_rec", "readout", "block.0", "block.1"]
    assert names(exclude=["readout", "block.*"]) == ["conv_in", "conv_rec"]
    assert names(select="marked") == []
    monitor_energy(net.norm)
    monitor_energy(net.conv_rec, False)
    assert names() == ["conv_in", "norm", "readout", "block.0", "block.1"]
    assert names(select="marked") == ["norm"]
    net.block[1]._activity_monitor = "absolute"
    assert names(select="marked") == ["norm", "block.1"]
    net.block[1]._activity_monitor = "signed"
    with pytest.raises(ValueError, match="signed"):
        names()


def test_activity_loss_is_marked_energy():
    net = Net()
    loss = ActivityLoss()
    monitor_energy(net.conv_in)
    loss.register_hooks(net)
    assert loss.hooked_modules == ("conv_in",)
    loss.remove_hooks()


@pytest.mark.parametrize("kwargs", [{"p": 0.5}, {"p": float("inf")}, {"p": "2"}, {"unit_norm": "rms"},
                                    {"select": "all"}, {"reduction": "avg"}])
def test_bad_energy_arguments(kwargs):
    with pytest.raises(ValueError):
        EnergyLoss(**kwargs)


def test_track_activity_and_stats():
    model = hand_model()
    loss = EnergyLoss(track_activity=True)
    run_window(loss, model)
    stats = loss.last_stats
    assert stats.act_max["0"].item() == 3.0 and stats.act_max["2"].item() == 6.0
    assert stats.energy["2"].item() == pytest.approx(((5 / 2 + 4 / 2) + (8 / 2 + 2 / 2)) / 4)
    assert not stats.energy["0"].requires_grad
