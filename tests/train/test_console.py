"""What a user sees on the console: no progress bar when output is redirected, tqdm on a terminal, tables and help
that fit the terminal's width."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

LM = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=32", "--batch_size=4", "--eval_iters=2",
      "--log_interval=1", "--device=cpu", "--max_iters=3"]
TASKS = {
    "lm": LM,
    "diffusion": ["--task=diffusion", "--model_width=32", "--model_depth=1", "--sample_steps=2", "--max_iters=4",
                  "--log_interval=2", "--eval_interval=4"],
    "temporal": ["--task=temporal", "--epochs=1", "--channels=4"],
}
EXPECTED = {"lm": "step 3: train/loss", "diffusion": "step 4: train/loss", "temporal": "Epoch | CrossEntropy"}


def _command(tmp_path, task):
    return [sys.executable, "-m", "losskit", "train", *TASKS[task], f"--out_dir={tmp_path / task}"]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_redirected_output_has_no_carriage_returns(tmp_path, task):
    proc = subprocess.run(_command(tmp_path, task), capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    assert EXPECTED[task] in proc.stdout
    assert max(len(line) for line in proc.stdout.splitlines()) < 400  # periodic lines, not one redrawn line


def test_a_terminal_gets_a_tqdm_bar(tmp_path):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen(_command(tmp_path, "lm"), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=300) == 0
    text = b"".join(chunks).decode("utf-8", "replace")
    assert "train:" in text and "| 3/3 [" in text  # tqdm's bar (the pty turns every newline into \r\n)
    assert "step 3: train/loss" in text


@pytest.mark.parametrize("width", [40, 72, 100, 132, 220])
def test_modifier_table_fits_the_terminal(width):
    from losskit.modifiers import MODIFIER_CONFIG_KEYS
    from losskit.modifiers.cli import keys_table

    text = keys_table(width)
    assert max(len(line) for line in text.splitlines()) <= width
    words = text.split()
    for spec in MODIFIER_CONFIG_KEYS.values():
        assert spec.name in words
        assert all(w in words for w in spec.help.split()), spec.name  # every word of the meaning is kept


def _on_terminal(command, columns):
    """stdout of ``python -m losskit COMMAND`` run on a pseudo-terminal ``columns`` wide."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen([sys.executable, "-m", "losskit", *command], stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=subprocess.DEVNULL, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=120) == 0
    return b"".join(chunks).decode().replace("\r\n", "\n")


@pytest.mark.parametrize("columns", [60, 100, 180])
def test_modifier_table_follows_the_terminal_and_pipes_keep_one_line_per_key(columns):
    from losskit.modifiers import MODIFIER_CONFIG_KEYS

    text = _on_terminal(["modifiers"], columns)
    assert max(len(line) for line in text.splitlines()) <= columns
    assert all(key in text.split() for key in MODIFIER_CONFIG_KEYS)
    piped = subprocess.run([sys.executable, "-m", "losskit", "modifiers"], capture_output=True, text=True,
                           timeout=120, check=True).stdout
    rows = {line.split()[0]: line for line in piped.splitlines() if line.strip()}
    assert all(MODIFIER_CONFIG_KEYS[k].help in rows[k] for k in MODIFIER_CONFIG_KEYS)


@pytest.mark.parametrize("columns", ["60", "100", "180"])
def test_train_help_follows_columns(columns):
    env = {**os.environ, "COLUMNS": columns}
    for command in (["train", "--help"], ["train", "--task=diffusion", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "losskit", *command], capture_output=True, text=True,
                              timeout=120, env=env, check=True)
        widest = max(len(line) for line in proc.stdout.splitlines())
        # the usage lines and a long --key=default standing alone on its line are not wrapped
        assert widest <= max(int(columns), 100), (command, widest)
