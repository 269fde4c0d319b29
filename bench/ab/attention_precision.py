"""CPU attention in the trainer: SDPA per packed piece in bf16 against fp32, forward and backward, one layer.

Why it exists: the trainer's packed attention (learner/policy.py) runs one SDPA call per piece. On CPU, torch's
flash-attention backward is much slower in bf16 than in fp32 at these small shapes, so the trainer upcasts q, k, v
to fp32 on CPU (and casts the output back). This bench measures the two side by side, round-robin in one process.

Shapes (SmolLM2-135M: 9 query / 3 key-value heads of 64):
  W1        8 prompts of 40 tokens, each with 8 completions of 64 tokens that attend to their prompt
  selfplay  an attacker instruction of 300 tokens with 8 turns of 48, a defender one of 80 with 8 turns of 120

    .venv/bin/python bench/ab/attention_precision.py [--reps 5] [--report bench/results/attention_precision_cpu.md]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn.functional import scaled_dot_product_attention

HQ, HKV, D = 9, 3, 64
SHAPES = {
    "W1": [(0, 40)] * 8 + [(40, 64)] * 64,
    "selfplay": [(0, 300)] + [(300, 48)] * 8 + [(0, 80)] + [(80, 120)] * 8,
}


def pieces_attention(qs, ks, vs, pieces):
    """One SDPA call per piece: a piece of n queries after c context tokens sees keys 0 .. c + j."""
    outs = []
    for (c, n), q, k, v in zip(pieces, qs, ks, vs):
        if c == 0:
            outs.append(scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        else:
            keep = torch.ones(n, c + n, dtype=torch.bool).tril(c)
            mask = torch.zeros(n, c + n, dtype=q.dtype).masked_fill_(~keep, float("-inf"))
            outs.append(scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
    return outs


def inputs(pieces, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_(True)  # noqa: E731
    return ([mk(1, HQ, n, D) for c, n in pieces], [mk(1, HKV, c + n, D) for c, n in pieces],
            [mk(1, HKV, c + n, D) for c, n in pieces])


def time_once(args, pieces) -> tuple[float, float]:
    t0 = time.perf_counter()
    outs = pieces_attention(*args, pieces)
    loss = sum(o.float().sum() for o in outs)
    t1 = time.perf_counter()
    loss.backward()
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--report", default="")
    a = p.parse_args()
    lines = [f"# CPU packed attention, bf16 vs fp32 (torch {torch.__version__}, {torch.get_num_threads()} threads)", "",
             "One layer, one SDPA call per piece, forward then backward, median of round-robin reps (ms).", "",
             "| shape | dtype | forward | backward | fwd+bwd |", "|---|---|---:|---:|---:|"]
    for name, pieces in SHAPES.items():
        args = {dt: inputs(pieces, dt) for dt in (torch.bfloat16, torch.float32)}
        times = {dt: [] for dt in args}
        for _ in range(a.reps + 1):  # the first round is warm-up
            for dt in args:
                times[dt].append(time_once(args[dt], pieces))
        for dt, ts in times.items():
            f = statistics.median(t[0] for t in ts[1:]) * 1e3
            b = statistics.median(t[1] for t in ts[1:]) * 1e3
            lines.append(f"| {name} | {str(dt).removeprefix('torch.')} | {f:.1f} | {b:.1f} | {f + b:.1f} |")
    print("\n".join(lines))
    if a.report:
        with open(a.report, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
