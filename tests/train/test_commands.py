"""export (logits equal to the project model), sample, plot and compare on a tiny trained run."""

import csv

import pytest
import torch

from losskit.cli import main as losskit
from losskit.train import lm
from losskit.train.export import load_run_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from losskit.config import build_train_config, load_config

    tiny = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=32", "--batch_size=4", "--eval_iters=2",
            "--log_interval=1", "--device=cpu"]
    tmp = tmp_path_factory.mktemp("cmd")
    cfg = build_train_config(load_config([*tiny, "--max_iters=3", f"--out_dir={tmp / 'run'}",
                                          "--loss_modifiers_enabled=True", "--mask_ratio_weight_enabled=True"]))
    lm.run(cfg, progress=False)
    return tmp / "run"


def test_export_logits_equal_the_project_model(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    assert losskit(["export", str(run_dir), str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ours, _ = load_run_model(run_dir)
    ids = torch.tensor([[257] + tok("def f(x):\n    return x")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
    assert hf.config.vocab_size == 264 and hf.config.tie_word_embeddings is False
    assert hf.config.attention_bias is False and hf.config.mlp_bias is False


def test_export_missing_checkpoint_is_an_error(tmp_path, capsys):
    assert losskit(["export", str(tmp_path), str(tmp_path / "x")]) == 2
    assert "ckpt.pt" in capsys.readouterr().err


def test_export_tinker_path_says_the_service_is_not_included(tmp_path, capsys):
    import inspect

    from losskit.contract import ConfigError
    from losskit.train import export

    out = tmp_path / "hf"
    assert losskit(["export", "tinker://run-1/weights/final", str(out), "--merge"]) == 2
    err = capsys.readouterr().err
    assert "tinker:// checkpoints are exported by the training service (losskit serve)" in err
    assert "export a run directory instead" in err and "'tinker://run-1/weights/final'" in err
    assert not out.exists()  # nothing written
    with pytest.raises(ConfigError, match="this version does not include"):
        export.check_export_source("tinker://x/weights/y")
    export.check_export_source(str(tmp_path))  # a run directory passes the check
    # the train layer never reaches up into the service layer, not even through importlib
    assert "losskit.service" not in inspect.getsource(export)


def test_sample(run_dir, capsys):
    assert losskit(["sample", str(run_dir), "--prompt", "The ", "--max_new_tokens", "12", "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("The ")


def test_plot_writes_png(run_dir, tmp_path):
    out = tmp_path / "curves.png"
    assert losskit(["plot", str(run_dir), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from losskit.train.plot import plot_runs  # the same figure without the CLI: series present

    assert plot_runs([str(run_dir)], tmp_path / "again.png").stat().st_size > 1000


def test_compare_table_and_png(tmp_path, tiny_argv, capsys):
    out = tmp_path / "cmp"
    code = losskit(["compare", *tiny_argv, "--max_iters=2", "--variant", "baseline",
                    "--variant", ("smooth:loss_modifiers_enabled=True;target_smoothing_enabled=True;"
                    "target_smoothing_special_tokens=0,1,2"), "--out_dir", str(out)])
    assert code == 0
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [r["variant"] for r in rows] == ["baseline", "smooth"]
    assert all(float(r["final val/loss"]) > 0 and float(r["best val/loss"]) > 0 for r in rows)
    # same data, seed and weights at step 0: the first val/loss is identical
    from losskit.train.sinks import read_metrics, series

    first = [series(read_metrics(out / n), "val/loss")[1][0] for n in ("baseline", "smooth")]
    assert first[0] == first[1]
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "| smooth |" in (out / "compare.md").read_text()


def test_compare_bad_variant_fails_before_training(tmp_path, capsys):
    code = losskit(["compare", "--variant", "a:max_iter=3", "--out_dir", str(tmp_path / "c")])
    assert code == 2 and "did you mean 'max_iters'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
