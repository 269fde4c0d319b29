"""Seed requests: the shipped sets, user files, WildJailbreak, jailbreak templates, 50/50 batches.

Pure Python. Every bad input raises `UserError` with one line naming the file (and line) and what to do.

Sources:
- builtin `"donotanswer"`: 939 harmful requests (Do-Not-Answer, Apache-2.0), `fast_srt/data/seeds/donotanswer/`;
- builtin `"benign"`: benign requests written for this project (everyday ones, and harmless ones that sound
  alarming), `fast_srt/data/seeds/benign/benign_seeds.jsonl`;
- user `.jsonl`: one object a line, `{"prompt": str, "harmful": bool}` or the WildJailbreak schema
  `{"vanilla", "adversarial", "completion", "data_type"}`; user `.txt`: one prompt a line, label from the caller;
- `load_wildjailbreak`: `allenai/wildjailbreak` (or a local file in its schema) through `datasets`.
Provenance and licences: `fast_srt/data/seeds/PROVENANCE.md`.

Held-out split (for `fast-srt eval`): each builtin set is split once, by a fixed rule that depends only on the
prompt's own text: a prompt is held out when the first 8 bytes of sha256(normalised text), read as a big-endian
integer, fall below `HELDOUT_FRACTION[set] * 2**64` (normalised: lower-cased, whitespace runs collapsed to one
space, stripped). That is about 10% of Do-Not-Answer and 20% of the smaller benign set. Training never sees the
held-out part: `load_seeds(name)` returns the rest; `load_heldout(name)` returns the held-out part. Duplicates
fall on the same side; user files are never split.
"""

from __future__ import annotations

import hashlib
import json
import random
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

from fast_srt.errors import UserError, decode_utf8, read_user_text
from fast_srt.game.rules import DataType, Seed, assign_data_types

BUILTIN_SEED_SETS = ("donotanswer", "benign")
HELDOUT_FRACTION = {"donotanswer": 0.10, "benign": 0.20}
WILDJAILBREAK_TYPES = ("vanilla_harmful", "vanilla_benign", "adversarial_harmful", "adversarial_benign")
REQUEST_SLOT = "[INSERT PROMPT HERE]"
MODEL_NAME_SLOT = "{generator.name}"

T = TypeVar("T")


def _data_dir() -> Any:
    return resources.files("fast_srt.data").joinpath("seeds")


def _read_text(path: Path) -> str:
    return read_user_text(path, "seed file", f"an existing .jsonl/.txt file or a builtin set "
                                              f"({', '.join(BUILTIN_SEED_SETS)})")


def _check_prompt(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: {field!r} must be a non-empty string")
    return value.strip()


def _wildjailbreak_seed(obj: dict, where: str, source: str) -> Seed:
    data_type = obj.get("data_type")
    if data_type not in WILDJAILBREAK_TYPES:
        raise UserError(f"{where}: 'data_type' must be one of {', '.join(WILDJAILBREAK_TYPES)}, got {data_type!r}")
    field = "vanilla" if data_type.startswith("vanilla") else "adversarial"
    prompt = _check_prompt(obj.get(field), where, field)
    return Seed(prompt=prompt, harmful=data_type.endswith("_harmful"), source=f"{source}:{data_type}")


def parse_seed_line(
    line: str, where: str, harmful: bool | None = None, fmt: Literal["jsonl", "txt"] = "jsonl", source: str = ""
) -> Seed | None:
    """One seed from one line (None for a blank line). `where` is "file:line", used in error messages.

    JSONL: `{"prompt", "harmful"}` (a missing "harmful" falls back to the `harmful` argument) or the
    WildJailbreak schema. TXT: the stripped line, labelled `harmful`. Raises only UserError.
    """
    text = line.strip()
    if not text:
        return None
    if fmt == "txt":
        if harmful is None:
            raise UserError(f"{where}: a .txt seed file carries no labels; pass harmful=True or harmful=False")
        return Seed(prompt=text, harmful=bool(harmful), source=source)
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        msg = getattr(e, "msg", type(e).__name__)
        raise UserError(f'{where}: not valid JSON ({msg}); write one object a line, e.g. {{"prompt": "...", '
                        f'"harmful": true}}') from None
    if not isinstance(obj, dict):
        raise UserError(f'{where}: expected a JSON object like {{"prompt": "...", "harmful": true}}, '
                        f"got {type(obj).__name__}")
    if "prompt" in obj:
        prompt = _check_prompt(obj["prompt"], where, "prompt")
        label = obj.get("harmful", harmful)
        if label is None:
            raise UserError(f"{where}: no 'harmful' field; add \"harmful\": true/false or pass harmful=...")
        if not isinstance(label, bool):
            raise UserError(f"{where}: 'harmful' must be true or false, got {label!r}")
        return Seed(prompt=prompt, harmful=label, source=source)
    if "data_type" in obj or "vanilla" in obj:
        return _wildjailbreak_seed(obj, where, source)
    raise UserError(f"{where}: no 'prompt' field (nor WildJailbreak's 'vanilla'/'adversarial'/'data_type')")


def _parse_text(text: str, name: str, harmful: bool | None, fmt: Literal["jsonl", "txt"], source: str) -> list[Seed]:
    if fmt == "txt" and harmful is None:
        raise UserError(f"{name}: a .txt seed file carries no labels; pass harmful=True or harmful=False")
    seeds = []
    for i, line in enumerate(text.splitlines(), start=1):
        seed = parse_seed_line(line, f"{name}:{i}", harmful, fmt, source)
        if seed is not None:
            seeds.append(seed)
    return seeds


def _load_builtin(name: str) -> list[Seed]:
    base = _data_dir()
    if name == "benign":
        files = [base.joinpath("benign", "benign_seeds.jsonl")]
        default: bool | None = False
    else:
        files = sorted((f for f in base.joinpath("donotanswer").iterdir() if f.name.endswith(".jsonl")),
                       key=lambda f: f.name)
        default = True
    seeds: list[Seed] = []
    for f in files:
        area = f.name.removesuffix(".jsonl")
        seeds += _parse_text(decode_utf8(f.read_bytes(), f.name), f.name, default, "jsonl", f"{name}/{area}")
    return seeds


def normalise_prompt(text: str) -> str:
    """Lower-cased, whitespace runs collapsed to one space, stripped: the text the held-out rule hashes."""
    return " ".join(text.lower().split())


def prompt_hash(text: str) -> int:
    """The first 8 bytes of sha256(normalised text) as a big-endian integer in [0, 2**64)."""
    return int.from_bytes(hashlib.sha256(normalise_prompt(text).encode("utf-8")).digest()[:8], "big")


def is_heldout(prompt: str, fraction: float) -> bool:
    """Whether a prompt belongs to the held-out part of a set split at `fraction` (module docstring)."""
    return prompt_hash(prompt) < int(fraction * 2**64)


def _builtin_name(name: str) -> str:
    if name not in BUILTIN_SEED_SETS:
        raise UserError(f"no builtin seed set named {name!r}; builtin sets: {', '.join(BUILTIN_SEED_SETS)}")
    return name


def load_heldout(name: str) -> list[Seed]:
    """The held-out part of a builtin set (module docstring): never a training seed, used by `fast-srt eval`."""
    fraction = HELDOUT_FRACTION[_builtin_name(name)]
    return [s for s in _load_builtin(name) if is_heldout(s.prompt, fraction)]


def load_seeds(path_or_name: str | Path, harmful: bool | None = None) -> list[Seed]:
    """Seeds from a builtin set name (its training part: the held-out part is left out) or a user .jsonl/.txt
    file. `harmful` labels .txt lines (required there) and JSONL lines without a "harmful" field."""
    if isinstance(path_or_name, str) and path_or_name in BUILTIN_SEED_SETS:
        fraction = HELDOUT_FRACTION[path_or_name]
        return [s for s in _load_builtin(path_or_name) if not is_heldout(s.prompt, fraction)]
    path = Path(path_or_name)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".txt"):
        if not path.exists():
            raise UserError(
                f"no seed file or builtin set named {str(path_or_name)!r}; pass a .jsonl/.txt file or one of "
                f"{', '.join(BUILTIN_SEED_SETS)}"
            )
        raise UserError(f"seed file {str(path)!r} must end in .jsonl or .txt (one prompt a line)")
    text = _read_text(path)
    seeds = _parse_text(text, str(path), harmful, "jsonl" if suffix == ".jsonl" else "txt", path.name)
    if not seeds:
        raise UserError(f"seed file {str(path)!r} holds no prompts; add one prompt a line")
    return seeds


def load_wildjailbreak(
    path_or_hub_id: str | Path = "allenai/wildjailbreak",
    split: str = "train",
    data_types: Sequence[str] = ("vanilla_harmful", "vanilla_benign"),
) -> list[Seed]:
    """WildJailbreak seeds through `datasets` (imported here, lazily). A local .jsonl/.json/.tsv/.csv/.parquet
    file in the WildJailbreak schema, or a hub id; for the hub, `split` is the config ("train" or "eval").
    Only the reference's vanilla types by default; adversarial ones suit defender-only mode (docs/game.md §1)."""
    bad = [t for t in data_types if t not in WILDJAILBREAK_TYPES]
    if bad:
        raise UserError(f"unknown WildJailbreak data types {bad}; use any of {', '.join(WILDJAILBREAK_TYPES)}")
    try:
        import datasets
    except ImportError:
        raise UserError("loading WildJailbreak needs the `datasets` package; run `pip install datasets`") from None
    path = Path(path_or_hub_id)
    try:
        if path.exists():
            suffix = path.suffix.lower()
            builders = {".jsonl": ("json", {}), ".json": ("json", {}), ".parquet": ("parquet", {}),
                        ".tsv": ("csv", {"delimiter": "\t", "keep_default_na": False}),
                        ".csv": ("csv", {"keep_default_na": False})}
            if suffix not in builders:
                raise UserError(f"WildJailbreak file {str(path)!r} must be .jsonl, .json, .tsv, .csv or .parquet")
            builder, kw = builders[suffix]
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kw)
        else:
            ds = datasets.load_dataset(str(path_or_hub_id), split, delimiter="\t", keep_default_na=False)["train"]
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a library boundary: any failure is reported as one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(
            f"could not load WildJailbreak from {str(path_or_hub_id)!r} ({type(e).__name__}: {first}); pass a "
            "local file in its schema, or accept the dataset's terms on the hub and log in"
        ) from None
    missing = {"data_type"} - set(ds.column_names)  # the eval split has `adversarial` and no `vanilla`
    if not {"vanilla", "adversarial"} & set(ds.column_names):
        missing.add("vanilla or adversarial")
    if missing:
        raise UserError(f"{str(path_or_hub_id)!r} lacks WildJailbreak columns {sorted(missing)}")
    seeds = []
    for i, row in enumerate(ds, start=1):
        if row["data_type"] not in data_types:
            continue
        field = "vanilla" if row["data_type"].startswith("vanilla") else "adversarial"
        if isinstance(row.get(field), str) and row[field].strip():
            seeds.append(_wildjailbreak_seed(row, f"{path_or_hub_id}:{i}", "wildjailbreak"))
    if not seeds:
        raise UserError(f"{str(path_or_hub_id)!r} holds no rows of type {', '.join(data_types)}")
    return seeds


def load_jailbreak_templates(source: Literal["all", "inthewild", "dan"] = "all") -> list[str]:
    """Shipped jailbreak templates: the in-the-wild prompts that hold `[INSERT PROMPT HERE]` (85, MIT) and the
    DAN-family templates (14, Apache-2.0; `{generator.name}` is the model's name, the request is appended)."""
    if source not in ("all", "inthewild", "dan"):
        raise UserError(f"unknown template source {source!r}; use all, inthewild or dan")
    base = _data_dir().joinpath("jailbreak_templates")
    out: list[str] = []
    if source in ("all", "inthewild"):
        prompts = json.loads(base.joinpath("inthewild_jailbreak_llms.json").read_text(encoding="utf-8"))
        out += [p for p in prompts if REQUEST_SLOT in p]
    if source in ("all", "dan"):
        for f in sorted(base.joinpath("dan").iterdir(), key=lambda f: f.name):
            if f.name.endswith(".json"):
                out += json.loads(f.read_text(encoding="utf-8"))
    return out


def apply_jailbreak_template(template: str, request: str, model_name: str = "Assistant") -> str:
    """Fill a template: `[INSERT PROMPT HERE]` gets the request (appended after a blank line when the template
    has no such slot), `{generator.name}` gets `model_name`. Plain replacement: braces in the request are kept."""
    text = template.replace(MODEL_NAME_SLOT, model_name)
    if REQUEST_SLOT in text:
        return text.replace(REQUEST_SLOT, request)
    return f"{text}\n\n{request}"


def _draw(pool: Sequence[T], k: int, rng: random.Random, what: str) -> list[T]:
    """k items: whole shuffled passes over the pool, then a sample without replacement for the rest."""
    if k <= 0:
        return []
    if not pool:
        raise UserError(f"no {what} seeds to draw from; give at least one {what} seed")
    out: list[T] = []
    while k - len(out) >= len(pool):
        block = list(pool)
        rng.shuffle(block)
        out += block
    return out + rng.sample(list(pool), k - len(out))


def mixed_seed_batch(harmful: Sequence[T], benign: Sequence[T], n: int, rng: random.Random) -> list[T]:
    """n items, half from `harmful` and half from `benign` (the extra one of an odd n is benign), shuffled.
    Works on Seeds or on (Seed, DataType) pairs."""
    if n < 0:
        raise UserError(f"batch size must be >= 0, got {n}")
    n_harmful = n // 2
    batch = _draw(harmful, n_harmful, rng, "harmful") + _draw(benign, n - n_harmful, rng, "benign")
    rng.shuffle(batch)
    return batch


class SeedPool:
    """Harmful and benign seeds, each labelled revised/verbatim once (fixed split seed), drawn 50/50 per batch.

    game: anything with harmful_seeds, benign_seeds, split_seed and mode (fast_srt.config.GameConfig)."""

    def __init__(self, game, rng_seed: int):
        harmful = load_seeds(game.harmful_seeds, harmful=True)
        benign = load_seeds(game.benign_seeds, harmful=False)
        if not any(s.harmful for s in harmful):
            raise UserError(f"harmful seed set {game.harmful_seeds!r} has no harmful seeds")
        if any(s.harmful for s in benign):
            raise UserError(f"benign seed set {game.benign_seeds!r} contains seeds marked harmful")
        typed = assign_data_types(harmful + benign, rng_seed=game.split_seed, mode=game.mode)
        self.harmful = [p for p in typed if p[0].harmful]
        self.benign = [p for p in typed if not p[0].harmful]
        self.rng = random.Random(rng_seed)

    def batch(self, n: int) -> list[tuple[Seed, DataType]]:
        return mixed_seed_batch(self.harmful, self.benign, n, self.rng)

    def group_batch(self, n_games: int, plays_per_seed: int) -> tuple[list[tuple[Seed, DataType]], list[int]]:
        """n_games games from n_games / plays_per_seed seeds, each seed played plays_per_seed times in a row (the
        group of GRPO/RLOO), and each game's group number."""
        seeds = [s for s in self.batch(n_games // plays_per_seed) for _ in range(plays_per_seed)]
        return seeds, [i // plays_per_seed for i in range(len(seeds))]

