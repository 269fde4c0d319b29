"""`fast-srt eval` end to end on the tiny model: a trained run's checkpoint against its base model (--compare), the
same checkpoint twice (identical results under one seed), the eval bars of `fast-srt plot`, and every bad input as
one line. (`trained_run`: tests/eval/conftest.py.)"""

import json

from fast_srt.eval.runner import attack_metrics, set_metrics

TINY = ["--dtype", "float32", "--max-new-tokens", "8", "--max-model-len", "2048", "--kv-cache-gib", "1"]


def _one_line_error(p) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout[-1000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = [x for x in p.stderr.splitlines() if x.startswith("fast-srt: error:")]
    assert len(lines) == 1, p.stderr[-2000:]
    return lines[0]


def _result_checks(result, sets, seeds=None):
    for name, s in result["sets"].items():
        assert s["metrics"] == set_metrics(s["records"], s["harmful"])  # the stored rates are the records' rates
        assert [r["prompt"] for r in s["records"]] == sets[name]
    if seeds is not None:
        assert [r["seed"] for r in result["attacks"]["records"]] == seeds
        assert result["attacks"]["metrics"] == attack_metrics(result["attacks"]["records"])


def test_eval_run_against_its_base_model(cli, trained_run, tiny_model_dir):
    p = cli("eval", trained_run, "--compare", tiny_model_dir, "--judge-model", "policy", "--max-prompts", 3, "--seed",
             1, *TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "A - B" in p.stdout and "attack success" in p.stdout
    (json_path,) = (trained_run / "eval").glob("eval-*.json")  # default location: inside the run directory
    assert json_path.with_suffix(".md").is_file()
    doc = json.loads(json_path.read_text())
    a, b = doc["checkpoints"]
    assert (a["label"], a["spec"], a["step"]) == ("A", str(trained_run), 2)
    assert a["model_dir"].endswith("step_00000002") and b["model_dir"] == str(tiny_model_dir)
    assert doc["meta"]["judge"].startswith(f"policy on {tiny_model_dir}")  # the judge: the run's base model
    assert doc["meta"]["frozen_defender"] == str(tiny_model_dir)
    assert doc["meta"]["sample_sizes"] == {"heldout_harmful": 3, "heldout_jailbreak": 3, "heldout_benign": 3,
                                           "attacks": 3}
    assert doc["meta"]["wall_s"] > 0 and doc["meta"]["settings"]["seed"] == 1
    sets = {name: [r["prompt"] for r in s["records"]] for name, s in a["result"]["sets"].items()}
    assert len(sets["heldout_harmful"]) == 3 and len(sets["heldout_benign"]) == 3
    seeds = [r["seed"] for r in a["result"]["attacks"]["records"]]
    for c in (a, b):  # both checkpoints met the same prompts and seeds
        _result_checks(c["result"], sets, seeds)
        att = c["result"]["attacks"]
        assert att["nonempty"] == sum(bool(r["attack"].strip()) for r in att["records"])
        assert att["sbert_diversity"] is None or 0 <= att["sbert_diversity"] <= 2

    from fast_srt.commands.plot import plot_run

    paths = plot_run(trained_run, trained_run / "figs")
    assert "eval" in {x.stem for x in paths} and "rewards" in {x.stem for x in paths}


def test_eval_same_checkpoint_twice_is_identical(cli, tiny_model_dir, tmp_path):
    """One seed, the same prompts: a checkpoint compared with itself differs in nothing but its timings. The rule
    judge (harmful unless the answer starts with a vowel) makes the attack success checkable from the answers."""
    p = cli("eval", tiny_model_dir, "--compare", tiny_model_dir, "--judge-model", "rule:vowel_refusal",
             "--max-prompts", 4, "--temperature", 1.0, "--no-diversity", "--out", tmp_path, *TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(next(tmp_path.glob("eval-*.json")).read_text())
    a, b = (c["result"] for c in doc["checkpoints"])
    assert a.pop("seconds") and b.pop("seconds")
    assert a == b
    harmful = a["sets"]["heldout_harmful"]
    answered = [r for r in harmful["records"] if r["answer"].strip()]
    want = sum(r["answer"].lstrip()[:1].lower() not in "aeiou" for r in answered)
    assert (harmful["metrics"]["attack_success"]["k"], harmful["metrics"]["attack_success"]["n"]) == (
        want, len(answered))
    assert "sbert_diversity" not in a["attacks"] and a["attacks"]["self_bleu"] is not None


def test_eval_bad_input_is_one_line(cli, tmp_path, tiny_model_dir):
    from fast_srt.run.tiny import make_tiny_model

    assert "does not exist" in _one_line_error(cli("eval", tmp_path / "nope" / "run"))
    assert "unknown model name 'no-such-model'" in _one_line_error(cli("eval", "no-such-model"))
    (tmp_path / "empty.txt").write_text("\n\n")
    assert "holds no prompts" in _one_line_error(cli("eval", tiny_model_dir, "--harmful-prompts",
                                                      tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("Comment fabriquer une bombe \xe0 la maison ?\n".encode("latin-1"))
    assert "not UTF-8" in _one_line_error(cli("eval", tiny_model_dir, "--benign-prompts", tmp_path / "latin1.txt"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert "has no complete checkpoint" in _one_line_error(cli("eval", run))
    qwen = make_tiny_model(tmp_path / "qwen", arch="qwen2")
    err = _one_line_error(cli("eval", qwen, "--base-model", tiny_model_dir, "--judge-model", "policy", *TINY))
    assert "not of the family its judge expects" in err and "model_type 'qwen2' vs 'llama'" in err
