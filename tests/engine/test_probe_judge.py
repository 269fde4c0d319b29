"""The probe judge: logistic fitting and AUC against hand-checkable cases, the labelled set's split, the input
cut, the generative judge's margins, and the probe judge end to end on the tiny model's pooling engine."""

import math
import random

import pytest
import torch

from fast_srt.engine.engine import Generation
from fast_srt.engine.judge import answer_margins
from fast_srt.engine.probe_judge import (LABELS, Probe, ProbeJudge, auc, fit_logistic, fit_probe, pair_ids,
                                        pool_features, render_answer)
from fast_srt.errors import UserError
from fast_srt.eval.judge_agreement import agreement
from fast_srt.game import judge_set as jd
from fast_srt.game.judge import parse_judge_output


def test_auc_by_hand():
    assert auc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert auc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    # one tie between a positive and a negative counts half: pairs (3,1),(3,2),(2,1),(2,2) -> 1 + 1 + 1 + 0.5
    assert auc([3, 2, 1, 2], [1, 1, 0, 0]) == pytest.approx(3.5 / 4)
    assert math.isnan(auc([1, 2], [1, 1]))


def test_logistic_recovers_a_separating_direction_and_not_noise():
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    x = torch.randn(400, 20, generator=g, dtype=torch.float64)
    direction = torch.randn(20, generator=g, dtype=torch.float64)
    y = (x @ direction > 0.3).double()
    w, b = fit_logistic(x, y, lam=1e-3)
    assert torch.nn.functional.cosine_similarity(w, direction, dim=0) > 0.9
    assert auc(x @ w + b, y) > 0.98
    probe = fit_probe(x, torch.stack([y, 1 - y, (torch.rand(400, generator=g) < 0.5).double()], 1))
    assert probe.meta["cv_auc"]["prompt_harmful"][str(probe.meta["lambda"]["prompt_harmful"])] > 0.95
    noise_cv = probe.meta["cv_auc"]["response_harmful"][str(probe.meta["lambda"]["response_harmful"])]
    assert noise_cv < 0.65  # random labels: no signal to find
    labels = probe.labels(x[:5])
    assert [lab.prompt_harmful for lab in labels] == (x[:5] @ direction > 0.3).tolist() or auc(
        probe.logits(x)[:, 0], y) > 0.98


def test_probe_save_load_round_trip(tmp_path):
    g = torch.Generator().manual_seed(1)
    p = Probe(torch.randn(6, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64) + 0.5,
              torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64),
              {"lambda": {"prompt_harmful": 0.1}})
    p.save(tmp_path)
    q = Probe.load(tmp_path)
    x = torch.randn(4, 6, generator=g)
    assert torch.equal(p.logits(x), q.logits(x)) and q.meta == p.meta


def test_render_answer_always_parses():
    from fast_srt.game.judge import JudgeLabels

    for a in (True, False):
        for r in (True, False, None):
            for h in (True, False, None):
                lab = JudgeLabels(a, r, h)
                assert parse_judge_output(render_answer(lab)) == lab


def test_written_parts_of_the_splits_are_disjoint():
    for parts in (jd.FRAMINGS, jd.REFUSAL_OPENERS, jd.REFUSAL_REASONS, jd.REFUSAL_ALTERNATIVES,
                  jd.COMPLIANCE_OPENERS):
        train, held = set(jd.split_list(parts, "train")), set(jd.split_list(parts, "heldout"))
        assert train and held and not train & held and train | held == set(parts)
    train, held = jd.load_written("train"), jd.load_written("heldout")
    assert train.keys() == held.keys()
    for key in train:
        flat = lambda items: {x if isinstance(x, str) else x["prompt"] + "\n" + x["response"] for x in items}  # noqa
        assert flat(train[key]) and flat(held[key]) and not flat(train[key]) & flat(held[key]), key
    assert all(f.count("{p}") == 1 for split in (train, held) for f in split["framings"])


def test_template_group_masks_entities_and_numbers():
    assert jd.template_group("What is John's address?") == jd.template_group("What is Mary's address?")
    assert jd.template_group("Is 5 mg enough?") == jd.template_group("Is 50 mg enough?")
    assert jd.template_group("How do I bake bread?") != jd.template_group("How do I bake a cake?")


def test_shipped_set_labels_and_split():
    """Every outcome cell in both splits; labels follow each response's kind; no template group, held-out seed or
    held-out written part reaches training."""
    from fast_srt.eval.judge_agreement import truth_cell
    from fast_srt.game.rewards import OUTCOME_NAMES
    from fast_srt.game.seeds import load_heldout, normalise_prompt

    pairs = jd.load_judge_pairs()
    train, held = jd.load_judge_pairs("train"), jd.load_judge_pairs("heldout")
    assert len(train) + len(held) == len(pairs) and len(held) >= 500 and len(train) >= 1500
    for p in pairs:
        assert (p.response_refusal, p.response_harmful) == jd.RESPONSE_KINDS[p.response_source], p
        assert p.response.strip() and p.prompt.strip() and p.group
    for split, rows in (("train", train), ("heldout", held)):
        cells = [truth_cell(p) for p in rows]
        for cell in OUTCOME_NAMES.values():
            assert cells.count(cell) >= 20, (split, cell, cells.count(cell))
    assert not {p.group for p in train} & {p.group for p in held}
    held_seeds = {normalise_prompt(s.prompt) for n in ("donotanswer", "benign") for s in load_heldout(n)}
    train_parts = [x for v in jd.load_written("train").values() for x in v if isinstance(x, str)]
    held_openers = [o for o in jd.load_written("heldout")["refusal_openers"]  # less a phrase both writers wrote
                    if not any(t.startswith(o) for t in train_parts)]
    for p in train:  # nothing held out reaches the training split
        assert not any(h in normalise_prompt(p.prompt) for h in held_seeds if len(h) > 25)
        assert not any(p.response.startswith(o) for o in held_openers)


def test_bad_judge_set_file_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        jd.load_judge_pairs(path=tmp_path / "nope.jsonl")
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "hi"}\n')
    with pytest.raises(UserError, match="bad.jsonl:1: not a labelled pair"):
        jd.load_judge_pairs(path=f)
    with pytest.raises(UserError, match="unknown judge-set split"):
        jd.load_judge_pairs("test")


def test_answer_margins_read_the_value_positions():
    steps = [("Harmful", {}), (" request", {}), (":", {}), (" yes", {" yes": -0.1, " no": -2.5}), ("\n", {}),
             ("Response", {}), (" refusal", {}), (":", {}), (" no", {" yes": -3.0, " no": -0.2, " n": -1.0}),
             ("\n", {}), ("Harmful", {}), (" response", {}), (":", {}), (" n", {" n": -0.3, "x": -1.0})]
    g = Generation([], [0] * len(steps), "", [], "stop", steps)
    m = answer_margins(g)
    assert m[0] == pytest.approx(-0.1 + 2.5)
    assert m[1] == pytest.approx(-3.0 - math.log(math.exp(-0.2) + math.exp(-1.0)))
    assert m[2] == -50.0  # no yes candidate among the top tokens: clipped


def test_agreement_counts_by_hand():
    from fast_srt.game.judge import JudgeLabels

    mk = lambda a, r: jd.JudgePair("p", "r", a, r, a and not r, "heldout", "", "")  # noqa: E731
    pairs = [mk(True, True), mk(True, False), mk(False, False), mk(False, True)]
    said = [JudgeLabels(True, True, False), JudgeLabels(False, False, True), JudgeLabels(False, None, None), None]
    rep = agreement(pairs, said, [[2.0, 1, 1], [1.0, 1, 1], [0.0, 1, 1], [-1.0, 1, 1]])
    assert rep["prompt_harmful"]["confusion"] == {"tp": 1, "fp": 0, "tn": 1, "fn": 1}
    assert rep["prompt_harmful"]["accuracy"] == 0.5 and rep["prompt_harmful"]["n_a"] == 1
    assert rep["prompt_harmful"]["auc"] == 1.0
    assert rep["response_refusal"]["n_a"] == 2 and rep["response_harmful"]["confusion"]["tp"] == 1


def test_pair_ids_cut_the_response_first(tiny_engine):
    tok = tiny_engine.tokenizer
    prompt, response = "how do I bake bread " * 3, "first you mix flour and water " * 40
    ids, boundary, was_cut = pair_ids(tok, prompt, response, 10_000)[:3]
    assert tok.decode(ids[boundary:]) .strip() == response.strip() and not was_cut
    cut = pair_ids(tok, prompt, response, boundary + 20)
    assert cut is not None and len(cut[0]) <= boundary + 20 and cut[1] == boundary and cut[2]
    assert pair_ids(tok, "word " * 300, "x", 50) is None or len(pair_ids(tok, "word " * 300, "x", 50)[0]) <= 50


def test_pooling_engine_returns_the_models_final_hidden_states(tiny_pooling_engine, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    ids = [[5, 17, 33, 2, 9, 41], [7, 8]]
    states = tiny_pooling_engine.token_states(ids)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for s, i in zip(states, ids):
        with torch.no_grad():
            ref = model.model(torch.tensor([i])).last_hidden_state[0]  # after the final norm
        assert s.shape == ref.shape
        torch.testing.assert_close(s, ref, atol=2e-4, rtol=2e-4)


def test_probe_judge_end_to_end_on_the_tiny_model(tiny_pooling_engine):
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "music", "table", "green", "light", "paper", "north"]
    pairs, y = [], []
    for _ in range(120):
        refuse = rng.random() < 0.5
        body = " ".join(rng.choice(words) for _ in range(6))
        pairs.append((" ".join(rng.choice(words) for _ in range(5)), ("NO NO NO NO " if refuse else "") + body))
        y.append(float(refuse))
    judge = ProbeJudge.__new__(ProbeJudge)
    judge.engine, judge.max_tokens = tiny_pooling_engine, 0
    judge.parse_failures = judge.calls = judge.truncated = judge.too_long = 0
    feats, kept = judge.features(pairs)
    assert kept == list(range(120)) and feats.shape == (120, 5 * 64)
    yt = torch.tensor(y)
    judge.probe = fit_probe(feats[:80], torch.stack([yt[:80], yt[:80], 1 - yt[:80]], 1))
    out = judge.score(pairs[80:] + [("a prompt", "  ")])
    said = [lab.response_refusal for lab, _ in out[:-1]]
    assert sum(s == bool(t) for s, t in zip(said, y[80:])) >= 36  # 40 unseen pairs
    assert all(parse_judge_output(text) == lab for lab, text in out[:-1])
    assert out[-1][0].has_none  # an empty response is a tie, as with the generative judge
    assert pool_features(torch.ones(3, 4), 1, "v2").shape == (16,) and pool_features(torch.ones(3, 4), 1, "v1").shape == (12,)


def test_probe_is_fitted_once_then_cached(tiny_pooling_engine, tiny_model_dir, tmp_path, monkeypatch):
    """First use fits on the labelled set's training split and caches atomically; the second use loads the cache
    (fitting again would raise); a shipped probe for another model is never picked up."""
    from fast_srt.engine import probe_judge as P

    monkeypatch.setenv("FAST_SRT_CACHE", str(tmp_path))
    subset = jd.load_judge_pairs("train")[::8]  # every 8th training pair keeps the test short
    monkeypatch.setattr(jd, "probe_training_pairs", lambda: subset)
    lines = []
    judge = ProbeJudge(tiny_pooling_engine, model_dir=tiny_model_dir, log=lines.append)
    assert len(lines) == 2 and "fitting the judge probe" in lines[0] and "fitted on" in lines[1]  # before and after
    assert judge.probe.meta["n_train"] == len(subset)
    assert judge.probe.meta["pooling"] == P.POOLING and judge.probe.mean.shape == (5 * 64,)
    assert set(judge.probe.meta["prior_shift"]) == set(P.PRIOR_SHIFTED)
    # refitting through a judge that holds another probe (judge_assets probe) still fits with POOLING
    old = Probe(torch.zeros(1), torch.ones(1), torch.zeros(3, 1), torch.zeros(3))
    refit = P.fit_from_judge_set(ProbeJudge(tiny_pooling_engine, probe=old), tiny_model_dir)
    assert refit.mean.shape == (5 * 64,) and refit.meta["pooling"] == P.POOLING
    cached = list(tmp_path.glob("judge-probe-*"))
    assert len(cached) == 1 and not list(tmp_path.glob("*.tmp-*"))

    def no_fit(*a, **k):
        raise AssertionError("fitted again")

    monkeypatch.setattr(P, "fit_from_judge_set", no_fit)
    again = ProbeJudge(tiny_pooling_engine, model_dir=tiny_model_dir, log=lines.append)
    assert torch.equal(again.probe.w, judge.probe.w) and len(lines) == 2
    assert P.probe_key(tiny_model_dir, tiny_pooling_engine.dtype) == cached[0].name.removeprefix("judge-probe-")
    assert not P.shipped_probe_dir(P.probe_key(tiny_model_dir, tiny_pooling_engine.dtype)).exists()


def test_probe_judge_counts_its_truncations(tiny_pooling_engine):
    """A pair longer than the judge engine is cut to fit and counted (judge/truncated_total); one that fits is not."""
    judge = ProbeJudge(tiny_pooling_engine, probe=Probe(torch.zeros(1), torch.ones(1), torch.zeros(3, 1),
                                                        torch.zeros(3)))
    judge.probe = Probe(torch.zeros(3 * 64, dtype=torch.float64), torch.ones(3 * 64, dtype=torch.float64),
                        torch.randn(3, 3 * 64, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    judge.score([("how do I bake bread?", "mix flour and water.")])
    assert judge.truncated == 0 and judge.calls == 1
    long_answer = "first you mix flour and water, then you wait. " * 200  # far over the engine's 512 tokens
    out = judge.score([("how do I bake bread?", long_answer), ("q", "a short answer")])
    assert judge.truncated == 1 and judge.too_long == 0 and judge.calls == 3
    assert not out[0][0].has_none  # cut, then judged


def test_wildguard_input_starts_with_exactly_one_bos(tmp_path):
    """WildGuard's format begins `<s><|user|>`: the raw prompt gets the tokenizer's BOS in front, exactly once,
    also when the pair is cut to fit; the chat template keeps the one BOS it writes itself. The engine is a stand-in
    with the tiny BOS model's tokenizer and the engine's encode rule (no special tokens): no vLLM engine is started
    here, since a second engine built mid-session resets the first one's prefix-cache metrics."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from fast_srt.engine.judge import Judge
    from fast_srt.run.tiny import make_tiny_model

    tok = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "llama", arch="llama", bos=True))
    tiny_bos_engine = SimpleNamespace(tokenizer=tok, max_model_len=256,
                                      encode=lambda text: list(tok(text, add_special_tokens=False).input_ids))
    bos = tok.bos_token_id
    assert bos is not None and tok("x").input_ids[0] == bos  # the tokenizer adds a BOS of its own
    for template in ("wildguard", "chat"):
        ids = Judge(tiny_bos_engine, template=template).encode("How do I pick a lock?", "I can't help with that.")
        assert ids[0] == bos and ids.count(bos) == 1, (template, ids[:4])
    judge = Judge(tiny_bos_engine, template="wildguard", constrained=False, max_tokens=1)  # room in 256 tokens
    ids = judge.fit("How do I pick a lock?", "step one, then step two. " * 40)  # cut to fit, then re-encoded
    assert judge.truncated == 1 and ids is not None and len(ids) < 256
    assert ids[0] == bos and ids.count(bos) == 1


def test_cell_agreement_by_hand():
    from fast_srt.eval.judge_agreement import cell_agreement
    from fast_srt.game.judge import JudgeLabels

    mk = lambda q, r, h: jd.JudgePair("p", "r", q, r, h, "heldout", "", "")  # noqa: E731
    pairs = [mk(True, True, True), mk(True, True, True), mk(False, False, True), mk(False, False, False)]
    said = [JudgeLabels(True, True, True), JudgeLabels(True, True, False), JudgeLabels(False, False, False), None]
    cells = cell_agreement(pairs, said)
    assert cells["leaky_refusal"]["n"] == 2 and cells["leaky_refusal"]["outcome_accuracy"] == 0.5
    assert cells["leaky_refusal"]["response_harmful_accuracy"] == 0.5
    assert cells["leaky_refusal"]["response_refusal_accuracy"] == 1.0
    assert cells["harmful_compliance"]["outcome_accuracy"] == 0.0
    assert cells["harmful_compliance"]["prompt_harmful_accuracy"] == 1.0
    assert cells["helpful"]["outcome_accuracy"] == 0.0  # not judged counts as wrong
    assert cells["defended"]["n"] == 0 and cells["defended"]["outcome_accuracy"] is None
    assert cells["all"]["n"] == 4 and cells["all"]["outcome_accuracy"] == 0.25


def test_shortcut_classifier_reads_openings_and_nothing_else():
    """Labels written into the first words are found (AUC near 1); labels that only the text past the first words
    carries are not (AUC near 0.5)."""
    from fast_srt.eval.judge_agreement import SHORTCUT_WORDS, ShortcutClassifier

    rng = random.Random(random.randrange(1 << 30))
    words = ["apple", "river", "stone", "cloud", "music", "table", "green", "light", "paper", "north"]

    def make(n):
        out = []
        for _ in range(n):
            refuse, harm = rng.random() < 0.5, rng.random() < 0.5
            filler = " ".join(rng.choice(words) for _ in range(SHORTCUT_WORDS + 2))
            response = ("sorry no " if refuse else "sure yes ") + filler + (" poison" if harm else " bread")
            out.append(jd.JudgePair(" ".join(rng.choice(words) for _ in range(6)), response, rng.random() < 0.5,
                                    refuse, harm, "train", "", ""))
        return out

    clf = ShortcutClassifier(make(300))
    rep = clf.report(make(200))
    assert rep["response_refusal"]["auc"] > 0.99 and rep["response_refusal"]["accuracy"] > 0.95
    assert 0.35 < rep["response_harmful"]["auc"] < 0.65
    assert 0.35 < rep["prompt_harmful"]["auc"] < 0.65


def test_pooling_v3_reads_the_users_text_apart_from_the_template(tiny_engine):
    """The user span holds exactly the prompt's own tokens; each v3 block is the mean of its span, fresh random
    states, a response shorter and one longer than the opening."""
    from fast_srt.engine.probe_judge import OPENING_TOKENS

    tok = tiny_engine.tokenizer
    prompt = "how do I bake bread at home"
    for response in ("mix flour", "first you mix flour and water and salt, then you knead it " * 3):
        fit = pair_ids(tok, prompt, response, 10_000)
        assert tok.decode(fit.ids[fit.user_start:fit.user_end]).strip() == prompt
        n = len(fit.ids)
        states = torch.randn(n, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(random.randrange(99)))
        f = pool_features(states, fit, "v3").view(5, 6)
        r = states[fit.boundary:]
        opening, rest = r[:OPENING_TOKENS], (r[OPENING_TOKENS:] if len(r) > OPENING_TOKENS else r[:OPENING_TOKENS])
        for got, want in zip(f, (states[fit.user_start:fit.user_end].mean(0), states[fit.user_end:fit.boundary].mean(0),
                                 opening.mean(0), rest.mean(0), states[-1])):
            torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="pooling"):
        pool_features(states, fit.boundary, "v3")


def test_judge_eval_reads_every_set_with_its_split(tmp_path):
    """--split applies to --data files too; every file is one set; the shipped real-games set comes by default;
    --no-builtin without files is one clear error."""
    import json

    from fast_srt.commands.judge_eval import _datasets, parse_args

    f = tmp_path / "mine.jsonl"
    row = {"prompt": "p", "response": "r", "prompt_harmful": True, "response_refusal": True, "response_harmful": False}
    f.write_text("".join(json.dumps({**row, "split": s}) + "\n" for s in ("train", "heldout", "heldout")))
    sets = _datasets(parse_args(["--data", str(f), str(f), "--split", "train"]))
    assert [name.split(" (")[0] for name, _ in sets] == ["labelled set", "real-games set", str(f), str(f)]
    assert len(sets[2][1]) == 1 and all(p.split == "train" for p in sets[0][1])
    assert len(sets[1][1]) >= 240  # the real-games set has no split field: all of it is held out
    only = _datasets(parse_args(["--data", str(f), "--no-builtin"]))
    assert len(only) == 1 and len(only[0][1]) == 2
    assert len(_datasets(parse_args(["--data", str(f), "--no-builtin", "--split", "all"]))[0][1]) == 3
    with pytest.raises(UserError, match="nothing to measure"):
        _datasets(parse_args(["--no-builtin"]))


def test_real_games_set_is_labelled_and_disjoint_from_the_fit_games():
    from fast_srt.game.judge_set import load_fit_games, load_real_games, template_group

    real, fit = load_real_games(), load_fit_games()
    assert len(real) >= 240 and all(p.split == "heldout" for p in real)
    assert all(p.split == "train" for p in fit)
    assert not {template_group(p.prompt) for p in real} & {p.group for p in fit}
    for rows in (real, fit):
        for name in LABELS:  # both classes of every label
            assert 0 < sum(getattr(p, name) for p in rows) < len(rows), name


def test_cohen_kappa_by_hand_and_the_shipped_second_reading():
    from fast_srt.eval.judge_agreement import cohen_kappa, reading_agreement
    from fast_srt.game.judge_set import load_real_games

    # both readers say yes half the time (pe = 0.5); 3 of 4 agree: kappa = (0.75 - 0.5) / 0.5
    assert cohen_kappa([True, True, False, False], [True, False, False, True]) == (0.5, 0.0)  # chance level
    assert cohen_kappa([True, True, False, False], [True, True, False, True]) == pytest.approx((0.75, 0.5))
    assert math.isnan(cohen_kappa([True, True], [True, True])[1])
    second = jd.load_judge_pairs(None, path=str(jd.resources.files("fast_srt.data").joinpath(
        "judge", "real_games_second_reading.jsonl")))
    rep = reading_agreement(load_real_games(), second)
    assert rep["n"] == len(second) >= 60
