"""The trained policy: load an HF causal LM, run it over a packed batch, get per-token log-probs, optimizer.

1. `load_policy` loads the model with an attention that understands packed sequences (no padding):
   CUDA with flash-attn installed -> "flash_attention_2" fed cu_seqlens directly (varlen kernel, no mask);
   otherwise -> VARLEN_SDPA, registered here, which runs causal SDPA once per sample.
2. `packed_hidden_states` runs the decoder on the packed row and returns the final hidden states [T, H].
3. `token_logprobs` gathers the loss positions (batch.loss_index) and hands hidden [N, H] and the output
   projection weight [V, H] to `logprob_fn` (the fused kernel or its torch twin): [T, V] logits never exist.

Why per-sample SDPA on CPU. Measured on the 2-core dev machine (torch 2.13) while other jobs loaded it, so as
single-thread process CPU time, min of 3: one attention layer, 9 query / 3 kv heads of dim 64, forward + backward,
ms, per-sample SDPA over split() views / the same over slices / one SDPA with a dense block-diagonal [T, T] mask:
    8 x 300 tokens          fp32  82 / 90 / 654     bf16  92 / 99 / 543
    8 ragged 50..600, T=2400 fp32 102 / 111 / 670    bf16 115 / 120 / 551
    32 x 64 tokens          fp32  23 / 46 / 482     bf16  52 / 74 / 403
    flex attention: "FlexAttention does not support backward on CPU" (eager and torch.compile alike).
Per-sample SDPA does no work on cross-sample blocks and allocates no [T, T] mask: 5-20x less CPU time here.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import math
from collections.abc import Iterator
from typing import Callable

import torch
from torch.nn.functional import scaled_dot_product_attention

from fast_srt.learner.batch import PackedBatch
from fast_srt.learner.lora import has_lora, merged_state_dict

VARLEN_SDPA = "fast_srt_varlen_sdpa"
SEQLENS_KWARG = "fast_srt_seqlens"  # host tuple of sample lengths, passed through the model's **kwargs
LAYOUT_KWARG = "fast_srt_prefix_layout"  # a PrefixLayout (pack_shared), passed the same way

LogprobFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


def _varlen_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                           **kwargs):
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, D], None), causal within each sample.

    Without the seqlens kwarg (an ordinary padded or single-sequence call), behaves like transformers' sdpa.
    On CUDA with flash-attn installed, packed calls go to its varlen kernel. With a PrefixLayout (shared-prefix
    packing), each piece attends to its ancestors and causally to itself.
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
    query, key, value, out_dtype = _attention_inputs(query, key, value)
    if _flash_varlen_applies(query):
        cu = torch.tensor([0, *itertools.accumulate(seqlens)], dtype=torch.int32, device=query.device)
        return _flash_varlen(query, key, value, cu, cu, max(seqlens), max(seqlens), p, scaling), None
    gqa = query.shape[1] != key.shape[1]
    # split (not slicing in a loop): its backward is one cat, where S slices would each zero-fill and add a
    # full-size [1, H, T, D] gradient
    qs, ks, vs = (x.split(list(seqlens), dim=2) for x in (query, key, value))
    with _sdpa_context(query):
        outs = [scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scaling, enable_gqa=gqa)
                for q, k, v in zip(qs, ks, vs)]  # [1, Hq, n, D] each
    out = torch.cat(outs, dim=2)  # [1, Hq, T, D]
    return out.transpose(1, 2).to(out_dtype, memory_format=torch.contiguous_format), None  # [1, T, Hq, D], one copy


@functools.cache
def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _flash_varlen_applies(query: torch.Tensor) -> bool:
    """flash-attn's varlen kernel: CUDA, installed, half precision (fp32 goes through SDPA)."""
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and _has_flash_attn()


def _flash_varlen(query, key, value, cu_q, cu_k, max_q: int, max_k: int, p: float, scaling) -> torch.Tensor:
    """[1, H, T, D] tensors -> [1, Tq, Hq, D]; the causal mask is aligned to the bottom right of each key range."""
    from flash_attn import flash_attn_varlen_func

    out = flash_attn_varlen_func(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                                 cu_q, cu_k, max_q, max_k, dropout_p=p, softmax_scale=scaling, causal=True)
    return out[None]  # [1, Tq, Hq, D]


def _attention_inputs(query, key, value):
    """(q, k, v, out_dtype): the dtype SDPA computes in, and the dtype its output must have (the one autocast or the
    plain path would give: the next projection sees the same dtype as before).

    CUDA: autocast's dtype (RoPE leaves q and k in fp32 beside a bf16 v), what flash-attn and SDPA expect. CPU: fp32,
    with autocast off around the SDPA calls (_sdpa_context). Measured on the 2-core CPU (torch 2.13, one layer,
    9/3 heads of 64, W1's 8 prompts + 64 completions of 64): CPU flash SDPA backward 129 ms in bf16, 55 ms in fp32,
    forward 27 / 26 ms (bench/ab/attention_precision.py). fp32 is also the more precise of the two."""
    dev = query.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else value.dtype
    dt = torch.float32 if dev == "cpu" else out_dtype
    return query.to(dt), key.to(dt), value.to(dt), out_dtype


def _sdpa_context(query):
    """Around the packed SDPA calls. CPU: autocast off while SDPA runs on fp32 inputs (CPU autocast would cast them
    back to bf16). CUDA: flash, memory-efficient or math SDPA, never cuDNN's. cuDNN builds an execution graph for
    every new shape, and the pieces of a packed row have a new shape at almost every call: profiled on an H200
    (bench/results/learner_gpu_smollm2-135m_2026-11-30_profile.txt), its 6330 forward calls of one learner step
    took 7.3 s of host time for 0.11 s of GPU work, its 2130 backward calls 3.7 s for 0.06 s."""
    if query.device.type == "cpu":
        return torch.autocast("cpu", enabled=False)
    if query.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    return contextlib.nullcontext()


def _shared_prefix_attention(module, query, key, value, layout, dropout, scaling):
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] over a pack_shared row -> [1, T, Hq, D].

    Each piece's keys and values are gathered once per layer (its ancestors', then its own: layout.ctx_index);
    the gather's backward adds every piece's gradient into the shared positions. Queries sit at the end of their
    key range, so the causal mask is aligned to the bottom right (query j sees all ancestors and its own piece up
    to j). On CUDA with flash-attn: one varlen call (its causal mask is bottom-right aligned); elsewhere one SDPA
    call per piece, with an additive mask built once per batch and dtype and reused by every layer."""
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects batch 1, got query {tuple(query.shape)}")
    p = dropout if module.training else 0.0
    query, key, value, out_dtype = _attention_inputs(query, key, value)
    kc = key.index_select(2, layout.ctx_index)  # [1, Hkv, Tk, D]
    vc = value.index_select(2, layout.ctx_index)  # [1, Hkv, Tk, D]
    if _flash_varlen_applies(query):
        return _flash_varlen(query, kc, vc, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, p, scaling), None
    gqa = query.shape[1] != key.shape[1]
    qs = query.split(list(layout.lengths), dim=2)
    ks, vs = (x.split(list(layout.key_lengths), dim=2) for x in (kc, vc))
    outs = []
    with _sdpa_context(query):
        for q, k, v, c in zip(qs, ks, vs, layout.context):
            if c == 0:
                o = scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scaling, enable_gqa=gqa)
            else:
                mask = layout.mask(q.shape[2], c, q.dtype, q.device)  # [n, c + n]
                o = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scaling,
                                                 enable_gqa=gqa)
            outs.append(o)  # [1, Hq, n, D]
    out = torch.cat(outs, dim=2)  # [1, Hq, T, D]
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
        attn = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") is not None else VARLEN_SDPA
    if attn == VARLEN_SDPA:
        register_varlen_attention()
    return attn


def load_policy(model_dir: str, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                attn: str | None = None, gradient_checkpointing: bool = False):
    """Load an HF causal LM for training from a local directory (or hub id), in train mode."""
    from transformers import AutoModelForCausalLM

    attn = pick_attention(device, attn)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    return prepare_for_training(model.to(device), gradient_checkpointing)


def load_reference(model_dir: str, compute_dtype: torch.dtype, device: torch.device | str = "cpu",
                   attn: str | None = None):
    """The frozen KL reference, computing exactly what the fp32-master policy computes under autocast.

    The policy keeps fp32 master weights and runs its matmuls in `compute_dtype` under autocast: every linear
    layer sees its weight rounded to compute_dtype, while embeddings, norms, the residual stream and the output
    head stay fp32. Loading the reference in compute_dtype throughout would also round the residual stream and
    the norms (a KL of 0.037 nats/token at step 0 on identical weights, measured on the 135M default in bf16).
    Here the linear layers (not the output head) hold compute_dtype weights, which autocast uses as they are, and
    the rest stays fp32: identical numbers on identical weights, for half the memory of an fp32 copy of the
    linears."""
    model = load_policy(model_dir, dtype=torch.float32, device=device, attn=attn).eval().requires_grad_(False)
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
        return {SEQLENS_KWARG: batch.seqlens}
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
    all tensors) on CUDA and CPU: on the 2-core CPU the fused step over 20M fp32 parameters took 0.02 s against
    0.17-0.30 s for the default foreach implementation (interleaved, same process)."""
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
