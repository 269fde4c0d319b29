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
