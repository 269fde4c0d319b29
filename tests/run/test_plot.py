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


def _eval_record(step, over, alarm):
    m = {"step": step, "time/eval_s": 20.0, "eval/alarm_threshold": 0.5, "eval/always_refuse_alarm": alarm}
    for key, rate in (("harmful/refusal", 0.5), ("harmful/refusal_matcher", 0.25), ("jailbreak/refusal", 0.1),
                      ("jailbreak/refusal_matcher", 0.0), ("benign/over_refusal", 0.2),
                      ("benign/over_refusal_matcher", over), ("attacks/attack_success", 0.6),
                      ("attacks/faithful", 0.9)):
        m.update({f"eval/{key}": rate, f"eval/{key}_lo": max(rate - 0.2, 0), f"eval/{key}_hi": min(rate + 0.2, 1),
                  f"eval/{key}_n": 8})
    m.update({"eval/attacks/sbert_diversity": 0.6, "eval/attacks/self_bleu": 12.0})
    return m


def test_learning_curves_and_per_role_lines(tmp_path):
    """The eval during training becomes learning.png (four panels, each rate with its interval, the alarm's
    threshold and the eval where it fired); a metric split by role has the attacker's and defender's lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fast_srt.commands.plot import learning_figure, series_figure

    run = tmp_path / "run"
    run.mkdir()
    _metrics(run / "metrics.jsonl")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.update({"loss/attacker_clip_frac": 0.1, "loss/defender_clip_frac": 0.3})
    rows = [_eval_record(0, 0.0, 0)] + rows
    rows[3].update(_eval_record(3, 0.25, 0))
    rows[6].update(_eval_record(6, 0.75, 1))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sorted(p.stem for p in plot_run(run)) == ["format", "learning", "outcomes", "policy", "rewards",
                                                     "sampler", "time"]
    fig = learning_figure(plt, rows, "run")
    axes = fig.axes
    assert len(axes) == 4 and [len(ax.lines) for ax in axes] == [4, 3, 2, 2]  # over-refusal: + the threshold
    assert len(axes[0].collections) == 4  # an interval band per rate
    assert [len(c.get_offsets()) for c in axes[1].collections if hasattr(c, "get_offsets")][-1] == 1  # fired once
    xs = list(axes[1].lines[0].get_xdata())
    assert xs == [0, 3, 6]
    fig = series_figure(plt, rows, "policy", ["loss/clip_frac", "kl/mean"])
    assert [len(ax.lines) for ax in fig.axes] == [3, 1]  # kl/mean has no per-role values here: its line alone
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["all", "attacker", "defender"]


def test_plot_splits_the_metrics_the_learner_splits():
    from fast_srt.commands.plot import ROLE_SPLIT
    from fast_srt.learner import step

    assert ROLE_SPLIT == step.ROLE_SPLIT
