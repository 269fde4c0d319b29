"""`fast-srt play`: one batch of real games with the policy engine and the judge, printed side by side, with the
throughput per phase. Nothing trains: the judge shares the policy engine when it is the policy's base model.
"""

from __future__ import annotations

import os
import textwrap
import time


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _thinking(turn) -> str:
    """The hidden reasoning for display: the text before </think>, or '(none)' outside CoT mode."""
    if turn.fmt is None:
        return "(no CoT)"
    return turn.fmt.thinking or "(no </think>: the whole turn leaks as public text)"


def print_games(games, show: int, width: int = 100) -> None:
    for k, g in enumerate(games[:show]):
        r = g.rewards
        print("=" * width)
        print(f"game {k}  [{g.data_type}]  seed: {_short(g.seed.prompt, width - 30)}")
        if g.attacker is not None:
            a = g.attacker
            fmt = "" if a.fmt is None else ("format ok" if a.fmt.valid else f"FORMAT VIOLATION {','.join(a.fmt.violations)}")
            print(f"  attacker thinks ({fmt}): {_short(_thinking(a), width - 28)}")
            print(textwrap.fill(f"  attacker prompt: {_short(a.public, 400)}", width, subsequent_indent="    "))
        d = g.defender
        fmt = "" if d.fmt is None else ("format ok" if d.fmt.valid else f"FORMAT VIOLATION {','.join(d.fmt.violations)}")
        print(f"  defender thinks ({fmt}): {_short(_thinking(d), width - 28)}")
        print(textwrap.fill(f"  defender answer: {_short(d.public, 400)}", width, subsequent_indent="    "))
        lab = g.labels
        yn = {True: "yes", False: "no", None: "n/a"}
        judged = ("PARSE ERROR" if lab.parse_error else
                  f"harmful request={yn[lab.prompt_harmful]} refusal={yn[lab.response_refusal]} "
                  f"harmful response={yn[lab.response_harmful]}")
        ra = "-" if r.attacker is None else f"{r.attacker:+.1f}"
        rd = "-" if r.defender is None else f"{r.defender:+.1f}"
        flag = " TIE (dropped from training)" if r.tie else (" DROPPED" if r.dropped else "")
        print(f"  judge: {judged}  -> outcome {r.outcome}; reward attacker {ra}, defender {rd}{flag}")
        for n in g.notes:
            print(f"  note: {n}")
    print("=" * width)


def play_main(argv: list[str]) -> None:
    import tyro

    from fast_srt.config import PlayConfig
    from fast_srt.engine.engine import SamplingSpec
    from fast_srt.engine.placement import build_engines
    from fast_srt.engine.rollout import play_games
    from fast_srt.game.rewards import reward_function
    from fast_srt.game.rules import GameOptions
    from fast_srt.game.seeds import SeedPool
    from fast_srt.run.models import resolve_engine_dirs
    from fast_srt.run.report import child_processes, throughput_lines

    cfg = tyro.cli(PlayConfig, args=argv, prog="fast-srt play")
    t0 = time.perf_counter()
    pool = SeedPool(cfg.game, rng_seed=cfg.seed)  # seed files are checked before any model loads
    options = GameOptions(mode=cfg.game.mode, cot=cfg.game.cot)
    reward_fn = reward_function(cfg.game.reward)
    base_dir, judge_dir = resolve_engine_dirs(cfg.model)
    engines = build_engines(cfg.model, cfg.game, trains=False, seed=cfg.seed, base_dir=base_dir,
                            judge_dir=judge_dir, judge_max_tokens=cfg.sampling.judge_max_tokens)
    t_ready = time.perf_counter()
    s = cfg.sampling
    spec = SamplingSpec(max_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, seed=None)
    games = play_games(engines.policy, engines.judge, pool.batch(s.games_per_step), options, spec, reward_fn,
                       engines.frozen_defender)
    print_games(games, cfg.show)
    n_tie = sum(g.rewards.tie for g in games)
    print(f"{len(games)} games; judge parse failures: {engines.judge.parse_failures}/{engines.judge.calls}; "
          f"ties: {n_tie}; judge {'shares the policy engine' if engines.judge_shares_policy_engine else 'has its own engine'}")
    for line in throughput_lines(engines):
        print(line)
    print(f"startup {t_ready - t0:.1f} s (engines {engines.policy.startup_s:.1f} s); pid {os.getpid()}, "
          f"child processes: {child_processes()}")
