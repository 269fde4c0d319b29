"""The launch budget, without a GPU: on the path CUDA takes (one varlen attention call per layer, the fused small
ops; forced here on CPU, where their twins dispatch as CUDA's kernels launch: one op each), the ops a forward and
backward, and a whole learner step, dispatch do not grow with the number of tree pieces at fixed samples and
tokens. The per-piece path (CPU's) grows with them, so the budget is a real constraint."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from fast_srt.config import AlgoConfig, OptimConfig, TrainConfig
from fast_srt.kernels import logprobs_chunked, select_advantages_impl
from fast_srt.learner import attention, policy
from fast_srt.learner.batch import Sample, pack_shared
from fast_srt.learner.op_count import count_ops
from fast_srt.learner.policy import FUSED_TRITON, apply_fused_ops, build_optimizer, build_scheduler, token_logprobs
from fast_srt.learner.step import Learner, learner_step
from helpers import VOCAB, tiny_model

N_SAMPLES, PROMPT, RESPONSE = 12, 40, 9


def tree(groups: int, seed: int = 0) -> list[Sample]:
    """N_SAMPLES samples of PROMPT + RESPONSE tokens: a 20-token root shared by all, then `groups` groups, each
    sharing 12 more tokens; more groups, more pieces, the same tokens per sample."""
    rng = random.Random(seed)
    tok = lambda k: [rng.randrange(1, VOCAB) for _ in range(k)]  # noqa: E731
    root = tok(20)
    heads = [root + tok(12) for _ in range(groups)]
    return [Sample(heads[i % groups] + tok(PROMPT - 32), tok(RESPONSE), "attacker" if i % 2 else "defender",
                   reward=rng.choice([-1.0, 1.0]), vllm_logprobs=[-rng.random() for _ in range(RESPONSE)],
                   metadata={"group": i}) for i in range(N_SAMPLES)]


@pytest.fixture
def cuda_path(monkeypatch):
    """The CUDA path forced on CPU: the varlen kernel (its twin) and the fused ops (theirs: one custom op each, as
    the Triton kernel is, without the minutes of triton's interpreter that the kernel tests may have turned on)."""
    from fast_srt.kernels import fused_ops

    monkeypatch.setattr(attention, "FORCED_KERNEL", attention.VARLEN)
    monkeypatch.setattr(fused_ops, "uses_triton", lambda x: False)
    yield lambda model: apply_fused_ops(model, FUSED_TRITON)
    policy._FUSED_ROPE_DEVICES.discard("cpu")


def forward_backward_ops(batch, prepare=None) -> int:
    model = tiny_model("llama", True)
    if prepare:
        prepare(model)
    with count_ops() as ops:
        logp, ent = token_logprobs(model, batch, logprobs_chunked)
        (logp.sum() + ent.sum()).backward()
    return ops.launches


def pieces(groups: int) -> int:
    return len(pack_shared(tree(groups)).layout.lengths)


def test_forward_backward_ops_do_not_grow_with_pieces_on_the_cuda_path(cuda_path):
    assert pieces(1) < pieces(3) < pieces(6)
    counts = [forward_backward_ops(pack_shared(tree(g)), cuda_path) for g in (1, 3, 6)]
    assert len(set(counts)) == 1, counts


def test_per_piece_path_grows_with_pieces():
    counts = [forward_backward_ops(pack_shared(tree(g))) for g in (1, 3, 6)]
    assert counts[0] < counts[1] < counts[2], counts


def tiny_learner(model) -> Learner:
    cfg = TrainConfig(optim=OptimConfig(updates_per_step=2, micro_batch_tokens=8192, warmup_ratio=0.0),
                      algo=AlgoConfig(kl_coef=0.0), steps=4)
    opt = build_optimizer(model, 1e-4)
    return Learner(cfg=cfg, model=model, ref=None, optimizer=opt, scheduler=build_scheduler(opt, 7),
                   scaler=torch.amp.GradScaler("cpu", enabled=False), autocast=lambda: torch.autocast("cpu",
                   dtype=torch.bfloat16), logprob_fn=logprobs_chunked, adv_fns=select_advantages_impl("cpu"),
                   device=torch.device("cpu"), temperature=1.0, sft_stream=None, total_updates=7)


def learner_step_ops(groups: int, prepare=None) -> int:
    model = tiny_model("llama", True)
    if prepare:
        prepare(model)
    learner = tiny_learner(model)
    with count_ops() as ops:
        learner_step(learner, 0, tree(groups), timer=lambda phase: contextlib.nullcontext())
    return ops.launches


def test_learner_step_ops_do_not_grow_with_pieces_on_the_cuda_path(cuda_path):
    """A whole learner step (old log-probs, advantages, two PPO updates, the optimizer) at fixed samples."""
    counts = [learner_step_ops(g, cuda_path) for g in (1, 3, 6)]
    assert len(set(counts)) == 1, counts
