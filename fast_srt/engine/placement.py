"""Where the engines go: the policy engine, the judge (on its own engine or sharing the policy's), and the frozen
defender of attacker_only mode. Model names are resolved by the caller (fast_srt.run.models); this module only
places in-process engines on local directories.

Where the judge lives (measured, see docs/performance.md "Judge placement"):
- `judge_model="policy"` and nothing trains (`fast-srt play`): the policy engine serves the judge too.
- `judge_model="policy"` with full fine-tuning: the policy's weights move every step, so the frozen judge is a
  second in-process engine holding the base model (one more copy of the weights, a few seconds to start).
- `judge_model="policy"` with a LoRA adapter served by the engine (`lora_rank`): the policy engine holds the base
  weights and the policy is the base + adapter (a LoRA request), so the judge reads the same engine without the
  adapter (`Engine.base_model()`): one copy of the base weights for policy and judge.
- another judge model (WildGuard, Llama-Guard): always a second in-process engine.
- `judge_model="probe"` (the default) or `"probe:MODEL"`: logistic probes on a judge LM's hidden states
  (fast_srt/engine/probe_judge.py), on a second in-process engine in pooling mode holding the policy's base model (or
  MODEL); the probe is fitted at first use and cached.
The frozen defender of attacker_only mode is the base-model judge engine when there is one (or the policy engine's
base weights when it serves an adapter), else another engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fast_srt.config import GameConfig, ModelConfig
from fast_srt.engine.engine import BaseModelView, Engine
from fast_srt.engine.judge import Judge, RuleJudge


@dataclass
class Engines:
    policy: Engine
    judge: Judge
    frozen_defender: Engine | None
    policy_dir: Path
    judge_shares_policy_engine: bool

    def unique(self) -> list[Engine]:
        """Each distinct engine once (the judge and the frozen defender may share one)."""
        out: list[Engine] = []
        for e in (self.policy, self.judge.engine, self.frozen_defender):
            e = e.shared if isinstance(e, BaseModelView) else e
            if e is not None and all(e is not x for x in out):
                out.append(e)
        return out

    def describe(self) -> str:
        """Which engine serves what, e.g. `1 engine: policy engine (policy: base + LoRA adapter; judge: base)`."""
        roles: dict[int, list[str]] = {id(e): [] for e in self.unique()}
        served = (f": base + {' and '.join(self.policy.role_adapters)} LoRA adapters" if self.policy.role_adapters
                  else ": base + LoRA adapter" if self.policy.adapter else "")
        roles[id(self.policy)].append("policy" + served)
        if isinstance(self.judge, RuleJudge):
            roles[id(self.policy)].append("judge: a rule, no model")
        for role, user in (("judge", None if isinstance(self.judge, RuleJudge) else self.judge.engine),
                           ("frozen defender", self.frozen_defender)):
            if user is not None:  # a BaseModelView reads its engine's base weights
                view = isinstance(user, BaseModelView)
                roles[id(user.shared if view else user)].append(role + (": base" if view else ""))
        n = len(roles)
        return f"{n} engine{'s' if n > 1 else ''}: " + "; ".join(
            f"{e.name} engine ({'; '.join(roles[id(e)])})" for e in self.unique())

    def snapshot(self) -> dict:
        """Per-engine phase counters now, for `since`."""
        return {id(e): e.stats.snapshot() for e in self.unique()}

    def since(self, snap: dict) -> dict:
        """Seconds, generated and prompt tokens, prefix-cache lookups and hits per phase (summed over engines) since
        `snapshot()`."""
        out: dict[str, dict] = {}
        for e in self.unique():
            for phase, d in e.stats.since(snap.get(id(e), {})).items():
                acc = out.setdefault(phase, {"seconds": 0.0, "gen_tokens": 0, "prompt_tokens": 0, "cache_queries": 0,
                                             "cache_hits": 0})
                for k in acc:
                    acc[k] += d.get(k, 0)
        return out


def build_engines(mcfg: ModelConfig, game: GameConfig, *, trains: bool, seed: int, base_dir: Path,
                  policy_dir: Path | None = None, judge_dir: Path | None = None, max_model_len: int | None = None,
                  judge_max_tokens: int = 24, lora_rank: int = 0, defender_dir: Path | None = None,
                  max_loras: int = 1) -> Engines:
    """base_dir: the policy's base model (resolved), which the base-model judge and attacker_only's frozen defender
    always hold (never a checkpoint); policy_dir: the weights the policy engine starts from (a checkpoint on
    resume; default base_dir); judge_dir: the resolved judge model when it is not the policy's base model.
    lora_rank > 0: the policy engine holds base_dir and serves the policy as a LoRA adapter of up to that rank
    (the caller attaches it: Engine.attach_adapter; max_loras of them side by side, e.g. one per role); the
    base-model judge and the frozen defender share it.
    defender_dir: the frozen defender's model when it is not base_dir (the original base model under a format
    warm-up, whose checkpoint is then base_dir)."""
    base_dir = Path(base_dir)
    defender_dir = Path(defender_dir or base_dir)
    policy_dir = base_dir if lora_rank else Path(policy_dir or base_dir)
    mml = max_model_len or mcfg.max_model_len
    if trains:
        print(f"[fast_srt] starting the in-process engines (vLLM; judge {mcfg.judge_model})", flush=True)
    policy = Engine(policy_dir, dtype=mcfg.dtype, max_model_len=mml, kv_cache_gib=mcfg.kv_cache_gib, seed=seed,
                    name="policy", enable_lora=lora_rank > 0, max_lora_rank=max(lora_rank, 1), max_loras=max_loras)
    base_view = policy.base_model() if lora_rank else None
    if mcfg.judge_model.startswith("rule:"):
        frozen = frozen_defender_engine(mcfg, game, base_dir, mml, seed, base_view, defender_dir)
        return Engines(policy, RuleJudge(mcfg.judge_model[5:], policy), frozen, policy_dir, True)
    if is_probe(mcfg.judge_model):
        judge = make_judge(mcfg, judge_dir or base_dir, seed=seed, judge_max_tokens=judge_max_tokens)
        frozen = frozen_defender_engine(mcfg, game, base_dir, mml, seed, base_view, defender_dir)
        return Engines(policy, judge, frozen, policy_dir, False)
    judge_is_base = mcfg.judge_model == "policy"
    if not judge_is_base and judge_dir is None:
        raise ValueError(f"judge model {mcfg.judge_model!r} needs its resolved directory (judge_dir)")
    shared = judge_is_base and (not trains or base_view is not None)
    if shared:
        judge_engine = base_view or policy
    else:
        jdir = base_dir if judge_is_base else Path(judge_dir)
        judge_engine = Engine(jdir, dtype=mcfg.dtype, max_model_len=judge_context(jdir, mcfg),
                              kv_cache_gib=mcfg.kv_cache_gib, seed=seed, name="judge")
    frozen = None
    if game.mode == "attacker_only":
        if isinstance(judge_engine, Engine) and judge_engine is not policy \
                and Path(judge_engine.model_dir) == defender_dir:  # the judge's engine holds the defender's model
            frozen = judge_engine
        else:
            frozen = frozen_defender_engine(mcfg, game, base_dir, mml, seed, base_view, defender_dir)
    judge = Judge(judge_engine, template=mcfg.judge_template, constrained=mcfg.judge_constrained,
                  max_tokens=judge_max_tokens)
    return Engines(policy, judge, frozen, policy_dir, shared)


def is_probe(judge_model: str) -> bool:
    return judge_model == "probe" or judge_model.startswith("probe:")


def make_judge(mcfg: ModelConfig, judge_dir: Path, *, seed: int = 0, judge_max_tokens: int = 24, log=print,
               probe=None):
    """A judge on its own in-process engine: the probe judge (pooling engine; `probe` instead of the one fitted
    for this model and labelled set) or the generative one."""
    judge_dir = Path(judge_dir)
    if is_probe(mcfg.judge_model):
        from fast_srt.engine.probe_judge import ProbeJudge

        engine = Engine(judge_dir, dtype=mcfg.dtype, max_model_len=judge_context(judge_dir, mcfg),
                        kv_cache_gib=mcfg.kv_cache_gib, seed=seed, name="judge", runner="pooling")
        return ProbeJudge(engine, model_dir=judge_dir, probe=probe, log=log)
    engine = Engine(judge_dir, dtype=mcfg.dtype, max_model_len=judge_context(judge_dir, mcfg),
                    kv_cache_gib=mcfg.kv_cache_gib, seed=seed, name="judge")
    return Judge(engine, template=mcfg.judge_template, constrained=mcfg.judge_constrained,
                 max_tokens=judge_max_tokens)


def judge_context(judge_dir: Path, mcfg: ModelConfig) -> int:
    """The judge engine's own length: judge_max_model_len, capped at the judge model's context window."""
    try:
        cfg = json.loads((Path(judge_dir) / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    ctx = cfg.get("max_position_embeddings") or cfg.get("text_config", {}).get("max_position_embeddings")
    return min(mcfg.judge_max_model_len, int(ctx)) if ctx else mcfg.judge_max_model_len


def frozen_defender_engine(mcfg, game, base_dir, mml, seed, base_view: BaseModelView | None = None,
                           defender_dir: Path | None = None):
    """attacker_only mode: the frozen base model (defender_dir, default base_dir) answers as defender: the policy
    engine's base weights when it serves an adapter over that model (`base_view`), else a separate engine."""
    if game.mode != "attacker_only":
        return None
    defender_dir = Path(defender_dir or base_dir)
    if base_view is not None and defender_dir == Path(base_dir):
        return base_view
    return Engine(defender_dir, dtype=mcfg.dtype, max_model_len=mml, kv_cache_gib=mcfg.kv_cache_gib, seed=seed,
                  name="frozen_defender")
