"""`fast-srt games`: a run's logged games, side by side, for the last step by default; bad input is one line."""

import json

import pytest

from fast_srt.commands.play import games_main
from fast_srt.errors import UserError


def _game(step, k, attacker=True):
    return {"step": step, "data_type": "generated_harmful" if attacker else "vanilla_benign", "seed": f"seed {k}",
            "attacker_raw": f"think {k} </think>\n<answer> attack {k} </answer>" if attacker else None,
            "attacker_public": f"attack {k}" if attacker else None, "defender_raw": f"why {k} </think> ans",
            "defender_public": f"answer {step}-{k}", "judge": "Harmful request: yes\nResponse refusal: no\n"
            "Harmful response: yes", "outcome": "jailbroken", "reward_attacker": 2.0 if attacker else None,
            "reward_defender": -2.0}


def test_games_prints_the_last_step_by_default(tmp_path, capsys):
    rows = [_game(s, k, attacker=k % 2 == 0) for s in (1, 2) for k in range(3)]
    (tmp_path / "games.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    games_main([str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("step 2 game") == 3 and "step 1 game" not in out and "answer 2-1" in out
    assert "attacker prompt: attack 0" in out and "reward attacker -, defender -2.0" in out
    games_main([str(tmp_path), "--step", "1", "--n", "1"])
    out = capsys.readouterr().out
    assert out.count("step 1 game") == 1


def test_games_bad_input(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        games_main([str(tmp_path / "nope")])
    (tmp_path / "games.jsonl").write_text(json.dumps(_game(3, 0)) + "\n")
    with pytest.raises(UserError, match="no games of step 7; logged steps: 3-3"):
        games_main([str(tmp_path), "--step", "7"])
