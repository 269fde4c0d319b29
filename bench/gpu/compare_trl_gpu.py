"""fast_srt against TRL's GRPOTrainer in vLLM colocate mode on one GPU, the same workload on both sides.

The workload is bench/steps/compare_trl.py's W1 (8 prompts x 8 samples of the defender's side, no CoT, the
`vowel_refusal` rule reward, GRPO with KL 0.01, one update per rollout, bf16), on a random-init model of the given
directory (bench/gpu/make_models.py: Qwen2.5-1.5B's shape), every completion exactly --new-tokens long
(fast_srt: `sampling.fixed_length`; TRL: vLLM's `min_tokens` = `max_tokens`), so both sides generate the same
number of tokens. Each side runs --steps steps in a fresh process; the figure is completion tokens per second of
wall time over steps 2..N (step 1 pays compilation and warm-up).

TRL's setting, the fastest single-GPU one found in its GRPOConfig: `use_vllm=True, vllm_mode="colocate"` (vLLM in
the trainer's process, weights pushed in place), CUDA graphs and torch.compile on in vLLM (TRL does not ask for
eager mode), `vllm_gpu_memory_utilization` 0.3 (its default), `use_liger_kernel=True` (Liger's fused linear GRPO
loss), no gradient checkpointing, bf16. fast_srt: its defaults on CUDA (in-process engine, in-place weight
sync, fused Triton log-probs).

Per phase: fast_srt's metrics.jsonl times (time/*_s); TRL's generation (its `_generate`, weight push included)
and the rest of its step.

    python3 bench/gpu/compare_trl_gpu.py --model /tmp/fast_srt_models/qwen2.5-1.5b --steps 3 --out report.md
    python3 bench/gpu/compare_trl_gpu.py --dry-run

Last stdout line: JSON with both sides' tokens/s, per-phase seconds and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "steps"))
sys.path.insert(0, str(ROOT))

from compare_trl import KL, LR, PER_PROMPT, PROMPTS, tokens_per_s, vowel_reward, w1_prompts  # noqa: E402


def fast_srt_cmd(model: str, steps: int, new_tokens: int, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "fast_srt.cli", "train", "defender_only", "--game.no-cot",
            "--model.model", model, "--model.judge-model", "rule:vowel_refusal",
            "--sampling.games-per-step", str(PROMPTS * PER_PROMPT), "--sampling.max-new-tokens", str(new_tokens),
            "--sampling.fixed-length", "--sampling.temperature", "1.0", "--algo.estimator", "grpo",
            "--algo.samples-per-prompt", str(PER_PROMPT), "--algo.kl-coef", str(KL), "--optim.updates-per-step",
            "1", "--optim.lr", str(LR), "--steps", str(steps), "--save-every", str(10**6), "--log-games", "0",
            "--run-dir", str(run_dir)]


def run_fast_srt(model: str, steps: int, new_tokens: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="w1_gpu_") as tmp:
        run_dir = Path(tmp) / "run"
        t0 = time.perf_counter()
        subprocess.run(fast_srt_cmd(model, steps, new_tokens, run_dir), check=True, cwd=ROOT, timeout=timeout)
        wall = time.perf_counter() - t0
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"step_s": [r["time/step_s"] for r in rows], "tokens_per_step": [r["tokens/generated"] for r in rows],
            "wall_s": wall, "phases": {k: statistics.median(r[k] for r in rows[1:]) for k in rows[-1]
                                       if k.startswith("time/") and all(k in r for r in rows[1:])}}


def trl_worker(model: str, steps: int, new_tokens: int, out: Path) -> None:
    """One TRL run in this process: per-step wall times, generation times and completion lengths to `out`."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in w1_prompts(steps)])
    marks: list[float] = []
    lengths: list[float] = []
    gen_s: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            if not marks:
                marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_w1_gpu_"), bf16=True, model_init_kwargs={"dtype": torch.bfloat16},
        per_device_train_batch_size=PROMPTS * PER_PROMPT, num_generations=PER_PROMPT, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, max_completion_length=new_tokens,
        generation_kwargs={"min_tokens": new_tokens}, temperature=1.0, beta=KL, learning_rate=LR, max_steps=steps,
        logging_steps=1, save_strategy="no", report_to="none", shuffle_dataset=False, seed=0,
        dataloader_num_workers=0, use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3,
        use_liger_kernel=True, gradient_checkpointing=False)
    trainer = GRPOTrainer(model=model, reward_funcs=vowel_reward, args=args, train_dataset=data,
                          callbacks=[Clock()])
    generate = trainer._generate

    def timed_generate(*a, **kw):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = generate(*a, **kw)
        torch.cuda.synchronize()
        gen_s.append(time.perf_counter() - t0)
        return result

    trainer._generate = timed_generate
    trainer.train()
    step_s = [b - a for a, b in zip(marks[:-1], marks[1:])]
    out.write_text(json.dumps({"step_s": step_s, "generate_s": gen_s, "mean_length": lengths,
                               "tokens_per_step": [m * PROMPTS * PER_PROMPT for m in lengths],
                               "peak_gib": torch.cuda.max_memory_allocated() / 2**30}))


def run_trl(model: str, steps: int, new_tokens: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="w1_trl_") as tmp:
        out = Path(tmp) / "trl.json"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--model", model, "--steps", str(steps), "--new-tokens",
                        str(new_tokens), "--trl-worker", str(out)], check=True, cwd=ROOT, timeout=timeout)
        res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t0
    gen = statistics.median(res["generate_s"][1:]) if len(res["generate_s"]) > 1 else None
    step = statistics.median(res["step_s"][1:])
    res["phases"] = {"time/generate_incl_sync_s": gen, "time/rest_s": None if gen is None else step - gen,
                     "time/step_s": step}
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="/tmp/fast_srt_models/qwen2.5-1.5b")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--sides", default="fast_srt,trl", help="which sides to run, in order")
    ap.add_argument("--side-timeout", type=float, default=300, help="seconds for each side's process")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    ap.add_argument("--dry-run", action="store_true", help="print both sides' settings and exit")
    ap.add_argument("--trl-worker", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.trl_worker is not None:
        trl_worker(a.model, a.steps, a.new_tokens, a.trl_worker)
        return 0
    if a.steps < 2:
        ap.error("--steps must be >= 2 (step 1 is warm-up and not counted)")
    sides = [s for s in a.sides.split(",") if s]
    if set(sides) - {"fast_srt", "trl"}:
        ap.error("--sides takes fast_srt and/or trl")
    work = (f"{PROMPTS} prompts x {PER_PROMPT} samples, exactly {a.new_tokens} new tokens each "
            f"({PROMPTS * PER_PROMPT * a.new_tokens} completion tokens per step), GRPO, KL {KL}, one update per "
            f"rollout, bf16, steps 2-{a.steps} counted")
    if a.dry_run:
        print(f"workload: {work}; model {a.model}")
        print("fast_srt: " + " ".join(fast_srt_cmd(a.model, a.steps, a.new_tokens, Path("RUN_DIR"))[1:]))
        print("trl: GRPOTrainer, use_vllm=True, vllm_mode=colocate, vllm_gpu_memory_utilization=0.3, "
              "use_liger_kernel=True, min_tokens=max_completion_length, bf16")
        print(json.dumps({"dry_run": True, "sides": sides}))
        return 0
    res = {}
    for side in sides:
        print(f"[compare_trl_gpu] {side} ...", flush=True)
        run = run_fast_srt if side == "fast_srt" else run_trl
        try:
            res[side] = run(a.model, a.steps, a.new_tokens, a.side_timeout)
            res[side]["tok_s"] = tokens_per_s(res[side])
            print(f"[compare_trl_gpu] {side}: {res[side]['tok_s']:.0f} completion tok/s, phases "
                  f"{json.dumps(res[side]['phases'])}", flush=True)
        except (subprocess.SubprocessError, OSError, KeyError, ValueError) as e:
            res[side] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"[compare_trl_gpu] {side} failed: {res[side]['error']}", flush=True)
    ratio = (res["fast_srt"]["tok_s"] / res["trl"]["tok_s"]
             if all("tok_s" in res.get(s, {}) for s in ("fast_srt", "trl")) else None)
    lines = [f"W1 on one GPU: {work}; model {a.model}", "", "| side | completion tok/s | step s (median) | "
             "phases (median s) |", "|---|---:|---:|---|"]
    for side, r in res.items():
        if "tok_s" in r:
            phases = ", ".join(f"{k.removeprefix('time/').removesuffix('_s')} {v:.2f}"
                               for k, v in r["phases"].items() if v is not None)
            lines.append(f"| {side} | {r['tok_s']:.0f} | {statistics.median(r['step_s'][1:]):.2f} | {phases} |")
        else:
            lines.append(f"| {side} | failed | | {r['error']} |")
    lines.append("")
    lines.append(f"Ratio fast_srt / TRL: {ratio:.2f}x" if ratio else "Ratio: not available (one side ran or a "
                 "side failed)")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)
    print(json.dumps({"ratio": ratio, "sides": res}))
    return 0 if all("tok_s" in r for r in res.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
