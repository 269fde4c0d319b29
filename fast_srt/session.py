"""Building what a run needs once: engines (policy, judge, frozen defender), the judge, seed pools.

Where the judge lives (measured, see README "Judge placement"):
- `judge_model="policy"` and nothing trains (`fast-srt play`): the policy engine serves the judge too.
- `judge_model="policy"` with full fine-tuning: the policy's weights move every step, so the frozen judge is a
  second in-process engine holding the base model (one more copy of the weights, a few seconds to start).
- another judge model (WildGuard, Llama-Guard): always a second in-process engine.
The frozen defender of attacker_only mode is the base-model judge engine when there is one, else another engine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .config import GameConfig, ModelConfig
from .engine import Engine
from .errors import UserError
from .game import DataType, Seed, assign_data_types
from .models import resolve_model
from .rollout import Judge, RuleJudge
from .seeds import load_seeds, mixed_seed_batch


@dataclass
class Engines:
    policy: Engine
    judge: Judge
    frozen_defender: Engine | None
    policy_dir: Path
    judge_shares_policy_engine: bool


def build_engines(mcfg: ModelConfig, game: GameConfig, *, trains: bool, seed: int, max_model_len: int | None = None,
                  policy_dir: Path | None = None, base_dir: Path | None = None, judge_max_tokens: int = 24,
                  ) -> Engines:
    """policy_dir: the weights the policy engine starts from (a checkpoint on resume); base_dir: the policy's base
    model, which the base-model judge and attacker_only's frozen defender always hold (never a checkpoint)."""
    base_dir = Path(base_dir or resolve_model(mcfg.model, mcfg.dtype))
    policy_dir = Path(policy_dir or base_dir)
    mml = max_model_len or mcfg.max_model_len
    policy = Engine(policy_dir, dtype=mcfg.dtype, max_model_len=mml, kv_cache_gib=mcfg.kv_cache_gib, seed=seed,
                    name="policy")
    if mcfg.judge_model.startswith("rule:"):
        frozen = frozen_defender_engine(mcfg, game, base_dir, mml, seed)
        return Engines(policy, RuleJudge(mcfg.judge_model[5:], policy), frozen, policy_dir, True)
    judge_is_base = mcfg.judge_model == "policy"
    shared = judge_is_base and not trains
    if shared:
        judge_engine = policy
    else:
        judge_dir = base_dir if judge_is_base else resolve_model(mcfg.judge_model, mcfg.dtype)
        judge_engine = Engine(judge_dir, dtype=mcfg.dtype, max_model_len=judge_context(judge_dir, mcfg),
                              kv_cache_gib=mcfg.kv_cache_gib, seed=seed, name="judge")
    frozen = None
    if game.mode == "attacker_only":
        if judge_is_base and judge_engine is not policy:
            frozen = judge_engine
        else:
            frozen = frozen_defender_engine(mcfg, game, base_dir, mml, seed)
    judge = Judge(judge_engine, template=mcfg.judge_template, constrained=mcfg.judge_constrained,
                  max_tokens=judge_max_tokens)
    return Engines(policy, judge, frozen, policy_dir, shared)


def judge_context(judge_dir: Path, mcfg: ModelConfig) -> int:
    """The judge engine's own length: judge_max_model_len, capped at the judge model's context window."""
    import json

    try:
        cfg = json.loads((Path(judge_dir) / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    ctx = cfg.get("max_position_embeddings") or cfg.get("text_config", {}).get("max_position_embeddings")
    return min(mcfg.judge_max_model_len, int(ctx)) if ctx else mcfg.judge_max_model_len


def frozen_defender_engine(mcfg, game, base_dir, mml, seed) -> Engine | None:
    """attacker_only mode: a separate engine with the frozen base model answers as defender."""
    if game.mode != "attacker_only":
        return None
    return Engine(base_dir, dtype=mcfg.dtype, max_model_len=mml, kv_cache_gib=mcfg.kv_cache_gib, seed=seed,
                  name="frozen_defender")


class SeedPool:
    """Harmful and benign seeds, each labelled revised/verbatim once (fixed split seed), drawn 50/50 per batch."""

    def __init__(self, game: GameConfig, rng_seed: int):
        harmful = load_seeds(game.harmful_seeds, harmful=True)
        benign = load_seeds(game.benign_seeds, harmful=False)
        if not any(s.harmful for s in harmful):
            raise UserError(f"harmful seed set {game.harmful_seeds!r} has no harmful seeds")
        if any(s.harmful for s in benign):
            raise UserError(f"benign seed set {game.benign_seeds!r} contains seeds marked harmful")
        typed = assign_data_types(harmful + benign, rng_seed=game.split_seed, mode=game.mode)
        self.harmful = [p for p in typed if p[0].harmful]
        self.benign = [p for p in typed if not p[0].harmful]
        self.rng = random.Random(rng_seed)

    def batch(self, n: int) -> list[tuple[Seed, DataType]]:
        return mixed_seed_batch(self.harmful, self.benign, n, self.rng)
