"""A weight written into the live engine changes what it generates; writing the original back restores it."""

import torch

from fast_srt.engine.engine import SamplingSpec
from fast_srt.engine.weight_sync import engine_model, push_weights
from fast_srt.learner.policy import weights_for_engine

PROMPTS = ["<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nWrite a poem.<|im_end|>\n<|im_start|>assistant\n"]
GREEDY = SamplingSpec(max_tokens=12, temperature=0.0)


def _hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def test_written_weight_changes_generation_and_logprobs(tiny_engine, tiny_model_dir):
    llm = tiny_engine.llm
    before = tiny_engine.generate(PROMPTS, GREEDY)
    model = _hf_model(tiny_model_dir)
    with torch.no_grad():
        torch.manual_seed(123)
        for name, p in model.named_parameters():
            if "mlp" in name or "embed" in name:
                p.add_(torch.randn_like(p) * 0.5)
    dt = push_weights(llm, weights_for_engine(model))
    after = tiny_engine.generate(PROMPTS, GREEDY)
    assert dt < 30
    assert [g.token_ids for g in after] != [g.token_ids for g in before]

    # the engine now computes what the trainer computes: greedy tokens' log-probs agree with an HF forward
    g = after[0]
    ids = torch.tensor([g.prompt_ids + g.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, len(g.prompt_ids) - 1:-1].float(), -1)
    hf = logp.gather(-1, torch.tensor(g.token_ids)[:, None])[:, 0]
    assert torch.allclose(hf, torch.tensor(g.logprobs), atol=2e-3), (hf, g.logprobs)

    # writing the original weights back restores the original generations exactly
    push_weights(llm, weights_for_engine(_hf_model(tiny_model_dir)))
    restored = tiny_engine.generate(PROMPTS, GREEDY)
    assert [g.token_ids for g in restored] == [g.token_ids for g in before]


def test_tied_head_is_sent(tiny_model_dir):
    model = _hf_model(tiny_model_dir)
    names = [n for n, _ in weights_for_engine(model)]
    assert "lm_head.weight" in names and names.count("lm_head.weight") == 1


def test_engine_holds_written_values(tiny_engine, tiny_model_dir):
    model = _hf_model(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.fill_(1.2345)
    push_weights(tiny_engine.llm, weights_for_engine(model))
    vm = engine_model(tiny_engine.llm)
    got = dict(vm.named_parameters())["model.norm.weight"]
    assert torch.allclose(got.float(), torch.full_like(got.float(), 1.2345))
    push_weights(tiny_engine.llm, weights_for_engine(_hf_model(tiny_model_dir)))


def test_prefix_cache_serves_a_repeated_prefix_until_weights_change(tiny_engine, tiny_model_dir):
    """vLLM's prefix cache computes a repeated prompt prefix once (the judge's instruction across steps), and a
    weight write empties it (blocks computed with the old weights must not be reused)."""
    rng = torch.Generator().manual_seed(3)
    prefix = torch.randint(5, 200, (300,), generator=rng).tolist()  # > 2 KV blocks (128 tokens each on CPU)
    spec = SamplingSpec(max_tokens=2, temperature=0.0, logprobs=False)

    def hits(tail):
        tiny_engine.generate([prefix + tail], spec, phase="cache_test")
        d = tiny_engine.stats.per_phase["cache_test"]
        out = (d["cache_hits"], d["cache_queries"])
        d["cache_hits"] = d["cache_queries"] = 0
        return out

    hits([7, 8, 9])  # computes the prefix's blocks
    h, q = hits([10, 11])
    assert q == len(prefix) + 2 and 256 <= h <= len(prefix)  # whole KV blocks of the shared prefix were reused
    push_weights(tiny_engine.llm, weights_for_engine(_hf_model(tiny_model_dir)))  # same values, cache reset
    h, q = hits([12, 13])
    assert h == 0 and q == len(prefix) + 2
