"""`fast-srt bench`: a fixed workload (every turn exactly max_new_tokens long), per-phase seconds, tokens and FLOPs,
a report file, and a JSON last line."""

import json
import os
import subprocess
import sys

from fast_srt.commands.bench import linear_params


def test_linear_params_counts_a_llama_layer():
    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 384}
    lin, head = linear_params(cfg)
    # q and o: 64x64 each; k and v: 64x32 each; gate, up, down: 64x128 each; two layers
    assert lin == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) and head == 384 * 64


def test_bench_times_identical_work(tiny_model_dir, tmp_path):
    report = tmp_path / "step.md"
    args = ["defender_only", "--model.model", str(tiny_model_dir), "--model.judge-model", "rule:vowel_refusal",
            "--model.dtype", "float32", "--model.max-model-len", "1024", "--model.kv-cache-gib", "1",
            "--game.no-cot", "--sampling.games-per-step", "8", "--sampling.max-new-tokens", "6",
            "--bench-steps", "3", "--out", str(report)]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAST_SRT_")} | {"TMPDIR": str(scratch)}
    p = subprocess.run([sys.executable, "-m", "fast_srt.cli", "bench", *args], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    # its run directory (with a final checkpoint) is scratch, removed afterwards
    assert not list(scratch.glob("fast_srt_bench_*")), list(scratch.iterdir())
    out = json.loads(p.stdout.strip().splitlines()[-1])
    phases = {r["phase"]: r for r in out["phases"]}
    assert set(phases) == {"generate", "judge", "logprob", "advantage", "train", "sync", "step"}
    assert phases["advantage"]["tokens"] == 8 * 6  # 8 defender turns of exactly 6 tokens each: the same work
    assert phases["train"]["gflop"] > 0 and phases["train"]["seconds"] > 0
    assert out["ceiling_gflops"] > 0 and out["peak_gib"] > 0
    assert "| train |" in report.read_text()
