"""Advantages over packed sequences: time (p20/p50/p80) and peak extra memory per provider and shape.

Providers (REINFORCE++ with per-role whitening):
  padded: the OpenRLHF way, the peer baseline: pad samples to [S, Lmax], reverse Python loop over time steps for
          the return, masked normalize per role;
  twin:   kernels.reinforce_pp_advantages_ref (segment ops on the packed stream);
  triton: kernels.reinforce_pp_advantages (CUDA only).
Group baselines (GRPO, RLOO): twin and triton (group_advantages[_ref]).

    .venv/bin/python bench/kernels/advantages.py [--shapes 256x1024,1024x512] [--reps 20]

Shapes are SxL: S samples with lengths uniform in [L/8, L] (a quarter of each is prompt, loss_mask False).
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import (  # noqa: E402
    BenchRow,
    final_json,
    markdown_table,
    peak_extra_mib,
    percentiles,
    print_table,
    run_child,
    time_interleaved,
)

from fast_srt.kernels import advantages as A  # noqa: E402

N_ROLES = 2
GROUP = 8


def make_batch(S: int, L: int, device: str):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(L // 8, 2), L + 1, (S,), generator=g)
    cu = torch.zeros(S + 1, dtype=torch.int64)
    cu[1:] = lengths.cumsum(0)
    T = int(cu[-1])
    pos = torch.arange(T) - torch.repeat_interleave(cu[:-1], lengths)
    mask = pos >= torch.repeat_interleave(lengths // 4, lengths)  # first quarter of each sample is prompt
    logp = -torch.rand(T, generator=g) * 4
    ref_logp = logp + torch.randn(T, generator=g) * 0.05
    rewards = torch.randn(S, generator=g)
    roles = torch.arange(S) % N_ROLES
    groups = torch.arange(S) // GROUP
    return [x.to(device) for x in (logp, ref_logp, rewards, cu, mask, roles, groups)]


def reinforce_padded(logp, ref_logp, rewards, cu, mask, roles, kl_coef, n_roles):
    """OpenRLHF-style: pad to [S, Lmax], reverse time loop for returns, masked normalize per role."""
    lengths = (cu[1:] - cu[:-1]).tolist()
    pad = torch.nn.utils.rnn.pad_sequence
    lp = pad(list(torch.split(logp, lengths)), batch_first=True)
    rlp = pad(list(torch.split(ref_logp, lengths)), batch_first=True)
    m = pad(list(torch.split(mask, lengths)), batch_first=True)
    r = torch.where(m, -kl_coef * (lp - rlp), 0.0)  # (S, Lmax)
    last = (m.float() * torch.arange(m.shape[1], device=m.device)).argmax(dim=1)
    r[torch.arange(r.shape[0]), last] += rewards
    returns = torch.zeros_like(r)
    running = torch.zeros(r.shape[0], device=r.device)
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + running
        returns[:, t] = running
    returns = returns * m
    adv = torch.zeros_like(returns)
    for k in range(n_roles):
        sel = m & (roles == k)[:, None]
        x = returns[sel]
        mean = x.mean()
        var = ((x - mean) ** 2).mean()
        adv[sel] = (x - mean) * torch.rsqrt(var.clamp(min=1e-8))
    return adv[m], returns[m]


def setup(provider: str, op: str, S: int, L: int, device: str):
    logp, ref_logp, rewards, cu, mask, roles, groups = make_batch(S, L, device)
    if op == "reinforce_pp":
        fn = {"padded": reinforce_padded, "twin": A.reinforce_pp_advantages_ref,
              "triton": A.reinforce_pp_advantages}[provider]
        return lambda: fn(logp, ref_logp, rewards, cu, mask, roles, 0.05, N_ROLES)
    if provider == "padded":
        return None
    kind = op
    fn = {"twin": A.group_advantages_ref, "triton": A.group_advantages}[provider]
    return lambda: fn(rewards, groups, cu, mask, kind)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="256x1024,1024x512", help="SxL, comma separated")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--report", default="")
    p.add_argument("--child", nargs=3, metavar=("PROVIDER", "OP", "SHAPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        prov, op, shape = args.child
        S, L = (int(x) for x in shape.split("x"))
        setup(prov, op, 8, 16, device)()  # page in library code before the measured call
        print(json.dumps({"extra_mib": peak_extra_mib(setup(prov, op, S, L, device))}))
        return

    providers = ["padded", "twin"] + (["triton"] if device == "cuda" else [])
    sync = torch.cuda.synchronize if device == "cuda" else None
    rows: list[BenchRow] = []
    for shape in args.shapes.split(","):
        S, L = (int(x) for x in shape.split("x"))
        T = int(make_batch(S, L, "cpu")[3][-1])
        for op in ("reinforce_pp", "grpo", "rloo"):
            fns = {prov: fn for prov in providers if (fn := setup(prov, op, S, L, device)) is not None}
            times = time_interleaved(fns, args.reps, args.warmup, sync)
            for prov, ts in times.items():
                mem = None if args.no_memory else run_child(os.path.abspath(__file__),
                                                            ["--child", prov, op, shape])["extra_mib"]
                rows.append(BenchRow("adv/" + op, prov, "fwd", f"S={S} T={T}", *percentiles(ts), mem))
    summary = {}
    for shape_rows in {r.shape for r in rows}:
        by = {r.provider: r for r in rows if r.shape == shape_rows and r.op == "adv/reinforce_pp"}
        if "padded" in by and "twin" in by:
            summary[f"{shape_rows}/twin_speedup_vs_padded"] = by["padded"].p50_ms / by["twin"].p50_ms
    print_table(rows)
    print(json.dumps(summary, indent=1))
    if args.report:
        with open(args.report, "w") as f:
            f.write(markdown_table(rows) + "\n\n```json\n" + json.dumps(summary, indent=1) + "\n```\n")
    print(final_json("advantages", rows, summary))


if __name__ == "__main__":
    main()
