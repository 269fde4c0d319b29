"""The trained policy: load an HF causal LM, run it over a packed batch, get per-token log-probs, optimizer.

1. `load_policy` loads the model with an attention that understands packed sequences (no padding):
   CUDA with flash-attn installed -> "flash_attention_2" fed cu_seqlens directly (varlen kernel, no mask);
   otherwise -> VARLEN_SDPA, registered here: one varlen kernel call per layer on CUDA, one SDPA call per sample
   or shared-prefix piece on CPU, where that costs the least (fast_srt/learner/attention.py). `pick_attention`
   and `pick_fused_ops` (RMSNorm, SwiGLU and RoPE as fused kernels on CUDA) choose once, for a device.
2. `packed_hidden_states` runs the decoder on the packed row and returns the final hidden states [T, H].
3. `token_logprobs` gathers the loss positions (batch.loss_index) and hands hidden [N, H] and the output
   projection weight [V, H] to `logprob_fn` (the fused kernel or its torch twin): [T, V] logits never exist.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Callable

import torch

from fast_srt.learner.attention import (PER_PIECE, attention_inputs, has_flash_attn, one_call_attention,
                                        packed_attention_kernel, per_segment_sdpa)
from fast_srt.learner.batch import PackedBatch
from fast_srt.learner.lora import has_lora, merged_state_dict

VARLEN_SDPA = "fast_srt_varlen_sdpa"
SEQLENS_KWARG = "fast_srt_seqlens"  # host tuple of sample lengths, passed through the model's **kwargs
LAYOUT_KWARG = "fast_srt_prefix_layout"  # a PrefixLayout (pack_shared), passed the same way
CU_SEQLENS_KWARG = "fast_srt_cu_seqlens"  # the same lengths as a device tensor [S + 1] int32

LogprobFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


def _varlen_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                           **kwargs):
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, D], None), causal within each sample.

    Without the seqlens kwarg (an ordinary padded or single-sequence call), behaves like transformers' sdpa. With
    a PrefixLayout (shared-prefix packing), each piece attends to its ancestors and causally to itself. The kernel
    is attention.packed_attention_kernel's choice: one call per layer on CUDA, one SDPA call per segment on CPU.
    """
    layout = kwargs.get(LAYOUT_KWARG)
    if layout is not None:
        return _shared_prefix_attention(module, query, key, value, layout, dropout, scaling)
    seqlens = kwargs.get(SEQLENS_KWARG)
    if seqlens is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects batch 1, got query {tuple(query.shape)}")
    p = dropout if module.training else 0.0
    query, key, value, out_dtype = attention_inputs(query, key, value)
    kernel = packed_attention_kernel(query, p)
    if kernel != PER_PIECE:
        cu = kwargs.get(CU_SEQLENS_KWARG)
        if cu is None:
            cu = torch.tensor([0, *itertools.accumulate(seqlens)], dtype=torch.int32, device=query.device)
        n = max(seqlens)
        return one_call_attention(kernel, query, key, value, cu, cu, n, n, scaling, p).to(out_dtype), None
    out = per_segment_sdpa(query, key, value, seqlens, seqlens, (0,) * len(seqlens), None, scaling, p)
    return out.transpose(1, 2).to(out_dtype, memory_format=torch.contiguous_format), None  # [1, T, Hq, D], one copy


def _shared_prefix_attention(module, query, key, value, layout, dropout, scaling):
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] over a pack_shared row -> [1, T, Hq, D].

    Each piece's keys and values are gathered once per layer (its ancestors', then its own: layout.ctx_index);
    the gather's backward adds every piece's gradient into the shared positions. Queries sit at the end of their
    key range, so the causal mask is aligned to the bottom right (query j sees all ancestors and its own piece up
    to j). On CUDA one kernel call over the whole row (layout.cu_q / cu_k); on CPU one SDPA call per piece, with
    an additive mask built once per batch and dtype and reused by every layer."""
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects batch 1, got query {tuple(query.shape)}")
    p = dropout if module.training else 0.0
    query, key, value, out_dtype = attention_inputs(query, key, value)
    kc = key.index_select(2, layout.ctx_index)  # [1, Hkv, Tk, D]
    vc = value.index_select(2, layout.ctx_index)  # [1, Hkv, Tk, D]
    kernel = packed_attention_kernel(query, p)
    if kernel != PER_PIECE:
        out = one_call_attention(kernel, query, kc, vc, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k,
                                 scaling, p)
        return out.to(out_dtype), None
    out = per_segment_sdpa(query, kc, vc, layout.lengths, layout.key_lengths, layout.context,
                           lambda n, c: layout.mask(n, c, query.dtype, query.device), scaling, p)
    return out.transpose(1, 2).to(out_dtype, memory_format=torch.contiguous_format), None  # [1, T, Hq, D], one copy


def _varlen_sdpa_mask(*args, attention_mask=None, **kwargs):
    """No mask for packed calls (the attention handles boundaries); sdpa's mask for padded ones."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> str:
    """Register VARLEN_SDPA with transformers (idempotent) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(VARLEN_SDPA, _varlen_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, _varlen_sdpa_mask)
    return VARLEN_SDPA


def pick_attention(device: torch.device | str, attn: str | None = None) -> str:
    """attn if given, else flash_attention_2 on CUDA with flash-attn installed, else VARLEN_SDPA."""
    if attn is None:
        cuda = torch.device(device).type == "cuda"
        attn = "flash_attention_2" if cuda and has_flash_attn() else VARLEN_SDPA
    if attn == VARLEN_SDPA:
        register_varlen_attention()
    return attn


FUSED_TRITON, FUSED_TORCH = "triton", "torch"


def pick_fused_ops(device: torch.device | str, fused: str | None = None) -> str:
    """fused if given, else FUSED_TRITON on CUDA with triton installed (RMSNorm, SwiGLU and RoPE as one kernel
    each: fast_srt/kernels/fused_ops.py), else FUSED_TORCH (transformers' own small ops; CPU keeps them)."""
    if fused is None:
        from fast_srt.kernels import fused_ops

        fused = FUSED_TRITON if torch.device(device).type == "cuda" and fused_ops.triton is not None else FUSED_TORCH
    if fused not in (FUSED_TRITON, FUSED_TORCH):
        raise ValueError(f"fused ops {fused!r}: one of {FUSED_TRITON!r}, {FUSED_TORCH!r}")
    return fused


def _fused_rms_norm_forward(module, hidden_states):
    from fast_srt.kernels.fused_ops import rms_norm

    return rms_norm(hidden_states, module.weight, module.variance_epsilon)


def _fused_mlp_forward(module, x):
    from fast_srt.kernels.fused_ops import silu_mul

    return module.down_proj(silu_mul(module.gate_proj(x), module.up_proj(x)))


_FUSED_ROPE_DEVICES: set[str] = set()  # device types whose models asked for the fused RoPE


def _rope_dispatch(torch_rope):
    """A module-level apply_rotary_pos_emb that takes the fused kernel for tensors on an opted-in device type."""
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if q.device.type in _FUSED_ROPE_DEVICES and unsqueeze_dim == 1 and q.dim() == 4:
            from fast_srt.kernels.fused_ops import apply_rope

            return apply_rope(q, k, cos, sin)
        return torch_rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb.torch_rope = torch_rope
    return apply_rotary_pos_emb


def apply_fused_ops(model, fused: str) -> dict[str, int]:
    """With FUSED_TRITON, route the model's RMSNorms, SiLU MLPs and rotary embedding through the fused kernels
    (instance forwards; RoPE through its modeling module's apply_rotary_pos_emb, for this model's device type).
    Returns how many modules of each kind now run fused ({} with FUSED_TORCH)."""
    import functools
    import sys

    if fused == FUSED_TORCH:
        return {}
    done = {"rms_norm": 0, "swiglu": 0, "rope": 0}
    act = getattr(model.config, "hidden_act", None)
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = functools.partial(_fused_rms_norm_forward, module)
            done["rms_norm"] += 1
        elif name.endswith("MLP") and act in ("silu", "swish") and hasattr(module, "gate_proj"):
            module.forward = functools.partial(_fused_mlp_forward, module)
            done["swiglu"] += 1
        elif name.endswith("Attention"):
            modeling = sys.modules[type(module).__module__]
            rope = getattr(modeling, "apply_rotary_pos_emb", None)
            if rope is not None:
                if not hasattr(rope, "torch_rope"):
                    modeling.apply_rotary_pos_emb = _rope_dispatch(rope)
                done["rope"] += 1
    _FUSED_ROPE_DEVICES.add(next(model.parameters()).device.type)
    return done


def load_policy(model_dir: str, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                attn: str | None = None, gradient_checkpointing: bool = False, fused: str | None = None):
    """Load an HF causal LM for training from a local directory (or hub id), in train mode, with the attention
    and the fused small ops chosen for `device` (pick_attention, pick_fused_ops)."""
    from transformers import AutoModelForCausalLM

    attn = pick_attention(device, attn)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    model = model.to(device)
    apply_fused_ops(model, pick_fused_ops(device, fused))
    return prepare_for_training(model, gradient_checkpointing)


def load_reference(model_dir: str, compute_dtype: torch.dtype, device: torch.device | str = "cpu",
                   attn: str | None = None, fused: str | None = None):
    """The frozen KL reference, computing exactly what the fp32-master policy computes under autocast.

    The policy keeps fp32 master weights and runs its matmuls in `compute_dtype` under autocast: every linear
    layer sees its weight rounded to compute_dtype, while embeddings, norms, the residual stream and the output
    head stay fp32. Loading the reference in compute_dtype throughout would also round the residual stream and
    the norms (a KL of 0.037 nats/token at step 0 on identical weights, measured on the 135M default in bf16).
    Here the linear layers (not the output head) hold compute_dtype weights, which autocast uses as they are, and
    the rest stays fp32: identical numbers on identical weights, for half the memory of an fp32 copy of the
    linears."""
    model = load_policy(model_dir, dtype=torch.float32, device=device, attn=attn, fused=fused)
    model = model.eval().requires_grad_(False)
    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            module.to(compute_dtype)
    return model


def prepare_for_training(model, gradient_checkpointing: bool = False):
    """Checks that token_logprobs can handle the model's head; turns off the KV cache; optional grad checkpointing."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("token_logprobs does not support an output projection with a bias")
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(model.config, name, None) not in (None, 1.0):
            raise ValueError(f"token_logprobs does not support config.{name}={getattr(model.config, name)}")
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def attention_kwargs(model, batch: PackedBatch) -> dict:
    """The extra forward kwargs that tell the model's attention where samples start and end."""
    impl = model.config._attn_implementation
    if batch.layout is not None:
        if impl != VARLEN_SDPA:
            raise ValueError(f"a shared-prefix batch needs the model loaded with attn {VARLEN_SDPA!r} (which uses "
                             f"flash-attn's varlen kernel on CUDA when installed), not {impl!r}")
        return {LAYOUT_KWARG: batch.layout}
    if impl.startswith("flash_attention"):
        # varlen flash-attn path in transformers: used as given, no position_ids scan, no host sync
        return {"cu_seq_lens_q": batch.cu_seqlens, "cu_seq_lens_k": batch.cu_seqlens,
                "max_length_q": batch.max_seqlen, "max_length_k": batch.max_seqlen}
    if impl == VARLEN_SDPA:
        return {SEQLENS_KWARG: batch.seqlens, CU_SEQLENS_KWARG: batch.cu_seqlens}
    raise ValueError(
        f"attention {impl!r} cannot run packed batches without a [T, T] mask; load the model with "
        f"pick_attention() (flash_attention_2 or {VARLEN_SDPA})"
    )


def packed_hidden_states(model, batch: PackedBatch) -> torch.Tensor:
    """Final (post-norm) hidden states of the packed batch: [T, H], each sample attending only to itself."""
    out = model.base_model(
        input_ids=batch.input_ids[None],  # [1, T]
        position_ids=batch.position_ids[None],  # [1, T]
        use_cache=False,
        **attention_kwargs(model, batch),
    )
    return out.last_hidden_state[0]  # [T, H]


def token_logprobs(model, batch: PackedBatch, logprob_fn: LogprobFn, temperature: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp [T] f32, entropy [T] f32): logp[t] = log pi(targets[t] | tokens <= t) at loss positions, 0 elsewhere.

    Only the N = batch.num_loss_tokens hidden states at batch.loss_index go through the output projection
    (tied embeddings included: the weight is whatever get_output_embeddings() holds). Differentiable.
    """
    hidden = packed_hidden_states(model, batch)  # [T, H]
    h = hidden.index_select(0, batch.loss_index)  # [N, H]
    targets = batch.targets.index_select(0, batch.loss_index)  # [N]
    weight = model.get_output_embeddings().weight  # [V, H]
    logp_n, ent_n = logprob_fn(h, weight, targets, temperature)  # [N] f32 each
    T = batch.num_tokens
    zeros = torch.zeros(T, dtype=torch.float32, device=hidden.device)  # [T] f32
    logp = zeros.index_copy(0, batch.loss_index, logp_n.float())  # [T] f32
    entropy = zeros.index_copy(0, batch.loss_index, ent_n.float())  # [T] f32
    return logp, entropy


def weights_for_engine(model: torch.nn.Module, dtype: torch.dtype | str | None = None,
                             ) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint-format (name, tensor) pairs of an HF causal LM, detached, lm_head included even when tied, cast
    one tensor at a time to the engine's dtype (the trainer's fp32 master weights would otherwise make vLLM warn
    once per tensor per write, and convert them itself)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    cast = (lambda t: t.detach().to(dtype)) if dtype is not None else (lambda t: t.detach())  # noqa: E731
    sent_head = False
    state = merged_state_dict(model) if has_lora(model) else model.state_dict(keep_vars=False)
    for name, p in state.items():
        if name == "lm_head.weight":
            sent_head = True
        yield name, cast(p)
    if not sent_head:
        yield "lm_head.weight", cast(model.get_output_embeddings().weight)


def build_optimizer(model, lr: float, betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.0,
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over trainable parameters; weight decay only on matrices (not norms, biases). Fused (one kernel over
    all tensors) on CUDA and CPU, the fastest there (bench/results/optimizer_cpu_2026-11-25.md)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(params) and params[0].device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def cosine_with_min_lr(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup from 0 to 1 over warmup_steps, then cosine down to min_lr_ratio at total_steps."""
    if step < warmup_steps:
        return step / warmup_steps  # as transformers' get_cosine_with_min_lr_schedule_with_warmup
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                    min_lr_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """cosine_with_min_lr + warmup (OpenRLHF default: min = 0.1 x lr, warmup ratio 0.03 of total_steps)."""
    if total_steps <= 0 or warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"bad schedule: total_steps={total_steps}, warmup_steps={warmup_steps}, "
                         f"min_lr_ratio={min_lr_ratio}")

    def lr_lambda(step: int) -> float:
        return cosine_with_min_lr(step, total_steps, warmup_steps, min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
