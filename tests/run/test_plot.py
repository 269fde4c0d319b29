"""`fast-srt plot`: every figure is written from a run's metrics.jsonl, holds a drawing (not a blank canvas),
leaves gaps for missing values, and bad input is one line."""

import json
import random

import pytest

from fast_srt.commands.plot import plot_run
from fast_srt.errors import UserError

PNG = b"\x89PNG\r\n\x1a\n"


def _metrics(path, n=6, cut_last=False):
    rng = random.Random(0)
    lines = []
    for step in range(1, n + 1):
        m = {"step": step, "reward/attacker_mean": rng.uniform(-1, 1), "reward/defender_mean": rng.uniform(-3, 3),
             "format/attacker_violation_rate": rng.random(), "format/defender_violation_rate": rng.random(),
             "kl/mean": rng.random() * 0.01, "policy/entropy": rng.uniform(2, 4), "loss/clip_frac": rng.random(),
             "is/ratio_mean": 1 + rng.uniform(-0.01, 0.01), "is/ratio_min": 0.7, "is/ratio_max": 1.3,
             "outcome/defended": rng.randint(0, 4), "outcome/jailbroken": rng.randint(0, 4),
             "time/generate_s": rng.uniform(4, 6), "time/train_s": rng.uniform(10, 20), "time/sync_s": 0.2,
             "perf/tokens_per_s": rng.uniform(60, 80)}
        if step == 3:
            m["reward/attacker_mean"] = None  # no attacker sample survived: a gap, not a zero
        lines.append(json.dumps(m))
    text = "\n".join(lines) + "\n" + ('{"step": 7, "rew' if cut_last else "")
    path.write_text(text)


def test_every_figure_is_drawn(tmp_path):
    from matplotlib.image import imread

    run = tmp_path / "run"
    run.mkdir()
    _metrics(run / "metrics.jsonl", cut_last=True)  # a killed run's cut last line is skipped
    paths = plot_run(run)
    assert sorted(p.stem for p in paths) == ["format", "outcomes", "policy", "rewards", "sampler", "time"]
    for p in paths:
        assert p.parent == run / "plots" and p.read_bytes()[:8] == PNG
        img = imread(p)
        assert img.std() > 0.05, p  # something is drawn on the canvas


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        plot_run(tmp_path / "nope")
    with pytest.raises(UserError, match="no metrics.jsonl"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="holds no step yet"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match="metrics.jsonl:2 is not JSON"):
        plot_run(tmp_path)
