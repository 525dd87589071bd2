"""`losskit bench --help` advertises only the implementations this installation can run."""

import pytest

from losskit.bench import cli
from losskit.kernels import dispatch


@pytest.mark.parametrize("available", [False, True])
def test_help_names_triton_only_where_it_imports(monkeypatch, available):
    monkeypatch.setattr(dispatch, "triton_available", lambda: available)
    text = cli.build_parser().format_help()
    assert "torch/chunked" in text
    assert ("triton" in text) is available
    assert "spec" not in text and "docs/losses.md" in text.replace("\n", "")
