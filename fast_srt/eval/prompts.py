"""Prompt sets for `fast-srt eval`: what the defender is asked, and whether a good defender should refuse it.

Built in (never training seeds: fast_srt.game.seeds, "Held-out split"):
- `heldout_harmful`: the held-out part of Do-Not-Answer (90 requests);
- `heldout_jailbreak`: the same requests, each wrapped in a shipped jailbreak template: request i (in sample order)
  gets DAN template i//2 mod 14 when i is even, in-the-wild template i//2 mod 85 when i is odd;
- `heldout_benign`: the held-out part of the benign set (everyday requests and harmless ones that sound alarming).
From the user's files (pure Python readers of the public formats):
- `.txt` / `.jsonl` prompt files (fast_srt.game.seeds formats), marked harmful or benign by the flag they come with;
- HarmBench behaviours CSV (`Behavior`, optional `ContextString`, `FunctionalCategory`): harmful; a contextual
  behaviour is asked as "{ContextString}\\n\\n---\\n\\n{Behavior}" (HarmBench's own format); copyright behaviours are
  left out (their harm is verbatim reproduction, which HarmBench scores with a hash classifier, not a judge LM);
- XSTest CSV (`prompt`, `type`, `label` safe/unsafe): `xstest_safe` (benign) and `xstest_unsafe` (harmful);
- WildJailbreak (`vanilla`, `adversarial`, `data_type`; via fast_srt.game.seeds.load_wildjailbreak): one set per
  data type present.
`sample` keeps the n prompts with the smallest sha256 of their normalised text: a fixed, order-independent sample
spread over a file's sections.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, replace
from pathlib import Path

from fast_srt.errors import UserError, read_user_text
from fast_srt.game.seeds import (
    WILDJAILBREAK_TYPES,
    apply_jailbreak_template,
    load_heldout,
    load_jailbreak_templates,
    load_seeds,
    load_wildjailbreak,
    prompt_hash,
)


@dataclass(frozen=True)
class EvalPrompt:
    text: str  # what the defender is asked
    harmful: bool  # whether a safe defender should refuse it
    source: str = ""
    request: str = ""  # the plain request inside `text` (jailbreak-wrapped sets), else ""
    note: str = ""  # template id, XSTest type, HarmBench category


@dataclass(frozen=True)
class PromptSet:
    name: str
    harmful: bool  # harmful sets: attack success and refusal; benign sets: over-refusal
    prompts: tuple[EvalPrompt, ...]


def sample(prompts, n: int | None):
    """The n prompts with the smallest sha256 of their normalised text (all of them when n is None or larger)."""
    ordered = sorted(prompts, key=lambda p: prompt_hash(p.text if isinstance(p, EvalPrompt) else p.prompt))
    return ordered if n is None else ordered[:n]


def heldout_sets(max_prompts: int | None) -> list[PromptSet]:
    """heldout_harmful, heldout_jailbreak (the same requests in templates) and heldout_benign."""
    harmful = [EvalPrompt(s.prompt, True, s.source) for s in sample(load_heldout("donotanswer"), max_prompts)]
    benign = [EvalPrompt(s.prompt, False, s.source) for s in sample(load_heldout("benign"), max_prompts)]
    return [PromptSet("heldout_harmful", True, tuple(harmful)),
            PromptSet("heldout_jailbreak", True, tuple(jailbreak_wrap(harmful))),
            PromptSet("heldout_benign", False, tuple(benign))]


def jailbreak_wrap(prompts: list[EvalPrompt]) -> list[EvalPrompt]:
    """Each request in a shipped template, alternating DAN and in-the-wild (module docstring)."""
    families = {"dan": load_jailbreak_templates("dan"), "inthewild": load_jailbreak_templates("inthewild")}
    out = []
    for i, p in enumerate(prompts):
        family = "dan" if i % 2 == 0 else "inthewild"
        k = (i // 2) % len(families[family])
        out.append(EvalPrompt(apply_jailbreak_template(families[family][k], p.text), p.harmful, p.source,
                              request=p.text, note=f"{family}[{k}]"))
    return out


def user_set(path: str | Path, harmful: bool, max_prompts: int | None) -> PromptSet:
    """A .txt/.jsonl prompt file marked harmful or benign; JSONL lines that carry the other label are refused."""
    seeds = load_seeds(Path(path), harmful=harmful)
    wrong = [s for s in seeds if s.harmful != harmful]
    if wrong:
        raise UserError(f"{path}: given as {'harmful' if harmful else 'benign'} prompts, but {len(wrong)} line(s) "
                        f"say \"harmful\": {str(not harmful).lower()}; split the file by label")
    prompts = tuple(EvalPrompt(s.prompt, harmful, s.source) for s in sample(seeds, max_prompts))
    return PromptSet(Path(path).stem, harmful, prompts)


def _read_csv(path: str | Path, what: str, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    text = read_user_text(path, f"{what} file", f"a {what} CSV file with columns {', '.join(required)}")
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise UserError(f"{what} file {str(path)!r} lacks column(s) {', '.join(missing)} (has "
                        f"{', '.join(reader.fieldnames or []) or 'none'}); pass the {what} CSV in its public format")
    try:
        rows = [(i, row) for i, row in enumerate(reader, start=2)]
    except csv.Error as e:
        raise UserError(f"{what} file {str(path)!r}: not valid CSV ({e})") from None
    if not rows:
        raise UserError(f"{what} file {str(path)!r} holds no rows")
    return rows


def _cell(row: dict, key: str, where: str) -> str:
    value = (row.get(key) or "").strip()
    if not value:
        raise UserError(f"{where}: empty {key!r}")
    return value


def harmbench_set(path: str | Path, max_prompts: int | None) -> PromptSet:
    """HarmBench behaviours (module docstring); all harmful."""
    prompts = []
    for i, row in _read_csv(path, "HarmBench", ("Behavior",)):
        category = (row.get("FunctionalCategory") or "standard").strip()
        if category == "copyright":
            continue
        behavior = _cell(row, "Behavior", f"{path}:{i}")
        context = (row.get("ContextString") or "").strip()
        text = f"{context}\n\n---\n\n{behavior}" if context else behavior
        prompts.append(EvalPrompt(text, True, "harmbench", request=behavior if context else "", note=category))
    if not prompts:
        raise UserError(f"HarmBench file {str(path)!r} holds only copyright behaviours, which eval leaves out")
    return PromptSet("harmbench", True, tuple(sample(prompts, max_prompts)))


def xstest_sets(path: str | Path, max_prompts: int | None) -> list[PromptSet]:
    """XSTest: safe prompts (over-refusal) and unsafe contrast prompts (refusal)."""
    by_label: dict[str, list[EvalPrompt]] = {"safe": [], "unsafe": []}
    for i, row in _read_csv(path, "XSTest", ("prompt", "type", "label")):
        label = (row.get("label") or "").strip().lower()
        if label not in by_label:
            raise UserError(f"{path}:{i}: 'label' must be safe or unsafe, got {row.get('label')!r}")
        prompt = _cell(row, "prompt", f"{path}:{i}")
        by_label[label].append(EvalPrompt(prompt, label == "unsafe", "xstest", note=(row.get("type") or "").strip()))
    return [PromptSet(f"xstest_{label}", label == "unsafe", tuple(sample(ps, max_prompts)))
            for label, ps in by_label.items() if ps]


def wildjailbreak_sets(path: str | Path, max_prompts: int | None) -> list[PromptSet]:
    """One set per WildJailbreak data type present in the file (its `eval` split has adversarial types only)."""
    seeds = load_wildjailbreak(path, data_types=WILDJAILBREAK_TYPES)
    out = []
    for t in WILDJAILBREAK_TYPES:
        ps = [EvalPrompt(s.prompt, s.harmful, "wildjailbreak", note=t) for s in seeds if s.source.endswith(t)]
        if ps:
            out.append(PromptSet(f"wildjailbreak_{t}", t.endswith("_harmful"), tuple(sample(ps, max_prompts))))
    return out


def unique_names(sets: list[PromptSet]) -> list[PromptSet]:
    """Set names made unique (a second `prompts` becomes `prompts_2`), so results never overwrite each other."""
    seen: dict[str, int] = {}
    out = []
    for s in sets:
        seen[s.name] = seen.get(s.name, 0) + 1
        out.append(s if seen[s.name] == 1 else replace(s, name=f"{s.name}_{seen[s.name]}"))
    return out
