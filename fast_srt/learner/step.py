"""The learner's half of a training step (torch only): samples from played games, trainer log-probs (old and
reference), advantages, and the PPO-clip updates. `learner_step` runs them in order; fast_srt.run.trainer calls it
between playing the games and writing the new weights into the engine.

  1. samples: both roles' turns of every game that was not a tie or dropped
  2. old and reference log-probs at the sampling temperature (no grad), in token-budget micro-batches, no padding
  3. advantages: REINFORCE++ (KL in the reward, reverse cumsum, per-role whitening) or GRPO/RLOO (dense groups)
  4. updates_per_step PPO-clip updates with truncated importance correction against vLLM's log-probs (+ SFT)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from fast_srt import faults
from fast_srt.config import TrainConfig
from fast_srt.errors import UserError
from fast_srt.learner.batch import ROLE_IDS, Sample, pack, split_micro_batches
from fast_srt.learner.lora import adapters_disabled
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
    learner.model.eval()
    with timer("logprob"):
        old, ref = old_and_ref_logprobs(learner, samples)
    with timer("advantage"):
        advs, metrics = compute_advantages(learner.cfg, samples, old, ref, learner.adv_fns, learner.device)
    learner.model.train()
    with timer("train"):
        metrics.update(update_policy(learner, step, samples, old, ref, advs))
    return metrics


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


@torch.no_grad()
def per_sample_logprobs(model, samples, logprob_fn, micro_tokens: int, autocast, temperature: float,
                        ) -> list[torch.Tensor]:
    """Trainer log-probs of each sample's response tokens at the sampling temperature, [R_s] each, in token-budget
    micro-batches."""
    out: dict[int, torch.Tensor] = {}
    index = {id(s): i for i, s in enumerate(samples)}
    for mb in split_micro_batches(samples, micro_tokens):
        batch = pack(mb, device=model.device)
        with autocast():
            logp, _ = token_logprobs(model, batch, logprob_fn, temperature)
        for s, v in zip(mb, batch.split_responses(logp.float().cpu())):  # one device-to-host copy per batch
            out[index[id(s)]] = v
    return [out[i] for i in range(len(samples))]


def old_and_ref_logprobs(learner: Learner, samples) -> tuple[list, list | None]:
    """Trainer log-probs at experience time, and under the frozen reference when the KL term needs them, all at
    the sampling temperature."""
    cfg, mb = learner.cfg, learner.cfg.optim.micro_batch_tokens
    lp = lambda m: per_sample_logprobs(m, samples, learner.logprob_fn, mb, learner.autocast, learner.temperature)  # noqa
    old = lp(learner.model)
    if learner.ref is not None:
        return old, lp(learner.ref)
    if cfg.lora_rank and cfg.algo.kl_coef > 0:
        with adapters_disabled(learner.model):  # the base model is the reference: no second copy
            return old, lp(learner.model)
    return old, None


def compute_advantages(cfg, samples, old, ref, adv_fns, device: torch.device,
                       ) -> tuple[list[torch.Tensor], dict]:
    """Per-sample advantages [R_s] for the chosen estimator, on the whole rollout at once, on `device` (the device
    the advantage kernels were chosen for: select_advantages_impl(device) in setup_run)."""
    reinforce_fn, group_fn = adv_fns
    full = pack(samples, device=device)  # the advantage pass is O(T)
    old_t = full.scatter_responses(old)
    ref_t = full.scatter_responses(ref) if ref is not None else old_t
    kl = (old_t - ref_t)[full.loss_mask]
    if cfg.algo.estimator == "reinforce_pp":
        adv, _ = reinforce_fn(old_t, ref_t, full.rewards, full.cu_seqlens, full.loss_mask, full.roles,
                              kl_coef=cfg.algo.kl_coef, n_roles=len(ROLE_IDS), whiten=cfg.algo.whiten)
    else:
        # dense ids 0..G-1: ties and empty turns leave gaps in the (seed, role) group numbers
        raw = torch.tensor([s.metadata["group"] for s in samples], dtype=torch.int64)
        groups = torch.unique(raw, return_inverse=True)[1].to(device)
        adv = group_fn(full.rewards, groups, full.cu_seqlens, full.loss_mask, kind=cfg.algo.estimator)
    return full.split_responses(adv.cpu()), {"kl/mean": kl.mean() if kl.numel() else torch.tensor(0.0)}


def update_policy(learner: Learner, step: int, samples, old, ref, advs) -> dict:
    """updates_per_step optimizer steps over shuffled mini-batches; a non-finite loss skips its optimizer step.

    Log-probs at the sampling temperature (old and ref were computed at it too). GRPO/RLOO with kl_coef > 0 add
    the k3 KL to the reference as a loss term (REINFORCE++ has it in the reward). The scheduler moves once per
    planned update, done or skipped, so the cosine reaches its floor at the last update of the last step. fp16
    runs through a gradient scaler."""
    cfg, model, optimizer, scaler = learner.cfg, learner.model, learner.optimizer, learner.scaler
    o, a = cfg.optim, cfg.algo
    kl_in_loss = a.estimator != "reinforce_pp" and a.kl_coef > 0 and ref is not None
    order = list(range(len(samples)))
    random.Random(cfg.seed * 100003 + step).shuffle(order)
    n_mini = min(o.updates_per_step, len(order))
    acc: dict[str, list] = {}
    skipped = 0
    for m in range(n_mini):
        idx = order[m::n_mini]
        mini = [samples[i] for i in idx]
        n_tokens = sum(len(s.response_ids) for s in mini)
        where = {id(s): i for s, i in zip(mini, idx)}  # sample -> its index in the rollout
        optimizer.zero_grad(set_to_none=True)
        acc.setdefault("optim/lr", []).append(torch.tensor(optimizer.param_groups[0]["lr"]))
        finite, per_mini = True, {}
        for mb in split_micro_batches(mini, o.micro_batch_tokens):
            pos = [where[id(x)] for x in mb]
            loss, metrics = micro_batch_loss(learner, mb, [old[i] for i in pos], [advs[i] for i in pos],
                                             [ref[i] for i in pos] if kl_in_loss else None, n_tokens)
            if step == cfg.inject_nan_loss_at_step:
                loss = loss * float("nan")
            if not is_finite_loss(loss):  # host sync, once per micro-step, before backward
                finite = False
                break
            scaler.scale(loss).backward()
            for k, v in metrics.items():
                if k in SUMMED_OVER_MICRO_BATCHES:  # parts of one mini-batch loss (each divided by n_tokens)
                    per_mini[k] = per_mini.get(k, 0.0) + v
                else:
                    acc.setdefault(k, []).append(v)
        if finite:
            scaler.unscale_(optimizer)
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            finite = bool(torch.isfinite(gn))
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            scaler.update()  # fp16: an overflow lowers the scale
            skipped += 1
            continue
        for k, v in per_mini.items():
            acc.setdefault(k, []).append(v)
        acc.setdefault("optim/grad_norm", []).append(gn.detach())
        scaler.step(optimizer)
        scaler.update()
        scheduler_step(learner)
        faults.hit("update")
    for _ in range(o.updates_per_step - (n_mini - skipped)):  # skipped and unplanned updates still use their slot
        scheduler_step(learner)
    out = {}
    for k, vs in acc.items():
        t = torch.stack([torch.as_tensor(v).float() for v in vs])
        out[k] = t.max() if k.endswith("_max") else (t.min() if k.endswith("_min") else t.mean())
    out["optim/skipped_updates"] = skipped
    out["optim/updates"] = n_mini - skipped
    if scaler.is_enabled():
        out["optim/grad_scale"] = scaler.get_scale()
    return out


SUMMED_OVER_MICRO_BATCHES = ("loss/pg", "loss/kl_k3")


def micro_batch_loss(learner: Learner, mb, old, advs, ref, n_tokens: int) -> tuple[torch.Tensor, dict]:
    """One micro-batch's share of its mini-batch loss (each term a sum over its tokens / n_tokens, the mini-batch's
    response tokens): PPO-clip with TIS, + the k3 KL to `ref` (GRPO/RLOO, when given), + the SFT loss."""
    a, model = learner.cfg.algo, learner.model
    batch = pack(mb, device=model.device)
    with learner.autocast():
        logp, ent = token_logprobs(model, batch, learner.logprob_fn, learner.temperature)
    loss, metrics = ppo_clip_loss(logp, batch.scatter_responses(old), batch.scatter_responses(advs),
                                  batch.loss_mask, clip_eps=a.clip_eps,
                                  vllm_logp=batch.vllm_logp if a.importance_correction else None,
                                  tis_cap=a.tis_cap, entropy=ent, num_tokens=n_tokens)
    if ref is not None:
        kl_loss, kl_metrics = kl_k3_loss(logp, batch.scatter_responses(ref), batch.loss_mask, num_tokens=n_tokens)
        loss = loss + a.kl_coef * kl_loss
        metrics.update(kl_metrics)
    if a.sft_coef > 0 and learner.sft_stream is not None:
        sb = pack(learner.sft_stream.next(a.sft_samples_per_micro_step), device=model.device)
        with learner.autocast():
            slp, _ = token_logprobs(model, sb, learner.logprob_fn)  # the model's own distribution (T = 1)
        s_loss, s_metrics = sft_loss(slp, sb.loss_mask)
        loss = loss + a.sft_coef * s_loss * (batch.num_loss_tokens / n_tokens)
        metrics.update(s_metrics)
    return loss, metrics


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
                        "in tests); use auto, twin, native or naive")
    if name == "native" and not native.available():
        raise UserError("logprob_impl 'native' needs the C++ op: build it with `make native`, or use auto/twin")
    return LOGPROB_IMPLS[name]
