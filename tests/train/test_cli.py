"""`losskit train` (train/cli.py): --help per task, exit status 2 and nothing written for bad input."""

import dataclasses

import pytest

from losskit.train.cli import help_text, main
from losskit.train.tasks import TASKS


def _default(f):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def test_help_documents_every_key(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == help_text("lm")
    for key in TASKS["lm"].fields():
        assert f"--{key}=" in out
    for task, spec in TASKS.items():
        text = help_text(task)
        assert all(f"--{k}=" in text for k in spec.fields())
        assert main([f"--task={task}", "--help"]) == 0 and capsys.readouterr().out.strip() == text


@pytest.mark.parametrize("task", sorted(TASKS))
def test_help_lists_each_key_once_with_the_task_default_under_who_reads_it(task):
    """``--task=NAME --help`` shows NAME's keys only, with NAME's defaults, grouped by the tasks that read them."""
    text = help_text(task)
    lines = text.splitlines()
    keys = [ln.split("=", 1)[0].strip()[2:] for ln in lines if ln.startswith("  --")]
    assert keys == [k for _, group in _groups(text) for k in group]
    assert sorted(keys) == sorted(TASKS[task].fields())  # each key once, no key of another task
    for name, f in TASKS[task].fields().items():
        assert any(ln.startswith(f"  --{name}={_default(f)!r}") for ln in lines), name
    for title, group in _groups(text):
        readers = {t for t, spec in TASKS.items() if all(k in spec.fields() for k in group)}
        if title.startswith("keys of every task"):
            assert readers == set(TASKS)
        elif title.startswith(f"keys of task '{task}' only"):
            assert readers == {task}
        elif title.startswith("keys of tasks"):
            assert len(readers) == 2 and all(f"'{t}'" in title for t in readers)
        else:
            assert title.startswith(f"loss-modifier keys of task '{task}'"), title
            assert all(TASKS[task].fields()[k].metadata.get("modifier") for k in group)
    assert (task == "temporal") == (not any(t.startswith("loss-modifier") for t, _ in _groups(text)))


def _groups(text):
    """``[(title, [key, ...])]`` of the help's key sections: blocks between blank lines with ``  --key=`` lines."""
    out = []
    for block in text.split("\n\n"):
        lines = block.splitlines()
        keys = [ln.split("=", 1)[0].strip()[2:] for ln in lines if ln.startswith("  --")]
        if keys:
            out.append((" ".join(ln for ln in lines if not ln.startswith(" ")), keys))
    return out


@pytest.mark.parametrize("argv,needle", [
    (["missing_config.py"], "not found"),
    (["BAD_PY"], "not valid Python"),
    (["--max_iter=3"], "did you mean 'max_iters'"),
    (["--data=DATA", "--block_size=100000"], "block_size must be at most"),
    (["--data=LATIN1"], "not UTF-8"),
    (["--data=EMPTY"], "is empty"),
    (["--target_smoothing_factor=2"], "target_smoothing_factor"),
    (["--init_from=resume"], "needs a run to continue"),
    # keys the selected task does not read: an error before anything runs (new with task-owned configs)
    (["--task=temporal", "--init_from=resume", "--compile=True"], "init_from is not available with task='temporal'"),
    (["--task=temporal", "--compile=True"], "compile is not available with task='temporal': only task 'lm' reads it"),
    (["--task=diffusion", "--entropy_modifier_enabled=True"], ("entropy_modifier_enabled is not available with "
                                                              "task='diffusion'")),
])
def test_bad_input_fails_before_anything_is_written(tmp_path, capsys, argv, needle):
    bad_py = tmp_path / "bad.py"
    bad_py.write_text("x = = 1\n")
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join("some words " * 40 for _ in range(30)))
    (tmp_path / "l1.txt").write_bytes(b"caf\xe9 " * 100)
    (tmp_path / "empty.txt").write_text("")
    subst = {"BAD_PY": str(bad_py), "--data=DATA": f"--data={data}", "--data=LATIN1": f"--data={tmp_path / 'l1.txt'}",
             "--data=EMPTY": f"--data={tmp_path / 'empty.txt'}"}
    run_dir = tmp_path / "run"
    code = main([subst.get(a, a) for a in argv] + [f"--out_dir={run_dir}", "--device=cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("losskit train: error: ") and len(err.strip().splitlines()) == 1
    assert not run_dir.exists()
