"""Fixtures of the eval tests: the `fast-srt` command line in a subprocess (in-process engines torn down mid-session
break the session's others), and one short training run of the tiny model with a checkpoint."""

import os
import subprocess
import sys

import pytest


def _run_cli(*args, timeout=300):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "fast_srt.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def cli():
    """cli("eval", ...) -> the finished process (returncode, stdout, stderr)."""
    return _run_cli


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model_dir):
    """Two self-play steps of the tiny model (the rule judge keeps it to one engine), checkpoint at step 2."""
    run = tmp_path_factory.mktemp("evalrun") / "run"
    p = _run_cli("train", "rl_only", "--model.model", tiny_model_dir, "--model.judge-model", "rule:vowel_refusal",
                 "--model.dtype", "float32", "--model.max-model-len", "1024", "--model.kv-cache-gib", "1",
                 "--sampling.games-per-step", "4", "--sampling.max-new-tokens", "8", "--optim.updates-per-step", "1",
                 "--optim.lr", "1e-3", "--steps", "2", "--save-every", "2", "--run-dir", run)
    assert p.returncode == 0, p.stderr[-3000:]
    return run
