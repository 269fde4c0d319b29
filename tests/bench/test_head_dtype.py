"""bench/ab/head_dtype.py's CPU smoke mode: it runs, and its errors against float64 tell fp32 from bf16."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_head_dtype_smoke_runs_and_measures_errors(tmp_path):
    report = tmp_path / "head.md"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "ab" / "head_dtype.py"), "--smoke", "--report",
                        str(report)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    rows = {r["precision"]: r for r in out["rows"]}
    assert set(rows) == {"fp32", "bf16"}  # no TF32 off CUDA
    assert rows["fp32"]["logp_max_abs"] < 1e-4 and rows["fp32"]["dweight_rel"] < 1e-4
    assert 1e-4 < rows["bf16"]["logp_max_abs"] < 0.5  # bf16 rounding, not a wrong head
    assert all(r["fwd_bwd_s"] > 0 for r in rows.values())
    assert "| chunked | bf16 |" in report.read_text()
