"""Golden metrics: a short tiny-model self-play run must reproduce the recorded games, rewards, losses and
gradient norms (fp32 on CPU, fixed seeds). A refactor that changes behaviour changes these numbers.

The file tests/golden/tiny_selfplay.json was written by this test with FAST_SRT_WRITE_GOLDEN=1 (only do that for
an intended behaviour change, and say why in the commit).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fast_srt.run.metrics import read_metrics

GOLDEN = Path(__file__).parent / "golden" / "tiny_selfplay.json"
KEYS = ("reward/attacker_mean", "reward/defender_mean", "format/attacker_violation_rate",
        "format/defender_violation_rate", "samples/attacker", "samples/defender", "games/ties", "tokens/generated",
        "tokens/trained", "kl/mean", "loss/pg", "loss/clip_frac", "loss/kl_k3", "is/ratio_mean", "policy/entropy",
        "optim/grad_norm", "optim/lr", "optim/updates")


def _run(model_dir, run_dir):
    args = ["rl_only", "--model.model", str(model_dir), "--model.judge-model", "rule:vowel_refusal",
            "--model.dtype", "float32", "--model.max-model-len", "1024", "--model.kv-cache-gib", "1",
            "--sampling.games-per-step", "8", "--sampling.max-new-tokens", "12", "--optim.lr", "1e-3",
            "--optim.updates-per-step", "2", "--algo.kl-coef", "0.01", "--steps", "3", "--save-every", "3",
            "--logprob-impl", "chunked",  # the torch twin on every machine (the C++ op is built only where cmake is)
            "--run-dir", str(run_dir)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAST_SRT_")}
    p = subprocess.run([sys.executable, "-m", "fast_srt.cli", "train", *args], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return [{k: m.get(k) for k in ("step", *KEYS)} for m in read_metrics(run_dir / "metrics.jsonl")]


def test_golden_metrics(tiny_model_dir, tmp_path):
    got = _run(tiny_model_dir, tmp_path / "run")
    games = [{k: g[k] for k in ("step", "attacker_raw", "defender_raw", "outcome")}
             for g in read_metrics(tmp_path / "run" / "games.jsonl")]
    if os.environ.get("FAST_SRT_WRITE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"metrics": got, "games": games}, indent=1) + "\n")
        pytest.skip(f"wrote {GOLDEN}")
    want = json.loads(GOLDEN.read_text())
    assert games == want["games"]  # the same games, token for token
    for g, w in zip(got, want["metrics"], strict=True):
        for k in ("step", *KEYS):
            if w.get(k) is None or g.get(k) is None:
                assert g.get(k) == w.get(k), (g["step"], k)
            else:
                assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), (g["step"], k, g[k], w[k])
