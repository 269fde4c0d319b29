"""Less work per step, same results: no separate old forward for the first mini-batch, and shared-prefix packing
in the real learner step (the layout and its gradients are tested in tests/learner/test_prefix_sharing.py)."""

import contextlib
import dataclasses
import random

import pytest
import torch
from helpers import learner_run, random_samples, rollout

from fast_srt.config import AlgoConfig, OptimConfig, TrainConfig
from fast_srt.kernels import select_advantages_impl
from fast_srt.learner.batch import Sample
from fast_srt.learner.policy import load_reference
from fast_srt.learner.step import learner_step, mini_batches, needs_old, update_policy


def test_needs_old():
    n = 10
    rpp = TrainConfig(algo=AlgoConfig(estimator="reinforce_pp", kl_coef=0.01), optim=OptimConfig(updates_per_step=1))
    assert needs_old(rpp, mini_batches(rpp, 3, n), n) == [True] * n  # the KL in the reward needs old - ref
    rpp0 = dataclasses.replace(rpp, algo=AlgoConfig(estimator="reinforce_pp", kl_coef=0.0))
    assert needs_old(rpp0, mini_batches(rpp0, 3, n), n) == [False] * n
    grpo = TrainConfig(algo=AlgoConfig(estimator="grpo", samples_per_prompt=2, kl_coef=0.01),
                       optim=OptimConfig(updates_per_step=3))
    minis = mini_batches(grpo, 3, n)
    need = needs_old(grpo, minis, n)
    assert sorted(i for i in range(n) if not need[i]) == sorted(minis[0])  # only the first mini-batch skips
    assert sorted(i for m in minis for i in m) == list(range(n)) and len(minis) == 3


def _sgd(run):
    run.optimizer = torch.optim.SGD(run.model.parameters(), lr=1.0)  # the update is the (clipped) gradient
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: 1.0)
    return run


@pytest.mark.parametrize("ups", [1, 2])
def test_first_mini_batch_without_old_forward_updates_the_same(tiny_model_dir, ups):
    """fp32, SGD lr 1: the weights after update_policy with the old log-probs of the first mini-batch computed in
    a separate forward, and without (its own detached log-probs), agree within 1e-6; so do the logged losses."""
    results = []
    for skip in (False, True):
        run = _sgd(learner_run(tiny_model_dir, estimator="grpo", kl=0.5, ups=ups))
        samples = random_samples(run.model.config.vocab_size, n=6, seed=11)
        old, advs = rollout(run, samples)
        ref = [o - 0.2 * torch.rand(len(o), generator=torch.Generator().manual_seed(1)) for o in old]
        minis = mini_batches(run.cfg, 1, len(samples))
        if skip:
            old = [None if i in minis[0] else o for i, o in enumerate(old)]
        out = update_policy(run, 1, samples, old, ref, advs, minis)
        results.append(([p.detach().clone() for p in run.model.parameters()], out))
    (w0, out0), (w1, out1) = results
    assert out1["optim/updates"] == ups
    for a, b in zip(w0, w1):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    for k in ("loss/pg", "loss/kl_k3"):
        assert float(out1[k]) == pytest.approx(float(out0[k]), rel=1e-5, abs=1e-7), k
    assert out1["kl/_n_train"] == sum(len(samples[i].response_ids) for i in minis[0])
    assert out0["kl/_n_train"] == 0


def _shared_samples(vocab: int, n: int = 8) -> list[Sample]:
    rng = random.Random(3)
    instruction = {r: [rng.randrange(3, vocab) for _ in range(40)] for r in ("attacker", "defender")}
    out = []
    for i in range(n):
        role = "attacker" if i % 2 else "defender"
        p = instruction[role] + [rng.randrange(3, vocab) for _ in range(rng.randrange(2, 15))]
        r = [rng.randrange(3, vocab) for _ in range(rng.randrange(2, 20))]
        out.append(Sample(p, r, role, reward=rng.uniform(-1, 1), vllm_logprobs=[0.0] * len(r),
                          metadata={"group": i}))
    return out


@pytest.mark.parametrize("estimator,kl", [("reinforce_pp", 0.1), ("grpo", 0.1)])
def test_learner_step_with_shared_prefixes_updates_the_same(tiny_model_dir, estimator, kl):
    """The whole learner step (old and reference forwards, advantages, two updates), fp32, SGD lr 1, with and
    without shared-prefix packing: weights within 1e-5 and the logged metrics within 1e-5 relative."""
    results = []
    for share in (False, True):
        run = _sgd(learner_run(tiny_model_dir, estimator=estimator, kl=kl, ups=2))
        run.cfg = dataclasses.replace(run.cfg, optim=dataclasses.replace(run.cfg.optim, share_prefix=share))
        samples = _shared_samples(run.model.config.vocab_size)
        rollout(run, samples)  # vLLM's log-probs = the trainer's
        run.ref = load_reference(str(tiny_model_dir), torch.float32)
        with torch.no_grad():  # a reference that differs from the policy: a non-zero KL
            for p in run.ref.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        run.adv_fns, run.device = select_advantages_impl(torch.device("cpu")), torch.device("cpu")
        run.cfg = dataclasses.replace(run.cfg, lora_rank=0)
        out = learner_step(run, 1, samples, lambda name: contextlib.nullcontext())
        results.append(([p.detach().clone() for p in run.model.parameters()], out))
    (w0, out0), (w1, out1) = results
    for a, b in zip(w0, w1):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert float(out0["kl/mean"]) != 0
    for k in ("kl/mean", "loss/pg"):
        assert float(out1[k]) == pytest.approx(float(out0[k]), rel=1e-5, abs=1e-7), k
