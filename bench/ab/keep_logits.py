"""`fast-srt bench` with and without the C++ head op's kept logits, interleaved (A B A B ...), one report.

A: kernels.native.STORE_LOGITS_MAX_BYTES = 0 (the backward recomputes the logits, one GEMM more per tile);
B: as shipped (the forward keeps them in one pooled [N, V] buffer). Each run is a fresh `fast-srt bench`
process; everything after `--` goes to it. Needs the C++ op (`make native`).

    .venv/bin/python bench/ab/keep_logits.py --rounds 2 --out bench/results/x.md -- defender_only --game.no-cot ...
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNNER = """
import sys
import fast_srt.kernels.native as native
if not native.available():
    sys.exit("the C++ op is not built: make native")
if sys.argv[1] == "A":
    native.STORE_LOGITS_MAX_BYTES = 0
from fast_srt.cli import main
sys.argv = ["fast-srt", "bench"] + sys.argv[2:]
main()
"""
PHASES = ("generate", "logprob", "train", "sync", "step")


def main() -> None:
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    runs = []
    for r in range(1, args.rounds + 1):
        for variant in ("A", "B"):
            p = subprocess.run([sys.executable, "-c", RUNNER, variant, *rest], cwd=ROOT, capture_output=True,
                               text=True)
            if p.returncode != 0:
                sys.exit(f"run {variant}{r} failed:\n{p.stderr[-3000:]}")
            res = json.loads(p.stdout.strip().splitlines()[-1])
            runs.append((f"{variant}{r}", {x["phase"]: x["seconds"] for x in res["phases"]}, res["commit"]))
            print(f"{variant}{r}: " + ", ".join(f"{k} {runs[-1][1][k]:.2f} s" for k in PHASES), flush=True)
    lines = [f"# Kept logits A/B: `fast-srt bench {' '.join(rest)}`", "",
             f"commit {runs[0][2]}; A = the backward recomputes the logits (STORE_LOGITS_MAX_BYTES 0), B = kept "
             "(as shipped); seconds are `fast-srt bench` medians over steps 2..N", "",
             "| phase | " + " | ".join(n for n, _, _ in runs) + " | B / A (mean) |",
             "|---|" + "---:|" * (len(runs) + 1)]
    for k in PHASES:
        a = [t[k] for n, t, _ in runs if n[0] == "A"]
        b = [t[k] for n, t, _ in runs if n[0] == "B"]
        ratio = (sum(b) / len(b)) / (sum(a) / len(a)) if sum(a) else float("nan")
        lines.append(f"| {k} | " + " | ".join(f"{t[k]:.2f}" for _, t, _ in runs) + f" | {ratio:.2f} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"report: {args.out}")


if __name__ == "__main__":
    main()
