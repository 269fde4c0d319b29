"""`fast-srt plot RUN_DIR [--out DIR]`: a run's metrics.jsonl as PNG curves, one figure per question a user asks.

  rewards.png    mean reward per role per step
  format.png     <think>/<answer> format violation rate per role
  outcomes.png   the judge's outcome mix per step (stacked counts: defended, jailbroken, over_refusal, tie, ...)
  policy.png     KL to the reference, entropy, clip fraction, approx KL(old || new), SFT loss when present
  sampler.png    importance weights (mean, min, max) and the vLLM-vs-trainer log-prob mismatch
                 (in both, a metric the learner splits by role has the attacker's and the defender's lines too)
  time.png       seconds per phase per step (stacked; the eval during training as `eval`) and tokens per second
  learning.png   the eval during training (`train --eval-every`): held-out refusal, over-refusal (with the
                 always-refuse alarm's threshold and the evals where it fired), attack success against the frozen
                 base model and attack diversity per eval step, each rate with its 95% Wilson interval
  eval.png       the newest `fast-srt eval` of the run (RUN_DIR/eval/eval-*.json), when there is one: per prompt
                 set, each metric's rate as a bar with its 95% interval, one bar per checkpoint (A, and B with
                 --compare); attack success, faithfulness and diversity of the attacks

Steps where a metric is missing (no sample survived, no attacker in the mode) are gaps, not zeros. RUN_DIR may also
be an eval JSON file, or a directory of them (`fast-srt eval`'s --out): then only eval.png is drawn.
"""

from __future__ import annotations

import json
from pathlib import Path

from fast_srt.errors import UserError

FIGURES = {
    "rewards": ("reward per role", ["reward/attacker_mean", "reward/defender_mean"]),
    "format": ("format violation rate", ["format/attacker_violation_rate", "format/defender_violation_rate"]),
    "policy": ("policy", ["kl/mean", "policy/entropy", "loss/clip_frac", "loss/approx_kl", "loss/sft",
                          "loss/kl_k3"]),
    "sampler": ("vLLM vs trainer", ["is/ratio_mean", "is/ratio_min", "is/ratio_max", "is/logp_mismatch_mean_abs"]),
}
PHASES = ["time/generate_s", "time/judge_s", "time/logprob_s", "time/advantage_s", "time/train_s", "time/sync_s",
          "time/checkpoint_s", "time/eval_s"]
# metrics the learner also logs per role (fast_srt.learner.step.ROLE_SPLIT), drawn beside the pooled line
ROLE_SPLIT = ("is/ratio_mean", "is/trunc_frac", "is/logp_mismatch_mean_abs", "loss/clip_frac", "loss/approx_kl",
              "loss/ratio_mean", "policy/entropy", "kl/mean")
LEARNING_PANELS = (
    ("refusal of held-out harmful and jailbreak-wrapped requests",
     ["eval/harmful/refusal_matcher", "eval/harmful/refusal", "eval/jailbreak/refusal_matcher",
      "eval/jailbreak/refusal"]),
    ("over-refusal of held-out benign requests", ["eval/benign/over_refusal_matcher", "eval/benign/over_refusal"]),
    ("attacks from held-out seeds against the frozen base model",
     ["eval/attacks/attack_success", "eval/attacks/faithful"]),
    ("attack diversity", ["eval/attacks/sbert_diversity", "eval/attacks/self_bleu"]),
)


def read_run(run_dir: Path) -> list[dict]:
    if not run_dir.exists():
        raise UserError(f"run directory {run_dir} does not exist; pass the --run-dir of a `fast-srt train` run")
    path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; pass the --run-dir of a `fast-srt train` run")
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines):  # only the last line may be cut (a killed run)
                raise UserError(f"{path}:{i} is not JSON; the file is damaged") from None
    rows = [r for r in rows if isinstance(r, dict) and "step" in r]
    if not rows:
        raise UserError(f"{path} holds no step yet; plot after the first step's line is written")
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def newest_eval(path: Path) -> Path | None:
    """An eval JSON file itself, else the newest eval-*.json in path/eval or in path."""
    if path.is_file():
        return path if path.suffix == ".json" else None
    found = sorted([*path.glob("eval/eval-*.json"), *path.glob("eval-*.json")], key=lambda p: p.name)
    return found[-1] if found else None


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNG figures of a run (and of its newest eval); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    eval_json = newest_eval(run_dir) if run_dir.exists() else None
    metrics_only = run_dir.is_file() and run_dir.suffix != ".json"
    has_metrics = metrics_only or (run_dir / "metrics.jsonl").is_file()
    rows = read_run(run_dir) if has_metrics or eval_json is None else []
    out = Path(out_dir) if out_dir else (run_dir if run_dir.is_dir() else run_dir.parent) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    figures = {"eval": eval_figure(plt, read_eval(eval_json), eval_json.name) if eval_json is not None else None}
    name = run_dir.name
    for fig_name, (title, keys) in FIGURES.items():
        figures[fig_name] = series_figure(plt, rows, f"{title} ({name})", keys)
    figures["outcomes"] = outcomes_figure(plt, rows, name)
    figures["time"] = time_figure(plt, rows, name)
    figures["learning"] = learning_figure(plt, rows, name)
    written = []
    for fig_name, fig in figures.items():
        if fig is None:
            continue
        path = out / f"{fig_name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _step_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def series_figure(plt, rows: list[dict], title: str, keys: list[str]):
    """One panel per metric that has values; a pooled metric's panel also draws each role's (ROLE_VARIANTS)."""
    keys = [k for k in keys if _series(rows, k)[0]]
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 1.9 * len(keys) + 0.6), sharex=True, squeeze=False)
    for ax, k in zip(axes[:, 0], keys):
        variants = [(v, role) for v, role in role_variants(k) if _series(rows, v)[0]]
        xs, ys = _series(rows, k)
        ax.plot(xs, ys, marker="o", ms=3, label="all" if variants else None, color="C0")
        for v, role in variants:  # one colour per role in every panel
            ax.plot(*_series(rows, v), marker=".", ms=3, lw=1, ls="--", label=role,
                    color="C1" if role == "attacker" else "C2")
        if variants:
            ax.legend(fontsize=6, loc="best")
        ax.set_ylabel(k.split("/", 1)[1], fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(title)
    _step_axis(axes[-1, 0])
    return fig


def role_variants(key: str) -> list[tuple[str, str]]:
    """The per-role keys of a pooled metric that the learner splits by role (fast_srt.learner.step.role_key)."""
    if key not in ROLE_SPLIT:
        return []
    ns, name = key.split("/", 1)
    return [(f"{ns}/{role}_{name}", role) for role in ("attacker", "defender")]


def _stacked(ax, rows: list[dict], keys: list[str], label) -> None:
    steps = [r["step"] for r in rows]
    bottom = [0.0] * len(rows)
    for k in keys:
        vals = [float(r.get(k) or 0) for r in rows]
        ax.bar(steps, vals, bottom=bottom, label=label(k))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylim(0, max(bottom) * 1.45 or 1)  # headroom for the legend
    ax.legend(fontsize=7, ncol=4, loc="upper left")


def outcomes_figure(plt, rows: list[dict], name: str):
    rows = [r for r in rows if any(k.startswith("outcome/") for k in r)]  # not the eval-only baseline line
    outcomes = sorted({k for r in rows for k in r if k.startswith("outcome/")})
    if not outcomes:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.2))
    _stacked(ax, rows, outcomes, lambda k: k.split("/", 1)[1])
    ax.set_xlabel("step")
    ax.set_ylabel("games")
    ax.set_title(f"judge outcomes ({name})")
    return fig


def time_figure(plt, rows: list[dict], name: str):
    phases = [k for k in PHASES if _series(rows, k)[0]]
    if not phases:
        return None
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    _stacked(ax, rows, phases, lambda k: k[5:-2])
    ax.set_ylabel("seconds")
    ax.set_title(f"where each step's time goes ({name})")
    for k in ("perf/tokens_per_s", "perf/gen_tokens_per_s"):
        xs, ys = _series(rows, k)
        if xs:
            ax2.plot(xs, ys, marker="o", ms=3, label=k.split("/", 1)[1])
    ax2.set_ylabel("tokens / s")
    _step_axis(ax2)
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    return fig


def learning_figure(plt, rows: list[dict], name: str):
    """The eval during training (`--eval-every`) as learning curves: each rate per eval step with its 95% Wilson
    interval (shaded), the over-refusal alarm's threshold (dashed) and the evals where it fired (red)."""
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    panels = [(t, [k for k in keys if _series(evals, k)[0]]) for t, keys in LEARNING_PANELS]
    panels = [(t, keys) for t, keys in panels if keys]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.3 * len(panels) + 0.6), sharex=True, squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], panels):
        for j, k in enumerate(keys):
            xs, ys = _series(evals, k)
            scale = 0.01 if k.endswith("self_bleu") else 1.0
            ax.plot(xs, [y * scale for y in ys], marker="o", ms=3, color=f"C{j}",
                    label=k.split("/", 1)[1].replace("/", " ") + (" / 100" if scale != 1 else ""))
            lo, hi = _series(evals, k + "_lo")[1], _series(evals, k + "_hi")[1]
            if len(lo) == len(xs):
                ax.fill_between(xs, lo, hi, color=f"C{j}", alpha=0.12)
        if any(k.endswith("over_refusal_matcher") for k in keys):
            _draw_alarm(ax, evals)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6, loc="best")
        ax.grid(alpha=0.3)
    n = next((r.get("eval/harmful/refusal_n") for r in evals if r.get("eval/harmful/refusal_n")), "?")
    fig.suptitle(f"held-out eval during training ({name}, n={n} a set): rate and 95% interval", fontsize=10)
    _step_axis(axes[-1, 0])
    return fig


def _draw_alarm(ax, evals: list[dict]) -> None:
    at = next((r["eval/alarm_threshold"] for r in evals if r.get("eval/alarm_threshold") is not None), None)
    if at is not None:
        ax.axhline(at, color="red", ls=":", lw=1, label="always-refuse alarm")
    fired = [(r["step"], r["eval/benign/over_refusal_matcher"]) for r in evals if r.get("eval/always_refuse_alarm")]
    if fired:
        ax.scatter(*zip(*fired), color="red", zorder=5, s=25)


def read_eval(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
        doc["checkpoints"][0]["result"]["sets"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise UserError(f"{path} is not a `fast-srt eval` result (JSON with checkpoints and sets)") from None
    return doc


def _eval_panels(doc: dict) -> list[tuple[str, list[str], list[list]]]:
    """(title, metric names, per checkpoint [(rate, lo, hi) or None per metric]) for each prompt set and the
    attacks; diversity values are bars without an interval (self-BLEU scaled to 0-1)."""
    from fast_srt.eval.report import ATTACK_ROWS, BENIGN_ROWS, HARMFUL_ROWS

    def rate(m):
        return None if not m or m["rate"] is None else (m["rate"], m["lo"], m["hi"])

    results = [c["result"] for c in doc["checkpoints"]]
    panels = []
    for name, first in results[0]["sets"].items():
        keys = [k for k, _ in (HARMFUL_ROWS if first["harmful"] else BENIGN_ROWS)]
        vals = [[rate(r["sets"].get(name, {}).get("metrics", {}).get(k)) for k in keys] for r in results]
        panels.append((f"{name} (n={first['n']})", keys, vals))
    if "attacks" in results[0]:
        keys = [k for k, _ in ATTACK_ROWS]
        vals = []
        for r in results:
            a = r.get("attacks", {})
            div = [None if a.get(k) is None else (a[k] * scale,) * 3
                   for k, scale in (("sbert_diversity", 1.0), ("self_bleu", 0.01))]
            vals.append([rate(a.get("metrics", {}).get(k)) for k in keys] + div)
        panels.append((f"attacks from held-out seeds (n={results[0]['attacks']['n']})",
                       keys + ["sbert_diversity", "self_bleu / 100"], vals))
    return panels


def eval_figure(plt, doc: dict, name: str):
    panels = _eval_panels(doc)
    labels = [f"{c['label']}: {c['spec']}" + (f" (step {c['step']})" if c.get("step") is not None else "")
              for c in doc["checkpoints"]]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.1 * len(panels) + 0.6), squeeze=False)
    width = 0.8 / len(labels)
    for ax, (title, keys, vals) in zip(axes[:, 0], panels):
        for j, (label, per_metric) in enumerate(zip(labels, vals)):
            xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(keys))]
            v = [m[0] if m else 0.0 for m in per_metric]
            err = [[m[0] - m[1] if m else 0 for m in per_metric], [m[2] - m[0] if m else 0 for m in per_metric]]
            ax.bar(xs, v, width, yerr=err, capsize=3, label=label, color=f"C{j}")
        ax.set_xticks(range(len(keys)), [k.replace("_", " ") for k in keys], fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1])
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_ylim(0, 1.4)  # headroom for the legend
    axes[0, 0].legend(fontsize=7, loc="upper center", ncol=2)
    fig.suptitle(f"fast-srt eval ({name}): rate and 95% interval per metric", fontsize=10)
    return fig


def plot_main(argv: list[str]) -> None:
    from fast_srt.commands.args import Parser

    ap = Parser(prog="fast-srt plot", description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", help="a `fast-srt train` run directory (or its metrics.jsonl, or an eval JSON)")
    ap.add_argument("--out", default=None, help="where the PNG files go (default RUN_DIR/plots)")
    args = ap.parse_args(argv)
    for path in plot_run(args.run_dir, args.out):
        print(path)
