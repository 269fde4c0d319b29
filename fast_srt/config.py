"""Typed configuration: small frozen dataclasses, documented field by field (tyro shows the docs as --help), and
named presets as plain functions returning a TrainConfig.

`__post_init__` only validates (tyro may run it twice); derived values are properties.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from .errors import UserError


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    model: str = "default"
    """Policy model: 'default' (SmolLM2-135M-Instruct, offline), a local HF checkpoint directory, or a hub id."""
    judge_model: str = "policy"
    """Judge model: 'policy' (the policy's own frozen base model), or a name/path like `model` (e.g.
    allenai/wildguard or meta-llama/Llama-Guard-3-1B where a hub is reachable)."""
    judge_template: Literal["chat", "wildguard"] = "chat"
    """'chat': the classifier question as a chat message; 'wildguard': WildGuard's raw prompt format."""
    judge_constrained: bool = True
    """Hold the judge to the exact three-line answer with vLLM structured outputs (it then always parses)."""
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    """Engine and training dtype (bf16 is about 2x faster than fp32 for matmuls on AVX-512-BF16 CPUs too)."""
    max_model_len: int = 2048
    """Longest prompt + generation the engines accept, in tokens."""
    kv_cache_gib: float = 2.0
    """KV-cache budget per engine in GiB (host RAM on CPU, device memory on GPU)."""

    def __post_init__(self):
        _require(self.kv_cache_gib > 0, f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        _require(self.max_model_len >= 64, f"max_model_len must be >= 64, got {self.max_model_len}")


@dataclass(frozen=True, kw_only=True)
class GameConfig:
    mode: Literal["selfplay", "attacker_only", "defender_only"] = "selfplay"
    """selfplay: both roles train; attacker_only: a frozen base-model defender; defender_only: seeds go verbatim."""
    cot: bool = True
    """Hidden chain-of-thought (<think>/<answer>) with a format reward; False is the no-CoT ablation."""
    reward: Literal["general_sum", "general_sum_all_one", "zero_sum"] = "general_sum"
    """Reward table (GAME_SPEC §3): the reference's general_sum, its all-±1 variant, or the paper's zero-sum."""
    harmful_seeds: str = "donotanswer"
    """Harmful seed set: a built-in name ('donotanswer') or a JSONL/TXT file."""
    benign_seeds: str = "benign"
    """Benign seed set: a built-in name ('benign') or a JSONL/TXT file."""
    split_seed: int = 8888
    """Seed of the 50/50 revised-vs-verbatim split of each harmfulness class."""


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    games_per_step: int = 16
    """Seeds (games) per batch; half harmful, half benign; half of each revised by the attacker."""
    max_new_tokens: int = 128
    """Generation limit per turn, in tokens."""
    temperature: float = 1.0
    """Sampling temperature for both roles (the judge is always greedy)."""
    top_p: float = 1.0
    """Nucleus sampling for both roles."""
    judge_max_tokens: int = 24
    """Generation limit for the judge's three-line answer."""

    def __post_init__(self):
        _require(self.games_per_step >= 2, f"games_per_step must be >= 2, got {self.games_per_step}")
        _require(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _require(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True, kw_only=True)
class PlayConfig:
    """Play one batch of real games and print them side by side."""

    model: ModelConfig = field(default_factory=ModelConfig)
    game: GameConfig = field(default_factory=GameConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0
    """Seed for seed sampling and generation."""
    show: int = 16
    """How many games to print in full."""


def replace(cfg, **changes):
    """dataclasses.replace that turns invalid values into a UserError."""
    try:
        return dataclasses.replace(cfg, **changes)
    except TypeError as e:
        raise UserError(str(e)) from None
