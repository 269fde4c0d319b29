"""The opponent league (fast_srt/run/league.py): snapshots capped per role (the oldest dropped from the engine),
the seeded opponent draw at the asked share, and a game against a snapshot trains only the current role's side."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from fast_srt.config import LeagueConfig
from fast_srt.engine.engine import Generation
from fast_srt.engine.rollout import Game, Turn
from fast_srt.game.judge import JudgeLabels
from fast_srt.game.rewards import GameRewards
from fast_srt.game.rules import GameOptions, Seed
from fast_srt.learner.lora import apply_lora
from fast_srt.learner.policy import load_policy
from fast_srt.learner.step import games_to_samples
from fast_srt.run.league import ROLES, League, Snapshot


class FakeEngine:
    """attach_adapter / detach_adapter as the policy engine's, recording what it serves."""

    def __init__(self):
        self.live: dict[int, dict] = {}  # lora id -> the PEFT tensors it was given

    def attach_adapter(self, d, name, lora_int_id, default=True):
        assert not default and lora_int_id not in self.live
        self.live[lora_int_id] = load_file(str(Path(d) / "adapter_model.safetensors"))
        return SimpleNamespace(lora_int_id=lora_int_id, lora_name=name)

    def detach_adapter(self, lora_int_id):
        del self.live[lora_int_id]


def test_snapshots_are_capped_per_role_oldest_dropped(tiny_model_dir):
    model = load_policy(str(tiny_model_dir), dtype=torch.float32)
    apply_lora(model, 4, 8.0, ("q_proj", "v_proj"), roles=ROLES)
    engine = FakeEngine()
    league = League(LeagueConfig(every=2, size=2), engine, scale=2.0)
    assert [s for s in range(1, 9) if league.due(s)] == [2, 4, 6, 8]
    for step in (2, 4, 6):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(step + ("attacker" in name))  # each snapshot tells its step and role
        league.take(model, step)
    for role in ROLES:
        assert [s.step for s in league.snapshots[role]] == [4, 6]
    assert len(engine.live) == 4  # the step-2 snapshots left the engine
    for s in league.snapshots["attacker"]:  # what the engine serves is the adapter at the snapshot's step
        served = engine.live[s.request.lora_int_id]
        b = next(v for k, v in served.items() if k.endswith("lora_B.weight"))
        assert torch.all(b == s.step + 1)
        assert torch.equal(s.tensors[next(k for k in s.tensors if k.endswith(".lora_B"))], b)
    # a resume rebuilds the same league from the checkpoint's state
    again = League(LeagueConfig(every=2, size=2), FakeEngine(), scale=2.0)
    again.restore(league.state())
    assert {r: [s.label for s in v] for r, v in again.snapshots.items()} == \
        {r: [s.label for s in v] for r, v in league.snapshots.items()}
    assert sorted(again.engine.live) == sorted(engine.live)


def _league_with_snapshots(p_past, n=3):
    league = League(LeagueConfig(every=1, size=n, p_past=p_past), FakeEngine(), scale=1.0)
    for role in ROLES:
        league.snapshots[role] = [Snapshot(role, s, {}, SimpleNamespace(lora_int_id=100 + s)) for s in range(n)]
    return league


@pytest.mark.parametrize("p_past", [0.0, 0.3, 0.8])
def test_the_opponent_draw_follows_p_past_and_its_seed(p_past):
    seeds = [(Seed("x", True), "generated_harmful")] * 3000
    league = _league_with_snapshots(p_past)
    draws = league.draw(seeds, seed=7, step=3)
    past = [d for d in draws if d is not None]
    n, share = len(draws), len(past) / len(draws)
    assert abs(share - p_past) <= 4 * (p_past * (1 - p_past) / n) ** 0.5 + 1e-9, share
    if past:  # the side 50/50, the snapshot uniformly from the role's
        att = sum(d.role == "attacker" for d in past) / len(past)
        assert abs(att - 0.5) < 4 * (0.25 / len(past)) ** 0.5
        for k in range(3):
            assert abs(sum(d.step == k for d in past) / len(past) - 1 / 3) < 4 * (2 / 9 / len(past)) ** 0.5
    assert league.draw(seeds, seed=7, step=3) == draws  # seeded: a resume draws the same
    if p_past:
        assert league.draw(seeds, seed=7, step=4) != draws
    verbatim = [(Seed("x", False), "vanilla_benign")] * 50  # no attacker turn: always the current defender
    assert league.draw(verbatim, seed=7, step=3) == [None] * 50
    empty = League(LeagueConfig(every=1, size=2, p_past=1.0), FakeEngine(), scale=1.0)
    assert empty.draw(seeds[:20], seed=7, step=3) == [None] * 20  # no snapshot yet: every game is current


def _turn(role, k):
    gen = Generation([1, 2, 3], [4 + k, 5], f"{role} {k}", [-0.5, -0.5], "stop")
    return Turn(role, f"{role} prompt", gen, None, gen.text)


def _game(k):
    rewards = GameRewards(attacker=1.0, defender=-1.0, tie=False, dropped=False, outcome="x")
    return Game(Seed("s", True), "generated_harmful", _turn("attacker", k), _turn("defender", k),
                JudgeLabels(True, False, True), "", rewards)


def test_a_league_game_trains_only_the_current_roles_side():
    league = _league_with_snapshots(1.0, n=1)
    games = [_game(k) for k in range(3)]
    draws = [league.snapshots["attacker"][0], league.snapshots["defender"][0], None]
    current = {r: SimpleNamespace(lora_int_id=i + 1) for i, r in enumerate(ROLES)}
    loras = league.loras(draws, current)  # the snapshot plays its side, the current adapters the rest
    assert [x.lora_int_id for x in loras["attacker"]] == [100, 1, 1]
    assert [x.lora_int_id for x in loras["defender"]] == [2, 100, 2]
    league.mark(games, draws)
    assert [g.opponent for g in games] == ["attacker@0", "defender@0", "current"]
    samples, _ = games_to_samples(games, GameOptions(mode="selfplay", cot=False), True, [0, 1, 2])
    trained = sorted((s.response_ids[0] - 4, s.role) for s in samples)
    assert trained == [(0, "defender"), (1, "attacker"), (2, "attacker"), (2, "defender")]
    m = league.metrics(games, draws)
    assert m["league/past_games"] == 2 and m["league/snapshots"] == 1
    assert m["league/defender_reward_vs_past"] == -1.0 and m["league/attacker_reward_vs_past"] == 1.0
    assert m["league/attacker_reward_vs_current"] == 1.0
    from fast_srt.run.metrics import console_line

    assert "league: 2 games vs past, R a/d +1.00/-1.00 | " in console_line({"step": 3, **m})
    assert "league" not in console_line({"step": 3})


def test_league_config_errors():
    from fast_srt.config import GameConfig, TrainConfig
    from fast_srt.errors import UserError

    with pytest.raises(UserError, match="pass --roles per-role"):
        TrainConfig(league=LeagueConfig(every=2))
    with pytest.raises(UserError, match="--game.mode selfplay"):
        TrainConfig(league=LeagueConfig(every=2), roles="per-role", lora_rank=4,
                    game=GameConfig(mode="attacker_only"))
    with pytest.raises(UserError, match="p_past must be a share"):
        LeagueConfig(p_past=1.5)
    with pytest.raises(UserError, match="league.size must be >= 1"):
        LeagueConfig(size=0)
