"""Fused log-prob + entropy: time (p20/p50/p80) and peak extra memory per provider, shape and mode.

Providers: naive (full [N, V] fp32 logits, torch autograd), chunked (kernels.logprobs_chunked), native (the C++
op, when built), liger (liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss, pure torch, compiled=False: a GRPO
loss rather than logp/entropy, and it computes gradients inside its forward, so it is timed in fwdbwd only),
triton (kernels.fused_logprobs, CUDA only). Modes: fwd (no grad) and fwdbwd (forward + backward of
sum(g1 * logp + g2 * entropy)).

    .venv/bin/python bench/kernels/logprobs.py                      # default shapes, report to stdout
    .venv/bin/python bench/kernels/logprobs.py --shapes 1024x576x49152 --reps 7 --report bench/results/x.md

Last stdout line: one JSON object (rows, environment, summary).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import (  # noqa: E402
    BenchRow,
    final_json,
    markdown_table,
    peak_extra_mib,
    percentiles,
    print_table,
    run_child,
    time_interleaved,
)

from fast_srt.kernels import native  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def available_providers(device: str) -> list[str]:
    out = ["naive", "chunked"]
    if device == "cpu" and native.available():
        out.append("native")
    try:
        import liger_kernel.chunked_loss  # noqa: F401

        out.append("liger")
        if device == "cuda":
            out.append("liger_ce")
    except ImportError:
        pass
    if device == "cuda":
        out.append("triton")
    return out


def setup(provider: str, N: int, H: int, V: int, mode: str, dtype: torch.dtype, device: str):
    """Allocate inputs and return a zero-argument callable that runs one step of `provider` in `mode`."""
    g = torch.Generator(device="cpu").manual_seed(0)
    grad = mode == "fwdbwd"
    hidden = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_(grad)
    weight = (torch.randn(V, H, generator=g) * (2.0 / H**0.5)).to(device, dtype).requires_grad_(grad)
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    g1, g2 = torch.randn(N, generator=g).to(device), torch.randn(N, generator=g).to(device)
    temperature = 0.9

    if provider == "liger":
        if not grad:
            return None
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        B = 8 if N % 8 == 0 else 1
        loss_mod = LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False, chunk_size=1,
                                            temperature=temperature)
        x = hidden.detach().view(B, N // B, H).requires_grad_()
        ids = targets.view(B, N // B)
        mask = torch.ones(B, N // B, dtype=torch.long, device=device)
        adv = torch.randn(B, generator=g).to(device)

        def run():
            x.grad = weight.grad = None
            loss, _ = loss_mod(x, weight, ids, mask, adv)
            loss.backward()

        return run

    if provider == "liger_ce":
        if not grad:
            return None
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        ce = LigerFusedLinearCrossEntropyLoss()

        def run():
            hidden.grad = weight.grad = None
            ce(weight, hidden, targets).backward()

        return run

    from fast_srt.kernels import LOGPROB_IMPLS

    fn = LOGPROB_IMPLS[provider]

    def run():
        if grad:
            hidden.grad = weight.grad = None
            logp, ent = fn(hidden, weight, targets, temperature)
            (logp * g1 + ent * g2).sum().backward()
        else:
            with torch.no_grad():
                fn(hidden, weight, targets, temperature)

    return run


def parse_shape(s: str) -> tuple[int, int, int]:
    N, H, V = (int(x) for x in s.lower().split("x"))
    return N, H, V


def child_main(provider: str, shape: str, mode: str, dtype: str, device: str) -> None:
    N, H, V = parse_shape(shape)
    # First calls page in library code (MKL kernels, thread pools): tens of MiB of RSS that are not the op's
    # working memory. Warm up on a tiny shape, so the measured call sees only its own allocations.
    setup(provider, 64, H, 1024, mode, DTYPES[dtype], device)()
    fn = setup(provider, N, H, V, mode, DTYPES[dtype], device)
    print(json.dumps({"extra_mib": peak_extra_mib(fn)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1024x576x49152,8192x576x49152", help="NxHxV, comma separated")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--providers", default="all")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--report", default="", help="also write a markdown table to this path")
    p.add_argument("--child", nargs=3, metavar=("PROVIDER", "SHAPE", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        child_main(*args.child, args.dtype, device)
        return

    providers = available_providers(device)
    if args.providers != "all":
        providers = [x for x in args.providers.split(",") if x in providers]
    sync = torch.cuda.synchronize if device == "cuda" else None
    rows: list[BenchRow] = []
    for shape in args.shapes.split(","):
        N, H, V = parse_shape(shape)
        for mode in args.modes.split(","):
            fns = {}
            for prov in providers:
                fn = setup(prov, N, H, V, mode, DTYPES[args.dtype], device)
                if fn is not None:
                    fns[prov] = fn
            times = time_interleaved(fns, args.reps, args.warmup, sync)
            del fns
            for prov, ts in times.items():
                mem = None
                if not args.no_memory:
                    mem = run_child(os.path.abspath(__file__),
                                    ["--child", prov, shape, mode, "--dtype", args.dtype])["extra_mib"]
                note = {"liger": "GRPO loss (fwd computes grads)",
                        "liger_ce": "CE loss, T=1, no entropy (fwd computes grads)"}.get(prov, "")
                rows.append(BenchRow("logprobs", prov, mode, f"{shape} {args.dtype}", *percentiles(ts), mem, note))
                print(f"  {prov:<8}{mode:<8}{shape}: p50 {rows[-1].p50_ms:.1f} ms, extra {mem} MiB", flush=True)

    summary = {}
    for shape in args.shapes.split(","):
        N, H, V = parse_shape(shape)
        logits_mib = N * V * 4 / 2**20
        for mode in args.modes.split(","):
            by = {r.provider: r for r in rows if r.shape.startswith(shape + " ") and r.mode == mode}
            s = {"logits_fp32_mib": logits_mib}
            if "chunked" in by and "naive" in by:
                s["chunked_speedup_vs_naive"] = by["naive"].p50_ms / by["chunked"].p50_ms
            if "native" in by and "chunked" in by:
                s["native_speedup_vs_chunked"] = by["chunked"].p50_ms / by["native"].p50_ms
            for prov in ("chunked", "native", "triton"):
                if prov in by and by[prov].extra_mib is not None:
                    s[f"{prov}_extra_over_logits"] = by[prov].extra_mib / logits_mib
            summary[f"{shape}/{mode}"] = s

    print()
    print_table(rows)
    print(json.dumps(summary, indent=1))
    if args.report:
        with open(args.report, "w") as f:
            f.write(markdown_table(rows) + "\n\n```json\n" + json.dumps(summary, indent=1) + "\n```\n")
    print(final_json("logprobs", rows, summary))


if __name__ == "__main__":
    main()
