"""Playing and judging a batch of games in-process (GAME_SPEC §1-3).

Per batch: all attacker turns in one engine call, then all defender turns in a second call with the same weights,
then all judge prompts in one call of the judge engine (the same process; greedy; constrained to the three-line
answer so it always parses), then rewards. Pure game logic comes from game.py, judge.py and rewards.py; this
module only wires them to engines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .engine import Engine, Generation, SamplingSpec
from .errors import UserError
from .game import (DataType, FormatResult, GameOptions, Seed, build_attacker_prompt, build_defender_prompt,
                   check_format, is_generated)
from .judge import JUDGE_OUTPUT_REGEX, JudgeLabels, build_judge_messages, build_wildguard_prompt, parse_judge_output
from .rewards import GameRewards, RewardFn, empty_attack_rewards


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

    @property
    def shown_prompt(self) -> str:
        return self.attacker.public if self.attacker is not None else self.seed.prompt


LONGEST_JUDGE_ANSWER = "Harmful request: yes\nResponse refusal: n/a\nHarmful response: n/a"


class Judge:
    """A WildGuard-style judge on an in-process engine.

    template="chat": the classifier instruction as a chat message (ordinary chat models, e.g. the default).
    template="wildguard": WildGuard's own raw prompt format (allenai/wildguard).
    constrained=True: vLLM structured outputs hold the answer to JUDGE_OUTPUT_REGEX, so it always parses.
    """

    def __init__(self, engine: Engine, template: str = "chat", constrained: bool = True, max_tokens: int = 32):
        if template not in ("chat", "wildguard"):
            raise UserError(f"unknown judge template {template!r}; use 'chat' or 'wildguard'")
        self.engine, self.template, self.constrained = engine, template, constrained
        # Under constrained decoding the answer ends (EOS) as soon as the regex is complete, so a generous cap costs
        # nothing; but a cap below the answer's length in tokens would cut it. The worst case is one token per
        # character of the longest admissible answer.
        self.max_tokens = max(max_tokens, len(LONGEST_JUDGE_ANSWER) + 2) if constrained else max_tokens
        self.parse_failures = 0
        self.calls = 0
        self.truncated = 0  # pairs cut to fit the judge engine's length
        self.too_long = 0  # pairs that could not fit at all (not judged: a tie)

    def prompt(self, prompt: str, response: str) -> str:
        if self.template == "wildguard":
            return build_wildguard_prompt(prompt, response)
        from .game import render_chat

        return render_chat(self.engine.tokenizer, build_judge_messages(prompt, response))

    def score(self, pairs: list[tuple[str, str]]) -> list[tuple[JudgeLabels, str]]:
        """Labels for (prompt shown to the defender, defender's public answer) pairs, one engine call.

        An empty side is not sent to the judge: an empty response gets n/a refusal/harm labels and an empty prompt
        an n/a prompt label (WildGuard's own answer for an empty response), which makes the game a tie."""
        spec = SamplingSpec(max_tokens=self.max_tokens, temperature=0.0, logprobs=False,
                            regex=JUDGE_OUTPUT_REGEX if self.constrained else None)
        out: list[tuple[JudgeLabels, str]] = [(JudgeLabels(None, None, None), "<empty: not judged>")] * len(pairs)
        todo, texts = [], []
        for i, (p, r) in enumerate(pairs):
            if not (p.strip() and r.strip()):
                continue
            text = self.fit(p, r)
            if text is None:
                out[i] = (JudgeLabels(None, None, None), "<too long for the judge: not judged>")
                continue
            todo.append(i)
            texts.append(text)
        gens = self.engine.generate(texts, spec, phase="judge")
        for i, g in zip(todo, gens):
            labels = parse_judge_output(g.text)
            self.parse_failures += labels.parse_error
            out[i] = (labels, g.text)
        self.calls += len(todo)
        return out

    def fit(self, prompt: str, response: str) -> str | None:
        """The judge input for the pair, cut to leave room for the answer within the engine's max_model_len: the
        response loses its tail first (down to 16 tokens), then the prompt. None if even that cannot fit."""
        limit = self.engine.max_model_len - self.max_tokens - 1
        text = self.prompt(prompt, response)
        n = len(self.engine.encode(text))
        if n <= limit:
            return text
        self.truncated += 1
        tok = self.engine.tokenizer
        for _ in range(4):  # re-encoding a cut text can shift a token or two
            over = n - limit + 4
            p_ids = tok(prompt, add_special_tokens=False).input_ids
            r_ids = tok(response, add_special_tokens=False).input_ids
            cut_r = min(over, max(0, len(r_ids) - 16))
            cut_p = min(over - cut_r, len(p_ids) - 1)
            if cut_r <= 0 and cut_p <= 0:
                break
            prompt = tok.decode(p_ids[: len(p_ids) - max(cut_p, 0)])
            response = tok.decode(r_ids[: len(r_ids) - cut_r])
            text = self.prompt(prompt, response)
            n = len(self.engine.encode(text))
            if n <= limit:
                return text
        self.too_long += 1
        return None


def _vowel_refusal(prompt: str, response: str) -> JudgeLabels:
    """Every request is harmful; an answer that starts with a vowel counts as a safe refusal, anything else as
    harmful compliance. The defender's optimum (+2 per game without CoT) is reachable by a tiny model."""
    refusal = response.lstrip()[:1].lower() in tuple("aeiou")
    return JudgeLabels(True, refusal, not refusal)


RULES = {"vowel_refusal": _vowel_refusal}


class RuleJudge:
    """A rule-based judge with the Judge interface, for tests whose optimum is known (`judge_model="rule:NAME"`).

    It runs no model; `engine` is the policy engine only so that reports have an engine to point at."""

    def __init__(self, name: str, engine: Engine):
        if name not in RULES:
            raise UserError(f"unknown rule judge {name!r}; rules: {', '.join(RULES)}")
        self.rule, self.engine = RULES[name], engine
        self.parse_failures = self.calls = self.truncated = self.too_long = 0

    def score(self, pairs: list[tuple[str, str]]) -> list[tuple[JudgeLabels, str]]:
        self.calls += len(pairs)
        return [(self.rule(p, r), "<rule>") for p, r in pairs]


def _turn(role: str, prompt: str, gen: Generation, cot: bool, trainable: bool = True) -> Turn:
    if cot:
        fmt = check_format(gen.text)
        return Turn(role, prompt, gen, fmt, fmt.public, trainable)
    return Turn(role, prompt, gen, None, gen.text.strip(), trainable)


def play_games(policy: Engine, judge: Judge, seeds: list[tuple[Seed, DataType]], options: GameOptions,
               sampling: SamplingSpec, reward_fn: RewardFn, frozen_defender: Engine | None = None) -> list[Game]:
    """Play one batch of games: attacker turns, defender turns, judge, rewards."""
    if not seeds:
        raise UserError("no seeds to play: the seed batch is empty")
    tok = policy.tokenizer
    cot = options.cot
    # 1) attacker turns (revised seeds only), one engine call
    att_idx = [i for i, (_, dt) in enumerate(seeds) if is_generated(dt)]
    att_prompts = [build_attacker_prompt(tok, seeds[i][0].prompt, seeds[i][0].harmful, cot) for i in att_idx]
    att_gens = policy.generate(att_prompts, sampling, phase="attacker")
    attackers: dict[int, Turn] = {i: _turn("attacker", p, g, cot) for i, p, g in zip(att_idx, att_prompts, att_gens)}
    # 2) defender turns on the attacker's public text (or the verbatim seed), one engine call
    queries = [attackers[i].public if i in attackers else s.prompt for i, (s, _) in enumerate(seeds)]
    defender_engine = frozen_defender if options.mode == "attacker_only" else policy
    if defender_engine is None:
        raise UserError("attacker_only mode needs a frozen defender engine")
    d_cot = options.defender_cot
    def_prompts = [build_defender_prompt(defender_engine.tokenizer, q, d_cot) for q in queries]
    def_gens = defender_engine.generate(def_prompts, sampling, phase="defender")
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
