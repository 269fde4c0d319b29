"""Auxiliary SFT: the shipped set, user files and their errors, target format, token layout, the stream."""

import json

import pytest

from fast_srt.learner.batch import Sample
from fast_srt.errors import UserError
from fast_srt.game.rules import ASSISTANT_THINKING_PREFIX, build_defender_prompt, check_format
from fast_srt.learner.sft import (
    DEFAULT_THINKING,
    SFTStream,
    build_sft_samples,
    format_sft_target,
    load_sft_records,
)


@pytest.fixture(scope="module")
def tok():
    from fast_srt.run.tiny import make_tokenizer

    return make_tokenizer()


def _one_line_error(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def _write(tmp_path, name, content):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


# --- shipped data ------------------------------------------------------------------------------------------------


def test_builtin_parses_and_is_balanced():
    recs = load_sft_records()
    assert recs == load_sft_records("builtin")
    assert len(recs) >= 80
    kinds = [r["kind"] for r in recs]
    assert set(kinds) == {"benign", "harmful"}
    assert abs(kinds.count("benign") - kinds.count("harmful")) <= len(recs) // 10
    assert len({r["prompt"] for r in recs}) == len(recs)  # no duplicate prompts
    for r in recs:
        assert r["prompt"] and r["thinking"] and r["response"]
        assert len(r["response"].split()) <= 80
        assert r["thinking"] != DEFAULT_THINKING


def test_builtin_targets_pass_format_check():
    for r in load_sft_records():
        target = format_sft_target(r["thinking"], r["response"])
        res = check_format(target)
        assert res.valid, (r["prompt"], res.violations)
        assert res.public == r["response"]
        assert res.thinking == r["thinking"]


def test_target_exact_text():
    assert format_sft_target("Think.", "Answer.") == "Think. </think>\n<answer> Answer. </answer>"
    full = ASSISTANT_THINKING_PREFIX + format_sft_target("Think.", "Answer.")
    assert full == "Let's think step by step.\n<think> Think. </think>\n<answer> Answer. </answer>"
    no_think = format_sft_target(None, "Answer.")
    assert no_think.startswith(DEFAULT_THINKING + " </think>")
    assert check_format(no_think).valid
    assert format_sft_target("  ", "Answer.") == no_think


# --- user files --------------------------------------------------------------------------------------------------


def test_user_file_optional_thinking(tmp_path):
    lines = [
        json.dumps({"prompt": "Hi?", "response": "Hello.", "thinking": "A greeting."}),
        "",
        json.dumps({"prompt": "Sum 2+2?", "response": "4."}),
        json.dumps({"prompt": "Blank?", "response": "Yes.", "thinking": "   "}),
    ]
    p = _write(tmp_path, "u.jsonl", "\n".join(lines) + "\n")
    recs = load_sft_records(p)
    assert [r["prompt"] for r in recs] == ["Hi?", "Sum 2+2?", "Blank?"]
    assert recs[0]["thinking"] == "A greeting."
    assert recs[1]["thinking"] == DEFAULT_THINKING == recs[2]["thinking"]
    assert load_sft_records(str(p)) == recs


def test_missing_file(tmp_path):
    with pytest.raises(UserError) as e:
        load_sft_records(tmp_path / "nope.jsonl")
    assert "not found" in _one_line_error(e)
    with pytest.raises(UserError) as e:
        load_sft_records(tmp_path)
    assert "not a file" in _one_line_error(e)


def test_empty_file(tmp_path):
    for content in ("", "\n  \n"):
        with pytest.raises(UserError) as e:
            load_sft_records(_write(tmp_path, "e.jsonl", content))
        assert "holds no records" in _one_line_error(e)


def test_non_utf8(tmp_path):
    p = _write(tmp_path, "b.jsonl", b'{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(UserError) as e:
        load_sft_records(p)
    assert "not UTF-8" in _one_line_error(e)


def test_malformed_line_names_file_and_line(tmp_path):
    good = json.dumps({"prompt": "a", "response": "b"})
    p = _write(tmp_path, "m.jsonl", f"{good}\n{good}\n{{not json\n")
    with pytest.raises(UserError) as e:
        load_sft_records(p)
    msg = _one_line_error(e)
    assert f"{p}:3" in msg and "not valid JSON" in msg
    p = _write(tmp_path, "l.jsonl", f"{good}\n[1, 2]\n")
    with pytest.raises(UserError) as e:
        load_sft_records(p)
    assert f"{p}:2" in _one_line_error(e)


@pytest.mark.parametrize(
    "obj, needle",
    [
        ({"response": "b"}, "no 'prompt' field"),
        ({"prompt": "a"}, "no 'response' field"),
        ({"prompt": "", "response": "b"}, "'prompt' must be a non-empty string"),
        ({"prompt": "a", "response": 3}, "'response' must be a non-empty string"),
        ({"prompt": "a", "response": "b", "thinking": 7}, "'thinking' must be a non-empty string"),
        ({"prompt": "a", "response": "x </answer> y"}, "format tag"),
        ({"prompt": "a", "response": "b", "thinking": "<think> hm"}, "format tag"),
    ],
)
def test_missing_or_bad_fields(tmp_path, obj, needle):
    p = _write(tmp_path, "f.jsonl", json.dumps(obj) + "\n")
    with pytest.raises(UserError) as e:
        load_sft_records(p)
    msg = _one_line_error(e)
    assert needle in msg and f"{p}:1" in msg


# --- samples -----------------------------------------------------------------------------------------------------


def test_token_layout(tok):
    recs = load_sft_records()[:6]
    samples = build_sft_samples(recs, tok)
    prefix_ids = tok(ASSISTANT_THINKING_PREFIX, add_special_tokens=False).input_ids
    for rec, s in zip(recs, samples):
        assert isinstance(s, Sample)
        assert s.role == "defender" and s.vllm_logprobs is None and s.metadata == {"sft": True}
        prompt_text = build_defender_prompt(tok, rec["prompt"], cot=True)
        assert s.prompt_ids == tok(prompt_text, add_special_tokens=False).input_ids
        assert s.prompt_ids[-len(prefix_ids):] == prefix_ids
        assert tok.decode(s.prompt_ids).endswith(ASSISTANT_THINKING_PREFIX)
        assert s.response_ids[-1] == tok.eos_token_id
        assert tok.eos_token_id not in s.response_ids[:-1]
        target = format_sft_target(rec["thinking"], rec["response"])
        assert s.response_ids[:-1] == tok(target, add_special_tokens=False).input_ids
        assert tok.decode(s.response_ids[:-1]) == target
        assert tok.decode(s.prompt_ids + s.response_ids[:-1]).endswith(
            f"<think> {rec['thinking']} </think>\n<answer> {rec['response']} </answer>")


def test_samples_pack(tok):
    from fast_srt.learner.batch import pack

    samples = build_sft_samples(load_sft_records()[:3], tok)
    batch = pack(samples)
    assert int(batch.loss_mask.sum()) == sum(len(s.response_ids) for s in samples)


# --- stream ------------------------------------------------------------------------------------------------------


def _fake(n):
    return [Sample(prompt_ids=[1], response_ids=[i + 2], role="defender", metadata={"sft": True}) for i in range(n)]


def _ids(samples):
    return [s.response_ids[0] for s in samples]


def test_stream_deterministic_and_cycles():
    data = _fake(7)
    a, b = SFTStream(data, seed=3), SFTStream(data, seed=3)
    seq_a = [_ids(a.next(k)) for k in (3, 5, 0, 9, 4)]
    seq_b = [_ids(b.next(k)) for k in (3, 5, 0, 9, 4)]
    assert seq_a == seq_b
    flat = [x for chunk in seq_a for x in chunk]  # 21 = three full passes
    assert len(flat) == 21
    passes = [flat[i:i + 7] for i in range(0, 21, 7)]
    for p in passes:
        assert sorted(p) == list(range(2, 9))  # each pass is a permutation of all samples
    assert len({tuple(p) for p in passes}) > 1  # reshuffled between passes
    # chunking does not matter: same seed, one call
    assert _ids(SFTStream(data, seed=3).next(21)) == flat
    assert _ids(SFTStream(data, seed=4).next(21)) != flat


def test_stream_errors():
    with pytest.raises(UserError):
        SFTStream([], seed=0)
    with pytest.raises(ValueError):
        SFTStream(_fake(2)).next(-1)
