"""LoRA in one engine: the engine holds the base weights, the policy is the base + an adapter (a LoRA request), the
judge reads the base. A written adapter changes the policy's generations, and only the policy's."""

import pytest
import torch

from fast_srt.engine.engine import SamplingSpec
from fast_srt.engine.weight_sync import push_adapter
from fast_srt.learner.lora import LoRALinear, adapter_for_engine, apply_lora, save_peft_adapter
from fast_srt.learner.policy import load_policy

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [40, 41, 42, 43, 44]]
GREEDY = SamplingSpec(max_tokens=10, temperature=0.0, fixed_length=True)  # EOS ignored, as HF min_new_tokens
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.3)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def trainer_model(tiny_model_dir, tiny_lora_engine, tmp_path_factory):
    """The trainer's tiny model with rank-4 adapters (B = 0: the base model), attached to the engine."""
    model = load_policy(str(tiny_model_dir), dtype=torch.float32)
    apply_lora(model, 4, 8.0, TARGETS)
    d = tmp_path_factory.mktemp("adapter")
    save_peft_adapter(model, d, base_model=str(tiny_model_dir))
    tiny_lora_engine.attach_adapter(d)
    return model


def test_written_adapter_changes_the_policy_not_the_judge(tiny_lora_engine, trainer_model):
    engine, base = tiny_lora_engine, tiny_lora_engine.base_model()
    judge_before = [g.token_ids for g in base.generate(PROMPTS, GREEDY)]
    policy_before = [g.token_ids for g in engine.generate(PROMPTS, GREEDY)]
    assert policy_before == judge_before  # B = 0: the adapter is the identity

    _randomize(trainer_model, seed=1)
    adapters = adapter_for_engine(trainer_model)
    dt = push_adapter(engine.llm, engine.adapter.lora_int_id, adapters.items())
    assert dt >= 0
    policy_after = engine.generate(PROMPTS, GREEDY)
    assert [g.token_ids for g in policy_after] != policy_before
    assert [g.token_ids for g in base.generate(PROMPTS, GREEDY)] == judge_before  # the judge's base is untouched

    # the engine's policy is the trainer's: its greedy tokens and their log-probs agree with the trainer's forward
    for p, g in zip(PROMPTS, policy_after):
        assert g.token_ids == _hf_greedy(trainer_model, p, GREEDY.max_tokens)
    g = policy_after[0]
    with torch.no_grad():
        logits = trainer_model(torch.tensor([g.prompt_ids + g.token_ids])).logits[0, len(g.prompt_ids) - 1:-1]
    ref = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(g.token_ids)[:, None])[:, 0]
    assert torch.allclose(ref, torch.tensor(g.logprobs), atol=2e-3), (ref, g.logprobs)

    # a second write lands too (the active slot is refreshed, not only vLLM's adapter cache)
    _randomize(trainer_model, seed=2)
    push_adapter(engine.llm, engine.adapter.lora_int_id, adapter_for_engine(trainer_model).items())
    again = engine.generate(PROMPTS, GREEDY)
    for p, g in zip(PROMPTS, again):
        assert g.token_ids == _hf_greedy(trainer_model, p, GREEDY.max_tokens)
    assert [g.token_ids for g in base.generate(PROMPTS, GREEDY)] == judge_before


def test_adapter_write_refuses_layers_it_does_not_match(tiny_lora_engine, trainer_model):
    engine = tiny_lora_engine
    adapters = adapter_for_engine(trainer_model)
    name = next(iter(adapters))
    missing = {k: v for k, v in adapters.items() if k != name}
    with pytest.raises(KeyError, match="no tensors given"):
        push_adapter(engine.llm, engine.adapter.lora_int_id, missing.items())
    extra = {**adapters, "model.layers.0.self_attn.no_such_proj": adapters[name]}
    with pytest.raises(KeyError, match="no_such_proj"):
        push_adapter(engine.llm, engine.adapter.lora_int_id, extra.items())
    with pytest.raises(RuntimeError, match="not loaded"):
        push_adapter(engine.llm, 7, adapters.items())


def _reference(inputs, weights, indices):
    """Float64 per-token LoRA product; index -1: no adapter (zeros)."""
    w = weights.squeeze(1).double()
    out = torch.zeros(inputs.shape[0], w.shape[1], dtype=torch.float64)
    for t, s in enumerate(indices.tolist()):
        if s >= 0:
            out[t] = w[s] @ inputs[t].double()
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("mix", ["one", "mixed"])
def test_grouped_cpu_lora_ops_against_float64(dtype, tol, mix):
    """The grouped CPU LoRA ops (one matmul per adapter slot) against a float64 per-token product: shrink with its
    scale, expand adding or not, the sliced expand; odd sizes; a mixed batch with tokens of no adapter (-1)."""
    from fast_srt.engine import weight_sync as ws

    g = torch.Generator().manual_seed(7 if mix == "one" else 8)
    n, d_in, r, d_out = 37, 53, 5, 29
    idx = (torch.full((n,), 1) if mix == "one" else torch.randint(-1, 3, (n,), generator=g))
    x = torch.randn(n, d_in, generator=g).to(dtype)
    a = torch.randn(3, 1, r, d_in, generator=g).to(dtype)
    y = torch.zeros(n, r, dtype=dtype)
    ws._bgmv_shrink(x, a, y, idx, 0.5)
    want = 0.5 * _reference(x, a, idx)
    assert torch.allclose(y.double(), want, atol=tol * want.abs().max().item(), rtol=tol)

    h = torch.randn(n, r, generator=g).to(dtype)
    b = torch.randn(3, 1, d_out, r, generator=g).to(dtype)
    base = torch.randn(n, d_out + 3, generator=g).to(dtype)
    prod = _reference(h, b, idx)
    for add in (True, False):
        out = base.clone()
        ws._bgmv_expand(h, b, out, idx, add_inputs=add)
        want = base.double().clone()
        want[:, :d_out] = (want[:, :d_out] if add else 0) + prod
        assert torch.allclose(out.double(), want, atol=tol * want.abs().max().item(), rtol=tol)
        out = base.clone()
        ws._bgmv_expand_slice(h, b[:, :, :d_out - 4], out, idx, 3, d_out - 4, add_inputs=add)
        want = base.double().clone()
        want[:, 3:d_out - 1] = (want[:, 3:d_out - 1] if add else 0) + prod[:, :d_out - 4]
        assert torch.allclose(out.double(), want, atol=tol * want.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("mix", ["one", "none", "mixed"])
def test_grouped_prefill_ops_take_per_sequence_slots(mix):
    """The prefill (sgmv) ops get one slot per sequence and the sequences' lengths: the same products as the per-token
    ops, whether every sequence shares a slot, none has an adapter (-1), or they differ."""
    from fast_srt.engine import weight_sync as ws

    g = torch.Generator().manual_seed(11)
    lens = torch.tensor([5, 1, 9, 4])
    seq_slots = {"one": torch.tensor([2, 2, 2, 2]), "none": torch.full((4,), -1),
                 "mixed": torch.tensor([0, -1, 2, 0])}[mix]
    tok = torch.repeat_interleave(seq_slots, lens)
    n, d_in, r, d_out = int(lens.sum()), 23, 3, 17
    x = torch.randn(n, d_in, generator=g)
    a = torch.randn(3, 1, r, d_in, generator=g)
    b = torch.randn(3, 1, d_out, r, generator=g)
    meta = (torch.cumsum(lens, 0) - lens, lens, seq_slots, len(lens), int(lens.max()), n)
    y = torch.zeros(n, r)
    ws._sgmv_shrink(x, a, y, *meta, 2.0)
    assert torch.allclose(y.double(), 2.0 * _reference(x, a, tok), atol=1e-5)
    out = torch.ones(n, d_out)
    ws._sgmv_expand(y, b, out, *meta, add_inputs=True)
    assert torch.allclose(out.double(), 1.0 + _reference(y, b, tok), atol=1e-4)
    out = torch.ones(n, d_out + 2)
    ws._sgmv_expand_slice(y, b, out, *meta, 2, d_out, add_inputs=False)
    assert torch.allclose(out[:, 2:].double(), _reference(y, b, tok), atol=1e-4) and bool((out[:, :2] == 1).all())


def _randomize_role(model, role: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for t in m.pair(role):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.3)


def test_per_role_adapters_each_change_only_their_roles_generations(tiny_model_dir, tiny_lora_engine, tmp_path):
    """--roles per-role: two adapters side by side in one engine (two LoRA requests). A write into one changes that
    role's generations and leaves the other role's and the base's (the judge's) as they were; a call may give each
    prompt its own adapter."""
    from fast_srt.learner.lora import active_adapter

    engine = tiny_lora_engine
    model = load_policy(str(tiny_model_dir), dtype=torch.float32)
    apply_lora(model, 4, 8.0, TARGETS, roles=("attacker", "defender"))
    ids = {"attacker": 11, "defender": 12}
    for role, lora_id in ids.items():
        save_peft_adapter(model, tmp_path / role, base_model=str(tiny_model_dir), role=role)
        engine.attach_adapter(tmp_path / role, name=role, lora_int_id=lora_id, role=role, default=False)
    try:
        view = {r: engine.for_role(r) for r in ids}

        def gens():
            return {r: [g.token_ids for g in view[r].generate(PROMPTS, GREEDY)] for r in ids} | {
                "base": [g.token_ids for g in engine.base_model().generate(PROMPTS, GREEDY)]}

        start = gens()
        assert start["attacker"] == start["defender"] == start["base"]  # B = 0: both adapters are the base
        _randomize_role(model, "attacker", seed=3)
        push_adapter(engine.llm, ids["attacker"], adapter_for_engine(model, "attacker").items())
        after = gens()
        assert after["attacker"] != start["attacker"]
        assert after["defender"] == start["defender"] and after["base"] == start["base"]
        with active_adapter(model, "attacker"):  # the engine's attacker is the trainer's attacker
            assert after["attacker"] == [_hf_greedy(model, p, GREEDY.max_tokens) for p in PROMPTS]
        _randomize_role(model, "defender", seed=4)
        push_adapter(engine.llm, ids["defender"], adapter_for_engine(model, "defender").items())
        again = gens()
        assert again["attacker"] == after["attacker"] and again["base"] == start["base"]
        with active_adapter(model, "defender"):
            assert again["defender"] == [_hf_greedy(model, p, GREEDY.max_tokens) for p in PROMPTS]
        # one call, one adapter per prompt (the league's mixed batches)
        mixed = engine.generate(PROMPTS, GREEDY, lora=[view["attacker"].adapter, view["defender"].adapter, None])
        assert [g.token_ids for g in mixed] == [again["attacker"][0], again["defender"][1], again["base"][2]]
    finally:
        for lora_id in ids.values():
            engine.detach_adapter(lora_id)
    assert engine.role_adapters == {}
