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
    if cfg.out:
        write_game_records(games, cfg.out, model=cfg.model.model)
    n_tie = sum(g.rewards.tie for g in games)
    print(f"{len(games)} games; judge parse failures: {engines.judge.parse_failures}/{engines.judge.calls}; "
          f"ties: {n_tie}; judge {'shares the policy engine' if engines.judge_shares_policy_engine else 'has its own engine'}")
    for line in throughput_lines(engines):
        print(line)
    print(f"startup {t_ready - t0:.1f} s (engines {engines.policy.startup_s:.1f} s); pid {os.getpid()}, "
          f"child processes: {child_processes()}")


def write_game_records(games, path: str, model: str) -> None:
    """The games as JSON lines (a run's games.jsonl fields, step 0, plus the policy model that played them)."""
    import json
    from pathlib import Path

    from fast_srt.run.trainer import game_record

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for g in games:
            f.write(json.dumps({**game_record(0, g), "model": model}, ensure_ascii=False) + "\n")
    print(f"wrote {len(games)} games to {out}")


def print_logged_games(records: list[dict], width: int = 100) -> None:
    """Games as `train` logs them (games.jsonl lines), in the same side-by-side layout as `play`."""
    for k, g in enumerate(records):
        print("=" * width)
        print(f"step {g['step']} game {k}  [{g['data_type']}]  seed: {_short(g['seed'], width - 36)}")
        if g.get("attacker_raw") is not None:
            print(textwrap.fill(f"  attacker (raw, hidden CoT included): {_short(g['attacker_raw'], 300)}", width,
                                subsequent_indent="    "))
            print(textwrap.fill(f"  attacker prompt: {_short(g['attacker_public'] or '', 400)}", width,
                                subsequent_indent="    "))
        print(textwrap.fill(f"  defender (raw): {_short(g['defender_raw'] or '', 300)}", width,
                            subsequent_indent="    "))
        print(textwrap.fill(f"  defender answer: {_short(g['defender_public'] or '', 400)}", width,
                            subsequent_indent="    "))
        judged = " | ".join((g.get("judge") or "").splitlines())
        ra = "-" if g.get("reward_attacker") is None else f"{g['reward_attacker']:+.1f}"
        rd = "-" if g.get("reward_defender") is None else f"{g['reward_defender']:+.1f}"
        print(f"  judge: {judged}  -> outcome {g['outcome']}; reward attacker {ra}, defender {rd}")
    print("=" * width)


def games_main(argv: list[str]) -> None:
    """`fast-srt games RUN_DIR [--step N] [--n K]`: a training run's logged games (games.jsonl), side by side;
    default the last logged step."""
    from fast_srt.commands.args import Parser
    import json
    from pathlib import Path

    from fast_srt.errors import UserError

    ap = Parser(prog="fast-srt games", description="A training run's logged games, side by side "
                                 "(the run logs --log-games games per step; default: the last logged step).")
    ap.add_argument("run_dir", help="a `fast-srt train` run directory (its games.jsonl)")
    ap.add_argument("--step", type=int, help="which step (default: the last one logged)")
    ap.add_argument("--n", type=int, default=8, help="at most this many games (default 8)")
    args = ap.parse_args(argv)
    path = Path(args.run_dir) / "games.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass the directory of a `fast-srt train` run")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    if not rows:
        raise UserError(f"{path} holds no games (the run logs --log-games per step; 0 logs none)")
    step = args.step if args.step is not None else max(r["step"] for r in rows)
    chosen = [r for r in rows if r["step"] == step][: args.n]
    if not chosen:
        raise UserError(f"{path} has no games of step {step}; logged steps: {min(r['step'] for r in rows)}-"
                        f"{max(r['step'] for r in rows)}")
    print_logged_games(chosen)
