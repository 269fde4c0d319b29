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
    from fast_srt.commands.args import Parser
    from fast_srt.commands.train import parse_train_args
    from fast_srt.run.plan import plan, plan_input_from_config, render

    ap = Parser("fast-srt plan", (__doc__ or "").split("\n\n")[0], takes_train_options=True)
    ap.add_argument("--budget-gib", type=float, default=None,
                    help="the device memory to plan for, GiB (default: 80 for cuda, this machine's memory for cpu)")
    ap.add_argument("--device", default=None,
                    help="cuda or cpu: which device's engines and kernels (default: cuda where torch sees one, else cpu)")
    ap.add_argument("--prompt-tokens", type=int, default=320,
                    help="tokens of a typical attacker or defender prompt (default 320)")
    ap.add_argument("--judge-prompt-tokens", type=int, default=640,
                    help="tokens of a typical judge prompt (default 640)")
    ap.add_argument("--ranks", type=int, default=1,
                    help="torchrun ranks (nnodes x nproc_per_node): the plan of one rank (default 1)")
    ns, rest = ap.parse_own(argv)
    if ns.device is None:
        import torch

        ns.device = "cuda" if torch.cuda.is_available() else "cpu"
    if ns.budget_gib is None:
        import psutil

        ns.budget_gib = 80.0 if ns.device == "cuda" else round(psutil.virtual_memory().total / 2**30, 1)
    opts = {"--budget-gib": ns.budget_gib, "--device": ns.device, "--prompt-tokens": ns.prompt_tokens,
            "--judge-prompt-tokens": ns.judge_prompt_tokens, "--ranks": ns.ranks}
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
