"""The ONLY module that reaches below vLLM's public API: writing trainer weights into the live engine.

vLLM's CPU backend repacks linear weights at load time, so a plain `model.load_weights(...)` after start-up fails;
the layer-wise in-place reload path of the model runner (`reload_weights(weights_iterator=...)`) takes checkpoint
format tensors, repacks them, and writes them into the engine's existing storage. The prefix cache is reset after
every write (cached KV blocks were computed with the old weights).

Tied embeddings: vLLM keeps its own (repacked) copy of the output head; `lm_head.weight` must always be sent,
otherwise the engine keeps a stale head. `fast_srt.learner.policy.weights_for_engine` adds it.

LoRA in the engine (`push_adapter`): the engine holds the base weights and serves the policy as a LoRA request.
vLLM keeps a loaded adapter twice: as a `LoRAModel` in its adapter cache (q/k/v and gate/up packed into the fused
layers' lists, the scale folded into B) and copied into the LoRA layers' stacked slot buffers while it is active.
The write updates both in place (the cache, so a re-activation brings the new values; the slot, so the next forward
uses them) and resets the prefix cache. Only the adapter's tensors move: rank-sized, not model-sized.

Tested by tests/engine/test_weight_sync.py: a weight written into the engine changes its next generation, and a
written adapter changes the policy's generations and leaves the base model's (the judge's) unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch


def _model_runner(llm):
    # LLM -> LLMEngine -> in-process executor (exists only with VLLM_ENABLE_V1_MULTIPROCESSING=0) -> worker -> runner
    executor = getattr(llm.llm_engine, "model_executor", None)
    if executor is None:
        raise RuntimeError("vLLM engine runs in another process; set VLLM_ENABLE_V1_MULTIPROCESSING=0 before "
                           "building the engine (fast_srt.engine.Engine does)")
    worker = executor.driver_worker
    worker = getattr(worker, "worker", worker)
    return worker.model_runner


def engine_model(llm) -> torch.nn.Module:
    """vLLM's own nn.Module (for read-only inspection in tests)."""
    return _model_runner(llm).get_model()


def push_weights(llm, weights: Iterable[tuple[str, torch.Tensor]]) -> float:
    """Write `weights` into the live engine in place; return the seconds it took."""
    t0 = time.perf_counter()
    with torch.no_grad():
        _model_runner(llm).reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    llm.reset_prefix_cache()
    return time.perf_counter() - t0


def _lora_manager(llm):
    runner = _model_runner(llm)
    manager = getattr(getattr(runner, "lora_manager", None), "_adapter_manager", None)
    if manager is None:
        raise RuntimeError("the engine was built without LoRA (Engine(enable_lora=True))")
    return manager


def push_adapter(llm, lora_int_id: int, adapters: Iterable[tuple[str, tuple[torch.Tensor, torch.Tensor]]]) -> float:
    """Write LoRA tensors into the engine's loaded adapter `lora_int_id`, in place; return the seconds it took.

    adapters: (module name in HF naming, e.g. `model.layers.0.self_attn.q_proj`, (A [r, in], scaled B [out, r]))
    pairs, as `fast_srt.learner.lora.adapter_for_engine` gives them. Every layer the engine's adapter holds must be
    given, and nothing else."""
    t0 = time.perf_counter()
    manager = _lora_manager(llm)
    lora_model = manager.get_adapter(lora_int_id)
    if lora_model is None:
        raise RuntimeError(f"adapter {lora_int_id} is not loaded in the engine (load it with a LoRA request first)")
    where = {}  # HF module name -> the engine's (A, B) tensors for it (q/k/v and gate/up live in packed lists)
    for name, weights in lora_model.loras.items():
        subs = manager.packed_modules.get(name, [name])
        a_list = weights.lora_a if isinstance(weights.lora_a, list) else [weights.lora_a]
        b_list = weights.lora_b if isinstance(weights.lora_b, list) else [weights.lora_b]
        where.update({sub: (a, b) for sub, a, b in zip(subs, a_list, b_list) if a is not None})
    with torch.no_grad():
        for name, (new_a, new_b) in adapters:
            if name not in where:
                raise KeyError(f"adapted layer {name} is not in the engine's adapter {lora_int_id}")
            a, b = where.pop(name)
            a.copy_(new_a)
            b.copy_(new_b)
        if where:
            raise KeyError(f"no tensors given for {len(where)} layer(s) of the engine's adapter, e.g. "
                           f"{next(iter(where))}")
        if lora_int_id in manager.lora_index_to_id:  # active: refresh its slot in the layers' stacked buffers
            slot = manager.lora_index_to_id.index(lora_int_id)
            for module_name, module in manager.modules.items():
                weights = lora_model.get_lora(module_name)
                if weights is not None:
                    module.set_lora(slot, weights.lora_a, weights.lora_b)
    llm.reset_prefix_cache()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------- CPU LoRA ops
# vLLM's CPU LoRA ops (vllm.lora.ops.torch_ops) gather a copy of the adapter's matrix for every token
# (`weights[indices]`: [tokens, out, r]) and contract token by token: memory traffic of tokens x out x r per layer.
# With one adapter every token of a call uses the same matrix, so one matmul per slot does the same work. These
# replacements keep the ops' signatures and results; a token whose index is -1 (no adapter) gets no LoRA term
# (vLLM's version indexes the last slot with -1 there).

def _lora_product(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype) -> torch.Tensor:
    """[tokens, in] x each token's slot of weights [slots, (1,) out, in] -> [tokens, out] in `dtype`."""
    w = weights.squeeze(1) if weights.dim() == 4 else weights
    x = inputs if inputs.dtype == dtype else inputs.to(dtype)
    slots = indices.unique().tolist()
    if len(slots) == 1 and slots[0] >= 0:
        ws = w[slots[0]]
        return x @ (ws if ws.dtype == dtype else ws.to(dtype)).t()
    out = x.new_zeros(x.shape[0], w.shape[1])
    for s in slots:
        if s >= 0:
            rows = (indices == s).nonzero().squeeze(1)
            out[rows] = x[rows] @ w[s].to(dtype).t()
    return out


def _bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    out = _lora_product(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : out.shape[1]] = scaling * out


def _bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    out = _lora_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = 1 if out.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    n = min(out.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :n] += out[:limit, :n]
    else:
        output_tensor[:, :n] = out[:limit, :n]


def _bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size,
                       add_inputs=True):
    out = _lora_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += out
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = out


def _token_slots(seq_slots: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """The prefill ops' per-sequence slots as per-token ones; when every sequence has the same slot, the
    per-sequence tensor itself (the products above need only its one value)."""
    if seq_slots.numel() and bool((seq_slots == seq_slots[0]).all()):
        return seq_slots
    return torch.repeat_interleave(seq_slots, seq_lens)


def _sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                 batches, max_seq_length, token_nums, scaling):
    _bgmv_shrink(inputs, lora_a_weights, output_tensor, _token_slots(lora_indices_tensor, seq_len_tensor), scaling)


def _sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                 batches, max_seq_length, token_nums, add_inputs=False):
    _bgmv_expand(inputs, lora_b_weights, output_tensor, _token_slots(lora_indices_tensor, seq_len_tensor),
                 add_inputs)


def _sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                       batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs=False):
    _bgmv_expand_slice(inputs, lora_b_weights, output_tensor, _token_slots(lora_indices_tensor, seq_len_tensor),
                       slice_offset, slice_size, add_inputs)


GROUPED_OPS = {"bgmv_shrink": _bgmv_shrink, "bgmv_expand": _bgmv_expand, "bgmv_expand_slice": _bgmv_expand_slice,
               "sgmv_shrink": _sgmv_shrink, "sgmv_expand": _sgmv_expand, "sgmv_expand_slice": _sgmv_expand_slice}


def use_grouped_cpu_lora_ops() -> None:
    """Replace vLLM's per-token CPU LoRA ops with the grouped ones above (process-wide; before any LoRA forward)."""
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica

    for module in (ops, punica):  # punica_cpu imported the ops by name; lora_ops' own sgmv_* call its bgmv_*
        for name, fn in GROUPED_OPS.items():
            setattr(module, name, fn)
