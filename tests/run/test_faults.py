"""The fault-injection hook and the log restore that the crash matrix (test_train.py) relies on."""

import json

import pytest

from fast_srt import faults
from fast_srt.errors import UserError
from fast_srt.run.metrics import MetricsLog, read_metrics


def test_parse_accepts_every_point_and_refuses_bad_values():
    for p in faults.KILL_POINTS:
        assert faults.parse(f"{p}:3") == (p, 3)
    assert faults.parse("") is None and faults.parse(None) is None
    for bad in ("nowhere:2", "update", "update:", "update:0", "update:x", ":2"):
        with pytest.raises(UserError, match="POINT:STEP"):
            faults.parse(bad)


def test_hit_only_at_the_named_point_and_step(monkeypatch):
    killed = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: killed.append(sig))
    monkeypatch.setenv(faults.ENV, "update:2")
    faults.enter_step(1)
    faults.hit("update")
    faults.enter_step(2)
    faults.hit("generate")
    assert killed == []
    faults.hit("update")
    assert killed == [faults.signal.SIGKILL]
    with pytest.raises(ValueError):
        faults.hit("not_a_point")


def test_hit_halfway_kills_after_half_the_items(monkeypatch):
    seen = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: seen.append("KILL"))
    monkeypatch.setenv(faults.ENV, "weight_sync:5")
    faults.enter_step(5)
    for x in faults.hit_halfway("weight_sync", iter(range(7)), 7):
        seen.append(x)
    assert seen == [0, 1, 2, "KILL", 3, 4, 5, 6]


def _lines(path, steps):
    path.write_text("".join(json.dumps({"step": s, "v": s * 10}) + "\n" for s in steps) + '{"step": 9, "cut')


def test_metrics_log_resume_drops_later_lines_and_restores_a_missing_step(tmp_path):
    path = tmp_path / "m.jsonl"
    _lines(path, [1, 2, 3])  # a kill after step 3's line, before the checkpoint of step 3: resume from 2
    MetricsLog(path, resume_step=2, restore=[{"step": 2, "v": -1}])
    assert [(r["step"], r["v"]) for r in read_metrics(path)] == [(1, 10), (2, 20)]  # its own line kept
    _lines(path, [1])  # a kill after the checkpoint of step 2, before its line
    log = MetricsLog(path, resume_step=2, restore=[{"step": 2, "v": 21}, {"step": 3, "v": 0}])
    log.write({"step": 3, "v": 30})
    assert [(r["step"], r["v"]) for r in read_metrics(path)] == [(1, 10), (2, 21), (3, 30)]


def test_metrics_log_never_overwrites_an_earlier_runs_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    _lines(path, [1, 2])
    before = path.read_bytes()
    with pytest.raises(UserError, match="earlier run"):
        MetricsLog(path)
    assert path.read_bytes() == before
    (tmp_path / "empty.jsonl").write_text("")  # an empty file holds nothing to lose
    MetricsLog(tmp_path / "empty.jsonl").write({"step": 1})
    assert read_metrics(tmp_path / "empty.jsonl") == [{"step": 1}]
