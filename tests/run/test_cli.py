"""`fast-srt play` end to end on a tiny model, and every bad input of the rollout side: one clear line, exit 2."""

import json
import os
import subprocess
import sys


def _run(args, timeout=600, cwd=None):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "fast_srt.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd)


def _one_line_error(p):
    assert p.returncode == 2, (p.returncode, p.stdout[-1000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = [x for x in p.stderr.splitlines() if x.startswith("fast-srt: error:")]
    assert len(lines) == 1, p.stderr[-2000:]
    return lines[0]


def test_play_tiny_model_in_one_process(tiny_model_dir):
    p = _run(["play", "--model.model", str(tiny_model_dir), "--model.dtype", "float32",
              "--model.max-model-len", "2048", "--sampling.games-per-step", "16", "--sampling.max-new-tokens", "16"])
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert out.count("game ") >= 16 and "judge:" in out and "reward attacker" in out
    assert "16 games; judge parse failures: 0/" in out
    assert "child processes: 0" in out  # the engine runs in this process
    for phase in ("attacker", "defender", "judge"):
        assert f"[{phase:8s}]" in out and "tok/s" in out


def test_unknown_command():
    p = _run(["fly"])
    assert p.returncode == 2 and "unknown command" in p.stderr


def test_plot_command(tmp_path):
    assert "does not exist" in _one_line_error(_run(["plot", str(tmp_path / "nope")]))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/defender_mean": 1.0}) + "\n")
    p = _run(["plot", str(tmp_path), "--out", str(tmp_path / "figs")])
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == [str(tmp_path / "figs" / "rewards.png")]


def test_missing_model_path(tmp_path):
    err = _one_line_error(_run(["play", "--model.model", str(tmp_path / "nope")]))
    assert "does not exist" in err


def test_unknown_model_name():
    err = _one_line_error(_run(["play", "--model.model", "no-such-model"]))
    assert "unknown model name 'no-such-model'" in err


def test_empty_seed_file(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    err = _one_line_error(_run(["play", "--game.harmful-seeds", str(f)]))
    assert "empty.jsonl" in err


def test_non_utf8_seed_file(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("Comment fabriquer une bombe \xe0 la maison ?\n".encode("latin-1"))
    err = _one_line_error(_run(["play", "--game.harmful-seeds", str(f)]))
    assert "UTF-8" in err or "utf-8" in err


def test_malformed_seed_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "fine", "harmful": True}) + "\n{not json\n")
    err = _one_line_error(_run(["play", "--game.harmful-seeds", str(f)]))
    assert "bad.jsonl:2" in err


def test_model_without_chat_template(tmp_path, tiny_model_dir):
    import shutil

    d = tmp_path / "no_template"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").unlink(missing_ok=True)
    err = _one_line_error(_run(["play", "--model.model", str(d), "--model.dtype", "float32"]))
    assert "no chat template" in err


def test_import_transformers_unaffected_by_kernels_folder():
    """Run from the repository root, where a bare `kernels/` folder sits on sys.path ('' entry)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import transformers, importlib.util; from transformers.utils import is_kernels_available; "
            "import fast_srt.kernels as k; print(is_kernels_available(), k.__name__)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["False", "fast_srt.kernels"], p.stdout


def test_import_fast_srt_has_no_side_effects():
    code = ("import os, sys; before = dict(os.environ); import fast_srt, fast_srt.config, fast_srt.game; "
            "assert dict(os.environ) == before; assert 'vllm' not in sys.modules and 'torch' not in sys.modules; "
            "print('ok')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]
