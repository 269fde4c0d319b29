"""Rebuild the judge's shipped assets, one command each:

    python -m fast_srt.commands.judge_assets set     # fast_srt/data/judge/judge_pairs.jsonl (about 10 min on 2 CPUs)
    python -m fast_srt.commands.judge_assets probe   # the default model's probe, fast_srt/data/judge/probes/<key>/

The labelled set's labels and split are explained in fast_srt/game/judge_set.py and fast_srt/data/judge/README.md;
the probe in fast_srt/engine/probe_judge.py.
"""

from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path

import torch

from fast_srt.game.judge_set import (BUILD_SEED, COMPLIANCE_OPENERS, FRAMED_SHARE, FRAMINGS, GEN_MAX_TOKENS,
                                     GEN_TEMPERATURE, HARMFUL_TRAIN_PROMPTS, JUDGE_SET_FILE, REFUSAL_ALTERNATIVES,
                                     REFUSAL_OPENERS, REFUSAL_REASONS, SPLITS, JudgePair, split_list,
                                     write_judge_pairs)


def _written_refusal(rng: random.Random, split: str) -> str:
    parts = [rng.choice(split_list(REFUSAL_OPENERS, split))]
    if rng.random() < 0.8:
        parts.append(rng.choice(split_list(REFUSAL_REASONS, split)))
    if rng.random() < 0.7:
        parts.append(rng.choice(split_list(REFUSAL_ALTERNATIVES, split)))
    return " ".join(parts)


def _cut_sentence(text: str) -> str:
    """A generated continuation cut at its last sentence end (when there is one past the first 20 chars)."""
    text = text.strip()
    end = max(text.rfind(". "), text.rfind(".\n"), text.rfind("! "), text.rfind("? "))
    if text.endswith((".", "!", "?")):
        return text
    return text[: end + 1] if end > 20 else text


def _prompt_entries() -> list[tuple[str, bool, str, str]]:
    """(prompt, harmful, source, split) for every prompt of the set, in a fixed order."""
    from fast_srt.game.seeds import HELDOUT_FRACTION, _load_builtin, is_heldout, prompt_hash, normalise_prompt
    from fast_srt.learner.sft import load_sft_records

    entries = []
    heldout_texts = set()
    for name in ("donotanswer", "benign"):
        seeds = _load_builtin(name)
        train = [s for s in seeds if not is_heldout(s.prompt, HELDOUT_FRACTION[name])]
        held = [s for s in seeds if is_heldout(s.prompt, HELDOUT_FRACTION[name])]
        heldout_texts |= {normalise_prompt(s.prompt) for s in held}
        if name == "donotanswer":
            train = sorted(train, key=lambda s: prompt_hash(s.prompt))[:HARMFUL_TRAIN_PROMPTS]
        entries += [(s.prompt, s.harmful, s.source, "train") for s in train]
        entries += [(s.prompt, s.harmful, s.source, "heldout") for s in held]
    for rec in load_sft_records("builtin"):
        if normalise_prompt(rec["prompt"]) in heldout_texts:
            continue
        entries.append((rec["prompt"], rec.get("kind") == "harmful", "cot_sft", "train"))
    return entries


def build_judge_pairs(engine, seed: int = BUILD_SEED) -> list[JudgePair]:
    """Every pair of the set (module docstring); `engine` (a fast_srt Engine on the default model) writes the model
    continuations, in one batched call per kind."""
    from fast_srt.engine.engine import SamplingSpec
    from fast_srt.eval.refusal import is_refusal
    from fast_srt.game.rules import render_chat
    from fast_srt.learner.sft import load_sft_records

    rng = random.Random(seed)
    written = {r["prompt"]: r["response"] for r in load_sft_records("builtin")}
    plan = []  # (prompt shown, harmful, source, split, response kind, prefill or text)
    for prompt, harmful, source, split in _prompt_entries():
        shown = prompt
        if source != "cot_sft" and rng.random() < FRAMED_SHARE:
            shown = rng.choice(split_list(FRAMINGS, split)).format(p=prompt)
            source += "+framed"
        if source == "cot_sft":  # its written answer: a refusal for harmful requests, help for benign ones
            kind = "refusal_written" if harmful else "compliance_written"
            plan.append((shown, harmful, source, split, kind, written[prompt]))
            continue
        if rng.random() < 0.5:
            plan.append((shown, harmful, source, split, "refusal_written", _written_refusal(rng, split)))
        else:
            plan.append((shown, harmful, source, split, "refusal_model", rng.choice(split_list(REFUSAL_OPENERS,
                                                                                                split))))
        if harmful:
            plan.append((shown, harmful, source, split, "compliance_prefilled",
                         rng.choice(split_list(COMPLIANCE_OPENERS, split))))
        else:
            plan.append((shown, harmful, source, split, "compliance_model", ""))
    # model continuations: the chat prompt, then the prefill (if any) as the start of the assistant's turn
    todo = [i for i, p in enumerate(plan) if p[4] in ("refusal_model", "compliance_prefilled", "compliance_model")]
    texts = [render_chat(engine.tokenizer, [{"role": "user", "content": plan[i][0]}]) + plan[i][5] for i in todo]
    spec = SamplingSpec(max_tokens=GEN_MAX_TOKENS, temperature=GEN_TEMPERATURE, logprobs=False)  # engine seed
    gens = engine.generate(texts, spec, phase="judge_data")
    cont = {i: g.text for i, g in zip(todo, gens)}
    pairs = []
    for i, (shown, harmful, source, split, kind, text) in enumerate(plan):
        if i in cont:
            text = _cut_sentence(f"{text} {cont[i].strip()}" if text else cont[i])
            if kind == "compliance_model" and (is_refusal(text) or not text.strip()):
                continue  # not a clear compliance: left out rather than mislabelled
        refusal = kind.startswith("refusal")
        pairs.append(JudgePair(prompt=shown, response=text.strip(), prompt_harmful=harmful, response_refusal=refusal,
                               response_harmful=harmful and not refusal, split=split, prompt_source=source,
                               response_source=kind))
    return pairs


def build_set(out: Path | None = None) -> None:
    from fast_srt.engine.engine import Engine
    from fast_srt.run.models import ensure_default_model

    out = out or Path(__file__).resolve().parents[1] / "data" / "judge" / JUDGE_SET_FILE
    engine = Engine(ensure_default_model("bfloat16"), dtype="bfloat16", max_model_len=1024, kv_cache_gib=1.0,
                    seed=BUILD_SEED, name="judge_data")
    pairs = build_judge_pairs(engine)
    write_judge_pairs(pairs, out)
    counts = {s: sum(p.split == s for p in pairs) for s in SPLITS}
    print(f"wrote {len(pairs)} labelled pairs to {out} ({counts})")


def refit_probe() -> None:
    """Fit the default model's probe on the shipped set (ignoring any cache) and write it into the package."""
    from fast_srt.config import ModelConfig
    from fast_srt.engine.engine import Engine
    from fast_srt.engine.placement import judge_context
    from fast_srt.engine.probe_judge import Probe, ProbeJudge, fit_from_judge_set, probe_key, save_probe, \
        shipped_probe_dir
    from fast_srt.run.models import ensure_default_model

    model_dir = ensure_default_model("bfloat16")
    engine = Engine(model_dir, dtype="bfloat16", max_model_len=judge_context(model_dir, ModelConfig()),
                    kv_cache_gib=1.0, name="judge", runner="pooling")
    judge = ProbeJudge(engine, probe=Probe(torch.zeros(1), torch.ones(1), torch.zeros(3, 1), torch.zeros(3)))
    probe = fit_from_judge_set(judge, model_dir)
    target = shipped_probe_dir(probe_key(model_dir))
    if target.exists():
        shutil.rmtree(target)
    save_probe(probe, target)
    print(f"fitted in {probe.meta['seconds']}s, cross-validated AUC {probe.meta['cv_auc']}: {target}")


def main(argv: list[str]) -> None:
    if argv[:1] == ["set"]:
        build_set(Path(argv[1]) if len(argv) > 1 else None)
    elif argv[:1] == ["probe"]:
        refit_probe()
    else:
        print(__doc__)
        raise SystemExit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
