"""The `temporal` training task (spec/temporal.md §6; acceptance 16 and 17)."""

from __future__ import annotations

import csv
import pathlib
import re
import sys
import time

import matplotlib.image
import pytest
import yaml

from losskit.config import load_config
from losskit.contract import ConfigError
from losskit.train import cli as train_cli
from losskit.train.tasks import build_train_config
from losskit.train.temporal import (
    DEFAULT_CRITERION,
    EpochRow,
    TemporalDigitsNet,
    format_header,
    format_row,
    resolve_criterion,
    run,
    warning_signs,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\s+\d+ \|")


def rows_of(ce, energy, act=None):
    return [EpochRow(i + 1, c, e, c + 0.05 * e, (act or {}).get(i + 1, {})) for i, (c, e) in enumerate(zip(ce, energy))]


def signs_by_epoch(history, weight=0.05):
    return {row.epoch: warning_signs(history[: row.epoch], weight) for row in history}


# -- acceptance 16: warning-sign checker ------------------------------------------------------------------------


def test_seed_example_table_has_no_warning():
    history = rows_of([2.30, 1.50, 1.00, 0.50, 0.30], [0.05, 0.12, 0.15, 0.15, 0.14])
    assert all(not v for v in signs_by_epoch(history).values())


def test_rule1_energy_above_one_and_growing():
    found = signs_by_epoch(rows_of([2.0, 1.5, 1.0], [0.9, 1.05, 1.2]))
    assert not found[1]
    assert len(found[2]) == 1 and "raw energy 1.0500 > 1" in found[2][0]
    assert len(found[3]) == 1 and "raw energy 1.2000" in found[3][0]


def test_rule1_needs_growth():
    found = signs_by_epoch(rows_of([2.0, 1.5], [1.3, 1.2]))
    assert not found[1] and not found[2]


def test_rule2_energy_dominates():
    found = signs_by_epoch(rows_of([0.04], [0.9]))
    assert len(found[1]) == 1 and "dominates" in found[1][0] and "0.045" in found[1][0]


def test_rule3_names_the_module():
    history = rows_of([1.0], [0.3], {1: {"conv_in": 4.0, "conv_rec": 12.0}})
    found = signs_by_epoch(history)
    assert len(found[1]) == 1 and "'conv_rec'" in found[1][0] and "conv_in" not in found[1][0]


def test_rule4_both_rise_twice():
    found = signs_by_epoch(rows_of([0.5, 0.6, 0.7], [0.2, 0.3, 0.4]))
    assert not found[1] and not found[2]
    assert len(found[3]) == 1 and "both rose" in found[3][0]


# -- table, model, config ------------------------------------------------------------------------------------------


def test_table_format_matches_the_spec_example():
    header, rule = format_header(0.05)
    assert header == "Epoch | CrossEntropy | Energy | Weighted Energy (0.05) | Total Loss | Val Acc"
    assert rule == "------|--------------|--------|------------------------|------------|--------"
    assert format_row(1, 1.9127, 0.27293, 0.05, 1.9263, 0.687) == (
        "    1 |       1.9127 | 0.2729 |                0.01365 |     1.9263 |   0.687"
    )
    assert format_header(100)[0].endswith("Weighted Energy (100) | Total Loss | Val Acc")


def test_model_size_and_shape():
    import torch

    model = TemporalDigitsNet(16, 0.5)
    assert sum(p.numel() for p in model.parameters()) == 5050
    assert model(torch.zeros(3, 8, 1, 8, 8)).shape == (3, 8, 10)
    with pytest.raises(ConfigError, match="alpha"):
        TemporalDigitsNet(16, 1.5)


def test_config_file_parses_and_matches_defaults():
    cfg = build_train_config(load_config([str(ROOT / "config" / "temporal.yaml")]))
    default = build_train_config({"task": "temporal"})
    assert cfg.criterion == DEFAULT_CRITERION
    for key in ("epochs", "n_timesteps", "pattern", "dt", "loss_reaction_time", "tau", "noise_std", "channels",
                "batch_size", "learning_rate", "seed", "out_dir", "device"):
        assert getattr(cfg, key) == getattr(default, key), key
    assert resolve_criterion(cfg.criterion, None) == resolve_criterion(None, None)


def test_energy_weight_shortcut():
    entries = resolve_criterion(None, 0.5)
    assert [e["weight"] for e in entries] == [1.0, 0.5]
    assert DEFAULT_CRITERION[1]["weight"] == 0.05  # the default is not modified
    with pytest.raises(ConfigError, match="energy_loss entry"):
        resolve_criterion([{"name": "cross_entropy_loss"}], 0.5)
    assert resolve_criterion([{"name": "EnergyLoss", "weight": 1}], 0.2)[0]["weight"] == 0.2


def test_pattern_override_stays_a_string():
    cfg = build_train_config(load_config(["--task=temporal", "--pattern=10001000"]))
    assert cfg.pattern == "10001000"


def test_modifiers_are_rejected():
    with pytest.raises(ConfigError, match="entropy_modifier_enabled"):
        build_train_config({"task": "temporal", "loss_modifiers_enabled": True, "entropy_modifier_enabled": True})


def test_bad_inputs_fail_before_writing(tmp_path):
    out = tmp_path / "run"
    base = {"task": "temporal", "out_dir": str(out), "epochs": 1}
    with pytest.raises(ConfigError, match="alpha"):
        run(build_train_config({**base, "tau": 1.0}))
    with pytest.raises(ConfigError, match="not a registered loss"):
        run(build_train_config({**base, "criterion": [{"name": "focal"}]}))
    with pytest.raises(ConfigError, match="energy_loss entry"):
        run(build_train_config({**base, "criterion": [{"name": "cross_entropy_loss"}], "energy_weight": 1.0}))
    assert not out.exists()


def test_missing_scikit_learn_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ConfigError, match=r"pip install 'losskit\[vision\]'"):
        run(build_train_config({"task": "temporal", "out_dir": str(tmp_path), "epochs": 1}))


# -- acceptance 17: the run ---------------------------------------------------------------------------------------


def table_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if ROW.match(line) or line.startswith(("Epoch |", "------|"))]


def test_short_runs_are_identical_and_write_files(tmp_path, capsys):
    argv = ["--task=temporal", "--epochs=2", "--channels=8"]
    assert train_cli.main(argv + [f"--out_dir={tmp_path / 'a'}"]) == 0
    first = capsys.readouterr().out
    assert train_cli.main(argv + [f"--out_dir={tmp_path / 'b'}"]) == 0
    second = capsys.readouterr().out
    assert len(table_of(first)) == 4 and table_of(first) == table_of(second)
    run_dir = tmp_path / "a"
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["epoch"], r["split"]) for r in rows] == [("1", "train"), ("1", "val"), ("2", "train"), ("2", "val")]
    for key in ("loss/cross_entropy_loss", "loss/energy_loss", "loss_weighted/energy_loss", "loss/total", "acc",
                "act_max/conv_in", "act_max/conv_rec", "seconds"):
        assert all(r[key] != "" for r in rows), key
    assert all(r["acc_last"] != "" for r in rows if r["split"] == "val")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["task"] == "temporal" and saved["epochs"] == 2 and saved["criterion"][1]["name"] == "energy_loss"
    jsonl = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(jsonl) == 2 and '"train/loss"' in jsonl[0] and '"val/loss"' in jsonl[0]
    image = matplotlib.image.imread(run_dir / "temporal_losses.png")
    assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0


def test_large_energy_weight_fires_rule_2(tmp_path, capsys):
    argv = ["--task=temporal", "--energy_weight=100", "--epochs=1", f"--out_dir={tmp_path}"]
    assert train_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "Weighted Energy (100)" in out
    assert re.search(r"^! warning sign \(epoch 1\): weighted energy .* > CrossEntropy .*dominates", out, re.MULTILINE)
    with open(tmp_path / "metrics.csv", newline="") as handle:
        train_row = next(csv.DictReader(handle))
    assert "dominates" in train_row["warnings"]


@pytest.mark.slow
def test_default_run(tmp_path, capsys):
    started = time.perf_counter()
    summary = run(build_train_config({"task": "temporal", "out_dir": str(tmp_path)}))
    seconds = time.perf_counter() - started
    out = capsys.readouterr().out
    table = table_of(out)
    assert len(table) == 32  # header, rule, 30 rows
    assert "! warning sign" not in out
    assert "energy share of the total loss" in out
    assert summary["val_acc"] >= 0.80
    assert summary["warning_signs"] == 0
    assert seconds < 120, f"default run took {seconds:.1f} s"
    for name in ("metrics.csv", "config.yaml", "temporal_losses.png", "metrics.jsonl"):
        assert (tmp_path / name).stat().st_size > 0
    print(f"default run: {seconds:.1f} s, val acc {summary['val_acc']:.3f}", file=sys.stderr)


# -- start-up check: a schedule that supervises nothing -----------------------------------------------------------


@pytest.mark.parametrize("pattern,steps,dt,reaction", [
    ("1000111000", 10, 2.0, 6.0),  # the seed's reaction example: k = 3 covers both chunks
    ("1000", 4, 2.0, 2.0),  # k = 1 covers the single one-step chunk
    ("1100", 8, 1.0, 4.0),  # stretched to 11110000: k = 4 covers the chunk
])
def test_no_supervised_timestep_is_a_startup_error(tmp_path, capsys, pattern, steps, dt, reaction):
    argv = ["--task=temporal", "--epochs=1", "--channels=4", f"--pattern={pattern}", f"--n_timesteps={steps}",
            f"--dt={dt}", f"--loss_reaction_time={reaction}", f"--tau={max(dt, 4.0)}"]
    assert train_cli.main([*argv, f"--out_dir={tmp_path / 'refused'}"]) == 2
    err = capsys.readouterr().err
    assert "no timestep has a label" in err and "--allow_no_supervision=True" in err
    assert not (tmp_path / "refused").exists()
    # the user can insist; the run then trains on the energy term alone
    assert train_cli.main([*argv, "--allow_no_supervision=True", f"--out_dir={tmp_path / 'allowed'}"]) == 0
    assert (tmp_path / "allowed" / "metrics.jsonl").is_file()


def test_a_schedule_with_labels_starts(tmp_path):
    out = run(build_train_config({"task": "temporal", "epochs": 1, "channels": 4, "pattern": "1000111000",
                                  "n_timesteps": 10, "dt": 2.0, "loss_reaction_time": 2.0,
                                  "out_dir": str(tmp_path)}))
    assert out["val_acc"] >= 0.0 and (tmp_path / "metrics.csv").is_file()


def test_each_warning_sign_is_printed_once(tmp_path, capfd):
    assert train_cli.main(["--task=temporal", "--energy_weight=100", "--epochs=1", "--channels=4",
                           f"--out_dir={tmp_path}"]) == 0
    captured = capfd.readouterr()
    lines = [ln for ln in (captured.out + captured.err).splitlines() if "warning sign" in ln]
    assert len(lines) == 1 and lines[0].startswith("! warning sign (epoch 1): weighted energy")
