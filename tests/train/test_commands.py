"""export (logits equal to the project model), sample, plot and compare on a tiny trained run."""

import csv
import re

import pytest
import torch

from losskit.cli import main as losskit
from losskit.train import lm
from losskit.train.export import load_run_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from losskit.config import load_config
    from losskit.train.tasks import build_train_config

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


@pytest.mark.parametrize("prompt", ["def f(x):\n    return", "The ", ""])
def test_exported_tokenizer_and_greedy_generation_match_losskit_sample(run_dir, tmp_path, prompt):
    """``tok(prompt)`` is what ``losskit sample`` feeds the model, and HF greedy decoding continues it alike."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from losskit.train.sample import generate_ids, sample_text
    from losskit.train.tokenizer import prompt_ids

    out = tmp_path / "hf"
    assert losskit(["export", str(run_dir), str(out)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    enc = tok(prompt, return_tensors="pt")
    assert enc.input_ids[0].tolist() == prompt_ids(prompt)
    generated = hf.generate(**enc, do_sample=False, max_new_tokens=12)[0, enc.input_ids.shape[1]:].tolist()
    ours = generate_ids(str(run_dir), prompt, max_new_tokens=12, temperature=0)
    assert generated == ours and len(ours) >= 1
    text = tok.decode(enc.input_ids[0].tolist() + generated, skip_special_tokens=True)
    assert text == sample_text(str(run_dir), prompt, max_new_tokens=12, temperature=0)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exported_files_get_normal_permissions(run_dir, tmp_path, umask):
    import os
    import stat

    old = os.umask(umask)
    try:
        assert losskit(["export", str(run_dir), str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    files = sorted((tmp_path / "hf").iterdir())
    assert "model.safetensors" in {f.name for f in files}
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name


def test_export_missing_checkpoint_is_an_error(tmp_path, capsys):
    assert losskit(["export", str(tmp_path), str(tmp_path / "x")]) == 2
    assert "ckpt.pt" in capsys.readouterr().err


def test_the_run_exporter_refuses_tinker_paths(tmp_path, capsys):
    """``train.export`` exports run directories only; ``losskit export`` sends tinker:// paths to the service's
    exporter (tests/service), so the train layer never reaches up into the service layer."""
    import inspect

    from losskit.contract import ConfigError
    from losskit.train import export

    with pytest.raises(ConfigError, match="exported by `losskit export`"):
        export.check_export_source("tinker://x/weights/y")
    export.check_export_source(str(tmp_path))  # a run directory passes the check
    out = tmp_path / "hf"
    assert export.main(["tinker://run-1/weights/final", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not by this run-directory exporter" in err and "'tinker://run-1/weights/final'" in err
    assert not out.exists()  # nothing written
    assert "losskit.service" not in inspect.getsource(export)


def test_sample(run_dir, capsys):
    from losskit.train.sample import generate_ids, sample_text
    from losskit.train.tokenizer import EOS_ID, decode

    argv = ["sample", str(run_dir), "--prompt", "The ", "--max_new_tokens", "12", "--temperature", "0"]
    assert losskit(argv) == 0
    first = capsys.readouterr().out
    assert losskit([*argv, "--seed", "7"]) == 0  # greedy: the same text again, whatever the seed
    assert capsys.readouterr().out == first
    ids = generate_ids(str(run_dir), "The ", max_new_tokens=12, temperature=0)
    continuation = decode(ids)
    assert continuation.strip()  # something was generated, not only the prompt
    assert len(ids) == 12 or ids[-1] == EOS_ID
    assert first == "The " + continuation + "\n" == sample_text(str(run_dir), "The ", max_new_tokens=12,
                                                               temperature=0) + "\n"
    assert generate_ids(str(run_dir), "The ", max_new_tokens=0) == []
    # sampling at a temperature is reproducible from its seed
    assert generate_ids(str(run_dir), "The ", max_new_tokens=8, temperature=1.0, seed=3) == \
        generate_ids(str(run_dir), "The ", max_new_tokens=8, temperature=1.0, seed=3)


@pytest.mark.parametrize("args,message", [
    (["--temperature", "-1"], "temperature must be >= 0"), (["--top_k", "0"], "top_k must be >= 1"),
    (["--max_new_tokens", "-2"], "max_new_tokens must be >= 0"),
])
def test_sample_rejects_bad_options(run_dir, capsys, args, message):
    assert losskit(["sample", str(run_dir), *args]) == 2
    assert message in capsys.readouterr().err


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
    # rounded to what is meaningful: losses to 4 decimals, whole tokens/s, seconds to 0.1 s
    table = (out / "compare.md").read_text().splitlines()
    assert table[0] == "| variant | final val/loss | best val/loss | tokens/s | wall s | run_dir |"
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert re.fullmatch(r"\d+\.\d{4}", cells[1]) and re.fullmatch(r"\d+\.\d{4}", cells[2])
        assert re.fullmatch(r"\d{1,3}(,\d{3})*", cells[3]) and re.fullmatch(r"\d+\.\d", cells[4]), cells
    assert all(re.fullmatch(r"\d+", r["tokens/s"]) and re.fullmatch(r"\d+\.\d", r["wall s"]) for r in rows)
    # a second compare into the same directory would replace the variants' runs: refused before training
    capsys.readouterr()
    assert losskit(["compare", *tiny_argv, "--max_iters=2", "--variant", "baseline", "--out_dir", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_compare_bad_variant_fails_before_training(tmp_path, capsys):
    code = losskit(["compare", "--variant", "a:max_iter=3", "--out_dir", str(tmp_path / "c")])
    assert code == 2 and "did you mean 'max_iters'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
