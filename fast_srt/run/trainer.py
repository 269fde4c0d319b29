"""`fast-srt train`: self-play RL (Self-RedTeam) in one process. `train_step` is the one training step:

  1. play a batch of games with the policy engine (attacker turns, then defender turns, same weights)
  2. judge them in-process (greedy, constrained to the three-line answer) and compute rewards (docs/game.md §3)
  3. drop ties and parse failures; turn both roles' turns into training samples
  4-6. the learner: old and reference log-probs, advantages, PPO-clip updates (fast_srt.learner.step)
  7. write the new weights into the live engine in place (fast_srt.engine.weight_sync)

`train` sets the run up once (`setup_run`), then for each step runs `train_step`, checkpoints, and logs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from fast_srt import faults
from fast_srt.config import LeagueConfig, TrainConfig, WarmupConfig
from fast_srt.engine.engine import SamplingSpec, derive_seed, vllm_version
from fast_srt.engine.placement import Engines, build_engines
from fast_srt.engine.rollout import play_games
from fast_srt.engine.weight_sync import push_adapter, push_weights
from fast_srt.errors import UserError
from fast_srt.game.rewards import reward_function
from fast_srt.game.rules import GameOptions
from fast_srt.game.seeds import SeedPool
from fast_srt.learner import collective, sharding
from fast_srt.learner.batch import ROLE_IDS
from fast_srt.learner.lora import (adapter_for_engine, apply_lora, base_to_compute_dtype, lora_roles,
                                   save_peft_adapter)
from fast_srt.learner.policy import (VARLEN_SDPA, build_optimizer, build_scheduler, load_policy, load_reference,
                                     pick_attention, weights_for_engine)
from fast_srt.learner.step import (Learner, games_to_samples, learner_step, pick_logprob_impl, scheduler_step,
                                   total_updates)
from fast_srt.run import distributed
from fast_srt.run.checkpoint import (COMPLETE, LORA_ADAPTER_FILE, ROLE_ADAPTER_DIR, RUN_CONFIG_FILE,
                                     check_free_space, checkpoint_bytes, find_latest, load_checkpoint,
                                     model_only_view, restore_trainer_state, save_checkpoint)
from fast_srt.run.league import League
from fast_srt.run.metrics import MetricsLog, PhaseTimer, Status, console_line, read_metrics, step_perf, to_floats
from fast_srt.run.models import resolve_engine_dirs
from fast_srt.run.plan import engine_adapters
from fast_srt.run.report import child_processes, process_metrics, throughput_lines
from fast_srt.run.trend import trend_lines

CANARY_PROMPT = "What is the capital of France?"
GREEDY_CANARY = SamplingSpec(max_tokens=16, temperature=0.0, logprobs=False)


@dataclasses.dataclass
class Run:
    """Everything a run builds once, before its first step."""

    cfg: TrainConfig
    run_dir: Path
    pool: SeedPool
    options: GameOptions
    reward_fn: object
    engines: Engines
    learner: Learner
    start_step: int
    resumed: bool
    step_records: dict  # the checkpointed step's metrics and game lines (written again if a kill lost them)
    sampling: SamplingSpec
    warmup_key: str | None = None  # the format warm-up the run started from (fast_srt.learner.warmup), if any
    canary: str = ""  # a fixed chat prompt, generated greedily after each weight write
    canary_text: str = ""
    saved_replay: dict | None = None  # the checkpoint's replay conditions (replay_conditions), on resume
    ranks: distributed.Ranks = dataclasses.field(default_factory=distributed.Ranks)  # torchrun: this rank, world
    base_model_dir: Path | None = None  # the original base model, before any warm-up (the eval's frozen defender)
    league: League | None = None  # the opponent league's snapshots (--league.every), if on


# ------------------------------------------------------------------------------------------------ the step

def train_step(run: Run, step: int, status: Status) -> tuple[dict, list]:
    """One self-play step (module docstring, 1-7): returns its metrics and its games."""
    cfg, engines, learner = run.cfg, run.engines, run.learner
    sync = torch.cuda.synchronize if learner.device.type == "cuda" else None  # phases own their GPU work
    timer, t0, snap = PhaseTimer(sync), time.perf_counter(), engines.snapshot()
    # 1-2) play and judge one batch of games (each seed samples_per_prompt times: the GRPO/RLOO group)
    status.phase(step, "play + judge")
    seeds, group_of = run.pool.group_batch(cfg.sampling.games_per_step, cfg.algo.samples_per_prompt)
    seeds, group_of = distributed.my_share(seeds, group_of, run.ranks)  # torchrun: this rank's share of the batch
    lora = engines.policy.role_adapters or None  # per-role: each role's turns with its adapter
    if run.league is not None:  # each game's opponent: current, or a snapshot playing one side
        draws = run.league.draw(seeds, cfg.seed, step, run.ranks.rank)
        lora = run.league.loras(draws, engines.policy.role_adapters)
    games = play_games(engines.policy, engines.judge, seeds, run.options, run.sampling, run.reward_fn,
                       engines.frozen_defender, rng_seed=derive_seed(cfg.seed, step, run.ranks.rank), lora=lora)
    if run.league is not None:  # a snapshot's turn is not trained
        run.league.mark(games, draws)
    # 3) samples of both roles, ties and parse failures dropped
    samples, skipped = games_to_samples(games, run.options, cfg.algo.remove_ties, group_of)
    metrics = {"step": step, **rollout_metrics(games, samples, skipped, engines.judge)}
    if run.league is not None:
        metrics.update(run.league.metrics(games, draws))
    if distributed.global_count(len(samples)):  # torchrun: a rank with none still joins the reductions
        # 4-6) old and reference log-probs, advantages, PPO-clip updates
        status.phase(step, "learn")
        engines.policy.release_kv_cache()
        metrics.update(learner_step(learner, step, samples, timer))
        # 7) weights into the live engine, in place
        status.phase(step, "weight sync")
        with timer("sync"):
            metrics["time/sync_push_s"] = sync_weights(engines.policy, learner.model)
        metrics["sync/canary_changed"] = canary_changed(run)
    else:  # no sample survived on any rank: the planned updates are skipped, and their LR slots pass
        metrics["optim/skipped_updates"] = cfg.optim.updates_per_step
        for _ in range(cfg.optim.updates_per_step):
            scheduler_step(learner)
    if run.league is not None and run.league.due(step):  # this step's adapters join the league
        run.league.take(sharding.unwrap(learner.model), step)
    if metrics.get("optim/skipped_updates"):
        status.line(f"step {step}: {metrics['optim/skipped_updates']} update(s) skipped (non-finite loss or "
                    f"gradient; no sample survived filtering if all); training continues")
    phases = engines.since(snap)
    for name, d in phases.items():  # share of prompt tokens vLLM's prefix cache served (judge: its instruction)
        if d.get("cache_queries"):
            metrics[f"prefix_cache/{name}_hit_rate"] = d["cache_hits"] / d["cache_queries"]
    metrics.update(step_perf(timer, phases, sum(s.num_tokens for s in samples),
                             time.perf_counter() - t0, sum(len(s.response_ids) for s in samples)))
    metrics.update(process_metrics())
    return to_floats(metrics), games


def sync_weights(engine, model) -> float:
    """Write the trainer's weights into the live engine, in place, in its dtype (see weight_sync.py): with an
    adapter served by the engine only the adapter's tensors (per-role: each role's into its own), else every weight
    (LoRA merged)."""
    if engine.role_adapters:
        dt = 0.0
        for role, request in engine.role_adapters.items():
            adapters = adapter_for_engine(model, role)
            dt += push_adapter(engine.llm, request.lora_int_id,
                               faults.hit_halfway("weight_sync", adapters.items(), len(adapters)))
    elif engine.adapter is not None:
        adapters = adapter_for_engine(model)
        dt = push_adapter(engine.llm, engine.adapter.lora_int_id,
                          faults.hit_halfway("weight_sync", adapters.items(), len(adapters)))
    else:
        lm = sharding.unwrap(model)
        n = len(lm.state_dict()) + 1  # + the output head, always sent
        # FSDP2: each tensor all-gathered on every rank, in the engine's dtype, one at a time
        weights = sharding.full_tensors(weights_for_engine(lm, engine.dtype))
        dt = push_weights(engine.llm, faults.hit_halfway("weight_sync", weights, n))
    engine.wake_kv_cache()
    return dt


def attach_policy_adapter(engine, model, base_dir: Path) -> None:
    """Serve the trainer's adapter (fresh, or the checkpoint's on resume) on the policy engine's base weights;
    per-role adapters side by side, as LoRA requests `attacker` (id 1) and `defender` (id 2), the defender's the
    engine's default (the canary, the eval's answers)."""
    import tempfile

    for lora_id, role in enumerate(lora_roles(model) or [None], start=1):
        with tempfile.TemporaryDirectory(prefix="fast_srt-adapter-") as d:  # read once: later writes go in place
            save_peft_adapter(model, d, base_model=str(base_dir), role=role)
            if role is None:
                engine.attach_adapter(d)
            else:
                engine.attach_adapter(d, name=role, lora_int_id=lora_id, role=role, default=role == "defender")


def canary_changed(run: Run) -> bool:
    """Whether the engine's greedy answer to a fixed prompt changed with the last weight write."""
    text = run.engines.policy.generate([run.canary], GREEDY_CANARY, phase="canary")[0].text
    changed, run.canary_text = text != run.canary_text, text
    return changed


def rollout_metrics(games, samples, skipped, judge) -> dict:
    m: dict = {"games/n": len(games), "games/ties": skipped["tie"], "games/dropped": skipped["dropped"],
               "games/empty_turns": skipped["empty"], "judge/parse_failures_total": judge.parse_failures,
               "judge/truncated_total": judge.truncated, "judge/too_long_total": judge.too_long}
    for role in ("attacker", "defender"):
        rs = [getattr(g.rewards, role) for g in games if getattr(g.rewards, role) is not None and not g.rewards.tie]
        m[f"reward/{role}_mean"] = sum(rs) / len(rs) if rs else None
        turns = [getattr(g, role) for g in games if getattr(g, role) is not None and getattr(g, role).fmt is not None]
        m[f"format/{role}_violation_rate"] = (sum(not t.fmt.valid for t in turns) / len(turns)) if turns else None
        m[f"games/{role}_rewarded"], m[f"games/{role}_format_checked"] = len(rs), len(turns)  # the means' counts
        m[f"samples/{role}"] = sum(s.role == role for s in samples)
    for g in games:
        m[f"outcome/{g.rewards.outcome}"] = m.get(f"outcome/{g.rewards.outcome}", 0) + 1
    return m


# ------------------------------------------------------------------------------------------------ the run

def train(cfg: TrainConfig, make_eval=None) -> Path:
    """Set up once, then per step: train_step, the eval when due, checkpoint (every save_every and at the end), log.

    make_eval(run) -> evaluate: the eval during training, when cfg.eval_every asks for it (`fast-srt train` passes
    fast_srt.eval.training.TrainingEval; this layer does not import the eval layer): evaluate(step) -> metrics,
    evaluate.describe() -> its start-up line, evaluate.console_lines(metrics) -> lines after an eval's step line,
    evaluate.summary_lines(records) -> the end-of-run lines, evaluate.startup_metrics -> the baseline's extras."""
    t_start = time.perf_counter()
    run = setup_run(cfg)
    run.canary = run.engines.policy.tokenizer.apply_chat_template(
        [{"role": "user", "content": CANARY_PROMPT}], tokenize=False, add_generation_prompt=True)
    canary_changed(run)
    logs = open_logs(run)
    status = Status(cfg.steps)
    evaluate = start_eval(run, make_eval)
    print_start(run, t_start, evaluate)
    if evaluate is not None and run.start_step == 0:  # the baseline, before any update
        record = {"step": 0, **evaluate.startup_metrics, **eval_at(run, evaluate, 0, status)}
        write_records(*logs, {"metrics": [record], "games": []})
        for line in evaluate.console_lines(record):
            status.line(line)
    for step in range(run.start_step + 1, cfg.steps + 1):
        train_and_log_step(run, step, status, logs, evaluate)
    print_end(run, t_start, evaluate)
    distributed.finish(run.ranks)
    return run.run_dir


def open_logs(run: Run) -> tuple[MetricsLog, MetricsLog] | None:
    """Rank 0's metrics and games logs (continued on resume; a kill between the checkpoint and its metrics line
    loses no line: the checkpoint carries the step's records) and the run's config.json; None on other ranks."""
    if not run.ranks.main:  # torchrun: rank 0 writes the logs and checkpoints (fast_srt.run.distributed)
        return None
    resume_step = run.start_step if run.resumed else None
    log = MetricsLog(run.run_dir / "metrics.jsonl", resume_step, restore=run.step_records.get("metrics"))
    games_log = MetricsLog(run.run_dir / "games.jsonl", resume_step, restore=run.step_records.get("games"))
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(run.cfg), indent=2))
    return log, games_log


def print_start(run: Run, t_start: float, evaluate) -> None:
    engines, learner = run.engines, run.learner
    print(run_plan(run.cfg, engines, run.ranks.world))
    print(engines.describe())
    if evaluate is not None:
        print(evaluate.describe())
    print(f"start-up {time.perf_counter() - t_start:.1f} s; torch threads {torch.get_num_threads()}; log-prob "
          f"impl {getattr(learner.logprob_fn, '__name__', learner.logprob_fn)}; from step {run.start_step}",
          flush=True)
    warning = replay_warning(run.saved_replay, replay_conditions(run)) if run.resumed else None
    if warning:
        print(warning, flush=True)


def train_and_log_step(run: Run, step: int, status: Status, logs, evaluate) -> None:
    """train_step, its metrics reduced over the ranks, the eval when due, the checkpoint when due, the logs."""
    cfg, ranks = run.cfg, run.ranks
    faults.enter_step(step)
    metrics, games = train_step(run, step, status)
    metrics = distributed.reduce_metrics(metrics, ranks)  # torchrun: one record for all ranks
    if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
        metrics.update(eval_at(run, evaluate, step, status))  # in the step's records: checkpointed, replayed
    records = {"metrics": [metrics], "games": distributed.gather_games(
        [game_record(step, g) for g in games[: cfg.log_games]], cfg.log_games, ranks)}
    if step % cfg.save_every == 0 or step == cfg.steps:
        status.phase(step, "checkpoint")
        seconds = save_step_checkpoint(run, step, records, logs)
        records["metrics"] = [{**metrics, "time/checkpoint_s": seconds}]
    if ranks.main:
        write_records(*logs, records)
    status.line(console_line(records["metrics"][0]))
    if ranks.world > 1:
        status.line(distributed.rank_times_line(records["metrics"][0], ranks))
    if evaluate is not None and "time/eval_s" in metrics:
        for line in evaluate.console_lines(metrics):
            status.line(line)


def print_end(run: Run, t_start: float, evaluate) -> None:
    engines, ranks, run_dir = run.engines, run.ranks, run.run_dir
    for line in throughput_lines(engines):
        print(line)
    records = read_metrics(run_dir / "metrics.jsonl") if ranks.main else []
    for line in trend_lines(records):  # did it learn? slopes with 95% intervals
        print(line)
    for line in evaluate.summary_lines(records) if evaluate is not None else []:  # held out: last eval vs first
        print(line)
    print(f"one process: pid {os.getpid()}, child processes {child_processes()}; judge parse failures "
          f"{engines.judge.parse_failures}/{engines.judge.calls}")
    print(f"done: {run.cfg.steps - run.start_step} steps in {time.perf_counter() - t_start:.1f} s; metrics in "
          f"{run_dir / 'metrics.jsonl'}, games in {run_dir / 'games.jsonl'}, checkpoints in {run_dir / 'checkpoints'}"
          + (f"; {ranks.world} ranks" if ranks.world > 1 else ""))


# ------------------------------------------------------------------------------------------ eval during training

def start_eval(run: Run, make_eval):
    """The eval during training (make_eval(run)), on rank 0 only; None when off, or when the caller gave no
    make_eval (then one line says so)."""
    if not run.cfg.eval_every or not run.ranks.main:
        return None
    if make_eval is None:
        print("eval during training: off (eval_every is set, but this caller runs the trainer without the eval; "
              "`fast-srt train` runs it)")
        return None
    return make_eval(run)


def eval_at(run: Run, evaluate, step: int, status: Status) -> dict:
    """One eval during training: its metrics and time/eval_s (its wall seconds). The training's random state and
    the policy engine's prefix cache are left as the step's weight write left them (emptied, then the canary), so
    a run resumed from this step's checkpoint, which never ran this eval, replays the run."""
    status.phase(step, "eval")
    t0 = time.perf_counter()
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        metrics = to_floats(evaluate(step))
    run.engines.policy.llm.reset_prefix_cache()
    canary_changed(run)
    metrics["time/eval_s"] = time.perf_counter() - t0
    return metrics


def save_step_checkpoint(run: Run, step: int, records: dict, logs: tuple | None) -> float:
    """Checkpoint `step`: every rank gathers what rank 0 writes (FSDP2's full state, each rank's SFT stream
    position), rank 0 writes it, and no rank goes on before it is complete. A failed write (disk full) still logs
    the step's lines (`logs`: rank 0's metrics and games logs), then raises its one line. Returns the seconds."""
    t0 = time.perf_counter()
    learner, ranks = run.learner, run.ranks
    full = sharding.full_state(learner.model, learner.optimizer, ranks.main) \
        if sharding.is_sharded(learner.model) else None
    streams = None if learner.sft_stream is None else distributed.gather_all(learner.sft_stream.state_dict(), ranks)
    if ranks.main:
        try:
            save_checkpoint(run.run_dir, step, sharding.unwrap(learner.model), run.engines.policy.tokenizer,
                            learner.optimizer, learner.scheduler, checkpoint_extra(run, records, streams),
                            dataclasses.asdict(run.cfg), keep_last=run.cfg.keep_checkpoints, full_state=full)
        except UserError:
            write_records(*logs, records)
            raise
    distributed.barrier(ranks)
    faults.hit("after_checkpoint")
    return time.perf_counter() - t0


def write_records(log: MetricsLog, games_log: MetricsLog, records: dict) -> None:
    for rec in records["metrics"]:
        log.write(rec)
    for rec in records["games"]:
        games_log.write(rec)


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


RUN_LOGS = ("metrics.jsonl", "games.jsonl")


def check_run_dir(run_dir: Path, resume: bool = False) -> None:
    """A path that can be a run directory; a new run (no --resume) never starts over an earlier run's logs."""
    for parent in (run_dir, *run_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--run-dir {run_dir}: {parent} is a file, not a directory; pass a directory path")
    if resume or find_latest(run_dir) is not None:  # resume_point decides (a checkpoint without --resume)
        return
    logs = [n for n in RUN_LOGS if (run_dir / n).is_file() and (run_dir / n).stat().st_size]
    if logs:
        raise UserError(f"--run-dir {run_dir} holds {' and '.join(logs)} of an earlier run that stopped before its "
                        f"first checkpoint, so there is nothing to resume; pass a new --run-dir (the earlier logs "
                        f"are kept)")


# Fields a resumed run may change: they decide where and how often things are written, not what is trained.
RESUME_MAY_CHANGE = ("resume", "run_dir", "save_every", "keep_checkpoints", "log_games", "inject_nan_loss_at_step",
                     "wandb_project",  # where metrics are also sent, not what the run computes
                     "shard",  # how the ranks hold the model, not what it computes (the checkpoint is the same)
                     # what is measured on held-out prompts, not what is trained (the eval leaves the run's random
                     # state and the policy engine's prefix cache as it found them: eval_at)
                     "eval_every", "eval_prompts", "eval_over_refusal_alarm")


def check_resume_config(ckpt_dir: Path, cfg: TrainConfig) -> None:
    """UserError listing every setting that differs from the checkpoint's run (the LR schedule, the game, the data
    and the model all depend on them: a silent change would make the resumed run another run)."""
    saved_path = Path(ckpt_dir) / RUN_CONFIG_FILE
    if not saved_path.is_file():
        raise UserError(f"checkpoint {ckpt_dir} has no {RUN_CONFIG_FILE}; it was not written by `fast-srt train`")
    # a run written before a setting existed ran with its default (the warm-up: steps 0; the roles: shared; no
    # league; the base model as frozen defender)
    saved = {**_flatten({"warmup": dataclasses.asdict(WarmupConfig()), "roles": "shared", "game.frozen_defender": "",
                         "league": dataclasses.asdict(LeagueConfig())}),
             **_flatten(json.loads(saved_path.read_text()))}
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


def frozen_defender_dir(cfg: TrainConfig, original_base: Path, run_dir: Path) -> Path:
    """attacker_only's frozen defender: --game.frozen-defender (a model or checkpoint directory: a checkpoint is
    read through run_dir/frozen_defender, its model files alone), else the base model as it was before any warm-up.
    """
    if not cfg.game.frozen_defender:
        return original_base
    d = Path(cfg.game.frozen_defender).expanduser()
    if not (d / "config.json").is_file() or not any(d.glob("*.safetensors")):
        raise UserError(f"--game.frozen-defender {d} is not a model directory (config.json and *.safetensors); pass "
                        f"a model or checkpoint directory, or drop it for the base model")
    if (d / COMPLETE).is_file():  # a checkpoint: its adapters and state are not the model's weights
        return model_only_view(d, Path(run_dir) / "frozen_defender")
    return d


def adapter_roles(cfg: TrainConfig) -> tuple[str, ...]:
    """The roles that get an adapter of their own: both with --roles per-role, none (one shared adapter) else."""
    return tuple(ROLE_IDS) if cfg.roles == "per-role" else ()


def load_lora_adapter(model, ckpt_dir: Path) -> None:
    """The checkpoint's adapters into the model: `lora_adapter.safetensors` (one shared adapter), or one file per
    role under `role_adapters/` (per-role); a checkpoint of the other kind, or of another rank or targets, is a
    UserError."""
    from safetensors.torch import load_file

    from fast_srt.learner.lora import adapter_state_dict, load_role_adapter

    ckpt_dir, roles = Path(ckpt_dir), lora_roles(model)
    shared_file, role_dir = ckpt_dir / LORA_ADAPTER_FILE, ckpt_dir / ROLE_ADAPTER_DIR
    if roles and not role_dir.is_dir():
        raise UserError(f"--roles per-role: checkpoint {ckpt_dir} holds one shared LoRA adapter, not one per role; "
                        f"resume it with --roles shared, or start a new --run-dir")
    if not roles and role_dir.is_dir():
        raise UserError(f"--roles shared: checkpoint {ckpt_dir} holds one LoRA adapter per role; resume it with "
                        f"--roles per-role, or start a new --run-dir")
    for role in roles or [None]:
        path = role_dir / f"{role}.safetensors" if role else shared_file
        if not path.is_file():
            raise UserError(f"checkpoint {ckpt_dir} has no {path.relative_to(ckpt_dir)}; it is incomplete or of "
                            f"another run")
        saved, want = load_file(str(path)), adapter_state_dict(model, role)
        missing, unexpected = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
        bad = [k for k in set(want) & set(saved) if want[k].shape != saved[k].shape]
        if missing or unexpected or bad:
            raise UserError(f"LoRA adapter {path.relative_to(ckpt_dir)} in {ckpt_dir} does not match this run's "
                            f"adapters (missing {missing[:3]}, unexpected {unexpected[:3]}, other shape {bad[:3]}); "
                            f"resume with the run's lora_rank and lora_targets")
        if role is None:
            model.load_state_dict(saved, strict=False)  # the adapters only; the base came from the base model
        else:
            load_role_adapter(model, saved, role)


def run_plan(cfg: TrainConfig, engines, ranks: int = 1) -> str:
    """The planner's two-line memory plan for this run on this device (fast_srt.run.plan, as `fast-srt plan`)."""
    from fast_srt.run.plan import device_budget_gib, plan, plan_input_from_config, render

    device = "cuda" if torch.cuda.is_available() else "cpu"
    judge = None if engines.judge_shares_policy_engine else engines.judge.engine.model_dir
    p = plan_input_from_config(cfg, device=device, budget_gib=device_budget_gib(device),
                               policy=str(engines.policy_dir), judge=judge, ranks=ranks)
    return render(p, plan(p), detail=False)


def warmed_base(cfg: TrainConfig, base_dir: Path, judge_dir: Path | None):
    """The format warm-up (trained once, then cached) as the policy's base model. The judge stays the original
    base model when it is the policy's ("policy"): the warm-up teaches the game's format, not the judge's task.
    Returns (base_dir, judge_dir, model config for the engines, warm-up key)."""
    from fast_srt.learner.warmup import ensure_warmup

    warm = ensure_warmup(base_dir, cfg.warmup, cfg.model.dtype)
    mcfg = cfg.model
    if mcfg.judge_model == "policy":
        mcfg, judge_dir = dataclasses.replace(mcfg, judge_model=str(base_dir)), base_dir
    return warm, judge_dir, mcfg, warm.name.removeprefix("warmup-")


def setup_run(cfg: TrainConfig) -> Run:
    """Resume point, seeds, trainer model (+ LoRA), engines, reference, optimizer, kernels; all chosen once."""
    ranks, sft_records = check_before_start(cfg)
    run_dir = Path(cfg.run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the one place the device is chosen
    torch.manual_seed(cfg.seed)
    compute_dtype = getattr(torch, cfg.model.dtype)
    base_dir, judge_dir = distributed.main_first(ranks, lambda: resolve_engine_dirs(cfg.model))
    ckpt_dir = resume_point(cfg, run_dir)
    mcfg, warm_key, original_base = cfg.model, None, base_dir
    if cfg.warmup.steps:  # the warmed checkpoint is the policy's base: RL start, KL reference, engines' base
        base_dir, judge_dir, mcfg, warm_key = distributed.main_first(
            ranks, lambda: warmed_base(cfg, base_dir, judge_dir))
    pool = SeedPool(cfg.game, rng_seed=cfg.seed)
    model, ckpt_dir, state, attn = placed_trainer_model(cfg, base_dir, run_dir, ckpt_dir, warm_key, device,
                                                        compute_dtype)
    optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay)
    check_free_space(run_dir, checkpoint_bytes(model))
    adapter_rank = cfg.lora_rank if cfg.lora_in_engine else 0  # the engine serves the adapter (LoRA requests)
    engines = build_engines(mcfg, cfg.game, trains=True, seed=cfg.seed, base_dir=base_dir,
                            policy_dir=Path(ckpt_dir) if ckpt_dir is not None else base_dir, judge_dir=judge_dir,
                            judge_max_tokens=cfg.sampling.judge_max_tokens, lora_rank=adapter_rank,
                            defender_dir=frozen_defender_dir(cfg, original_base, run_dir),
                            max_loras=engine_adapters(cfg))  # the league's snapshots too
    if adapter_rank:
        attach_policy_adapter(engines.policy, model, base_dir)
    league = None
    if cfg.league.every:  # on resume: the checkpoint's snapshots, served again
        league = League(cfg.league, engines.policy, cfg.lora_alpha / cfg.lora_rank, base_dir)
        league.restore((state or {}).get("extra", {}).get("league") or [])
    ref = kl_reference(cfg, base_dir, compute_dtype, device, attn)
    learner, restored = build_learner(cfg, model, ref, optimizer, state, pool, engines.policy.tokenizer, sft_records,
                                      device, ranks)
    start_step, step_records, saved_replay = restored
    return Run(cfg=cfg, run_dir=run_dir, pool=pool, options=GameOptions(mode=cfg.game.mode, cot=cfg.game.cot),
               reward_fn=reward_function(cfg.game.reward), engines=engines, learner=learner,
               start_step=start_step, resumed=state is not None, step_records=step_records, warmup_key=warm_key,
               ranks=ranks, saved_replay=saved_replay, base_model_dir=original_base, league=league,
               sampling=SamplingSpec(max_tokens=cfg.sampling.max_new_tokens, temperature=cfg.sampling.temperature,
                                     top_p=cfg.sampling.top_p, fixed_length=cfg.sampling.fixed_length))


def check_before_start(cfg: TrainConfig) -> tuple[distributed.Ranks, list | None]:
    """What is refused before any model is resolved or engine started: a malformed FAST_SRT_KILL_AT, untrainable
    sampling, a shard without ranks, a batch that does not split over them, a run directory that cannot be one,
    bad warm-up or auxiliary SFT data.
    Starts the torchrun process group (before any engine: fast_srt.run.distributed). Returns (the ranks, the
    auxiliary SFT records or None)."""
    faults.target()
    check_trainable_sampling(cfg)
    ranks = distributed.init_from_env()
    if cfg.shard != "none" and ranks.world == 1:
        raise UserError(f"--shard {cfg.shard} shards the model across torchrun ranks; launch with `torchrun "
                        f"--nproc_per_node N -m fast_srt train ...` (N >= 2), or drop --shard")
    distributed.check_split(cfg.sampling.games_per_step, cfg.algo.samples_per_prompt, ranks)
    check_run_dir(Path(cfg.run_dir), cfg.resume)
    if cfg.warmup.steps:
        from fast_srt.learner.warmup import load_warmup_data

        load_warmup_data(cfg.warmup)
    if cfg.algo.sft_coef <= 0:
        return ranks, None
    from fast_srt.learner.sft import load_sft_records

    return ranks, load_sft_records(cfg.algo.sft_data)


def placed_trainer_model(cfg: TrainConfig, base_dir: Path, run_dir: Path, ckpt_dir: Path | None,
                         warm_key: str | None, device, compute_dtype):
    """trainer_model on its device with the attention it needs: under --shard fsdp2 loaded on the host and sharded
    a layer at a time onto the device, else moved there and every torchrun rank given rank 0's weights. Returns
    (model, checkpoint directory or None, checkpoint state or None, the attention for the KL reference)."""
    # shared-prefix batches need the project's attention (flash-attn varlen inside it on CUDA when installed)
    attn = VARLEN_SDPA if cfg.optim.share_prefix else None
    sharded = cfg.shard == "fsdp2"
    if sharded:  # loaded on the host, then moved to the device one sharded layer at a time: the device's attention
        attn = pick_attention(device, attn)
    model, ckpt_dir, state = trainer_model(cfg, base_dir, run_dir, ckpt_dir, warm_key,
                                           torch.device("cpu") if sharded else device, attn, compute_dtype)
    if sharded:  # every rank loaded the same files and keeps its own shard of them (nothing random: no LoRA)
        model = sharding.shard_model(model, device.type)
    else:
        collective.broadcast_parameters(model)  # torchrun: every rank starts from rank 0's weights
    return model, ckpt_dir, state, attn


def kl_reference(cfg: TrainConfig, base_dir: Path, compute_dtype, device, attn):
    """The frozen KL reference (fast_srt.learner.policy.load_reference; sharded as the model under --shard fsdp2),
    or None: no KL, or LoRA, whose reference is the model with adapters off."""
    if cfg.algo.kl_coef <= 0 or cfg.lora_rank:
        return None
    sharded = cfg.shard == "fsdp2"
    ref = load_reference(str(base_dir), compute_dtype, "cpu" if sharded else device, attn=attn)
    # as the model: 1/N of the reference on each rank, gathered layer by layer in its forwards
    return sharding.shard_model(ref, device.type) if sharded else ref


def build_learner(cfg: TrainConfig, model, ref, optimizer, state, pool, tokenizer, sft_records, device,
                  ranks: distributed.Ranks) -> tuple[Learner, tuple[int, dict, dict | None]]:
    """The Learner (schedule, grad scaler, this rank's SFT stream, the kernels for `device`) and, on resume, the
    checkpoint's trainer state restored into it and the seed pool. Returns (learner, (start step, the checkpointed
    step's records, its replay conditions))."""
    from fast_srt.kernels import select_advantages_impl

    compute_dtype = getattr(torch, cfg.model.dtype)
    # fp32 master weights; matmuls in the compute dtype under autocast (bf16 updates at lr 5e-7 would vanish)
    autocast = lambda: torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)  # noqa
    n_updates = total_updates(cfg)
    scheduler = build_scheduler(optimizer, n_updates, int(cfg.optim.warmup_ratio * n_updates), cfg.optim.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype == torch.float16)
    sft_stream = None
    if sft_records is not None:
        from fast_srt.learner.sft import SFTStream, build_sft_samples

        sft_stream = SFTStream(build_sft_samples(sft_records, tokenizer),
                               seed=sft_seed(cfg.seed, ranks.rank))  # torchrun: one stream per rank
    restored = (0, {}, None)
    if state is not None:
        if cfg.shard == "fsdp2":  # the checkpoint's full optimizer state, this rank's shard of it
            state["optimizer"] = sharding.shard_optimizer_state(optimizer, state["optimizer"])
        restored = restore_run_state(state, optimizer, scheduler, pool, sft_stream, scaler, ranks)
    learner = Learner(cfg=cfg, model=model, ref=ref, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                      autocast=autocast, logprob_fn=pick_logprob_impl(cfg.logprob_impl, device),  # chosen once
                      adv_fns=select_advantages_impl(device), device=device, temperature=cfg.sampling.temperature,
                      sft_stream=sft_stream, total_updates=n_updates)
    return learner, restored


def resume_point(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint a --resume continues from (UserError if none; a run directory that holds checkpoints needs
    --resume)."""
    if not cfg.resume:
        if find_latest(run_dir) is not None:
            raise UserError(f"{run_dir} already holds checkpoints; pass --resume to continue or a new --run-dir")
        return None
    ckpt_dir = find_latest(run_dir)
    if ckpt_dir is None:
        raise UserError(f"--resume: {run_dir} has no complete checkpoint; run without --resume to start")
    if cfg.warmup.steps:
        check_resume_config(ckpt_dir, cfg)  # before any warm-up trains (without one: after the model check)
    return ckpt_dir


def trainer_model(cfg: TrainConfig, base_dir: Path, run_dir: Path, ckpt_dir: Path | None, warm_key: str | None,
                  device, attn, compute_dtype):
    """The trainer's model (fp32 master weights; with LoRA the frozen base in the compute dtype plus adapters), from
    the base model or, on resume, the checkpoint (checked to be this run's model, settings and warm-up). Returns
    (model, checkpoint directory or None, checkpoint state or None)."""
    model = load_policy(str(base_dir), dtype=torch.float32, device=device, attn=attn,
                        gradient_checkpointing=cfg.gradient_checkpointing)
    state = None
    if ckpt_dir is not None:
        ckpt_dir, state = load_checkpoint(run_dir, model=model)  # checks it is the same model
        check_resume_config(ckpt_dir, cfg)
        saved_key = (state.get("extra") or {}).get("warmup_key")
        if saved_key != warm_key:
            raise UserError(f"--resume: the run started from warm-up {saved_key or 'none'} but this configuration "
                            f"gives {warm_key or 'none'} (the base model's files or the warm-up data changed); "
                            f"resume with the run's own base model and data, or start a new --run-dir")
        if not cfg.lora_rank:
            model = load_policy(str(ckpt_dir), dtype=torch.float32, device=device, attn=attn,
                                gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, roles=adapter_roles(cfg))
        base_to_compute_dtype(model, compute_dtype)  # frozen: no fp32 master needed (fast_srt.run.plan)
        if ckpt_dir is not None:
            load_lora_adapter(model, ckpt_dir)
    return model, ckpt_dir, state


def restore_run_state(state: dict, optimizer, scheduler, pool, sft_stream, scaler,
                      ranks: distributed.Ranks | None = None) -> tuple[int, dict, dict | None]:
    """A checkpoint's optimizer, schedule, seed stream, this rank's SFT stream and grad scaler; returns (its step,
    the step's records, its replay conditions)."""
    ranks = ranks or distributed.Ranks()
    extra = restore_trainer_state(state, optimizer, scheduler)
    pool.rng.setstate(_tuple_state(extra["seed_rng"]))
    if sft_stream is not None:
        streams = extra.get("sft_streams") or [extra["sft_stream"]]  # one per rank (a single one before)
        if len(streams) != ranks.world and ranks.main:
            print(f"[fast_srt] resume: the checkpoint holds SFT stream positions for {len(streams)} rank(s), this "
                  f"run has {ranks.world}; rank r continues stream r mod {len(streams)} (not an exact replay)")
        sft_stream.load_state_dict(streams[ranks.rank % len(streams)])
    if scaler.is_enabled() and extra.get("grad_scaler"):
        scaler.load_state_dict(extra["grad_scaler"])
    return int(state["step"]), extra.get("step_records") or {}, extra.get("replay")


def replay_conditions(run: Run) -> dict:
    """What else a resume must match to replay the run exactly (the settings are checked apart): the arithmetic's
    thread count, the libraries, the device and the kernels. A different value gives other last digits, hence, at
    some step, other sampled tokens."""
    fn = run.learner.logprob_fn
    return {"torch threads": torch.get_num_threads(), "torch": str(torch.__version__),
            "vllm": vllm_version(),
            "device": torch.cuda.get_device_name() if run.learner.device.type == "cuda" else "cpu",
            "log-prob kernel": getattr(fn, "__name__", str(fn)), "ranks": run.ranks.world}


def replay_warning(saved: dict | None, now: dict) -> str | None:
    """One line naming what differs from the checkpoint's replay conditions (None: the resume replays exactly)."""
    if not saved:
        return None
    diffs = [f"{k} {saved.get(k)} -> {now.get(k)}" for k in sorted(set(saved) | set(now))
             if saved.get(k) != now.get(k)]
    if not diffs:
        return None
    return (f"[fast_srt] resume: not an exact replay of the run ({'; '.join(diffs)}): it continues from the "
            f"checkpoint, but its games may differ from the run's had it not stopped; resume under the conditions "
            f"it ran in for an exact replay")


def sft_seed(seed: int, rank: int) -> int:
    """Each torchrun rank draws its own SFT samples (rank 0: the run seed, as in a one-process run)."""
    return seed + 1_000_003 * rank


def checkpoint_extra(run: Run, records: dict, sft_streams: list | None = None) -> dict:
    """What a checkpoint carries besides weights, optimizer, scheduler and RNG (all weights_only-loadable)."""
    extra = {"seed_rng": _list_state(run.pool.rng.getstate()), "step_records": records,
             "warmup_key": run.warmup_key, "replay": replay_conditions(run)}
    if sft_streams is not None:
        extra["sft_streams"] = sft_streams
    if run.league is not None:
        extra["league"] = run.league.state()
    if run.learner.scaler.is_enabled():
        extra["grad_scaler"] = run.learner.scaler.state_dict()
    return extra


def game_record(step: int, g) -> dict:
    return {"step": step, "data_type": g.data_type, "seed": g.seed.prompt,
            "attacker_raw": g.attacker.gen.text if g.attacker else None,
            "attacker_public": g.attacker.public if g.attacker else None,
            "defender_raw": g.defender.gen.text, "defender_public": g.defender.public,
            "judge": g.judge_text, "outcome": g.rewards.outcome,
            "reward_attacker": g.rewards.attacker, "reward_defender": g.rewards.defender,
            **({"opponent": g.opponent} if g.opponent is not None else {})}


def _list_state(s):  # random.getstate() as lists (trainer_state.pt is read with weights_only=True)
    return [s[0], list(s[1]), s[2]]


def _tuple_state(s):
    return (s[0], tuple(s[1]), s[2])
