"""TensorBoard (and W&B) beside metrics.jsonl: what MetricsLog writes is read back by tensorboard's own reader and
equals the JSONL, also across a resume and a restart in the same directory."""

import json
import sys
import types

import numpy as np
import pytest

from fast_srt.run.metrics import MetricsLog, read_metrics


def read_events(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every event
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def expected(records) -> dict[str, list[tuple[int, float]]]:
    """What the events must hold: each numeric field per step, as float32 (TensorBoard's scalar type)."""
    out: dict[str, list] = {}
    for r in records:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)):
                out.setdefault(k, []).append((r["step"], float(np.float32(v))))
    return out


def _record(step, scale=1.0):
    return {"step": step, "reward/defender_mean": -0.25 * step * scale, "kl/mean": 1e-3 / step,
            "outcome/defended": step, "sync/canary_changed": step % 2 == 0, "reward/attacker_mean": None,
            "note": "not a scalar"}


def test_metrics_log_events_equal_jsonl(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.write(_record(step))
    events = read_events(tmp_path)
    assert events == expected(read_metrics(tmp_path / "metrics.jsonl"))
    assert events["sync/canary_changed"] == [(1, 0.0), (2, 1.0), (3, 0.0)]
    assert "reward/attacker_mean" not in events and "note" not in events  # a gap stays a gap


def test_games_log_writes_no_events(tmp_path):
    MetricsLog(tmp_path / "games.jsonl").write({"step": 1, "reward_defender": 1.0})
    assert not list(tmp_path.glob("events.out.tfevents.*"))


def test_resume_keeps_events_equal_to_jsonl(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3, 4):  # a killed run: steps 3 and 4 were logged after the step-2 checkpoint
        log.write(_record(step))
    log = MetricsLog(tmp_path / "metrics.jsonl", resume_step=2)
    for step in (3, 4, 5):
        log.write(_record(step, scale=10.0))  # the resumed run's own values
    final = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in final] == [1, 2, 3, 4, 5]
    assert read_events(tmp_path) == expected(final)


def test_wandb_only_when_asked(tmp_path, monkeypatch):
    logged = []
    fake = types.SimpleNamespace(init=lambda **kw: types.SimpleNamespace(
        log=lambda values, step: logged.append((step, values)), kw=kw))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    MetricsLog(tmp_path / "off" / "metrics.jsonl").write(_record(1))
    assert logged == []
    run = tmp_path / "on"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"wandb_project": "srt", "steps": 2}))
    MetricsLog(run / "metrics.jsonl").write(_record(1))
    assert logged == [(1, {"reward/defender_mean": -0.25, "kl/mean": 1e-3, "outcome/defended": 1.0,
                           "sync/canary_changed": 0.0})]


def test_wandb_missing_is_one_line(tmp_path, monkeypatch):
    from fast_srt.config import TrainConfig
    from fast_srt.errors import UserError

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    (tmp_path / "config.json").write_text(json.dumps({"wandb_project": "srt"}))
    with pytest.raises(UserError, match="pip install wandb"):
        MetricsLog(tmp_path / "metrics.jsonl").write(_record(1))
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match="wandb_project 'srt' needs wandb") as e:
        TrainConfig(wandb_project="srt")
    assert "\n" not in str(e.value)


def test_train_writes_events_equal_to_metrics(trained_run):
    """`fast-srt train` (tests/eval/conftest.py: trained_run) leaves event files beside metrics.jsonl."""
    metrics = read_metrics(trained_run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and list(trained_run.glob("events.out.tfevents.*"))
    events = read_events(trained_run)
    assert events == expected(metrics)
    assert {"reward/defender_mean", "time/step_s", "perf/tokens_per_s", "optim/lr"} <= set(events)
