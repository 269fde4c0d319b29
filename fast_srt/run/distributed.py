"""Several ranks under `torchrun`: rank and world, the games each rank plays, metrics reduced over ranks, and the
order in which the process group goes away. One process (no WORLD_SIZE, or 1): every function here is a no-op.

    torchrun --nproc_per_node N -m fast_srt train ...            one machine, N ranks
    torchrun --nnodes M --node_rank I --rdzv-endpoint HOST:PORT --nproc_per_node N -m fast_srt train ...

Each rank is a whole fast_srt trainer: its own in-process policy engine and judge (vLLM's "external_launcher"
executor, one engine per rank, no tensor parallelism), its own copy of the trained model. Per step:
- every rank draws the same global batch of seeds from the same seeded pool and plays its own contiguous share of
  whole groups (`my_share`): no seed is played by two ranks, and the pool's state is the same on every rank, so
  rank 0's checkpoint restores it for all;
- the learner's step is the single-process step on the union of the ranks' samples (fast_srt.learner.collective:
  global token mean, gradients summed before clipping, REINFORCE++ whitened over all ranks);
- rank 0 writes checkpoints, metrics and game logs; every rank loads the checkpoint on --resume (a run directory
  that every rank can read: one machine, or a shared filesystem across machines);
- metrics are reduced over ranks (`reduce_metrics`): counts summed, means averaged, phase times as the slowest
  rank's, and every rank's own phase times kept as `rank<r>/time/...`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fast_srt.errors import UserError
from fast_srt.learner import collective
from fast_srt.learner.step import ROLE_KEYS

# metric name prefixes (and names) whose value is a count or a part of a sum over every rank's samples
SUMMED = ("games/", "samples/", "outcome/", "tokens/", "judge/", "loss/pg", "loss/kl_k3", "perf/gen_tokens_per_s")
TIMEOUT = timedelta(minutes=60)  # a rank waits this long for the others (a slow step, a checkpoint) before failing


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_from_env() -> Ranks:
    """The process group from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT): NCCL on CUDA
    (one device per local rank), gloo on CPU. Initialised here, before any engine: vLLM's external_launcher then
    builds its groups on top of it instead of creating its own."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Ranks()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            if local_rank >= torch.cuda.device_count():
                raise UserError(f"local rank {local_rank} has no CUDA device ({torch.cuda.device_count()} visible); "
                                f"pass --nproc_per_node at most the number of devices on each machine")
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        # small host-side reductions (flags, counts, metrics) on gloo, whatever the default group's backend
        collective.set_cpu_group(dist.new_group(backend="gloo") if cuda else None)
    if rank != 0:  # one console: rank 0 prints the run (every rank's phase times included); errors still reach stderr
        sys.stdout = open(os.devnull, "w")
    return Ranks(rank=rank, world=world, local_rank=local_rank)


def check_split(games_per_step: int, samples_per_prompt: int, ranks: Ranks) -> None:
    """The global batch must split into whole groups, the same number on every rank."""
    if games_per_step % (ranks.world * samples_per_prompt):
        raise UserError(f"sampling.games_per_step {games_per_step} does not split into whole groups of "
                        f"{samples_per_prompt} (algo.samples_per_prompt) over {ranks.world} ranks; pass a multiple "
                        f"of {ranks.world * samples_per_prompt} (games_per_step is the batch of all ranks together)")


def my_share(seeds: list, group_of: list[int], ranks: Ranks) -> tuple[list, list[int]]:
    """This rank's contiguous share of the global batch (whole groups: check_split), group numbers kept global."""
    n = len(seeds) // ranks.world
    lo = ranks.rank * n
    return seeds[lo:lo + n], group_of[lo:lo + n]


def global_count(n: int) -> int:
    return int(collective.all_sum([n])[0])


def _gather(obj, ranks: Ranks) -> list:
    out: list = [None] * ranks.world
    dist.all_gather_object(out, obj, group=collective._cpu_group)
    return out


def gather_all(obj, ranks: Ranks) -> list:
    """[rank 0's obj, rank 1's, ...] on every rank ([obj] in one process)."""
    return [obj] if ranks.world == 1 else _gather(obj, ranks)


# Means pooled over every rank's games or tokens: each rank's mean weighs the count it is a mean over.
POOLED = {"reward/attacker_mean": "games/attacker_rewarded", "reward/defender_mean": "games/defender_rewarded",
          "format/attacker_violation_rate": "games/attacker_format_checked",
          "format/defender_violation_rate": "games/defender_format_checked"}
TOKEN_MEANS = ("is/", "loss/clip_frac", "loss/approx_kl", "loss/ratio_mean", "policy/entropy", "kl/mean")
TOKEN_WEIGHT = "tokens/loss"


def pooled_weight_key(key: str) -> str | None:
    """The count a rank's mean `key` is taken over (None: not a pooled mean): a role's token mean
    (`is/attacker_ratio_mean`, fast_srt.learner.step.ROLE_KEYS) weighs that role's loss tokens."""
    if key in POOLED:
        return POOLED[key]
    if key in ROLE_KEYS:
        return f"tokens/{ROLE_KEYS[key]}_loss"
    if key.startswith(TOKEN_MEANS) and not key.endswith(("_max", "_min")):
        return TOKEN_WEIGHT
    return None


def reduce_metrics(metrics: dict, ranks: Ranks) -> dict:
    """One step's metrics of all ranks as one record (identical on every rank): counts summed, means pooled over
    every rank's games or tokens, maxima and phase times the slowest rank's."""
    if ranks.world == 1:
        return metrics
    per_rank = _gather(metrics, ranks)
    keys = list(dict.fromkeys(k for m in per_rank for k in m))
    out: dict = {}
    for k in keys:
        vals = [m[k] for m in per_rank if m.get(k) is not None]
        if k == "step":
            out[k] = metrics[k]
        elif not vals:
            out[k] = None
        elif pooled_weight_key(k) is not None:
            pairs = [(m[k], m.get(pooled_weight_key(k)) or 0) for m in per_rank if m.get(k) is not None]
            total = sum(w for _, w in pairs)
            out[k] = sum(v * w for v, w in pairs) / total if total else sum(vals) / len(vals)
        elif k.startswith(SUMMED):
            out[k] = sum(vals)
        elif k.endswith("_max") or k.startswith(("time/", "mem/", "proc/")):  # the slowest, the largest rank
            out[k] = max(vals)
        elif k.endswith("_min"):
            out[k] = min(vals)
        else:
            out[k] = sum(vals) / len(vals)
    if out.get("time/step_s"):
        out["perf/tokens_per_s"] = ((out.get("tokens/generated") or 0) + (out.get("tokens/trained") or 0)) \
            / out["time/step_s"]
    out["ranks"] = ranks.world
    for r, m in enumerate(per_rank):
        out.update({f"rank{r}/{k}": v for k, v in m.items() if k.startswith("time/")})
    return out


def gather_games(records: list, keep: int, ranks: Ranks) -> list:
    """The step's logged games of all ranks, interleaved (rank 0's first, rank 1's first, ...), `keep` of them."""
    if ranks.world == 1:
        return records
    per_rank = _gather(records, ranks)
    merged = [r for i in range(max(map(len, per_rank))) for rs in per_rank if i < len(rs) for r in [rs[i]]]
    return merged[:keep]


PHASES = (("generate", "gen"), ("judge", "judge"), ("logprob", "lp"), ("train", "train"), ("sync", "sync"),
          ("step", "step"))


def rank_times_line(m: dict, ranks: Ranks) -> str:
    """Every rank's phase times of one step: `ranks: gen 1.2/1.3 s | judge ...` (rank 0 / rank 1 / ...)."""
    parts = []
    for key, short in PHASES:
        vals = [m.get(f"rank{r}/time/{key}_s") for r in range(ranks.world)]
        if any(v is not None for v in vals):
            parts.append(f"{short} " + "/".join("-" if v is None else f"{v:.2f}" for v in vals))
    return f"step {m['step']:>4} per rank (s, rank 0/.../{ranks.world - 1}): " + " | ".join(parts)


def main_first(ranks: Ranks, fn):
    """fn() on rank 0, then on the others (a cache rank 0 fills, such as the converted default model, is then found
    by the others instead of being built once per rank)."""
    if ranks.main:
        out = fn()
    barrier(ranks)
    return out if ranks.main else fn()


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier(group=collective._cpu_group)


def finish(ranks: Ranks) -> None:
    """End of a run under torchrun: wait for every rank, then tear the process group down once, here. vLLM's own
    shutdown (at interpreter exit) destroys the default group it built on; it then finds it gone and skips it, instead
    of the reverse order, in which a second destroy raises `Invalid process group specified`."""
    if ranks.world == 1 or not dist.is_initialized():
        return
    dist.barrier(group=collective._cpu_group)
    sys.stdout.flush()
