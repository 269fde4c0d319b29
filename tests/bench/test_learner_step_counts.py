"""bench/steps/learner_step.py --count-ops on CPU: a deterministic op count per step, the same at narrower widths
(what lets the CPU count a wide model's ops), and its report columns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def counted(*extra) -> dict:
    """The op count of one step; without TRITON_INTERPRET (the kernel test modules set it in this process), so the
    fused custom ops run their torch twins: one op each either way, minutes less."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "steps" / "learner_step.py"), "--arch", "tiny",
                        "--games", "4", "--max-resp", "24", "--steps", "1", "--count-ops", *extra],
                       capture_output=True, text=True, timeout=600, cwd=ROOT, env=env, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])["impls"]["auto"]


def test_op_count_is_deterministic_and_does_not_depend_on_widths():
    a = counted("--attention", "varlen", "--fused", "triton")
    b = counted("--attention", "varlen", "--fused", "triton", "--narrow", "2")
    assert a["ops"] == b["ops"] > 0 and a["ops_all"] == b["ops_all"] >= a["ops"]
    assert {"host_logprob_s", "host_train_s", "mfu"} <= set(a)
