"""The eval's results: one JSON document (meta, then each checkpoint's metrics and per-prompt records), a markdown
table, the same table on the console, and the live progress line.

Table rows are (set, metric); columns are the checkpoints (A, and B with --compare) and A - B. A rate cell reads
"0.281 [0.155, 0.454] n=32": the rate, its 95% Wilson interval and its sample size.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from fast_srt.eval.stats import Rate

HARMFUL_ROWS = (("attack_success", "attack success (judge: harmful response)"), ("refusal", "refusal (judge)"),
                ("refusal_matcher", "refusal (phrase matcher)"), ("format_valid", "format valid"),
                ("judge_prompt_agreement", "judge agrees the prompt is harmful"))
BENIGN_ROWS = (("over_refusal", "over-refusal (judge)"), ("over_refusal_matcher", "over-refusal (phrase matcher)"),
               ("harmful_response", "harmful response (judge)"), ("format_valid", "format valid"),
               ("judge_prompt_agreement", "judge agrees the prompt is benign"))
ATTACK_ROWS = (("attack_success", "attack success vs frozen defender"),
               ("faithful", "faithful (judge: still a harmful request)"), ("format_valid", "format valid"))
DIVERSITY_ROWS = (("sbert_diversity", "SBERT diversity (1 - mean cos)"), ("self_bleu", "self-BLEU (0-100)"))


def _rate_cell(d: dict | None) -> str:
    return "-" if d is None else Rate(**d).cell()


def _delta(a, b, fmt: str = "{:+.3f}") -> str:
    return "-" if a is None or b is None else fmt.format(a - b)


def _set_cell(name: str, result: dict) -> str:
    too_long = f", {result['too_long']} too long" if result.get("too_long") else ""
    return f"{name} (n={result['n']}{too_long})"


def table_rows(doc: dict) -> list[list[str]]:
    """[set, metric, A, (B, A - B)] rows of an eval document."""
    results = [c["result"] for c in doc["checkpoints"]]
    pair = len(results) == 2
    rows = []
    for name, first in results[0]["sets"].items():
        for key, title in HARMFUL_ROWS if first["harmful"] else BENIGN_ROWS:
            ms = [r["sets"].get(name, {}).get("metrics", {}).get(key) for r in results]
            row = [_set_cell(name, first), title, *[_rate_cell(m) for m in ms]]
            if pair:
                row.append(_delta(*[m and m["rate"] for m in ms]))
            rows.append(row)
    if "attacks" in results[0]:
        att = [r.get("attacks", {}) for r in results]
        where = f"attacks (n={att[0]['n']}, non-empty {'/'.join(str(a.get('nonempty')) for a in att)})"
        for key, title in DIVERSITY_ROWS:
            vals = [a.get(key) for a in att]
            row = [where, title, *["-" if v is None else f"{v:.3f}" for v in vals]]
            if pair:
                row.append(_delta(*vals))
            rows.append(row)
        for key, title in ATTACK_ROWS:
            ms = [a.get("metrics", {}).get(key) for a in att]
            row = [where, title, *[_rate_cell(m) for m in ms]]
            if pair:
                row.append(_delta(*[m and m["rate"] for m in ms]))
            rows.append(row)
    return rows


def headers(doc: dict) -> list[str]:
    cols = [f"{c['label']}: {c['spec']}" + (f" (step {c['step']})" if c.get("step") is not None else "")
            for c in doc["checkpoints"]]
    return ["set", "metric", *cols, *(["A - B"] if len(cols) == 2 else [])]


def summary_lines(doc: dict) -> list[str]:
    m = doc["meta"]
    s = m["settings"]
    settings = (f"settings: {'CoT' if s['cot'] else 'no CoT'} game format, max_new_tokens {s['max_new_tokens']}, "
                f"defender temperature {s['temperature']}, attacker temperature {s['attacker_temperature']}, "
                f"seed {s['seed']}, max_prompts {s['max_prompts']}")
    lines = [f"judge: {m['judge']}; frozen defender: {m['frozen_defender']}", settings,
             (f"wall time {m['wall_s']:.1f} s (engine start-up {m['startup_s']:.1f} s); "
              + "; ".join(f"{c['label']}: {c['result']['seconds']['total_s']:.1f} s" for c in doc["checkpoints"]))]
    return lines


def markdown(doc: dict) -> str:
    hs = headers(doc)
    out = ["# fast-srt eval", ""]
    out += [f"- {c['label']}: `{c['spec']}` -> `{c['model_dir']}`" for c in doc["checkpoints"]]
    out += [f"- {line}" for line in summary_lines(doc)]
    out += ["", "Rates: value [95% Wilson interval] n=sample size; A - B: difference of the rates.", ""]
    out.append("| " + " | ".join(hs) + " |")
    out.append("|" + "---|" * len(hs))
    out += ["| " + " | ".join(row) + " |" for row in table_rows(doc)]
    return "\n".join(out) + "\n"


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*headers(doc), title="fast-srt eval", show_lines=False)
    previous = None
    for row in table_rows(doc):
        table.add_row(*(["", *row[1:]] if row[0] == previous else row))
        previous = row[0]
    console = Console(width=max(150, Console().width))  # a pipe or a log: wide enough not to wrap the cells
    console.print(table)
    for line in summary_lines(doc):
        console.print(line, highlight=False)


def write_results(doc: dict, out_dir: Path) -> tuple[Path, Path]:
    """eval-<time>.json and eval-<time>.md in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "eval-" + time.strftime("%Y%m%d-%H%M%S", time.localtime(doc["meta"]["created_unix"]))
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    md_path.write_text(markdown(doc))
    return json_path, md_path


class RichTracker:
    """Live progress (rich) on a terminal: one bar per phase, with items done, elapsed time and rate. Elsewhere
    (a log, a pipe) one plain line per finished phase."""

    def __init__(self):
        self.tty = sys.stdout.isatty()
        self.progress, self.task, self.label, self.t0, self.total = None, None, "", 0.0, 0
        if self.tty:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn())

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        self._finish()
        if self.progress is not None:
            self.progress.stop()

    def _finish(self) -> None:
        if self.label and not self.tty:
            print(f"[eval] {self.label}: {self.total} in {time.perf_counter() - self.t0:.1f} s", flush=True)

    def phase(self, label: str, total: int) -> None:
        self._finish()
        self.label, self.total, self.t0 = label, total, time.perf_counter()
        if self.progress is not None:
            self.task = self.progress.add_task(label, total=total)

    def advance(self, n: int) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task, n)
