"""A judge's agreement with known labels (`fast-srt judge-eval`): per label, accuracy, AUC of the judge's own
score where it has one, and the confusion matrix.

Any judge with the Judge interface is measurable: the generative judge (the default model asked the questions,
WildGuard, Llama-Guard...) scores each label by its yes-minus-no log-prob margin at the answer's value token
(`Judge.score_with_margins`); the probe judge by its logits; a rule judge by its labels only (no AUC). A label the
judge answered n/a (or a pair it could not judge) counts as wrong for accuracy and is reported apart.
"""

from __future__ import annotations

import math

from fast_srt.engine.probe_judge import auc
from fast_srt.game.judge_set import LABELS, JudgePair


def judge_pairs(judge, pairs: list[JudgePair]) -> tuple[list, list[list[float]]]:
    """(labels per pair, three scores per pair: nan where the judge has none)."""
    query = [(p.prompt, p.response) for p in pairs]
    if hasattr(judge, "logits"):  # the probe judge: its logits are its scores, their signs its labels
        from fast_srt.game.judge import JudgeLabels

        logits, kept = judge.logits(query)
        scores = [[math.nan] * 3 for _ in pairs]
        labels: list = [None] * len(pairs)
        for j, row in zip(kept, logits.tolist()):
            scores[j] = row
            labels[j] = JudgeLabels(row[0] > 0, row[1] > 0, row[2] > 0)
        return labels, scores
    if hasattr(judge, "score_with_margins"):
        out = judge.score_with_margins(query)
        return [lab for lab, _, _ in out], [m for _, _, m in out]
    out = judge.score(query)
    return [lab for lab, _ in out], [[math.nan] * 3 for _ in pairs]


def agreement(pairs: list[JudgePair], labels: list, scores: list[list[float]]) -> dict:
    """Per label: n, accuracy, AUC (None without scores), confusion {tp, fp, tn, fn}, n/a count."""
    report = {}
    for j, name in enumerate(LABELS):
        truth = [getattr(p, name) for p in pairs]
        pred = [getattr(lab, name) if lab is not None and not lab.parse_error else None for lab in labels]
        cm = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
        na = 0
        for t, p in zip(truth, pred):
            if p is None:
                na += 1
                continue
            cm[("t" if p == t else "f") + ("p" if p else "n")] += 1
        s = [row[j] for row in scores]
        has = [k for k, v in enumerate(s) if not math.isnan(v)]
        report[name] = {
            "n": len(truth), "positives": sum(truth), "accuracy": (cm["tp"] + cm["tn"]) / max(1, len(truth)),
            "auc": auc([s[k] for k in has], [truth[k] for k in has]) if len(has) == len(truth) else None,
            "confusion": cm, "n_a": na, "said_yes": cm["tp"] + cm["fp"],
        }
    return report


def format_report(name: str, report: dict, n_pairs: int, seconds: float) -> str:
    lines = [f"judge {name}: {n_pairs} held-out pairs in {seconds:.1f}s",
             f"{'label':<18}{'n':>5}{'pos':>5}{'acc':>7}{'AUC':>7}   confusion (truth x said)      n/a",
             ]
    for label, r in report.items():
        cm = r["confusion"]
        a = "   -  " if r["auc"] is None or math.isnan(r["auc"]) else f"{r['auc']:6.3f}"
        lines.append(f"{label:<18}{r['n']:>5}{r['positives']:>5}{r['accuracy']:7.3f} {a}   "
                     f"yes->yes {cm['tp']:>3} yes->no {cm['fn']:>3} no->yes {cm['fp']:>3} no->no {cm['tn']:>3}"
                     f"{r['n_a']:>5}")
    return "\n".join(lines)
