"""Packed training forward == padded forward; log-probs at the right positions; optimizer and schedule."""

import math

import pytest
import torch

from fast_srt.learner.batch import Sample, pack, pad
from helpers import VOCAB, tiny_model
from fast_srt.kernels import logprobs_naive
from fast_srt.learner.policy import (VARLEN_SDPA, build_optimizer, build_scheduler, packed_hidden_states,
                                     prepare_for_training, token_logprobs)

def ragged_samples(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 9), (17, 3), (2, 30), (11, 1), (8, 20)]  # (prompt, response) lengths
    return [Sample(prompt_ids=torch.randint(1, VOCAB, (p,), generator=g).tolist(),
                   response_ids=torch.randint(1, VOCAB, (r,), generator=g).tolist(),
                   role="attacker" if i % 2 else "defender", reward=float(i),
                   vllm_logprobs=[-1.0] * r) for i, (p, r) in enumerate(shapes)]


def padded_logprobs(model, samples):
    """Reference: right-padded batch with transformers' own mask, full [S, L, V] logits."""
    pb = pad(samples)
    logits = model(input_ids=pb.input_ids, attention_mask=pb.attention_mask,
                   position_ids=pb.position_ids).logits.float()  # [S, L, V]
    logp = torch.log_softmax(logits, -1).gather(2, pb.targets[..., None]).squeeze(2)  # [S, L]
    return logp[pb.loss_mask]  # [N], sample-major order == packed loss_index order


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [True, False])
def test_packed_matches_padded(arch, tie):
    model = tiny_model(arch, tie)
    model.eval()
    samples = ragged_samples()
    batch = pack(samples)
    logp, entropy = token_logprobs(model, batch, logprobs_naive)
    ref = padded_logprobs(model, samples)
    got = logp[batch.loss_index]
    assert got.shape == ref.shape == (sum(len(s.response_ids) for s in samples),)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)  # fp32: stated tolerance 1e-5 absolute
    assert (logp[~batch.loss_mask] == 0).all() and (entropy[~batch.loss_mask] == 0).all()
    assert (entropy[batch.loss_mask] > 0).all() and (entropy[batch.loss_mask] <= math.log(VOCAB) + 1e-4).all()


def test_packing_isolates_samples():
    """Changing one sample's tokens must not change another sample's log-probs (no cross-sample attention)."""
    model = tiny_model("llama", tie=True)
    samples = ragged_samples()
    base = token_logprobs(model, pack(samples), logprobs_naive)[0]
    samples[0].prompt_ids = [7] * len(samples[0].prompt_ids)
    batch = pack(samples)
    changed = token_logprobs(model, batch, logprobs_naive)[0]
    first = slice(*batch.response_spans[0])
    rest = slice(batch.response_spans[1][0], None)
    assert not torch.allclose(base[first], changed[first])
    torch.testing.assert_close(base[rest], changed[rest], atol=1e-6, rtol=0)


def test_logprob_is_of_next_token():
    """logp at a loss position is the log-prob of the next input token, from the full-vocab model output."""
    model = tiny_model("qwen2", tie=False)
    model.eval()
    s = ragged_samples()[0]
    batch = pack([s])
    logp, _ = token_logprobs(model, batch, logprobs_naive)
    x = torch.tensor(s.prompt_ids + s.response_ids)
    full = torch.log_softmax(model(input_ids=x[None]).logits[0].float(), -1)  # [L, V]
    P = len(s.prompt_ids)
    expected = full[P - 1:-1].gather(1, x[P:, None]).squeeze(1)  # predicting each response token
    torch.testing.assert_close(logp[P - 1:-1], expected, atol=1e-5, rtol=0)


def test_temperature_and_bf16():
    model = tiny_model("llama", tie=True, dtype=torch.bfloat16)
    batch = pack(ragged_samples())
    logp1, _ = token_logprobs(model, batch, logprobs_naive, temperature=1.0)
    logp2, _ = token_logprobs(model, batch, logprobs_naive, temperature=2.0)
    assert logp1.dtype == torch.float32 and torch.isfinite(logp1).all()
    assert not torch.allclose(logp1[batch.loss_index], logp2[batch.loss_index])


def test_gradients_flow_and_checkpointing_matches():
    losses, grads = [], []
    for ckpt in (False, True):
        model = tiny_model("llama", tie=True)
        prepare_for_training(model, gradient_checkpointing=ckpt)
        batch = pack(ragged_samples())
        logp, _ = token_logprobs(model, batch, logprobs_naive)
        loss = -logp.sum() / batch.num_loss_tokens
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.get_input_embeddings().weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    assert grads[0].abs().sum() > 0


def test_hidden_states_shape_and_attention_name():
    model = tiny_model("llama", tie=False)
    assert model.config._attn_implementation == VARLEN_SDPA
    batch = pack(ragged_samples())
    assert packed_hidden_states(model, batch).shape == (batch.num_tokens, 64)


def test_optimizer_groups_and_schedule():
    model = tiny_model("qwen2", tie=False)
    opt = build_optimizer(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    n = sum(len(g["params"]) for g in opt.param_groups)
    assert n == len(list(model.parameters()))
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(5e-4) and lrs[2] == pytest.approx(1e-3)
    assert lrs[6] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lrs[10] == pytest.approx(1e-4) and lrs[11] == pytest.approx(1e-4)


@pytest.mark.parametrize("tie", [True, False])
def test_project_kernel_matches_full_logits(tie):
    """token_logprobs with the project's selected log-prob implementation == the full-logits reference."""
    from fast_srt.kernels import select_logprobs_impl

    results = []
    for fn in (logprobs_naive, select_logprobs_impl(torch.device("cpu"))):
        model = tiny_model("qwen2", tie)
        batch = pack(ragged_samples())
        logp, entropy = token_logprobs(model, batch, fn, temperature=0.7)
        (logp.sum() + 0.1 * entropy.sum()).backward()
        results.append((logp.detach(), entropy.detach(), model.get_output_embeddings().weight.grad.clone(),
                        model.get_input_embeddings().weight.grad.clone()))
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_fused_adamw_matches_the_reference_step():
    """build_optimizer's fused AdamW (CPU too) takes the same step as the for-loop AdamW, fp32, within 1e-6."""
    torch.manual_seed(0)
    models = [tiny_model("llama", tie=True) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build_optimizer(models[0], 1e-2, weight_decay=0.1),
            torch.optim.AdamW([{"params": [p for p in models[1].parameters() if p.dim() >= 2], "weight_decay": 0.1},
                               {"params": [p for p in models[1].parameters() if p.dim() < 2], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)]
    assert opts[0].defaults["fused"]
    for step in range(3):
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 1000 + i))
                 for i, p in enumerate(models[0].parameters())]
        for m, o in zip(models, opts):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
            o.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_cpu_attention_runs_in_fp32_and_keeps_the_output_dtype(monkeypatch, shared, autocast):
    """On CPU the packed attention computes SDPA on fp32 q/k/v (its bf16 backward is 2-3x slower:
    bench/ab/attention_precision.py) and hands the next projection the dtype it had before: bf16 under bf16 autocast
    and in a bf16 model; the forward and the gradients of a bf16-autocast run stay within bf16 error of fp32."""
    import fast_srt.learner.attention as attention
    from fast_srt.learner.batch import pack_shared

    seen, real = [], attention.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(attention, "scaled_dot_product_attention", spy)
    samples = ragged_samples(3)
    if shared:  # two samples with a common 12-token prompt, so the row has a shared piece
        samples[1].prompt_ids = samples[0].prompt_ids[:5] + list(range(1, 13))
        samples[0].prompt_ids = samples[1].prompt_ids[:]
    batch = (pack_shared if shared else pack)(samples)
    assert (batch.layout is not None) == shared
    ref_model = tiny_model("qwen2", tie=False)
    ref, _ = token_logprobs(ref_model, batch, logprobs_naive)
    ref[batch.loss_index].sum().backward()
    ref_grads = [p.grad.clone() for p in ref_model.parameters()]
    model = tiny_model("qwen2", tie=False, dtype=torch.float32 if autocast else torch.bfloat16)
    outs = []
    model.model.layers[0].self_attn.register_forward_hook(lambda m, i, o: outs.append(o[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logp, _ = token_logprobs(model, batch, logprobs_naive)
    assert seen and all(s == (torch.float32, torch.float32, torch.float32, False) for s in seen)
    assert outs == [torch.bfloat16]
    err = (logp - ref)[batch.loss_index].abs().max().item()
    assert err < 0.1, err  # bf16 weights and activations; the logits stay O(1) in this model
    if autocast:
        logp[batch.loss_index].sum().backward()
        for p, g in zip(model.parameters(), ref_grads):
            assert torch.allclose(p.grad, g, rtol=0.1, atol=0.05 * g.abs().max().item() + 1e-6)


def test_packed_attention_on_cuda_excludes_cudnn_sdpa():
    """cuDNN's SDPA builds an execution graph for every new shape, about 1 ms of host time per packed piece on an
    H200 (profile cited in attention.sdpa_context). Around the packed calls on CUDA only flash, memory-efficient and
    math SDPA are allowed; the global setting is restored afterwards."""
    from types import SimpleNamespace

    import fast_srt.learner.attention as attention

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with attention.sdpa_context(SimpleNamespace(device=torch.device("cuda"))):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_pick_fused_ops_is_triton_on_cuda_and_torch_on_cpu():
    from fast_srt.kernels import fused_ops
    from fast_srt.learner.policy import FUSED_TORCH, FUSED_TRITON, pick_fused_ops

    assert pick_fused_ops("cpu") == FUSED_TORCH
    assert pick_fused_ops("cuda") == (FUSED_TRITON if fused_ops.triton is not None else FUSED_TORCH)
    assert pick_fused_ops("cpu", FUSED_TRITON) == FUSED_TRITON
    with pytest.raises(ValueError, match="fused ops"):
        pick_fused_ops("cpu", "liger")


@pytest.fixture
def fused_rope_on_cpu():
    from fast_srt.learner import policy

    yield
    policy._FUSED_ROPE_DEVICES.discard("cpu")


@pytest.mark.parametrize("arch,tie", [("llama", True), ("qwen2", False)])
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_small_ops_match_the_torch_path(fused_rope_on_cpu, arch, tie, autocast):
    """The fused RMSNorm, SwiGLU and RoPE (their CPU twins here; the Triton kernels against the same twins and a
    float64 reference in tests/kernels/test_fused_ops.py) in place of transformers' ops: every module swapped,
    log-probs within 1e-5 and every gradient within 1e-5 + 1e-4 relative in fp32; under bf16 autocast within
    bf16 rounding (0.02 nats, gradients 2% of their largest entry)."""
    from fast_srt.learner.op_count import count_ops
    from fast_srt.learner.policy import FUSED_TRITON, apply_fused_ops

    batch = pack(ragged_samples(4))
    w = torch.randn(batch.num_tokens, generator=torch.Generator().manual_seed(3))
    runs = []
    for fused in (False, True):
        model = tiny_model(arch, tie)
        if fused:
            layers = model.config.num_hidden_layers
            assert apply_fused_ops(model, FUSED_TRITON) == {"rms_norm": 2 * layers + 1, "swiglu": layers,
                                                             "rope": layers}
        with count_ops() as ops:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logp, ent = token_logprobs(model, batch, logprobs_naive)
            ((logp * w).sum() + 0.1 * (ent * w).sum()).backward()
        n = model.config.num_hidden_layers if fused else 0
        assert [ops.counts[f"fast_srt.{k}"] for k in ("rms_norm_fwd", "rms_norm_bwd", "silu_mul_fwd",
                                                       "silu_mul_bwd", "rope_fwd", "rope_bwd")] == \
            [2 * n + fused, 2 * n + fused, n, n, n, n]
        runs.append((logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lp0, g0), (lp1, g1) = runs
    torch.testing.assert_close(lp1, lp0, atol=0.02 if autocast else 1e-5, rtol=0)
    for name in g0:
        assert g0[name].abs().max() > 0, name
        scale = g0[name].abs().max().item()
        tol = dict(atol=0.02 * scale, rtol=0.02) if autocast else dict(atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(g1[name], g0[name], msg=name, **tol)
