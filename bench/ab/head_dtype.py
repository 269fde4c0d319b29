"""The output head in three precisions: the fp32 master-weight head (what the trainer runs), the same with TF32
matmuls, and a bf16 head (hidden and weight cast to bf16, fp32 accumulation). Per precision and log-prob
implementation: forward + backward seconds (median of --reps after a warm-up) and the error against float64 of the
log-probs, the entropies (max absolute, nats) and the two gradients (normwise relative).

    python3 bench/ab/head_dtype.py --shape smollm2-135m --report head.md       # CUDA: [8192, 576] x [49152, 576]
    python3 bench/ab/head_dtype.py --shape qwen2.5-1.5b                          # CUDA: [8192, 1536] x [151936, 1536]
    .venv/bin/python bench/ab/head_dtype.py --smoke                              # CPU: tiny shapes, twin only

Last stdout line: one JSON object with a row per (impl, precision).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fast_srt.kernels import LOGPROB_IMPLS  # noqa: E402

SHAPES = {"smollm2-135m": (8192, 576, 49152), "qwen2.5-1.5b": (8192, 1536, 151936), "smoke": (53, 32, 301)}
PRECISIONS = ("fp32", "tf32", "bf16")


@contextlib.contextmanager
def matmul_precision(precision: str):
    """TF32 matmuls for "tf32" (CUDA), full fp32 otherwise; restored afterwards."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def inputs(n: int, h: int, v: int, device, seed: int = 0):
    """hidden [N, H] at the scale of final-norm outputs, weight [V, H] at an embedding's scale, targets [N]."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * h ** -0.5 * 2
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden.to(device), weight.to(device), targets.to(device)


def run(fn, hidden, weight, targets, temperature: float, grad_seed: int = 1):
    """(logp, entropy, dhidden, dweight) of sum(logp * a + entropy * b) for fixed random a, b."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logp, ent = fn(h, w, targets, temperature)
    g = torch.Generator().manual_seed(grad_seed)
    a, b = (torch.randn(len(targets), generator=g).to(logp.device) for _ in range(2))
    (logp.double() * a + ent.double() * b).sum().backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


def reference64(hidden, weight, targets, temperature: float, rows: int = 1024):
    """The float64 head written out (full logits, log_softmax), rows chunk by chunk: (logp, entropy, dh, dw) as run()."""
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(len(targets), generator=g).to(hidden.device, torch.float64) for _ in range(2))
    logps, ents = [], []
    for i in range(0, len(targets), rows):
        z = torch.log_softmax(h[i:i + rows] @ w.t() / temperature, -1)  # [n, V] float64
        logp = z.gather(1, targets[i:i + rows, None])[:, 0]
        ent = -(z.exp() * z).sum(-1)
        (logp * a[i:i + rows] + ent * b[i:i + rows]).sum().backward()
        logps.append(logp.detach())
        ents.append(ent.detach())
    return torch.cat(logps), torch.cat(ents), h.grad, w.grad


def timed(fn, args, reps: int, device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run(fn, *args)
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        run(fn, *args)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def errors(got, ref) -> dict:
    logp, ent, dh, dw = got
    rel = lambda x, r: float((x.double() - r).abs().max() / r.abs().max())  # noqa: E731
    return {"logp_max_abs": float((logp.double() - ref[0]).abs().max()),
            "entropy_max_abs": float((ent.double() - ref[1]).abs().max()),
            "dhidden_rel": rel(dh, ref[2]), "dweight_rel": rel(dw, ref[3])}


def measure(impls: list[str], shape: tuple[int, int, int], device, reps: int, temperature: float) -> list[dict]:
    n, h, v = shape
    h64, w64, t = inputs(n, h, v, device)
    ref = reference64(h64, w64, t, temperature)
    rows = []
    for impl in impls:
        fn = LOGPROB_IMPLS[impl]
        for precision in PRECISIONS:
            if precision == "tf32" and device.type != "cuda":
                continue
            dt = torch.bfloat16 if precision == "bf16" else torch.float32
            args = (h64.to(dt), w64.to(dt), t, temperature)
            with matmul_precision(precision):
                got = run(fn, *args)
                secs = timed(fn, args, reps, device)
            rows.append({"impl": impl, "precision": precision, "fwd_bwd_s": round(secs, 5), **errors(got, ref)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--smoke", action="store_true", help="tiny shapes on any device (CPU: the chunked twin)")
    p.add_argument("--impls", default="", help="comma-separated logprob impls (default: triton,chunked on CUDA, "
                                                "chunked elsewhere)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--report", default="", help="also write a markdown table here")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SHAPES["smoke" if args.smoke else args.shape]
    if device.type != "cuda" and not args.smoke:
        p.error("the full shapes need CUDA; use --smoke on CPU")
    impls = [x for x in args.impls.split(",") if x] or (["triton", "chunked"] if device.type == "cuda"
                                                          else ["chunked"])
    rows = measure(impls, shape, device, 1 if args.smoke else args.reps, args.temperature)
    head = (f"output head [N={shape[0]}, H={shape[1]}] x [V={shape[2]}], T={args.temperature}, on {device.type}"
            f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}; errors against float64")
    lines = [head, "", "| impl | precision | fwd+bwd s | logp max abs | entropy max abs | dhidden rel | dweight rel |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['impl']} | {r['precision']} | {r['fwd_bwd_s']} | {r['logp_max_abs']:.2e} | "
              f"{r['entropy_max_abs']:.2e} | {r['dhidden_rel']:.2e} | {r['dweight_rel']:.2e} |" for r in rows]
    print("\n".join(lines))
    if args.report:
        Path(args.report).write_text(f"# Output head precision\n\nCommand: `python bench/ab/head_dtype.py "
                                     f"{' '.join(sys.argv[1:])}`\n\n" + "\n".join(lines) + "\n")
    print(json.dumps({"shape": shape, "device": device.type, "rows": rows}))


if __name__ == "__main__":
    main()
