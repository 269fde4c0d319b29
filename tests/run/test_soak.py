"""A long run on the tiny model (marked slow): memory, file descriptors and disk stay bounded over 200 steps."""

import os
import subprocess
import sys

import pytest

from fast_srt.run.metrics import read_metrics

STEPS, SAVE_EVERY, KEEP = 200, 10, 2


def _dir_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.slow
def test_soak_200_steps_memory_fds_and_disk_stay_bounded(tiny_model_dir, tmp_path):
    """Resident memory grows by at most 5% from step 20 to step 200, open file descriptors do not grow, and the
    run directory holds --keep-checkpoints checkpoints (its size bounded by them plus the logs)."""
    run = tmp_path / "run"
    args = ["defender_only", "--model.model", str(tiny_model_dir), "--model.judge-model", "rule:vowel_refusal",
            "--model.dtype", "float32", "--model.max-model-len", "1024", "--model.kv-cache-gib", "1",
            "--game.no-cot", "--sampling.games-per-step", "8", "--sampling.max-new-tokens", "4", "--optim.lr", "5e-3",
            "--optim.updates-per-step", "4", "--optim.warmup-ratio", "0", "--algo.kl-coef", "0",
            "--logprob-impl", "chunked", "--steps", str(STEPS), "--save-every", str(SAVE_EVERY),
            "--keep-checkpoints", str(KEEP), "--log-games", "2", "--run-dir", str(run)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAST_SRT_KILL", "FAST_SRT_DISK"))}
    p = subprocess.run([sys.executable, "-m", "fast_srt.cli", "train", *args], capture_output=True, text=True,
                       env={**env, "TOKENIZERS_PARALLELISM": "false"}, timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    m = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    assert sorted(m) == list(range(1, STEPS + 1))
    rss20, rss200 = m[20]["mem/host_rss_gib"], m[STEPS]["mem/host_rss_gib"]
    fds20, fds200 = m[20]["proc/open_fds"], m[STEPS]["proc/open_fds"]
    ckpts = sorted(d for d in (run / "checkpoints").iterdir() if d.is_dir())
    one = _dir_bytes(ckpts[-1])
    logs = sum(_dir_bytes(f) if f.is_dir() else f.stat().st_size for f in run.iterdir() if f.name != "checkpoints")
    total = _dir_bytes(run)
    print(f"soak: RSS step 20 {rss20:.4f} GiB, step {STEPS} {rss200:.4f} GiB ({100 * (rss200 / rss20 - 1):+.1f}%); "
          f"open fds {fds20:.0f} -> {fds200:.0f}; {len(ckpts)} checkpoints of {one / 2**20:.1f} MiB; run dir "
          f"{total / 2**20:.1f} MiB (logs {logs / 2**20:.2f} MiB)")
    assert rss200 <= 1.05 * rss20
    assert fds200 <= fds20
    assert [d.name for d in ckpts] == [f"step_{s:08d}" for s in range(STEPS - (KEEP - 1) * SAVE_EVERY, STEPS + 1,
                                                                       SAVE_EVERY)]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert total <= KEEP * one * 1.05 + logs + (1 << 20)
