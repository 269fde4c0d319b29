"""PPO-clip, TIS and SFT losses against tiny examples computed by hand from the formulas in fast_srt/loss.py."""

import math

import pytest
import torch

from fast_srt.learner.loss import is_finite_loss, ppo_clip_loss, sft_loss

# Four loss tokens plus one masked-out token with wild values. Ratios r = exp(logp - old_logp) = 1.5, 0.5, 1.1, 0.7.
R = [1.5, 0.5, 1.1, 0.7]
A = [1.0, -1.0, 2.0, 1.0]
OLD = [-1.0, -2.0, -0.5, -3.0]
#   t0: r=1.5, A=+1: min(1.5, 1.2) = 1.2 -> pg = -1.2   clipped (upper side), no gradient
#   t1: r=0.5, A=-1: min(-0.5, -0.8) = -0.8 -> pg = 0.8  clipped (lower side), no gradient
#   t2: r=1.1, A=+2: min(2.2, 2.2) = 2.2 -> pg = -2.2    inside the range, gradient -A r / N = -2.2 / 4
#   t3: r=0.7, A=+1: min(0.7, 0.8) = 0.7 -> pg = -0.7    below range but unclipped term is the min: gradient -0.7 / 4
PG = [-1.2, 0.8, -2.2, -0.7]


def inputs():
    old = torch.tensor(OLD + [0.0])
    logp = (old + torch.log(torch.tensor(R + [1.0]))).clone()
    logp[4] = 30.0  # masked: must not matter
    logp.requires_grad_(True)
    adv = torch.tensor(A + [1e6])
    mask = torch.tensor([True, True, True, True, False])
    return logp, old, adv, mask


def test_ppo_clip_both_sides_by_hand():
    logp, old, adv, mask = inputs()
    loss, m = ppo_clip_loss(logp, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(sum(PG) / 4, abs=1e-6)  # -3.3 / 4 = -0.825
    assert m["loss/pg"].item() == pytest.approx(-0.825, abs=1e-6)
    assert m["loss/clip_frac"].item() == pytest.approx(0.5)
    k3 = [(r - 1) - math.log(r) for r in R]  # 0.094535, 0.193147, 0.004690, 0.056675
    assert m["loss/approx_kl"].item() == pytest.approx(sum(k3) / 4, abs=1e-6)
    assert m["loss/tokens"].item() == 4
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 0.0, -2.2 / 4, -0.7 / 4, 0.0]))
    assert not any(k.startswith("is/") for k in m)
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in m.values())


def test_tis_truncation_by_hand():
    logp, old, adv, mask = inputs()
    is_ratio = [1.0, 3.0, 0.5, 2.5]  # exp(old_logp - vllm_logp); cap 2 truncates t1 and t3
    vllm = old - torch.log(torch.tensor(is_ratio + [1.0]))
    vllm[4] = -50.0  # masked
    loss, m = ppo_clip_loss(logp, old, adv, mask, clip_eps=0.2, vllm_logp=vllm, tis_cap=2.0)
    w = [1.0, 2.0, 0.5, 2.0]
    # (-1.2*1 + 0.8*2 - 2.2*0.5 - 0.7*2) / 4 = -2.1 / 4
    assert loss.item() == pytest.approx(-2.1 / 4, abs=1e-6)
    assert sum(p * x for p, x in zip(PG, w)) / 4 == pytest.approx(-0.525)
    assert m["is/ratio_mean"].item() == pytest.approx(1.75, abs=1e-6)
    assert m["is/ratio_max"].item() == pytest.approx(3.0, abs=1e-5)
    assert m["is/ratio_min"].item() == pytest.approx(0.5, abs=1e-6)
    assert m["is/trunc_frac"].item() == pytest.approx(0.5)
    mism = [0.0, math.log(3.0), math.log(2.0), math.log(2.5)]
    assert m["is/logp_mismatch_mean_abs"].item() == pytest.approx(sum(mism) / 4, abs=1e-6)
    assert m["is/logp_mismatch_max_abs"].item() == pytest.approx(math.log(3.0), abs=1e-6)
    loss.backward()  # the IS weight is a constant: gradients scale by w
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 0.0, -2.2 / 4 * 0.5, -0.7 / 4 * 2.0, 0.0]))


def test_on_policy_ratio_one_is_plain_policy_gradient():
    logp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    mask = torch.tensor([True, True, True])
    entropy = torch.tensor([1.0, 2.0, 3.0])
    loss, m = ppo_clip_loss(logp, logp.detach(), adv, mask, vllm_logp=logp.detach(), entropy=entropy)
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 0.5) / 3)
    assert m["loss/clip_frac"].item() == 0 and m["loss/approx_kl"].item() == 0
    assert m["is/ratio_mean"].item() == 1 and m["is/trunc_frac"].item() == 0
    assert m["policy/entropy"].item() == pytest.approx(2.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / 3)


def test_num_tokens_override_and_empty_mask():
    logp, old, adv, mask = inputs()
    loss, _ = ppo_clip_loss(logp, old, adv, mask, num_tokens=8)
    assert loss.item() == pytest.approx(sum(PG) / 8, abs=1e-6)
    loss, m = ppo_clip_loss(logp, old, adv, torch.zeros(5, dtype=torch.bool))
    assert loss.item() == 0.0 and m["loss/tokens"].item() == 0


def test_sft_loss_by_hand():
    logp = torch.tensor([-1.0, -2.0, -3.0, -100.0], requires_grad=True)
    mask = torch.tensor([True, True, True, False])
    loss, m = sft_loss(logp, mask)
    assert loss.item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert m["loss/sft"].item() == pytest.approx(2.0) and m["sft/tokens"].item() == 3
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-1 / 3, -1 / 3, -1 / 3, 0.0]))


def test_mask_must_be_bool_and_finite_check():
    logp, old, adv, mask = inputs()
    with pytest.raises(ValueError, match="bool"):
        ppo_clip_loss(logp, old, adv, mask.float())
    with pytest.raises(ValueError, match="bool"):
        sft_loss(logp, mask.long())
    assert bool(is_finite_loss(torch.tensor(1.0)))
    assert not bool(is_finite_loss(torch.tensor(float("nan"))))
    assert not bool(is_finite_loss(torch.tensor(float("inf"))))
    logp = torch.tensor([0.0, float("nan")])
    loss, _ = sft_loss(logp, torch.tensor([True, True]))
    assert not bool(is_finite_loss(loss))
