"""Where a step's seconds go, per phase: wall, CPU (user/sys) and minor page faults of the trainer process around
play_games, learner_step, old_and_ref_logprobs, update_policy and eval_at, one line each. Arguments are
`fast-srt train`'s; the run dir is removed at the end unless --keep. Run it on a quiet machine:

    .venv/bin/python bench/checks/phase_rusage.py --steps 3 --eval-every 100 --run-dir /tmp/phase_rusage
"""

import resource
import shutil
import sys
import time

import fast_srt.learner.step as step_mod
import fast_srt.run.trainer as trainer_mod


def timed(mod, name: str) -> None:
    fn = getattr(mod, name)

    def wrapper(*args, **kwargs):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            print(f"[phase] {name:22s} wall {time.perf_counter() - t0:6.1f} s  user {r1.ru_utime - r0.ru_utime:6.1f} s"
                  f"  sys {r1.ru_stime - r0.ru_stime:5.1f} s  minor faults {r1.ru_minflt - r0.ru_minflt:8d}",
                  flush=True)

    setattr(mod, name, wrapper)


def main() -> None:
    keep = "--keep" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--keep"]
    for name in ("play_games", "learner_step", "eval_at"):
        timed(trainer_mod, name)
    for name in ("old_and_ref_logprobs", "update_policy"):
        timed(step_mod, name)
    from fast_srt.cli import main as cli_main

    sys.argv = ["fast-srt", "train", *args]
    try:
        cli_main()
    finally:
        if not keep and "--run-dir" in args:
            shutil.rmtree(args[args.index("--run-dir") + 1], ignore_errors=True)


if __name__ == "__main__":
    main()
