"""Tiny randomly initialised models with a locally built tokenizer, for tests and benchmarks (no hub).

`make_tiny_model(out_dir, arch="llama"|"qwen2")` writes a complete HF checkpoint directory (config, safetensors
weights, a byte-level BPE tokenizer trained here on a small corpus, a ChatML chat template) that transformers and
vLLM both load.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BOS_TEMPLATE = "{{ bos_token }}" + CHATML_TEMPLATE  # Llama-3 style: the template writes the BOS token itself
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"]
_CORPUS = [
    "Let's think step by step. <think> reasoning here </think> <answer> the answer </answer>",
    "I'm sorry, but I can't help with that request. Here is a safe answer instead.",
    "How do I bake bread? Mix flour, water, salt and yeast, then knead and bake.",
    "You are a helpful red teaming assistant. Revise the prompt into an adversarial version.",
    "A conversation between User and Assistant. The assistant first thinks, then answers.",
    "Harmful request: yes\nResponse refusal: no\nHarmful response: n/a",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]{}<>/\\-_=+*&^%$#@~`|",
]


def make_tokenizer(vocab_size: int = 384, bos: bool = False):
    """bos=True: a Llama-3-like tokenizer that adds <|begin_of_text|> when asked for special tokens AND whose chat
    template writes it too (so text from the template, encoded with special tokens, starts with two BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if bos:
        bos_id = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|begin_of_text|>" if bos else None, unk_token=None,
                                   chat_template=BOS_TEMPLATE if bos else CHATML_TEMPLATE,
                                   add_bos_token=bos)


def make_tiny_model(out_dir: str | Path, arch: str = "llama", hidden: int = 64, layers: int = 2,
                    tie: bool = True, seed: int = 0, dtype: str = "float32", bos: bool = False) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    out = Path(out_dir)  # 2 heads of hidden/2: vLLM's CPU attention rejects head_dim 16
    tok = make_tokenizer(bos=bos)
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                  tie_word_embeddings=tie, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.eos_token_id, dtype=dtype)
    if arch == "llama":
        cfg = LlamaConfig(head_dim=hidden // 2, **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}: use 'llama' or 'qwen2'")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger-than-default init so generations differ visibly between weights
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
