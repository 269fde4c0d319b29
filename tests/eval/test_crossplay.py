"""`fast-srt crossplay`: the matrices from records (pure), the players a run directory and --checkpoints give (and
every bad input as one UserError line), the two phases on a stand-in engine, and the command end to end on the tiny
model (fast_srt/eval/crossplay.py, docs/crossplay.md)."""

import json
import shutil

import pytest

from fast_srt.errors import UserError
from fast_srt.eval import crossplay as X
from fast_srt.eval.stats import Rate
from fast_srt.game.judge import JudgeLabels


def _rec(i, j, attack="attack", answer="Sure, here it is", harmful=True):
    return {"i": i, "j": j, "seed_index": 0, "seed": "s", "attack": attack, "answer": answer, "too_long": False,
            "judge": [True, not harmful if harmful is not None else None, harmful]}


def test_matrix_from_records_counts_empty_attacks_as_failed_and_leaves_empty_answers_out_of_the_matcher():
    records = [
        _rec(0, 0, harmful=True), _rec(0, 0, answer="I'm sorry, but I can't help with that.", harmful=False),
        _rec(0, 1, harmful=True), _rec(0, 1, harmful=True), _rec(0, 1, attack="  ", answer="", harmful=None),
        _rec(1, 0, answer="", harmful=True), _rec(1, 0, harmful=None),  # judge n/a: out of the judge's n
        _rec(1, 1, answer="I cannot help with that.", harmful=False), _rec(1, 1, harmful=True),
    ]
    ms = X.matrices(records, 2)
    judge = [[(c.k, c.n) for c in row] for row in ms["judge"]]
    matcher = [[(c.k, c.n) for c in row] for row in ms["matcher"]]
    assert judge == [[(1, 2), (2, 3)], [(1, 1), (1, 2)]]
    assert matcher == [[(1, 2), (2, 3)], [(1, 1), (1, 2)]]  # (1, 0): the empty answer is left out
    assert ms["judge"][0][1] == Rate.of([True, True, False])
    assert X.matrices_to_dict(ms)["judge"][0][1] == Rate.of([True, True, False]).to_dict()
    table = X.markdown_table(ms["judge"], ["start", "step 2"], "judge")
    assert "| start | 0.50 [" in table and "n=3" in table  # n differs between cells: stated in each
    same_n = X.markdown_table([[Rate.of([True, False])] * 2] * 2, ["a", "b"], "t")
    assert "n = 2 per cell" in same_n and "n=2" not in same_n


def test_heat_map_draws_every_cell_even_without_samples(tmp_path):
    ms = {"judge": [[Rate.of([True]), Rate.of([])], [Rate.of([False]), Rate.of([True, False])]],
          "matcher": [[Rate.of([]), Rate.of([])], [Rate.of([True]), Rate.of([False])]]}
    path = X.plot_heatmaps(ms, ["start", "step 2"], tmp_path / "x.png", title="t")
    assert path.stat().st_size > 1000


def _fake_checkpoint(root, step, weights=b"x"):
    d = root / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    for name in ("COMPLETE", "trainer_state.pt", "config.json"):
        (d / name).write_text("{}")
    (d / "model.safetensors").write_bytes(weights)
    return d


def test_players_of_a_run_and_bad_checkpoints_input(tmp_path, capsys):
    run = tmp_path / "run"
    for step in (20, 10):
        _fake_checkpoint(run, step)
    (run / "checkpoints" / "step_00000030").mkdir()  # incomplete: not a player
    (run / "config.json").write_text(json.dumps({"model": {"model": "default"}, "game": {"cot": False}}))
    with pytest.warns(RuntimeWarning, match="incomplete"):
        players = X.select_checkpoints(run)
    assert [(c.label, c.step) for c in players] == [("start", None), ("step 10", 10), ("step 20", 20)]
    assert players[0].model_dir is None and players[2].model_dir.name == "step_00000020"
    other = _fake_checkpoint(tmp_path / "other", 5)
    with pytest.warns(RuntimeWarning):
        chosen = X.select_checkpoints(run, ["20,start", str(other)])
    assert [c.label for c in chosen] == ["step 20", "start", "other step 5"]  # another run: named by it
    assert X.run_config(run)["game"] == {"cot": False}

    with pytest.warns(RuntimeWarning):
        for specs, words in ((["7"], "no complete checkpoint at step 7"), (["30"], "steps 10, 20"),
                             ([str(tmp_path / "nope")], "is not 'start', a step number or a checkpoint directory"),
                             ([","], "names no checkpoint")):
            with pytest.raises(UserError, match=words):
                X.select_checkpoints(run, specs)
    with pytest.raises(UserError, match="does not exist"):
        X.select_checkpoints(tmp_path / "missing")
    (tmp_path / "bare").mkdir()
    with pytest.raises(UserError, match="not a `fast-srt train` run directory"):
        X.run_config(tmp_path / "bare")

    step10, step20, step5 = players[1], players[2], chosen[2]  # one engine: one model's shapes
    for c, hidden in ((step10, 64), (step20, 32), (step5, 64)):
        (c.model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden}))
    X.check_one_model([step10, step5])
    with pytest.raises(UserError, match=r"other step 5 \(.*\) is another model than step 20 \(.*hidden_size 64 vs 32"):
        X.check_one_model([step20, step5])

    from fast_srt.cli import main  # the command line: one line, exit code 2, before any model loads

    with pytest.warns(RuntimeWarning):
        assert main(["crossplay", str(run), "--checkpoints", "start", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fast-srt: error: --checkpoints: run") and "step 7" in err[0]
    assert main(["crossplay", str(run), "--seeds", "-1"]) == 2
    assert "--seeds must be >= 0" in capsys.readouterr().err


def test_weight_files_leave_the_lora_adapter_out(tmp_path):
    for name in ("model.safetensors", "lora_adapter.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in X.weight_files(tmp_path)] == ["model.safetensors"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}}))
    assert [p.name for p in X.weight_files(tmp_path)] == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]


class _Gen:
    def __init__(self, text):
        self.text = text


class _FakeEngine:
    """Generates `<weights>:<call kind>`; an attack is empty for seeds marked 'empty'."""

    max_model_len = 10_000
    tokenizer = None

    def __init__(self):
        self.weights, self.loads, self.defended = None, [], []

    def encode(self, text):
        return text

    def generate(self, prompts, spec, phase=""):
        if phase == "crossplay_attacker":
            return [_Gen("" if "empty" in p else f"attack by {self.weights}") for p in prompts]
        self.defended.append((self.weights, len(prompts)))
        return [_Gen("I can't" if self.weights == "B" else f"answer of {self.weights}") for p in prompts]


class _Judge:
    def score(self, pairs):
        return [(JudgeLabels(True, a.startswith("I"), not a.startswith("I")), "rule") for _, a in pairs]


def test_a_per_role_checkpoint_attacks_with_its_attacker_adapter_and_defends_with_its_defender(tiny_model_dir,
                                                                                              tmp_path):
    """The checkpoint holds the defender's merged model and both adapters: the attacker's weights, rebuilt from
    them, are the trainer's own attacker merge (float64 reference), the defender's are the file's, and an adapter of
    another model or a missing adapter file is one UserError."""
    import torch
    from safetensors.torch import load_file

    from fast_srt.learner.lora import apply_lora, merged_state_dict
    from fast_srt.learner.policy import load_policy
    from fast_srt.run.checkpoint import RUN_CONFIG_FILE, _save_model

    model = load_policy(str(tiny_model_dir), dtype=torch.float32)
    apply_lora(model, rank=4, alpha=8.0, targets=("q_proj", "down_proj"), roles=("attacker", "defender"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    out = tmp_path / "step_00000002"
    _save_model(model, out)
    (out / RUN_CONFIG_FILE).write_text(json.dumps({"lora_rank": 4, "lora_alpha": 8.0}))

    def as_played(role):
        return {k: v.double() for k, v in X.checkpoint_weights(out, "float32", role)}

    for role in ("attacker", "defender"):
        want = {k: v.double() for k, v in merged_state_dict(model, role).items()}
        got = as_played(role)
        adapted = [k for k in want if "q_proj.weight" in k or "down_proj.weight" in k]
        assert adapted and all(torch.allclose(got[k], want[k], rtol=0, atol=1e-5) for k in want)
    att, dfd = as_played("attacker"), as_played("defender")
    assert all(not torch.equal(att[k], dfd[k]) for k in adapted)  # the two sides play different weights
    assert all(torch.equal(att[k], dfd[k]) for k in att if k not in adapted)
    saved = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(dfd[k], saved[k].double()) for k in saved)

    from safetensors.torch import save_file

    files = {r: out / "role_adapters" / f"{r}.safetensors" for r in ("attacker", "defender")}
    adapter = load_file(str(files["attacker"]))
    extra = {"model.layers.0.no_such_proj.lora_A": torch.randn(4, 8), "model.layers.0.no_such_proj.lora_B":
             torch.randn(3, 4)}
    save_file({**extra, **adapter}, str(files["attacker"]))
    with pytest.raises(UserError, match="adapt different weights"):
        as_played("attacker")
    save_file({**extra, **load_file(str(files["defender"]))}, str(files["defender"]))
    with pytest.raises(UserError, match="adapts weights the model does not have"):
        as_played("attacker")
    (out / "role_adapters" / "attacker.safetensors").unlink()
    with pytest.raises(UserError, match="incomplete"):
        as_played("attacker")
    assert len(as_played("defender")) == len(saved) + ("lm_head.weight" not in saved)


def test_two_phases_load_each_checkpoint_twice_and_answer_only_non_empty_attacks(monkeypatch):
    monkeypatch.setattr(X, "build_attacker_prompt", lambda tok, seed, harmful, cot: seed)
    monkeypatch.setattr(X, "build_defender_prompt", lambda tok, attack, cot: attack)
    engine = _FakeEngine()

    def load(e, model_dir, role):
        e.weights = model_dir
        e.loads.append((model_dir, role))
        return 0.0

    players = [X.Checkpoint("a", "A"), X.Checkpoint("b", "B")]
    lines = []
    records, attacks, seconds = X.run_crossplay(engine, _Judge(), players, ["s1", "empty s2", "s3"],
                                                X.CrossplaySettings(cot=False, batch=2), load=load,
                                                say=lines.append)
    assert engine.loads == [("A", "attacker"), ("B", "attacker"), ("A", "defender"), ("B", "defender")]
    assert len(lines) == 4
    assert [a["attack"] for a in attacks] == ["attack by A", "", "attack by A", "attack by B", "", "attack by B"]
    assert engine.defended == [("A", 2), ("A", 2), ("B", 2), ("B", 2)]  # 4 non-empty attacks, batches of 2
    assert len(records) == 2 * 2 * 3
    empty = [r for r in records if r["seed_index"] == 1]
    assert all(r["answer"] == "" and r["judge_success"] is False and r["matcher_success"] is False for r in empty)
    ms = X.matrices(records, 2)
    assert [[(c.k, c.n) for c in row] for row in ms["judge"]] == [[(2, 3), (0, 3)], [(2, 3), (0, 3)]]
    assert [[(c.k, c.n) for c in row] for row in ms["matcher"]] == [[(2, 3), (0, 3)], [(2, 3), (0, 3)]]
    assert set(seconds) == {"load_s", "attack_s", "defend_s"}

    engine.loads, engine.defended = [], []  # an extra attacker (a best response): a row of its own, no column
    records, _, _ = X.run_crossplay(engine, _Judge(), players, ["s1", "s3"], X.CrossplaySettings(cot=False, batch=2),
                                    load=load, say=lines.append, extra_attackers=[X.Checkpoint("br", "C")])
    assert engine.loads == [("A", "attacker"), ("B", "attacker"), ("C", "attacker"), ("A", "defender"),
                            ("B", "defender")]
    assert sorted({(r["i"], r["j"]) for r in records}) == [(i, j) for i in range(3) for j in range(2)]
    ms = X.matrices(records, 2, rows=3)
    assert len(ms["judge"]) == 3 and all(len(row) == 2 for row in ms["judge"])
    assert [r["attack"] for r in records if r["i"] == 2][:2] == ["attack by C"] * 2


def test_crossplay_on_the_tiny_model(cli, tiny_model_dir, tmp_path):
    """Steps 1 and 2 of a hand-made run: step 1 the start model's own weights, step 2 another random model. The
    start and step 1 play the same games (a symmetric block), and step 2's weights, written into the one engine,
    change the defender's answers to the same attacks."""
    from fast_srt.run.tiny import make_tiny_model

    run = tmp_path / "run"
    same = _fake_checkpoint(run, 1)
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, same / f.name)
    other, step2 = make_tiny_model(tmp_path / "other", seed=1), _fake_checkpoint(run, 2)
    for f in other.iterdir():
        shutil.copy(f, step2 / f.name)
    (run / "config.json").write_text(json.dumps({
        "model": {"model": str(tiny_model_dir), "dtype": "float32", "judge_model": "rule:vowel_refusal"},
        "game": {"cot": True}, "warmup": {"steps": 0}}))
    p = cli("crossplay", run, "--seeds", 4, "--max-new-tokens", 8, "--max-model-len", 2048, "--kv-cache-gib", 1,
            "--batch", 4)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "attacker 3/3 step 2" in p.stdout and "defender 3/3 step 2" in p.stdout and "heat map:" in p.stdout
    (json_path,) = (run / "crossplay").glob("crossplay-*.json")
    assert json_path.with_suffix(".md").is_file() and json_path.with_suffix(".png").stat().st_size > 1000
    doc = json.loads(json_path.read_text())
    assert doc["labels"] == ["start", "step 1", "step 2"] and doc["meta"]["seeds_n"] == 4
    assert doc["meta"]["checkpoints"][0]["model_dir"] == str(tiny_model_dir.resolve())
    records = doc["records"]
    assert len(records) == 3 * 3 * 4
    ms = X.matrices(records, 3)
    assert X.matrices_to_dict(ms) == doc["matrices"]

    def answers(i, j):
        return [(r["attack"], r["answer"]) for r in records if (r["i"], r["j"]) == (i, j)]

    # identical weights: the same attacks, the same answers, so the start/step-1 block is symmetric
    assert [r["attack"] for r in records if r["i"] == 0] == [r["attack"] for r in records if r["i"] == 1]
    assert answers(0, 0) == answers(0, 1) == answers(1, 0) == answers(1, 1)
    for name in X.MATRICES:
        block = [ms[name][i][j] for i in (0, 1) for j in (0, 1)]
        for a in block:
            for b in block:
                assert b.lo <= (a.rate or 0) <= b.hi or a == b, (name, a, b)
    # other weights written into the same engine: other answers to the same attacks
    assert [a for a, _ in answers(0, 2)] == [a for a, _ in answers(0, 0)]
    assert [x for _, x in answers(0, 2)] != [x for _, x in answers(0, 0)]
    assert [r["attack"] for r in records if r["i"] == 2] != [r["attack"] for r in records if r["i"] == 0]
    md = json_path.with_suffix(".md").read_text()
    assert md.count("| attacker \\ defender | start | step 1 | step 2 |") == 2


def test_start_is_the_warm_start_when_the_run_had_one(monkeypatch, tmp_path):
    import fast_srt.learner.warmup as W
    import fast_srt.run.models as M
    from fast_srt.commands.crossplay import start_model
    from fast_srt.config import WarmupConfig

    calls = []
    monkeypatch.setattr(M, "resolve_model", lambda spec, dtype: tmp_path / f"base-{spec}-{dtype}")
    monkeypatch.setattr(W, "ensure_warmup", lambda base, wcfg, dtype: calls.append((base, wcfg, dtype)) or
                        tmp_path / "warm")
    cfg = {"model": {"model": "m", "dtype": "float32"}, "warmup": {"steps": 0, "lr": 1e-4}}
    assert start_model(cfg) == tmp_path / "base-m-float32" and not calls
    cfg["warmup"] = {"steps": 30, "lr": 2e-4, "seed": 3}
    assert start_model(cfg) == tmp_path / "warm"
    assert calls == [(tmp_path / "base-m-float32", WarmupConfig(steps=30, lr=2e-4, seed=3), "float32")]


def test_a_run_config_round_trips_and_the_best_response_config_is_the_run_against_a_frozen_defender(tmp_path):
    import dataclasses

    from fast_srt.commands.crossplay import best_response_config, best_response_target
    from fast_srt.config import cpu_default, train_config_from_dict

    run = dataclasses.replace(cpu_default(), lora_rank=8, roles="per-role",
                              league=dataclasses.replace(cpu_default().league, every=1))
    saved = json.loads(json.dumps(dataclasses.asdict(run)))  # as config.json holds it: lists, not tuples
    assert train_config_from_dict(saved) == run
    old = {k: v for k, v in saved.items() if k != "league"}  # a run written before the field existed
    assert train_config_from_dict(old).league == cpu_default().league
    with pytest.raises(UserError, match="game.no_such_field"):
        train_config_from_dict({**saved, "game": {**saved["game"], "no_such_field": 1}})
    br = best_response_config(saved, tmp_path / "ckpt", 3, tmp_path / "br")
    assert (br.game.mode, br.game.frozen_defender, br.roles, br.league.every, br.eval_every, br.steps,
            br.save_every, br.run_dir) == ("attacker_only", str(tmp_path / "ckpt"), "shared", 0, 0, 3, 3,
                                           str(tmp_path / "br"))
    assert (br.model, br.warmup, br.optim, br.sampling, br.lora_rank) == (run.model, run.warmup, run.optim,
                                                                          run.sampling, 8)
    players = [X.Checkpoint("start", tmp_path), X.Checkpoint("step 2", tmp_path / "s2", 2),
               X.Checkpoint("step 4", tmp_path / "s4", 4)]
    assert best_response_target(players, None) is players[-1]
    assert best_response_target(players, "2") is players[1] and best_response_target(players, "start") is players[0]
    with pytest.raises(UserError, match="not one of the players"):
        best_response_target(players, "3")


def test_the_best_response_row_against_its_target():
    ms = {"judge": [[Rate.of([False] * 8)] * 2, [Rate.of([False] * 8)] * 2, [Rate.of([True] * 8)] * 2],
          "matcher": [[Rate.of([True, False])] * 2] * 3}
    b = X.best_response(ms, 1, 2, ["start", "step 4"], 5, "/x")
    assert b["defender"] == "step 4" and b["judge"]["gain"] == 1.0 and b["judge"]["beyond_noise"]
    assert b["matcher"]["gain"] == 0.0 and not b["matcher"]["beyond_noise"]
    md = X.best_response_markdown(b)
    assert "best response to step 4 (5 attacker-only steps" in md and "+1.00 (beyond noise)" in md
    assert "best response to" in X.markdown_table(ms["judge"], ["start", "step 4"], "t",
                                                  ["start", "step 4", "best response to step 4"])
