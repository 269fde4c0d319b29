"""Advantages over packed sequences: REINFORCE++ (KL-folded reward, reverse return, per-role whitening) and
group baselines (GRPO, RLOO). Each Triton path has a torch twin with the same signature beside it.

Packing: sample s owns tokens cu_seqlens[s]:cu_seqlens[s+1] of a [T] stream; loss_mask [T] bool is True on the
tokens that count (completion tokens), False on prompt tokens. No gradients: inputs are detached.

REINFORCE++ (OpenRLHF), per sample s, over its masked tokens t:
  1. r_t = -kl_coef * (logp_t - ref_logp_t), plus rewards[s] on the LAST masked token of s (0 on unmasked tokens;
     a sample with no masked token contributes nothing);
  2. returns_t = sum_{u >= t, u in s} r_u (gamma 1), 0 on unmasked tokens;
  3. advantages = (returns - mean_role) * rsqrt(max(var_role, eps)) over the masked tokens of each role, population
     variance (OpenRLHF masked normalize), 0 on unmasked tokens; whiten=False gives advantages = returns.
Triton: one program per sample does 1-2 and adds the role's count / sum / sum of squares (fp64 atomics) in the
same pass; a second launch applies 3. The twin does the same with segment ops, in float64 internally.

Group baselines, per sample s in group g (value broadcast to s's masked tokens, 0 elsewhere):
  GRPO: (r_s - mean_g) / (std_g + eps) if scale_std else r_s - mean_g; std_g is the UNBIASED std (TRL's
        `rewards.view(-1, G).std(dim=1)`); a group of one has std 0, hence advantage 0.
  RLOO: r_s - mean of the other samples of g; a group of one gives 0.
group_ids are integers in [0, S) (any labelling; groups need not be contiguous).
"""

from __future__ import annotations

import torch

from ._utils import check_1d, check_packed

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

BLOCK_T = 128  # tokens per step inside one sample's program
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_reinforce(logp, ref_logp, rewards, cu_seqlens, loss_mask, roles, n_roles):
    name = "reinforce_pp_advantages"
    S = rewards.shape[0] if rewards.dim() == 1 else -1
    if S < 0:
        raise ValueError(f"{name}: rewards must be [S], got {tuple(rewards.shape)}")
    check_packed(name, cu_seqlens, loss_mask, S)
    T = loss_mask.shape[0]
    check_1d(name, "logp", logp, T, FLOATS)
    check_1d(name, "ref_logp", ref_logp, T, FLOATS)
    check_1d(name, "rewards", rewards, S, FLOATS)
    check_1d(name, "roles", roles, S, (torch.int64, torch.int32))
    if n_roles < 1:
        raise ValueError(f"{name}: n_roles must be >= 1, got {n_roles}")
    if S > 0 and (int(roles.min()) < 0 or int(roles.max()) >= n_roles):
        raise ValueError(f"{name}: roles must lie in [0, {n_roles}), got [{int(roles.min())}, {int(roles.max())}]")


def _check_group(rewards, group_ids, cu_seqlens, loss_mask, kind):
    name = "group_advantages"
    if kind not in ("grpo", "rloo"):
        raise ValueError(f"{name}: kind must be 'grpo' or 'rloo', got {kind!r}")
    if rewards.dim() != 1:
        raise ValueError(f"{name}: rewards must be [S], got {tuple(rewards.shape)}")
    S = rewards.shape[0]
    check_1d(name, "rewards", rewards, S, FLOATS)
    check_1d(name, "group_ids", group_ids, S, (torch.int64, torch.int32))
    check_packed(name, cu_seqlens, loss_mask, S)
    if S > 0 and (int(group_ids.min()) < 0 or int(group_ids.max()) >= S):
        raise ValueError(f"{name}: group_ids must lie in [0, S={S})")


# ----------------------------------------------------------------------------------------------------------------
# torch twins


def _token_sample(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.shape[0], device=cu_seqlens.device), lengths, output_size=T)


def reinforce_pp_advantages_ref(logp, ref_logp, rewards, cu_seqlens, loss_mask, roles, kl_coef: float, n_roles: int,
                                whiten: bool = True, eps: float = 1e-8):
    """Torch twin of `reinforce_pp_advantages` (module docstring). Returns (advantages [T] f32, returns [T] f32)."""
    _check_reinforce(logp, ref_logp, rewards, cu_seqlens, loss_mask, roles, n_roles)
    T, S = loss_mask.shape[0], rewards.shape[0]
    dev = loss_mask.device
    sample = _token_sample(cu_seqlens, T)  # (T,)
    r = torch.where(loss_mask, -kl_coef * (logp.double() - ref_logp.double()), 0.0)  # (T,) f64
    pos = torch.where(loss_mask, torch.arange(T, device=dev), -1)
    last = torch.full((S,), -1, dtype=torch.long, device=dev).scatter_reduce_(0, sample, pos, "amax")  # (S,)
    has = last >= 0
    r.index_add_(0, last[has], rewards.double()[has])
    # reverse cumsum within each sample: returns_t = (sum of sample) - (inclusive cumsum before t)
    c = torch.cumsum(r, 0)
    c_before = c - r
    seg_end = c[(cu_seqlens[1:].long() - 1).clamp(min=0)]  # (S,) inclusive cumsum at each sample's last token
    returns = torch.where(loss_mask, seg_end[sample] - c_before, 0.0)
    if not whiten:
        return returns.float(), returns.float()
    role = roles.long()[sample]  # (T,)
    w = loss_mask.double()
    cnt = torch.zeros(n_roles, dtype=torch.float64, device=dev).index_add_(0, role, w)
    mean = torch.zeros_like(cnt).index_add_(0, role, returns * w) / cnt.clamp(min=1)
    d = returns - mean[role]
    var = torch.zeros_like(cnt).index_add_(0, role, d * d * w) / cnt.clamp(min=1)
    adv = torch.where(loss_mask, d * torch.rsqrt(var.clamp(min=eps))[role], 0.0)
    return adv.float(), returns.float()


def group_advantages_ref(rewards, group_ids, cu_seqlens, loss_mask, kind: str, scale_std: bool = True,
                         eps: float = 1e-6):
    """Torch twin of `group_advantages` (module docstring). Returns advantages [T] f32."""
    _check_group(rewards, group_ids, cu_seqlens, loss_mask, kind)
    S, T = rewards.shape[0], loss_mask.shape[0]
    g = group_ids.long()
    r = rewards.double()
    n = torch.zeros(S, dtype=torch.float64, device=r.device).index_add_(0, g, torch.ones_like(r))
    total = torch.zeros_like(n).index_add_(0, g, r)
    if kind == "rloo":
        ng = n[g]
        per_sample = torch.where(ng > 1, r - (total[g] - r) / (ng - 1).clamp(min=1), 0.0)
    else:
        mean = total / n.clamp(min=1)
        dev2 = torch.zeros_like(n).index_add_(0, g, (r - mean[g]) ** 2)
        std = torch.sqrt(dev2 / (n - 1).clamp(min=1))  # unbiased; 0 for a group of one
        per_sample = r - mean[g]
        if scale_std:
            per_sample = per_sample / (std[g] + eps)
    sample = _token_sample(cu_seqlens, T)
    return torch.where(loss_mask, per_sample[sample], 0.0).float()


# ----------------------------------------------------------------------------------------------------------------
# Triton


if triton is not None:

    @triton.jit
    def _reinforce_returns_kernel(LOGP, REF_LOGP, REWARDS, CU, MASK, ROLES, RETURNS, STATS, kl_coef,
                                  BLOCK_T: tl.constexpr):
        # One program per sample: walk its tokens from the end, fold the KL penalty and the sample reward (on the
        # last masked token) into r_t, carry the reverse cumsum, and add the role's count/sum/sumsq (fp64).
        s = tl.program_id(0)
        start = tl.load(CU + s).to(tl.int64)
        end = tl.load(CU + s + 1).to(tl.int64)
        reward = tl.load(REWARDS + s).to(tl.float32)
        role = tl.load(ROLES + s).to(tl.int64)
        carry = 0.0
        found = 0
        cnt = 0.0
        acc = tl.zeros([BLOCK_T], dtype=tl.float64)
        acc2 = tl.zeros([BLOCK_T], dtype=tl.float64)
        n_blocks = tl.cdiv(end - start, BLOCK_T)
        for i in range(0, n_blocks):
            offs = end - (i + 1) * BLOCK_T + tl.arange(0, BLOCK_T)
            inb = offs >= start
            m = tl.load(MASK + offs, mask=inb, other=0).to(tl.int1) & inb
            lp = tl.load(LOGP + offs, mask=m, other=0.0).to(tl.float32)
            rlp = tl.load(REF_LOGP + offs, mask=m, other=0.0).to(tl.float32)
            r = tl.where(m, -kl_coef * (lp - rlp), 0.0)
            last = tl.max(tl.where(m, offs, -1), 0)
            r += tl.where((offs == last) & (found == 0), reward, 0.0)
            found = tl.where(last >= 0, 1, found)
            ret = tl.where(m, tl.cumsum(r, 0, reverse=True) + carry, 0.0)
            carry += tl.sum(r, 0)
            tl.store(RETURNS + offs, ret, mask=inb)
            retd = ret.to(tl.float64)
            acc += retd
            acc2 += retd * retd
            cnt += tl.sum(m.to(tl.float32), 0)
        tl.atomic_add(STATS + role * 3 + 0, cnt.to(tl.float64))
        tl.atomic_add(STATS + role * 3 + 1, tl.sum(acc, 0))
        tl.atomic_add(STATS + role * 3 + 2, tl.sum(acc2, 0))

    @triton.jit
    def _whiten_kernel(RETURNS, CU, MASK, ROLES, STATS, ADV, eps, BLOCK_T: tl.constexpr):
        s = tl.program_id(0)
        start = tl.load(CU + s).to(tl.int64)
        end = tl.load(CU + s + 1).to(tl.int64)
        role = tl.load(ROLES + s).to(tl.int64)
        cnt = tl.maximum(tl.load(STATS + role * 3 + 0), 1.0)
        mean = tl.load(STATS + role * 3 + 1) / cnt
        var = tl.load(STATS + role * 3 + 2) / cnt - mean * mean  # population variance, fp64
        inv_std = (1.0 / tl.sqrt(tl.maximum(var, eps))).to(tl.float32)
        mean32 = mean.to(tl.float32)
        for t0 in range(start, end, BLOCK_T):
            offs = t0 + tl.arange(0, BLOCK_T)
            inb = offs < end
            m = tl.load(MASK + offs, mask=inb, other=0).to(tl.int1) & inb
            x = tl.load(RETURNS + offs, mask=inb, other=0.0)
            tl.store(ADV + offs, tl.where(m, (x - mean32) * inv_std, 0.0), mask=inb)

    @triton.jit
    def _group_stats_kernel(REWARDS, GROUPS, STATS, S, BLOCK_S: tl.constexpr):
        offs = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        ok = offs < S
        r = tl.load(REWARDS + offs, mask=ok, other=0.0).to(tl.float64)
        g = tl.load(GROUPS + offs, mask=ok, other=0).to(tl.int64)
        tl.atomic_add(STATS + g * 3 + 0, tl.where(ok, 1.0, 0.0).to(tl.float64), mask=ok)
        tl.atomic_add(STATS + g * 3 + 1, r, mask=ok)
        tl.atomic_add(STATS + g * 3 + 2, r * r, mask=ok)

    @triton.jit
    def _group_broadcast_kernel(REWARDS, GROUPS, STATS, CU, MASK, ADV, eps, IS_RLOO: tl.constexpr,
                                SCALE_STD: tl.constexpr, BLOCK_T: tl.constexpr):
        s = tl.program_id(0)
        r = tl.load(REWARDS + s).to(tl.float64)
        g = tl.load(GROUPS + s).to(tl.int64)
        n = tl.load(STATS + g * 3 + 0)
        total = tl.load(STATS + g * 3 + 1)
        if IS_RLOO:
            value = tl.where(n > 1.0, r - (total - r) / tl.maximum(n - 1.0, 1.0), 0.0)
        else:
            mean = total / n
            value = r - mean
            if SCALE_STD:
                ss = tl.load(STATS + g * 3 + 2) - total * mean  # sum of squared deviations
                std = tl.sqrt(tl.maximum(ss, 0.0) / tl.maximum(n - 1.0, 1.0))
                value = value / (std + eps)
        v32 = value.to(tl.float32)
        start = tl.load(CU + s).to(tl.int64)
        end = tl.load(CU + s + 1).to(tl.int64)
        for t0 in range(start, end, BLOCK_T):
            offs = t0 + tl.arange(0, BLOCK_T)
            inb = offs < end
            m = tl.load(MASK + offs, mask=inb, other=0).to(tl.int1) & inb
            tl.store(ADV + offs, tl.where(m, v32, 0.0), mask=inb)


def reinforce_pp_advantages(logp, ref_logp, rewards, cu_seqlens, loss_mask, roles, kl_coef: float, n_roles: int,
                            whiten: bool = True, eps: float = 1e-8):
    """Triton REINFORCE++ advantages (module docstring).

    logp, ref_logp [T] float; rewards [S] float; cu_seqlens [S+1] int32/int64; loss_mask [T] bool; roles [S] int64
    in [0, n_roles). Returns (advantages [T] fp32, returns [T] fp32). Two launches: returns + role stats, whiten.
    """
    _check_reinforce(logp, ref_logp, rewards, cu_seqlens, loss_mask, roles, n_roles)
    if triton is None:
        raise ValueError("reinforce_pp_advantages needs triton; use reinforce_pp_advantages_ref")
    T, S = loss_mask.shape[0], rewards.shape[0]
    dev = loss_mask.device
    returns = torch.zeros(T, dtype=torch.float32, device=dev)
    stats = torch.zeros(n_roles, 3, dtype=torch.float64, device=dev)  # count, sum, sum of squares per role
    if S == 0:
        return returns.clone(), returns
    mask_u8 = loss_mask.contiguous().view(torch.uint8)
    cu = cu_seqlens.contiguous()
    _reinforce_returns_kernel[(S,)](logp.contiguous(), ref_logp.contiguous(), rewards.contiguous(), cu, mask_u8,
                                    roles.contiguous(), returns, stats, float(kl_coef), BLOCK_T=BLOCK_T)
    if not whiten:
        return returns.clone(), returns
    adv = torch.zeros_like(returns)
    _whiten_kernel[(S,)](returns, cu, mask_u8, roles.contiguous(), stats, adv, float(eps), BLOCK_T=BLOCK_T)
    return adv, returns


def group_advantages(rewards, group_ids, cu_seqlens, loss_mask, kind: str, scale_std: bool = True,
                     eps: float = 1e-6):
    """Triton GRPO/RLOO group-baseline advantages (module docstring).

    rewards [S] float, group_ids [S] int64 in [0, S), cu_seqlens [S+1], loss_mask [T] bool -> advantages [T] fp32.
    """
    _check_group(rewards, group_ids, cu_seqlens, loss_mask, kind)
    if triton is None:
        raise ValueError("group_advantages needs triton; use group_advantages_ref")
    S, T = rewards.shape[0], loss_mask.shape[0]
    adv = torch.zeros(T, dtype=torch.float32, device=loss_mask.device)
    if S == 0:
        return adv
    stats = torch.zeros(S, 3, dtype=torch.float64, device=adv.device)  # count, sum, sum of squares per group id
    BLOCK_S = 128
    _group_stats_kernel[(triton.cdiv(S, BLOCK_S),)](rewards.contiguous(), group_ids.contiguous(), stats, S,
                                                     BLOCK_S=BLOCK_S)
    _group_broadcast_kernel[(S,)](rewards.contiguous(), group_ids.contiguous(), stats, cu_seqlens.contiguous(),
                                  loss_mask.contiguous().view(torch.uint8), adv, float(eps),
                                  IS_RLOO=kind == "rloo", SCALE_STD=bool(scale_std), BLOCK_T=BLOCK_T)
    return adv


def select_advantages_impl(device: torch.device):
    """Choose once: (reinforce_pp_advantages, group_advantages) implementations for a device.

    CUDA -> the Triton kernels; CPU -> the torch twins (Triton has no CPU driver outside the interpreter).
    """
    device = torch.device(device)
    if device.type == "cuda":
        if triton is None:
            raise ValueError("CUDA device but triton is not installed")
        return reinforce_pp_advantages, group_advantages
    return reinforce_pp_advantages_ref, group_advantages_ref
