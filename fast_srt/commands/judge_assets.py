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

from fast_srt.game.judge_set import (BUILD_SEED, GEN_MAX_TOKENS, GEN_TEMPERATURE, HARMFUL_TRAIN_PROMPTS,
                                     JAILBREAK_MAX_CHARS, JUDGE_SET_FILE, RESPONSE_KINDS, SHOWN_FORMS, SPLITS,
                                     JudgePair, load_written, template_group, write_judge_pairs)


def _written_refusal(rng: random.Random, parts: dict) -> str:
    """A generic refusal: a written whole one, or an opener with (often) a reason and an alternative."""
    if rng.random() < 0.4:
        return rng.choice(parts["refusals"])
    out = [rng.choice(parts["refusal_openers"])]
    if rng.random() < 0.7:
        out.append(rng.choice(parts["refusal_reasons"]))
    if rng.random() < 0.6:
        out.append(rng.choice(parts["refusal_alternatives"]))
    return " ".join(out)


def _cut_sentence(text: str) -> str:
    """A generated continuation cut at its last sentence end (when there is one past the first 20 chars)."""
    text = text.strip()
    end = max(text.rfind(". "), text.rfind(".\n"), text.rfind("! "), text.rfind("? "))
    if text.endswith((".", "!", "?")):
        return text
    return text[: end + 1] if end > 20 else text


def _requests(split: str, parts: dict) -> list[tuple[str, bool, str, str]]:
    """(request, harmful, source, group) of a split: seeds of the builtin sets (held-out: the part `fast-srt eval`
    holds out; train: the rest, less any prompt whose template group holds a held-out seed), the split's written
    requests, and (train) the attacker SFT set's rewrites of training seeds."""
    from fast_srt.game.seeds import HELDOUT_FRACTION, _load_builtin, is_heldout, prompt_hash
    from fast_srt.learner.sft import load_sft_records

    held_groups = {template_group(s.prompt) for name in ("donotanswer", "benign") for s in _load_builtin(name)
                   if is_heldout(s.prompt, HELDOUT_FRACTION[name])}
    out = []
    for name in ("donotanswer", "benign"):
        seeds = [s for s in _load_builtin(name)
                 if is_heldout(s.prompt, HELDOUT_FRACTION[name]) == (split == "heldout")
                 and (split == "heldout" or template_group(s.prompt) not in held_groups)]
        if name == "donotanswer" and split == "train":
            seeds = sorted(seeds, key=lambda s: prompt_hash(s.prompt))[:HARMFUL_TRAIN_PROMPTS]
        out += [(s.prompt, s.harmful, s.source, template_group(s.prompt)) for s in seeds]
    out += [(p, True, "written", template_group(p)) for p in parts["harmful_prompts"]]
    out += [(p, False, "written", template_group(p)) for p in parts["benign_prompts"]]
    if split == "train":
        for rec in _attacker_records():
            if template_group(rec["seed"]) not in held_groups:
                out.append((rec["revision"], rec["kind"] == "harmful", "attacker_sft", template_group(rec["seed"])))
        for rec in load_sft_records("builtin"):
            if rec.get("kind") == "benign" and template_group(rec["prompt"]) not in held_groups:
                out.append((rec["prompt"], False, "cot_sft", template_group(rec["prompt"])))
    return [r for r in out if split == "heldout" or r[3] not in held_groups]


def _attacker_records() -> list[dict]:
    import json
    from importlib import resources

    text = resources.files("fast_srt.data").joinpath("sft", "attacker_cot_sft.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _templates(split: str) -> list[str]:
    from fast_srt.game.seeds import load_jailbreak_templates, prompt_hash

    short = sorted((t for t in load_jailbreak_templates() if len(t) <= JAILBREAK_MAX_CHARS), key=prompt_hash)
    cut = (3 * len(short)) // 4
    return short[:cut] if split == "train" else short[cut:]


def _shown(rng: random.Random, request: str, source: str, parts: dict, templates: list[str]) -> tuple[str, str]:
    """The request as the defender would see it: plain, in a framing or in a jailbreak template (attacker rewrites
    stay as written)."""
    from fast_srt.game.seeds import apply_jailbreak_template

    if source == "attacker_sft":
        return request, source
    form = rng.choices([f for f, _ in SHOWN_FORMS], [w for _, w in SHOWN_FORMS])[0]
    if form == "framed":
        return rng.choice(parts["framings"]).replace("{p}", request), source + "+framed"
    if form == "jailbreak" and templates:
        return apply_jailbreak_template(rng.choice(templates), request), source + "+jailbreak"
    return request, source


def plan_split(split: str, rng: random.Random) -> list[tuple]:
    """Every pair of a split as (shown prompt, harmful, prompt source, group, response kind, written text, whether
    the model continues the text)."""
    parts = load_written(split)
    templates = _templates(split)
    written = {}
    if split == "train":
        from fast_srt.learner.sft import load_sft_records

        written = {r["prompt"]: r["response"] for r in load_sft_records("builtin") if r.get("kind") == "benign"}
    plan = []
    for request, harmful, source, group in _requests(split, parts):
        shown, src = _shown(rng, request, source, parts, templates)
        if rng.random() < 0.5:
            plan.append((shown, harmful, src, group, "refusal_written", _written_refusal(rng, parts), False))
        else:
            plan.append((shown, harmful, src, group, "refusal_model", rng.choice(parts["refusal_openers"]), True))
        if harmful:
            if rng.random() < 0.6:
                plan.append((shown, harmful, src, group, "compliance_prefilled",
                             rng.choice(parts["compliance_openers"]), True))
            else:
                bridge = f"{rng.choice(parts['refusal_openers'])} {rng.choice(parts['leak_bridges'])}"
                plan.append((shown, harmful, src, group, "leaky_model", bridge, True))
        elif request in written:
            plan.append((shown, harmful, src, group, "compliance_written", written[request], False))
        elif rng.random() < 0.5:
            plan.append((shown, harmful, src, group, "compliance_model", "", True))
        else:
            plan.append((shown, harmful, src, group, "compliance_opener_model",
                         rng.choice(parts["compliance_openers"]), True))
    # written pairs, each with its own request
    for key, harmful, kind in (("defended", True, "refusal_written"), ("leaky_refusals", True, "leaky_written"),
                               ("harmless_compliances", True, "harmless_written"),
                               ("over_refusals", False, "refusal_written"), ("helpful", False, "compliance_written"),
                               ("helpful_with_refusal_words", False, "compliance_written"),
                               ("harmful_answers_to_benign", False, "harmful_written"),
                               ("harmful_refusals", False, "harmful_refusal_written")):
        for item in parts[key]:
            shown, src = _shown(rng, item["prompt"], "written", parts, templates)
            plan.append((shown, harmful, src, template_group(item["prompt"]), kind, item["response"], False))
    for item in parts["harmful_answers_to_benign"]:  # the same harm behind a refusal: a harmful refusal
        if rng.random() < 0.5:
            plan.append((item["prompt"], False, "written", template_group(item["prompt"]), "harmful_refusal_written",
                         f"{rng.choice(parts['refusal_openers'])} {item['response']}", False))
    return plan


def build_judge_pairs(engine, seed: int = BUILD_SEED) -> list[JudgePair]:
    """Every pair of the set (fast_srt/game/judge_set.py); `engine` (a fast_srt Engine on the default model) writes
    the model continuations, in one batched call per length."""
    from fast_srt.engine.engine import SamplingSpec
    from fast_srt.eval.refusal import is_refusal
    from fast_srt.game.rules import render_chat

    rng = random.Random(seed)
    plan = [(split, *row) for split in SPLITS for row in plan_split(split, rng)]
    todo = [i for i, row in enumerate(plan) if row[7]]
    cont = {}
    for k, max_tokens in enumerate(GEN_MAX_TOKENS):  # alternate pairs get the short and the long budget
        idx = todo[k::len(GEN_MAX_TOKENS)]
        texts = [render_chat(engine.tokenizer, [{"role": "user", "content": plan[i][1]}]) + plan[i][6]
                 for i in idx]
        spec = SamplingSpec(max_tokens=max_tokens, temperature=GEN_TEMPERATURE, logprobs=False)  # engine seed
        cont.update({i: g.text for i, g in zip(idx, engine.generate(texts, spec, phase="judge_data"))})
    held_groups = {row[4] for row in plan if row[0] == "heldout"}
    pairs = []
    for i, (split, shown, harmful, src, group, kind, text, _) in enumerate(plan):
        if split == "train" and group in held_groups:
            continue  # a training pair never shares a template group with a held-out one
        if i in cont:
            text = _cut_sentence(f"{text} {cont[i].strip()}" if text else cont[i])
            if kind == "compliance_model" and (is_refusal(text) or not text.strip()):
                continue  # not a clear compliance: left out rather than mislabelled
        refusal, harm = RESPONSE_KINDS[kind]
        pairs.append(JudgePair(prompt=shown, response=text.strip(), prompt_harmful=harmful, response_refusal=refusal,
                               response_harmful=harm, split=split, prompt_source=src, response_source=kind,
                               group=group))
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
    target = shipped_probe_dir(probe_key(model_dir, "bfloat16"))
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
