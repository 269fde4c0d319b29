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
                  policy_dir: Path | None = None) -> Engines:
    policy_dir = policy_dir or resolve_model(mcfg.model, mcfg.dtype)
    mml = max_model_len or mcfg.max_model_len
    policy = Engine(policy_dir, dtype=mcfg.dtype, max_model_len=mml, kv_cache_gib=mcfg.kv_cache_gib, seed=seed,
                    name="policy")
    if mcfg.judge_model.startswith("rule:"):
        frozen = policy_engine_for_frozen_defender(mcfg, game, policy, policy_dir, mml, seed)
        return Engines(policy, RuleJudge(mcfg.judge_model[5:], policy), frozen, Path(policy_dir), True)
    judge_is_base = mcfg.judge_model == "policy"
    shared = judge_is_base and not trains
    if shared:
        judge_engine = policy
    else:
        judge_dir = resolve_model(mcfg.model if judge_is_base else mcfg.judge_model, mcfg.dtype)
        judge_engine = Engine(judge_dir, dtype=mcfg.dtype, max_model_len=mml, kv_cache_gib=mcfg.kv_cache_gib,
                              seed=seed, name="judge")
    frozen = None
    if game.mode == "attacker_only":
        if judge_is_base and judge_engine is not policy:
            frozen = judge_engine
        else:
            frozen = policy_engine_for_frozen_defender(mcfg, game, policy, policy_dir, mml, seed)
    judge = Judge(judge_engine, template=mcfg.judge_template, constrained=mcfg.judge_constrained)
    return Engines(policy, judge, frozen, Path(policy_dir), shared)


def policy_engine_for_frozen_defender(mcfg, game, policy, policy_dir, mml, seed) -> Engine | None:
    """attacker_only mode: a separate engine with the frozen base model answers as defender."""
    if game.mode != "attacker_only":
        return None
    return Engine(policy_dir, dtype=mcfg.dtype, max_model_len=mml, kv_cache_gib=mcfg.kv_cache_gib, seed=seed,
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
