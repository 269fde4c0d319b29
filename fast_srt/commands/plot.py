"""`fast-srt plot RUN_DIR [--out DIR]`: a run's metrics.jsonl as PNG curves, one figure per question a user asks.

  rewards.png    mean reward per role per step
  format.png     <think>/<answer> format violation rate per role
  outcomes.png   the judge's outcome mix per step (stacked counts: defended, jailbroken, over_refusal, tie, ...)
  policy.png     KL to the reference, entropy, clip fraction, approx KL(old || new), SFT loss when present
  sampler.png    importance weights (mean, min, max) and the vLLM-vs-trainer log-prob mismatch
  time.png       seconds per phase per step (stacked) and tokens per second

Steps where a metric is missing (no sample survived, no attacker in the mode) are gaps, not zeros.
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
          "time/checkpoint_s"]


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


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNG figures of a run; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    rows = read_run(run_dir)
    out = Path(out_dir) if out_dir else (run_dir if run_dir.is_dir() else run_dir.parent) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        path = out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    for name, (title, keys) in FIGURES.items():
        keys = [k for k in keys if _series(rows, k)[0]]
        if not keys:
            continue
        fig, axes = plt.subplots(len(keys), 1, figsize=(7, 1.9 * len(keys) + 0.6), sharex=True, squeeze=False)
        for ax, k in zip(axes[:, 0], keys):
            xs, ys = _series(rows, k)
            ax.plot(xs, ys, marker="o", ms=3)
            ax.set_ylabel(k.split("/", 1)[1], fontsize=8)
            ax.grid(alpha=0.3)
        axes[0, 0].set_title(f"{title} ({run_dir.name})")
        axes[-1, 0].set_xlabel("step")
        axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
        save(fig, name)

    outcomes = sorted({k for r in rows for k in r if k.startswith("outcome/")})
    if outcomes:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        steps = [r["step"] for r in rows]
        bottom = [0.0] * len(rows)
        for k in outcomes:
            vals = [float(r.get(k) or 0) for r in rows]
            ax.bar(steps, vals, bottom=bottom, label=k.split("/", 1)[1])
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xlabel("step")
        ax.set_ylabel("games")
        ax.set_ylim(0, max(bottom) * 1.45)  # headroom for the legend
        ax.set_title(f"judge outcomes ({run_dir.name})")
        ax.legend(fontsize=7, ncol=4, loc="upper left")
        save(fig, "outcomes")

    phases = [k for k in PHASES if _series(rows, k)[0]]
    if phases:
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
        steps = [r["step"] for r in rows]
        bottom = [0.0] * len(rows)
        for k in phases:
            vals = [float(r.get(k) or 0) for r in rows]
            ax.bar(steps, vals, bottom=bottom, label=k[5:-2])
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_ylabel("seconds")
        ax.set_ylim(0, max(bottom) * 1.45)  # headroom for the legend
        ax.set_title(f"where each step's time goes ({run_dir.name})")
        ax.legend(fontsize=7, ncol=4, loc="upper left")
        for k in ("perf/tokens_per_s", "perf/gen_tokens_per_s"):
            xs, ys = _series(rows, k)
            if xs:
                ax2.plot(xs, ys, marker="o", ms=3, label=k.split("/", 1)[1])
        ax2.set_ylabel("tokens / s")
        ax2.set_xlabel("step")
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.legend(fontsize=7)
        ax2.grid(alpha=0.3)
        save(fig, "time")
    return written


def plot_main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="fast-srt plot", description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", help="a `fast-srt train` run directory (or its metrics.jsonl)")
    ap.add_argument("--out", default=None, help="where the PNG files go (default RUN_DIR/plots)")
    args = ap.parse_args(argv)
    for path in plot_run(args.run_dir, args.out):
        print(path)
