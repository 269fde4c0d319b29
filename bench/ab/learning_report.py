"""The learning report: self-play against its two static ablations, from the same warm start.

Arms, each `fast-srt train cpu_default ARM_OPTIONS --seed SEED --steps N` (the same format warm-up start, steps,
games per step, learning rate and auxiliary SFT loss):
  selfplay       both roles train against each other (the method)
  defender_only  a static attacker: every seed goes verbatim to the defender, only the defender trains
  attacker_only  a static defender: the frozen base model answers, only the attacker trains
  selfplay_no_sft  (optional) self-play without the auxiliary SFT loss (--algo.sft-coef 0): what that loss does
Then `fast-srt eval` evaluates each arm's final checkpoint, the warm start and the base model on the same held-out
prompts (`--max-prompts`, 0: every held-out prompt) with the same sampling seed: the defender answers greedily, so
two checkpoints differ only by their weights. Differences against the warm start are paired (the same prompts):
McNemar's exact test on the discordant prompts (fast_srt/eval/stats.py); "beyond noise" means p < 0.05.

    .venv/bin/python bench/ab/learning_report.py [--steps 12] [--seeds 8888] [--arms ...] [--max-prompts 0] [--keep DIR]
    .venv/bin/python bench/ab/learning_report.py --from DIR [--arms ...] [--seeds ...]   # redraw from a --keep DIR

Writes bench/results/learning_cpu_<date>.md (the table, the per-arm run times and the commands) and prints it; the
run directories live in a temporary folder removed at the end, unless --keep DIR names where to keep them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAST_SRT = str(ROOT / ".venv" / "bin" / "fast-srt")
ARMS = {"selfplay": ["--game.mode", "selfplay"], "defender_only": ["--game.mode", "defender_only"],
        "attacker_only": ["--game.mode", "attacker_only"],
        "selfplay_no_sft": ["--game.mode", "selfplay", "--algo.sft-coef", "0"]}
MODES = ("selfplay", "defender_only", "attacker_only")

# (label, where, metric); each metric's per-record flag (for the paired test) is the one its rate is made of
ROWS = [
    ("harmful: refusal (judge)", "heldout_harmful", "refusal"),
    ("harmful: refusal (matcher)", "heldout_harmful", "refusal_matcher"),
    ("jailbreak: refusal (judge)", "heldout_jailbreak", "refusal"),
    ("jailbreak: refusal (matcher)", "heldout_jailbreak", "refusal_matcher"),
    ("benign: over-refusal (judge)", "heldout_benign", "over_refusal"),
    ("benign: over-refusal (matcher)", "heldout_benign", "over_refusal_matcher"),
    ("harmful: attack success (judge)", "heldout_harmful", "attack_success"),
    ("attacks: success vs frozen base", "attacks", "attack_success"),
    ("attacks: format valid", "attacks", "format_valid"),
]


def flag_of(where: str, name: str):
    from fast_srt.eval.runner import ATTACK_FLAGS, SET_FLAGS

    return ATTACK_FLAGS[name] if where == "attacks" else SET_FLAGS[where != "heldout_benign"][name]


def sh(cmd: list[str], log: Path) -> float:
    """Run one command, its output to `log`; seconds it took. A failure stops the report with the log's tail."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def kept_eval(out: Path) -> dict:
    doc = json.loads(max(out.glob("eval-*.json")).read_text())
    return {"result": doc["checkpoints"][0]["result"], "seconds": float("nan")}


def evaluate(spec: str, out: Path, a) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    secs = sh([FAST_SRT, "eval", spec, "--max-prompts", str(a.max_prompts), "--attack-prompts", str(a.attack_prompts),
               "--out", str(out)], out / "eval.log")
    return {**kept_eval(out), "seconds": secs}


def records(result: dict, where: str) -> list[dict]:
    return result["attacks"]["records"] if where == "attacks" else result["sets"][where]["records"]


def metric(result: dict, where: str, name: str) -> dict:
    return (result["attacks"] if where == "attacks" else result["sets"][where])["metrics"][name]


def paired(a: dict, b: dict, where: str, flag) -> tuple[int, int, float]:
    """Prompts where only A has the flag, where only B has it, and McNemar's exact p (both labelled only)."""
    from fast_srt.eval.stats import mcnemar_exact

    key = "seed" if where == "attacks" else "prompt"
    fb = {r[key]: flag(r) for r in records(b, where)}
    only_a = only_b = 0
    for r in records(a, where):
        x, y = flag(r), fb.get(r[key])
        if x is None or y is None:
            continue
        only_a += bool(x) and not y
        only_b += bool(y) and not x
    return only_a, only_b, mcnemar_exact(only_a, only_b)


def cell(m: dict) -> str:
    return "-" if m["rate"] is None else f"{m['rate']:.2f} [{m['lo']:.2f}, {m['hi']:.2f}]"


def against(evals: dict[str, dict], ref: str) -> list[str]:
    """Each other trained arm against `ref`, pairwise on the same prompts: the rates' difference and McNemar's p."""
    others = [k for k in evals if k not in (ref, "warm start", "base model")]
    if ref not in evals or not others:
        return []
    lines = ["| metric | " + " | ".join(f"{o} - {ref}" for o in others) + " |", "|---|" + "---|" * len(others)]
    for label, where, name in ROWS:
        cells = []
        for o in others:
            a, b = metric(evals[o]["result"], where, name), metric(evals[ref]["result"], where, name)
            oa, ob, p = paired(evals[o]["result"], evals[ref]["result"], where, flag_of(where, name))
            d = "-" if a["rate"] is None or b["rate"] is None else f"{a['rate'] - b['rate']:+.2f}"
            bold = "**" if p < 0.05 else ""
            cells.append(f"{bold}{d} ({oa}+/{ob}-, p={p:.2g}){bold}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def table(evals: dict[str, dict], warm: str) -> list[str]:
    names = list(evals)
    n = {w: metric(evals[warm]["result"], w, m)["n"] for _, w, m in ROWS}
    lines = ["| metric (n) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, where, name in ROWS:
        cells = []
        for arm in names:
            res = evals[arm]["result"]
            c = cell(metric(res, where, name))
            if arm not in (warm, "base model"):
                oa, ob, p = paired(res, evals[warm]["result"], where, flag_of(where, name))
                c += f" {'**' if p < 0.05 else ''}({oa}+/{ob}-, p={p:.2g}){'**' if p < 0.05 else ''}"
            cells.append(c)
        lines.append(f"| {label} ({n[where]}) | " + " | ".join(cells) + " |")
    div = []
    for arm in names:
        att = evals[arm]["result"]["attacks"]
        div.append(f"{att.get('sbert_diversity', float('nan')):.3f} / {att['self_bleu']:.1f}")
    lines.append("| attacks: SBERT diversity / self-BLEU | " + " | ".join(div) + " |")
    return lines


def warm_start_dir() -> Path:
    """The default's warm start (built from its shipped adapter, or trained once and cached)."""
    from fast_srt.config import cpu_default
    from fast_srt.learner.warmup import ensure_warmup
    from fast_srt.run.models import resolve_model

    cfg = cpu_default()
    return ensure_warmup(resolve_model(cfg.model.model, cfg.model.dtype), cfg.warmup, cfg.model.dtype, quiet=True)


def redraw(a) -> None:
    """The table from a --keep folder: the base model, the warm start and every arm and seed asked for."""
    work = a.from_dir
    if not (work / "eval_warm").is_dir():
        raise SystemExit(f"{work} holds no eval_warm/: give the folder a --keep run wrote")
    evals = {"base model": kept_eval(work / "eval_base"), "warm start": kept_eval(work / "eval_warm")}
    for seed in a.seeds:
        for mode in a.arms:
            d = work / f"{mode}-{seed}" / "eval_report"
            if d.is_dir() and any(d.glob("eval-*.json")):
                evals[f"{mode} s{seed}" if len(a.seeds) > 1 else mode] = kept_eval(d)
            else:
                print(f"{d}: no eval, the arm is left out", file=sys.stderr)
    if not a.write:
        print("\n".join(table(evals, "warm start") + ["", *against(evals, "selfplay")]))
        return
    times = {}
    for arm in [k for k in evals if k not in ("base model", "warm start")]:
        mode, _, seed = arm.partition(" s")
        log = work / f"train-{mode}-{seed or a.seeds[0]}.log"
        done = re.search(r"done: \d+ steps in ([\d.]+) s", log.read_text()) if log.is_file() else None
        times[arm] = float(done.group(1)) if done else float("nan")
        evals[arm]["seconds"] = kept_eval_seconds(work / f"{mode}-{seed or a.seeds[0]}" / "eval_report")
    write_report(evals, times, a, warm_start_dir().name, work,
                 "the arms' steps (their `done:` line) + their eval's wall time, from the kept logs")


def kept_eval_seconds(out: Path) -> float:
    doc = json.loads(max(out.glob("eval-*.json")).read_text())
    return float(doc["meta"].get("wall_s", float("nan")))


def write_report(evals: dict, times: dict, a, warm_name: str, work: Path, times_are: str,
                 minutes: float | None = None) -> None:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                         check=False).stdout
    cmd = " ".join(["bench/ab/learning_report.py", *sys.argv[1:]])
    head = (f"commit {sha.strip() or 'unknown'}: `.venv/bin/python {cmd}` on the 2-core CPU"
            + (f", {minutes:.0f} min in all." if minutes is not None else "."))
    how = (f"Each arm: `fast-srt train cpu_default ARM_OPTIONS --seed SEED --steps {a.steps}` from the warm "
           f"start `{warm_name}`; each checkpoint: `fast-srt eval CHECKPOINT --max-prompts {a.max_prompts} "
           f"--attack-prompts {a.attack_prompts}` (greedy defender, seed 0). Cells: rate [95% Wilson]; against "
           "the warm start, (prompts where only the arm has it + / only the warm start -, McNemar exact p); "
           "bold: p < 0.05.")
    took = (f"Run times ({times_are}): "
            + "; ".join(f"{k} {v:.0f} s + {evals[k]['seconds']:.0f} s" for k, v in times.items()) + ".")
    vs = against(evals, "selfplay")
    lines = [head, "", how, "", *table(evals, "warm start"), "",
             *(["Each ablation against self-play, pairwise (the same prompts; bold: p < 0.05):", "", *vs, ""]
               if vs else []), took]
    text = "\n".join(lines)
    print(text)
    out = ROOT / "bench" / "results" / f"learning_cpu_{datetime.date.today().isoformat()}.md"
    out.write_text("# Self-play against its static ablations (CPU)\n\n" + text + "\n")
    print(f"report: {out}; runs in {work}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="RL steps of every arm (the default's 12)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[8888], help="training seeds; one run per arm and seed")
    ap.add_argument("--arms", nargs="+", default=list(MODES), choices=list(ARMS))
    ap.add_argument("--max-prompts", type=int, default=0, help="prompts per held-out set (0: every one)")
    ap.add_argument("--attack-prompts", type=int, default=64, help="held-out harmful seeds each attacker rewrites")
    ap.add_argument("--keep", metavar="DIR", help="keep the run directories and evals here")
    ap.add_argument("--from", dest="from_dir", metavar="DIR", type=Path,
                    help="train and evaluate nothing: redraw the table from the evals kept in DIR (by --keep)")
    ap.add_argument("--write", action="store_true",
                    help="with --from: write bench/results/learning_cpu_<date>.md from the kept runs too")
    a = ap.parse_args()
    if a.from_dir is not None:
        redraw(a)
        return
    t_all = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="fast_srt_learning_") if not a.keep else None
    work = Path(a.keep or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    warm = warm_start_dir()
    evals = {"base model": evaluate("default", work / "eval_base", a),
             "warm start": evaluate(str(warm), work / "eval_warm", a)}
    print(f"base model and warm start evaluated ({work})", flush=True)
    times = {}
    for seed in a.seeds:
        for mode in a.arms:
            arm = f"{mode} s{seed}" if len(a.seeds) > 1 else mode
            run = work / f"{mode}-{seed}"
            times[arm] = sh([FAST_SRT, "train", "cpu_default", *ARMS[mode], "--seed", str(seed),
                             "--steps", str(a.steps), "--save-every", str(a.steps), "--run-dir", str(run)],
                            work / f"train-{mode}-{seed}.log")
            evals[arm] = evaluate(str(run), run / "eval_report", a)
            print(f"{arm}: trained in {times[arm]:.0f} s, evaluated in {evals[arm]['seconds']:.0f} s", flush=True)
    write_report(evals, times, a, warm.name, work, "train, including its warm-up build, engines and eval during "
                 "training; then eval", (time.perf_counter() - t_all) / 60)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
