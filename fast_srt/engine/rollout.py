"""Playing and judging a batch of games in-process (docs/game.md §1-3).

Per batch: all attacker turns in one engine call, then all defender turns in a second call with the same weights,
then all judge prompts in one call of the judge engine (the same process; greedy; constrained to the three-line
answer so it always parses), then rewards. Pure game logic comes from fast_srt.game (rules, judge protocol,
rewards); this module only wires it to engines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fast_srt.engine.engine import Engine, Generation, SamplingSpec, derive_seed
from fast_srt.engine.judge import Judge
from fast_srt.errors import UserError
from fast_srt.game.judge import JudgeLabels
from fast_srt.game.rewards import GameRewards, RewardFn, empty_attack_rewards
from fast_srt.game.rules import (DataType, FormatResult, GameOptions, Seed, build_attacker_prompt,
                                 build_defender_prompt, check_format, is_generated)


@dataclass
class Turn:
    role: str  # "attacker" | "defender"
    prompt: str  # full prompt text given to the engine
    gen: Generation
    fmt: FormatResult | None  # None outside CoT mode
    public: str  # what the other player / the judge sees
    trainable: bool = True  # False for the frozen defender of attacker_only mode


@dataclass
class Game:
    seed: Seed
    data_type: DataType
    attacker: Turn | None
    defender: Turn
    labels: JudgeLabels
    judge_text: str
    rewards: GameRewards
    notes: list[str] = field(default_factory=list)
    opponent: str | None = None  # with an opponent league: "current", or the snapshot that played a side

    @property
    def shown_prompt(self) -> str:
        return self.attacker.public if self.attacker is not None else self.seed.prompt


def _turn(role: str, prompt: str, gen: Generation, cot: bool, trainable: bool = True) -> Turn:
    if cot:
        fmt = check_format(gen.text)
        return Turn(role, prompt, gen, fmt, fmt.public, trainable)
    return Turn(role, prompt, gen, None, gen.text.strip(), trainable)


def play_games(policy: Engine, judge: Judge, seeds: list[tuple[Seed, DataType]], options: GameOptions,
               sampling: SamplingSpec, reward_fn: RewardFn, frozen_defender: Engine | None = None,
               rng_seed: int | None = None, lora: dict | None = None) -> list[Game]:
    """Play one batch of games: attacker turns, defender turns, judge, rewards. rng_seed: each turn's sampling
    draws from generators seeded with (rng_seed, role), so a replayed batch plays the same games. lora: per role,
    the LoRA request its turns use on `policy` (one for every game, or a list with one per seed); a role not in it
    (or None) plays with the engine's own adapter. The frozen defender never gets one."""
    if not seeds:
        raise UserError("no seeds to play: the seed batch is empty")
    tok = policy.tokenizer
    cot = options.cot
    # 1) attacker turns (revised seeds only), one engine call
    att_idx = [i for i, (_, dt) in enumerate(seeds) if is_generated(dt)]
    att_prompts = [build_attacker_prompt(tok, seeds[i][0].prompt, seeds[i][0].harmful, cot) for i in att_idx]
    att_gens = policy.generate(att_prompts, sampling, phase="attacker", rng_seed=_role_seed(rng_seed, "attacker"),
                               **_role_lora(lora, "attacker", att_idx))
    attackers: dict[int, Turn] = {i: _turn("attacker", p, g, cot) for i, p, g in zip(att_idx, att_prompts, att_gens)}
    # 2) defender turns on the attacker's public text (or the verbatim seed), one engine call
    queries = [attackers[i].public if i in attackers else s.prompt for i, (s, _) in enumerate(seeds)]
    defender_engine = frozen_defender if options.mode == "attacker_only" else policy
    if defender_engine is None:
        raise UserError("attacker_only mode needs a frozen defender engine")
    d_cot = options.defender_cot
    def_prompts = [build_defender_prompt(defender_engine.tokenizer, q, d_cot) for q in queries]
    def_lora = _role_lora(lora, "defender", range(len(seeds))) if defender_engine is policy else {}
    def_gens = defender_engine.generate(def_prompts, sampling, phase="defender",
                                        rng_seed=_role_seed(rng_seed, "defender"), **def_lora)
    defenders = [_turn("defender", p, g, d_cot, trainable=options.trains_defender)
                 for p, g in zip(def_prompts, def_gens)]
    # 3) judge: (shown prompt, defender's public answer), one engine call
    judged = judge.score([(q, d.public) for q, d in zip(queries, defenders)])
    # 4) rewards
    games = []
    for i, ((seed, dt), d, (labels, jtext)) in enumerate(zip(seeds, defenders, judged)):
        a = attackers.get(i)
        a_fmt = a.fmt.valid if a is not None and a.fmt is not None else None
        d_fmt = d.fmt.valid if d.fmt is not None else None
        if a is not None and not a.public.strip():  # nothing to defend against, nothing to judge
            game = Game(seed, dt, a, d, labels, jtext, empty_attack_rewards(c=1.0))
            game.notes.append("empty attacker prompt: format penalty for the attacker, defender turn not trained")
            games.append(game)
            continue
        game = Game(seed, dt, a, d, labels, jtext, reward_fn(labels, dt, a_fmt, d_fmt, cot))
        if not d.public.strip():
            game.notes.append("empty defender answer")
        games.append(game)
    return games


def _role_seed(rng_seed: int | None, role: str) -> int | None:
    return None if rng_seed is None else derive_seed(rng_seed, role)


def _role_lora(lora: dict | None, role: str, idx) -> dict:
    """generate's `lora` argument for `role`'s turns at the seeds `idx` ({}: the engine's own adapter)."""
    if not lora or role not in lora:
        return {}
    x = lora[role]
    return {"lora": [x[i] for i in idx] if isinstance(x, list) else x}
