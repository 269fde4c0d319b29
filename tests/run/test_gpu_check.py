"""`make gpu-check` and the learner bench it runs, as far as a CPU machine can take them: the dry run names every
check, a check whose package is missing says so instead of failing, and bench/steps/learner_step.py runs the real learner
on a random-init model and reports per-phase seconds and FLOP shares (what the GPU check runs on CUDA)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "checks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_names_every_check():
    p = subprocess.run([sys.executable, "bench/checks/gpu_check.py", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert last["dry_run"] is True
    assert set(last["checks"]) == set(_gpu_check_module().CHECKS)
    assert {"kernels", "learner", "logprob_peers", "kv_release", "train_3"} <= set(last["checks"])


def test_a_missing_package_is_not_run_rather_than_failed():
    mod = _gpu_check_module()
    r = mod._missing("fast_srt_no_such_package", "needed for this check")
    assert r["ok"] is None and "fast_srt_no_such_package not installed" in r["summary"]
    assert mod._missing("torch", "present") is None


def test_learner_bench_runs_the_learner_and_reports_phases(tmp_path):
    report = tmp_path / "learner.md"
    p = subprocess.run([sys.executable, "bench/steps/learner_step.py", "--arch", "tiny", "--games", "4", "--max-resp", "24",
                        "--steps", "2", "--impls", "chunked,naive", "--report", str(report)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert last["device"] == "cpu" and last["ceiling_tflops"] > 0
    assert set(last["impls"]) == {"chunked", "naive"}
    for row in last["impls"].values():
        assert row["step_s"] > 0 and row["train_s"] > 0 and row["logprob_s"] > 0
        assert 0 < row["train_share"] < 1 and row["train_tokens_per_s"] > 0
    assert "| chunked |" in report.read_text() and "| naive |" in report.read_text()
