"""One learner step's gradient, on one process or on each rank under torchrun (tests/run/test_distributed.py).

    python -m torch.distributed.run --nproc_per_node 2 dist_grad_worker.py MODEL_DIR OUT ESTIMATOR SPLIT

Every rank builds the same union of samples and the same model, keeps its own share (SPLIT "half": contiguous
halves of whole groups, as the trainer deals games; "rank0": rank 0 holds every sample, rank 1 none, as when all
of a rank's games were ties), runs fast_srt's learner step (one update, SGD, no clipping) and writes the summed
gradient (rank 0) to OUT.
"""

import contextlib
import sys
from types import SimpleNamespace

import torch

from fast_srt.config import AlgoConfig, OptimConfig, TrainConfig
from fast_srt.kernels import logprobs_ref, select_advantages_impl
from fast_srt.learner import collective
from fast_srt.learner.batch import Sample
from fast_srt.learner.policy import load_policy
from fast_srt.learner.step import learner_step, per_sample_logprobs, total_updates
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


def step_gradient(model_dir: str, estimator: str, samples: list[Sample]) -> list[torch.Tensor]:
    cfg = TrainConfig(optim=OptimConfig(lr=1.0, updates_per_step=1, micro_batch_tokens=64, warmup_ratio=0.0,
                                        grad_clip=1e9),
                      algo=AlgoConfig(kl_coef=0.0, estimator=estimator,
                                      samples_per_prompt=1 if estimator == "reinforce_pp" else 2))
    torch.manual_seed(0)
    model = load_policy(model_dir, dtype=torch.float32)
    collective.broadcast_parameters(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    learner = SimpleNamespace(cfg=cfg, model=model, ref=None, optimizer=opt, total_updates=total_updates(cfg),
                              scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                              scaler=torch.amp.GradScaler("cpu", enabled=False), autocast=contextlib.nullcontext,
                              logprob_fn=logprobs_ref, adv_fns=select_advantages_impl(torch.device("cpu")),
                              device=torch.device("cpu"), temperature=TEMPERATURE, sft_stream=None)
    with torch.no_grad():  # vLLM's log-probs: the trainer's, slightly off (the importance correction is not 1)
        for s, lp in zip(samples, per_sample_logprobs(model, samples, logprobs_ref, 4096, contextlib.nullcontext,
                                                      TEMPERATURE)):
            s.vllm_logprobs = (lp - 0.05).tolist()
    out = learner_step(learner, 1, samples, lambda name: contextlib.nullcontext())
    assert out["optim/updates"] == 1, out
    return [p.grad.detach().clone() for p in model.parameters()]


def main(model_dir: str, out_path: str, estimator: str, split: str) -> None:
    ranks = distributed.init_from_env()
    vocab = load_policy(model_dir, dtype=torch.float32).config.vocab_size
    samples = union_samples(vocab)
    if split == "half":
        samples, _ = distributed.my_share(samples, [s.metadata["group"] for s in samples], ranks)
    elif ranks.rank != 0:
        samples = []
    grads = step_gradient(model_dir, estimator, samples)
    if ranks.main:
        torch.save({"grads": grads, "n_local": len(samples)}, out_path)
    distributed.finish(ranks)
    if ranks.world > 1:  # no vLLM here to tear the group down at exit
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
