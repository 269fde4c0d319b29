"""One learner step's gradient, on one process or on each rank under torchrun (tests/run/test_distributed.py).

    python -m torch.distributed.run --nproc_per_node 2 dist_grad_worker.py MODEL_DIR OUT ESTIMATOR SPLIT \
        [SHARD [CLIP]]

Every rank builds the same union of samples and the same model, keeps its own share (SPLIT "half": contiguous
halves of whole groups, as the trainer deals games; "rank0": rank 0 holds every sample, rank 1 none, as when all
of a rank's games were ties; "uneven": whole groups, 4 samples on rank 0 and 8 on rank 1), runs fast_srt's
learner step (one update, SGD, no clipping unless CLIP) and writes the summed gradient, the weights after the
update and the step's grad norm (rank 0) to OUT. ESTIMATOR "..._kl": with the KL term (kl_coef 0.05) against a
frozen reference (REINFORCE++: in the reward, so every sample's old log-probs are computed too; GRPO: in the
loss). SHARD "fsdp2": the model and the reference sharded with FSDP2 (fast_srt.learner.sharding), the gradients
and weights written whole.
"""

import contextlib
import sys
from types import SimpleNamespace

import torch

from fast_srt.config import AlgoConfig, OptimConfig, TrainConfig
from fast_srt.kernels import logprobs_chunked, select_advantages_impl
from fast_srt.learner import collective, sharding
from fast_srt.learner.batch import Sample
from fast_srt.learner.policy import load_policy, load_reference
from fast_srt.learner.step import learner_step, micro_batches, per_sample_logprobs, total_updates
from fast_srt.run import distributed

TEMPERATURE = 0.7


def union_samples(vocab: int, n: int = 12) -> list[Sample]:
    """n samples in groups of 2 (GRPO's groups), lengths uneven so the two halves hold different token counts."""
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        p, r = int(torch.randint(5, 30, (1,), generator=g)), int(torch.randint(2, 6 if i < n // 2 else 25, (1,),
                                                                               generator=g))
        ids = torch.randint(3, vocab, (p + r,), generator=g).tolist()
        out.append(Sample(ids[:p], ids[p:], "attacker" if i % 4 < 2 else "defender",
                          reward=float(torch.randn(1, generator=g)), vllm_logprobs=[0.0] * r,
                          metadata={"group": i // 2}))
    return out


MICRO_TOKENS = 64


def step_gradient(model_dir: str, estimator: str, samples: list[Sample], shard: str = "none", clip: float = 1e9,
                  ) -> dict:
    """One learner step; returns the gradient after clipping ("grads"), the weights after the SGD update
    ("params"), both whole, and the step's metrics ("metrics")."""
    kl = estimator.endswith("_kl")
    estimator = estimator.removesuffix("_kl")
    cfg = TrainConfig(optim=OptimConfig(lr=1.0, updates_per_step=1, micro_batch_tokens=MICRO_TOKENS,
                                        warmup_ratio=0.0, grad_clip=clip),
                      algo=AlgoConfig(kl_coef=0.05 if kl else 0.0, estimator=estimator,
                                      samples_per_prompt=1 if estimator == "reinforce_pp" else 2))
    torch.manual_seed(0)
    model = load_policy(model_dir, dtype=torch.float32)
    ref = load_reference(model_dir, torch.float32) if kl else None
    with torch.no_grad():  # vLLM's log-probs: the trainer's, slightly off (the importance correction is not 1)
        for s, lp in zip(samples, per_sample_logprobs(model, samples, logprobs_chunked, 4096, contextlib.nullcontext,
                                                      TEMPERATURE)):
            s.vllm_logprobs = (lp - 0.05).tolist()
        if ref is not None:  # a reference that differs from the policy: a KL term worth its gradient
            for p in ref.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    if shard == "fsdp2":
        model = sharding.shard_model(model, "cpu")
        ref = sharding.shard_model(ref, "cpu") if ref is not None else None
    else:
        collective.broadcast_parameters(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    learner = SimpleNamespace(cfg=cfg, model=model, ref=ref, optimizer=opt, total_updates=total_updates(cfg),
                              scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                              scaler=torch.amp.GradScaler("cpu", enabled=False), autocast=contextlib.nullcontext,
                              logprob_fn=logprobs_chunked, adv_fns=select_advantages_impl(torch.device("cpu")),
                              device=torch.device("cpu"), temperature=TEMPERATURE, sft_stream=None)
    out = learner_step(learner, 1, samples, lambda name: contextlib.nullcontext())
    assert out["optim/updates"] == 1, out
    whole = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()  # noqa: E731
    return {"grads": [whole(p.grad) for p in model.parameters()], "params": [whole(p) for p in model.parameters()],
            "metrics": {k: float(v) for k, v in out.items() if v is not None}}  # a role without tokens: None


def main(model_dir: str, out_path: str, estimator: str, split: str, shard: str = "none", clip: str = "1e9",
         ) -> None:
    ranks = distributed.init_from_env()
    vocab = load_policy(model_dir, dtype=torch.float32).config.vocab_size
    samples = union_samples(vocab)
    if split == "half":
        samples, _ = distributed.my_share(samples, [s.metadata["group"] for s in samples], ranks)
    elif split == "uneven":  # rank 0 the first 4 (short) samples, rank 1 the other 8: more micro-batches on rank 1
        samples = samples[:4] if ranks.rank == 0 else samples[4:]
    elif ranks.rank != 0:
        samples = []
    got = step_gradient(model_dir, estimator, samples, shard, float(clip))
    micro = distributed._gather(len(micro_batches(samples, MICRO_TOKENS, False)), ranks)  # each rank's count
    if ranks.main:
        torch.save({**got, "n_local": len(samples), "micro_batches": micro}, out_path)
    distributed.finish(ranks)
    if ranks.world > 1:  # no vLLM here to tear the group down at exit
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:7])
