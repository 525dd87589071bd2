"""benchmarks/bench_service.py runs end to end on tiny settings and reports both figures."""

import csv

import pytest

from losskit.bench.service import _percentile, main


def test_percentile():
    assert _percentile([5, 1, 3], 0.5) == 3 and _percentile(list(range(101)), 0.99) == 99


@pytest.mark.slow
def test_bench_service_smoke(hf_home, tmp_path, capsys):
    out = tmp_path / "service.csv"
    assert main(["--reps", "2", "--clients", "2", "--steps", "2", "--csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert "HTTP overhead vs device work" in text and "load: requests per second" in text
    rows = {r["metric"]: r for r in csv.DictReader(out.open())}
    assert rows["load: lost results"]["value"] == "0" and rows["load: crossed results"]["value"] == "0"
    assert float(rows["forward_backward over HTTP (median)"]["value"]) > 0
