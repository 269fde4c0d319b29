"""`fast-srt` command line: dispatches to one module of `fast_srt.commands` per command (train, play, eval,
judge-eval, plot, plan, bench, crossplay); nothing imports this module.

Bad input (UserError) is printed as one line and exits with code 2, without a traceback.
"""

from __future__ import annotations

import os
import sys

from fast_srt.engine.engine import QUIET_ENV
from fast_srt.errors import UserError

COMMANDS = ("train", "sft", "play", "games", "eval", "judge-eval", "plot", "plan", "bench", "crossplay")
USAGE = """usage: fast-srt {train,sft,play,games,eval,judge-eval,plot,plan,bench,crossplay} [--help] [--verbose]
                [options]

  train [PRESET] [--options]   self-play RL training (the main job); `fast-srt train --help` lists presets
  sft [PRESET] [--format-prompts N] [--format-temperatures T,...] [--warmup.* options]
                               only the format warm-up: train (or reuse) it, print where it is cached and how
                               often each role keeps the <think>/<answer> format afterwards
  play [--options]             play one batch of real games and print them side by side
  games RUN_DIR [--step N]     a training run's logged games side by side (default: its last step)
  eval CHECKPOINT [--compare BASELINE] [--options]
                               safety (attack success, refusal, over-refusal) and attack diversity on held-out sets
  plan [PRESET] [--budget-gib G] [--device cuda|cpu] [--ranks N] [train options]
                               the memory plan phase by phase: does it fit, what to change if not
  judge-eval [--judge-model M] [--options]
                               a judge's agreement with known labels: accuracy, AUC, confusion matrices
  plot RUN_DIR [--out DIR]     a run's metrics as PNG curves (rewards, format, outcomes, policy, sampler, time)
  bench [PRESET] [--bench-steps N] [--out PATH] [train options]
                               time whole steps of a fixed workload: seconds, tokens, FLOPs per phase
  crossplay RUN_DIR [--checkpoints SPEC ...] [--seeds N]
                               attack success of each checkpoint's attacker against each checkpoint's defender
                               (judge and refusal matcher), as tables and a heat map
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


# oneDNN (torch's CPU matmuls) keeps up to 1024 compiled primitives, one per shape; the learner's packed shapes
# change every step, so a long CPU run's resident memory grows for hundreds of steps until the cache is full.
# 256 bounds that growth (docs/crash_safety.md, "Soak"); set the variable to override it.
ONEDNN_CACHE = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    os.environ.setdefault(*ONEDNN_CACHE)  # before torch loads oneDNN
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    if not verbose:
        quiet_libraries()
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "play":
            from fast_srt.commands.play import play_main

            play_main(rest)
        elif cmd == "bench":
            from fast_srt.commands.bench import bench_main

            bench_main(rest)
        elif cmd == "eval":
            from fast_srt.commands.eval import eval_main

            eval_main(rest)
        elif cmd == "plan":
            from fast_srt.commands.plan import plan_main

            plan_main(rest)
        elif cmd == "games":
            from fast_srt.commands.play import games_main

            games_main(rest)
        elif cmd == "judge-eval":
            from fast_srt.commands.judge_eval import judge_eval_main

            judge_eval_main(rest)
        elif cmd == "plot":
            from fast_srt.commands.plot import plot_main

            plot_main(rest)
        elif cmd == "sft":
            from fast_srt.commands.sft import sft_main

            sft_main(rest)
        elif cmd == "crossplay":
            from fast_srt.commands.crossplay import crossplay_main

            crossplay_main(rest)
        elif cmd == "train":
            from fast_srt.commands.train import train_main

            train_main(rest)
        else:
            print(f"fast-srt: error: unknown command {cmd!r}; commands: {', '.join(COMMANDS)} (`fast-srt --help` "
                  f"says what each does)", file=sys.stderr)
            return 2
    except UserError as e:
        print(f"fast-srt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fast-srt: interrupted; a train run continues from its last checkpoint with --resume (the same "
              "command and --run-dir)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
