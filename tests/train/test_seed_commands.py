"""Every command line of seed 000 (Loss Modifiers System) works verbatim.

The command lines below are those of the seed's bash blocks (backslash continuations joined), which ship with
the tests verbatim in ``data/seed_000_commands.txt``, so this module runs in any clone. Each runs
through the `train.py` shim's entry point with tiny-model, few-iteration overrides appended (later overrides
win, so the seed's own keys are untouched), in a directory that has the repository's `config/` and a
`data/custom_text/` folder (the seed's `--dataset=custom_text` means the user's own text).
"""

import pathlib
import shlex
import subprocess
import sys

import pytest

from losskit.train.cli import main
from losskit.train.sinks import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[2]
SEED_EXCERPT = pathlib.Path(__file__).resolve().parent / "data" / "seed_000_commands.txt"

SEED_COMMANDS = [
    "python train.py",
    "python train.py --loss_modifiers_enabled=True --target_smoothing_enabled=True --target_smoothing_factor=0.1",
    "python train.py --loss_modifiers_enabled=True --entropy_modifier_enabled=True",
    ("python train.py --loss_modifiers_enabled=True "
    "--target_smoothing_enabled=True --target_smoothing_factor=0.1 "
    "--entropy_modifier_enabled=True --entropy_modifier_weight=1.2 "
    "--mask_ratio_weight_enabled=True"),
    ("python train.py --loss_modifiers_enabled=True --entropy_modifier_enabled=True --entropy_modifier_weight=1.5 "
    "--target_smoothing_enabled=True --target_smoothing_factor=0.15"),
    "python train.py config/loss_modifiers.py",
    ("python train.py --dataset=custom_text --loss_modifiers_enabled=True --target_smoothing_enabled=True "
    "--target_smoothing_factor=0.1"),
    ("python train.py --loss_modifiers_enabled=True --entropy_modifier_enabled=True "
    "--entropy_modifier_use_for_weighting=True --entropy_modifier_threshold=0.2"),
    ("python train.py --loss_modifiers_enabled=True --mask_ratio_weight_enabled=True --mask_ratio_weight_power=0.5 "
    "--mask_ratio_weight_max=5.0"),
]

EXPECTED_MODIFIERS = [
    [], ["TargetSmoothing"], ["Entropy"], ["Entropy", "TargetSmoothing", "MaskRatioWeight"],
    ["Entropy", "TargetSmoothing"], ["Entropy", "TargetSmoothing"], ["TargetSmoothing"], ["Entropy"],
    ["MaskRatioWeight"],
]


def _seed_command_lines(text: str) -> list[str]:
    lines, out, in_bash = text.splitlines(), [], False
    buf = ""
    for line in lines:
        if line.startswith("```"):
            in_bash = line.strip() == "```bash"
            continue
        if not in_bash or line.strip().startswith("#") or not line.strip():
            continue
        buf += line.strip().rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            out.append(" ".join(buf.split("#")[0].split()))
            buf = ""
    return out


def test_the_list_is_the_seed():
    text = SEED_EXCERPT.read_text()
    inline = "python train.py config/loss_modifiers.py"  # given in running text, not in a bash block
    assert f"`{inline}`" in text
    assert sorted(set(_seed_command_lines(text)) | {inline}) == sorted(set(SEED_COMMANDS))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "config").symlink_to(REPO / "config")
    custom = tmp_path / "data" / "custom_text"
    custom.mkdir(parents=True)
    (custom / "notes.txt").write_text("\n\n".join(f"My own text, paragraph {i}. " * 12 for i in range(60)))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("k", range(len(SEED_COMMANDS)), ids=lambda k: SEED_COMMANDS[k][16:60] or "default")
def test_seed_command_line(workdir, capsys, tiny_argv, k):
    argv = shlex.split(SEED_COMMANDS[k])[2:]
    assert main(argv + tiny_argv + ["--max_iters=2", "--out_dir=run"]) == 0
    out = capsys.readouterr().out
    names = [f"{m}Modifier" for m in EXPECTED_MODIFIERS[k]]
    if names:
        assert f"Enabled loss modifiers: {', '.join(names)}" in out
    else:
        assert "Enabled loss modifiers" not in out
    rows = read_metrics(workdir / "run")
    assert any("val/loss" in r for r in rows) and any("train/loss" in r for r in rows)
    if "custom_text" in SEED_COMMANDS[k]:
        assert "data/custom_text" in out


@pytest.mark.slow
def test_train_py_shim_runs_verbatim_as_a_process(workdir, tiny_argv):
    # the shim is the same command as `losskit train`; run it as the seed does, from the repository root
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "config/loss_modifiers.py", *tiny_argv, "--max_iters=1",
         f"--out_dir={workdir / 'shim'}"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Enabled loss modifiers: EntropyModifier, TargetSmoothingModifier" in proc.stdout
    assert (workdir / "shim" / "config.yaml").is_file()
    help_ = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True,
                           timeout=120)
    assert help_.returncode == 0 and "--target_smoothing_special_tokens=" in help_.stdout
