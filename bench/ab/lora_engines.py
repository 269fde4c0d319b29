"""LoRA in one engine against LoRA with two engines and against full fine-tuning: peak resident memory and step
time of the same workload, measured with `fast-srt bench` (one fresh process per run, the set-ups interleaved
A B C A B C so that drift on a shared machine falls on all three alike).

The workload: `rl_only` (the default model, bf16, 8 games per step, 48 new tokens, fixed generation lengths) with
the policy's base model as judge (`--model.judge-model policy`), so that one engine can serve both:
  one engine   --lora-rank 16                        policy = base + adapter (LoRA request), judge = base;
                                                     each sync writes the adapter's tensors
  two engines  --lora-rank 16 --no-lora-in-engine    merged weights written into the policy engine, the judge on
                                                     a second engine
  full FT      (no LoRA)                             every weight trains and is written; the judge on a second
                                                     engine; the KL reference a second trainer copy

    .venv/bin/python bench/ab/lora_engines.py [--rounds 2] [--bench-steps 3]

Writes bench/results/lora_engines_cpu_<date>.md; prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE = ["rl_only", "--model.judge-model", "policy"]
SETUPS = {
    "LoRA r16, one engine": ["--lora-rank", "16"],
    "LoRA r16, two engines": ["--lora-rank", "16", "--no-lora-in-engine"],
    "full fine-tuning": [],
}
PHASES = ("generate", "judge", "logprob", "train", "sync", "step")


def run_one(extra: list[str], steps: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cmd = [str(ROOT / ".venv/bin/fast-srt"), "bench", *BASE, *extra, "--bench-steps", str(steps),
               "--out", str(Path(d) / "report.md")]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
        engines = next((x for x in p.stdout.splitlines() if " engine" in x and x[:1].isdigit()), "?")
        out = json.loads(p.stdout.strip().splitlines()[-1])
        return {"peak_gib": out["peak_gib"], "engines": engines,
                **{r["phase"]: r["seconds"] for r in out["phases"] if r["phase"] in PHASES}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bench-steps", type=int, default=3)
    a = ap.parse_args()
    results: dict[str, list[dict]] = {k: [] for k in SETUPS}
    for r in range(a.rounds):
        for name, extra in SETUPS.items():
            res = run_one(extra, a.bench_steps)
            results[name].append(res)
            print(f"round {r + 1} {name}: {res}", flush=True)
    full = statistics.median(x["step"] for x in results["full fine-tuning"])
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    lines = [f"commit {sha.strip() or 'unknown'}: `.venv/bin/python bench/ab/lora_engines.py --rounds {a.rounds} "
             f"--bench-steps {a.bench_steps}` "
             f"(each: `fast-srt bench {' '.join(BASE)} ...`, steps 2-{a.bench_steps}, medians over rounds; peak: "
             f"the process's peak RSS)", "",
             "| set-up | engines | peak RSS GiB | step s | generate s | judge s | log-prob s | train s | sync s | "
             "step vs full FT |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in results.items():
        med = {k: statistics.median(x[k] for x in rows) for k in ("peak_gib", *PHASES)}
        lines.append(f"| {name} | {rows[0]['engines']} | {med['peak_gib']:.2f} | {med['step']:.1f} | "
                     f"{med['generate']:.1f} | {med['judge']:.1f} | {med['logprob']:.1f} | {med['train']:.1f} | "
                     f"{med['sync']:.3f} | {med['step'] / full:.2f}x |")
    lines += ["", "Per run:", ""] + [f"- {name}: " + "; ".join(
        f"peak {x['peak_gib']:.2f} GiB, step {x['step']:.1f} s, sync {x['sync']:.3f} s" for x in rows)
        for name, rows in results.items()]
    text = "\n".join(lines)
    print(text)
    date = datetime.date.today().isoformat()
    out = ROOT / "bench" / "results" / f"lora_engines_cpu_{date}.md"
    out.write_text("# LoRA in one engine, two engines, full fine-tuning (CPU)\n\n" + text + "\n")
    print(f"report: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
