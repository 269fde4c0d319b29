"""`make gpu-check`: run the whole GPU path on a CUDA machine and write bench/results/gpu_<date>.md.

Each check runs the real code on the device and records pass/fail, its figures, and the command that reproduces
it. Without CUDA (`--dry-run`, or no device found) it prints what it would run and writes nothing.

Checks:
  kernels      the Triton kernels compiled on the device against their torch twins, and the trainer's packed and
               shared-prefix attention (flash-attn varlen inside it) against whole-sample packing, log-probs and
               gradients (pytest tests/kernels tests/run/test_gpu.py)
  flash_attn   packed log-probs with flash-attn varlen == each sample alone through SDPA (tiny model, fp32, bf16)
  kv_release   the engine's KV cache released and woken around a training phase: memory freed, same greedy tokens
  train_3      a 3-step run of the offline default, its console and per-phase seconds
  logprob_peers  the fused log-prob (Triton) against Liger's fused linear loss and full logits (what TRL's
               selective_log_softmax takes as input) at [8, 1024, 151936] in bf16, time and peak memory
The last stdout line is JSON (one object per check).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _run(cmd: list[str], timeout: int = 1800) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return p.returncode, (p.stdout + p.stderr)[-4000:], time.perf_counter() - t0


def check_kernels() -> dict:
    cmd = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels", "tests/run/test_gpu.py"]
    rc, out, dt = _run(cmd)
    return {"ok": rc == 0, "seconds": round(dt, 1), "summary": out.strip().splitlines()[-1:],
            "cmd": " ".join(cmd[1:])}


FLASH = r"""
import torch, json
from fast_srt.run.tiny import make_tiny_model
from fast_srt.learner.batch import Sample, pack
from fast_srt.learner.policy import load_policy, token_logprobs
from fast_srt.kernels import logprobs_ref
import tempfile
d = make_tiny_model(tempfile.mkdtemp() + "/m", arch="qwen2", hidden=128)
g = torch.Generator().manual_seed(0)
samples = []
for i in range(6):
    p, r = int(torch.randint(5, 200, (1,), generator=g)), int(torch.randint(3, 100, (1,), generator=g))
    ids = torch.randint(5, 300, (p + r,), generator=g).tolist()
    samples.append(Sample(ids[:p], ids[p:], "defender", 0.0, [0.0] * r))
out = {}
for dtype in (torch.float32, torch.bfloat16):
    fa = load_policy(str(d), dtype=dtype, device="cuda", attn="flash_attention_2").eval()
    sd = load_policy(str(d), dtype=dtype, device="cuda", attn="sdpa").eval()
    b = pack(samples, device="cuda")
    with torch.no_grad():
        a, _ = token_logprobs(fa, b, logprobs_ref)
        # reference: each sample alone through plain SDPA
        ref = []
        for s in samples:
            bs = pack([s], device="cuda")
            ref.append(token_logprobs(sd, bs, logprobs_ref)[0][bs.loss_mask])
        ref = torch.cat(ref)
    out[str(dtype)] = float((a[b.loss_mask] - ref).abs().max())
print(json.dumps(out))
"""


def check_flash_attn() -> dict:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return {"ok": None, "summary": "flash-attn not installed (pip install flash-attn): not run"}
    rc, out, dt = _run([PY, "-c", FLASH])
    if rc != 0:
        return {"ok": False, "seconds": round(dt, 1), "summary": out[-1500:]}
    diffs = json.loads(out.strip().splitlines()[-1])
    ok = diffs["torch.float32"] < 1e-3 and diffs["torch.bfloat16"] < 5e-2
    return {"ok": ok, "seconds": round(dt, 1), "max_abs_logp_diff": diffs}


KV = r"""
import torch, json, tempfile
from fast_srt.engine.engine import Engine, SamplingSpec
from fast_srt.run.models import resolve_model
eng = Engine(resolve_model("default"), dtype="bfloat16", max_model_len=1024, kv_cache_gib=2, name="kv")
prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
greedy = SamplingSpec(max_tokens=16, temperature=0.0)
before = eng.generate([prompt], greedy)[0].token_ids
free0 = torch.cuda.mem_get_info()[0]
eng.release_for_training()
free1 = torch.cuda.mem_get_info()[0]
eng.wake_kv_cache()
after = eng.generate([prompt], greedy)[0].token_ids
print(json.dumps({"freed_gib": (free1 - free0) / 2**30, "same_tokens": before == after}))
"""


def check_kv_release() -> dict:
    rc, out, dt = _run([PY, "-c", KV])
    if rc != 0:
        return {"ok": False, "seconds": round(dt, 1), "summary": out[-1500:]}
    r = json.loads(out.strip().splitlines()[-1])
    return {"ok": r["same_tokens"] and r["freed_gib"] > 1.5, "seconds": round(dt, 1), **r}


def check_train_3() -> dict:
    run_dir = tempfile.mkdtemp(prefix="gpu_check_run_")
    cmd = [PY, "-m", "fast_srt.cli", "train", "--steps", "3", "--save-every", "3", "--run-dir", run_dir]
    rc, out, dt = _run(cmd)
    shutil.rmtree(run_dir, ignore_errors=True)  # scratch, with a full checkpoint in it
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    return {"ok": rc == 0 and len(steps) == 3, "seconds": round(dt, 1), "steps": steps,
            "cmd": "fast-srt train --steps 3 --save-every 3 --run-dir DIR"}


def check_logprob_peers() -> dict:
    # [8, 1024, 151936]: 8 sequences of 1024 tokens (N = 8192 rows), a 4096-wide model, Qwen's vocabulary
    cmd = [PY, "bench/bench_logprobs.py", "--shapes", "8192x4096x151936", "--dtype", "bf16",
           "--providers", "triton,liger,naive", "--reps", "5",
           "--report", f"bench/results/logprobs_gpu_{datetime.date.today().isoformat()}.md"]
    rc, out, dt = _run(cmd)
    return {"ok": rc == 0, "seconds": round(dt, 1), "summary": out.strip().splitlines()[-1:],
            "cmd": " ".join(cmd[1:])}


CHECKS = {"kernels": check_kernels, "flash_attn": check_flash_attn, "kv_release": check_kv_release,
          "train_3": check_train_3, "logprob_peers": check_logprob_peers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the checks and exit (the default without CUDA)")
    ap.add_argument("--only", default=",".join(CHECKS), help="comma-separated checks to run")
    args = ap.parse_args()
    import torch

    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        print(f"gpu_check: unknown check(s) {unknown}; choose from {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    if args.dry_run or not torch.cuda.is_available():
        why = "dry run" if args.dry_run else "no CUDA device here"
        print(f"gpu-check ({why}): would run {', '.join(names)}:")
        print(__doc__.split("Checks:\n", 1)[1].split("The last", 1)[0].rstrip())
        print(json.dumps({"dry_run": True, "checks": names}))
        return 0
    device = torch.cuda.get_device_name(0)
    results = {}
    for n in names:
        print(f"[gpu-check] {n} ...", flush=True)
        try:
            results[n] = CHECKS[n]()
        except Exception as e:  # a check that crashes is a failed check, and the others still run
            results[n] = {"ok": False, "summary": f"{type(e).__name__}: {e}"}
        print(f"[gpu-check] {n}: {results[n]}", flush=True)
    date = datetime.date.today().isoformat()
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    lines = [f"# GPU check {date}", "", f"Device: {device}; torch {torch.__version__}; commit {sha}; "
             f"command `make gpu-check`.", "", "| check | ok | details |", "|---|---|---|"]
    for n, r in results.items():
        details = json.dumps({k: v for k, v in r.items() if k != "ok"})[:600].replace("|", "\\|")
        lines.append(f"| {n} | {r['ok']} | {details} |")
    out = ROOT / "bench" / "results" / f"gpu_{date}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"report: {out}")
    print(json.dumps({"device": device, "results": results}))
    return 0 if all(r["ok"] is not False for r in results.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
