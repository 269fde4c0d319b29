"""FSDP2 under torchrun (`--shard fsdp2`): the trainer's model sharded across the ranks instead of replicated.

`shard_model` wraps every decoder layer and the root with `torch.distributed.fsdp.fully_shard`: each rank keeps
1/N of every parameter, of its gradient and of AdamW's moments; a layer's full weights exist only while it runs
(all-gathered before its forward and again before its backward), and each backward reduce-scatters the gradients.

- **Sum, not mean.** The loss is already a token mean over every rank's tokens (fast_srt.learner.collective), so
  the ranks' gradients must be summed (FSDP2's default is their mean): the divide factor is 1, and the reduction a
  plain sum. A divide factor alone makes FSDP2 use a pre-multiplied sum, which gloo refuses ("Cannot use
  ReduceOp.PREMUL_SUM with Gloo"); forcing sum-only reductions works on gloo and NCCL alike.
- **The root.** fast_srt's forwards call `model.base_model(...)` (the decoder) and then read
  `model.get_output_embeddings().weight` for the log-prob kernel. With the root on the HF model, that decoder call
  would skip the root's hooks and leave the embedding, final norm and output head sharded. `ShardedPolicy` is the
  root instead: its `base_model` is itself, its forward is the decoder's, and FSDP2 keeps a root's parameters
  gathered after its forward, so the head weight read next is the full one and its gradient is reduce-scattered
  with the root's after the backward.
- **Matching collectives.** FSDP2 all-gathers inside every forward and reduce-scatters inside every backward: every
  rank must run as many of each, in the same order. fast_srt.learner.step pads a rank's forwards (log-probs) and
  forward-backward passes (updates) with passes on a one-token batch whose loss is multiplied by 0.
- **Full tensors.** The engine and the checkpoint need whole tensors: `full_tensors` all-gathers them one at a time
  (every rank takes part; each holds one full tensor at a time), `full_state` gathers the model and optimizer
  state into today's checkpoint format on rank 0, `shard_optimizer_state` turns such a full optimizer state back
  into this rank's shards. A checkpoint does not record whether it was written sharded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

SHARDINGS = ("none", "fsdp2")


class ShardedPolicy(nn.Module):
    """The FSDP2 root around an HF causal LM (module docstring): `base_model(...)` runs the decoder under the root's
    hooks; `lm` is the HF model (its config, its state_dict names, save_pretrained)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def config(self):
        return self.lm.config

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def get_output_embeddings(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def forward(self, **kwargs):
        return self.lm.base_model(**kwargs)


def is_sharded(model) -> bool:
    return isinstance(model, ShardedPolicy)


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model (itself when not sharded)."""
    return model.lm if is_sharded(model) else model


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    layers = getattr(lm.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"--shard fsdp2: {type(lm).__name__} has no decoder layer list at base_model.layers")
    return layers


def shard_model(lm: nn.Module, device_type: str) -> ShardedPolicy:
    """Each decoder layer, then the root (embedding, final norm, output head), sharded over all ranks of the default
    process group, moved to `device_type` unit by unit (a model loaded on the host never lands whole on the
    device). Gradients are summed over the ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    for layer in decoder_layers(lm):
        fully_shard(layer, mesh=mesh)
    root = fully_shard(ShardedPolicy(lm), mesh=mesh)
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return root


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def full_tensors(pairs: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs with every sharded tensor all-gathered (a collective: every rank iterates them all)."""
    dtensor = _dtensor()
    for name, t in pairs:
        yield name, t.full_tensor() if isinstance(t, dtensor) else t


def full_state(model: ShardedPolicy, optimizer: torch.optim.Optimizer, keep: bool) -> tuple[dict, dict] | None:
    """(model state dict, optimizer state dict) as an unsharded run holds them, on the host, tensor by tensor; a
    collective: every rank calls it, only `keep` (rank 0) gets them (None elsewhere). Tied weights stay one tensor
    under both names (save_pretrained then writes it once, as it does unsharded)."""
    dtensor = _dtensor()

    def gather(t):
        full = t.full_tensor() if isinstance(t, dtensor) else t
        return full.detach().cpu() if keep else None

    seen: dict[int, torch.Tensor] = {}
    model_state = {}
    for name, p in model.lm.state_dict(keep_vars=True).items():
        if id(p) not in seen:
            seen[id(p)] = gather(p)
        model_state[name] = seen[id(p)]
    opt = optimizer.state_dict()
    opt_state = {i: {k: gather(v) if torch.is_tensor(v) else v for k, v in s.items()}
                 for i, s in opt["state"].items()}
    return (model_state, {**opt, "state": opt_state}) if keep else None


def shard_optimizer_state(optimizer: torch.optim.Optimizer, full: dict) -> dict:
    """A full optimizer state dict (a checkpoint's, sharded or not when written) with each per-parameter tensor
    replaced by this rank's shard of it, ready for optimizer.load_state_dict. Every rank reads the same file, so
    each keeps its own rows without any communication."""
    from torch.distributed.tensor import distribute_tensor

    dtensor = _dtensor()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, s in full["state"].items():
        p = params[int(i)]
        state[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                    if isinstance(p, dtensor) and torch.is_tensor(v) and v.shape == p.shape else v
                    for k, v in s.items()}
    return {**full, "state": state}


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ that also returns a plain tensor over sharded gradients (the norm of the whole gradient of
    every rank; the clipping itself already uses it)."""
    gn = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return gn.full_tensor() if isinstance(gn, _dtensor()) else gn
