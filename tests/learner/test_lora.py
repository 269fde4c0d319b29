"""LoRA: merged weights reproduce the adapted forward; disabling adapters gives the base model back."""

import torch

from fast_srt.learner.lora import adapter_state_dict, adapters_disabled, apply_lora, has_lora, merged_state_dict
from fast_srt.learner.policy import weights_for_engine


def _model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_merged_weights_equal_adapted_forward(tiny_model_dir):
    base, model = _model(tiny_model_dir), _model(tiny_model_dir)
    n = apply_lora(model, rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    assert n == 3 * model.config.num_hidden_layers and has_lora(model)
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in k for k in trainable)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_(0, 0.1)  # non-zero adapters
    ids = torch.randint(3, model.config.vocab_size, (1, 23))
    with torch.no_grad():
        adapted = model(ids).logits
        with adapters_disabled(model):
            off = model(ids).logits
        base_out = base(ids).logits
        merged = _model(tiny_model_dir)
        missing, unexpected = merged.load_state_dict(merged_state_dict(model), strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
        merged_out = merged(ids).logits
    assert torch.allclose(off, base_out, atol=1e-6)
    assert not torch.allclose(adapted, base_out, atol=1e-3)
    assert torch.allclose(merged_out, adapted, atol=1e-4)
    names = [k for k, _ in weights_for_engine(model)]
    assert "lm_head.weight" in names and not any(".lora_" in k or ".base." in k for k in names)
    assert set(adapter_state_dict(model)) == set(trainable)
