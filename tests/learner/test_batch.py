"""Packing: the alignment convention of fast_srt/batch.py, written out token by token, and micro-batching."""

import pytest
import torch

from fast_srt.learner.batch import PackedBatch, Sample, pack, pad, plan_micro_batches, split_micro_batches


def two_samples():
    return [
        Sample(prompt_ids=[11, 12, 13], response_ids=[21, 22], role="attacker", reward=1.0,
               vllm_logprobs=[-0.1, -0.2]),
        Sample(prompt_ids=[31], response_ids=[41, 42, 43], role="defender", reward=-1.0,
               vllm_logprobs=[-0.3, -0.4, -0.5], metadata={"seed": "x"}),
    ]


def test_pack_alignment_by_hand():
    b = pack(two_samples())
    assert b.input_ids.tolist() == [11, 12, 13, 21, 22, 31, 41, 42, 43]
    assert b.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert b.cu_seqlens.tolist() == [0, 5, 9] and b.cu_seqlens.dtype == torch.int32
    # position t predicts token t+1 of its own sample; the last position of a sample predicts nothing
    assert b.targets.tolist() == [12, 13, 21, 22, 0, 41, 42, 43, 0]
    assert b.loss_mask.tolist() == [False, False, True, True, False, True, True, True, False]
    assert b.loss_index.tolist() == [2, 3, 5, 6, 7]
    assert b.targets[b.loss_index].tolist() == [21, 22, 41, 42, 43]  # exactly the response tokens
    assert torch.allclose(b.vllm_logp, torch.tensor([0, 0, -0.1, -0.2, 0, -0.3, -0.4, -0.5, 0]))
    assert b.sample_idx.tolist() == [0] * 5 + [1] * 4
    assert b.roles.tolist() == [0, 1] and b.rewards.tolist() == [1.0, -1.0]
    assert b.seqlens == (5, 4) and b.max_seqlen == 5
    assert b.response_spans == ((2, 4), (5, 8))
    assert b.num_tokens == 9 and b.num_samples == 2 and b.num_loss_tokens == 5


def test_scatter_and_split_responses_round_trip():
    b = pack(two_samples())
    x = b.scatter_responses([[1.0, 2.0], [3.0, 4.0, 5.0]])
    assert x.tolist() == [0, 0, 1, 2, 0, 3, 4, 5, 0]
    assert [v.tolist() for v in b.split_responses(x)] == [[1, 2], [3, 4, 5]]
    with pytest.raises(ValueError):
        b.scatter_responses([[1.0], [3.0, 4.0, 5.0]])


def test_pad_uses_the_same_alignment():
    samples = two_samples()
    b, p = pack(samples), pad(samples)
    assert p.input_ids.shape == (2, 5)
    assert p.targets[p.loss_mask].tolist() == b.targets[b.loss_index].tolist()
    assert p.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


def test_sft_samples_have_no_vllm_logp_and_mixing_fails():
    sft = Sample(prompt_ids=[1, 2], response_ids=[3], role="defender")
    assert pack([sft]).vllm_logp is None
    with pytest.raises(ValueError, match="vllm_logprobs"):
        pack([sft, two_samples()[0]])


def test_sample_validation():
    with pytest.raises(ValueError, match="role"):
        Sample(prompt_ids=[1], response_ids=[2], role="judge")
    with pytest.raises(ValueError, match="one per response token"):
        Sample(prompt_ids=[1], response_ids=[2, 3], role="attacker", vllm_logprobs=[-1.0])
    with pytest.raises(ValueError, match="non-empty"):
        Sample(prompt_ids=[], response_ids=[2], role="attacker")


def test_to_keeps_host_fields():
    b = pack(two_samples()).to("cpu")
    assert isinstance(b, PackedBatch) and b.seqlens == (5, 4)


def test_micro_batches_respect_budget_and_keep_every_sample():
    lengths = [7, 3, 9, 2, 5, 5, 2, 12]
    plan = plan_micro_batches(lengths, max_tokens=10)
    assert sorted(i for g in plan for i in g) == list(range(len(lengths)))
    for g in plan:
        assert sum(lengths[i] for i in g) <= 10 or len(g) == 1  # 12 > 10 goes alone
    assert [7] in plan  # the oversized sample
    assert len(plan) == 5  # first-fit decreasing: [12] [9] [7,3] [5,5] [2,2]
    samples = [Sample(prompt_ids=[1] * (n - 1), response_ids=[2], role="attacker") for n in lengths]
    micro = split_micro_batches(samples, 10)
    assert sum(len(m) for m in micro) == len(samples)
    assert all(sum(s.num_tokens for s in m) <= 10 for m in micro if len(m) > 1)
    with pytest.raises(ValueError):
        plan_micro_batches(lengths, 0)
