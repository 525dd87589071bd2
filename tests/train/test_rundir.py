"""Run directories: a new run never replaces an earlier one, latest, task folders, concurrent claims, make clean."""

import multiprocessing
import os
import pathlib
import shutil
import subprocess

import pytest

from losskit.cli import main as losskit
from losskit.contract import ConfigError
from losskit.train import rundir
from losskit.train.cli import main
from losskit.train.sinks import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_claims_are_numbered_and_latest_follows(tmp_path):
    folder = tmp_path / "out" / "lm"
    assert rundir.run_numbers(folder) == []
    for n in (1, 2, 3):
        assert rundir.claim_run_dir(folder) == folder / f"run-{n}"
        assert os.readlink(folder / "latest") == f"run-{n}"
    (folder / "run-7").mkdir()  # a gap: the next is one more than the highest
    assert rundir.claim_run_dir(folder).name == "run-8"
    (folder / "run-x").mkdir()
    (folder / "notes.txt").write_text("")
    assert rundir.run_numbers(folder) == [1, 2, 3, 7, 8]


def _claim_many(folder, start, count, queue):
    start.wait()
    queue.put([rundir.claim_run_dir(folder).name for _ in range(count)])


@pytest.mark.parametrize("processes,claims", [(4, 3), (8, 2)])
def test_concurrent_claims_never_share_a_directory(tmp_path, processes, claims):
    ctx = multiprocessing.get_context("fork")
    folder = tmp_path / "lm"
    start, queue = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_claim_many, args=(folder, start, claims, queue)) for _ in range(processes)]
    for w in workers:
        w.start()
    start.set()  # all start claiming at the same moment
    names = [n for _ in workers for n in queue.get(timeout=60)]
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    assert len(names) == len(set(names)) == processes * claims
    assert rundir.run_numbers(folder) == list(range(1, processes * claims + 1))
    assert os.readlink(folder / "latest") == f"run-{processes * claims}"


def test_default_runs_keep_each_other_and_resume_the_latest(in_tmp, tiny_argv, capsys):
    args = [*tiny_argv, "--eval_interval=100"]
    assert main([*args, "--max_iters=2"]) == 0
    first = in_tmp / "out" / "lm" / "run-1"
    before = (first / "ckpt.pt").read_bytes()
    assert main([*args, "--max_iters=1", "--target_smoothing_factor=0.2"]) == 0
    second = in_tmp / "out" / "lm" / "run-2"
    assert (first / "ckpt.pt").read_bytes() == before  # the earlier run's checkpoint is untouched
    assert rundir.find_run_dir(in_tmp / "out" / "lm") == second
    assert "out_dir: out/lm/run-2" in (second / "config.yaml").read_text()
    assert "run directory out/lm/run-2" in capsys.readouterr().out
    # resume without out_dir continues the latest run, in place
    assert main([*args, "--max_iters=3", "--init_from=resume"]) == 0
    assert [r["step"] for r in read_metrics(second) if "train/loss" in r] == [1, 2, 3]
    assert rundir.run_numbers(in_tmp / "out" / "lm") == [1, 2]
    # a task folder is accepted where a run directory is
    assert main([*args, "--max_iters=4", "--init_from=resume", f"--out_dir={in_tmp / 'out' / 'lm'}"]) == 0
    assert [r["step"] for r in read_metrics(second) if "train/loss" in r] == [1, 2, 3, 4]
    for command in (["sample", "out/lm", "--max_new_tokens", "3", "--temperature", "0"],
                    ["plot", "out/lm"], ["export", "out/lm", "hf"]):
        assert losskit(command) == 0, command
    assert (second / "curves.png").is_file() and (in_tmp / "hf" / "model.safetensors").is_file()


def test_explicit_out_dir_is_exactly_that_and_never_replaced(in_tmp, tiny_argv, capsys):
    run = in_tmp / "mine"
    assert main([*tiny_argv, "--max_iters=1", f"--out_dir={run}"]) == 0
    assert (run / "ckpt.pt").is_file() and not (in_tmp / "out").exists()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    # each task with keys of its own (the lm keys of tiny_argv are not the other tasks')
    for argv in ([*tiny_argv, "--max_iters=1"], ["--task=diffusion", "--max_iters=1"], ["--task=temporal"]):
        assert main([*argv, f"--out_dir={run}"]) == 2
        err = capsys.readouterr().err
        assert f"out_dir={str(run)!r} already holds a run" in err and "--init_from=resume" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.parametrize("argv,needle", [
    (["--init_from=resume"], "init_from='resume' needs a run to continue"),
    (["--init_from=resume", "--out_dir=nowhere"], "nowhere does not exist"),
    (["--init_from=resume", "--out_dir=empty"], "neither a run directory"),
    (["--task=diffusion", "--init_from=resume"], "not available with task='diffusion'"),
    (["--task=temporal", "--init_from=resume"], "not available with task='temporal'"),
])
def test_resume_errors_name_the_problem(in_tmp, capsys, argv, needle):
    (in_tmp / "empty").mkdir()
    assert main([*argv, "--device=cpu"]) == 2
    assert needle in capsys.readouterr().err
    assert not (in_tmp / "out").exists()


def test_find_run_dir_without_latest_link_takes_the_highest(tmp_path):
    for n in (2, 10, 3):
        (tmp_path / f"run-{n}").mkdir()
    assert rundir.find_run_dir(tmp_path) == tmp_path / "run-10"
    (tmp_path / "run-3" / "metrics.jsonl").write_text("")
    assert rundir.find_run_dir(tmp_path / "run-3") == tmp_path / "run-3"
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        rundir.find_run_dir(tmp_path / "run-2")
    with pytest.raises(ConfigError, match="already holds a run"):
        rundir.resolve_out_dir("lm", str(tmp_path / "run-3"), "scratch")


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_clean_removes_what_the_makefile_creates(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    created = [".venv/bin", "out/lm/run-1", "bench_results", ".pytest_cache", ".ruff_cache", ".hypothesis",
               "src/losskit.egg-info", "src/losskit/__pycache__", "tests/__pycache__"]
    for d in created:
        (tmp_path / d).mkdir(parents=True)
    kept = ["src/losskit/__init__.py", "README.md", "config/x.py", "data/custom_text/a.txt"]
    for f in kept:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("keep")
    subprocess.run(["make", "clean"], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    assert [d for d in created if (tmp_path / d).exists()] == []
    assert all((tmp_path / f).read_text() == "keep" for f in kept)


def test_compare_defaults_to_a_new_numbered_directory(tmp_path, tiny_argv, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for n in (1, 2):
        assert losskit(["compare", *tiny_argv, "--max_iters=1", "--variant", "a"]) == 0
        assert (tmp_path / "out" / "compare" / f"run-{n}" / "a" / "metrics.jsonl").is_file()
    assert losskit(["compare", "--variant", "a:task=temporal", "--variant", "b"]) == 2
    assert "--variant runs must share one task" in capsys.readouterr().err
    assert rundir.run_numbers(tmp_path / "out" / "compare") == [1, 2]  # refused before claiming a directory
