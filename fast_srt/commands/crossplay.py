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
    args = ap.parse_args(argv)
    from fast_srt.errors import UserError

    for name, least in (("seeds", 0), ("max_new_tokens", 1), ("batch", 1)):
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
                                                say=lambda m: print(m, flush=True))
    labels = [c.label for c in checkpoints]
    ms = X.matrices(records, len(checkpoints))
    meta = {"created_unix": t0, "command": " ".join(["fast-srt", "crossplay", *argv]), "run_dir": str(run_dir),
            "checkpoints": [c.to_dict() for c in checkpoints], "seeds_n": len(seeds), "seeds": seeds,
            "settings": {**dataclasses.asdict(settings), "dtype": rs["dtype"], "max_model_len": engine.max_model_len,
                         "defender_temperature": 0.0},
            "judge": judge_description(rs, judge), "judge_parse_failures": getattr(judge, "parse_failures", 0),
            "judge_truncated": getattr(judge, "truncated", 0),
            "seconds": {**seconds, "startup_s": startup}, "cpus": os.cpu_count()}
    doc = {"meta": meta, "labels": labels, "matrices": X.matrices_to_dict(ms), "attacks": attacks,
           "records": records}
    out_dir = Path(args.out) if args.out else run_dir / "crossplay"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "crossplay-" + time.strftime("%Y%m%d-%H%M%S", time.localtime(t0))
    json_path, md_path, png_path = (out_dir / f"{stem}{ext}" for ext in (".json", ".md", ".png"))
    doc["meta"]["seconds"]["wall_s"] = time.time() - t0
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    md_path.write_text(X.markdown(doc))
    X.plot_heatmaps(ms, labels, png_path, title=f"cross-play of {run_dir.name} ({len(seeds)} seeds)")
    for name in X.MATRICES:
        print(X.markdown_table(ms[name], labels, X.TITLES[name]))
    print(f"results: {json_path}\ntable: {md_path}\nheat map: {png_path}")
