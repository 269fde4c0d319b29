"""`fast-srt` command line: `play` (one batch of games, printed side by side) and `train` (the main job).

Bad input (UserError) is printed as one line and exits with code 2, without a traceback.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time

from .engine import QUIET_ENV
from .errors import UserError

USAGE = """usage: fast-srt {train,play} [--help] [--verbose] [options]

  train [PRESET] [--options]   self-play RL training (the main job); `fast-srt train --help` lists presets
  play [--options]             play one batch of real games and print them side by side
  --verbose                    let vLLM, transformers and torch log at their own levels (quiet by default)
"""


def quiet_libraries() -> None:
    """vLLM, transformers and the hub at error level, set before any of them is imported: the console then holds
    fast_srt's own lines (the plan, one line per step, the report) and real errors."""
    import logging
    import warnings

    for k, v in (("VLLM_LOGGING_LEVEL", "ERROR"), ("TRANSFORMERS_VERBOSITY", "error"),
                 ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TQDM_DISABLE", "1"), ("TORCH_CPP_LOG_LEVEL", "ERROR"),
                 (QUIET_ENV, "1")):
        os.environ.setdefault(k, v)
    logging.getLogger("vllm").setLevel(logging.ERROR)  # vLLM warns at import, before it configures its logger

    warnings.filterwarnings("ignore")  # libraries' warnings...
    warnings.filterwarnings("default", module="fast_srt")  # ...but never fast_srt's own (partial checkpoints etc.)


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


def throughput_lines(engines) -> list[str]:
    lines = []
    seen = set()
    for eng in (engines.policy, engines.judge.engine, engines.frozen_defender):
        if eng is None or id(eng) in seen:
            continue
        seen.add(id(eng))
        for phase, st in eng.stats.per_phase.items():
            s = st["seconds"]
            lines.append(f"[{phase:8s}] {st['sequences']:4d} seqs  {st['prompt_tokens']:7d} prompt tok  "
                         f"{st['gen_tokens']:6d} gen tok  {s:7.2f} s  {st['gen_tokens'] / max(s, 1e-9):8.1f} gen tok/s  "
                         f"{(st['gen_tokens'] + st['prompt_tokens']) / max(s, 1e-9):8.1f} total tok/s")
    return lines


def play_main(argv: list[str]) -> None:
    import tyro

    from .config import PlayConfig
    from .engine import SamplingSpec
    from .game import GameOptions
    from .rewards import reward_function
    from .rollout import play_games
    from .session import SeedPool, build_engines

    cfg = tyro.cli(PlayConfig, args=argv, prog="fast-srt play")
    t0 = time.perf_counter()
    pool = SeedPool(cfg.game, rng_seed=cfg.seed)  # seed files are checked before any model loads
    options = GameOptions(mode=cfg.game.mode, cot=cfg.game.cot)
    reward_fn = reward_function(cfg.game.reward)
    engines = build_engines(cfg.model, cfg.game, trains=False, seed=cfg.seed,
                            judge_max_tokens=cfg.sampling.judge_max_tokens)
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
          f"child processes: {_child_processes()}")


def _child_processes() -> int:
    """Live child processes of this process (from /proc; 0 means the engine runs in this process)."""
    me = str(os.getpid())
    n = 0
    try:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[1] == me:
                            n += 1
                except OSError:
                    pass
    except OSError:
        return -1
    return n


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    if not verbose:
        quiet_libraries()
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "play":
            play_main(rest)
        elif cmd == "train":
            from .train import train_main

            train_main(rest)
        else:
            print(f"fast-srt: error: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
            return 2
    except UserError as e:
        print(f"fast-srt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fast-srt: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
