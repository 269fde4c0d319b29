"""`fast-srt plan [PRESET] [--budget-gib G] [--device cuda|cpu] [--prompt-tokens N] [--ranks N] [train options]`: the
memory plan of a run, phase by phase, before anything is loaded; whether it fits and what to change if not. --ranks:
the plan of one rank of a torchrun launch (every rank holds its own engines, judge and model; budget per device).

The model and judge may be sizes (8b, 7b, 70b, 1.5b, 135m), known hub ids, local directories or `default`; every
other setting is the train command's (`--lora-rank`, `--sampling.games-per-step`, `--sampling.max-new-tokens`,
`--optim.micro-batch-tokens`, `--gradient-checkpointing`, `--model.kv-cache-gib`...). `fast-srt train` prints the
same plan from the same code (fast_srt.run.plan).
"""

from __future__ import annotations

from fast_srt.errors import UserError


def plan_main(argv: list[str]) -> None:
    from fast_srt.commands.train import parse_train_args
    from fast_srt.run.plan import plan, plan_input_from_config, render

    opts = {"--budget-gib": 80.0, "--device": "cuda", "--prompt-tokens": 320, "--judge-prompt-tokens": 640,
            "--ranks": 1}
    rest, it = [], iter(argv)
    for a in it:
        key, _, val = a.partition("=")
        if key in opts:
            val = val or next(it, None)
            if val is None:
                raise UserError(f"{key} needs a value")
            try:
                opts[key] = type(opts[key])(val)
            except ValueError:
                raise UserError(f"{key}: {val!r} is not a {type(opts[key]).__name__}") from None
        else:
            rest.append(a)
    if opts["--device"] not in ("cuda", "cpu"):
        raise UserError(f"--device must be cuda or cpu, got {opts['--device']!r}")
    if opts["--budget-gib"] <= 0:
        raise UserError(f"--budget-gib must be > 0, got {opts['--budget-gib']}")
    if opts["--ranks"] < 1:
        raise UserError(f"--ranks must be >= 1 (the torchrun ranks: nnodes x nproc_per_node), got {opts['--ranks']}")
    cfg = parse_train_args(rest)
    if cfg.shard != "none" and opts["--ranks"] == 1:
        raise UserError(f"--shard {cfg.shard} splits the trainer's state over torchrun ranks: add --ranks N (N >= 2)")
    p = plan_input_from_config(cfg, device=opts["--device"], budget_gib=opts["--budget-gib"],
                               prompt_tokens=opts["--prompt-tokens"],
                               judge_prompt_tokens=opts["--judge-prompt-tokens"], ranks=opts["--ranks"])
    print(render(p, plan(p)))
