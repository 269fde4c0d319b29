"""`fast-srt crossplay RUN_DIR [--checkpoints SPEC ...] [--options]`: the attack success of each checkpoint's attacker
against each checkpoint's defender on held-out harmful seeds, by the run's judge and by the judge-free refusal
matcher (fast_srt/eval/crossplay.py, docs/crossplay.md).

Writes crossplay-<time>.json (every record), crossplay-<time>.md (the two tables) and crossplay-<time>.png (the heat
maps) into --out (default RUN_DIR/crossplay) and prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from fast_srt.commands.args import Parser

DEFAULT_SEEDS = 32


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = Parser(prog="fast-srt crossplay", description=(
        "Cross-play of a training run's checkpoints: attack success of checkpoint i's attacker against checkpoint "
        "j's defender on held-out harmful seeds (the run's judge, and the judge-free refusal matcher), with n and "
        "95% intervals. Writes crossplay-<time>.json, .md and .png (a heat map)."))
    ap.add_argument("run_dir", metavar="RUN_DIR", help="a `fast-srt train` run directory (its --run-dir)")
    ap.add_argument("--checkpoints", nargs="+", metavar="SPEC",
                    help="the players, in order: 'start' (the model the run started from: its warm start, else its "
                         "base model), step numbers of the run's complete checkpoints, or checkpoint directories "
                         "(default: start, then every complete checkpoint, oldest first)")
    ap.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, metavar="N",
                    help=f"held-out harmful seeds every attacker rewrites, a fixed sample (default {DEFAULT_SEEDS}; "
                         f"0: every held-out seed)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="tokens per generated turn (default 128)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of the attacks, the same for every checkpoint")
    ap.add_argument("--attacker-temperature", type=float, default=1.0,
                    help="attacker sampling temperature (default 1.0; the defender is greedy)")
    ap.add_argument("--batch", type=int, default=16, help="prompts per engine call (default 16)")
    ap.add_argument("--judge-model", help="the judge: 'probe', 'policy', a model or rule:NAME (default: the run's)")
    ap.add_argument("--max-model-len", type=int, default=4096, help="engine length, capped at the model's context")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV-cache budget per engine (GiB)")
    ap.add_argument("--out", help="output directory (default: RUN_DIR/crossplay)")
    ap.add_argument("--best-response-steps", type=int, default=0, metavar="N",
                    help="an exploitability proxy: N steps of an attacker-only run (the run's settings and start) "
                         "against one checkpoint's frozen defender; its attacker joins the matrix as an extra row "
                         "(default 0: none)")
    ap.add_argument("--best-response-to", metavar="SPEC",
                    help="the defender the best response trains against: a player of --checkpoints ('start', a "
                         "step number or a directory; default: the last player)")
    args = ap.parse_args(argv)
    from fast_srt.errors import UserError

    for name, least in (("seeds", 0), ("max_new_tokens", 1), ("batch", 1), ("best_response_steps", 0)):
        if getattr(args, name) < least:
            raise UserError(f"--{name.replace('_', '-')} must be >= {least}")
    if args.attacker_temperature < 0:
        raise UserError("--attacker-temperature must be >= 0")
    return args


def heldout_seeds(n: int) -> list[str]:
    """The n held-out harmful seeds `fast-srt eval` also attacks from (0: all of them)."""
    from fast_srt.eval.prompts import sample
    from fast_srt.game.seeds import load_heldout

    return [s.prompt for s in sample(load_heldout("donotanswer"), n or None)]


def build_crossplay_judge(rs: dict, engine, base_dir: Path, max_model_len: int, kv_cache_gib: float, seed: int):
    """The run's judge, as `fast-srt eval` builds it, on engines of its own: the crossplay engine's weights change,
    a judge's must not. A rule judge runs no model (it names the crossplay engine)."""
    from fast_srt.engine.judge import RuleJudge
    from fast_srt.eval.checkpoints import EnginePool, build_judge

    if rs["judge_model"].startswith("rule:"):
        return RuleJudge(rs["judge_model"][5:], engine), None
    pool = EnginePool(rs["dtype"], max_model_len, kv_cache_gib, seed)
    return build_judge(pool, rs["judge_model"], base_dir, rs["judge_template"], rs["judge_constrained"],
                       rs["dtype"]), pool


def start_model(cfg: dict) -> Path:
    """The model the run started from: its warm start when the config has warmup.steps > 0, else the base model
    (as fast_srt.run.trainer.setup_run builds it). Here, not in fast_srt.eval: the eval layer does not import the
    learner."""
    from fast_srt.config import WarmupConfig
    from fast_srt.run.models import resolve_model

    model = cfg.get("model", {})
    dtype = model.get("dtype", "bfloat16")
    base = resolve_model(model.get("model", "default"), dtype)
    warm = cfg.get("warmup") or {}
    if warm.get("steps", 0) > 0:
        from fast_srt.learner.warmup import ensure_warmup

        return ensure_warmup(base, WarmupConfig(**warm), dtype)
    return base


def best_response_target(checkpoints: list, spec: str | None):
    """The player whose defender the best response trains against: `spec` names one of `checkpoints` (by its
    label, step number or directory), default the last; UserError naming the players otherwise."""
    from fast_srt.errors import UserError

    if spec is None:
        return checkpoints[-1]
    for c in checkpoints:
        if spec in (c.label, str(c.step)) or (c.model_dir is not None and Path(spec).expanduser().resolve() ==
                                               Path(c.model_dir).resolve()):
            return c
    raise UserError(f"--best-response-to {spec}: not one of the players ({', '.join(c.label for c in checkpoints)}); "
                    f"pass one of those or its step number")


def best_response_config(cfg: dict, defender_dir: Path, steps: int, run_dir: Path):
    """The run's TrainConfig as an attacker-only run against `defender_dir`'s frozen defender: the same model,
    warm start, game format, sampling and optimiser, one shared policy (no per-role adapters, no league, no eval
    during training), `steps` steps and one checkpoint at the end, in `run_dir`."""
    from fast_srt.config import LeagueConfig, train_config_from_dict

    run = train_config_from_dict(cfg)
    return dataclasses.replace(
        run, game=dataclasses.replace(run.game, mode="attacker_only", frozen_defender=str(defender_dir)),
        roles="shared", league=LeagueConfig(), steps=steps, save_every=steps, eval_every=0, run_dir=str(run_dir))


def train_best_response(cfg: dict, target, steps: int, out_dir: Path, stem: str):
    """Train the best response in a child process (its engines' memory goes with it) and return its final
    checkpoint as an extra attacker row."""
    import subprocess
    import sys

    from fast_srt.errors import UserError
    from fast_srt.eval.crossplay import Checkpoint
    from fast_srt.run.checkpoint import find_latest

    run_dir = out_dir / f"{stem}-best-response"
    br = best_response_config(cfg, Path(target.model_dir), steps, run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / f"{stem}-best-response-config.json"
    config_path.write_text(json.dumps(dataclasses.asdict(br), indent=2))
    print(f"crossplay: best response to {target.label}: {steps} attacker-only step(s) against its frozen defender "
          f"in {run_dir}", flush=True)
    child = ("import json, sys; from fast_srt.config import train_config_from_dict; "
             "from fast_srt.run.trainer import train; "
             "train(train_config_from_dict(json.load(open(sys.argv[1]))))")
    if subprocess.run([sys.executable, "-c", child, str(config_path)]).returncode != 0:
        raise UserError(f"the best-response run in {run_dir} failed (its console is above); crossplay stopped")
    last = find_latest(run_dir)
    if last is None:
        raise UserError(f"the best-response run in {run_dir} left no complete checkpoint")
    return Checkpoint(f"best response to {target.label}", last.resolve(), steps)


def crossplay_main(argv: list[str]) -> None:
    from fast_srt.commands.eval import judge_description, run_settings
    from fast_srt.eval import crossplay as X
    from fast_srt.eval.checkpoints import EnginePool, Target, check_judge_family
    from fast_srt.run.models import resolve_model

    t0 = time.time()
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    checkpoints = X.select_checkpoints(run_dir, args.checkpoints)  # bad input refused before any model loads
    cfg = X.run_config(run_dir)
    rs = run_settings(argparse.Namespace(judge_model=args.judge_model, judge_template=None, dtype=None, cot=None,
                                         base_model=None), cfg)
    if any(c.model_dir is None for c in checkpoints):
        start = start_model(cfg)
        checkpoints = [dataclasses.replace(c, model_dir=start) if c.model_dir is None else c for c in checkpoints]
    X.check_one_model(checkpoints)
    out_dir = Path(args.out) if args.out else run_dir / "crossplay"
    stem = "crossplay-" + time.strftime("%Y%m%d-%H%M%S", time.localtime(t0))
    target, extra = None, []
    if args.best_response_steps:  # trained first, in a child process, before this command's engines start
        target = best_response_target(checkpoints, args.best_response_to)
        extra = [train_best_response(cfg, target, args.best_response_steps, out_dir, stem)]
    base_dir = resolve_model(rs["base_model"] or "default", rs["dtype"])
    check_judge_family(Target(checkpoints[0].label, checkpoints[0].model_dir), base_dir, rs["judge_model"])
    seeds = heldout_seeds(args.seeds)
    settings = X.CrossplaySettings(cot=rs["cot"], max_new_tokens=args.max_new_tokens,
                                   attacker_temperature=args.attacker_temperature, seed=args.seed, batch=args.batch)
    pool = EnginePool(rs["dtype"], args.max_model_len, args.kv_cache_gib, args.seed)
    engine = pool.get(checkpoints[0].model_dir, "crossplay")  # one engine: every checkpoint's weights go into it
    judge, judge_pool = build_crossplay_judge(rs, engine, base_dir, args.max_model_len, args.kv_cache_gib, args.seed)
    startup = pool.startup_s + (judge_pool.startup_s if judge_pool else 0.0)
    print(f"crossplay: {len(checkpoints)} checkpoint(s) x {len(seeds)} held-out harmful seeds, "
          f"{2 * len(checkpoints)} weight loads; engines started in {startup:.1f} s", flush=True)
    records, attacks, seconds = X.run_crossplay(engine, judge, checkpoints, seeds, settings,
                                                say=lambda m: print(m, flush=True), extra_attackers=extra)
    labels, rows = [c.label for c in checkpoints], [c.label for c in [*checkpoints, *extra]]
    ms = X.matrices(records, len(checkpoints), len(rows))
    meta = {"created_unix": t0, "command": " ".join(["fast-srt", "crossplay", *argv]), "run_dir": str(run_dir),
            "checkpoints": [c.to_dict() for c in checkpoints], "extra_attackers": [c.to_dict() for c in extra],
            "seeds_n": len(seeds), "seeds": seeds,
            "settings": {**dataclasses.asdict(settings), "dtype": rs["dtype"], "max_model_len": engine.max_model_len,
                         "defender_temperature": 0.0},
            "judge": judge_description(rs, judge), "judge_parse_failures": getattr(judge, "parse_failures", 0),
            "judge_truncated": getattr(judge, "truncated", 0),
            "seconds": {**seconds, "startup_s": startup}, "cpus": os.cpu_count()}
    doc = {"meta": meta, "labels": labels, "matrices": X.matrices_to_dict(ms), "attacks": attacks,
           "records": records}
    if extra:
        doc["best_response"] = X.best_response(ms, checkpoints.index(target), len(checkpoints), labels,
                                               args.best_response_steps, str(extra[0].model_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (out_dir / f"{stem}{ext}" for ext in (".json", ".md", ".png"))
    doc["meta"]["seconds"]["wall_s"] = time.time() - t0
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    md_path.write_text(X.markdown(doc))
    X.plot_heatmaps(ms, labels, png_path, title=f"cross-play of {run_dir.name} ({len(seeds)} seeds)", row_labels=rows)
    for name in X.MATRICES:
        print(X.markdown_table(ms[name], labels, X.TITLES[name], rows))
    if extra:
        print(X.best_response_markdown(doc["best_response"]))
    print(f"results: {json_path}\ntable: {md_path}\nheat map: {png_path}")
