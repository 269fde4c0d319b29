"""`fast-srt sft [PRESET] [--format-prompts N] [--format-temperatures T[,T...]] [train options]`: only the format
warm-up (fast_srt.learner.warmup): train it (or find it cached), print where it is, then measure how often each
role keeps the `<think>/<answer>` format (docs/game.md §2) at the sampling temperature(s).

The measurement: the warmed model, on one in-process engine, plays the attacker's CoT turn on N held-out seeds
(half harmful, half benign; `load_heldout`, never trained on) and the defender's CoT turn on the same N seeds
verbatim; each turn goes through `check_format`. `--format-prompts 0` skips it. The warm-up settings are the
train command's `--warmup.*` options (a preset whose warm-up is off needs `--warmup.steps N`).
"""

from __future__ import annotations

import time

from fast_srt.errors import UserError

ROLES = ("attacker", "defender")


def parse_sft_args(argv: list[str]):
    """(TrainConfig, format prompts, temperatures or None for the config's own)."""
    from fast_srt.commands.train import parse_train_args

    from fast_srt.commands.args import Parser

    ap = Parser("fast-srt sft", (__doc__ or "").split("\n\n")[0], takes_train_options=True)
    ap.add_argument("--format-prompts", default="16",
                    help="held-out seeds on which each role's format is measured after the warm-up (0: skip)")
    ap.add_argument("--format-temperatures", default=None,
                    help="comma-separated sampling temperatures to measure at (default: the config's)")
    ap.add_argument("--ship", action="store_true",
                    help="copy the LoRA warm-up's adapter into fast_srt/data/warmup/ (a fresh machine then builds "
                         "the same warm-up in seconds)")
    ns, rest = ap.parse_own(argv)
    opts = {"--format-prompts": ns.format_prompts, "--format-temperatures": ns.format_temperatures}
    try:
        n = int(opts["--format-prompts"])
    except ValueError:
        raise UserError(f"--format-prompts: {opts['--format-prompts']!r} is not an integer") from None
    if n < 0:
        raise UserError(f"--format-prompts must be >= 0, got {n}")
    temps = None
    if opts["--format-temperatures"] is not None:
        try:
            temps = [float(t) for t in opts["--format-temperatures"].split(",") if t.strip()]
        except ValueError:
            raise UserError(f"--format-temperatures: {opts['--format-temperatures']!r} is not a comma-separated "
                            f"list of numbers, e.g. 0.6,0.8,1.0") from None
        if not temps or any(t < 0 for t in temps):
            raise UserError(f"--format-temperatures needs numbers >= 0, got {opts['--format-temperatures']!r}")
    cfg = parse_train_args(rest)
    if cfg.warmup.steps == 0:
        raise UserError("the warm-up is off in this configuration (warmup.steps 0); pass --warmup.steps N (the "
                        "cpu_default preset turns it on)")
    if not cfg.game.cot:
        raise UserError("the warm-up teaches the <think>/<answer> format: it needs game.cot True")
    if ns.ship and not cfg.warmup.lora_rank:
        raise UserError("--ship needs a LoRA warm-up (--warmup.lora-rank N): a full fine-tune has no adapter to ship")
    return cfg, n, temps, ns.ship


def format_seeds(n: int):
    """n held-out seeds, half harmful and half benign (an odd n gets the extra harmful one), in a fixed order."""
    from fast_srt.game.seeds import load_heldout

    harmful, benign = load_heldout("donotanswer"), load_heldout("benign")
    k = n - n // 2
    return harmful[:k] + benign[: n - k]


def measure_format(engine, seeds, temperature: float, max_new_tokens: int, seed: int = 0) -> dict:
    """Each role's CoT turn on every seed at `temperature`: {"attacker"|"defender": {"violation_rate", "n",
    "turns": [(seed prompt, raw text, FormatResult)]}}. The defender answers the seeds verbatim."""
    from fast_srt.engine.engine import SamplingSpec
    from fast_srt.game.rules import build_attacker_prompt, build_defender_prompt, check_format

    tok = engine.tokenizer
    prompts = {"attacker": [build_attacker_prompt(tok, s.prompt, s.harmful, cot=True) for s in seeds],
               "defender": [build_defender_prompt(tok, s.prompt, cot=True) for s in seeds]}
    spec = SamplingSpec(max_tokens=max_new_tokens, temperature=temperature, seed=seed, logprobs=False)
    out = {}
    for role in ROLES:
        gens = engine.generate(prompts[role], spec, phase=f"format_{role}")
        turns = [(s.prompt, g.text, check_format(g.text)) for s, g in zip(seeds, gens)]
        bad = sum(not f.valid for _, _, f in turns)
        out[role] = {"violation_rate": bad / len(turns) if turns else None, "n": len(turns), "turns": turns}
    return out


def _short(text: str, n: int = 150) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def sft_main(argv: list[str]) -> None:
    from fast_srt.learner.warmup import ensure_warmup, load_warmup_data
    from fast_srt.run.models import resolve_model

    cfg, n, temps, ship = parse_sft_args(argv)
    t0 = time.perf_counter()
    load_warmup_data(cfg.warmup)  # a bad data file is refused before any model is resolved or converted
    base = resolve_model(cfg.model.model, cfg.model.dtype)
    warm = ensure_warmup(base, cfg.warmup, cfg.model.dtype)
    print(f"warmed checkpoint: {warm}")
    if ship:
        from fast_srt.learner.warmup import ship_warmup

        print(f"shipped adapter: {ship_warmup(warm)}")
    if n == 0:
        return
    from fast_srt.engine.engine import Engine

    seeds = format_seeds(n)
    engine = Engine(warm, dtype=cfg.model.dtype, max_model_len=cfg.model.max_model_len,
                    kv_cache_gib=cfg.model.kv_cache_gib, seed=cfg.seed, name="policy")
    for t in temps or [cfg.sampling.temperature]:
        res = measure_format(engine, seeds, t, cfg.sampling.max_new_tokens, seed=cfg.seed)
        rates = ", ".join(f"{r} {res[r]['violation_rate']:.2f}" for r in ROLES)
        print(f"format violation rate at temperature {t:g}, {len(seeds)} held-out seeds, "
              f"{cfg.sampling.max_new_tokens} new tokens: {rates}")
        for r in ROLES:
            prompt, text, fmt = res[r]["turns"][0]
            status = "ok" if fmt.valid else "violation " + ",".join(fmt.violations)
            print(f"  e.g. {r} ({status}) on {_short(prompt, 60)!r}: {_short(fmt.public)!r}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
