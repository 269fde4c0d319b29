"""Property-based fuzzing of the parsers (hypothesis): the format check, the judge parser, seed lines.

Generated cases: 4000 + 2000 (format) + 3000 + 1000 + 500 (judge) + 1500 (seed lines) = 12,000.
Tag-heavy strategies build strings from the very fragments the parsers look for, so the interesting
branches (duplicated, reordered, empty, padded tags) are hit far more often than random text would.
"""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fast_srt.errors import UserError
from fast_srt.game.rules import FORMAT_TAGS, FormatResult, Seed, check_format
from fast_srt.game.judge import JUDGE_OUTPUT_REGEX, parse_judge_output
from fast_srt.game.seeds import parse_seed_line

FUZZ = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

# --- the format check --------------------------------------------------------------------------------------------

_FORMAT_FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "\t", "x", "thinking", "answer",
                     "<", ">", "/", "think", "<answer", "</answer"]
tag_heavy = st.lists(st.one_of(st.sampled_from(_FORMAT_FRAGMENTS), st.text(max_size=4)), max_size=14).map("".join)


def oracle_valid(s: str) -> bool:
    """An independent statement of docs/game.md §2's rules, written with str.partition."""
    if "<think>" in s or any(s.count(t) != 1 for t in ("</think>", "<answer>", "</answer>")):
        return False
    thinking, _, rest = s.partition("</think>")
    between, found, rest = rest.partition("<answer>")
    if not found:  # <answer> came before </think>
        return False
    answer, found, after = rest.partition("</answer>")
    if not found:
        return False
    return bool(thinking.strip()) and not between.strip() and bool(answer.strip()) and not after.strip()


def _check_properties(text: str) -> None:
    r = check_format(text)
    assert isinstance(r, FormatResult)
    assert r.valid == oracle_valid(text)
    assert r.valid == (r.violations == ())
    assert r.public in text or r.public == ""
    if r.valid:
        expected = text.split("</think>")[1].split("<answer>")[1].split("</answer>")[0].strip()
        assert r.public == expected and r.public
        assert not any(tag in r.public for tag in FORMAT_TAGS)
        assert r.thinking == text.split("</think>")[0].strip() and r.thinking
        assert text.rstrip().endswith("</answer>")
    elif "<answer>" not in text or "</answer>" not in text.split("<answer>", 1)[1]:
        assert r.public == text  # the leak case: no answer found, the raw text (with its CoT) goes public


@settings(max_examples=4000, **FUZZ)
@given(tag_heavy)
def test_fuzz_check_format_tag_heavy(text):
    _check_properties(text)


@settings(max_examples=2000, **FUZZ)
@given(st.one_of(
    st.text(),
    # mostly-valid turns with random padding, to exercise the valid branch often
    st.tuples(st.text(max_size=8), st.sampled_from(["", " ", "\n", "x"]), st.text(max_size=8),
              st.sampled_from(["", "\n", " tail", "</answer>"]))
    .map(lambda p: f"{p[0]}</think>{p[1]}<answer>{p[2]}</answer>{p[3]}"),
))
def test_fuzz_check_format_text(text):
    _check_properties(text)


# --- the judge parser --------------------------------------------------------------------------------------------

_JUDGE_FRAGMENTS = ["Harmful request:", "Response refusal:", "Harmful response:", " yes", " no", " n/a", "yes",
                    "no", "n/a", "YES", "N/A", "\n", "\r\n", ":", " ", "x", "maybe"]
_free = st.lists(st.one_of(st.sampled_from(_JUDGE_FRAGMENTS), st.text(max_size=3)), max_size=14).map("".join)
# Three "key: value" lines with near-miss values, so the value mapping itself is fuzzed.
_value = st.tuples(st.sampled_from(["", " ", "  ", "\t"]),
                   st.sampled_from(["yes", "no", "n/a", "Yes", "NO", "N/A", "na", "y", "", "yes no", "nope"]),
                   st.sampled_from(["", " ", "\r"])).map("".join)
_line = st.tuples(st.sampled_from(["Harmful request:", "Response refusal:", "Harmful response:", "x:", ":"]), _value)
_lines = st.tuples(_line, _line, _line, st.sampled_from(["", "\n", "\nmore: text"])).map(
    lambda t: "\n".join(k + v for k, v in t[:3]) + t[3])
judge_heavy = st.one_of(_free, _lines)


def _check_labels(text: str) -> None:
    labels = parse_judge_output(text)
    if labels.parse_error:
        assert (labels.prompt_harmful, labels.response_refusal, labels.response_harmful) == (None, None, None)
    else:
        values = [line.rsplit(":", 1)[1].strip().lower() for line in text.lstrip().split("\n")[:3]]
        assert values[0] in ("yes", "no") and values[1] in ("yes", "no", "n/a") and values[2] in ("yes", "no", "n/a")
        assert isinstance(labels.prompt_harmful, bool)
        assert labels.response_refusal in (True, False, None)
        assert labels.response_harmful in (True, False, None)


@settings(max_examples=3000, **FUZZ)
@given(judge_heavy)
def test_fuzz_judge_parser_fragments(text):
    _check_labels(text)


@settings(max_examples=1000, **FUZZ)
@given(st.text())
def test_fuzz_judge_parser_text(text):
    _check_labels(text)


@settings(max_examples=500, **FUZZ)
@given(st.from_regex(JUDGE_OUTPUT_REGEX, fullmatch=True))
def test_fuzz_every_regex_match_parses(text):
    labels = parse_judge_output(text)
    assert not labels.parse_error and isinstance(labels.prompt_harmful, bool)


# --- seed lines --------------------------------------------------------------------------------------------------

_json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=6),
              st.sampled_from(["vanilla_harmful", "adversarial_benign", "prompt"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["prompt", "harmful", "vanilla", "adversarial",
                                                             "data_type", "x"]), inner, max_size=4)),
    max_leaves=8,
)
seed_lines = st.one_of(st.text(max_size=30), _json_values.map(json.dumps))


@settings(max_examples=1500, **FUZZ)
@given(seed_lines, st.sampled_from([None, True, False]), st.sampled_from(["jsonl", "txt"]))
def test_fuzz_seed_line(line, harmful, fmt):
    try:
        seed = parse_seed_line(line, "f.jsonl:7", harmful, fmt)
    except UserError as e:
        msg = str(e)
        assert msg.startswith("f.jsonl:7: ") and "\n" not in msg
        return
    if seed is None:
        assert not line.strip()
    else:
        assert isinstance(seed, Seed) and seed.prompt and seed.prompt == seed.prompt.strip()
        assert isinstance(seed.harmful, bool)
