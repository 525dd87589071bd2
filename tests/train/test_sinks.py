"""Metric sinks of `losskit train`: JSONL, TensorBoard, W&B (offline, no network) and the console line.

Each trained run is the tiny lm config of conftest.py for a few iterations; the sinks must all receive the
same rows: ``train/loss``, ``train/loss_raw``, ``val/loss`` and, with a modifier enabled, its
``loss_modifiers/...`` metrics.
"""

import json
import math
import pathlib
import time

import pytest

from losskit.contract import ConfigError
from losskit.train import lm, sinks
from losskit.train.sinks import JSONLSink, Sinks, open_sinks, read_metrics, series

MASK_RATIO = ["--loss_modifiers_enabled=True", "--mask_ratio_weight_enabled=True"]
MODIFIER_KEY = "loss_modifiers/MaskRatioWeightModifier.mean_weight"
ENTROPY_KEY = "loss_modifiers/EntropyModifier.mean_entropy"


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B in offline mode with every W&B directory inside tmp_path (no network, nothing in $HOME)."""
    pytest.importorskip("wandb")
    home = tmp_path / "wandb_home"
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return home


# ------------------------------------------------------------------------------------------------------------
# Readers for what the sinks wrote
# ------------------------------------------------------------------------------------------------------------


def read_wandb_records(path: pathlib.Path) -> list:
    """The protobuf records of an offline W&B run file (``run-*.wandb``).

    The file is W&B's record log: a 7-byte header (``:W&B``, a 2-byte ident, a version byte), then 32 KiB
    blocks (counted from the start of the file) of records, each a 7-byte header (CRC-32: 4 bytes; length:
    2 bytes little-endian; kind: 1 byte, 1 = full, 2 = first, 3 = middle, 4 = last fragment) and the payload,
    a serialized ``wandb_internal_pb2.Record``. A block tail shorter than a record header is padding.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} does not start with the W&B record-log magic: {data[:7]!r}"
    block, head = 32768, 7
    pos, pending, records = head, b"", []
    while pos + head <= len(data):
        left = block - pos % block
        if left < head:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        assert kind in (1, 2, 3, 4), f"unexpected record kind {kind} at offset {pos} of {path}"
        pending += data[pos + head : pos + head + length]
        pos += head + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def finished_wandb_records(path: pathlib.Path, timeout_s: float = 60.0) -> list:
    """The records of an offline run file once W&B has written its ``exit`` record.

    ``run.finish()`` returns when W&B's service has taken the run's end, and that service process writes the file
    on its own schedule: read right away on a loaded machine, the file can still lack its history (seen in CI). A
    partly written file is read again until the ``exit`` record is there, for at most ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        from google.protobuf.message import DecodeError

        try:
            records = read_wandb_records(path)
        except (AssertionError, DecodeError):  # a record still being written (truncated header or payload)
            records = []
        if any(rec.WhichOneof("record_type") == "exit" for rec in records):
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout_s:.0f} s"
        time.sleep(0.2)


def wandb_history(records) -> dict[int, dict]:
    """``{step: {key: value}}`` of the history records, W&B's own ``_``-keys dropped."""
    rows: dict[int, dict] = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            row = rows.setdefault(rec.history.step.num, {})
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    row[key] = json.loads(item.value_json)
    return rows


def wandb_config(records) -> dict:
    """The run config: the run record's initial config, then any config-update records."""
    out = {}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        updates = rec.run.config.update if kind == "run" else rec.config.update if kind == "config" else ()
        for item in updates:
            out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def tensorboard_scalars(log_dir: pathlib.Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of every scalar in the event files under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def jsonl_by_step(rows: list[dict]) -> dict[int, dict]:
    """JSONL rows merged per step (a step can have a train row and a val row)."""
    out: dict[int, dict] = {}
    for r in rows:
        out.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k != "step"})
    return out


# ------------------------------------------------------------------------------------------------------------
# End to end: one tiny run into every sink
# ------------------------------------------------------------------------------------------------------------


def test_tensorboard_and_wandb_offline_receive_the_jsonl_series(tmp_path, tiny_config, wandb_offline):
    pytest.importorskip("tensorboard")
    cfg = tiny_config(tmp_path, *MASK_RATIO, "--tensorboard_log=True", "--wandb_log=True",
                      "--wandb_project=sinks-test", "--wandb_run_name=tiny", iters=3)
    lm.run(cfg, progress=False)
    run = tmp_path / "run"
    expected = jsonl_by_step(read_metrics(run))
    assert sorted(expected) == [0, 1, 2, 3]  # train rows 0..2, val at 0 (start) and 3 (end)
    keys = set().union(*expected.values())
    for key in ("train/loss", "train/loss_raw", "val/loss", "train/lr", MODIFIER_KEY):
        assert key in keys, key

    # TensorBoard: the same tags, steps and (float32) values as the JSONL
    tb = tensorboard_scalars(run / "tensorboard")
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert set(tb) == keys
    for key in keys:
        want = {s: row[key] for s, row in expected.items() if key in row}
        assert tb[key].keys() == want.keys(), key
        for s, v in want.items():
            assert tb[key][s] == pytest.approx(v, rel=1e-6, abs=1e-6), (key, s)

    # W&B: one offline run inside the run directory (WANDB_DIR is unset), history equal to the JSONL
    (wb_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    records = finished_wandb_records(wb_file)
    assert {r.WhichOneof("record_type") for r in records} >= {"run", "history"}
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run_record.project, run_record.display_name) == ("sinks-test", "tiny")
    config = wandb_config(records)
    assert config["max_iters"] == 3 and config["mask_ratio_weight_enabled"] is True
    history = wandb_history(records)
    assert history.keys() == expected.keys()
    for step, row in expected.items():
        assert history[step] == pytest.approx(row, rel=1e-12), step


def test_wandb_run_goes_under_wandb_dir_when_set(tmp_path, tiny_config, wandb_offline, monkeypatch):
    wandb_dir = tmp_path / "elsewhere"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    lm.run(tiny_config(tmp_path, "--wandb_log=True", "--eval_interval=100", iters=1), progress=False)
    (wb_file,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    history = wandb_history(finished_wandb_records(wb_file))
    assert set(history) == {0, 1} and "val/loss" in history[0] and {"train/loss", "val/loss"} <= set(history[1])
    assert not (tmp_path / "run" / "wandb").exists()
    assert not (tmp_path / "run" / "tensorboard").exists()  # tensorboard_log defaults to False


def test_console_line_every_log_interval(tmp_path, tiny_config, capsys):
    lm.run(tiny_config(tmp_path, *MASK_RATIO, "--log_interval=2", "--eval_interval=4", iters=5), progress=False)
    lines = capsys.readouterr().out.splitlines()
    iters = [ln for ln in lines if ln.startswith("step ") and "train/loss" in ln]
    # every log_interval completed steps, and the last step; both losses under their logged names
    assert [ln.split(":")[0] for ln in iters] == ["step 2", "step 4", "step 5"]
    rows = jsonl_by_step(read_metrics(tmp_path / "run"))
    for ln in iters:
        step = int(ln.split(":")[0].split()[1])
        assert (f"train/loss {rows[step]['train/loss']:.4f} (modified), "
                f"train/loss_raw {rows[step]['train/loss_raw']:.4f} (plain CE)") in ln
        assert ln.endswith(" tok/s") and len(ln) < 110  # compact: one short line
    vals = [ln for ln in lines if ln.startswith("step ") and "val/loss" in ln]
    assert [ln.split(":")[0] for ln in vals] == ["step 0", "step 4", "step 5"]
    assert f"val/loss {rows[4]['val/loss']:.4f}" in vals[1]


def test_jsonl_rows_average_modifier_metrics_over_the_log_interval(tmp_path, tiny_config, monkeypatch):
    """With log_interval=2 the logged modifier metric is the mean of the two steps' values."""
    seen = []
    orig = lm.PipelineLoss.metrics

    def spy(self):
        m = orig(self)
        seen.append(float(m[ENTROPY_KEY]))
        return m

    monkeypatch.setattr(lm.PipelineLoss, "metrics", spy)
    lm.run(tiny_config(tmp_path, "--loss_modifiers_enabled=True", "--entropy_modifier_enabled=True",
                       "--log_interval=2", "--eval_interval=100", iters=4), progress=False)
    steps, values = series(read_metrics(tmp_path / "run"), ENTROPY_KEY)
    assert steps == [2, 4] and len(seen) == 4
    assert values == pytest.approx([(seen[0] + seen[1]) / 2, (seen[2] + seen[3]) / 2], rel=1e-12)
    assert len(set(seen)) == 4  # every step differs, so the average is not a constant


# ------------------------------------------------------------------------------------------------------------
# The sink classes
# ------------------------------------------------------------------------------------------------------------


def test_jsonl_sink_rows_nonfinite_as_null_and_append(tmp_path):
    s = JSONLSink(tmp_path)
    s.log(0, {"train/loss": 1.5, "n": 3, "bad": math.nan, "big": math.inf})
    s.log(1, {"val/loss": 2.0})
    s.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln) for ln in lines] == [
        {"step": 0, "train/loss": 1.5, "n": 3, "bad": None, "big": None},
        {"step": 1, "val/loss": 2.0},
    ]
    assert "NaN" not in lines[0] and "Infinity" not in lines[0]  # strict JSON
    assert series(read_metrics(tmp_path), "bad") == ([], [])
    assert series(read_metrics(tmp_path), "train/loss") == ([0], [1.5])
    s = JSONLSink(tmp_path, append=True)  # resume keeps the earlier rows
    s.log(2, {"train/loss": 1.0})
    s.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    JSONLSink(tmp_path).close()  # a fresh run starts an empty file
    assert read_metrics(tmp_path) == []


def test_read_metrics_without_a_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        read_metrics(tmp_path)


def _cfg(out_dir, **kw):
    from losskit.train.tasks import build_train_config

    return build_train_config({"out_dir": str(out_dir), **kw})


def test_open_sinks_off_rank_zero_is_empty(tmp_path):
    s = open_sinks(_cfg(tmp_path), {}, enabled=False)
    s.log(0, {"train/loss": 1.0})
    s.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("key", "module"), [("wandb_log", "wandb"), ("tensorboard_log", "tensorboard")])
def test_missing_tracking_package_is_a_config_error_before_any_file(tmp_path, monkeypatch, key, module):
    real = sinks.importlib.util.find_spec
    monkeypatch.setattr(sinks.importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(ConfigError, match=rf"{key}=True needs the {module} package.*losskit\[tracking\]"):
        open_sinks(_cfg(tmp_path, **{key: True}), {})
    assert list(tmp_path.iterdir()) == []


def test_a_sink_failing_to_open_closes_the_others(tmp_path, monkeypatch):
    closed = []
    monkeypatch.setattr(JSONLSink, "close", lambda self: closed.append("jsonl"))

    def boom(self, cfg, config_dict):
        raise RuntimeError("wandb.init failed")

    monkeypatch.setattr(sinks.WandbSink, "__init__", boom)
    with pytest.raises(RuntimeError, match="wandb.init failed"):
        open_sinks(_cfg(tmp_path, wandb_log=True), {})
    assert closed == ["jsonl"]


def test_sinks_close_every_sink_even_when_one_fails():
    closed = []

    class Ok:
        def close(self):
            closed.append("ok")

    class Bad:
        def close(self):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        Sinks([Bad(), Ok()]).close()
    assert closed == ["ok"]
