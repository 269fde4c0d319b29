"""The training loop end to end on a tiny model: it learns, it survives SIGKILL, bad input is refused cleanly.

Every test drives the real `fast-srt train` entry point (the same loop as the default run) in a subprocess, so
each run has its own in-process vLLM engine and a kill is a real kill.
"""

import os
import signal
import subprocess
import sys

import pytest

from fast_srt import faults
from fast_srt.faults import KILL_POINTS
from fast_srt.run.metrics import read_metrics

LEARN_STEPS = 30
LEARN_TARGET = 0.9 * 2.0  # the rule judge's defender optimum is +2 per game (no CoT, no format term)


def _tiny_args(model_dir, run_dir, *extra):
    return ["defender_only", "--model.model", str(model_dir), "--model.judge-model", "rule:vowel_refusal",
            "--model.dtype", "float32", "--model.max-model-len", "1024", "--model.kv-cache-gib", "1",
            "--game.no-cot", "--sampling.games-per-step", "32", "--sampling.max-new-tokens", "4",
            "--optim.lr", "5e-3", "--optim.updates-per-step", "4", "--optim.warmup-ratio", "0",
            "--algo.kl-coef", "0", "--run-dir", str(run_dir),
            # the torch twin on every machine: the C++ op is built only where cmake is, and these short runs at lr
            # 5e-3 are chaotic (its last-digit differences change the sampled tokens, hence the trajectory)
            "--logprob-impl", "chunked", *extra]


def _train(args, extra_env=None, **kw):
    env = {k: v for k, v in os.environ.items() if k not in (faults.ENV, faults.DISK_FULL_ENV)}  # faults on demand
    env.update(TOKENIZERS_PARALLELISM="false", **(extra_env or {}))
    return subprocess.run([sys.executable, "-m", "fast_srt.cli", "train", *args], capture_output=True, text=True,
                          env=env, **kw)


@pytest.mark.slow
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
    trend = [ln for ln in p.stdout.splitlines() if ln.startswith("trend defender reward")]
    assert len(trend) == 1 and trend[0].endswith("rising"), p.stdout[-2000:]  # the run's own summary sees it


KILL_STEP = 2
VOLATILE = ("time/", "perf/", "prefix_cache/", "rank", "mem/", "proc/")  # times, throughput, cache, memory


# the kill matrix's runs: one shared policy (defender_only, full fine-tuning), one LoRA adapter per role (self-play:
# both adapters play, train and are written into the engine every step), and the same with an opponent league (a
# snapshot of each adapter every step, most games against one: the resume must serve the checkpoint's again)
ROLES = {"shared": (), "per-role": ("--lora-rank", "4", "--roles", "per-role"),
         "league": ("--lora-rank", "4", "--roles", "per-role", "--league.every", "1", "--league.size", "1",
                    "--league.p-past", "0.8")}


def _kill_args(model_dir, run, roles="shared"):
    args = _tiny_args(model_dir, run, "--steps", "3", "--save-every", "1", "--sampling.games-per-step", "8",
                      "--log-games", "8", *ROLES[roles])
    return args if roles == "shared" else ["rl_only", *args[1:]]


def _replayed(metrics: list[dict]) -> list[dict]:
    """A run's metrics without what a replay cannot reproduce: times, throughput, prefix-cache hit rates, and the
    judge's process-lifetime counters."""
    return [{k: v for k, v in m.items() if not k.startswith(VOLATILE) and not k.endswith("_total")} for m in metrics]


@pytest.fixture(scope="module")
def unkilled_runs(tiny_model_dir, tmp_path_factory):
    """The kill matrix's runs, never killed (one per ROLES case, trained when first asked for): what each killed and
    resumed run must replay."""
    runs = {}

    def get(roles):
        if roles not in runs:
            run = tmp_path_factory.mktemp(f"unkilled-{roles}") / "run"
            p = _train(_kill_args(tiny_model_dir, run, roles), timeout=600)
            assert p.returncode == 0, p.stderr[-3000:]
            runs[roles] = run
        return runs[roles]

    return get


@pytest.fixture(scope="module")
def unkilled_run(unkilled_runs):
    return unkilled_runs("shared")


def _weights(run):
    """The latest checkpoint's model, and its per-role adapters (role_adapters/ROLE.safetensors) if any."""
    from safetensors.torch import load_file

    from fast_srt.run.checkpoint import ROLE_ADAPTER_DIR, find_latest

    ckpt = find_latest(run)
    out = load_file(str(ckpt / "model.safetensors"))
    for f in sorted((ckpt / ROLE_ADAPTER_DIR).glob("*.safetensors")):
        out.update({f"{f.stem}/{k}": v for k, v in load_file(str(f)).items()})
    return out


# the shared run at every point; per-role at the weight write (two adapters written in place) by default, at every
# point with -m slow
KILL_CASES = [("shared", p) for p in KILL_POINTS] + [
    pytest.param("per-role", p, marks=() if p == "weight_sync" else pytest.mark.slow) for p in KILL_POINTS] + [
    ("league", "generate")]


@pytest.mark.parametrize("roles,point", KILL_CASES)
def test_sigkill_at_each_point_then_resume_replays_the_run(tiny_model_dir, tmp_path, roles, point, unkilled_runs):
    """FAST_SRT_KILL_AT kills the trainer at `point` of step 2 (a real SIGKILL, no timing); a resume loses at most
    that step, never picks a partial checkpoint, logs every step exactly once, and replays the run that was never
    killed: the same games, the same metrics (times aside) and bit-identical final weights (per-role: and both
    adapters)."""
    import torch

    from fast_srt.run.checkpoint import find_latest

    unkilled_run = unkilled_runs(roles)
    run = tmp_path / "run"
    args = _kill_args(tiny_model_dir, run, roles)
    p = _train(args, timeout=600, extra_env={"FAST_SRT_KILL_AT": f"{point}:{KILL_STEP}"})
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-3000:])
    assert f"SIGKILL at {point}, step {KILL_STEP}" in p.stderr
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1]  # killed before step 2's line

    latest = find_latest(run)
    ckpt_step = int(latest.name.split("_")[1])
    assert ckpt_step == (KILL_STEP if point == "after_checkpoint" else KILL_STEP - 1)
    assert KILL_STEP - ckpt_step <= 1  # at most one step lost
    partial = list((run / "checkpoints").glob(f".tmp-step_{KILL_STEP:08d}-*"))
    if point == "checkpoint_partial":  # some files written, the rest not, and never picked
        assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file()
        assert not (partial[0] / "COMPLETE").exists() and not (partial[0] / "trainer_state.pt").exists()
    else:
        assert not partial

    p = _train(args + ["--resume"], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"from step {ckpt_step}" in p.stdout
    assert "not an exact replay" not in p.stdout  # same machine, same threads, same libraries
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    games = read_metrics(run / "games.jsonl")
    assert [g["step"] for g in games] == [1] * 8 + [2] * 8 + [3] * 8
    assert not list((run / "checkpoints").glob(".tmp-*"))
    final = find_latest(run)
    assert final.name == "step_00000003"
    # the replay: the same games token for token, the same metrics, the same weights bit for bit
    assert games == read_metrics(unkilled_run / "games.jsonl")
    assert _replayed(metrics) == _replayed(read_metrics(unkilled_run / "metrics.jsonl"))
    got, want = _weights(run), _weights(unkilled_run)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    print(f"kill point {point} ({roles}): killed in step {KILL_STEP}, resumed from step {ckpt_step}, steps lost "
          f"{KILL_STEP - ckpt_step}; games, metrics and {len(want)} weight tensors equal to the unkilled run's")
    assert_loads_in_transformers_and_vllm(final)
    if roles == "league":  # the resumed run met the checkpoint's snapshots (the replay above: the same opponents)
        assert all("opponent" in g for g in games)
        assert any(g["opponent"] != "current" for g in games if g["step"] == 2)
        assert metrics[1]["league/past_games"] > 0 and metrics[1]["league/snapshots"] == 1
    if roles == "per-role":  # both adapters were trained and saved; the checkpoint resumes per-role only
        assert {k.split("/")[0] for k in want if "/" in k} == {"attacker", "defender"}
        assert metrics[-1]["samples/attacker"] > 0 and metrics[-1]["samples/defender"] > 0
        shared = [a for a in args if a not in ("--roles", "per-role")] + ["--resume"]
        p = _train(shared, timeout=600)
        assert p.returncode == 2 and "--roles: checkpoint 'per-role', now 'shared'" in p.stderr, p.stderr[-2000:]


VLLM_GREEDY = """
import json, sys
from fast_srt.engine.engine import Engine, SamplingSpec
eng = Engine(sys.argv[1], dtype="float32", max_model_len=256, kv_cache_gib=1, name="ckpt")
g = eng.generate([sys.argv[2]], SamplingSpec(max_tokens=8, temperature=0.0))[0]
print(json.dumps({"prompt_ids": g.prompt_ids, "token_ids": g.token_ids}))
"""


def assert_loads_in_transformers_and_vllm(ckpt):
    """Finite weights; transformers and vLLM both load the checkpoint and generate the same greedy tokens. vLLM runs
    in its own process: tearing an in-process engine down would also tear down the test session's engine."""
    import json

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    w = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in w.values())
    prompt = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    p = subprocess.run([sys.executable, "-c", VLLM_GREEDY, str(ckpt), prompt], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    g = json.loads(p.stdout.strip().splitlines()[-1])
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    ids = torch.tensor([g["prompt_ids"]])
    hf_ids = hf.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    assert g["token_ids"] and hf_ids[: len(g["token_ids"])] == g["token_ids"]


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
    assert_loads_in_transformers_and_vllm(run / "checkpoints" / "step_00000003")


def test_sampling_temperature_reaches_the_trainer(tiny_model_dir, tmp_path):
    """At T=0.7 the trainer's log-probs are vLLM's (fp32): importance weights within 1e-3 of 1, and KL exactly 0
    at the first step (the reference and the policy are the same weights, computed the same way)."""
    run = tmp_path / "run"
    p = _train(_tiny_args(tiny_model_dir, run, "--steps", "1", "--sampling.temperature", "0.7",
                          "--sampling.max-new-tokens", "16", "--algo.kl-coef", "0.01"), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = read_metrics(run / "metrics.jsonl")[0]
    print({k: m[k] for k in ("is/ratio_min", "is/ratio_max", "is/logp_mismatch_max_abs", "kl/mean")})
    assert 1 - 1e-3 <= m["is/ratio_min"] <= m["is/ratio_max"] <= 1 + 1e-3
    assert m["kl/mean"] == 0.0


def test_bf16_run_console_is_quiet_and_reference_kl_starts_at_zero(tiny_model_dir, tmp_path):
    """bf16 engine and autocast: weights reach the engine in its dtype (no per-tensor vLLM warning), the libraries
    stay quiet, and the bf16 reference gives KL exactly 0 at the first step."""
    run = tmp_path / "run"
    # 16 games: rewards that differ within a step, so the update moves the policy (8 may all score alike)
    args = _tiny_args(tiny_model_dir, run, "--steps", "3", "--model.dtype", "bfloat16", "--algo.kl-coef", "0.01",
                      "--sampling.games-per-step", "16")
    p = _train(args, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert "Attempted to load weight" not in out
    lines = out.splitlines()
    print(f"{len(lines)} console lines:\n" + "\n".join(lines))
    assert len(lines) <= 20, out
    m = read_metrics(run / "metrics.jsonl")
    assert m[0]["kl/mean"] == 0.0 and any(x["kl/mean"] != 0.0 for x in m[1:])  # it can move


def test_bad_input_fp16_without_cuda():  # the other bad inputs: test_bad_input_matrix.py
    import torch

    if not torch.cuda.is_available():  # on CUDA fp16 trains through a gradient scaler
        assert "float16 needs CUDA" in _one_line_error(_train(["--model.dtype", "float16"]))


def test_disk_full_checkpoint_write_is_one_line_and_keeps_the_metrics(tiny_model_dir, tmp_path):
    """FAST_SRT_DISK_FULL_AT=2 fails the step-2 checkpoint write with ENOSPC after its weights are written: one
    clear line, step 2's metrics line is written, checkpoint 1 stays intact and resumable, no partial directory."""
    from fast_srt.run.checkpoint import find_latest

    run = tmp_path / "run"
    args = _tiny_args(tiny_model_dir, run, "--steps", "3", "--save-every", "1", "--sampling.games-per-step", "8")
    err = _one_line_error(_train(args, timeout=600, extra_env={faults.DISK_FULL_ENV: "2"}))
    assert "writing checkpoint step 2" in err and "No space left on device" in err
    assert "step_00000001 is intact" in err and "--resume" in err
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2]
    assert find_latest(run).name == "step_00000001" and not list((run / "checkpoints").glob(".tmp-*"))
    p = _train(args + ["--resume"], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


def _one_line_error(p):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    lines = [x for x in p.stderr.splitlines() if x.startswith("fast-srt: error:")]
    assert len(lines) == 1, p.stderr[-2000:]
    return lines[0]


def test_bad_input_unparsable_field_value():  # tyro's own message, with the option's usage
    p = _train(["--optim.lr", "abc"])
    assert p.returncode != 0 and "Traceback" not in p.stderr and "--optim.lr" in (p.stderr + p.stdout)


@pytest.mark.parametrize("variant", [
    ["selfplay_cot_sft", "rl_with_sft", "--algo.sft-coef", "0.5", "--algo.sft-samples-per-micro-step", "2"],
    ["grpo", "grpo", "--game.no-cot"],
    ["rloo", "grpo", "--algo.estimator", "rloo", "--game.no-cot"],
    ["attacker_only", "attacker_only", "--game.no-cot"],
    ["lora", "rl_only", "--lora-rank", "4", "--game.no-cot"],
    ["lora_merged", "rl_only", "--lora-rank", "4", "--game.no-cot", "--no-lora-in-engine"],
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
        if preset == "grpo":  # kl_coef 0.01 (from cpu_default) is a k3 loss term for the group estimators
            assert x["loss/kl_k3"] >= 0
        if preset == "attacker_only":
            assert x["samples/defender"] == 0 and x["samples/attacker"] > 0
        else:
            assert x["samples/defender"] > 0


def test_lora_in_one_engine_trains_and_resumes(tiny_model_dir, tmp_path):
    """LoRA with the policy's base model as judge: one engine serves both (the policy as base + adapter, the judge
    as the base), each sync writes only the adapter, and a run killed mid-step resumes."""
    run = tmp_path / "run"
    args = _tiny_args(tiny_model_dir, run, "--lora-rank", "4", "--model.judge-model", "policy", "--save-every", "1")
    args += ["--steps", "3"]
    p = _train(args, extra_env={faults.ENV: "generate:3"}, timeout=600)  # killed in step 3, after step 2's save
    assert p.returncode == -9, p.stderr[-3000:]
    assert "1 engine: policy engine (policy: base + LoRA adapter; judge: base)" in p.stdout, p.stdout[-3000:]
    m = read_metrics(run / "metrics.jsonl")
    assert [x["step"] for x in m] == [1, 2] and all(x["time/sync_push_s"] > 0 for x in m)
    assert any(x["sync/canary_changed"] for x in m)  # the written adapter reached the policy's generations
    p = _train(args + ["--resume"], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "1 engine:" in p.stdout and "from step 2" in p.stdout
    assert [x["step"] for x in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


def test_phase_timer_syncs_the_device_at_each_phase_edge():
    """On CUDA the trainer's phases own the GPU work they queued: the timer synchronizes as a phase starts and
    ends (a stand-in sync here records the calls and where they fall)."""
    from fast_srt.run.metrics import PhaseTimer

    calls = []
    timer = PhaseTimer(lambda: calls.append("sync"))
    with timer("train"):
        calls.append("work")
    with timer("train"):
        pass
    assert calls == ["sync", "work", "sync", "sync", "sync"]
    assert set(timer.seconds) == {"train"} and timer.seconds["train"] >= 0
    plain = PhaseTimer()  # no device: nothing to wait for
    with plain("gen"):
        pass
    assert set(plain.seconds) == {"gen"}


def test_eval_during_training_is_logged_and_replays_after_a_kill(tiny_model_dir, tmp_path):
    """--eval-every 2 on 3 steps evaluates before step 1 (step 0's line), after step 2 and after the last; killed
    right after step 2's checkpoint (its eval done, its lines not yet written) and resumed, the run replays the
    never-killed run: its eval metrics (from the checkpoint), then step 3's games token for token (the eval left the
    policy engine's prefix cache and the random state as a fresh engine has them), metrics and weights."""
    import torch

    def args(run):
        return _kill_args(tiny_model_dir, run) + ["--eval-every", "2", "--eval-prompts", "3"]

    want = tmp_path / "unkilled"
    p = _train(args(want), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "eval during training: before step 1, every 2 steps" in p.stdout
    assert sum(ln.startswith("eval step") for ln in p.stdout.splitlines()) == 3
    metrics = read_metrics(want / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    evals = [m["step"] for m in metrics if "time/eval_s" in m]
    assert evals == [0, 2, 3]
    for m in metrics:
        if m["step"] in evals:
            assert m["eval/harmful/refusal_n"] == 3 and 0 <= m["eval/harmful/refusal_lo"] <= m["eval/harmful/refusal_hi"] <= 1
            assert m["eval/always_refuse_alarm"] in (0, 1) and m["eval/attacks/self_bleu"] is not None

    run = tmp_path / "run"
    p = _train(args(run), timeout=600, extra_env={"FAST_SRT_KILL_AT": "after_checkpoint:2"})
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-3000:])
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [0, 1]
    p = _train(args(run) + ["--resume"], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "from step 2" in p.stdout and "not an exact replay" not in p.stdout
    assert read_metrics(run / "games.jsonl") == read_metrics(want / "games.jsonl")
    assert _replayed(read_metrics(run / "metrics.jsonl")) == _replayed(metrics)
    got, ref = _weights(run), _weights(want)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
