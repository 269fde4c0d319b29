"""The bad-input matrix: every kind of bad input a user can give, across commands, answered by exactly one line
that says what was wrong and what to do, with exit code 2 (130 for an interrupt), no traceback, nothing touched.

Each case runs `fast_srt.cli.main` in this process (the argument parsing, the checks and the error path are the
real ones; every case is refused before an engine starts). A run that needs a checkpoint shares one tiny run.
"""

import os
import shutil
import subprocess
import sys
import warnings
from collections import namedtuple

import pytest

from fast_srt import faults

Case = namedtuple("Case", "kind argv expect env setup", defaults=((), None))


def _tiny(model, run, *extra):
    return ["train", "defender_only", "--model.model", str(model), "--model.judge-model", "rule:vowel_refusal",
            "--model.dtype", "float32", "--model.max-model-len", "1024", "--model.kv-cache-gib", "1",
            "--game.no-cot", "--sampling.games-per-step", "8", "--sampling.max-new-tokens", "4",
            "--algo.kl-coef", "0", "--logprob-impl", "chunked", "--run-dir", str(run), *extra]


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _no_disk(monkeypatch):
    import fast_srt.run.checkpoint as ck

    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 10))


def _interrupt(monkeypatch):
    import fast_srt.commands.plot as plot

    def stop(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(plot, "plot_main", stop)


# (kind, argv built from (tmp, tiny model, checkpointed run), what the one line must say)
CASES = {
    "unknown command": lambda t, m, r: Case("command", ["trian"], "unknown command 'trian'"),
    "unknown preset": lambda t, m, r: Case("config", ["train", "nope"], "unknown preset 'nope'; presets:"),
    "invalid value": lambda t, m, r: Case("config", ["train", "--optim.lr", "-1"], "lr must be > 0"),
    "negative eval interval": lambda t, m, r: Case("config", ["train", "--eval-every", "-1"],
                                                   "eval_every must be >= 0 (0 turns the eval off)"),
    "eval of one prompt": lambda t, m, r: Case("config", ["train", "--eval-prompts", "1"],
                                               "eval_prompts must be >= 2"),
    "per-role without LoRA": lambda t, m, r: Case("config", ["train", "--roles", "per-role"],
                                                  "--roles per-role gives each role its own LoRA adapter"),
    "per-role merged": lambda t, m, r: Case("config", ["train", "--roles", "per-role", "--lora-rank", "4",
                                                       "--no-lora-in-engine"],
                                            "drop --no-lora-in-engine, or pass --roles shared"),
    "alarm beyond a share": lambda t, m, r: Case("config", ["train", "--eval-over-refusal-alarm", "1.5"],
                                                 "eval_over_refusal_alarm must be a share in [0, 1]"),
    "untrainable sampling": lambda t, m, r: Case("config", ["train", "--sampling.top-p", "0.9"],
                                                 "pass --sampling.top-p 1.0"),
    "greedy training": lambda t, m, r: Case("config", ["train", "--sampling.temperature", "0"],
                                            "pass --sampling.temperature > 0"),
    "shard without ranks": lambda t, m, r: Case("config", ["train", "--shard", "fsdp2"], "launch with `torchrun"),
    "run dir is a file": lambda t, m, r: Case("path", ["train", "--run-dir", str(_write(t / "afile", "x"))],
                                              "is a file, not a directory; pass a directory path"),
    "run dir holds an earlier run's logs": lambda t, m, r: Case(
        "path", ["train", "--run-dir", str(_write(t / "old" / "metrics.jsonl", '{"step": 1}\n').parent)],
        "of an earlier run that stopped before its first checkpoint"),
    "run dir holds checkpoints": lambda t, m, r: Case("path", _tiny(m, r, "--steps", "1", "--save-every", "1"),
                                                      "already holds checkpoints; pass --resume"),
    "resume without a checkpoint": lambda t, m, r: Case("resume", ["train", "--resume", "--run-dir", str(t / "e")],
                                                        "no complete checkpoint"),
    "resume with other settings": lambda t, m, r: Case(
        "resume", _tiny(m, r, "--steps", "3", "--save-every", "1", "--resume"),
        "--steps: checkpoint 1, now 3; resume with the run's own settings"),
    "resume with another model": lambda t, m, r: Case(
        "resume", _tiny(_other_model(t), r, "--steps", "1", "--save-every", "1", "--resume"), "different model"),
    "model path missing": lambda t, m, r: Case("model", ["train", "--model.model", str(t / "nope")],
                                               "does not exist; pass an existing checkpoint directory"),
    "model dir without config": lambda t, m, r: Case(
        "model", ["train", "--model.model", str(_write(t / "nomodel" / "x.txt", "").parent)],
        "is not a Hugging Face checkpoint directory"),
    "seed file missing": lambda t, m, r: Case("data", ["train", "--game.harmful-seeds", str(t / "s.jsonl")],
                                              "not found; pass an existing .jsonl/.txt file"),
    "seed file bad line": lambda t, m, r: Case(
        "data", ["train", "--game.harmful-seeds", str(_write(t / "b.jsonl", '{"prompt": "ok", "harmful": true}\n'
                                                                            '{"prompt": 3}\n'))],
        "b.jsonl:2: 'prompt' must be a non-empty string"),
    "warm-up data bad line": lambda t, m, r: Case(
        "data", ["train", "--warmup.defender-data", str(_write(t / "w.jsonl", '{"prompt": "p"}\n'))], "w.jsonl:1"),
    "SFT data missing": lambda t, m, r: Case(
        "data", ["train", "--algo.sft-coef", "1", "--algo.sft-data", str(t / "sft.jsonl")],
        "SFT file", ),
    "judge set missing": lambda t, m, r: Case("data", ["judge-eval", "--data", str(t / "j.jsonl")],
                                              "pass a .jsonl file of labelled pairs"),
    "eval checkpoint missing": lambda t, m, r: Case("path", ["eval", str(t / "ck")], "does not exist; pass a run"),
    "plot without metrics": lambda t, m, r: Case("path", ["plot", str(t)], "has no metrics.jsonl; pass the --run-dir"),
    "games of a missing run": lambda t, m, r: Case("path", ["games", str(t / "nope")], "pass the directory of a"),
    "plan budget": lambda t, m, r: Case("config", ["plan", "--budget-gib", "-1"], "--budget-gib must be > 0"),
    "bad fault variable": lambda t, m, r: Case("env", ["train"], "unset it to train normally",
                                               env={faults.ENV: "boom:1"}),
    "disk too small": lambda t, m, r: Case("disk", _tiny(m, t / "small", "--steps", "1"),
                                           "free space or pass a --run-dir on another disk", setup=_no_disk),
    "interrupted": lambda t, m, r: Case("signal", ["plot", str(t)], "--resume", setup=_interrupt),
}


def _other_model(tmp):
    from fast_srt.run.tiny import make_tiny_model

    return make_tiny_model(tmp / "qwen", arch="qwen2", hidden=96)


@pytest.fixture(scope="module")
def checkpointed_run(tiny_model_dir, tmp_path_factory):
    """One step of a tiny run with its checkpoint: what the resume cases resume."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    env = {k: v for k, v in os.environ.items() if k not in (faults.ENV, faults.DISK_FULL_ENV)}
    p = subprocess.run([sys.executable, "-m", "fast_srt.cli",
                        *_tiny(tiny_model_dir, run, "--steps", "1", "--save-every", "1")],
                       capture_output=True, text=True, env={**env, "TOKENIZERS_PARALLELISM": "false"}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return run


def test_the_matrix_covers_at_least_15_kinds_across_commands(tmp_path, tiny_model_dir):
    cases = [build(tmp_path, tiny_model_dir, tmp_path / "run") for build in CASES.values()]
    commands = {c.argv[0] if c.argv[0] in ("plot", "games", "eval", "judge-eval", "plan") else "train" for c in cases}
    assert len(cases) >= 15 and {c.kind for c in cases} >= {"command", "config", "path", "resume", "model", "data",
                                                            "env", "disk", "signal"}
    assert commands == {"train", "plot", "games", "eval", "judge-eval", "plan"}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_saying_what_to_do(name, tmp_path, tiny_model_dir, checkpointed_run, monkeypatch,
                                                 capsys):
    from fast_srt.cli import main

    case = CASES[name](tmp_path, tiny_model_dir, checkpointed_run)
    for k in (faults.ENV, faults.DISK_FULL_ENV):
        monkeypatch.delenv(k, raising=False)
    for k, v in case.env.items() if case.env else ():
        monkeypatch.setenv(k, v)
    for k in ("VLLM_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE",
              "TORCH_CPP_LOG_LEVEL", "FAST_SRT_QUIET", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        monkeypatch.setenv(k, os.environ.get(k, ""))  # main() sets these: restored after the case
    if case.setup:
        case.setup(monkeypatch)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # as the CLI's quiet start does, before transformers is first imported
    capsys.readouterr()  # what building the case printed
    ckpts_before = sorted(p.name for p in (checkpointed_run / "checkpoints").iterdir())
    with warnings.catch_warnings():
        rc = main(list(case.argv))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == (130 if name == "interrupted" else 2), (rc, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("fast-srt: "), err[-2000:]
    assert "Traceback" not in err and case.expect in lines[0], lines[0]
    assert sorted(p.name for p in (checkpointed_run / "checkpoints").iterdir()) == ckpts_before  # nothing touched
    hf_logging.enable_progress_bar()
    print(f"{name:38s} {lines[0]}")
