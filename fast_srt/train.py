"""`fast-srt train`: self-play RL (Self-RedTeam) in one process.

Each step, top to bottom (see `train`):
  1. play a batch of games with the policy engine (attacker turns, then defender turns, same weights)
  2. judge them in-process (greedy, constrained to the three-line answer) and compute rewards (GAME_SPEC §3)
  3. drop ties and parse failures; turn both roles' turns into training samples
  4. trainer log-probs at experience time (old) and under the frozen reference (KL), packed, no padding
  5. advantages: REINFORCE++ (KL in the reward, reverse cumsum, per-role whitening) or GRPO/RLOO
  6. several PPO-clip updates with truncated importance correction against vLLM's log-probs (+ optional SFT)
  7. write the new weights into the live engine in place; log; checkpoint
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from pathlib import Path

import torch

from .batch import ROLE_IDS, Sample, pack, split_micro_batches
from . import faults
from .checkpoint import (LORA_ADAPTER_FILE, RUN_CONFIG_FILE, check_free_space, checkpoint_bytes, find_latest,
                         load_checkpoint, restore_trainer_state, save_checkpoint)
from .config import PRESETS, TrainConfig
from .engine import SamplingSpec
from .errors import UserError
from .game import GameOptions
from .lora import adapters_disabled, apply_lora
from .loss import is_finite_loss, kl_k3_loss, ppo_clip_loss, sft_loss
from .metrics import MetricsLog, PhaseTimer, Status, console_line, to_floats
from .policy import build_optimizer, build_scheduler, load_policy, load_reference, token_logprobs
from .rewards import reward_function
from .rollout import play_games
from .session import SeedPool, build_engines
from .weight_sync import named_weights_for_engine, push_weights

PROBE_PROMPT = "What is the capital of France?"


# ------------------------------------------------------------------------------------------------ CLI

def parse_train_args(argv: list[str]) -> TrainConfig:
    import tyro

    preset = "cpu_default"
    if argv and not argv[0].startswith("-"):
        preset, argv = argv[0], argv[1:]
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    desc = "Self-play RL training in one process. Presets (first argument): " + "; ".join(
        f"{k}: {' '.join((f.__doc__ or '').split())}" for k, f in PRESETS.items())
    return tyro.cli(TrainConfig, default=PRESETS[preset](), args=argv, prog=f"fast-srt train {preset}",
                    description=desc)


def train_main(argv: list[str]) -> None:
    train(parse_train_args(argv))


# ------------------------------------------------------------------------------------------------ helpers

def games_to_samples(games, options: GameOptions, remove_ties: bool, group_of: list[int]) -> tuple[list, dict]:
    """Both roles' turns as training samples; ties/parse failures dropped; empty generations skipped."""
    samples, skipped = [], {"tie": 0, "dropped": 0, "empty": 0}
    for gi, g in enumerate(games):
        r = g.rewards
        if r.dropped or (remove_ties and r.tie):
            skipped["dropped" if r.dropped else "tie"] += 1
            continue
        turns = [(g.attacker, r.attacker, "attacker"), (g.defender, r.defender, "defender")]
        for turn, reward, role in turns:
            if turn is None or reward is None or not turn.trainable:
                continue
            if not turn.gen.token_ids:
                skipped["empty"] += 1
                continue
            samples.append(Sample(turn.gen.prompt_ids, turn.gen.token_ids, role, float(reward), turn.gen.logprobs,
                                  metadata={"group": group_of[gi] * len(ROLE_IDS) + ROLE_IDS[role]}))
    return samples, skipped


@torch.no_grad()
def per_sample_logprobs(model, samples, logprob_fn, micro_tokens: int, autocast, temperature: float,
                        ) -> list[torch.Tensor]:
    """Trainer log-probs of each sample's response tokens at the sampling temperature, [R_s] each, in token-budget
    micro-batches."""
    out: dict[int, torch.Tensor] = {}
    index = {id(s): i for i, s in enumerate(samples)}
    for mb in split_micro_batches(samples, micro_tokens):
        batch = pack(mb, device=model.device)
        with autocast():
            logp, _ = token_logprobs(model, batch, logprob_fn, temperature)
        for s, v in zip(mb, batch.split_responses(logp.float())):
            out[index[id(s)]] = v.cpu()
    return [out[i] for i in range(len(samples))]


def compute_advantages(cfg: TrainConfig, samples, old, ref, adv_fns, device: torch.device,
                       ) -> tuple[list[torch.Tensor], dict]:
    """Per-sample advantages [R_s] for the chosen estimator, on the whole rollout at once, on `device` (the device
    the advantage kernels were chosen for: select_advantages_impl(device) in setup_run)."""
    reinforce_fn, group_fn = adv_fns
    full = pack(samples, device=device)  # the advantage pass is O(T)
    old_t = full.scatter_responses(old)
    ref_t = full.scatter_responses(ref) if ref is not None else old_t
    kl = (old_t - ref_t)[full.loss_mask]
    if cfg.algo.estimator == "reinforce_pp":
        adv, _ = reinforce_fn(old_t, ref_t, full.rewards, full.cu_seqlens, full.loss_mask, full.roles,
                              kl_coef=cfg.algo.kl_coef, n_roles=len(ROLE_IDS), whiten=cfg.algo.whiten)
    else:
        # dense ids 0..G-1: ties and empty turns leave gaps in the (seed, role) group numbers
        raw = torch.tensor([s.metadata["group"] for s in samples], dtype=torch.int64)
        groups = torch.unique(raw, return_inverse=True)[1].to(device)
        adv = group_fn(full.rewards, groups, full.cu_seqlens, full.loss_mask, kind=cfg.algo.estimator)
    advs = [a.cpu() for a in full.split_responses(adv)]
    return advs, {"kl/mean": kl.mean() if kl.numel() else torch.tensor(0.0)}


def update_policy(run: Run, step: int, samples, old, ref, advs) -> dict:
    """updates_per_step optimizer steps over shuffled mini-batches; a non-finite loss skips its optimizer step.

    Log-probs at the sampling temperature (old and ref were computed at it too). GRPO/RLOO with kl_coef > 0 add
    the k3 KL to the reference as a loss term (REINFORCE++ has it in the reward). The scheduler moves once per
    planned update, done or skipped, so the cosine reaches its floor at the last update of the last step. fp16
    runs through a gradient scaler."""
    cfg, model, optimizer, scaler = run.cfg, run.model, run.optimizer, run.scaler
    o, a = cfg.optim, cfg.algo
    kl_in_loss = a.estimator != "reinforce_pp" and a.kl_coef > 0 and ref is not None
    order = list(range(len(samples)))
    random.Random(cfg.seed * 100003 + step).shuffle(order)
    n_mini = min(o.updates_per_step, len(order))
    acc: dict[str, list] = {}
    skipped = 0
    for m in range(n_mini):
        idx = order[m::n_mini]
        mini = [samples[i] for i in idx]
        n_tokens = sum(len(s.response_ids) for s in mini)
        where = {id(s): i for s, i in zip(mini, idx)}  # sample -> its index in the rollout
        optimizer.zero_grad(set_to_none=True)
        acc.setdefault("optim/lr", []).append(torch.tensor(optimizer.param_groups[0]["lr"]))
        finite, per_mini = True, {}
        for mb in split_micro_batches(mini, o.micro_batch_tokens):
            pos = [where[id(x)] for x in mb]
            batch = pack(mb, device=model.device)
            old_t = batch.scatter_responses([old[i] for i in pos])
            adv_t = batch.scatter_responses([advs[i] for i in pos])
            with run.autocast():
                logp, ent = token_logprobs(model, batch, run.logprob_fn, run.temperature)
            loss, metrics = ppo_clip_loss(logp, old_t, adv_t, batch.loss_mask, clip_eps=a.clip_eps,
                                          vllm_logp=batch.vllm_logp if a.importance_correction else None,
                                          tis_cap=a.tis_cap, entropy=ent, num_tokens=n_tokens)
            if kl_in_loss:
                kl_loss, kl_metrics = kl_k3_loss(logp, batch.scatter_responses([ref[i] for i in pos]),
                                                 batch.loss_mask, num_tokens=n_tokens)
                loss = loss + a.kl_coef * kl_loss
                metrics.update(kl_metrics)
            if a.sft_coef > 0 and run.sft_stream is not None:
                sb = pack(run.sft_stream.next(a.sft_samples_per_micro_step), device=model.device)
                with run.autocast():
                    slp, _ = token_logprobs(model, sb, run.logprob_fn)  # the model's own distribution (T = 1)
                s_loss, s_metrics = sft_loss(slp, sb.loss_mask)
                loss = loss + a.sft_coef * s_loss * (batch.num_loss_tokens / n_tokens)
                metrics.update(s_metrics)
            if step == cfg.inject_nan_loss_at_step:
                loss = loss * float("nan")
            if not is_finite_loss(loss):  # host sync, once per micro-step, before backward
                finite = False
                break
            scaler.scale(loss).backward()
            for k, v in metrics.items():
                if k in SUMMED_OVER_MICRO_BATCHES:  # parts of one mini-batch loss (each divided by n_tokens)
                    per_mini[k] = per_mini.get(k, 0.0) + v
                else:
                    acc.setdefault(k, []).append(v)
        if finite:
            scaler.unscale_(optimizer)
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            finite = bool(torch.isfinite(gn))
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            scaler.update()  # fp16: an overflow lowers the scale
            skipped += 1
            continue
        for k, v in per_mini.items():
            acc.setdefault(k, []).append(v)
        acc.setdefault("optim/grad_norm", []).append(gn.detach())
        scaler.step(optimizer)
        scaler.update()
        scheduler_step(run)
        faults.hit("update")
    for _ in range(o.updates_per_step - (n_mini - skipped)):  # skipped and unplanned updates still use their slot
        scheduler_step(run)
    out = {}
    for k, vs in acc.items():
        t = torch.stack([torch.as_tensor(v).float() for v in vs])
        out[k] = t.max() if k.endswith("_max") else (t.min() if k.endswith("_min") else t.mean())
    out["optim/skipped_updates"] = skipped
    out["optim/updates"] = n_mini - skipped
    if scaler.is_enabled():
        out["optim/grad_scale"] = scaler.get_scale()
    return out


SUMMED_OVER_MICRO_BATCHES = ("loss/pg", "loss/kl_k3")


def scheduler_step(run: Run) -> None:
    if run.scheduler.last_epoch < run.total_updates:  # never past the floor
        run.scheduler.step()


def total_updates(cfg: TrainConfig) -> int:
    """The scheduler's horizon: the index of the last planned update, so that its LR is the cosine's floor."""
    return max(1, cfg.steps * cfg.optim.updates_per_step - 1)


def pick_logprob_impl(name: str, device: torch.device):
    from . import kernels
    from .kernels import native

    if name == "auto":
        return kernels.select_logprobs_impl(device)
    if name == "triton" and device.type != "cuda":
        raise UserError("logprob_impl 'triton' needs CUDA (on CPU the Triton kernels only run in the interpreter, "
                        "in tests); use auto, twin, native or naive")
    if name == "native" and not native.available():
        raise UserError("logprob_impl 'native' needs the C++ op: build it with `make native`, or use auto/twin")
    return {"naive": kernels.logprobs_naive, "twin": kernels.logprobs_ref, "native": kernels.logprobs_native,
            "triton": kernels.fused_logprobs}[name]


def sync_weights(engine, model) -> float:
    """Write the trainer's weights into the live engine, in place (see weight_sync.py)."""
    n = len(model.state_dict()) + 1  # + the output head, always sent
    weights = named_weights_for_engine(model, engine.dtype)
    dt = push_weights(engine.llm, faults.hit_halfway("weight_sync", weights, n))
    engine.wake_kv_cache()
    return dt


def rollout_metrics(games, samples, skipped, judge) -> dict:
    m: dict = {"games/n": len(games), "games/ties": skipped["tie"], "games/dropped": skipped["dropped"],
               "games/empty_turns": skipped["empty"], "judge/parse_failures_total": judge.parse_failures,
               "judge/truncated_total": judge.truncated, "judge/too_long_total": judge.too_long}
    for role in ("attacker", "defender"):
        rs = [getattr(g.rewards, role) for g in games if getattr(g.rewards, role) is not None and not g.rewards.tie]
        m[f"reward/{role}_mean"] = sum(rs) / len(rs) if rs else None
        turns = [getattr(g, role) for g in games if getattr(g, role) is not None and getattr(g, role).fmt is not None]
        m[f"format/{role}_violation_rate"] = (sum(not t.fmt.valid for t in turns) / len(turns)) if turns else None
        m[f"samples/{role}"] = sum(s.role == role for s in samples)
    for g in games:
        m[f"outcome/{g.rewards.outcome}"] = m.get(f"outcome/{g.rewards.outcome}", 0) + 1
    return m


def memory_plan(model, ref, engines, cfg) -> str:
    n = sum(p.numel() for p in model.parameters())
    gib = 2**30
    psz = next(model.parameters()).element_size()
    lines = [f"memory plan ({'cuda' if model.device.type == 'cuda' else 'cpu'}; {n / 1e6:.1f}M parameters):",
             f"  trainer weights {n * psz / gib:6.2f} GiB  grads {n * psz / gib:6.2f} GiB  "
             f"AdamW states {2 * n * 4 / gib:6.2f} GiB",
             f"  reference model {0 if ref is None else sum(p.numel() * p.element_size() for p in ref.parameters()) / gib:6.2f} GiB  "
             f"engine weights {n * 2 / gib:6.2f} GiB x {1 + (engines.judge.engine is not engines.policy)} engine(s)",
             f"  KV cache {cfg.model.kv_cache_gib:.2f} GiB per engine"
             f"{' (released while training)' if model.device.type == 'cuda' else ' (host RAM, kept: no sleep on CPU)'}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the loop

@dataclasses.dataclass
class Run:
    """Everything a run builds once, before its first step."""

    cfg: TrainConfig
    run_dir: Path
    autocast: object  # () -> autocast context: matmuls in the compute dtype over fp32 master weights
    pool: SeedPool
    options: GameOptions
    reward_fn: object
    model: torch.nn.Module
    ref: torch.nn.Module | None
    engines: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    start_step: int
    resumed: bool
    logprob_fn: object
    adv_fns: tuple
    sft_stream: object
    device: torch.device  # where the trainer, its log-prob kernel and its advantage kernels run
    temperature: float  # the sampling temperature: every trainer log-prob is taken at it
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    total_updates: int
    step_records: dict  # the checkpointed step's metrics and game lines (written again if a kill lost them)


def check_trainable_sampling(cfg: TrainConfig) -> None:
    """The trainer's log-probs must be the distribution vLLM sampled from: softmax(logits / T) over the vocabulary.

    vLLM reports processed log-probs (after temperature and top_p); a top_p < 1 renormalises over a nucleus the
    trainer does not compute, so every importance weight would be biased (all <= 1 at top_p 0.9). Refused."""
    s = cfg.sampling
    if s.temperature <= 0:
        raise UserError(f"sampling.temperature {s.temperature} is greedy decoding: there is no sampling "
                        f"distribution to train on; pass --sampling.temperature > 0 (e.g. 1.0)")
    if s.top_p < 1:
        raise UserError(f"sampling.top_p {s.top_p} is not supported for training: the trainer's log-probs are "
                        f"over the full vocabulary at the sampling temperature, and a nucleus would bias every "
                        f"importance weight; pass --sampling.top-p 1.0 (`fast-srt play` accepts any top_p)")
    if cfg.model.dtype == "float16" and not torch.cuda.is_available():
        raise UserError("model.dtype float16 needs CUDA (the CPU engine has no fp16 path); use bfloat16 or float32")


def check_run_dir(run_dir: Path) -> None:
    for parent in (run_dir, *run_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--run-dir {run_dir}: {parent} is a file, not a directory; pass a directory path")


# Fields a resumed run may change: they decide where and how often things are written, not what is trained.
RESUME_MAY_CHANGE = ("resume", "run_dir", "save_every", "keep_checkpoints", "log_games", "inject_nan_loss_at_step")


def check_resume_config(ckpt_dir: Path, cfg: TrainConfig) -> None:
    """UserError listing every setting that differs from the checkpoint's run (the LR schedule, the game, the data
    and the model all depend on them: a silent change would make the resumed run another run)."""
    saved_path = Path(ckpt_dir) / RUN_CONFIG_FILE
    if not saved_path.is_file():
        raise UserError(f"checkpoint {ckpt_dir} has no {RUN_CONFIG_FILE}; it was not written by `fast-srt train`")
    saved = _flatten(json.loads(saved_path.read_text()))
    now = _flatten(json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))
    diffs = [f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}"
             for k in sorted(set(saved) | set(now))
             if k.split(".")[0] not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k)]
    if diffs:
        raise UserError(f"--resume with settings that differ from the run in {ckpt_dir}: {'; '.join(diffs)}; "
                        f"resume with the run's own settings, or start a new --run-dir")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_lora_adapter(model, ckpt_dir: Path) -> None:
    from safetensors.torch import load_file

    from .lora import adapter_state_dict

    saved = load_file(str(Path(ckpt_dir) / LORA_ADAPTER_FILE))
    want = adapter_state_dict(model)
    missing, unexpected = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    bad = [k for k in set(want) & set(saved) if want[k].shape != saved[k].shape]
    if missing or unexpected or bad:
        raise UserError(f"LoRA adapter in {ckpt_dir} does not match this run's adapters (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}, other shape {bad[:3]}); resume with the run's lora_rank and "
                        f"lora_targets")
    model.load_state_dict(saved, strict=False)  # the adapters only; the base weights came from the base model


def setup_run(cfg: TrainConfig) -> Run:
    """Resume point, seeds, trainer model (+ LoRA), engines, reference, optimizer, kernels; all chosen once."""
    from .kernels import select_advantages_impl
    from .models import resolve_model

    faults.target()  # a malformed FAST_SRT_KILL_AT is refused before anything starts
    check_trainable_sampling(cfg)
    run_dir = Path(cfg.run_dir)
    check_run_dir(run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the one place the device is chosen
    torch.manual_seed(cfg.seed)
    compute_dtype = getattr(torch, cfg.model.dtype)
    # fp32 master weights; matmuls in the compute dtype under autocast (bf16 updates at lr 5e-7 would vanish)
    autocast = lambda: torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)  # noqa
    base_dir = resolve_model(cfg.model.model, cfg.model.dtype)
    ckpt_dir, state = None, None
    if cfg.resume:
        ckpt_dir = find_latest(run_dir)
        if ckpt_dir is None:
            raise UserError(f"--resume: {run_dir} has no complete checkpoint; run without --resume to start")
    elif find_latest(run_dir) is not None:
        raise UserError(f"{run_dir} already holds checkpoints; pass --resume to continue or a new --run-dir")
    pool = SeedPool(cfg.game, rng_seed=cfg.seed)
    model = load_policy(str(base_dir), dtype=torch.float32, device=device,
                        gradient_checkpointing=cfg.gradient_checkpointing)
    if ckpt_dir is not None:
        ckpt_dir, state = load_checkpoint(run_dir, model=model)  # checks it is the same model
        check_resume_config(ckpt_dir, cfg)
        if not cfg.lora_rank:
            model = load_policy(str(ckpt_dir), dtype=torch.float32, device=device,
                                gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        if ckpt_dir is not None:
            load_lora_adapter(model, ckpt_dir)
    optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay)
    check_free_space(run_dir, checkpoint_bytes(model))
    engines = build_engines(cfg.model, cfg.game, trains=True, seed=cfg.seed, base_dir=base_dir,
                            policy_dir=Path(ckpt_dir) if ckpt_dir is not None else base_dir,
                            judge_max_tokens=cfg.sampling.judge_max_tokens)
    ref = None
    if cfg.algo.kl_coef > 0 and not cfg.lora_rank:  # with LoRA the reference is the model with adapters off
        ref = load_reference(str(base_dir), compute_dtype, device)
    n_updates = total_updates(cfg)
    scheduler = build_scheduler(optimizer, n_updates, int(cfg.optim.warmup_ratio * n_updates), cfg.optim.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype == torch.float16)
    sft_stream = None
    if cfg.algo.sft_coef > 0:
        from .sft import SFTStream, build_sft_samples, load_sft_records

        samples = build_sft_samples(load_sft_records(cfg.algo.sft_data), engines.policy.tokenizer)
        sft_stream = SFTStream(samples, seed=cfg.seed)
    start_step, step_records = 0, {}
    if state is not None:
        extra = restore_trainer_state(state, optimizer, scheduler)
        start_step = int(state["step"])
        pool.rng.setstate(_tuple_state(extra["seed_rng"]))
        step_records = extra.get("step_records") or {}
        if sft_stream is not None:
            sft_stream.load_state_dict(extra["sft_stream"])
        if scaler.is_enabled() and extra.get("grad_scaler"):
            scaler.load_state_dict(extra["grad_scaler"])
    return Run(cfg=cfg, run_dir=run_dir, autocast=autocast, pool=pool,
               options=GameOptions(mode=cfg.game.mode, cot=cfg.game.cot), reward_fn=reward_function(cfg.game.reward),
               model=model, ref=ref, engines=engines, optimizer=optimizer, scheduler=scheduler,
               start_step=start_step, resumed=state is not None,
               logprob_fn=pick_logprob_impl(cfg.logprob_impl, device),  # chosen once, never per call
               adv_fns=select_advantages_impl(device), sft_stream=sft_stream, step_records=step_records,
               device=device, temperature=cfg.sampling.temperature, scaler=scaler, total_updates=n_updates)


def checkpoint_extra(run: Run, records: dict) -> dict:
    """What a checkpoint carries besides weights, optimizer, scheduler and RNG (all weights_only-loadable)."""
    extra = {"seed_rng": _list_state(run.pool.rng.getstate()), "step_records": records}
    if run.sft_stream is not None:
        extra["sft_stream"] = run.sft_stream.state_dict()
    if run.scaler.is_enabled():
        extra["grad_scaler"] = run.scaler.state_dict()
    return extra


def old_and_ref_logprobs(run: Run, samples) -> tuple[list, list | None]:
    """Trainer log-probs at experience time, and under the frozen reference when the KL term needs them, all at
    the sampling temperature."""
    cfg, mb = run.cfg, run.cfg.optim.micro_batch_tokens
    lp = lambda m: per_sample_logprobs(m, samples, run.logprob_fn, mb, run.autocast, run.temperature)  # noqa
    old = lp(run.model)
    if run.ref is not None:
        return old, lp(run.ref)
    if cfg.lora_rank and cfg.algo.kl_coef > 0:
        with adapters_disabled(run.model):  # the base model is the reference: no second copy
            return old, lp(run.model)
    return old, None


def train(cfg: TrainConfig) -> Path:
    t_start = time.perf_counter()
    run = setup_run(cfg)
    model, engines, run_dir = run.model, run.engines, run.run_dir
    spec = SamplingSpec(max_tokens=cfg.sampling.max_new_tokens, temperature=cfg.sampling.temperature,
                        top_p=cfg.sampling.top_p)
    probe = [engines.policy.tokenizer.apply_chat_template([{"role": "user", "content": PROBE_PROMPT}],
                                                          tokenize=False, add_generation_prompt=True)]
    greedy = SamplingSpec(max_tokens=16, temperature=0.0, logprobs=False)
    prev_probe = engines.policy.generate(probe, greedy, phase="probe")[0].text
    resume_step = run.start_step if run.resumed else None
    # a kill between the checkpoint and its metrics line loses no line: the checkpoint carries the step's records
    log = MetricsLog(run_dir / "metrics.jsonl", resume_step, restore=run.step_records.get("metrics"))
    games_log = MetricsLog(run_dir / "games.jsonl", resume_step, restore=run.step_records.get("games"))
    status = Status(cfg.steps)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    print(memory_plan(model, run.ref, engines, cfg))
    print(f"start-up {time.perf_counter() - t_start:.1f} s; torch threads {torch.get_num_threads()}; log-prob "
          f"impl {getattr(run.logprob_fn, '__name__', run.logprob_fn)}; from step {run.start_step}", flush=True)

    for step in range(run.start_step + 1, cfg.steps + 1):
        faults.enter_step(step)
        timer, t0 = PhaseTimer(), time.perf_counter()
        gen_before = {id(e): {k: dict(v) for k, v in e.stats.per_phase.items()}
                      for e in (engines.policy, engines.judge.engine)}
        # 1-2) play and judge one batch of games
        status.phase(step, "play + judge")
        n_seeds = cfg.sampling.games_per_step // cfg.algo.samples_per_prompt
        seeds = run.pool.batch(n_seeds)
        seeds = [s for s in seeds for _ in range(cfg.algo.samples_per_prompt)]
        group_of = [i // cfg.algo.samples_per_prompt for i in range(len(seeds))]
        games = play_games(engines.policy, engines.judge, seeds, run.options, spec, run.reward_fn,
                           engines.frozen_defender)
        # 3) samples of both roles, ties and parse failures dropped
        samples, skipped = games_to_samples(games, run.options, cfg.algo.remove_ties, group_of)
        metrics = {"step": step, **rollout_metrics(games, samples, skipped, engines.judge)}
        if samples:
            # 4) old and reference log-probs (no grad), packed
            status.phase(step, "log-probs")
            model.eval()
            with timer("logprob"):
                old, refl = old_and_ref_logprobs(run, samples)
            # 5) advantages
            with timer("advantage"):
                advs, adv_metrics = compute_advantages(cfg, samples, old, refl, run.adv_fns, run.device)
            metrics.update(adv_metrics)
            # 6) PPO-clip updates
            status.phase(step, "train")
            model.train()
            engines.policy.release_for_training()
            with timer("train"):
                metrics.update(update_policy(run, step, samples, old, refl, advs))
            # 7) weights into the live engine, in place
            status.phase(step, "weight sync")
            with timer("sync"):
                metrics["time/sync_push_s"] = sync_weights(engines.policy, model)
            probe_text = engines.policy.generate(probe, greedy, phase="probe")[0].text
            metrics["sync/probe_changed"] = probe_text != prev_probe
            prev_probe = probe_text
        else:
            metrics["optim/skipped_updates"] = cfg.optim.updates_per_step
        if metrics.get("optim/skipped_updates"):
            status.line(f"step {step}: {metrics['optim/skipped_updates']} update(s) skipped (non-finite loss or "
                        f"gradient; no sample survived filtering if all); training continues")
        # timings, tokens, log
        gen_s, judge_s, gen_tok = _engine_deltas(engines, gen_before)
        trained = sum(s.num_tokens for s in samples)
        wall = time.perf_counter() - t0
        metrics.update({f"time/{k}_s": v for k, v in timer.seconds.items()})
        metrics.update({"time/generate_s": gen_s, "time/judge_s": judge_s, "time/step_s": wall,
                        "tokens/generated": gen_tok, "tokens/trained": trained,
                        "perf/tokens_per_s": (gen_tok + trained) / wall,
                        "perf/gen_tokens_per_s": gen_tok / max(gen_s, 1e-9)})
        metrics = to_floats(metrics)
        records = {"metrics": [metrics], "games": [game_record(step, g) for g in games[: cfg.log_games]]}
        if step % cfg.save_every == 0 or step == cfg.steps:
            status.phase(step, "checkpoint")
            try:
                with timer("checkpoint"):
                    save_checkpoint(run_dir, step, model, engines.policy.tokenizer, run.optimizer, run.scheduler,
                                    checkpoint_extra(run, records), dataclasses.asdict(cfg),
                                    keep_last=cfg.keep_checkpoints)
            except UserError:  # a failed write (disk full): the step's lines still reach the logs, then one line
                log.write(metrics)
                for rec in records["games"]:
                    games_log.write(rec)
                raise
            faults.hit("after_checkpoint")
            metrics = {**metrics, "time/checkpoint_s": timer.seconds["checkpoint"]}
        log.write(metrics)
        for rec in records["games"]:
            games_log.write(rec)
        status.line(console_line(metrics))
    from .cli import _child_processes, throughput_lines

    for line in throughput_lines(engines):
        print(line)
    print(f"one process: pid {os.getpid()}, child processes {_child_processes()}; judge parse failures "
          f"{engines.judge.parse_failures}/{engines.judge.calls}")
    print(f"done: {cfg.steps - run.start_step} steps in {time.perf_counter() - t_start:.1f} s; metrics in "
          f"{run_dir / 'metrics.jsonl'}, games in {games_log.path}, checkpoints in {run_dir / 'checkpoints'}")
    return run_dir


def _engine_deltas(engines, before) -> tuple[float, float, int]:
    gen_s = judge_s = 0.0
    gen_tok = 0
    for e in {id(engines.policy): engines.policy, id(engines.judge.engine): engines.judge.engine}.values():
        for phase, st in e.stats.per_phase.items():
            b = before[id(e)].get(phase, {"seconds": 0.0, "gen_tokens": 0})
            ds = st["seconds"] - b["seconds"]
            if phase == "judge":
                judge_s += ds
            elif phase != "probe":
                gen_s += ds
                gen_tok += st["gen_tokens"] - b["gen_tokens"]
    return gen_s, judge_s, gen_tok


def game_record(step: int, g) -> dict:
    return {"step": step, "data_type": g.data_type, "seed": g.seed.prompt,
            "attacker_raw": g.attacker.gen.text if g.attacker else None,
            "attacker_public": g.attacker.public if g.attacker else None,
            "defender_raw": g.defender.gen.text, "defender_public": g.defender.public,
            "judge": g.judge_text, "outcome": g.rewards.outcome,
            "reward_attacker": g.rewards.attacker, "reward_defender": g.rewards.defender}


def _list_state(s):
    return [s[0], list(s[1]), s[2]]


def _tuple_state(s):
    return (s[0], tuple(s[1]), s[2])


if __name__ == "__main__":  # vLLM needs the main guard
    import sys

    from .cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
