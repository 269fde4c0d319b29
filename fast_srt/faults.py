"""Testing hook: make the trainer SIGKILL itself at a named point of a named step.

    FAST_SRT_KILL_AT=POINT:STEP fast-srt train ...

POINT is one of KILL_POINTS:
    generate            during the play phase: after the step's first batch of turns came back from the engine
                        (attacker turns; defender turns in defender_only), before the rest of the game
    update              during the PPO update: after the first optimizer step, before the others
    checkpoint_partial  half-way through writing the checkpoint: weights and tokenizer written, trainer state,
                        run config and COMPLETE marker not
    after_checkpoint    after the checkpoint is complete and `latest` points at it, before the step's metrics line
    weight_sync         during the weight write into the live engine: half of the tensors written, the rest not

    FAST_SRT_DISK_FULL_AT=STEP fast-srt train ...

makes the checkpoint write of step STEP fail with ENOSPC after the weights are written, as a full disk would
(the trainer must turn it into one clear line and keep the previous checkpoint).

The kill is a real SIGKILL of the trainer's own process (no handler runs, no file is closed): crash tests put the
fault exactly where it must happen instead of sleeping and hoping the trainer is there. Unset: every hook is a
no-op costing one comparison.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

from fast_srt.errors import UserError

ENV = "FAST_SRT_KILL_AT"
DISK_FULL_ENV = "FAST_SRT_DISK_FULL_AT"
KILL_POINTS = ("generate", "update", "checkpoint_partial", "after_checkpoint", "weight_sync")

_step: int | None = None  # the step the trainer is in (set by the loop)
_want: tuple[str, int] | None = None  # FAST_SRT_KILL_AT, parsed once per step by enter_step


def parse(value: str | None) -> tuple[str, int] | None:
    """`POINT:STEP` -> (point, step); None or '' -> None; anything else -> UserError."""
    if not value:
        return None
    point, _, step = value.partition(":")
    if point not in KILL_POINTS or not step.isdigit() or int(step) < 1:
        raise UserError(f"{ENV}={value!r}: expected POINT:STEP with POINT one of {', '.join(KILL_POINTS)} and "
                        f"STEP >= 1 (e.g. {KILL_POINTS[0]}:2); unset it to train normally")
    return point, int(step)


def target() -> tuple[str, int] | None:
    return parse(os.environ.get(ENV))


def enter_step(step: int) -> None:
    """Called by the training loop at the start of each step (reads FAST_SRT_KILL_AT for it)."""
    global _step, _want
    _step, _want = step, target()


def hit(point: str) -> None:
    """SIGKILL this process if FAST_SRT_KILL_AT names `point` at the current step."""
    if point not in KILL_POINTS:
        raise ValueError(f"unknown kill point {point!r}")
    if _want is None or _want != (point, _step):
        return
    print(f"[{ENV}] SIGKILL at {point}, step {_step}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def disk_full_check(step: int) -> None:
    """Raise ENOSPC if FAST_SRT_DISK_FULL_AT names this checkpoint step."""
    value = os.environ.get(DISK_FULL_ENV)
    if not value:
        return
    if not value.isdigit():
        raise UserError(f"{DISK_FULL_ENV}={value!r}: expected a step number; unset it to train normally")
    if int(value) == step:
        raise OSError(errno.ENOSPC, f"No space left on device (injected by {DISK_FULL_ENV})")


def hit_halfway(point: str, items, n: int):
    """Yield from `items` (n of them), calling hit(point) after the first half."""
    for i, x in enumerate(items):
        if i == n // 2:
            hit(point)
        yield x
