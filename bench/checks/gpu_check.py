"""`make gpu-check`: run the whole GPU path on a CUDA machine and write bench/results/gpu_check_<device>_<date>.md.

Each check runs the real code on the device and records pass/fail, its figures, and the command that reproduces
it. Without CUDA (`--dry-run`, or no device found) it prints what it would run and writes nothing.

Checks:
  kernels      the Triton kernels compiled on the device against their torch twins, and the trainer's packed and
               shared-prefix attention (flash-attn varlen inside it) against whole-sample packing, log-probs and
               gradients (pytest tests/kernels tests/run/test_gpu.py)
  flash_attn   packed log-probs with flash-attn varlen == each sample alone through SDPA (tiny model, fp32, bf16)
  kv_release   the engine's KV cache released and woken around a training phase: memory freed, same greedy tokens
  train_3      a 3-step run of the offline default, its console and per-phase seconds
  learner      the learner's half of a step (bench/steps/learner_step.py: old/reference log-probs, advantages, PPO-clip
               updates, AdamW) on synthetic self-play games, a random-init SmolLM2-135M, the Triton log-prob
               kernel and its twin taking turns: per-phase seconds, share of the bf16 ceiling, a profiled step
  logprob_peers  the fused log-prob (Triton) against Liger's fused linear losses (its Triton cross-entropy and
               its chunked GRPO loss) and full logits (what TRL's selective_log_softmax takes as input) at
               [8, 1024, 151936] in bf16, time and peak memory
Checks whose packages are missing (vllm, flash-attn, liger-kernel) say so and are not counted as failures.
The last stdout line is JSON (one object per check).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


LOG_DIR: Path | None = None  # --log-dir: every check's full output, one file per command
MODEL = "default"  # --model: the policy of kv_release and train_3 (a checkpoint directory, or 'default')
REPORT: Path | None = None  # --report: where the report goes (default bench/results/gpu_check_<device>_<date>.md)


def result_name(what: str) -> str:
    """bench/results naming rule: <what>_<device>_<yyyy-mm-dd>.md, the device as its short name (h200, cpu)."""
    device = "cpu"
    try:
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0).lower().split()[-1]
    except Exception:
        pass
    return f"{what}_{re.sub(r'[^a-z0-9]+', '', device) or 'gpu'}_{datetime.date.today().isoformat()}.md"


def _run(cmd: list[str], timeout: int = 900) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc = 124
        text = f"{e.stdout or ''}{e.stderr or ''}\n[gpu-check] timed out after {timeout} s"
        text = text if isinstance(text, str) else text.decode(errors="replace")
    if LOG_DIR is not None:
        _run.count = getattr(_run, "count", 0) + 1
        (LOG_DIR / f"gpu_check_{_run.count}.log").write_text(" ".join(cmd) + "\n\n" + text)
    return rc, text[-4000:], time.perf_counter() - t0


def _missing(module: str, why: str) -> dict | None:
    """None when `module` imports here, else a not-run result saying what is missing."""
    if importlib.util.find_spec(module) is not None:
        return None
    return {"ok": None, "summary": f"{module} not installed here: not run ({why})"}


def check_kernels() -> dict:
    cmd = [PY, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "tests/kernels", "tests/run/test_gpu.py"]
    rc, out, dt = _run(cmd, timeout=300)
    return {"ok": rc == 0, "seconds": round(dt, 1), "summary": out.strip().splitlines()[-1:],
            "cmd": " ".join(cmd[1:])}


FLASH = r"""
import torch, json
from fast_srt.run.tiny import make_tiny_model
from fast_srt.learner.batch import Sample, pack
from fast_srt.learner.policy import load_policy, token_logprobs
from fast_srt.kernels import logprobs_chunked
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
        a, _ = token_logprobs(fa, b, logprobs_chunked)
        # reference: each sample alone through plain SDPA
        ref = []
        for s in samples:
            bs = pack([s], device="cuda")
            ref.append(token_logprobs(sd, bs, logprobs_chunked)[0][bs.loss_mask])
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
eng.release_kv_cache()
free1 = torch.cuda.mem_get_info()[0]
eng.wake_kv_cache()
after = eng.generate([prompt], greedy)[0].token_ids
print(json.dumps({"freed_gib": (free1 - free0) / 2**30, "same_tokens": before == after}))
"""


def check_kv_release() -> dict:
    if (skip := _missing("vllm", "the engine is vLLM; GPU install: README")) is not None:
        return skip
    rc, out, dt = _run([PY, "-c", KV.replace('resolve_model("default")', f"resolve_model({MODEL!r})")])
    if rc != 0:
        return {"ok": False, "seconds": round(dt, 1), "summary": out[-1500:]}
    r = json.loads(out.strip().splitlines()[-1])
    return {"ok": r["same_tokens"] and r["freed_gib"] > 1.5, "seconds": round(dt, 1), **r}


def check_train_3() -> dict:
    if (skip := _missing("vllm", "generation and the judge run in vLLM; GPU install: README")) is not None:
        return skip
    run_dir = tempfile.mkdtemp(prefix="gpu_check_run_")
    cmd = [PY, "-m", "fast_srt.cli", "train", "--steps", "3", "--save-every", "3", "--run-dir", run_dir]
    if MODEL != "default":
        cmd += ["--model.model", MODEL]
    rc, out, dt = _run(cmd)
    shutil.rmtree(run_dir, ignore_errors=True)  # scratch, with a full checkpoint in it
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    return {"ok": rc == 0 and len(steps) == 3, "seconds": round(dt, 1), "steps": steps,
            "cmd": "fast-srt train --steps 3 --save-every 3 --run-dir DIR"}


def check_learner() -> dict:
    name = f"bench/results/learner_gpu_smollm2-135m_{datetime.date.today().isoformat()}"
    cmd = [PY, "bench/steps/learner_step.py", "--arch", "smollm2-135m", "--games", "32", "--impls", "triton,chunked",
           "--steps", "2", "--report", f"{name}.md", "--profile", f"{name}_profile.txt"]
    rc, text, dt = _run(cmd, timeout=240)
    last = [line for line in text.splitlines() if line.startswith('{"arch"')]  # stdout's JSON (stderr follows)
    if rc != 0 or not last:
        return {"ok": False, "seconds": round(dt, 1), "summary": text[-1500:]}
    return {"ok": True, "seconds": round(dt, 1), "smollm2-135m": json.loads(last[-1])}


def check_logprob_peers() -> dict:
    # [8, 1024, 151936]: 8 sequences of 1024 tokens (N = 8192 rows), a 4096-wide model, Qwen's vocabulary
    cmd = [PY, "bench/kernels/logprobs.py", "--shapes", "8192x4096x151936", "--dtype", "bf16",
           "--providers", "triton,chunked,liger_ce,liger,naive", "--reps", "5",
           "--report", f"bench/results/{result_name('logprobs')}"]
    rc, out, dt = _run(cmd)
    return {"ok": rc == 0, "seconds": round(dt, 1), "summary": out.strip().splitlines()[-1:],
            "cmd": " ".join(cmd[1:])}


CHECKS = {"kernels": check_kernels, "flash_attn": check_flash_attn, "kv_release": check_kv_release,
          "train_3": check_train_3, "learner": check_learner, "logprob_peers": check_logprob_peers}


def report_header(device: str, torch_version: str) -> str:
    """The report's first lines: device, versions, whether fp32-output bf16 GEMMs work, the commit."""
    # a copied working tree (a lent machine) may carry stale git metadata: FAST_SRT_COMMIT, when set, names the files
    sha = os.environ.get("FAST_SRT_COMMIT", "")
    if not sha:
        try:
            sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip() or "unknown"
        except OSError:
            sha = "unknown"
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for dist in ("triton", "transformers", "vllm", "flash-attn", "liger-kernel"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = "not installed"
    try:  # the fused log-prob's GEMMs: fp32 logits from bf16 inputs (else kernels.logprobs upcasts, slower)
        import torch

        a = torch.randn(8, 16, device="cuda", dtype=torch.bfloat16)
        versions["aten.mm.dtype"] = str(torch.ops.aten.mm.dtype(a, a.t(), torch.float32).dtype)
    except Exception as e:  # report what happened, whatever it was
        versions["aten.mm.dtype"] = f"unavailable ({type(e).__name__})"
    return (f"# GPU check {datetime.date.today().isoformat()}\n\nDevice: {device}; torch {torch_version}; "
            + "; ".join(f"{k} {v}" for k, v in versions.items()) + f"; commit {sha}; command `make gpu-check`.")


def write_report(header: str, results: dict) -> Path:
    lines = [header, "", "| check | ok | details |", "|---|---|---|"]
    for n, r in results.items():
        details = json.dumps({k: v for k, v in r.items() if k != "ok"})[:1500].replace("|", "\\|")
        lines.append(f"| {n} | {r['ok']} | {details} |")
    out = REPORT or ROOT / "bench" / "results" / result_name("gpu_check")
    out.write_text("\n".join(lines) + "\n")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the checks and exit (the default without CUDA)")
    ap.add_argument("--only", default=",".join(CHECKS), help="comma-separated checks to run")
    ap.add_argument("--log-dir", default="", help="write each check's full output here")
    ap.add_argument("--model", default="default", help="policy for kv_release and train_3 (checkpoint directory)")
    ap.add_argument("--report", default="", help="write the report here instead of bench/results/gpu_check_<device>_<date>.md")
    args = ap.parse_args()
    global LOG_DIR, MODEL, REPORT
    LOG_DIR = Path(args.log_dir) if args.log_dir else None
    MODEL, REPORT = args.model, (Path(args.report) if args.report else None)
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
    header = report_header(device, torch.__version__)
    results = {}
    for n in names:
        print(f"[gpu-check] {n} ...", flush=True)
        try:
            results[n] = CHECKS[n]()
        except Exception as e:  # a check that crashes is a failed check, and the others still run
            results[n] = {"ok": False, "summary": f"{type(e).__name__}: {e}"}
        print(f"[gpu-check] {n}: {results[n]}", flush=True)
        out = write_report(header, results)  # after every check: a cut-off run keeps its part
    print(f"report: {out}")
    print(json.dumps({"device": device, "results": results}))
    return 0 if all(r["ok"] is not False for r in results.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
