"""CUDA only (skipped without it, `-m gpu` selects them): the GPU path decides its device in one place.

The advantage kernels chosen for CUDA (Triton) get CUDA tensors from compute_advantages, and give what the CPU twin
gives; the log-prob kernel chosen for CUDA agrees with the twin through token_logprobs.
"""

import pytest
import torch

from fast_srt.config import AlgoConfig, TrainConfig
from fast_srt.kernels import select_advantages_impl, select_logprobs_impl
from fast_srt.learner.batch import Sample
from fast_srt.learner.step import compute_advantages

pytestmark = pytest.mark.gpu


def _samples(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, r = int(torch.randint(3, 40, (1,), generator=g)), int(torch.randint(1, 30, (1,), generator=g))
        ids = torch.randint(3, 300, (p + r,), generator=g).tolist()
        out.append(Sample(ids[:p], ids[p:], "attacker" if i % 2 else "defender", reward=float(i % 3) - 1.0,
                          vllm_logprobs=[-1.0] * r, metadata={"group": [0, 0, 3, 3, 7, 7, 9, 9][i]}))
    return out


@pytest.mark.parametrize("estimator", ["reinforce_pp", "grpo", "rloo"])
def test_advantages_on_cuda_match_the_cpu_twin(estimator):
    plays = 1 if estimator == "reinforce_pp" else 2
    cfg = TrainConfig(algo=AlgoConfig(estimator=estimator, samples_per_prompt=plays))
    samples = _samples()
    g = torch.Generator().manual_seed(1)
    old = [torch.randn(len(s.response_ids), generator=g) for s in samples]
    ref = [o - 0.1 for o in old]
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    got, _ = compute_advantages(cfg, samples, old, ref, select_advantages_impl(cuda), cuda)
    want, _ = compute_advantages(cfg, samples, old, ref, select_advantages_impl(cpu), cpu)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_logprob_kernel_chosen_for_cuda_matches_the_twin():
    from fast_srt.kernels import logprobs_chunked

    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(77, 64, generator=g).cuda()
    weight = torch.randn(1001, 64, generator=g).cuda()
    targets = torch.randint(0, 1001, (77,), generator=g).cuda()
    lp, ent = select_logprobs_impl(torch.device("cuda"))(hidden, weight, targets, 0.7)
    lp_ref, ent_ref = logprobs_chunked(hidden, weight, targets, 0.7)
    torch.testing.assert_close(lp, lp_ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(ent, ent_ref, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_prefix_on_cuda_matches_whole_samples(dtype):
    """The shared-prefix attention on CUDA (flash-attn's varlen kernel when installed, else SDPA per piece) gives
    the log-probs and gradients of whole-sample packing: fp32 1e-4 (flash-attn computes in bf16/fp16 only, so
    fp32 goes through SDPA), bf16 0.05 nats and 5% of each gradient's norm."""
    from fast_srt.kernels import logprobs_chunked
    from fast_srt.learner.batch import pack, pack_shared
    from fast_srt.learner.policy import VARLEN_SDPA, load_policy, token_logprobs
    from fast_srt.run.tiny import make_tiny_model
    import tempfile
    from pathlib import Path

    d = make_tiny_model(Path(tempfile.mkdtemp()) / "llama", arch="llama")
    g = torch.Generator().manual_seed(0)
    base = torch.randint(3, 300, (40,), generator=g).tolist()
    samples = [Sample(base + torch.randint(3, 300, (int(3 + i),), generator=g).tolist(),
                      torch.randint(3, 300, (int(5 + 2 * i),), generator=g).tolist(), "attacker",
                      vllm_logprobs=[-1.0] * (5 + 2 * i)) for i in range(6)]
    out = []
    for packer in (pack, pack_shared):
        model = load_policy(str(d), dtype=dtype, device="cuda", attn=VARLEN_SDPA)
        b = packer(samples, device="cuda")
        logp, _ = token_logprobs(model, b, logprobs_chunked)
        logp.sum().backward()
        out.append((b.split_responses(logp.detach().float().cpu()),
                    {n: p.grad.float().cpu() for n, p in model.named_parameters()}))
    (lp0, g0), (lp1, g1) = out
    tol = 1e-4 if dtype == torch.float32 else 0.05
    for a, b in zip(lp0, lp1):
        torch.testing.assert_close(b, a, atol=tol, rtol=0)
    for n in g0:
        err = (g1[n] - g0[n]).norm() / g0[n].norm().clamp_min(1e-12)
        assert err < (1e-4 if dtype == torch.float32 else 0.05), (n, float(err))
