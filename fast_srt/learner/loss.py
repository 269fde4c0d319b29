"""Policy losses on per-token tensors: PPO-clip with truncated importance sampling, and the auxiliary SFT loss.

All inputs are per-token tensors of one shape (the packed [T] layout of batch.py, or anything else), with a
bool `mask` (True = counts in the loss). Values at masked-out positions never reach the loss or its gradient.
Losses are token means over the masked tokens of the call (OpenRLHF: token-mean per packed micro-batch), or
sums divided by `num_tokens` when given (to normalise over a whole step's tokens under gradient accumulation).
Metrics are 0-dim detached tensors with namespaced keys; nothing here calls .item() (no host sync).

PPO-clip with truncated token-level importance sampling (TIS), per loss token t:
  1. r_t  = exp(logp_t - old_logp_t)            logp: trainer now (with grad); old_logp: trainer at experience
                                                time, same weights that vLLM sampled with (no grad)
  2. pg_t = -min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t)
  3. w_t  = min(exp(old_logp_t - vllm_logp_t), tis_cap), detached     vllm_logp: the sampler's log-prob of the
                                                token. Corrects for vLLM's and the trainer's numerics differing.
  4. loss = sum_t mask_t w_t pg_t / sum_t mask_t
Log-ratios are clamped to [-20, 20] before exp so one wild token cannot make the loss inf.
"""

from __future__ import annotations

import torch

LOG_RATIO_CLAMP = 20.0


def _denominator(mask: torch.Tensor, num_tokens: torch.Tensor | float | None) -> torch.Tensor:
    if num_tokens is not None:
        return torch.as_tensor(num_tokens, dtype=torch.float32, device=mask.device)
    return mask.sum().clamp(min=1).float()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, float("-inf")).max()


def masked_min(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, float("inf")).min()


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  clip_eps: float = 0.2, vllm_logp: torch.Tensor | None = None, tis_cap: float = 2.0,
                  entropy: torch.Tensor | None = None, num_tokens: torch.Tensor | float | None = None,
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip surrogate (eps = clip_eps) with TIS against vllm_logp when given. See the module docstring."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool (True = counts in the loss), got {mask.dtype}")
    old_logp = old_logp.detach()
    advantages = torch.where(mask, advantages.detach(), 0.0)  # junk off the mask must not reach any gradient
    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [T] f32
    ratio = torch.exp(log_ratio)  # [T]
    surr = ratio * advantages  # [T]
    surr_clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages  # [T]
    pg = -torch.minimum(surr, surr_clipped)  # [T]
    metrics: dict[str, torch.Tensor] = {}
    if vllm_logp is not None:
        is_log_ratio = (old_logp - vllm_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [T]
        is_ratio = torch.exp(is_log_ratio)  # [T], raw (before truncation)
        pg = pg * is_ratio.clamp(max=tis_cap)
        mismatch = is_log_ratio.abs()
        metrics.update({
            "is/ratio_mean": masked_mean(is_ratio, mask),
            "is/ratio_max": masked_max(is_ratio, mask),
            "is/ratio_min": masked_min(is_ratio, mask),
            "is/trunc_frac": masked_mean((is_ratio > tis_cap).float(), mask),
            "is/logp_mismatch_mean_abs": masked_mean(mismatch, mask),
            "is/logp_mismatch_max_abs": masked_max(mismatch, mask),
        })
    loss = torch.where(mask, pg, 0.0).sum() / _denominator(mask, num_tokens)
    with torch.no_grad():
        metrics.update({
            "loss/pg": loss.detach(),
            "loss/clip_frac": masked_mean((surr_clipped < surr).float(), mask),  # clipped side chosen: no gradient
            "loss/approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),  # k3 estimator of KL(old || new)
            "loss/ratio_mean": masked_mean(ratio, mask),
            "loss/tokens": mask.sum().float(),
        })
        if entropy is not None:
            metrics["policy/entropy"] = masked_mean(entropy.detach().float(), mask)
    return loss, {k: v.detach() for k, v in metrics.items()}


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, num_tokens: torch.Tensor | float | None = None,
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean negative log-likelihood over the masked (response) tokens: the auxiliary PTX-SFT loss."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool (True = counts in the loss), got {mask.dtype}")
    loss = -torch.where(mask, logp, 0.0).sum() / _denominator(mask, num_tokens)
    return loss, {"loss/sft": loss.detach(), "sft/tokens": mask.sum().float()}


def is_finite_loss(loss: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor, True when loss has no NaN/inf. Reading it (bool(...) / .item()) is a host sync:
    do it once per micro-step, before backward, so a bad micro-batch is skipped without touching gradients."""
    return torch.isfinite(loss.detach()).all()


def kl_k3_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
               num_tokens: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL(pi || pi_ref) as a loss term (the GRPO way, k3 estimator, unbiased and >= 0 per token):
    k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1, token mean over the mask (or sum / num_tokens)."""
    d = (ref_logp.detach() - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [T]
    k3 = torch.exp(d) - d - 1.0  # [T]
    loss = torch.where(mask, k3, 0.0).sum() / _denominator(mask, num_tokens)
    return loss, {"loss/kl_k3": loss.detach()}

