"""What `fast-srt eval` evaluates, and on which engines.

A checkpoint spec is `default` (or any model name fast_srt.run.models resolves: a hub id, an HF checkpoint
directory), a `fast-srt train` run directory (its newest complete checkpoint, fast_srt.run.checkpoint.find_latest)
or one of its checkpoint directories. A run checkpoint carries its run's config (fast_srt_config.json), from which
eval takes the base model (the judge when `judge_model` is "policy", and the frozen defender), the judge, the dtype
and the game format (CoT or not); for any other checkpoint the base model is the checkpoint itself.

Engines are the training engines (fast_srt.engine.engine.Engine, Judge): one per distinct model directory, so
`fast-srt eval default` runs one engine and `fast-srt eval RUN --compare default` two (the run's checkpoint; the
base model as baseline, judge and frozen defender).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fast_srt.config import ModelConfig
from fast_srt.engine.engine import Engine
from fast_srt.engine.judge import Judge, RuleJudge
from fast_srt.engine.placement import judge_context
from fast_srt.errors import UserError
from fast_srt.run.checkpoint import CKPT_SUBDIR, RUN_CONFIG_FILE, STATE_FILE, find_latest
from fast_srt.run.models import resolve_model

FAMILY_FIELDS = ("model_type", "vocab_size")


@dataclass(frozen=True)
class Target:
    """A resolved checkpoint: the directory an engine loads, and its run's config when it has one."""

    spec: str
    model_dir: Path
    run_config: dict | None = None
    run_dir: Path | None = None
    step: int | None = None

    @property
    def label(self) -> str:
        return f"{self.spec} (step {self.step})" if self.step is not None else self.spec


def _is_run_dir(path: Path) -> bool:
    return (path / CKPT_SUBDIR).is_dir() or (path / "metrics.jsonl").is_file() or (path / STATE_FILE).is_file()


def resolve_target(spec: str, dtype: str = "bfloat16") -> Target:
    """A checkpoint spec -> Target (module docstring); UserError, one line, for anything that is not one."""
    path = Path(spec).expanduser()
    if path.exists() and path.is_dir() and _is_run_dir(path):
        ckpt = find_latest(path)
        if ckpt is None:
            raise UserError(f"run directory {spec} has no complete checkpoint (looked in {path / CKPT_SUBDIR}); "
                            f"train it with --save-every, or pass a checkpoint directory or 'default'")
        cfg_file = ckpt / RUN_CONFIG_FILE
        run_config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else None
        run_dir = path if ckpt != path else ckpt.parent.parent
        step = int(ckpt.name.split("_")[-1]) if ckpt.name.split("_")[-1].isdigit() else None
        return Target(spec, ckpt.resolve(), run_config, run_dir, step)
    if not path.exists() and _looks_local(spec, path):
        raise UserError(f"checkpoint {spec} does not exist; pass a run directory (its newest complete checkpoint "
                        f"is used), a checkpoint directory, a hub id or 'default'")
    return Target(spec, resolve_model(spec, dtype))


def _looks_local(spec: str, path: Path) -> bool:
    """A path rather than a model name or hub id (org/name): it starts like a path, has more than one separator,
    or its parent directory exists here (`runs/typo`)."""
    return (spec.startswith((".", "/", "~")) or spec.count(os.sep) > 1
            or (path.parent != Path(".") and path.parent.is_dir()))


def model_identity(model_dir: Path) -> dict:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{model_dir}: cannot read config.json ({e}); pass a Hugging Face checkpoint") from None
    return {k: cfg.get(k) for k in FAMILY_FIELDS}


def check_judge_family(target: Target, base_dir: Path, judge_model: str) -> None:
    """With judge_model "policy" the judge is the checkpoint's base model, so the checkpoint must be of that model's
    family and tokenizer (a run's checkpoint always is); UserError naming both otherwise."""
    if judge_model != "policy":
        return
    mine, base = model_identity(target.model_dir), model_identity(base_dir)
    diffs = [f"{k} {mine[k]!r} vs {base[k]!r}" for k in FAMILY_FIELDS if mine[k] != base[k]]
    if diffs:
        raise UserError(f"checkpoint {target.spec} is not of the family its judge expects (the judge is the base "
                        f"model {base_dir}: {', '.join(diffs)}); pass --base-model with the model it was trained "
                        f"from, or a --judge-model of its own")


class EnginePool:
    """One in-process engine per model directory, all with the same length, KV budget, dtype and seed."""

    def __init__(self, dtype: str, max_model_len: int, kv_cache_gib: float, seed: int):
        self.dtype, self.max_model_len, self.kv_cache_gib, self.seed = dtype, max_model_len, kv_cache_gib, seed
        self.engines: dict[str, Engine] = {}

    def get(self, model_dir: Path, name: str, runner: str = "generate") -> Engine:
        path = str(Path(model_dir).resolve())
        key = path if runner == "generate" else f"{path} ({runner})"
        if key not in self.engines:
            # the pool's length, capped at the model's own context window
            mml = judge_context(Path(path), ModelConfig(judge_max_model_len=self.max_model_len))
            self.engines[key] = Engine(path, dtype=self.dtype, max_model_len=mml, kv_cache_gib=self.kv_cache_gib,
                                       seed=self.seed, name=name, runner=runner)
        return self.engines[key]

    @property
    def startup_s(self) -> float:
        return sum(e.startup_s for e in self.engines.values())


def build_judge(pool: EnginePool, judge_model: str, base_dir: Path, template: str, constrained: bool,
                dtype: str):
    """The judge: the base model's engine ("policy"), a rule ("rule:NAME", tests), the probe judge ("probe": on
    the base model's hidden states; "probe:MODEL"), or another model's engine."""
    if judge_model.startswith("rule:"):
        return RuleJudge(judge_model[5:], pool.get(base_dir, "base"))
    if judge_model == "probe" or judge_model.startswith("probe:"):
        from fast_srt.engine.probe_judge import ProbeJudge

        judge_dir = base_dir if judge_model == "probe" else resolve_model(judge_model[6:], dtype)
        return ProbeJudge(pool.get(judge_dir, "judge", runner="pooling"), model_dir=judge_dir)
    judge_dir = base_dir if judge_model == "policy" else resolve_model(judge_model, dtype)
    return Judge(pool.get(judge_dir, "judge"), template=template, constrained=constrained)
