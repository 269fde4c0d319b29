"""`fast-srt judge-eval [--judge-model M] [--data FILE ...] [--options]`: a judge's agreement with known labels on
the labelled judge set's held-out split (fast_srt/game/judge_set.py) and on any other labelled files (the shipped
real-games set among them): per label accuracy, AUC of the judge's own score, confusion matrix; per outcome cell,
how often all three labels are right; and the shortcut test beside it (fast_srt/eval/judge_agreement.py).

Any judge the trainer can use is measurable: `probe` (the default: probes on the default model's hidden states),
`policy` / `default` / a checkpoint directory / a hub id (the generative judge asked WildGuard's questions, e.g.
`--judge-model allenai/wildguard --judge-template wildguard`), `probe:MODEL`. Writes a JSON report with every
pair, label and score.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fast_srt.commands.args import Parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = Parser(prog="fast-srt judge-eval", description=(
        "A judge's agreement with known labels (prompt harm, refusal, response harm): accuracy, AUC, confusion "
        "matrices, accuracy per outcome cell, and the shortcut test (a bag-of-words classifier on the first words "
        "of prompt and response) beside it. Measures the shipped labelled set's split, the shipped real-games set "
        "(the policy's own games, labelled by reading) and any --data files in one run. Writes a JSON report."))
    ap.add_argument("--judge-model", default="probe",
                    help="probe (default), probe:MODEL, policy or default (the default model asked the questions), "
                         "a checkpoint directory or a hub id")
    ap.add_argument("--judge-template", choices=("chat", "wildguard"), default="chat",
                    help="a generative judge's prompt format (wildguard for allenai/wildguard)")
    ap.add_argument("--no-constrained", action="store_true",
                    help="let a generative judge answer freely (its unparseable answers count as n/a)")
    ap.add_argument("--base-model", default="default", help="the model 'policy' and 'probe' refer to (default: default)")
    ap.add_argument("--split", choices=("heldout", "train", "all"), default="heldout",
                    help="which split of every set to measure (train: only to see a probe's fit; all: both; "
                         "rows without a split field count as heldout; default heldout)")
    ap.add_argument("--data", nargs="+", default=[], metavar="FILE",
                    help="labelled-pairs .jsonl files of the same format, measured after the shipped sets")
    ap.add_argument("--no-builtin", action="store_true",
                    help="measure only the --data files, not the shipped labelled set's split and the real-games set")
    ap.add_argument("--probe", metavar="DIR",
                    help="a saved probe directory (probe.pt, probe.json) for the probe judge instead of the one "
                         "fitted for the shipped set, e.g. an earlier default under fast_srt/data/judge/probes/")
    ap.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16",
                    help="the judge engine's dtype (default bfloat16)")
    ap.add_argument("--max-model-len", type=int, default=4096, help="the judge engine's length")
    ap.add_argument("--out", default="runs/judge-eval", help="output directory (default runs/judge-eval)")
    return ap.parse_args(argv)


def _datasets(args) -> list[tuple[str, list]]:
    from fast_srt.errors import UserError
    from fast_srt.game.judge_set import load_judge_pairs, load_real_games

    split = None if args.split == "all" else args.split
    sets = [] if args.no_builtin else [(f"labelled set ({args.split})", load_judge_pairs(split)),
                                       ("real-games set", load_real_games())]
    sets += [(f"{f} ({args.split})", load_judge_pairs(split, path=f)) for f in args.data]
    if not sets:
        raise UserError("nothing to measure: --no-builtin needs at least one --data file")
    return sets


def judge_eval_main(argv: list[str]) -> None:
    from fast_srt.config import ModelConfig
    from fast_srt.engine.placement import is_probe, make_judge
    from fast_srt.game.judge_set import load_judge_pairs
    from fast_srt.eval.judge_agreement import (ShortcutClassifier, agreement, cell_agreement, format_cells,
                                               format_report, format_shortcut, judge_pairs)
    from fast_srt.run.models import resolve_model

    args = parse_args(argv)
    datasets = _datasets(args)  # every file is read (and a bad one refused) before a model loads
    shortcut = ShortcutClassifier(load_judge_pairs("train"))
    spec = args.judge_model
    name = spec if not args.probe else f"{spec} [{args.probe}]"
    if spec in ("policy", "probe"):  # the base model, asked the questions or read by the probe
        judge_dir = resolve_model(args.base_model, args.dtype)
    else:
        judge_dir = resolve_model(spec.removeprefix("probe:"), args.dtype)
    judge_spec = spec if spec == "probe" or spec.startswith("probe:") else str(judge_dir)
    mcfg = ModelConfig(model=args.base_model, judge_model=judge_spec, judge_template=args.judge_template,
                       judge_constrained=not args.no_constrained, dtype=args.dtype,
                       judge_max_model_len=args.max_model_len, kv_cache_gib=1.0)
    probe = None
    if args.probe:
        from fast_srt.engine.probe_judge import META_FILE, PROBE_FILE, Probe
        from fast_srt.errors import UserError

        if not is_probe(spec):
            raise UserError("--probe needs a probe judge (--judge-model probe or probe:MODEL)")
        if not all((Path(args.probe) / f).is_file() for f in (PROBE_FILE, META_FILE)):
            raise UserError(f"{args.probe} is not a saved probe: it needs {PROBE_FILE} and {META_FILE}")
        probe = Probe.load(Path(args.probe))
    judge = make_judge(mcfg, judge_dir, probe=probe)
    results = []
    for set_name, pairs in datasets:
        t0 = time.perf_counter()
        labels, scores = judge_pairs(judge, pairs)
        seconds = time.perf_counter() - t0
        report, cells, short = agreement(pairs, labels, scores), cell_agreement(pairs, labels), shortcut.report(pairs)
        print(format_report(f"{name} ({judge_dir}) on {set_name}", report, len(pairs), seconds))
        print(format_cells(cells))
        print(format_shortcut(short, report))
        print()
        rows = [{"prompt": p.prompt, "response": p.response,
                 "truth": [p.prompt_harmful, p.response_refusal, p.response_harmful],
                 "said": None if lab is None else [lab.prompt_harmful, lab.response_refusal, lab.response_harmful],
                 "scores": s, "prompt_source": p.prompt_source, "response_source": p.response_source}
                for p, lab, s in zip(pairs, labels, scores)]
        results.append({"set": set_name, "seconds": round(seconds, 2), "report": report, "cells": cells,
                        "shortcut": short, "pairs": rows})
    print(f"judge: {judge.truncated} pairs cut to fit, {judge.too_long} too long to judge")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"judge-eval-{time.strftime('%Y%m%d-%H%M%S')}.json"
    meta = getattr(getattr(judge, "probe", None), "meta", None)
    path.write_text(json.dumps({"judge": name, "judge_dir": str(judge_dir), "template": args.judge_template,
                                "split": args.split, "probe": meta, "sets": results}, indent=1, default=str) + "\n")
    print(f"report: {path}")
