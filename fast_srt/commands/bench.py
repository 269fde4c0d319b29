"""`fast-srt bench [PRESET] [--bench-steps N] [--out PATH] [train options]`: time whole training steps of a fixed
workload, so that two commits compare on identical work.

The workload: the preset (default cpu_default) with its seeds, every attacker and defender turn generating exactly
max_new_tokens (EOS ignored: `sampling.fixed_length`), N steps (default 3) in a fresh run directory. Steps after
the first are reported (the first pays warm-up). Per phase it prints the median seconds, the tokens, the matmul
FLOPs, and their share of the matmul ceiling measured in the same run (the best [2048, H] x [H, 4H] matmul in
the compute dtype, before and after the run), plus the process's peak memory. FLOPs count the linear layers and
the output head (2 per parameter per token forward, 6 forward + backward), not attention: a lower bound. The
generate and judge phases count decode and prefill tokens. The report goes to bench/results/ (markdown); the last stdout line is JSON.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def linear_params(config: dict) -> tuple[int, int]:
    """(parameters in the decoder's linear layers, parameters of the output head) from an HF config.json."""
    text = config.get("text_config", config)
    h, inter, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or h // heads
    kv = text.get("num_key_value_heads", heads) * head_dim
    per_layer = h * heads * head_dim * 2 + h * kv * 2 + 3 * h * inter  # q, o, k, v, gate/up/down
    return per_layer * layers, text["vocab_size"] * h


def matmul_ceiling(hidden: int, dtype, reps: int = 20) -> float:
    """Best of `reps` timings of a [2048, H] x [H, 4H] matmul in `dtype`, in FLOP/s. The bench takes it before
    and after the run and keeps the higher: one reading moves by up to 2x between runs on a shared machine."""
    import torch

    a = torch.randn(2048, hidden, dtype=dtype)
    b = torch.randn(hidden, 4 * hidden, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048 * hidden * 4 * hidden / best


def phase_rows(rows: list[dict], lin: int, head: int, n_forwards: int, ceiling: float) -> list[dict]:
    """Per-phase median seconds, tokens, FLOPs and share of the ceiling over the timed steps."""

    def med(key):
        vals = [r.get(key) or 0.0 for r in rows]
        return statistics.median(vals) if vals else 0.0

    gen, prefill, loss, trained = (med(k) for k in ("tokens/generated", "tokens/prefill", "tokens/loss",
                                                     "tokens/trained"))
    # what the trainer's forwards computed (prefix sharing, skipped old forwards); older runs: the full count
    lp_rows = med("tokens/logprob_rows") if rows and "tokens/logprob_rows" in rows[0] else n_forwards * trained
    lp_loss = med("tokens/logprob_loss") if rows and "tokens/logprob_loss" in rows[0] else n_forwards * loss
    tr_rows = med("tokens/train_rows") if rows and "tokens/train_rows" in rows[0] else trained
    j_prompt, j_gen = med("tokens/judge_prompt"), med("tokens/judge_generated")
    phases = [
        ("generate", "time/generate_s", gen + prefill, 2 * lin * (gen + prefill) + 2 * head * gen),
        ("judge", "time/judge_s", j_prompt + j_gen, 2 * lin * (j_prompt + j_gen) + 2 * head * j_gen),
        ("logprob", "time/logprob_s", lp_rows, 2 * lin * lp_rows + 2 * head * lp_loss),
        ("advantage", "time/advantage_s", loss, 0.0),
        ("train", "time/train_s", tr_rows, 6 * lin * tr_rows + 6 * head * loss),
        ("sync", "time/sync_s", 0, 0.0),
        ("step", "time/step_s", gen + trained, 0.0),
    ]
    out = []
    for name, key, tokens, flops in phases:
        s = med(key)
        out.append({"phase": name, "seconds": round(s, 3), "tokens": int(tokens), "gflop": round(flops / 1e9, 2),
                    "share_of_ceiling": round(flops / s / ceiling, 3) if s > 0 and flops else None})
    return out


def bench_main(argv: list[str]) -> None:
    import resource

    import torch

    from fast_srt.commands.train import parse_train_args
    from fast_srt.errors import UserError
    from fast_srt.run.metrics import read_metrics
    from fast_srt.run.models import resolve_model
    from fast_srt.run.trainer import train

    from fast_srt.commands.args import Parser

    ap = Parser("fast-srt bench", (__doc__ or "").split("\n\n")[0], takes_train_options=True)
    ap.add_argument("--bench-steps", type=int, default=3,
                    help="steps to run; the first is warm-up and not reported (default 3, at least 2)")
    ap.add_argument("--out", default=None, help="where to write the report (default bench/results/step_*.md)")
    ns, rest = ap.parse_own(argv)
    steps, out = ns.bench_steps, ns.out
    if steps < 2:
        raise UserError("--bench-steps must be >= 2 (the first step is warm-up and not reported)")
    cfg = parse_train_args(rest)
    run_dir = tempfile.mkdtemp(prefix="fast_srt_bench_")
    cfg = dataclasses.replace(cfg, steps=steps, run_dir=run_dir, save_every=10**9, log_games=0, resume=False,
                              sampling=dataclasses.replace(cfg.sampling, fixed_length=True))
    model_config = json.loads((resolve_model(cfg.model.model, cfg.model.dtype) / "config.json").read_text())
    lin, head = linear_params(model_config)
    dtype = getattr(torch, cfg.model.dtype)
    ceiling = matmul_ceiling(model_config.get("hidden_size", 576), dtype)
    try:  # the run directory is scratch: its final checkpoint alone is 1.6 GB at the default model
        t0 = time.perf_counter()
        train(cfg)
        wall = time.perf_counter() - t0
        rows = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["step"] >= 2]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    ceiling = max(ceiling, matmul_ceiling(model_config.get("hidden_size", 576), dtype))
    n_forwards = 2 if cfg.algo.kl_coef > 0 else 1  # old + reference
    table = phase_rows(rows, lin, head, n_forwards, ceiling)
    peak_gib = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    sha = _git_sha()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    head_line = (f"fast-srt bench {' '.join(argv)} | commit {sha} | {device}, torch threads "
                 f"{torch.get_num_threads()} | {cfg.model.model} {cfg.model.dtype}, {cfg.sampling.games_per_step} "
                 f"games x {cfg.sampling.max_new_tokens} tokens, steps 2-{steps} | matmul ceiling "
                 f"{ceiling / 1e9:.0f} GFLOP/s | peak memory {peak_gib:.2f} GiB | wall {wall:.1f} s")
    lines = [head_line, "", "| phase | seconds (median) | tokens | GFLOP | share of matmul ceiling |",
             "|---|---:|---:|---:|---:|"]
    for r in table:
        share = "-" if r["share_of_ceiling"] is None else f"{100 * r['share_of_ceiling']:.0f}%"
        lines.append(f"| {r['phase']} | {r['seconds']:.2f} | {r['tokens']} | {r['gflop']} | {share} |")
    print("\n".join(lines))
    date = datetime.date.today().isoformat()
    report = Path(out) if out else ROOT / "bench" / "results" / f"step_{device.replace(' ', '_')}_{date}_{sha}.md"
    if report.parent.is_dir():
        report.write_text("# Step benchmark\n\n" + "\n".join(lines) + "\n")
        print(f"report: {report}")
    print(json.dumps({"commit": sha, "device": device, "ceiling_gflops": round(ceiling / 1e9, 1),
                      "peak_gib": round(peak_gib, 3), "phases": table, "config": dataclasses.asdict(cfg)},
                     default=str))


def _git_sha() -> str:
    import subprocess

    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return p.stdout.strip() or "unknown"
