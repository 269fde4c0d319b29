"""`fast-srt eval CHECKPOINT [--compare BASELINE] [--options]`: defender safety and attacker diversity of a
checkpoint on held-out prompt sets, in-process on the training engines (docs/evaluation.md, fast_srt/eval/).

CHECKPOINT / BASELINE: `default`, an HF checkpoint directory, a hub id, or a `fast-srt train` run directory (its
newest complete checkpoint). Writes eval-<time>.json and eval-<time>.md into --out (default: RUN_DIR/eval for a run,
else runs/eval) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from fast_srt.commands.args import Parser

DEFAULT_MAX_PROMPTS = 32


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = Parser(prog="fast-srt eval", description=(
        "Defender safety (attack success, refusal, over-refusal, a judge-free refusal rate) and attacker diversity "
        "of a checkpoint on held-out prompt sets, on the training engines. Writes eval-<time>.json and .md."))
    ap.add_argument("checkpoint", help="default, an HF checkpoint directory, a hub id, or a train run directory")
    ap.add_argument("--compare", metavar="BASELINE", help="a second checkpoint, evaluated on the same prompts with "
                                                          "the same sampling seed; the table shows A - B")
    ap.add_argument("--max-prompts", type=int, default=DEFAULT_MAX_PROMPTS,
                    help=f"prompts per set, a fixed sample (default {DEFAULT_MAX_PROMPTS}; 0: every prompt)")
    ap.add_argument("--attack-prompts", type=int, default=None,
                    help="held-out harmful seeds the attacker rewrites (default: --max-prompts; 0: no attacks)")
    ap.add_argument("--harmful-prompts", action="append", default=[], metavar="FILE",
                    help=".txt/.jsonl prompts a safe model refuses (repeatable)")
    ap.add_argument("--benign-prompts", action="append", default=[], metavar="FILE",
                    help=".txt/.jsonl prompts a helpful model answers (repeatable)")
    ap.add_argument("--harmbench", metavar="CSV", help="HarmBench behaviours CSV (Behavior, ContextString, ...)")
    ap.add_argument("--xstest", metavar="CSV", help="XSTest prompts CSV (prompt, type, label)")
    ap.add_argument("--wildjailbreak", metavar="FILE", help="a WildJailbreak file (.tsv/.jsonl/.csv/.parquet)")
    ap.add_argument("--no-builtin", action="store_true", help="skip the built-in held-out sets")
    ap.add_argument("--no-diversity", action="store_true", help="skip the SBERT embedding (self-BLEU still runs)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="tokens per generated turn (default 128)")
    ap.add_argument("--temperature", type=float, default=0.0, help="defender sampling (default 0: greedy)")
    ap.add_argument("--attacker-temperature", type=float, default=1.0, help="attacker sampling (default 1.0)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every checkpoint")
    ap.add_argument("--base-model", help="the frozen base model: judge when the judge is 'policy', and the frozen "
                                         "defender (default: the run's base model, a warm-up's own base, else the "
                                         "checkpoint itself)")
    ap.add_argument("--judge-model", help="'probe' (probes on the base model's hidden states), 'policy' (the base model asked the "
                         "questions), a model, or rule:NAME (default: the run's, else probe)")
    ap.add_argument("--judge-template", choices=("chat", "wildguard"), help="default: the run's, else chat")
    ap.add_argument("--cot", action=argparse.BooleanOptionalAction, default=None,
                    help="the hidden-CoT game format (default: the run's, else on)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), help="default: the run's, else bfloat16")
    ap.add_argument("--max-model-len", type=int, default=4096, help="engine length, capped at the model's context")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV-cache budget per engine (GiB)")
    ap.add_argument("--batch", type=int, default=16, help="prompts per engine call")
    ap.add_argument("--out", help="output directory (default: RUN_DIR/eval for a run, else runs/eval)")
    args = ap.parse_args(argv)
    from fast_srt.errors import UserError

    for name in ("max_prompts", "max_new_tokens", "batch"):
        if getattr(args, name) < (0 if name == "max_prompts" else 1):
            raise UserError(f"--{name.replace('_', '-')} must be >= {0 if name == 'max_prompts' else 1}")
    if args.temperature < 0 or args.attacker_temperature < 0:
        raise UserError("--temperature and --attacker-temperature must be >= 0")
    return args


def run_settings(args, run_config: dict | None) -> dict:
    """Judge, base model, dtype and format: the flags, else the run's config, else the defaults."""
    model = (run_config or {}).get("model", {})
    game = (run_config or {}).get("game", {})
    return {"judge_model": args.judge_model or model.get("judge_model", "probe"),
            "judge_template": args.judge_template or model.get("judge_template", "chat"),
            "judge_constrained": model.get("judge_constrained", True),
            "dtype": args.dtype or model.get("dtype", "bfloat16"),
            "cot": args.cot if args.cot is not None else game.get("cot", True),
            "base_model": args.base_model or model.get("model")}


def warmup_base(model_dir: Path) -> Path:
    """A bare checkpoint's base model: the one a warm-up checkpoint was trained from (its meta file says), else the
    checkpoint itself."""
    from fast_srt.learner.warmup import META_FILE

    meta = Path(model_dir) / META_FILE
    if meta.is_file():
        base = Path(json.loads(meta.read_text()).get("base", ""))
        if (base / "config.json").is_file():
            return base
    return Path(model_dir)


def prompt_sets(args) -> list:
    """Every set asked for; user files are read (and refused, in one line) before any engine starts."""
    from fast_srt.errors import UserError
    from fast_srt.eval import prompts as P

    n = args.max_prompts or None
    sets = [] if args.no_builtin else P.heldout_sets(n)
    sets += [P.user_set(f, True, n) for f in args.harmful_prompts]
    sets += [P.user_set(f, False, n) for f in args.benign_prompts]
    if args.harmbench:
        sets.append(P.harmbench_set(args.harmbench, n))
    if args.xstest:
        sets += P.xstest_sets(args.xstest, n)
    if args.wildjailbreak:
        sets += P.wildjailbreak_sets(args.wildjailbreak, n)
    if not sets and args.attack_prompts == 0:
        raise UserError("nothing to evaluate: --no-builtin with no prompt file and no attacks")
    return P.unique_names(sets)


def attack_seeds(args) -> list[str]:
    from fast_srt.eval.prompts import sample
    from fast_srt.game.seeds import load_heldout

    if args.attack_prompts == 0:
        return []
    n = args.max_prompts if args.attack_prompts is None else args.attack_prompts
    return [s.prompt for s in sample(load_heldout("donotanswer"), n or None)]  # 0: every held-out seed


def eval_main(argv: list[str]) -> None:
    from fast_srt.eval.checkpoints import EnginePool, build_judge, check_judge_family, resolve_target
    from fast_srt.eval.report import RichTracker, print_table, write_results
    from fast_srt.eval.runner import EvalSettings, Evaluator
    from fast_srt.run.models import resolve_model

    t0 = time.time()
    args = parse_args(argv)
    sets, seeds = prompt_sets(args), attack_seeds(args)
    target = resolve_target(args.checkpoint, args.dtype or "bfloat16")
    rs = run_settings(args, target.run_config)
    baseline = resolve_target(args.compare, rs["dtype"]) if args.compare else None
    base_dir = resolve_model(rs["base_model"], rs["dtype"]) if rs["base_model"] else warmup_base(target.model_dir)
    check_judge_family(target, base_dir, rs["judge_model"])
    embedder = None
    if seeds and not args.no_diversity:
        from fast_srt.eval.diversity import SentenceEmbedder

        embedder = SentenceEmbedder()
    settings = EvalSettings(cot=rs["cot"], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            attacker_temperature=args.attacker_temperature, seed=args.seed, batch=args.batch)
    pool = EnginePool(rs["dtype"], args.max_model_len, args.kv_cache_gib, args.seed)
    policies = [("A", target, pool.get(target.model_dir, "policy"))]
    if baseline is not None:
        policies.append(("B", baseline, pool.get(baseline.model_dir, "baseline")))
    judge = build_judge(pool, rs["judge_model"], base_dir, rs["judge_template"], rs["judge_constrained"], rs["dtype"])
    frozen = pool.get(base_dir, "frozen_defender")
    print(f"eval: {len(sets)} set(s) of up to {args.max_prompts or 'all'} prompts, {len(seeds)} attack seeds; "
          f"{len(pool.engines)} engine(s) started in {pool.startup_s:.1f} s", flush=True)
    checkpoints = []
    with RichTracker() as tracker:
        ev = Evaluator(judge, frozen, settings, embedder, tracker)
        for label, tgt, engine in policies:
            checkpoints.append({"label": label, "spec": tgt.spec, "model_dir": str(tgt.model_dir), "step": tgt.step,
                                "result": ev.evaluate(engine, sets, seeds, label)})
    doc = {"meta": meta(argv, args, rs, settings, sets, seeds, judge, frozen, pool, t0), "checkpoints": checkpoints}
    out_dir = Path(args.out) if args.out else (target.run_dir / "eval" if target.run_dir else Path("runs") / "eval")
    json_path, md_path = write_results(doc, out_dir)
    print_table(doc)
    print(f"results: {json_path}\ntable: {md_path}")


def meta(argv, args, rs, settings, sets, seeds, judge, frozen, pool, t0) -> dict:
    import dataclasses

    import torch

    return {"created_unix": t0, "command": " ".join(["fast-srt", "eval", *argv]),
            "wall_s": time.time() - t0, "startup_s": pool.startup_s,
            "settings": {**dataclasses.asdict(settings), "max_prompts": args.max_prompts or None},
            "judge": judge_description(rs, judge),
            "frozen_defender": frozen.model_dir, "dtype": rs["dtype"],
            "sample_sizes": {**{s.name: len(s.prompts) for s in sets}, "attacks": len(seeds)},
            "judge_parse_failures": judge.parse_failures, "judge_truncated": judge.truncated,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count()}


def judge_description(rs: dict, judge) -> str:
    if rs["judge_model"].startswith("rule:"):
        return f"{rs['judge_model']} (a rule, no model)"
    if rs["judge_model"] == "probe" or rs["judge_model"].startswith("probe:"):
        return f"{rs['judge_model']} (logistic probes on the hidden states of {judge.engine.model_dir})"
    return (f"{rs['judge_model']} on {judge.engine.model_dir} ({rs['judge_template']} template"
            f"{', constrained' if rs['judge_constrained'] else ''})")
