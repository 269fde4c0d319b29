"""Shared-prefix packing: the layout reproduces every sample, and loss and gradients equal whole-sample packing."""

import random

import pytest
import torch

from fast_srt.kernels import logprobs_naive
from fast_srt.learner.batch import (Sample, pack, pack_shared, prefix_tree, split_micro_batches,
                                    split_shared_micro_batches)
from fast_srt.learner.policy import token_logprobs
from helpers import VOCAB, tiny_model


def tree_samples(seed: int, n: int = 11) -> list[Sample]:
    """Prompts drawn from a small prefix tree (a root run, two branches of it, a few unshared prompts), ragged
    responses, random tokens; some GRPO-like duplicates of one whole prompt."""
    rng = random.Random(seed)
    tok = lambda k: [rng.randrange(1, VOCAB) for _ in range(k)]  # noqa: E731
    root = tok(rng.randrange(20, 40))
    branches = [root + tok(rng.randrange(16, 30)), root + tok(rng.randrange(3, 10)), tok(rng.randrange(18, 25))]
    repeated = branches[0] + tok(7)
    out = []
    for i in range(n):
        kind = i % 4
        prompt = (repeated if kind == 3 else rng.choice(branches) + tok(rng.randrange(1, 12)))
        if i == n - 1:
            prompt = tok(rng.randrange(2, 30))  # shares nothing
        r = rng.randrange(1, 25)
        out.append(Sample(prompt_ids=list(prompt), response_ids=tok(r), role="attacker" if i % 2 else "defender",
                          reward=rng.uniform(-1, 1), vllm_logprobs=[rng.uniform(-5, 0) for _ in range(r)]))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_layout_rebuilds_every_sample(seed):
    samples = tree_samples(seed)
    b = pack_shared(samples)
    plain = pack(samples)
    assert b.layout is not None and b.layout.shares
    assert b.num_tokens < plain.num_tokens  # something was shared
    L = b.layout
    ks = torch.split(L.ctx_index, list(L.key_lengths))
    leaf_of = {int(b.sample_idx[st]): i for i, st in enumerate(L.starts) if b.sample_idx[st] >= 0}
    assert sorted(leaf_of) == list(range(len(samples)))
    for si, s in enumerate(samples):
        piece = leaf_of[si]
        keys = ks[piece]
        # the leaf's keys (ancestors, then itself) are exactly the sample's tokens at positions 0..L-1
        assert b.input_ids[keys].tolist() == s.prompt_ids + s.response_ids
        assert b.position_ids[keys].tolist() == list(range(s.num_tokens))
        lo, hi = b.response_spans[si]
        assert b.targets[lo:hi].tolist() == s.response_ids
        assert b.loss_mask[lo:hi].all()
        torch.testing.assert_close(b.vllm_logp[lo:hi], torch.tensor(s.vllm_logprobs))
    assert int(b.loss_mask.sum()) == sum(len(s.response_ids) for s in samples) == b.num_loss_tokens
    # scatter/split round-trip in sample order
    vals = [torch.randn(len(s.response_ids)) for s in samples]
    for v, w in zip(vals, b.split_responses(b.scatter_responses(vals))):
        torch.testing.assert_close(v, w)


def test_short_common_runs_are_not_shared():
    a = Sample([1, 2, 3, 4, 5, 6], [7], "attacker")
    b = Sample([1, 2, 3, 4, 9, 9], [7], "attacker")
    assert len(prefix_tree([a, b], min_shared=16)) == 2  # two leaves, no shared piece
    assert pack_shared([a, b]).layout is None  # plain packing when nothing is shared
    pieces = prefix_tree([a, b], min_shared=3)
    assert pieces[0] == (0, 0, 4, -1) and len(pieces) == 3  # [1 2 3 4] once, then two leaves


@pytest.mark.parametrize("seed", [0, 5])
@pytest.mark.parametrize("arch,tie", [("llama", True), ("qwen2", False)])
def test_shared_prefix_loss_and_gradients_equal_whole_samples(seed, arch, tie):
    """fp32, stated tolerance: log-probs and entropies 1e-5 absolute per token; the loss (a signed weighted sum)
    1e-5 x sum|weights| absolute; every parameter's gradient within 1e-5 absolute + 1e-4 relative of whole-sample
    packing (only the summation order differs)."""
    samples = tree_samples(seed)
    g = torch.Generator().manual_seed(seed + 100)
    weights = [torch.randn(len(s.response_ids), generator=g) for s in samples]  # a loss that weighs every token

    def run(batch):
        model = tiny_model(arch, tie)
        logp, ent = token_logprobs(model, batch, logprobs_naive)
        w = batch.scatter_responses(weights)
        loss = (logp * w).sum() + 0.1 * (ent * w).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return batch.split_responses(logp.detach()), batch.split_responses(ent.detach()), loss.detach(), grads

    lp0, en0, loss0, g0 = run(pack(samples))
    lp1, en1, loss1, g1 = run(pack_shared(samples))
    for a, b in zip(lp0 + en0, lp1 + en1):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    scale = float(sum(w.abs().sum() for w in weights)) * 1.1
    torch.testing.assert_close(loss1, loss0, atol=1e-5 * scale, rtol=0)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert g0[name].abs().max() > 0, name  # the loss reaches every parameter
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)


def test_shared_micro_batches_hold_every_sample_within_budget():
    samples = tree_samples(7, n=40)
    budget = 300
    mbs = split_shared_micro_batches(samples, budget)
    assert sorted(id(s) for mb in mbs for s in mb) == sorted(id(s) for s in samples)
    for mb in mbs:
        assert len(mb) == 1 or pack_shared(mb).num_tokens <= budget
    # fewer row tokens than whole-sample packing of the same budget
    shared_rows = sum(pack_shared(mb).num_tokens for mb in mbs)
    plain_rows = sum(pack(mb).num_tokens for mb in split_micro_batches(samples, budget))
    assert shared_rows < plain_rows


def test_shared_prefix_under_bf16_autocast_matches_whole_samples():
    """The trainer's bf16 path (fp32 weights, autocast): log-probs within 0.05 nats of whole-sample packing (bf16
    rounds differently when the prefix is computed once; an attention or position error gives whole nats)."""
    samples = tree_samples(2)
    model = tiny_model("llama", tie=True).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain, shared = pack(samples), pack_shared(samples)
        a = plain.split_responses(token_logprobs(model, plain, logprobs_naive)[0])
        b = shared.split_responses(token_logprobs(model, shared, logprobs_naive)[0])
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, atol=0.05, rtol=0)


def logprobs_and_grads(batch, weights, arch="llama", tie=True):
    model = tiny_model(arch, tie)
    logp, ent = token_logprobs(model, batch, logprobs_naive)
    w = batch.scatter_responses(weights)
    ((logp * w).sum() + 0.1 * (ent * w).sum()).backward()
    return logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kernel", ["varlen", "masked"])
@pytest.mark.parametrize("seed,arch,tie", [(0, "llama", True), (3, "qwen2", False)])
@pytest.mark.parametrize("shared", [True, False])
def test_one_call_attention_equals_per_piece_fp32(monkeypatch, kernel, seed, arch, tie, shared):
    """The CUDA path (one attention call per layer; on CPU its twin computes what the CUDA call computes) against
    the per-piece path, fp32, on a ragged tree with a piece that has no ancestors: log-probs and entropies within
    1e-5, every parameter's gradient within 1e-5 absolute + 1e-4 relative."""
    from fast_srt.learner import attention

    samples = tree_samples(seed)
    batch = (pack_shared if shared else pack)(samples)
    assert (batch.layout is not None) == shared
    if shared:
        assert 0 in batch.layout.context and batch.layout.shares
    g = torch.Generator().manual_seed(seed + 7)
    weights = [torch.randn(len(s.response_ids), generator=g) for s in samples]
    lp0, en0, g0 = logprobs_and_grads(batch, weights, arch, tie)
    monkeypatch.setattr(attention, "FORCED_KERNEL", kernel)
    lp1, en1, g1 = logprobs_and_grads(batch, weights, arch, tie)
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=0)
    torch.testing.assert_close(en1, en0, atol=1e-5, rtol=0)
    for name in g0:
        assert g0[name].abs().max() > 0, name
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)


def test_one_call_attention_under_bf16_autocast_matches_per_piece(monkeypatch):
    """bf16 autocast, forced one-call path against the per-piece path: log-probs within 0.02 nats and gradients
    within bf16 error (the attention itself runs in fp32 on CPU in both; a layout error gives whole nats)."""
    from fast_srt.learner import attention

    samples = tree_samples(4)
    batch = pack_shared(samples)
    weights = [torch.randn(len(s.response_ids), generator=torch.Generator().manual_seed(1)) for s in samples]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp0, _, g0 = logprobs_and_grads(batch, weights)
        monkeypatch.setattr(attention, "FORCED_KERNEL", "varlen")
        lp1, _, g1 = logprobs_and_grads(batch, weights)
    torch.testing.assert_close(lp1, lp0, atol=0.02, rtol=0)
    for name in g0:
        scale = g0[name].abs().max().item()
        torch.testing.assert_close(g1[name], g0[name], atol=0.02 * scale + 1e-6, rtol=0.02, msg=name)


@pytest.mark.parametrize("shared", [True, False])
def test_cuda_path_makes_one_attention_call_per_layer(monkeypatch, shared):
    """Forced onto the varlen kernel (CUDA's), the forward calls it once per decoder layer whatever the number of
    pieces, and the backward calls no attention kernel again (autograd replays the recorded call)."""
    from fast_srt.learner import attention

    calls = []
    real = attention.torch_varlen

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "FORCED_KERNEL", "varlen")
    monkeypatch.setattr(attention, "torch_varlen", counting)
    model = tiny_model("llama", True)
    for n in (5, 11, 23):
        batch = (pack_shared if shared else pack)(tree_samples(n, n=n))
        calls.clear()
        logp, _ = token_logprobs(model, batch, logprobs_naive)
        assert calls == [batch.num_tokens] * model.config.num_hidden_layers
        logp.sum().backward()
        assert len(calls) == model.config.num_hidden_layers
