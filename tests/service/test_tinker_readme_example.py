"""The README's Tinker SDK example, extracted from README.md and run as written (only the port changes) against a
real ``losskit serve`` on 127.0.0.1 with a random port."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.service.conftest import served_url

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
DEFAULT_URL = "http://127.0.0.1:8000"


def readme_example() -> str:
    """The python block of the README's "Tinker SDK" section."""
    text = README.read_text()
    section = text.split("\n## Tinker SDK\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the Tinker SDK section has one python example"
    return blocks[0]


def test_the_example_is_short_and_uses_only_the_sdk():
    code = readme_example()
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) <= 10, lines
    assert DEFAULT_URL in code and "losskit" not in code.replace("losskit/tiny-lm", "")


@pytest.mark.slow
def test_the_readme_example_runs_against_losskit_serve(hf_home, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOSSKIT_", "TINKER_"))}
    env.update(HF_HOME=str(hf_home), PYTHONUNBUFFERED="1", TINKER_TELEMETRY="0")
    cmd = [sys.executable, "-m", "losskit", "serve", "--port", "0", "--state-dir", str(tmp_path / "state"),
           "--cpu-threads", "1"]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, lines = served_url(server, 120)
        assert url and url.startswith("http://127.0.0.1:"), "".join(lines)
        code = readme_example().replace(DEFAULT_URL, url)
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    finally:
        server.terminate()
        server.wait(60)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout.splitlines()
    losses = [float(line.split()[1]) for line in out[:5]]
    assert [int(line.split()[0]) for line in out[:5]] == list(range(5))
    assert len(out) == 5 and losses[-1] < losses[0]  # it learns
