"""Helpers shared by several test files: a tiny random model, random samples, a learner run without engines."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch

from fast_srt.config import AlgoConfig, OptimConfig, TrainConfig
from fast_srt.kernels import logprobs_chunked
from fast_srt.learner.batch import Sample
from fast_srt.learner.policy import (build_optimizer, build_scheduler, load_policy, pick_attention,
                                     prepare_for_training)
from fast_srt.learner.step import per_sample_logprobs, total_updates

VOCAB = 300


def tiny_model(arch: str, tie: bool, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tie, attn_implementation=pick_attention("cpu"))
    torch.manual_seed(0)
    model = (LlamaForCausalLM(LlamaConfig(**common)) if arch == "llama"
             else Qwen2ForCausalLM(Qwen2Config(**common)))
    return prepare_for_training(model.to(dtype))



def random_samples(vocab, n=6, seed=0, prompt=(5, 30), response=(3, 20), group=lambda i: i):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = int(torch.randint(prompt[0], prompt[1], (1,), generator=g))
        r = int(torch.randint(response[0], response[1], (1,), generator=g))
        ids = torch.randint(3, vocab, (p + r,), generator=g).tolist()
        out.append(Sample(ids[:p], ids[p:], "attacker" if i % 2 else "defender", reward=float(i % 3) - 1.0,
                          vllm_logprobs=[0.0] * r, metadata={"group": group(i)}))
    return out


def learner_run(model_dir, *, micro=4096, ups=1, steps=3, lr=1e-3, fp16_scaler=False, estimator="reinforce_pp",
         kl=0.0, nan_step=-1):
    cfg = TrainConfig(optim=OptimConfig(lr=lr, updates_per_step=ups, micro_batch_tokens=micro, warmup_ratio=0.0),
                      algo=AlgoConfig(kl_coef=kl, estimator=estimator,
                                      samples_per_prompt=1 if estimator == "reinforce_pp" else 2),
                      steps=steps, inject_nan_loss_at_step=nan_step)
    torch.manual_seed(0)
    model = load_policy(str(model_dir), dtype=torch.float32)
    opt = build_optimizer(model, lr)
    n = total_updates(cfg)
    return SimpleNamespace(cfg=cfg, model=model, optimizer=opt, total_updates=n,
                           scheduler=build_scheduler(opt, n, 0, cfg.optim.min_lr_ratio),
                           scaler=torch.amp.GradScaler("cpu", enabled=fp16_scaler), autocast=contextlib.nullcontext,
                           logprob_fn=logprobs_chunked, temperature=0.7, sft_stream=None)


def rollout(run, samples):
    old = per_sample_logprobs(run.model, samples, run.logprob_fn, 4096, run.autocast, run.temperature)
    for s, o in zip(samples, old):
        s.vllm_logprobs = o.tolist()
    advs = [torch.randn(len(s.response_ids), generator=torch.Generator().manual_seed(i)) for i, s in
            enumerate(samples)]
    return old, advs
