"""Wiring: one training step (packed forward, fused log-probs, REINFORCE++ advantages, PPO-clip loss, backward)
gives the same loss and gradients whichever log-prob implementation the trainer was built with.

Tolerance: fp32 everywhere; loss within 1e-5 relative and every gradient within 1e-4 normwise relative of the
full-logits reference (the implementations differ only in summation order).
"""

import os
import subprocess
import sys

import torch

# TRITON_INTERPRET must be set before triton is first imported (triton.language's own @jit helpers are decorated
# then). If an earlier test module imported triton without it, this test runs in a fresh process instead.
if "triton" in sys.modules:
    from triton.language import standard as _tl_std
    from triton.runtime.interpreter import InterpretedFunction as _Interp

    _INTERP_SAFE = isinstance(_tl_std.sum, _Interp)
else:
    _INTERP_SAFE = True
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernel runs in the interpreter on CPU tensors

import importlib

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled Triton on CUDA, the interpreter on CPU


from fast_srt.learner.batch import Sample, pack
from fast_srt.learner.loss import ppo_clip_loss
from fast_srt.learner.policy import load_policy, token_logprobs


def _impls():
    import fast_srt.kernels.logprobs as L

    if L.triton is not None and not torch.cuda.is_available():
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(L._row_stats_kernel, InterpretedFunction):
            L = importlib.reload(L)
    impls = {"naive": L.logprobs_naive, "chunked": L.logprobs_chunked}
    if L.triton is not None:
        impls["triton"] = L.fused_logprobs
    from fast_srt.kernels import native

    if native.available() and DEVICE == "cpu":  # the C++ op is CPU-only
        impls["native"] = L.logprobs_native
    return impls


def _samples(vocab, gen):
    lens = [(7, 5), (13, 9), (4, 11), (9, 3)]  # ragged prompt/response lengths
    out = []
    for i, (p, r) in enumerate(lens):
        ids = torch.randint(3, vocab, (p + r,), generator=gen).tolist()
        out.append(Sample(ids[:p], ids[p:], "attacker" if i % 2 else "defender", reward=float(i) - 1.5,
                          vllm_logprobs=(-torch.rand(r, generator=gen) * 3).tolist()))
    return out


def _step(model_dir, samples, fn):
    from fast_srt.kernels import reinforce_pp_advantages_ref

    model = load_policy(str(model_dir), dtype=torch.float32, device=DEVICE)
    batch = pack(samples, device=DEVICE)
    with torch.no_grad():
        old, _ = token_logprobs(model, batch, fn)
    ref = old - 0.01 * torch.arange(old.numel(), device=old.device).float().remainder(3)  # a fixed, non-zero KL
    adv, _ = reinforce_pp_advantages_ref(old, ref, batch.rewards, batch.cu_seqlens, batch.loss_mask, batch.roles,
                                         kl_coef=0.01, n_roles=2)
    logp, ent = token_logprobs(model, batch, fn)
    loss, m = ppo_clip_loss(logp, old + 0.05 * batch.loss_mask.float(), adv, batch.loss_mask,
                            vllm_logp=batch.vllm_logp, entropy=ent)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, m


def test_one_training_step_same_loss_and_grads_for_every_impl(tiny_model_dir):
    if not torch.cuda.is_available() and not _INTERP_SAFE and "FAST_SRT_WIRING_CHILD" not in os.environ:
        env = dict(os.environ, TRITON_INTERPRET="1", FAST_SRT_WIRING_CHILD="1")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-4000:]
        return
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    samples = _samples(vocab, gen)
    impls = _impls()
    assert {"naive", "chunked", "triton"} <= set(impls)
    ref_loss, ref_grads, _ = _step(tiny_model_dir, samples, impls["naive"])
    assert ref_loss.abs() > 0
    for name, fn in impls.items():
        loss, grads, m = _step(tiny_model_dir, samples, fn)
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-7), (name, loss, ref_loss)
        worst = max(((grads[k] - g).norm() / g.norm().clamp(min=1e-12)).item() for k, g in ref_grads.items())
        print(f"{name}: loss {loss.item():.6f} vs {ref_loss.item():.6f}; worst grad rel err {worst:.2e}")
        assert worst < 1e-4, (name, worst)
