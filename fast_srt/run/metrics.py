"""Step timing and metric logging: one JSONL line and one console line per step.

Metric keys are namespaced (`reward/defender_mean`, `time/generate_s`, `is/ratio_mean`, ...). Tensors are turned
into floats once, here (`.item()` is a host sync point: one batch of them per step, not scattered in the loop).
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from fast_srt.errors import UserError


class PhaseTimer:
    """Wall time per named phase within a step: `with timer("train"): ...`. On an asynchronous device pass its
    synchronize as `sync` (called as a phase starts and ends), so that a phase's queued kernels count in it and not
    in the next one."""

    def __init__(self, sync=None):
        self.seconds: dict[str, float] = {}
        self.sync = sync or (lambda: None)

    @contextmanager
    def __call__(self, phase: str):
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


def to_floats(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None if math.isnan(v) else (1e30 if v > 0 else -1e30)
        out[k] = v
    return out


class MetricsLog:
    """Appends JSON objects with a "step" key to `path` (metrics, game logs). On resume, lines after the
    checkpoint's step are dropped, so the file continues exactly where the checkpoint left off; if the lines of the
    checkpoint's own step are missing (a kill after the checkpoint, before its lines), `restore` (the records the
    checkpoint carries) are written in their place. A new run never overwrites an earlier run's lines: a file that
already holds any is refused (the trainer refuses such a run directory before it starts). A file named metrics.jsonl
    also sends its scalars to TensorBoard / W&B beside it (fast_srt.run.scalars)."""

    def __init__(self, path: Path, resume_step: int | None = None, restore: list[dict] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sinks = None
        if resume_step is not None:
            kept, have_step = [], False
            for line in self.path.read_text().splitlines() if self.path.exists() else []:
                try:
                    step = json.loads(line).get("step", 0)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill: drop it
                if step <= resume_step:
                    kept.append(line)
                    have_step |= step == resume_step
            if not have_step:
                kept += [json.dumps(r) for r in restore or [] if r.get("step") == resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(x + "\n" for x in kept))
            tmp.replace(self.path)
        elif self.path.exists() and self.path.stat().st_size:
            raise UserError(f"{self.path} holds lines of an earlier run and this run has no checkpoint to continue "
                            f"from; pass a new --run-dir, or move the earlier run's files away")
        if self.path.name == "metrics.jsonl":
            from fast_srt.run.scalars import ScalarSinks

            replay = [] if resume_step is None else [r for r in read_metrics(self.path) if r["step"] == resume_step]
            self.sinks = ScalarSinks(self.path.parent, resume_step or 0, replay)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.sinks is not None:
            self.sinks.write(record)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


class Status:
    """A live progress line on a terminal: the step, its phase and the seconds spent in it, refreshed every second
    while a long phase runs (plain step lines only when stdout is not a tty)."""

    def __init__(self, total_steps: int):
        self.total = total_steps
        self.tty = sys.stdout.isatty()
        self._msg, self._t0 = "", 0.0
        self._lock = threading.Lock()
        if self.tty:
            threading.Thread(target=self._tick, daemon=True).start()

    def _tick(self) -> None:
        while True:
            time.sleep(1.0)
            with self._lock:
                if self._msg:
                    sys.stdout.write(f"\r\033[K{self._msg} {time.perf_counter() - self._t0:.0f} s")
                    sys.stdout.flush()

    def phase(self, step: int, name: str) -> None:
        with self._lock:
            self._msg, self._t0 = f"step {step}/{self.total}: {name}...", time.perf_counter()
            if self.tty:
                sys.stdout.write("\r\033[K" + self._msg)
                sys.stdout.flush()

    def line(self, text: str) -> None:
        with self._lock:
            self._msg = ""
            if self.tty:
                sys.stdout.write("\r\033[K")
            print(text, flush=True)


def console_line(m: dict) -> str:
    """One step: rewards and format per role; KL, clip fraction, importance ratio, log-prob mismatch and entropy,
    each pooled and then per role (`a/d` attacker/defender; `-` where a role had no token); with an opponent league,
    the games against snapshots and each role's reward in them; times; throughput."""
    from fast_srt.learner.step import role_key

    def g(k, fmt="{:+.2f}"):
        v = m.get(k)
        return "-" if v is None else fmt.format(v)

    def split(k, fmt):
        return f"{g(k, fmt)} a/d {g(role_key(k, 'attacker'), fmt)}/{g(role_key(k, 'defender'), fmt)}"

    league = (f"league: {m['league/past_games']} games vs past, R a/d {g('league/attacker_reward_vs_past')}/"
              f"{g('league/defender_reward_vs_past')} | " if "league/past_games" in m else "")
    return (f"step {m['step']:>4} | R_att {g('reward/attacker_mean')} R_def {g('reward/defender_mean')} | "
            f"fmt-viol a {g('format/attacker_violation_rate', '{:.2f}')} d {g('format/defender_violation_rate', '{:.2f}')} | "
            f"kl {split('kl/mean', '{:.4f}')} clip {split('loss/clip_frac', '{:.3f}')} "
            f"IS {split('is/ratio_mean', '{:.3f}')} mism {split('is/logp_mismatch_mean_abs', '{:.1e}')} "
            f"ent {split('policy/entropy', '{:.2f}')} | {league}"
            f"gen {g('time/generate_s', '{:.1f}')}s judge {g('time/judge_s', '{:.1f}')}s lp {g('time/logprob_s', '{:.1f}')}s "
            f"train {g('time/train_s', '{:.1f}')}s sync {g('time/sync_s', '{:.2f}')}s | "
            f"{g('perf/tokens_per_s', '{:.0f}')} tok/s")


def step_perf(timer: PhaseTimer, engine_phases: dict, trained_tokens: int, wall: float, loss_tokens: int = 0,
              ) -> dict:
    """A step's time and token metrics: the trainer's timed phases, the engines' generate and judge seconds (from
    their per-phase counters: `Engines.since`), tokens generated and prefilled for the games (not the weight-write
    canary's), judged, trained (all tokens of the trained samples) and in the loss (their response tokens), and
    throughput."""
    gen = [v for k, v in engine_phases.items() if k not in ("judge", "probe", "canary")]  # the games only
    gen_s = sum(v["seconds"] for v in gen)
    gen_tok = sum(v["gen_tokens"] for v in gen)
    judge = engine_phases.get("judge", {})
    return {**{f"time/{k}_s": v for k, v in timer.seconds.items()},
            "tokens/prefill": sum(v.get("prompt_tokens", 0) for v in gen), "tokens/loss": loss_tokens,
            "tokens/judge_prompt": judge.get("prompt_tokens", 0),
            "tokens/judge_generated": judge.get("gen_tokens", 0),
            "time/generate_s": gen_s, "time/judge_s": engine_phases.get("judge", {}).get("seconds", 0.0),
            "time/step_s": wall, "tokens/generated": gen_tok, "tokens/trained": trained_tokens,
            "perf/tokens_per_s": (gen_tok + trained_tokens) / wall,
            "perf/gen_tokens_per_s": gen_tok / max(gen_s, 1e-9)}
