"""Auxiliary SFT data (docs/game.md §4, "PTX-SFT"): records, CoT targets, defender samples, a deterministic stream.

Pure Python apart from the tokenizer passed in. Every bad input raises `UserError` with one line naming the file
(and line) and what to do.

- `load_sft_records("builtin")`: the shipped set `fast_srt/data/sft/cot_sft.jsonl` (written for this project;
  see its README); any other argument is a user JSONL file, one object a line with string fields "prompt" and
  "response" and an optional "thinking".
- `format_sft_target(thinking, response)`: the text generated after the think prefix,
  `"{thinking} </think>\\n<answer> {response} </answer>"`. The prompt already ends with
  `ASSISTANT_THINKING_PREFIX`, so prompt tail + target is the target of docs/game.md §4
  `Let's think step by step.\\n<think> {thinking} </think>\\n<answer> {response} </answer>`.
- `build_sft_samples(records, tokenizer)`: defender-role `Sample`s (prompt = defender CoT prompt, response =
  target tokens + EOS, no sampler log-probs, metadata {"sft": True}).
- `load_attacker_sft_records("builtin")`: the shipped attacker set `fast_srt/data/sft/attacker_cot_sft.jsonl`
  (or a user JSONL of "seed", "kind" ("harmful"|"benign"), "thinking", "revision"; see the data README).
- `build_attacker_sft_samples(records, tokenizer)`: attacker-role `Sample`s (prompt = the game's attacker CoT
  prompt for the seed and its kind, response = `format_sft_target(thinking, revision)` tokens + EOS).
- `SFTStream(samples, seed).next(k)`: k samples at a time, cycling through shuffled passes, deterministic.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from fast_srt.learner.batch import Sample
from fast_srt.errors import UserError, decode_utf8, read_user_text
from fast_srt.game.rules import FORMAT_TAGS, build_attacker_prompt, build_defender_prompt

BUILTIN_SFT_SET = "builtin"
BUILTIN_SFT_FILE = "cot_sft.jsonl"
BUILTIN_ATTACKER_SFT_FILE = "attacker_cot_sft.jsonl"
ATTACKER_KINDS = ("harmful", "benign")
DEFAULT_THINKING = (
    "The user is asking for help with this request. I should think about what they need and answer helpfully and "
    "safely."
)


def _read_user_file(path: Path) -> str:
    return read_user_text(path, "SFT file", f"an existing .jsonl file (one object a line) or {BUILTIN_SFT_SET!r}")


def _check_text(obj: dict, field: str, where: str, required: bool) -> str | None:
    value = obj.get(field)
    if value is None:
        if required:
            raise UserError(f'{where}: no {field!r} field; each line needs {{"prompt": "...", "response": "..."}} '
                            f'(and optionally "thinking")')
        return None
    if not isinstance(value, str) or not value.strip():
        if not required and isinstance(value, str):
            return None  # blank optional thinking: use the default
        raise UserError(f"{where}: {field!r} must be a non-empty string")
    if field != "prompt":
        _refuse_format_tags(value, field, where)
    return value.strip()


def _refuse_format_tags(value: str, field: str, where: str) -> None:
    """A target text must not carry the <think>/<answer> tags: the target adds them itself."""
    tags = [t for t in FORMAT_TAGS if t in value]
    if tags:
        raise UserError(f"{where}: {field!r} contains the format tag {tags[0]}; remove it (the target "
                        f"adds the <think>/<answer> tags itself)")


def _json_object(line: str, where: str, example: str) -> dict | None:
    """One JSONL line as a JSON object (None for a blank line); anything else is one UserError line."""
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}); write one object a line, e.g. {example}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object like {example}, got {type(obj).__name__}")
    return obj


def parse_sft_line(line: str, where: str) -> dict[str, Any] | None:
    """One JSONL line -> {"prompt", "thinking", "response"} (+ "kind" if given), or None for a blank line."""
    obj = _json_object(line, where, '{"prompt": "...", "response": "..."}')
    if obj is None:
        return None
    rec: dict[str, Any] = {
        "prompt": _check_text(obj, "prompt", where, required=True),
        "thinking": _check_text(obj, "thinking", where, required=False) or DEFAULT_THINKING,
        "response": _check_text(obj, "response", where, required=True),
    }
    if "kind" in obj:
        rec["kind"] = obj["kind"]
    return rec


def _parse_text(text: str, name: str) -> list[dict[str, Any]]:
    records = []
    for i, line in enumerate(text.splitlines(), start=1):
        rec = parse_sft_line(line, f"{name}:{i}")
        if rec is not None:
            records.append(rec)
    return records


def load_sft_records(name_or_path: str | Path = BUILTIN_SFT_SET) -> list[dict[str, Any]]:
    """SFT records from the builtin set or a user JSONL file. Each record has non-empty "prompt", "thinking"
    (a generic line when the file has none) and "response" strings. Raises only UserError for bad input."""
    if isinstance(name_or_path, str) and name_or_path == BUILTIN_SFT_SET:
        f = resources.files("fast_srt.data").joinpath("sft", BUILTIN_SFT_FILE)
        return _parse_text(decode_utf8(f.read_bytes(), BUILTIN_SFT_FILE), BUILTIN_SFT_FILE)
    path = Path(name_or_path)
    text = _read_user_file(path)
    records = _parse_text(text, str(path))
    if not records:
        raise UserError(f'SFT file {str(path)!r} holds no records; add one {{"prompt": "...", "response": "..."}} '
                        f"object a line")
    return records


def format_sft_target(thinking: str | None, response: str) -> str:
    """The assistant text after the think prefix: `{thinking} </think>\\n<answer> {response} </answer>`."""
    thinking = (thinking or "").strip() or DEFAULT_THINKING
    return f"{thinking} </think>\n<answer> {response.strip()} </answer>"


def _attacker_example() -> str:
    return '{"seed": "...", "kind": "harmful", "thinking": "...", "revision": "..."}'


def parse_attacker_sft_line(line: str, where: str) -> dict[str, Any] | None:
    """One attacker JSONL line -> {"seed", "kind", "thinking", "revision"}, or None for a blank line."""
    obj = _json_object(line, where, _attacker_example())
    if obj is None:
        return None
    rec: dict[str, Any] = {}
    for field in ("seed", "thinking", "revision"):
        value = obj.get(field)
        if value is None:
            raise UserError(f"{where}: no {field!r} field; each line needs {_attacker_example()}")
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{where}: {field!r} must be a non-empty string")
        if field != "seed":
            _refuse_format_tags(value, field, where)
        rec[field] = value.strip()
    kind = obj.get("kind")
    if kind not in ATTACKER_KINDS:
        raise UserError(f"{where}: 'kind' must be \"harmful\" or \"benign\" (which attacker instruction the seed "
                        f"gets), got {kind!r}")
    rec["kind"] = kind
    return rec


def load_attacker_sft_records(name_or_path: str | Path = BUILTIN_SFT_SET) -> list[dict[str, Any]]:
    """Attacker CoT SFT records (seed, kind, thinking, revision) from the builtin set or a user JSONL file.
    Raises only UserError for bad input."""
    if isinstance(name_or_path, str) and name_or_path == BUILTIN_SFT_SET:
        f = resources.files("fast_srt.data").joinpath("sft", BUILTIN_ATTACKER_SFT_FILE)
        text, name = decode_utf8(f.read_bytes(), BUILTIN_ATTACKER_SFT_FILE), BUILTIN_ATTACKER_SFT_FILE
    else:
        path = Path(name_or_path)
        text = read_user_text(path, "attacker SFT file",
                              f"an existing .jsonl file (one object a line) or {BUILTIN_SFT_SET!r}")
        name = str(path)
    records = []
    for i, line in enumerate(text.splitlines(), start=1):
        rec = parse_attacker_sft_line(line, f"{name}:{i}")
        if rec is not None:
            records.append(rec)
    if not records:
        raise UserError(f"attacker SFT file {name!r} holds no records; add one {_attacker_example()} object a line")
    return records


def _eos(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos token; SFT targets "
                        f"need one to teach the model to stop")
    return eos


def build_attacker_sft_samples(records: Sequence[dict[str, Any]], tokenizer: Any) -> list[Sample]:
    """Attacker-role samples: prompt = the game's attacker CoT prompt for the seed (the harmful or benign
    instruction by "kind"; ends with the think prefix), response = `format_sft_target(thinking, revision)` tokens
    + EOS. Loss falls on response tokens only (batch.py's mask)."""
    eos = _eos(tokenizer)
    samples = []
    for rec in records:
        prompt_text = build_attacker_prompt(tokenizer, rec["seed"], harmful=rec["kind"] == "harmful", cot=True)
        prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False).input_ids)
        target = format_sft_target(rec["thinking"], rec["revision"])
        response_ids = list(tokenizer(target, add_special_tokens=False).input_ids) + [eos]
        samples.append(Sample(prompt_ids=prompt_ids, response_ids=response_ids, role="attacker",
                              vllm_logprobs=None, metadata={"sft": True}))
    return samples


def build_sft_samples(records: Sequence[dict[str, Any]], tokenizer: Any) -> list[Sample]:
    """Defender-role samples: prompt = the defender CoT prompt (ends with the think prefix), response = the
    target tokens + EOS. Loss falls on response tokens only (batch.py's mask)."""
    eos = _eos(tokenizer)
    samples = []
    for rec in records:
        prompt_text = build_defender_prompt(tokenizer, rec["prompt"], cot=True)
        prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False).input_ids)
        target = format_sft_target(rec.get("thinking"), rec["response"])
        response_ids = list(tokenizer(target, add_special_tokens=False).input_ids) + [eos]
        samples.append(Sample(prompt_ids=prompt_ids, response_ids=response_ids, role="defender",
                              vllm_logprobs=None, metadata={"sft": True}))
    return samples


class SFTStream:
    """Endless deterministic supply of SFT samples: shuffled passes over `samples`, a fresh order per pass from
    `random.Random(seed)`. `next(k)` may span a pass boundary. Same samples + seed -> same sequence."""

    def __init__(self, samples: Sequence[Sample], seed: int = 0):
        if not samples:
            raise UserError("SFT data holds no samples; pass a non-empty SFT file or disable the SFT loss")
        self._samples = list(samples)
        self._rng = random.Random(seed)
        self._order: list[int] = []
        self._pos = 0
        self.passes = 0  # completed-or-started shuffled passes

    def _refill(self) -> None:
        self._order = list(range(len(self._samples)))
        self._rng.shuffle(self._order)
        self._pos = 0
        self.passes += 1

    def next(self, k: int) -> list[Sample]:
        if k < 0:
            raise ValueError(f"SFTStream.next needs k >= 0, got {k}")
        out = []
        for _ in range(k):
            if self._pos >= len(self._order):
                self._refill()
            out.append(self._samples[self._order[self._pos]])
            self._pos += 1
        return out

    def __len__(self) -> int:
        return len(self._samples)

    def state_dict(self) -> dict:
        """Where the stream is (checkpointed, so a resumed run continues the same sequence)."""
        version, internal, gauss = self._rng.getstate()
        return {"rng": [version, list(internal), gauss], "order": list(self._order), "pos": self._pos,
                "passes": self.passes, "n": len(self._samples)}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != len(self._samples):
            raise UserError(f"the SFT data holds {len(self._samples)} samples but the checkpoint's stream was over "
                            f"{state['n']}: resume with the SFT data the run started with")
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._order, self._pos, self.passes = list(state["order"]), int(state["pos"]), int(state["passes"])
