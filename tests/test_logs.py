"""Tests for banjax.logs: JSONL round trip, TensorBoard events, progress lines, ETA."""

import json
import logging as pylogging
import os

import numpy as np
import pytest

from banjax import logs


class FakeClock:
    """Deterministic clock: returns `t`, which the test advances."""

    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_jsonl_round_trip_and_tensorboard(tmp_path):
    d = str(tmp_path / "run")
    with logs.MetricWriter(d) as w:
        w.write(1, {"loss": 2.5, "error": np.float32(0.75)}, prefix="train/")
        w.write(2, {"error": 0.125}, prefix="eval/")
    recs = logs.read_jsonl(os.path.join(d, "metrics.jsonl"))
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[0]["train/loss"] == 2.5 and recs[0]["train/error"] == 0.75
    assert recs[1]["eval/error"] == 0.125 and set(recs[1]) == {"step", "time", "eval/error"}
    assert all(isinstance(r["time"], float) for r in recs)
    events = [f for f in os.listdir(d) if f.startswith("events.out.tfevents")]
    assert len(events) == 1 and os.path.getsize(os.path.join(d, events[0])) > 0
    # Appends on reopen, without TensorBoard.
    w = logs.MetricWriter(d, tensorboard=False)
    w.write(3, {"loss": 1.0})
    w.close()
    assert [r["step"] for r in logs.read_jsonl(os.path.join(d, "metrics.jsonl"))] == [1, 2, 3]
    assert len([f for f in os.listdir(d) if f.startswith("events")]) == 1


def test_partial_last_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 1.0}) + '\n{"step": 2, "lo')
    assert logs.read_jsonl(str(path)) == [{"step": 1, "loss": 1.0}]
    w = logs.MetricWriter(str(tmp_path), tensorboard=False)
    w.write(5, {"loss": 0.5})
    assert [r["step"] for r in logs.read_jsonl(str(path))] == [1, 5]


def test_read_jsonl_corrupt_line_and_reserved_key(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=":2"):
        logs.read_jsonl(str(path))
    w = logs.MetricWriter(str(tmp_path), tensorboard=False)
    with pytest.raises(ValueError, match="step"):
        w.write(1, {"step": 3})


def test_format_eta():
    assert logs.format_eta(0) == "0:00:00"
    assert logs.format_eta(192.4) == "0:03:12"
    assert logs.format_eta(3 * 3600 + 61) == "3:01:01"
    assert logs.format_eta(float("inf")) == "?"
    with pytest.raises(ValueError, match="-5"):
        logs.format_eta(-5)


def test_progress_log_lines_with_fake_clock(caplog):
    clock = FakeClock()
    p = logs.Progress(1000, initial=100, desc="gen 1", every=50, enabled=False, clock=clock)
    with caplog.at_level(pylogging.INFO):
        clock.t += 2.0
        p.update(120, {"loss": 1.234, "err": 0.45}, images_per_step=128)  # < every: silent
        assert not caplog.records
        clock.t += 3.0
        p.update(150, {"loss": 1.234, "err": 0.45}, images_per_step=128)
        # 50 steps * 128 images in 5 s; 850 steps left at 10 steps/s.
        assert p.images_per_sec == pytest.approx(50 * 128 / 5.0)
        assert p.eta_seconds == pytest.approx(85.0)
        line = "gen 1 step 150/1000 loss 1.234 err 0.45 1280 img/s ETA 0:01:25"
        assert caplog.messages[-1] == line
        clock.t += 20.0
        p.update(200, {"loss": 0.5}, images_per_step=64)
        assert caplog.messages[-1] == "gen 1 step 200/1000 loss 0.5 160 img/s ETA 0:05:20"
        clock.t += 1.0
        p.update(1000, {"loss": 0.25}, images_per_step=64)  # final step always reported
        assert caplog.messages[-1].startswith("gen 1 step 1000/1000 loss 0.25")
        assert caplog.messages[-1].endswith("ETA 0:00:00")
    assert len(caplog.messages) == 3
    p.close()


def test_progress_tty_bar(capsys):
    clock = FakeClock()
    p = logs.Progress(10, desc="gen 0", enabled=True, clock=clock)
    for s in range(1, 11):
        clock.t += 0.5
        p.update(s, {"loss": 1.0 / s}, images_per_step=32)
    assert p.images_per_sec == pytest.approx(64.0)
    p.close()
    err = capsys.readouterr().err
    assert "gen 0" in err and "10/10" in err and "img/s" in err


def test_progress_bad_arguments():
    with pytest.raises(ValueError, match="initial"):
        logs.Progress(10, initial=11)
    with pytest.raises(ValueError, match="every"):
        logs.Progress(10, every=0)


def test_latest_records_keeps_the_rewrite_of_resumed_steps():
    records = [{"step": 10, "time": 1, "train/loss": 1.0}, {"step": 20, "time": 2, "train/loss": 0.5},
               {"step": 20, "time": 3, "train/loss": 0.4}, {"step": 20, "time": 3, "test/error": 0.1},
               {"step": 30, "time": 4, "train/loss": 0.3}]
    got = logs.latest_records(records)
    assert [(r["step"], r.get("train/loss"), r.get("test/error")) for r in got] == [
        (10, 1.0, None), (20, 0.4, None), (20, None, 0.1), (30, 0.3, None)]
