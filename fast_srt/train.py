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
from .checkpoint import LORA_ADAPTER_FILE, find_latest, load_checkpoint, restore_trainer_state, save_checkpoint
from .config import PRESETS, TrainConfig
from .engine import SamplingSpec
from .errors import UserError
from .game import GameOptions
from .lora import adapters_disabled, apply_lora
from .loss import ppo_clip_loss, sft_loss
from .metrics import MetricsLog, PhaseTimer, Status, console_line, to_floats
from .policy import build_optimizer, build_scheduler, load_policy, token_logprobs
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
def per_sample_logprobs(model, samples, logprob_fn, micro_tokens: int, autocast) -> list[torch.Tensor]:
    """Trainer log-probs of each sample's response tokens, [R_s] each, in token-budget micro-batches."""
    out: dict[int, torch.Tensor] = {}
    index = {id(s): i for i, s in enumerate(samples)}
    for mb in split_micro_batches(samples, micro_tokens):
        batch = pack(mb, device=model.device)
        with autocast():
            logp, _ = token_logprobs(model, batch, logprob_fn)
        for s, v in zip(mb, batch.split_responses(logp.float())):
            out[index[id(s)]] = v.cpu()
    return [out[i] for i in range(len(samples))]


def compute_advantages(cfg: TrainConfig, samples, old, ref, adv_fns) -> tuple[list[torch.Tensor], dict]:
    """Per-sample advantages [R_s] for the chosen estimator, on the whole rollout at once."""
    reinforce_fn, group_fn = adv_fns
    full = pack(samples)  # host tensors; the advantage pass is O(T)
    old_t = full.scatter_responses(old)
    ref_t = full.scatter_responses(ref) if ref is not None else old_t
    kl = (old_t - ref_t)[full.loss_mask]
    if cfg.algo.estimator == "reinforce_pp":
        adv, _ = reinforce_fn(old_t, ref_t, full.rewards, full.cu_seqlens, full.loss_mask, full.roles,
                              kl_coef=cfg.algo.kl_coef, n_roles=len(ROLE_IDS), whiten=cfg.algo.whiten)
    else:
        groups = torch.tensor([s.metadata["group"] for s in samples], dtype=torch.int64)
        adv = group_fn(full.rewards, groups, full.cu_seqlens, full.loss_mask, kind=cfg.algo.estimator)
    return full.split_responses(adv), {"kl/mean": kl.mean() if kl.numel() else torch.tensor(0.0)}


def update_policy(cfg, step, model, optimizer, scheduler, samples, old, advs, logprob_fn, autocast, sft_stream,
                  ) -> dict:
    """updates_per_step optimizer steps over shuffled mini-batches; a non-finite loss skips its optimizer step."""
    o, a = cfg.optim, cfg.algo
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
        finite = True
        for mb in split_micro_batches(mini, o.micro_batch_tokens):
            pos = [where[id(x)] for x in mb]
            batch = pack(mb, device=model.device)
            old_t = batch.scatter_responses([old[i] for i in pos])
            adv_t = batch.scatter_responses([advs[i] for i in pos])
            with autocast():
                logp, ent = token_logprobs(model, batch, logprob_fn)
            loss, metrics = ppo_clip_loss(logp, old_t, adv_t, batch.loss_mask, clip_eps=a.clip_eps,
                                          vllm_logp=batch.vllm_logp if a.importance_correction else None,
                                          tis_cap=a.tis_cap, entropy=ent, num_tokens=n_tokens)
            if a.sft_coef > 0 and sft_stream is not None:
                sb = pack(sft_stream.next(a.sft_samples_per_micro_step), device=model.device)
                with autocast():
                    slp, _ = token_logprobs(model, sb, logprob_fn)
                s_loss, s_metrics = sft_loss(slp, sb.loss_mask)
                loss = loss + a.sft_coef * s_loss * (batch.num_loss_tokens / n_tokens)
                metrics.update(s_metrics)
            if step == cfg.inject_nan_loss_at_step:
                loss = loss * float("nan")
            if not torch.isfinite(loss.detach()):  # host sync, once per micro-step, before backward
                finite = False
                break
            loss.backward()
            for k, v in metrics.items():
                acc.setdefault(k, []).append(v)
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            continue
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        if not torch.isfinite(gn):
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            continue
        acc.setdefault("optim/grad_norm", []).append(gn.detach())
        optimizer.step()
        scheduler.step()
        faults.hit("update")
    out = {}
    for k, vs in acc.items():
        t = torch.stack([v.float() for v in vs])
        out[k] = t.max() if k.endswith("_max") else (t.min() if k.endswith("_min") else t.mean())
    out["optim/skipped_updates"] = skipped
    out["optim/updates"] = n_mini - skipped
    out["optim/lr"] = scheduler.get_last_lr()[0]
    return out


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
    dt = push_weights(engine.llm, faults.hit_halfway("weight_sync", named_weights_for_engine(model), n))
    engine.wake_kv_cache()
    return dt


def rollout_metrics(games, samples, skipped, judge) -> dict:
    m: dict = {"games/n": len(games), "games/ties": skipped["tie"], "games/dropped": skipped["dropped"],
               "games/empty_turns": skipped["empty"], "judge/parse_failures_total": judge.parse_failures}
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
             f"  reference model {0 if ref is None else n * next(ref.parameters()).element_size() / gib:6.2f} GiB  "
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
    step_records: dict  # the checkpointed step's metrics and game lines (written again if a kill lost them)


def setup_run(cfg: TrainConfig) -> Run:
    """Resume point, seeds, trainer model (+ LoRA), engines, reference, optimizer, kernels; all chosen once."""
    from .kernels import select_advantages_impl
    from .models import resolve_model

    faults.target()  # a malformed FAST_SRT_KILL_AT is refused before anything starts
    run_dir = Path(cfg.run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
        if not cfg.lora_rank:
            model = load_policy(str(ckpt_dir), dtype=torch.float32, device=device,
                                gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        if ckpt_dir is not None:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(Path(ckpt_dir) / LORA_ADAPTER_FILE)), strict=False)
    engines = build_engines(cfg.model, cfg.game, trains=True, seed=cfg.seed,
                            policy_dir=Path(ckpt_dir) if ckpt_dir is not None else base_dir)
    ref = None
    if cfg.algo.estimator == "reinforce_pp" and cfg.algo.kl_coef > 0 and not cfg.lora_rank:
        ref = load_policy(str(base_dir), dtype=compute_dtype, device=device).eval().requires_grad_(False)
    optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay)
    total_updates = max(1, int(cfg.steps * cfg.optim.updates_per_step * cfg.optim.lr_horizon_scale))
    scheduler = build_scheduler(optimizer, total_updates, int(cfg.optim.warmup_ratio * total_updates),
                                cfg.optim.min_lr_ratio)
    start_step, step_records = 0, {}
    if state is not None:
        extra = restore_trainer_state(state, optimizer, scheduler)
        start_step = int(state["step"])
        pool.rng.setstate(_tuple_state(extra["seed_rng"]))
        step_records = extra.get("step_records") or {}
    sft_stream = None
    if cfg.algo.sft_coef > 0:
        from .sft import SFTStream, build_sft_samples, load_sft_records

        samples = build_sft_samples(load_sft_records(cfg.algo.sft_data), engines.policy.tokenizer)
        sft_stream = SFTStream(samples, seed=cfg.seed)
    return Run(cfg, run_dir, autocast, pool, GameOptions(mode=cfg.game.mode, cot=cfg.game.cot),
               reward_function(cfg.game.reward), model, ref, engines, optimizer, scheduler, start_step,
               state is not None, pick_logprob_impl(cfg.logprob_impl, device),  # chosen once, never per call
               select_advantages_impl(device), sft_stream, step_records)


def old_and_ref_logprobs(run: Run, samples) -> tuple[list, list | None]:
    """Trainer log-probs at experience time, and under the frozen reference when the KL term needs them."""
    cfg, mb = run.cfg, run.cfg.optim.micro_batch_tokens
    old = per_sample_logprobs(run.model, samples, run.logprob_fn, mb, run.autocast)
    if run.ref is not None:
        return old, per_sample_logprobs(run.ref, samples, run.logprob_fn, mb, run.autocast)
    if cfg.lora_rank and cfg.algo.estimator == "reinforce_pp" and cfg.algo.kl_coef > 0:
        with adapters_disabled(run.model):  # the base model is the reference: no second copy
            return old, per_sample_logprobs(run.model, samples, run.logprob_fn, mb, run.autocast)
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
                advs, adv_metrics = compute_advantages(cfg, samples, old, refl, run.adv_fns)
            metrics.update(adv_metrics)
            # 6) PPO-clip updates
            status.phase(step, "train")
            model.train()
            engines.policy.release_for_training()
            with timer("train"):
                metrics.update(update_policy(cfg, step, model, run.optimizer, run.scheduler, samples, old, advs,
                                             run.logprob_fn, run.autocast, run.sft_stream))
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
            with timer("checkpoint"):
                save_checkpoint(run_dir, step, model, engines.policy.tokenizer, run.optimizer, run.scheduler,
                                {"seed_rng": _list_state(run.pool.rng.getstate()), "step_records": records},
                                dataclasses.asdict(cfg), keep_last=cfg.keep_checkpoints)
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
