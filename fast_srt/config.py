"""Typed configuration: small frozen dataclasses, documented field by field (tyro shows the docs as --help), and
named presets as plain functions returning a TrainConfig.

`__post_init__` only validates (tyro may run it twice); derived values are properties.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fast_srt.errors import UserError


def cache_dir() -> Path:
    """Where converted models, the format warm-up and fitted judge probes live: $FAST_SRT_CACHE, else
    ~/.cache/fast_srt."""
    import os
    from pathlib import Path

    return Path(os.environ.get("FAST_SRT_CACHE", Path.home() / ".cache" / "fast_srt"))


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    model: str = "default"
    """Policy model: 'default' (SmolLM2-135M-Instruct, offline), a local HF checkpoint directory, or a hub id."""
    judge_model: str = "probe"
    """Judge: 'probe' (logistic probes on the policy's frozen base model's hidden states, fitted once on the
    shipped labelled judge set: fast_srt/engine/probe_judge.py), 'probe:MODEL' (the same on another model),
    'policy' (the base model asked WildGuard's questions), or a name/path like `model` (e.g. allenai/wildguard or
    meta-llama/Llama-Guard-3-1B where a hub is reachable)."""
    judge_template: Literal["chat", "wildguard"] = "chat"
    """'chat': the classifier question as a chat message; 'wildguard': WildGuard's raw prompt format."""
    judge_constrained: bool = True
    """Hold the judge to the exact three-line answer with vLLM structured outputs (it then always parses)."""
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    """Engine and training dtype (bf16 matmuls are faster than fp32 on AVX-512-BF16 CPUs too)."""
    max_model_len: int = 2048
    """Longest prompt + generation the engines accept, in tokens."""
    kv_cache_gib: float = 2.0
    """KV-cache budget per engine in GiB (host RAM on CPU, device memory on GPU)."""
    judge_max_model_len: int = 4096
    """Longest judge input + answer, in tokens, for a judge on its own engine (capped at the judge model's
    context). Longer (prompt, response) pairs are cut to fit, and counted (judge/truncated_total)."""

    def __post_init__(self):
        _require(self.kv_cache_gib > 0, f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        _require(self.max_model_len >= 64, f"max_model_len must be >= 64, got {self.max_model_len}")
        _require(self.judge_max_model_len >= 128,
                 f"judge_max_model_len must be >= 128, got {self.judge_max_model_len}")


@dataclass(frozen=True, kw_only=True)
class GameConfig:
    mode: Literal["selfplay", "attacker_only", "defender_only"] = "selfplay"
    """selfplay: both roles train; attacker_only: a frozen base-model defender; defender_only: seeds go verbatim."""
    cot: bool = True
    """Hidden chain-of-thought (<think>/<answer>) with a format reward; False is the no-CoT ablation."""
    reward: Literal["general_sum", "general_sum_all_one", "zero_sum"] = "general_sum"
    """Reward table (docs/game.md §3): the reference's general_sum, its all-±1 variant, or the paper's zero-sum."""
    harmful_seeds: str = "donotanswer"
    """Harmful seed set: a built-in name ('donotanswer') or a JSONL/TXT file."""
    benign_seeds: str = "benign"
    """Benign seed set: a built-in name ('benign') or a JSONL/TXT file."""
    split_seed: int = 8888
    """Seed of the 50/50 revised-vs-verbatim split of each harmfulness class."""
    frozen_defender: str = ""
    """attacker_only: the frozen defender's model directory (config.json and safetensors; e.g. a checkpoint's
    model, as `fast-srt crossplay --best-response-steps` passes it); empty: the run's base model, before any
    warm-up."""


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
    fixed_length: bool = False
    """Benchmark aid: every attacker and defender turn generates exactly max_new_tokens (EOS ignored), so two
    commits time identical work (`fast-srt bench` sets it)."""
    judge_max_tokens: int = 24
    """Generation limit for the judge's three-line answer (raised to the longest constrained answer when the judge
    is constrained, so it can never be cut)."""

    def __post_init__(self):
        _require(self.games_per_step >= 2, f"games_per_step must be >= 2, got {self.games_per_step}")
        _require(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _require(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _require(self.judge_max_tokens >= 1, f"judge_max_tokens must be >= 1, got {self.judge_max_tokens}")


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
    out: str = ""
    """Also write every game as one JSON line (the fields of a run's games.jsonl) to this file ('' writes none)."""


@dataclass(frozen=True, kw_only=True)
class AlgoConfig:
    estimator: Literal["reinforce_pp", "grpo", "rloo"] = "reinforce_pp"
    """Advantage estimator: REINFORCE++ (KL in the per-token reward, return = reverse cumsum, whitened per role),
    or GRPO / RLOO group baselines over `samples_per_prompt` plays of each seed."""
    samples_per_prompt: int = 1
    """Plays of each seed per step (GRPO/RLOO need >= 2; REINFORCE++ uses 1, as the reference)."""
    kl_coef: float = 0.01
    """beta: KL to the frozen initial policy, folded into the per-token reward (k1 estimator). 0 skips the
    reference model entirely."""
    whiten: bool = True
    """Whiten REINFORCE++ advantages per role (token-level mean/std)."""
    clip_eps: float = 0.2
    """PPO clip range."""
    importance_correction: bool = True
    """Truncated token-level importance weights between vLLM's sampled-token log-probs and the trainer's."""
    tis_cap: float = 2.0
    """Upper bound of the truncated importance weight."""
    remove_ties: bool = True
    """Drop every experience of a game with a None judge label (the reference default)."""
    sft_coef: float = 0.0
    """Weight of the auxiliary SFT (PTX) loss; 0 turns it off. Must be 0 without CoT."""
    sft_data: str = "builtin"
    """SFT data: 'builtin' (the shipped CoT-formatted set) or a JSONL file of {"prompt", "response"}."""
    sft_samples_per_micro_step: int = 4
    """SFT samples packed with each training micro-batch."""

    def __post_init__(self):
        _require(self.samples_per_prompt >= 1, f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        _require(self.estimator == "reinforce_pp" or self.samples_per_prompt >= 2,
                 f"estimator {self.estimator} needs samples_per_prompt >= 2 (a group baseline of one is 0)")
        _require(self.kl_coef >= 0, f"kl_coef must be >= 0, got {self.kl_coef}")
        _require(0 < self.clip_eps < 1, f"clip_eps must be in (0, 1), got {self.clip_eps}")
        _require(self.tis_cap >= 1, f"tis_cap must be >= 1, got {self.tis_cap}")
        _require(self.sft_coef >= 0, f"sft_coef must be >= 0, got {self.sft_coef}")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 5e-7
    """Peak learning rate (AdamW)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    weight_decay: float = 0.0
    """Decoupled weight decay on matrices."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    warmup_ratio: float = 0.03
    """Linear warm-up as a share of all optimizer steps."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a share of lr."""
    updates_per_step: int = 6
    """Optimizer steps per rollout (the batch is split into this many mini-batches; slightly off-policy)."""
    micro_batch_tokens: int = 4096
    """Packed tokens per forward/backward (gradient accumulation inside a mini-batch); no padding."""
    share_prefix: bool = True
    """Compute each shared prompt prefix (the role instructions, a GRPO group's prompt) once per micro-batch,
    forward and backward: same loss and gradients, fewer tokens (fast_srt.learner.batch.pack_shared)."""

    def __post_init__(self):
        _require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _require(self.updates_per_step >= 1, f"updates_per_step must be >= 1, got {self.updates_per_step}")
        _require(self.micro_batch_tokens >= 64, f"micro_batch_tokens must be >= 64, got {self.micro_batch_tokens}")
        _require(self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}")


@dataclass(frozen=True, kw_only=True)
class WarmupConfig:
    steps: int = 0
    """Format warm-up before RL: optimizer steps of plain SFT on the defender and attacker CoT sets
    (fast_srt.learner.warmup); the warmed checkpoint, cached under ~/.cache/fast_srt, becomes the policy's base
    model (RL start and KL reference). 0 turns it off."""
    lr: float = 1e-4
    """Peak learning rate of the warm-up (AdamW; linear warm-up over 10% of the steps, cosine to 0.1 x lr)."""
    batch_size: int = 8
    """SFT samples per warm-up step (drawn from both sets, shuffled)."""
    seed: int = 0
    """Seed of the warm-up's data order and torch."""
    lora_rank: int = 0
    """0: the warm-up trains every weight. N > 0: it trains LoRA adapters of rank N on every linear layer (alpha
    2N), merged into the base model afterwards; such a warm-up can be shipped (`fast-srt sft --ship`) and is then
    built from its adapter in seconds instead of trained."""
    defender_data: str = "builtin"
    """Defender CoT SFT data: 'builtin' (fast_srt/data/sft/cot_sft.jsonl) or a JSONL file of {"prompt",
    "response"} with optional "thinking"."""
    attacker_data: str = "builtin"
    """Attacker CoT SFT data: 'builtin' (fast_srt/data/sft/attacker_cot_sft.jsonl) or a JSONL file of {"seed",
    "kind", "thinking", "revision"}."""

    def __post_init__(self):
        _require(self.steps >= 0, f"warmup.steps must be >= 0 (0 turns the warm-up off), got {self.steps}")
        _require(self.lr > 0, f"warmup.lr must be > 0, got {self.lr}")
        _require(self.batch_size >= 1, f"warmup.batch_size must be >= 1, got {self.batch_size}")
        _require(self.lora_rank >= 0, f"warmup.lora_rank must be >= 0 (0: train every weight), got {self.lora_rank}")


@dataclass(frozen=True, kw_only=True)
class LeagueConfig:
    every: int = 0
    """Opponent league (with --roles per-role): every K steps a frozen snapshot of each role's adapter is kept in
    the policy engine, and a game may be played against one (fast_srt/run/league.py). 0 turns it off."""
    size: int = 2
    """Snapshots kept per role (the oldest is dropped)."""
    p_past: float = 0.5
    """Share of the games with an attacker turn played against a snapshot (the side drawn 50/50, the snapshot
    uniformly from that role's); the snapshot's turn is not trained."""

    def __post_init__(self):
        _require(self.every >= 0, f"league.every must be >= 0 (0 turns the league off), got {self.every}")
        _require(self.size >= 1, f"league.size must be >= 1, got {self.size}")
        _require(0 <= self.p_past <= 1, f"league.p_past must be a share in [0, 1], got {self.p_past}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Self-play RL training (Self-RedTeam) in one process."""

    model: ModelConfig = field(default_factory=ModelConfig)
    game: GameConfig = field(default_factory=GameConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    league: LeagueConfig = field(default_factory=LeagueConfig)
    steps: int = 200
    """Self-play steps (rollout + update + weight sync each)."""
    run_dir: str = "runs/default"
    """Where metrics.jsonl, games.jsonl and checkpoints go."""
    resume: bool = False
    """Continue from the latest complete checkpoint in run_dir (its weights, optimizer, RNG, step, metrics)."""
    save_every: int = 100
    """Checkpoint every N steps (and at the last step)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept on disk."""
    seed: int = 8888
    """Seed for seed sampling, generation and torch."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (saves memory, costs ~30% more compute)."""
    log_games: int = 4
    """Games per step written to games.jsonl (seed, both turns, labels, rewards)."""
    wandb_project: str | None = None
    """Also log every metric to this Weights & Biases project (needs `pip install wandb`). TensorBoard event files
    are written beside metrics.jsonl whenever the tensorboard package is installed."""
    lora_rank: int = 0
    """LoRA rank; 0 trains every weight. With LoRA the KL reference is the same model with adapters off."""
    lora_alpha: float = 32.0
    """LoRA scale numerator (scale = alpha / rank)."""
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Names of the linear layers that get adapters."""
    lora_in_engine: bool = True
    """With LoRA: the policy engine holds the base weights and serves the policy as a LoRA request, each weight sync
    writes only the adapter's tensors in place, and the policy's base model as judge (`--model.judge-model policy`)
    and attacker_only's frozen defender read the same engine without the adapter: one copy of the base weights.
    False: the merged weights are written into the policy engine and a base-model judge gets its own engine."""
    roles: Literal["shared", "per-role"] = "shared"
    """shared: one policy plays both roles; per-role (LoRA in the engine): one adapter per role over the one frozen
    base, each role's turns generated with its own and each trained only on its role's samples."""
    shard: Literal["none", "fsdp2"] = "none"
    """Under torchrun: none = every rank holds the whole model, gradients summed by an all-reduce; fsdp2 = the
    model, its gradients and AdamW's moments sharded across the ranks (torch FSDP2; the KL reference too), for a
    model that does not fit one device. Full fine-tuning only (not with --lora-rank)."""
    logprob_impl: Literal["auto", "naive", "chunked", "native", "triton"] = "auto"
    """Log-prob + entropy implementation, chosen once: auto = Triton on CUDA, else the C++ op when built and
    measured faster, else the chunked torch twin; naive = full [tokens, vocab] logits (for comparison only)."""
    inject_nan_loss_at_step: int = -1
    """Testing aid: make the loss NaN at this step (the step must be skipped and reported). -1: never."""
    eval_every: int = 0
    """Eval during training: before the first step (the baseline), every N steps and at the last, a small fixed
    held-out eval in the training process (fast_srt/eval/training.py): refusal of harmful and jailbreak-wrapped
    requests, over-refusal of benign ones, attack success against the frozen base model, attack diversity; in
    metrics.jsonl with n and 95% Wilson intervals (docs/evaluation.md). 0 turns it off."""
    eval_prompts: int = 8
    """Prompts per held-out set of the eval during training, and attacks: a fixed sample, the same at every eval."""
    eval_over_refusal_alarm: float = 0.5
    """The always-refuse alarm: one console line and eval/always_refuse_alarm 1 when an eval's benign over-refusal
    (the judge-free phrase matcher) is above this share."""

    def __post_init__(self):
        _require(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _require(self.save_every >= 1, f"save_every must be >= 1, got {self.save_every}")
        _require(self.lora_rank >= 0, f"lora_rank must be >= 0, got {self.lora_rank}")
        _require(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        _require(not self.wandb_project or importlib.util.find_spec("wandb") is not None,
                 f"wandb_project {self.wandb_project!r} needs wandb, which is not installed; run `pip install wandb` "
                 f"or drop --wandb-project")
        _require(self.shard == "none" or not self.lora_rank,
                 f"--shard {self.shard} with --lora-rank {self.lora_rank} is not supported: LoRA keeps the trained "
                 f"and optimizer state rank-sized already; drop --shard, or --lora-rank for full fine-tuning")
        _require(self.roles == "shared" or self.lora_rank > 0,
                 "--roles per-role gives each role its own LoRA adapter over the frozen base: pass --lora-rank N "
                 "(e.g. 16), or --roles shared to train one policy for both roles")
        _require(self.roles == "shared" or self.lora_in_engine,
                 "--roles per-role serves both adapters side by side in the policy engine: drop --no-lora-in-engine, "
                 "or pass --roles shared")
        _require(not self.league.every or self.roles == "per-role",
                 "--league.every keeps snapshots of each role's LoRA adapter: pass --roles per-role --lora-rank N, "
                 "or --league.every 0")
        _require(not self.game.frozen_defender or self.game.mode == "attacker_only",
                 f"--game.frozen-defender is the defender of attacker_only mode; pass --game.mode attacker_only, or "
                 f"drop it (the mode is {self.game.mode})")
        _require(not self.league.every or self.game.mode == "selfplay",
                 f"--league.every needs both roles to play and train (--game.mode selfplay), not {self.game.mode}")
        _require(self.game.cot or self.algo.sft_coef == 0,
                 "the no-CoT ablation (game.cot False) needs algo.sft_coef 0: the SFT targets are CoT-formatted")
        _require(self.game.cot or self.warmup.steps == 0,
                 "the no-CoT ablation (game.cot False) needs warmup.steps 0: the warm-up teaches the CoT format")
        _require(self.eval_every >= 0, f"eval_every must be >= 0 (0 turns the eval off), got {self.eval_every}")
        _require(self.eval_prompts >= 2, f"eval_prompts must be >= 2 (diversity needs two attacks), got "
                                         f"{self.eval_prompts}")
        _require(0 <= self.eval_over_refusal_alarm <= 1,
                 f"eval_over_refusal_alarm must be a share in [0, 1], got {self.eval_over_refusal_alarm}")
        _require(self.sampling.games_per_step % self.algo.samples_per_prompt == 0,
                 f"games_per_step ({self.sampling.games_per_step}) must be a multiple of samples_per_prompt "
                 f"({self.algo.samples_per_prompt})")


# --------------------------------------------------------------------------------------------------------------
# Presets: functions returning a TrainConfig. `fast-srt train PRESET --field value` overrides any field.

def cpu_base() -> TrainConfig:
    """The ablation presets' base: SmolLM2-135M-Instruct on CPU without the format warm-up and the auxiliary SFT
    loss (48 new tokens, temperature 1). To give an ablation the default's warm start, add
    `--warmup.steps 48 --warmup.lora-rank 8 --warmup.lr 3e-3 --sampling.max-new-tokens 128` (and `--algo.sft-coef 1` to keep the format)."""
    return TrainConfig(
        model=ModelConfig(model="default", dtype="bfloat16", max_model_len=1024, kv_cache_gib=1.0),
        sampling=SamplingConfig(games_per_step=8, max_new_tokens=48, judge_max_tokens=24),
        algo=AlgoConfig(sft_coef=0.0),
        optim=OptimConfig(lr=1e-6, updates_per_step=2, micro_batch_tokens=4096, warmup_ratio=0.0),
        steps=5, save_every=5, run_dir="runs/cpu_default", log_games=2,
    )


def cpu_default() -> TrainConfig:
    """The offline default: SmolLM2-135M-Instruct on CPU, a few minutes for a handful of steps. A format warm-up
    (48 SFT steps of a rank-8 LoRA, merged; its adapter ships, so a fresh machine does not train it) teaches both
    roles the <think>/<answer> format and the auxiliary SFT loss (1 sample per micro-step) keeps it; 128 new tokens
    leave room for it; temperature 0.6 (bench/results/warmup_temperature_cpu_2026-11-30.md). Then 12 self-play
    steps at lr 5e-5 (bench/results/learning_rate_cpu_2026-11-30.md: at 1e-5 the policy hardly moves), every game
    of a step logged (`fast-srt games RUN_DIR`), a checkpoint at the end; the held-out eval during training before
    the first step, at step 6 and at the last, 4 prompts a set (docs/evaluation.md: its cost)."""
    base = cpu_base()
    return dataclasses.replace(
        base, sampling=dataclasses.replace(base.sampling, max_new_tokens=128, temperature=0.6),
        algo=dataclasses.replace(base.algo, sft_coef=1.0, sft_samples_per_micro_step=1),
        optim=dataclasses.replace(base.optim, lr=5e-5),
        warmup=WarmupConfig(steps=48, lr=3e-3, batch_size=8, seed=0, lora_rank=8), steps=12, save_every=12,
        log_games=8, eval_every=6, eval_prompts=4)


def llama8b_reference() -> TrainConfig:
    """The reference run's hyper-parameters (docs/game.md §4): abliterated Llama-3.1-8B, 128 games/step, lr 5e-7,
    REINFORCE++ with beta 0.01, 6 updates per rollout, PTX-SFT coefficient 1, 200 steps; judge WildGuard."""
    return TrainConfig(
        model=ModelConfig(model="mlabonne/Meta-Llama-3.1-8B-Instruct-abliterated", judge_model="allenai/wildguard",
                          judge_template="wildguard", dtype="bfloat16", max_model_len=4096, kv_cache_gib=20.0),
        sampling=SamplingConfig(games_per_step=128, max_new_tokens=2048, judge_max_tokens=32),
        algo=AlgoConfig(kl_coef=0.01, sft_coef=1.0),
        optim=OptimConfig(lr=5e-7, updates_per_step=6, micro_batch_tokens=16384),
        steps=200, save_every=100, run_dir="runs/llama8b_reference", gradient_checkpointing=True,
    )


def _ablation(base: TrainConfig, **game) -> TrainConfig:
    return dataclasses.replace(base, game=dataclasses.replace(base.game, **game))


def attacker_only() -> TrainConfig:
    """Ablation: only the attacker trains, against a frozen base-model defender without CoT."""
    return _ablation(cpu_base(), mode="attacker_only")


def defender_only() -> TrainConfig:
    """Ablation: every seed goes verbatim to the defender (static attacker = the data)."""
    return _ablation(cpu_base(), mode="defender_only")


def no_cot() -> TrainConfig:
    """Ablation: no hidden chain-of-thought, no format reward, no SFT."""
    cfg = _ablation(cpu_base(), cot=False)
    return dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, sft_coef=0.0))


def rl_with_sft() -> TrainConfig:
    """The main method's auxiliary loss on the CPU base: self-play RL plus PTX-SFT (coefficient 1)."""
    cpu = cpu_base()
    return dataclasses.replace(cpu, algo=dataclasses.replace(cpu.algo, sft_coef=1.0, sft_samples_per_micro_step=2))


def rl_only() -> TrainConfig:
    """Ablation: RL without SFT (cpu_base has sft_coef 0 and no warm-up; explicit for the ablation table)."""
    cpu = cpu_base()
    return dataclasses.replace(cpu, algo=dataclasses.replace(cpu.algo, sft_coef=0.0))


def grpo() -> TrainConfig:
    """GRPO instead of REINFORCE++: 2 plays per seed, group-normalised rewards."""
    cpu = cpu_base()
    return dataclasses.replace(cpu, algo=dataclasses.replace(cpu.algo, estimator="grpo", samples_per_prompt=2))


def lora_small_gpu() -> TrainConfig:
    """LoRA (rank 16) on a 7B policy with WildGuard: rank-sized optimizer states, no reference copy. `fast-srt plan`
    puts its peak at about 53 GiB (an 80 GB card): the policy engine, the judge engine and the trainer each hold a
    copy of 7B weights; on 24-48 GB, a smaller policy (`--model.model` of 1.5B fits 24 GiB with its base as judge)."""
    ref = llama8b_reference()
    return dataclasses.replace(
        ref, lora_rank=16, lora_alpha=32.0, run_dir="runs/lora_small_gpu",
        model=dataclasses.replace(ref.model, model="Qwen/Qwen2.5-7B-Instruct", kv_cache_gib=6.0, max_model_len=2048),
        sampling=dataclasses.replace(ref.sampling, games_per_step=32, max_new_tokens=512),
        optim=dataclasses.replace(ref.optim, lr=1e-5, micro_batch_tokens=8192))


PRESETS = {
    "cpu_default": cpu_default,
    "llama8b_reference": llama8b_reference,
    "attacker_only": attacker_only,
    "defender_only": defender_only,
    "no_cot": no_cot,
    "rl_with_sft": rl_with_sft,
    "rl_only": rl_only,
    "grpo": grpo,
    "lora_small_gpu": lora_small_gpu,
}


def train_config_from_dict(d: dict) -> TrainConfig:
    """The TrainConfig a run's config.json holds (dataclasses.asdict's form): nested sections as their dataclasses,
    lists as tuples where the field is a tuple; a field it lacks keeps its default (a run written before the field
    existed). UserError for a field TrainConfig does not have."""
    return _from_dict(TrainConfig, d, "")


def _from_dict(cls, d: dict, where: str):
    import typing

    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"config field(s) {', '.join(where + k for k in unknown)} are not fields of {cls.__name__}; "
                        f"the config was written by another version of fast_srt")
    kwargs = {}
    for k, v in d.items():
        t = hints[k]
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            v = _from_dict(t, v, f"{where}{k}.")
        elif typing.get_origin(t) is tuple and isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)
