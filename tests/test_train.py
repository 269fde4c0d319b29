"""The training loop end to end on a tiny model: it learns, it survives SIGKILL, bad input is refused cleanly.

Every test drives the real `fast-srt train` entry point (the same loop as the default run) in a subprocess, so
each run has its own in-process vLLM engine and a kill is a real kill.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from fast_srt.metrics import read_metrics

LEARN_STEPS = 30
LEARN_TARGET = 0.9 * 2.0  # the rule judge's defender optimum is +2 per game (no CoT, no format term)


def _tiny_args(model_dir, run_dir, *extra):
    return ["defender_only", "--model.model", str(model_dir), "--model.judge-model", "rule:vowel_refusal",
            "--model.dtype", "float32", "--model.max-model-len", "1024", "--model.kv-cache-gib", "1",
            "--game.no-cot", "--sampling.games-per-step", "32", "--sampling.max-new-tokens", "4",
            "--optim.lr", "5e-3", "--optim.updates-per-step", "4", "--optim.warmup-ratio", "0",
            "--algo.kl-coef", "0", "--run-dir", str(run_dir), *extra]


def _train(args, **kw):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "fast_srt.cli", "train", *args], capture_output=True, text=True,
                          env=env, **kw)


@pytest.mark.parametrize("seed", [1, 2])
def test_defender_learns_rule_judge_optimum(tiny_model_dir, tmp_path, seed):
    """Mean defender reward over 3 consecutive steps reaches >= 90% of its maximum within LEARN_STEPS steps."""
    run = tmp_path / "run"
    p = _train(_tiny_args(tiny_model_dir, run, "--steps", str(LEARN_STEPS), "--save-every", "1000",
                          "--seed", str(seed)), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rewards = [m["reward/defender_mean"] for m in read_metrics(run / "metrics.jsonl")]
    assert len(rewards) == LEARN_STEPS
    windows = [sum(rewards[i:i + 3]) / 3 for i in range(len(rewards) - 2)]
    reached = next((i + 3 for i, w in enumerate(windows) if w >= LEARN_TARGET), None)
    print(f"seed {seed}: first step with 3-step mean >= {LEARN_TARGET}: {reached}; rewards {rewards}")
    assert sum(rewards[:3]) / 3 < 0, "the task must start far from its optimum"
    assert reached is not None, f"reward never reached {LEARN_TARGET}: {rewards}"


def test_sigkill_mid_step_then_resume(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    args = _tiny_args(tiny_model_dir, run, "--steps", "6", "--save-every", "1")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-m", "fast_srt.cli", "train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        assert proc.poll() is None, "trainer ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.3)  # inside step 4: playing, training or writing its checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(read_metrics(metrics))
    assert 3 <= done_before < 6

    from fast_srt.checkpoint import find_latest

    latest = find_latest(run)
    assert latest is not None and (latest / "model.safetensors").exists()
    ckpt_step = int(latest.name.split("_")[1])
    assert ckpt_step >= done_before - 1 and ckpt_step >= 3  # at most one step lost

    p = _train(args + ["--resume"], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    steps = [m["step"] for m in read_metrics(metrics)]
    assert steps == [1, 2, 3, 4, 5, 6], steps  # metrics continue exactly where the checkpoint left off
    game_steps = [g["step"] for g in read_metrics(run / "games.jsonl")]
    assert game_steps == sorted(game_steps) and set(game_steps) == {1, 2, 3, 4, 5, 6}
    assert int(find_latest(run).name.split("_")[1]) == 6


def test_nan_loss_step_is_skipped_and_training_continues(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    p = _train(_tiny_args(tiny_model_dir, run, "--steps", "3", "--save-every", "1", "--inject-nan-loss-at-step",
                          "2"), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = read_metrics(run / "metrics.jsonl")
    assert [x["step"] for x in m] == [1, 2, 3]
    assert m[1]["optim/skipped_updates"] == 4 and m[1]["optim/updates"] == 0
    assert m[0]["optim/skipped_updates"] == 0 and m[2]["optim/updates"] == 4
    assert "skipped" in p.stdout
    import torch
    from safetensors.torch import load_file

    ckpt = run / "checkpoints" / "step_00000003"
    w = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in w.values())

    # the checkpoint is an ordinary HF directory: transformers and vLLM both load it and generate the same tokens
    from transformers import AutoModelForCausalLM

    from fast_srt.engine import Engine, SamplingSpec

    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    eng = Engine(ckpt, dtype="float32", max_model_len=256, kv_cache_gib=1, name="ckpt")
    prompt = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    g = eng.generate([prompt], SamplingSpec(max_tokens=8, temperature=0.0))[0]
    ids = torch.tensor([g.prompt_ids])
    hf_ids = hf.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    assert hf_ids[: len(g.token_ids)] == g.token_ids


def _one_line_error(p):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    lines = [x for x in p.stderr.splitlines() if x.startswith("fast-srt: error:")]
    assert len(lines) == 1, p.stderr[-2000:]
    return lines[0]


def test_bad_input_unknown_preset():
    assert "unknown preset 'nope'" in _one_line_error(_train(["nope"]))


def test_bad_input_invalid_field_value():
    assert "lr must be > 0" in _one_line_error(_train(["--optim.lr", "-1"]))
    p = _train(["--optim.lr", "abc"])
    assert p.returncode != 0 and "Traceback" not in p.stderr and "--optim.lr" in (p.stderr + p.stdout)


def test_bad_input_resume_without_checkpoint(tmp_path):
    err = _one_line_error(_train(["--resume", "--run-dir", str(tmp_path / "empty")]))
    assert "no complete checkpoint" in err


def test_bad_input_checkpoint_from_another_model(tiny_model_dir, tmp_path):
    from fast_srt.tiny import make_tiny_model

    run = tmp_path / "run"
    p = _train(_tiny_args(tiny_model_dir, run, "--steps", "1", "--save-every", "1"), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    before = sorted(x.name for x in (run / "checkpoints").iterdir())
    other = make_tiny_model(tmp_path / "qwen", arch="qwen2", hidden=96)
    err = _one_line_error(_train(_tiny_args(other, run, "--steps", "2", "--resume"), timeout=600))
    assert "different model" in err
    assert sorted(x.name for x in (run / "checkpoints").iterdir()) == before  # nothing touched


@pytest.mark.parametrize("variant", [
    ["selfplay_cot_sft", "rl_with_sft", "--algo.sft-coef", "0.5", "--algo.sft-samples-per-micro-step", "2"],
    ["grpo", "grpo", "--game.no-cot"],
    ["rloo", "grpo", "--algo.estimator", "rloo", "--game.no-cot"],
    ["attacker_only", "attacker_only", "--game.no-cot"],
    ["lora", "rl_only", "--lora-rank", "4", "--game.no-cot"],
], ids=lambda v: v[0])
def test_variants_run_two_steps(tiny_model_dir, tmp_path, variant):
    """Every estimator, the SFT loss and the attacker-only game run through the same loop and log every step."""
    _, preset, *extra = variant
    run = tmp_path / "run"
    args = [preset, "--model.model", str(tiny_model_dir), "--model.judge-model", "rule:vowel_refusal",
            "--model.dtype", "float32", "--model.max-model-len", "2048", "--model.kv-cache-gib", "1",
            "--sampling.games-per-step", "8", "--sampling.max-new-tokens", "8", "--steps", "2", "--save-every", "2",
            "--optim.lr", "1e-3", "--run-dir", str(run), *extra]
    p = _train(args, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = read_metrics(run / "metrics.jsonl")
    assert [x["step"] for x in m] == [1, 2]
    for x in m:
        assert x["optim/updates"] >= 1 and x["time/sync_s"] > 0
        if preset == "rl_with_sft":
            assert x["loss/sft"] > 0
        if preset == "attacker_only":
            assert x["samples/defender"] == 0 and x["samples/attacker"] > 0
        else:
            assert x["samples/defender"] > 0
