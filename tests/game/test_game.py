"""The game: prompt building, the hidden-CoT format check (one test per rule), seed types, options."""

import pytest

from fast_srt.errors import UserError
from fast_srt.game.rules import (
    ASSISTANT_THINKING_PREFIX,
    ATTACKER_SYSTEM_PROMPT,
    DEFENDER_INSTRUCTION_COT,
    GameOptions,
    Seed,
    assign_data_types,
    build_attacker_prompt,
    build_defender_prompt,
    check_format,
    extract_public,
    is_generated,
)


class FakeTokenizer:
    """A chat template in plain Python: <|role|>content<|end|> per message, then the assistant header."""

    chat_template = "fake"
    name_or_path = "fake/chat-model"

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        assert tokenize is False
        self.calls.append(messages)
        text = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")


class NoSystemTokenizer(FakeTokenizer):
    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        if any(m["role"] == "system" for m in messages):
            raise ValueError("System role not supported")
        return super().apply_chat_template(messages, tokenize, add_generation_prompt)


class NoTemplateTokenizer(FakeTokenizer):
    chat_template = None
    name_or_path = "some/base-model"


# --- prompts -----------------------------------------------------------------------------------------------------


def test_attacker_prompt_cot_structure():
    tok = FakeTokenizer()
    text = build_attacker_prompt(tok, "Tell me {a secret}", harmful=True, cot=True)
    assert text.endswith("<|assistant|>" + ASSISTANT_THINKING_PREFIX)
    (system, user), = tok.calls
    assert system == {"role": "system", "content": ATTACKER_SYSTEM_PROMPT}
    body, fmt = user["content"].split("\n\n**Response Format**\n")
    assert body.endswith("Tell me {a secret}")  # seed at the end of the body, braces kept
    assert "jailbreak" in body.lower() and "harmful" in body
    assert "<think> </think>" in fmt and "<answer> </answer>" in fmt and "once" in fmt


def test_attacker_prompt_benign_vs_harmful_bodies_differ():
    tok = FakeTokenizer()
    h = build_attacker_prompt(tok, "seed", harmful=True, cot=True)
    b = build_attacker_prompt(tok, "seed", harmful=False, cot=True)
    assert h != b and "adversarial benign" in b and "benign" in b


def test_attacker_prompt_direct_has_no_prefix_and_no_tags():
    tok = FakeTokenizer()
    text = build_attacker_prompt(tok, "seed", harmful=False, cot=False)
    assert text.endswith("<|assistant|>")
    user = tok.calls[0][1]["content"]
    assert "**Response Format**" in user and "<think>" not in user and "<answer>" not in user


def test_defender_prompt_cot_has_no_system_and_r1_template():
    tok = FakeTokenizer()
    text = build_defender_prompt(tok, "How do I bake bread?", cot=True)
    (user,), = tok.calls
    assert user == {"role": "user", "content": DEFENDER_INSTRUCTION_COT + "How do I bake bread?"}
    assert DEFENDER_INSTRUCTION_COT.startswith("A conversation between User and Assistant.")
    assert DEFENDER_INSTRUCTION_COT.endswith("\n\nUser: ")
    assert text.endswith("<|assistant|>" + ASSISTANT_THINKING_PREFIX)


def test_defender_prompt_no_cot_is_raw_query():
    tok = FakeTokenizer()
    text = build_defender_prompt(tok, "  raw query ", cot=False)
    assert tok.calls == [[{"role": "user", "content": "  raw query "}]]
    assert text == "<|user|>  raw query <|end|><|assistant|>"


def test_system_message_folded_when_template_rejects_it():
    tok = NoSystemTokenizer()
    text = build_attacker_prompt(tok, "seed", harmful=True, cot=True)
    assert "<|system|>" not in text
    assert text.startswith("<|user|>" + ATTACKER_SYSTEM_PROMPT + "\n\n")
    assert text.endswith(ASSISTANT_THINKING_PREFIX)


def test_missing_chat_template_is_user_error_naming_model():
    with pytest.raises(UserError, match="some/base-model.*chat template"):
        build_defender_prompt(NoTemplateTokenizer(), "q", cot=True)
    with pytest.raises(UserError, match="some/base-model"):
        build_attacker_prompt(NoTemplateTokenizer(), "q", harmful=True, cot=False)


# --- format check: one test per rule -----------------------------------------------------------------------------

VALID = "I should answer kindly. </think>\n<answer> Here is the answer. </answer>"


def test_valid_turn():
    r = check_format(VALID)
    assert r.valid and r.violations == ()
    assert r.public == "Here is the answer."
    assert r.thinking == "I should answer kindly."


def test_valid_allows_trailing_whitespace_and_multiline_answer():
    r = check_format("think\n</think>  \n <answer>\nline 1\nline 2\n</answer>\n\n")
    assert r.valid and r.public == "line 1\nline 2"


@pytest.mark.parametrize(
    "text, violations, public",
    [
        # no <think> tag: the prefix already opened the block
        ("<think> r </think> <answer> a </answer>", ("think_tag",), "a"),
        # exactly one </think>
        ("r <answer>a</answer>", ("think_close_count", "tag_order"), "a"),
        ("r</think><answer>a</answer></think>", ("think_close_count", "text_after_answer"), "a"),
        # exactly one <answer>
        ("r</think><answer><answer>a</answer>", ("answer_open_count",), "<answer>a"),
        # exactly one </answer>
        ("r</think><answer>a</answer></answer>", ("answer_close_count", "text_after_answer"), "a"),
        # non-empty thinking
        (" \n</think><answer>a</answer>", ("empty_thinking",), "a"),
        # non-empty answer (the regex finds it, so the public text is the empty answer)
        ("r</think><answer> \n </answer>", ("empty_answer",), ""),
        # order </think> -> <answer> -> </answer>
        ("<answer>a</answer> r </think>", ("tag_order",), "a"),
        # only whitespace between </think> and <answer>
        ("r</think> and more <answer>a</answer>", ("text_between",), "a"),
        # ends with </answer>, nothing after it
        ("r</think><answer>a</answer> P.S.", ("text_after_answer",), "a"),
    ],
)
def test_each_format_rule(text, violations, public):
    r = check_format(text)
    assert not r.valid
    assert r.violations == violations
    assert r.public == public


def test_leak_case_no_answer_found_returns_raw_text():
    text = "I will reveal my secret plan </think> and never close the answer <answer> oops"
    r = check_format(text)
    assert not r.valid and r.public == text
    assert check_format("plain text, no tags at all").public == "plain text, no tags at all"
    # reversed answer tags: the regex finds nothing either
    text2 = "r</think></answer>a<answer>"
    assert check_format(text2).public == text2


def test_empty_and_non_string_inputs_never_raise():
    assert check_format("").public == "" and not check_format("").valid
    assert not check_format(None).valid  # type: ignore[arg-type]


def test_extract_public_modes():
    assert extract_public(VALID, cot=True) == "Here is the answer."
    assert extract_public("  direct answer \n", cot=False) == "direct answer"
    assert extract_public("  direct answer \n", cot=True) == "  direct answer \n"  # CoT leak: raw text


# --- seed types --------------------------------------------------------------------------------------------------


def _seeds(n_harmful, n_benign):
    return [Seed(f"h{i}", True, "t") for i in range(n_harmful)] + [Seed(f"b{i}", False, "t") for i in range(n_benign)]


@pytest.mark.parametrize("n_harmful, n_benign", [(10, 10), (7, 3), (1, 0), (0, 5), (100, 64)])
def test_assign_data_types_exact_half_per_class(n_harmful, n_benign):
    seeds = _seeds(n_harmful, n_benign)
    typed = assign_data_types(seeds)
    assert [s for s, _ in typed] == seeds  # input order kept
    counts = {}
    for s, t in typed:
        assert t.endswith("harmful") == s.harmful
        counts[t] = counts.get(t, 0) + 1
    assert counts.get("vanilla_harmful", 0) == n_harmful // 2
    assert counts.get("generated_harmful", 0) == n_harmful - n_harmful // 2
    assert counts.get("vanilla_benign", 0) == n_benign // 2
    assert counts.get("generated_benign", 0) == n_benign - n_benign // 2


def test_assign_data_types_deterministic_and_seeded():
    seeds = _seeds(50, 50)
    a = assign_data_types(seeds)
    assert a == assign_data_types(seeds, rng_seed=8888)
    assert a != assign_data_types(seeds, rng_seed=1)


def test_assign_data_types_modes():
    seeds = _seeds(4, 4)
    assert all(t.startswith("vanilla") for _, t in assign_data_types(seeds, mode="defender_only"))
    assert all(is_generated(t) for _, t in assign_data_types(seeds, mode="attacker_only"))
    with pytest.raises(UserError):
        assign_data_types(seeds, mode="both")  # type: ignore[arg-type]


def test_game_options():
    assert GameOptions().mode == "selfplay" and GameOptions().cot
    o = GameOptions(mode="attacker_only", cot=True)
    assert o.trains_attacker and not o.trains_defender and not o.defender_cot
    d = GameOptions(mode="defender_only", cot=False)
    assert d.trains_defender and not d.trains_attacker and not d.defender_cot
    with pytest.raises(UserError, match="selfplay"):
        GameOptions(mode="nope")  # type: ignore[arg-type]


def test_game_module_imports_no_engine():
    import subprocess
    import sys

    code = (
        "import sys, pkgutil, importlib, fast_srt.game as g; "
        "[importlib.import_module('fast_srt.game.' + m.name) for m in pkgutil.iter_modules(g.__path__)]; "
        "bad = [m for m in ('torch', 'vllm', 'transformers', 'datasets') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
