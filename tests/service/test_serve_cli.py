"""``losskit serve`` as a command: fresh offline start, refusals (exit 2), the SDK pin, --help, flag sources."""

import hashlib
import os
import signal
import subprocess
import sys

import httpx
import pytest

from losskit.cli import main
from losskit.contract import ConfigError
from losskit.service.settings import FLAGS, build_settings, make_parser, make_settings
from tests.service.conftest import served_url


def _env(tmp_path, fake_tinker: str | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LOSSKIT_", "TRANSFORMERS_"))}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache
    env["PYTHONUNBUFFERED"] = "1"
    if fake_tinker:
        site = tmp_path / "fake_site"
        dist = site / f"tinker-{fake_tinker}.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tinker\nVersion: {fake_tinker}\n")
        env["PYTHONPATH"] = str(site) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _serve(args, env, timeout=120):
    return subprocess.run([sys.executable, "-m", "losskit", "serve", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_non_loopback_without_a_key_exits_2(tmp_path):
    result = _serve(["--host", "0.0.0.0", "--no-tinker-surface"], _env(tmp_path))
    assert result.returncode == 2
    assert "--api-key" in result.stderr and "--allow-unauthenticated" in result.stderr


def test_bad_flags_exit_2(capsys):
    from losskit.service.cli import main as serve_main

    assert serve_main(["--workers", "2"]) == 2 and "--workers must be 1" in capsys.readouterr().err
    assert serve_main(["--model", "no-equals-sign"]) == 2 and "NAME=DIR" in capsys.readouterr().err
    assert serve_main(["--host", "10.1.2.3", "--no-tinker-surface"]) == 2
    assert serve_main(["--port", "-1"]) == 2 and "--port" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        serve_main(["--dtype", "float8"])
    assert info.value.code == 2


def test_a_tinker_version_outside_the_pin_exits_2_naming_both(tmp_path):
    result = _serve(["--prepare-only"], _env(tmp_path, fake_tinker="0.39.0"))
    assert result.returncode == 2
    assert "0.39.0" in result.stderr and ">=0.38,<0.39" in result.stderr
    assert "--tinker-version-check warn" in result.stderr


@pytest.mark.slow
def test_fresh_offline_start_materialises_the_tiny_model_and_serves(tmp_path):
    env = _env(tmp_path, fake_tinker="0.39.0")
    cmd = [sys.executable, "-m", "losskit", "serve", "--port", "0", "--tinker-version-check", "warn",
           "--state-dir", str(tmp_path / "state")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, lines = served_url(proc, 180)
        assert url, "".join(lines)
        banner = [proc.stdout.readline() for _ in range(6)]
        text = "".join(banner)
        assert "surfaces:" in text and "losskit/tiny-lm" in text and "pickled code: disabled" in text
        assert "MISMATCH" in text
        assert any("0.39.0" in line for line in lines)  # the warning names the installed version
        assert httpx.get(url + "/healthz").json()["status"] == "ok"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    check = (
        "import os; os.environ['HF_HUB_OFFLINE'] = '1'\n"
        "from transformers import AutoTokenizer, AutoModelForCausalLM\n"
        "tok = AutoTokenizer.from_pretrained('losskit/tiny-lm')\n"
        "model = AutoModelForCausalLM.from_pretrained('losskit/tiny-lm', local_files_only=True)\n"
        "print(tok.eos_token_id, sum(p.numel() for p in model.parameters()), model.config.tie_word_embeddings)\n"
    )
    out = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["258", "126272", "False"]
    repo = tmp_path / "hf" / "hub" / "models--losskit--tiny-lm"
    assert (repo / "refs" / "main").read_text() in {p.name for p in (repo / "snapshots").iterdir()}


def test_the_tiny_model_is_byte_identical_when_regenerated(tmp_path):
    from losskit.service.models import write_tiny_lm

    a = write_tiny_lm(tmp_path / "a")
    b = write_tiny_lm(tmp_path / "b")
    assert a == b and set(a) >= {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    for name, digest in a.items():
        assert hashlib.sha256((tmp_path / "a" / name).read_bytes()).hexdigest() == digest


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in FLAGS:
        assert "--" + flag.name.replace("_", "-") in out, flag.name
    assert "LOSSKIT_" in out and "--config" in out
    parser = make_parser()
    helps = {a.dest: a.help for a in parser._actions}
    assert all(helps[f.name] for f in FLAGS)


def test_flags_from_environment_and_config_file(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("max_tokens_per_step: 512\nlong_poll_s: 3\n")
    args = make_parser().parse_args(["--config", str(config), "--long-poll-s", "2"])
    s = build_settings(args, env={"LOSSKIT_MAX_MODELS": "7", "LOSSKIT_API_KEY": "tml-a,tml-b",
                                  "LOSSKIT_ALLOW_PICKLED_CODE": "true"})
    assert s.max_tokens_per_step == 512 and s.long_poll_s == 2.0 and s.max_models == 7
    assert s.api_keys == ("tml-a", "tml-b") and s.allow_pickled_code is True
    config.write_text("max_tokens_per_stpe: 5\n")
    with pytest.raises(ConfigError, match="did you mean 'max_tokens_per_step'"):
        build_settings(make_parser().parse_args(["--config", str(config)]), env={})
    with pytest.raises(ConfigError, match="must be >= 1"):
        make_settings(max_models=0)
    keys = tmp_path / "keys"
    keys.write_text("# comment\ntml-x\n\ntml-y\n")
    assert make_settings(api_keys_file=str(keys)).api_keys == ("tml-x", "tml-y")


def test_top_level_help_lists_serve(capsys):
    assert main(["--help"]) == 0
    assert "serve" in capsys.readouterr().out
