"""The learner's half of a training step (torch only): samples from played games, trainer log-probs (old and
reference), advantages, and the PPO-clip updates. `learner_step` runs them in order; fast_srt.run.trainer calls it
between playing the games and writing the new weights into the engine.

  1. samples: both roles' turns of every game that was not a tie or dropped
  2. old and reference log-probs at the sampling temperature (no grad), in token-budget micro-batches, no padding
  3. advantages: REINFORCE++ (KL in the reward, reverse cumsum, per-role whitening) or GRPO/RLOO (dense groups)
  4. updates_per_step PPO-clip updates with truncated importance correction against vLLM's log-probs (+ SFT)

Less work, same results:
- The first mini-batch is trained at the rollout's weights, so its "old" log-probs are its own log-probs
  (detached): no separate old forward for its samples, unless the advantages need them (REINFORCE++ with its KL
  in the reward). With one update per rollout and GRPO/RLOO (or KL 0) there is no old forward at all.
- Shared prompt prefixes (the role instructions, a GRPO group's prompt) are computed once per micro-batch
  (optim.share_prefix: batch.pack_shared), forward and backward, with the same loss and gradients.

Per-role adapters (`--roles per-role`): every micro-batch holds one role's samples (`micro_batches(by_role=True)`)
and its forward runs with that role's adapter active (`lora.role_adapter`), so each adapter's gradient comes from
its role's samples only; a mini-batch still takes one optimizer step for both (one AdamW, one global gradient clip).
The SFT samples (defender turns) go through the defender's adapter. The reference is the base: every adapter off.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from fast_srt import faults
from fast_srt.config import TrainConfig
from fast_srt.errors import UserError
from fast_srt.learner import collective, sharding
from fast_srt.learner.batch import (ROLE_IDS, Sample, pack, pack_shared, split_micro_batches,
                                    split_shared_micro_batches)
from fast_srt.learner.lora import adapters_disabled, lora_roles, role_adapter
from fast_srt.learner.loss import is_finite_loss, kl_k3_loss, ppo_clip_loss, sft_loss
from fast_srt.learner.policy import token_logprobs


@dataclass
class Learner:
    """The trained model and everything that updates it, chosen once before the first step."""

    cfg: TrainConfig
    model: torch.nn.Module
    ref: torch.nn.Module | None  # the frozen KL reference (None: none needed, or LoRA with adapters off)
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    autocast: object  # () -> autocast context: matmuls in the compute dtype over fp32 master weights
    logprob_fn: object  # the fused log-prob kernel or its twin (pick_logprob_impl)
    adv_fns: tuple  # (reinforce_pp, group) advantage kernels for `device`
    device: torch.device  # where the model, its log-prob kernel and its advantage kernels run
    temperature: float  # the sampling temperature: every trainer log-prob is taken at it
    sft_stream: object  # fast_srt.learner.sft.SFTStream, or None without the SFT loss
    total_updates: int  # the scheduler's horizon


def learner_step(learner: Learner, step: int, samples, timer) -> dict:
    """Old and reference log-probs, advantages, then the PPO-clip updates; returns their metrics."""
    cfg = learner.cfg
    # under torchrun every rank makes the same number of mini-batches (a rank with fewer samples, or none, gets
    # empty ones and adds a zero gradient): the ranks' optimizer steps line up one to one
    minis = mini_batches(cfg, step, len(samples), collective.all_max(len(samples)))
    learner.model.eval()
    counts: dict = {}
    with timer("logprob"):
        old, ref = old_and_ref_logprobs(learner, samples, needs_old(cfg, minis, len(samples)), counts)
    with timer("advantage"):
        # REINFORCE++ whitens per role over the whole batch: under torchrun, over every rank's samples
        whiten_all = collective.active() and cfg.algo.estimator == "reinforce_pp" and cfg.algo.whiten
        if samples:
            advs, metrics = compute_advantages(cfg, samples, old, ref, learner.adv_fns, learner.device,
                                               whiten=not whiten_all)
        else:  # this rank played no trainable game: it still joins every reduction
            advs, metrics = [], kl_sums([], [], None)
        if whiten_all:
            advs = whiten_across_ranks(samples, advs)
    learner.model.train()
    with timer("train"):
        metrics.update(update_policy(learner, step, samples, old, ref, advs, minis))
    metrics.update(pop_kl_means(metrics))
    for role in ROLE_IDS:  # the count each role's means are over (torchrun pools them by it)
        metrics[f"tokens/{role}_loss"] = sum(len(s.response_ids) for s in samples if s.role == role)
    # what the forwards computed (after prefix sharing and skipped old forwards): the FLOPs in `fast-srt bench`
    metrics["tokens/logprob_rows"], metrics["tokens/logprob_loss"] = counts.get("rows", 0), counts.get("loss", 0)
    return metrics


# Stability metrics also logged per role, as `{namespace}/{role}_{name}` (role_key): each a mean over that role's
# loss tokens, beside the pooled mean over every loss token.
ROLE_SPLIT = ("is/ratio_mean", "is/trunc_frac", "is/logp_mismatch_mean_abs", "loss/clip_frac", "loss/approx_kl",
              "loss/ratio_mean", "policy/entropy", "kl/mean")


def role_key(key: str, role: str) -> str:
    """`is/ratio_mean` of the attacker's tokens: `is/attacker_ratio_mean`."""
    namespace, name = key.split("/", 1)
    return f"{namespace}/{role}_{name}"


ROLE_KEYS: dict[str, str] = {role_key(k, r): r for k in ROLE_SPLIT for r in ROLE_IDS}  # per-role key -> its role


def kl_sums(samples, old, ref) -> dict:
    """The k1 KL (old - ref) summed over the loss tokens of the samples whose old log-probs exist, and their
    count, in all and per role ("kl/_sum", "kl/_n", "kl/_sum_attacker", ...); sums 0 without a reference."""
    out = {"kl/_sum": 0.0, "kl/_n": 0, **{f"kl/_{k}_{r}": 0 for k in ("sum", "n") for r in ROLE_IDS}}
    for i, (s, o) in enumerate(zip(samples, old)):
        if o is None:
            continue
        d = float((o - ref[i]).sum()) if ref is not None else 0.0
        for suffix in ("", f"_{s.role}"):
            out[f"kl/_sum{suffix}"] += d
            out[f"kl/_n{suffix}"] += len(o)
    return out


def pop_kl_means(metrics: dict) -> dict:
    """kl/mean (over every loss token, old taken at the rollout's weights) and per role, from the sums of the
    advantage pass ("kl/_sum...") and of the micro-batches trained at the rollout's weights ("kl/_sum_train...");
    a role without tokens has None."""
    out = {}
    for suffix, key in [("", "kl/mean")] + [(f"_{r}", role_key("kl/mean", r)) for r in ROLE_IDS]:
        total = metrics.pop(f"kl/_sum{suffix}", 0.0) + metrics.pop(f"kl/_sum_train{suffix}", 0.0)
        n = metrics.pop(f"kl/_n{suffix}", 0) + metrics.pop(f"kl/_n_train{suffix}", 0)
        out[key] = total / max(n, 1) if not suffix or n else None
    return out


def mini_batches(cfg: TrainConfig, step: int, n: int, n_max: int | None = None) -> list[list[int]]:
    """The rollout's samples shuffled (seeded by step) and dealt into min(updates_per_step, n) mini-batches; n_max
    (the most samples any rank holds, under torchrun) in place of n decides how many, so every rank makes as many."""
    order = list(range(n))
    random.Random(cfg.seed * 100003 + step).shuffle(order)
    k = min(cfg.optim.updates_per_step, n if n_max is None else n_max)
    return [order[m::k] for m in range(k)]


def needs_old(cfg: TrainConfig, minis: list[list[int]], n: int) -> list[bool]:
    """Which samples need a separate old forward: all when REINFORCE++ puts the KL (old - ref) in the reward, else
    those outside the first mini-batch (which trains at the rollout's weights: its old log-probs are its own)."""
    if cfg.algo.estimator == "reinforce_pp" and cfg.algo.kl_coef > 0:
        return [True] * n
    first = set(minis[0]) if minis else set()
    return [i not in first for i in range(n)]


def games_to_samples(games, options, remove_ties: bool, group_of: list[int]) -> tuple[list, dict]:
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


def micro_batches(samples, micro_tokens: int, share_prefix: bool, by_role: bool = False) -> list[list]:
    """Token-budget micro-batches; by_role: each holds one role's samples (attacker ones first)."""
    split = split_shared_micro_batches if share_prefix else split_micro_batches
    if not by_role:
        return split(samples, micro_tokens)
    return [mb for role in ROLE_IDS for mb in split([s for s in samples if s.role == role], micro_tokens)]


def pack_for(mb, device, share_prefix: bool):
    return pack_shared(mb, device=device) if share_prefix else pack(mb, device=device)


@torch.no_grad()
def per_sample_logprobs(model, samples, logprob_fn, micro_tokens: int, autocast, temperature: float,
                        share_prefix: bool = False, counts: dict | None = None) -> list[torch.Tensor]:
    """Trainer log-probs of each sample's response tokens at the sampling temperature, [R_s] each, in token-budget
    micro-batches. counts: adds the forwarded row and loss tokens ("rows", "loss")."""
    out: dict[int, torch.Tensor] = {}
    index = {id(s): i for i, s in enumerate(samples)}
    by_role = bool(lora_roles(model))  # per-role adapters: one role per micro-batch, its adapter active
    with autocast():  # one region: autocast casts each fp32 weight once for all micro-batches, not once per batch
        for mb in micro_batches(samples, micro_tokens, share_prefix, by_role):
            batch = pack_for(mb, model.device, share_prefix)
            if counts is not None:
                counts["rows"] = counts.get("rows", 0) + batch.num_tokens
                counts["loss"] = counts.get("loss", 0) + batch.num_loss_tokens
            with role_adapter(model, mb[0].role):
                logp, _ = token_logprobs(model, batch, logprob_fn, temperature)
            for s, v in zip(mb, batch.split_responses(logp.float().cpu())):  # one device-to-host copy per batch
                out[index[id(s)]] = v
    return [out[i] for i in range(len(samples))]


def old_and_ref_logprobs(learner: Learner, samples, need_old: list[bool] | None = None,
                         counts: dict | None = None) -> tuple[list, list | None]:
    """Trainer log-probs at experience time for the samples that need them (None for the others: see needs_old),
    and under the frozen reference when the KL term needs them, all at the sampling temperature."""
    cfg, o = learner.cfg, learner.cfg.optim

    def lp(model, subset):
        sharded = sharding.is_sharded(model)
        if sharded:  # FSDP2: as many forwards on every rank, agreed before the first (end of this module)
            n = len(micro_batches(subset, o.micro_batch_tokens, o.share_prefix))
            extra = collective.all_max(n) - n
        out = per_sample_logprobs(model, subset, learner.logprob_fn, o.micro_batch_tokens, learner.autocast,
                                  learner.temperature, o.share_prefix, counts) if subset else []
        if sharded:
            matching_forwards(learner, model, extra)
        return out

    want = [s for s, w in zip(samples, need_old or [True] * len(samples)) if w]
    got = iter(lp(learner.model, want))
    old = [next(got) if w else None for w in (need_old or [True] * len(samples))]
    if learner.ref is not None:
        return old, lp(learner.ref, samples)
    if cfg.lora_rank and cfg.algo.kl_coef > 0:
        with adapters_disabled(learner.model):  # the base model is the reference: no second copy
            return old, lp(learner.model, samples)
    return old, None


def compute_advantages(cfg, samples, old, ref, adv_fns, device: torch.device, whiten: bool = True,
                       ) -> tuple[list[torch.Tensor], dict]:
    """Per-sample advantages [R_s] for the chosen estimator, on the whole rollout at once, on `device` (the device
    the advantage kernels were chosen for: select_advantages_impl(device) in setup_run). whiten False: REINFORCE++
    returns the returns unwhitened (the caller whitens them over every rank: whiten_across_ranks)."""
    reinforce_fn, group_fn = adv_fns
    full = pack(samples, device=device)  # the advantage pass is O(T)
    have = [o is not None for o in old]
    old_t = full.scatter_responses([o if o is not None else torch.zeros(len(s.response_ids))
                                    for o, s in zip(old, samples)])
    ref_t = full.scatter_responses(ref) if ref is not None else old_t
    if cfg.algo.estimator == "reinforce_pp":
        if cfg.algo.kl_coef > 0 and not all(have):
            raise ValueError("REINFORCE++ with kl_coef > 0 needs the old log-probs of every sample")
        adv, _ = reinforce_fn(old_t, ref_t, full.rewards, full.cu_seqlens, full.loss_mask, full.roles,
                              kl_coef=cfg.algo.kl_coef, n_roles=len(ROLE_IDS), whiten=cfg.algo.whiten and whiten)
    else:
        # dense ids 0..G-1: ties and empty turns leave gaps in the (seed, role) group numbers
        raw = torch.tensor([s.metadata["group"] for s in samples], dtype=torch.int64)
        groups = torch.unique(raw, return_inverse=True)[1].to(device)
        adv = group_fn(full.rewards, groups, full.cu_seqlens, full.loss_mask, kind=cfg.algo.estimator)
    # the KL metric over the samples whose old log-probs exist (update_policy adds the others')
    return full.split_responses(adv.cpu()), kl_sums(samples, old, ref)


def whiten_across_ranks(samples, returns: list[torch.Tensor], eps: float = 1e-8) -> list[torch.Tensor]:
    """REINFORCE++'s per-role whitening (the advantage kernel's: masked mean and population variance per role, in
    float64, variance clamped at eps) over the response tokens of every rank's samples together."""
    n_roles = len(ROLE_IDS)
    stats = [0.0] * (3 * n_roles)  # per role: count, sum, sum of squares
    for s, r in zip(samples, returns):
        k, r64 = ROLE_IDS[s.role], r.double()
        stats[k] += r64.numel()
        stats[n_roles + k] += float(r64.sum())
        stats[2 * n_roles + k] += float((r64 * r64).sum())
    stats = collective.all_sum(stats)
    mean = [stats[n_roles + k] / max(stats[k], 1) for k in range(n_roles)]
    var = [max(stats[2 * n_roles + k] / max(stats[k], 1) - mean[k] ** 2, eps) for k in range(n_roles)]
    return [((r.double() - mean[ROLE_IDS[s.role]]) / var[ROLE_IDS[s.role]] ** 0.5).float()
            for s, r in zip(samples, returns)]


def update_policy(learner: Learner, step: int, samples, old, ref, advs, minis: list[list[int]] | None = None,
                  ) -> dict:
    """updates_per_step optimizer steps over shuffled mini-batches; a non-finite loss skips its optimizer step.

    Log-probs at the sampling temperature (old and ref were computed at it too). A sample whose old log-probs are
    None (first mini-batch only: needs_old) uses its own detached log-probs. GRPO/RLOO with kl_coef > 0 add the k3
    KL to the reference as a loss term (REINFORCE++ has it in the reward). The scheduler moves once per planned
    update, done or skipped, so the cosine reaches its floor at the last update of the last step. fp16 runs
    through a gradient scaler."""
    cfg, a = learner.cfg, learner.cfg.algo
    kl_in_loss = a.estimator != "reinforce_pp" and a.kl_coef > 0 and ref is not None
    minis = minis if minis is not None else mini_batches(cfg, step, len(samples))
    if any(x is None for m in minis[1:] for i in m for x in [old[i]]):
        raise ValueError("update_policy: only the first mini-batch may come without old log-probs")
    acc = UpdateMetrics()
    done = sum(update_on_mini_batch(learner, step, samples, old, ref, advs, idx, kl_in_loss, acc) for idx in minis)
    for _ in range(cfg.optim.updates_per_step - done):  # skipped and unplanned updates still use their slot
        scheduler_step(learner)
    out = acc.result()
    out["optim/skipped_updates"] = len(minis) - done
    out["optim/updates"] = done
    if learner.scaler.is_enabled():
        out["optim/grad_scale"] = learner.scaler.get_scale()
    return out


SUMMED_OVER_MICRO_BATCHES = ("loss/pg", "loss/kl_k3")


class UpdateMetrics:
    """update_policy's metrics, gathered over its micro-batches: token-level means (each micro-batch's mean weighs
    its loss tokens, and a role's mean its loss tokens of that role: a mean over every such token of the step, not
    a mean of micro-batch means), the parts of one mini-batch's loss (summed over its micro-batches, then one value
    per mini-batch), maxima and minima, and the k1 KL sums of the micro-batches trained at the rollout's weights."""

    def __init__(self):
        self.values: dict[str, list] = {}
        self.weights: dict[str, list] = {}
        self.kl: dict[str, float] = {}
        self.rows = 0

    def add(self, key: str, value, weight: int | None = None) -> None:
        self.values.setdefault(key, []).append(value)
        if weight is not None:
            self.weights.setdefault(key, []).append(weight)

    def add_counts(self, metrics: dict) -> None:
        """A micro-batch's KL sums and forwarded rows (popped from `metrics`), counted whether or not its loss is
        finite."""
        for k in [k for k in metrics if k.startswith("kl/_")]:
            self.kl[k] = self.kl.get(k, 0.0) + metrics.pop(k)
        self.rows += metrics.pop("tokens/_rows")

    def add_micro_batch(self, metrics: dict, mb, per_mini: dict) -> None:
        """One micro-batch's other metrics (micro_batch_loss's); its loss parts go to `per_mini`, which the caller
        adds once its mini-batch's update is done."""
        tokens = {None: sum(len(s.response_ids) for s in mb),
                  **{r: sum(len(s.response_ids) for s in mb if s.role == r) for r in ROLE_IDS}}
        for k, v in metrics.items():
            if k in SUMMED_OVER_MICRO_BATCHES:
                per_mini[k] = per_mini.get(k, 0.0) + v
            else:
                self.add(k, v, tokens[ROLE_KEYS.get(k)])

    def result(self) -> dict:
        out = {}
        for k, vs in self.values.items():
            t = torch.stack([torch.as_tensor(v).float() for v in vs])
            if k.endswith(("_max", "_min")):
                out[k] = t.max() if k.endswith("_max") else t.min()
            elif k in self.weights:
                w = torch.tensor(self.weights[k], dtype=torch.float32)
                out[k] = (t * w).sum() / w.sum() if sum(self.weights[k]) else None  # None: no token of the role
            else:
                out[k] = t.mean()
        out.update({k.replace("kl/_sum", "kl/_sum_train").replace("kl/_n", "kl/_n_train"): v
                    for k, v in self.kl.items()})
        out.setdefault("kl/_sum_train", 0.0)
        out.setdefault("kl/_n_train", 0)
        out["tokens/train_rows"] = self.rows  # RL forwards and backwards (SFT rows not counted)
        return out


def update_on_mini_batch(learner: Learner, step: int, samples, old, ref, advs, idx: list[int], kl_in_loss: bool,
                         acc: UpdateMetrics) -> bool:
    """One optimizer step on the mini-batch of samples `idx` (gradient accumulation over its micro-batches);
    False when it was skipped (a non-finite loss or gradient on any rank)."""
    optimizer, scaler = learner.optimizer, learner.scaler
    sharded = sharding.is_sharded(learner.model)
    mini = [samples[i] for i in idx]
    # the token mean is over the mini-batch of every rank together (collective.py)
    n_tokens = int(collective.all_sum([sum(len(s.response_ids) for s in mini)])[0])
    optimizer.zero_grad(set_to_none=True)
    acc.add("optim/lr", torch.tensor(optimizer.param_groups[0]["lr"]))
    finite, per_mini = backward_micro_batches(learner, step, mini, idx, old, ref, advs, n_tokens, kl_in_loss, acc)
    finite, gn = reduced_and_clipped(learner, finite, sharded)
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        scaler.update()  # fp16: an overflow lowers the scale
        return False
    for k, v in per_mini.items():
        acc.add(k, v)
    acc.add("optim/grad_norm", gn.detach())
    scaler.step(optimizer)
    scaler.update()
    scheduler_step(learner)
    faults.hit("update")
    return True


def backward_micro_batches(learner: Learner, step: int, mini, idx, old, ref, advs, n_tokens: int,
                           kl_in_loss: bool, acc: UpdateMetrics) -> tuple[bool, dict]:
    """Forward and backward of each micro-batch of one mini-batch (their gradients add up); stops at the first
    non-finite loss. Returns (all finite, the mini-batch's loss parts)."""
    o, sharded = learner.cfg.optim, sharding.is_sharded(learner.model)
    where = {id(s): i for s, i in zip(mini, idx)}  # sample -> its index in the rollout
    finite, per_mini, passes = True, {}, 0
    mbs = micro_batches(mini, o.micro_batch_tokens, o.share_prefix, bool(lora_roles(learner.model)))
    n_passes = collective.all_max(len(mbs)) if sharded else len(mbs)  # FSDP2: as many on every rank
    for mb in mbs:
        pos = [where[id(x)] for x in mb]
        mb_old = [old[i] for i in pos]
        mb_ref = [ref[i] for i in pos] if ref is not None and (kl_in_loss or mb_old[0] is None) else None
        loss, metrics = micro_batch_loss(learner, mb, None if mb_old[0] is None else mb_old,
                                         [advs[i] for i in pos], mb_ref, n_tokens, kl_in_loss)
        acc.add_counts(metrics)
        if step == learner.cfg.inject_nan_loss_at_step:
            loss = loss * float("nan")
        if not is_finite_loss(loss):  # host sync, once per micro-step, before backward
            finite = False
            if sharded:  # FSDP2: its backward's collectives still run (the update is skipped on every rank)
                loss.backward()
                passes += 1
            break
        learner.scaler.scale(loss).backward()
        passes += 1
        acc.add_micro_batch(metrics, mb, per_mini)
    if sharded:  # FSDP2: as many forward-backward passes on every rank; their backwards summed the gradients
        matching_passes(learner, n_passes - passes, kl_in_loss)
    return finite, per_mini


def reduced_and_clipped(learner: Learner, finite: bool, sharded: bool) -> tuple[bool, torch.Tensor | None]:
    """After a mini-batch's backwards: (whether to step, the grad norm). Under torchrun one rank's non-finite loss
    skips the update on all, else the ranks' gradients are summed (FSDP2 already did it in its backwards); then
    unscaled (fp16) and clipped to the norm of the whole gradient, which must be finite too."""
    model, optimizer = learner.model, learner.optimizer
    if collective.active():
        finite = collective.all_true(finite)
        if finite and not sharded:
            collective.reduce_gradients(model.parameters())
    if not finite:
        return False, None
    learner.scaler.unscale_(optimizer)
    gn = sharding.clip_grad_norm(model.parameters(), learner.cfg.optim.grad_clip)
    return bool(torch.isfinite(gn)), gn


def micro_batch_loss(learner: Learner, mb, old, advs, ref, n_tokens: int, kl_in_loss: bool | None = None,
                     ) -> tuple[torch.Tensor, dict]:
    """One micro-batch's share of its mini-batch loss (each term a sum over its tokens / n_tokens, the mini-batch's
    response tokens): PPO-clip with TIS, + the k3 KL to `ref` (GRPO/RLOO, when kl_in_loss), + the SFT loss.
    Its metrics include each role's (role_metrics).

    old None: the micro-batch is at the rollout's weights, its old log-probs are its own (detached); with `ref`
    it then also reports the k1 KL sums ("kl/_sum", "kl/_n", and per role) for the step's kl/mean."""
    a, model = learner.cfg.algo, learner.model
    kl_in_loss = ref is not None if kl_in_loss is None else kl_in_loss
    batch = pack_for(mb, model.device, learner.cfg.optim.share_prefix)
    sft = a.sft_coef > 0 and learner.sft_stream is not None
    sb = pack(learner.sft_stream.next(a.sft_samples_per_micro_step), device=model.device) if sft else None
    with learner.autocast():  # both forwards in one region: each fp32 weight is cast once per micro-step
        with role_adapter(model, mb[0].role):  # per-role adapters: the micro-batch's role's (one role each)
            logp, ent = token_logprobs(model, batch, learner.logprob_fn, learner.temperature)
        if sft:
            with role_adapter(model, "defender"):  # the SFT samples are defender turns
                slp, _ = token_logprobs(model, sb, learner.logprob_fn)  # the model's own distribution (T = 1)
    old_t = logp.detach() if old is None else batch.scatter_responses(old)
    adv_t = batch.scatter_responses(advs)
    loss, metrics = ppo_clip_loss(logp, old_t, adv_t, batch.loss_mask, clip_eps=a.clip_eps,
                                  vllm_logp=batch.vllm_logp if a.importance_correction else None,
                                  tis_cap=a.tis_cap, entropy=ent, num_tokens=n_tokens)
    metrics["tokens/_rows"] = batch.num_tokens
    masks = role_loss_masks(batch, mb)
    metrics.update(role_metrics(learner, batch, masks, logp, old_t, adv_t, ent))
    ref_t = batch.scatter_responses(ref) if ref is not None else None
    if old is None and ref_t is not None:
        # device tensors (no host sync per micro-step); loss_index, not a boolean mask (whose nonzero syncs)
        diff = logp.detach() - ref_t
        metrics["kl/_sum"] = diff.index_select(0, batch.loss_index).sum()
        metrics["kl/_n"] = batch.num_loss_tokens
        for role, (mask, n) in masks.items():
            metrics[f"kl/_sum_{role}"], metrics[f"kl/_n_{role}"] = torch.where(mask, diff, 0.0).sum(), n
    if kl_in_loss and ref_t is not None:
        kl_loss, kl_metrics = kl_k3_loss(logp, ref_t, batch.loss_mask, num_tokens=n_tokens)
        loss = loss + a.kl_coef * kl_loss
        metrics.update(kl_metrics)
    if sft:
        s_loss, s_metrics = sft_loss(slp, sb.loss_mask)
        loss = loss + a.sft_coef * s_loss * (batch.num_loss_tokens / n_tokens)
        metrics.update(s_metrics)
    return loss, metrics


def role_loss_masks(batch, mb) -> dict[str, tuple[torch.Tensor, int]]:
    """Per role: a [T] bool mask of its samples' loss positions (built on the host, moved once) and their count."""
    out = {}
    for role in ROLE_IDS:
        spans = [sp for sp, s in zip(batch.response_spans, mb) if s.role == role]
        mask = torch.zeros(batch.num_tokens, dtype=torch.bool)
        for start, end in spans:
            mask[start:end] = True
        out[role] = (mask.to(batch.input_ids.device, non_blocking=True), sum(e - b for b, e in spans))
    return out


@torch.no_grad()
def role_metrics(learner: Learner, batch, masks: dict, logp, old_t, adv_t, ent) -> dict:
    """The ROLE_SPLIT metrics of ppo_clip_loss (the same formulas) over each role's loss tokens, as role_key
    names; a role without tokens in the micro-batch has none."""
    a, out = learner.cfg.algo, {}
    for role, (mask, n) in masks.items():
        if not n:
            continue
        _, m = ppo_clip_loss(logp.detach(), old_t, adv_t, mask, clip_eps=a.clip_eps,
                             vllm_logp=batch.vllm_logp if a.importance_correction else None, tis_cap=a.tis_cap,
                             entropy=ent)
        out.update({role_key(k, role): v for k, v in m.items() if k in ROLE_SPLIT})
    return out


# ------------------------------------------------------------------------------------------- FSDP2: matching passes
# A sharded model (fast_srt.learner.sharding) all-gathers in every forward and reduce-scatters in every backward, so
# every rank must run as many of each, in the same order; ranks hold different numbers of micro-batches (or none).
# The most any rank will run is agreed before the first forward (a host reduction between two ranks' collectives
# would deadlock them); a rank with fewer then adds passes on a one-token batch whose loss is multiplied by 0.

PAD_SAMPLE = Sample([0], [0], "attacker", 0.0, [0.0], metadata={"group": 0})


def matching_forwards(learner: Learner, model, n: int) -> None:
    """n no-grad log-prob forwards of `model`; then the root's weights, which FSDP2 keeps gathered after a forward
    (for its backward, and there is none here), are freed."""
    for _ in range(n):
        per_sample_logprobs(model, [PAD_SAMPLE], learner.logprob_fn, 1 << 30, learner.autocast, learner.temperature)
    model.reshard()


def matching_passes(learner: Learner, n: int, kl_in_loss: bool) -> None:
    """n forward-backward passes through micro_batch_loss (its SFT forward included) adding zero gradient."""
    zero = [torch.zeros(1)]
    for _ in range(n):
        loss, _ = micro_batch_loss(learner, [PAD_SAMPLE], None, zero, zero if kl_in_loss else None, 1, kl_in_loss)
        (loss * 0.0).backward()


def scheduler_step(learner: Learner) -> None:
    if learner.scheduler.last_epoch < learner.total_updates:  # never past the floor
        learner.scheduler.step()


def total_updates(cfg: TrainConfig) -> int:
    """The scheduler's horizon: the index of the last planned update, so that its LR is the cosine's floor."""
    return max(1, cfg.steps * cfg.optim.updates_per_step - 1)


def pick_logprob_impl(name: str, device: torch.device):
    from fast_srt.kernels import LOGPROB_IMPLS, native, select_logprobs_impl

    if name == "auto":
        return select_logprobs_impl(device)
    if name == "triton" and device.type != "cuda":
        raise UserError("logprob_impl 'triton' needs CUDA (on CPU the Triton kernels only run in the interpreter, "
                        "in tests); use auto, chunked, native or naive")
    if name == "native" and not native.available():
        raise UserError("logprob_impl 'native' needs the C++ op: build it with `make native`, or use auto/chunked")
    return LOGPROB_IMPLS[name]
